"""Plain-torch KV-row write and gather.

This module is both the CPU path of the dispatcher and the reference every kernel is tested
against, so it is written for obviousness, not speed. All copies go through same-width integer
views of the tensors, which makes them bit-exact for every dtype (NaN payloads and float8 bytes
included) and independent of which dtypes a device's ``index_put_`` supports.
"""

from __future__ import annotations

import torch

__all__ = ["bit_view", "set_mla_kv_buffer_torch", "get_mla_kv_buffer_torch"]

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bit_view(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as the signed integer dtype of the same element width (uint8 for 1 byte)."""
    return t.view(_INT_OF_WIDTH[t.element_size()])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[n, 1, d]`` -> ``[n, d]`` view; ``[n, d]`` unchanged."""
    return t.select(1, 0) if t.dim() == 3 else t


def set_mla_kv_buffer_torch(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
) -> None:
    """Write ``[k_nope | k_rope]`` rows into ``kv_buffer`` at slots ``loc`` (reference semantics).

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]``; written in place.
        loc: ``[n_loc]`` int32/int64 slot indices; ``loc[i] < 0`` marks a padding row (skipped).
        cache_k_nope: ``[n_loc, nope_dim]`` or ``[n_loc, 1, nope_dim]``.
        cache_k_rope: ``[n_loc, rope_dim]`` or ``[n_loc, 1, rope_dim]``.

    ``kv_buffer[loc[i], :nope_dim] = cache_k_nope[i]`` and
    ``kv_buffer[loc[i], nope_dim:nope_dim + rope_dim] = cache_k_rope[i]``; nothing else changes.
    Duplicate non-negative slots are undefined (any one of the rows may win), as on every path.
    """
    kv = bit_view(_rows(kv_buffer))
    nope = bit_view(_rows(cache_k_nope))
    rope = bit_view(_rows(cache_k_rope))
    nope_dim, rope_dim = nope.shape[-1], rope.shape[-1]
    keep = loc >= 0
    if not bool(keep.all()):
        loc, nope, rope = loc[keep], nope[keep], rope[keep]
    if loc.numel() == 0:
        return
    idx = loc.to(device=kv.device, dtype=torch.long)
    kv[idx, :nope_dim] = nope
    kv[idx, nope_dim : nope_dim + rope_dim] = rope


def get_mla_kv_buffer_torch(
    kv_buffer: torch.Tensor, loc: torch.Tensor, nope_dim: int, rope_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather rows ``kv_buffer[loc]`` split into ``([n_loc, nope_dim], [n_loc, rope_dim])``.

    Args:
        kv_buffer: ``[num_slots, total]`` or ``[num_slots, 1, total]``.
        loc: ``[n_loc]`` int32/int64 slot indices, all in ``[0, num_slots)``.
    Returns:
        Two new contiguous tensors of ``kv_buffer``'s dtype.
    """
    kv = _rows(kv_buffer)
    rows = bit_view(kv)[loc.to(device=kv.device, dtype=torch.long)]
    nope = rows[:, :nope_dim].contiguous().view(kv.dtype)
    rope = rows[:, nope_dim : nope_dim + rope_dim].contiguous().view(kv.dtype)
    return nope, rope
