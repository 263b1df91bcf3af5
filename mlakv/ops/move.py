"""Moving KV rows inside the pool, every layer at once: ``kv[layer][tgt_loc] = kv[layer][src_loc]``.

Speculative decoding keeps the accepted draft tokens and moves their cached rows to the slots the
request keeps (sglang's ``MLATokenToKVPool.move_kv_cache``). Doing that with one indexed copy per
layer costs two launches per layer; here the Triton kernel (:mod:`mlakv.kernels.triton.move`) reads a table of the layers' byte offsets
from the first layer's buffer and covers every layer in one launch.

Semantics are those of ``kv[tgt] = kv[src].clone()``: the rows are copied from the state **before**
the move, also when the two sets overlap (``tgt = [5, 6], src = [6, 7]`` moves old 6 to 5 and old
7 to 6). Programs of one launch are not ordered, so a program that writes row 6 must be the one that read
it. Two kernels, one launch each:

* ``staged`` (the default): a program owns a block of columns of one layer for every row; it
  copies all source rows' columns to a scratch ``[n, layers, row]``, then, after a barrier, to the
  targets. Correct for any overlap, no host sync, capturable in a CUDA graph; it loops over the
  rows, which suits the short moves of speculative decoding.
* ``direct`` (``disjoint=True``, the caller guarantees that ``tgt_loc`` and ``src_loc`` share no
  slot): one program per (row, layer) copies straight from source to target.

Slots outside ``[0, num_slots)`` are refused with ``IndexError`` when bounds are checked (always on
CPU); unchecked on the GPU the kernel skips such a pair and never touches memory outside the
buffers. Duplicate targets are undefined (any one source may win), as for the row write.
The CPU path is plain torch (:func:`move_kv_cache_torch`), also the tests' reference.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mlakv.spec import rules

__all__ = ["check_move_args", "move_kv_cache_torch", "move_kv_cache"]


def check_move_args(kv_buffers: Sequence[torch.Tensor], tgt_loc: object, src_loc: object) -> int:
    """Check a move's arguments and return ``n``; raise ``TypeError``/``ValueError`` naming what is wrong.

    ``kv_buffers``: one or more ``[num_slots, (1,) D]`` buffers of one dtype, device, shape and
    strides (the pool's layers); ``tgt_loc``/``src_loc``: ``[n]`` int32/int64 on their device (any stride).
    """
    if len(kv_buffers) == 0:
        raise ValueError("kv_buffers: at least one layer buffer is needed")
    first = kv_buffers[0]
    for i, b in enumerate(kv_buffers):
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"kv_buffers[{i}] must be a torch.Tensor, got {type(b).__name__}")
        if b.dim() not in (2, 3) or (b.dim() == 3 and b.shape[1] != 1):
            raise ValueError(f"kv_buffers[{i}] must be [num_slots, D] or [num_slots, 1, D], got shape {tuple(b.shape)}")
        if b.shape != first.shape or b.stride() != first.stride() or b.dtype != first.dtype or b.device != first.device:
            raise ValueError(f"kv_buffers[{i}] differs from kv_buffers[0] in shape, strides, dtype or device")
        if b.stride(-1) != 1 and b.shape[-1] > 1:
            raise ValueError(f"kv_buffers[{i}]: the last dim must be contiguous, got strides {tuple(b.stride())}")
        if b.shape[0] > 1 and b.stride(0) < b.shape[-1]:
            raise ValueError(f"kv_buffers[{i}]: rows overlap (dim 0 stride {b.stride(0)} < last dim {b.shape[-1]})")
    for name, t in (("tgt_loc", tgt_loc), ("src_loc", src_loc)):
        rules.check_index_tensor(name, t, "[n]")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but the kv buffers are on {first.device}")
    if tgt_loc.shape[0] != src_loc.shape[0]:
        raise ValueError(f"tgt_loc has {tgt_loc.shape[0]} entries but src_loc has {src_loc.shape[0]}")
    return tgt_loc.shape[0]


def _check_bounds(tgt_loc: torch.Tensor, src_loc: torch.Tensor, num_slots: int) -> None:
    """Raise ``IndexError`` for a slot outside ``[0, num_slots)`` (the rule book's slot rule; syncs on GPU)."""
    rules.check_token_slots(tgt_loc, "tgt_loc", num_slots, 1)
    rules.check_token_slots(src_loc, "src_loc", num_slots, 1)


def _rows2d(b: torch.Tensor) -> torch.Tensor:
    return b.select(1, 0) if b.dim() == 3 else b


def move_kv_cache_torch(kv_buffers: Sequence[torch.Tensor], tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """Reference / CPU path: ``kv[tgt_loc] = kv[src_loc]`` for every layer, from the pre-move state.

    Every slot must lie in ``[0, num_slots)`` (the caller checks). The gather makes a copy before
    the scatter, so overlapping sets read the old rows. Bit-exact (integer views).
    """
    if tgt_loc.shape[0] == 0:
        return
    tgt = tgt_loc.to(torch.long)
    src = src_loc.to(torch.long)
    for b in kv_buffers:
        rows = _rows2d(b)
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
        r = rows.view(width)
        r[tgt] = r[src]


def move_kv_cache(
    kv_buffers: Sequence[torch.Tensor],
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
    *,
    check_bounds: bool = False,
    disjoint: bool = False,
) -> None:
    """Copy rows ``src_loc -> tgt_loc`` in every buffer of ``kv_buffers``, from the pre-move state.

    Args:
        kv_buffers: the layers' buffers, each ``[num_slots, (1,) D]`` (one shape, stride, dtype, device).
        tgt_loc: ``[n]`` int32/int64 target slots; src_loc: ``[n]`` source slots (any strides).
        check_bounds: raise ``IndexError`` for a slot outside ``[0, num_slots)`` before anything is
            written (syncs on GPU; always done on CPU). Unchecked on the GPU such a pair is skipped.
        disjoint: promise that no slot is both a source and a target: the row-parallel kernel
            (faster for long moves) instead of the staged one; no scratch.

    CPU: plain torch. CUDA: one Triton launch for all layers; the staged kernel allocates a
    scratch of ``n * layers * row`` bytes (the rows' pre-move copy).
    """
    n = check_move_args(kv_buffers, tgt_loc, src_loc)
    if n == 0:
        return
    num_slots = kv_buffers[0].shape[0]
    if check_bounds or not kv_buffers[0].is_cuda:
        _check_bounds(tgt_loc, src_loc, num_slots)
    if not kv_buffers[0].is_cuda:
        move_kv_cache_torch(kv_buffers, tgt_loc, src_loc)
        return
    from mlakv.kernels.triton.move import launch_move_kv_rows

    launch_move_kv_rows(kv_buffers, tgt_loc, src_loc, disjoint=disjoint)
