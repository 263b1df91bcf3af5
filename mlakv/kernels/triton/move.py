"""Triton kernels of the row move over every layer in one launch (semantics and routing:
:mod:`mlakv.ops.move`): ``staged`` (any overlap; through a scratch) and ``direct`` (disjoint sets).

Each kernel's launch shape comes from :func:`mlakv.spec.tuning.move_triton_launch` (by the rows a call
moves); the launcher's overrides (the bench's sweep) force one. The shape decides which program
copies which words, never the bytes a move leaves.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from mlakv.spec import tuning

__all__ = ["launch_move_kv_rows"]

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _rows2d(b: torch.Tensor) -> torch.Tensor:
    return b.select(1, 0) if b.dim() == 3 else b


def _word_for(kv_buffers: Sequence[torch.Tensor]) -> tuple[int, torch.dtype]:
    """The widest word dividing the row bytes, the row stride and every layer's base address."""
    es = kv_buffers[0].element_size()
    row_bytes = kv_buffers[0].shape[-1] * es
    stride_bytes = kv_buffers[0].stride(0) * es
    addrs = [b.data_ptr() for b in kv_buffers]
    for w, dt in _WORDS:
        if row_bytes % w == 0 and stride_bytes % w == 0 and all(a % w == 0 for a in addrs):
            return w, dt
    raise AssertionError("unreachable: 1 divides everything")


@functools.lru_cache(maxsize=64)
def _layer_offsets(device: torch.device, word: int, ptrs: tuple[int, ...]) -> torch.Tensor:
    """Layer l starts ``(addr_l - addr_0) / word`` words from layer 0's first word: the kernels' layer
    table, made once per set of buffers (no host-to-device copy per call, so a move can be captured
    in a CUDA graph). It depends on the addresses only."""
    return torch.tensor([(p - ptrs[0]) // word for p in ptrs], dtype=torch.int64, device=device)


@triton.jit
def _move_rows_kernel(
    ptr,
    layer_off_ptr,
    tgt_loc_ptr,
    src_loc_ptr,
    tgt_loc_stride,
    src_loc_stride,
    row_stride,
    num_slots,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Direct mode (disjoint sets): program (i, layer) copies row src[i] -> tgt[i] of one layer, in
    # words. Layer l's buffer starts layer_off[l] words from the first layer's (one table, one
    # launch). A pair with a slot outside [0, num_slots) is masked off: nothing outside the buffers.
    i = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    t = tl.load(tgt_loc_ptr + i * tgt_loc_stride).to(tl.int64)
    s = tl.load(src_loc_ptr + i * src_loc_stride).to(tl.int64)
    base = tl.load(layer_off_ptr + layer)
    t_b = tl.zeros([BLOCK], dtype=tl.int64) + t  # the pair's slots, broadcast over the block
    s_b = tl.zeros([BLOCK], dtype=tl.int64) + s
    ok = (t_b >= 0) & (t_b < num_slots) & (s_b >= 0) & (s_b < num_slots)
    for start in tl.static_range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = (offs < ROW) & ok
        x = tl.load(ptr + base + s * row_stride + offs, mask=m)
        tl.store(ptr + base + t * row_stride + offs, x, mask=m)


@triton.jit
def _move_columns_kernel(
    ptr,
    scratch_ptr,
    layer_off_ptr,
    tgt_loc_ptr,
    src_loc_ptr,
    tgt_loc_stride,
    src_loc_stride,
    row_stride,
    num_slots,
    n,
    n_layers,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Staged mode (any sets, one launch): program (layer, column block) owns columns
    # [cb * BLOCK, cb * BLOCK + BLOCK) of one layer for *every* row, so no other program reads or
    # writes them. It first copies all n source rows' columns (ROWS rows per step) to its own part
    # of the scratch, then, after a CTA barrier, all of them to the targets: every read sees the
    # pre-move state. A pair with a slot outside [0, num_slots) is masked off in both phases.
    # (`layer` is int64, so the scratch and row offsets are formed in 64 bits.)
    layer = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = (cols < ROW)[None, :]
    base = tl.load(layer_off_ptr + layer)
    for phase in tl.static_range(2):
        for i0 in range(0, n, ROWS):
            idx = (i0 + tl.arange(0, ROWS)).to(tl.int64)
            live = idx < n
            t = tl.load(tgt_loc_ptr + idx * tgt_loc_stride, mask=live, other=-1).to(tl.int64)
            s = tl.load(src_loc_ptr + idx * src_loc_stride, mask=live, other=-1).to(tl.int64)
            ok = live & (t >= 0) & (t < num_slots) & (s >= 0) & (s < num_slots)
            m = ok[:, None] & in_row
            scratch = scratch_ptr + ((idx * n_layers + layer) * ROW)[:, None] + cols[None, :]
            if phase == 0:
                x = tl.load(ptr + base + (s * row_stride)[:, None] + cols[None, :], mask=m)
                tl.store(scratch, x, mask=m)
            else:
                x = tl.load(scratch, mask=m)
                tl.store(ptr + base + (t * row_stride)[:, None] + cols[None, :], x, mask=m)
        if phase == 0:
            tl.debug_barrier()  # the block's scratch writes are visible to all its threads before the scatter


def _power_of_two(name: str, v: int) -> None:
    if v < 1 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two, got {v}")


def launch_move_kv_rows(
    kv_buffers: Sequence[torch.Tensor],
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
    *,
    disjoint: bool = False,
    num_warps: int = 0,
    block_words: int = 0,
    rows_per_step: int = 0,
    column_words: int = 0,
) -> None:
    """Launch the move over every layer in one kernel: staged (any sets) or ``disjoint`` (row-parallel).

    Args (checked by :func:`check_move_args`):
        kv_buffers: ``L`` buffers ``[num_slots, (1,) D]``, same shape/strides/dtype/device.
        tgt_loc, src_loc: ``[n]`` int32/int64 on that device, any stride; a pair with either slot
            outside ``[0, num_slots)`` is skipped.
        disjoint: the caller guarantees ``tgt_loc`` and ``src_loc`` share no slot: grid
            ``(n, L)``, one row per program, copied in blocks of ``next_pow2(min(row words,
            block_words))`` words. Otherwise grid ``(L, ceil(row words / column_words))``: each
            program loops over all rows twice, ``rows_per_step`` at a time (gather to a scratch
            ``[n, L, row]``, then scatter), which suits the short moves of speculative decoding.
        num_warps, block_words (direct only), rows_per_step, column_words (staged only): override the
            launch table (:func:`mlakv.spec.tuning.move_triton_launch`; the bench's sweep); 0 takes the
            table's choice. Words are the copy's (the widest of 8/4/2/1 bytes dividing the row, its
            stride and every layer's address); the sizes are powers of two. The bytes moved are the
            same at every shape.
    """
    if disjoint and (rows_per_step or column_words):
        raise ValueError("rows_per_step and column_words apply to the staged kernel, not the direct one")
    if not disjoint and block_words:
        raise ValueError("block_words applies to the direct kernel, not the staged one")
    for name, v in (("block_words", block_words), ("rows_per_step", rows_per_step), ("column_words", column_words)):
        if v:
            _power_of_two(name, v)
    n = tgt_loc.shape[0]
    if n == 0:
        return
    first = kv_buffers[0]
    w, word = _word_for(kv_buffers)
    es = first.element_size()
    row = first.shape[-1] * es // w
    row_stride = first.stride(0) * es // w
    num_slots = first.shape[0]
    base_words = _rows2d(first).view(torch.uint8).view(word)
    offsets = _layer_offsets(first.device, w, tuple(b.data_ptr() for b in kv_buffers))
    n_layers = len(kv_buffers)
    t_stride, s_stride = tgt_loc.stride(0), src_loc.stride(0)
    if disjoint:
        warps, max_block = tuning.move_triton_launch("direct", n)
        block = 1 << max(0, (min(row, block_words or max_block) - 1).bit_length())
        _move_rows_kernel[(n, n_layers)](
            base_words, offsets, tgt_loc, src_loc, t_stride, s_stride, row_stride, num_slots,
            ROW=row, BLOCK=block, num_warps=num_warps or warps,
        )  # fmt: skip
        return
    warps, rows, cols = tuning.move_triton_launch("staged", n)
    rows, cols = rows_per_step or rows, column_words or cols
    scratch = torch.empty((n, n_layers, row), dtype=word, device=first.device)
    _move_columns_kernel[(n_layers, triton.cdiv(row, cols))](
        base_words, scratch, offsets, tgt_loc, src_loc, t_stride, s_stride, row_stride, num_slots, n, n_layers,
        ROW=row, BLOCK=cols, ROWS=rows, num_warps=num_warps or warps,
    )  # fmt: skip
