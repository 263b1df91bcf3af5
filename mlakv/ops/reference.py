"""Plain-torch KV-row write and gather.

This module is both the CPU path of the dispatcher and the reference every kernel is tested
against, so it is written for obviousness, not speed. All copies go through same-width integer
views of the tensors, which makes them bit-exact for every dtype (NaN payloads and float8 bytes
included) and independent of which dtypes a device's ``index_put_`` supports. A write's source of
another 16/32-bit float dtype than the buffer is first converted with ``Tensor.to`` (the definition
of the conversion the kernels do in registers).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["bit_view", "kept_rows", "set_mla_kv_buffer_torch", "get_mla_kv_buffer_torch"]

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as the signed integer dtype of the same element width (uint8 for 1 byte)."""
    return t.view(_INT_OF_WIDTH[t.element_size()])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[n, 1, d]`` -> ``[n, d]`` view; ``[n, d]`` unchanged."""
    return t.select(1, 0) if t.dim() == 3 else t


def kept_rows(
    loc: torch.Tensor, num_slots: int, reserved_skip_index: Optional[int] = None, dcp_world_size: int = 1, dcp_rank: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The write's row selection: ``(keep [n_loc] bool, row [n_loc] int64)``.

    A row is kept when ``loc >= 0``, ``loc != reserved_skip_index``, ``loc % dcp_world_size ==
    dcp_rank`` and it lands inside the buffer; it lands at ``row = loc // dcp_world_size``.
    """
    idx = loc.to(dtype=torch.long)
    keep = idx >= 0
    if reserved_skip_index is not None:
        keep &= idx != reserved_skip_index
    if dcp_world_size > 1:
        keep &= (idx % dcp_world_size) == dcp_rank
        idx = idx // dcp_world_size
    keep &= idx < num_slots
    return keep, idx


def set_mla_kv_buffer_torch(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: Optional[torch.Tensor] = None,
    *,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> None:
    """Write ``[k_nope | k_rope]`` rows into ``kv_buffer`` at slots ``loc`` (reference semantics).

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]``; written in place.
        loc: ``[n_loc]`` int32/int64 slot indices, any stride; ``loc[i] < 0`` marks a padding row
            (skipped), as does ``loc[i] == reserved_skip_index``.
        cache_k_nope: ``[n_loc, nope_dim]`` or ``[n_loc, 1, nope_dim]``.
        cache_k_rope: ``[n_loc, rope_dim]`` or ``[n_loc, 1, rope_dim]``; None or ``[n_loc, 0]``
            for rope-less rows.
        dcp_world_size, dcp_rank: only rows with ``loc % dcp_world_size == dcp_rank`` are written,
            at row ``loc // dcp_world_size``.

    ``kv_buffer[row[i], :nope_dim] = cache_k_nope[i]`` and
    ``kv_buffer[row[i], nope_dim:nope_dim + rope_dim] = cache_k_rope[i]`` for each kept row (see
    :func:`kept_rows`; rows landing past the buffer are skipped, the dispatcher raises for them
    first); nothing else changes. Duplicate kept slots are undefined (any one may win), as on every path.
    A source of another dtype than ``kv_buffer`` (16/32-bit floats) is written as ``source.to(kv_buffer.dtype)``.
    """
    kv = bit_view(_rows(kv_buffer))
    nope = bit_view(_rows(cache_k_nope).to(kv_buffer.dtype))
    nope_dim = nope.shape[-1]
    rope = (
        bit_view(_rows(cache_k_rope).to(kv_buffer.dtype)) if cache_k_rope is not None and cache_k_rope.shape[-1] > 0 else None
    )
    keep, idx = kept_rows(loc, kv.shape[0], reserved_skip_index, dcp_world_size, dcp_rank)
    if not bool(keep.all()):
        keep = keep.to(kv.device)
        idx, nope = idx.to(kv.device)[keep], nope[keep]
        rope = None if rope is None else rope[keep]
    if idx.numel() == 0:
        return
    idx = idx.to(kv.device)
    kv[idx, :nope_dim] = nope
    if rope is not None:
        kv[idx, nope_dim : nope_dim + rope.shape[-1]] = rope


def get_mla_kv_buffer_torch(
    kv_buffer: torch.Tensor, loc: torch.Tensor, nope_dim: int, rope_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather rows ``kv_buffer[loc]`` split into ``([n_loc, nope_dim], [n_loc, rope_dim])``.

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]``.
        loc: ``[n_loc]`` int32/int64 slot indices (physical rows), any stride. Entries outside
            ``[0, num_slots)`` (padding ``< 0``, or out of range) give zero rows; callers that
            must refuse out-of-range slots check first (the pool does).
    Returns:
        Two new contiguous tensors of ``kv_buffer``'s dtype.
    """
    kv = bit_view(_rows(kv_buffer))
    idx = loc.to(device=kv.device, dtype=torch.long)
    valid = (idx >= 0) & (idx < kv.shape[0])
    rows = kv[torch.where(valid, idx, 0)] if kv.shape[0] else kv.new_zeros((idx.shape[0], kv.shape[1]))
    rows = torch.where(valid[:, None], rows, torch.zeros((), dtype=rows.dtype))
    nope = rows[:, :nope_dim].contiguous().view(kv_buffer.dtype)
    rope = rows[:, nope_dim : nope_dim + rope_dim].contiguous().view(kv_buffer.dtype)
    return nope, rope
