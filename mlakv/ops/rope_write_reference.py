"""Plain-torch reference of an MLA layer's cache step: RoPE, the cache-row write, and the absorbed query.

Before attention an MLA layer rotates ``k_pe`` and ``q_pe`` (RoPE), writes the cache row
``[k_nope | rotated k_pe]`` in the pool's format, and builds the query the attention kernel takes,
``q_out = [q_nope | rotated q_pe]``. The fused kernels (Triton, JIT CUDA) do all of it in one
launch; this module says what they must produce, bit for bit, and is the CPU path of
:func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope`. It is written for obviousness: it rotates
first, exactly as a separate RoPE kernel would, and then hands the rotated rows to the existing
reference writers (:func:`mlakv.ops.reference.set_mla_kv_buffer_torch` for 16-bit rows,
:func:`mlakv.ops.fp8.quantize_mla_rows` for the FP8 formats).

RoPE, as sglang and vLLM define it:

* ``cos_sin_cache`` is ``[max_pos, rope_dim]`` float32, row ``p`` = ``cos`` (``rope_dim / 2``
  values) then ``sin`` (``rope_dim / 2`` values) of position ``p``.
* Pair ``j`` of a head's ``rope_dim`` values is ``(x[j], x[j + rope_dim / 2])`` when
  ``is_neox_style`` (rotate halves) and ``(x[2j], x[2j + 1])`` otherwise (interleaved pairs, the
  style DeepSeek uses). With ``c = cos[j]``, ``s = sin[j]`` of the token's position the pair becomes
  ``(x * c - y * s, x * s + y * c)``, each product and the sum rounded to fp32 once (no fused
  multiply-add), and the result is rounded once to the source's dtype (bf16/fp16, round to nearest
  even; a NaN becomes the dtype's canonical quiet NaN: bf16 ``0x7FC0``, fp16 ``0x7E00``).

The rotated rows are then written exactly as the plain writes write them:

* ``kv_cache_format=None``: 16-bit rows, ``kv_buffer`` of the sources' dtype, bytes copied;
* ``"per_tensor"`` / ``"ds_mla"``: the FP8 formats of :mod:`mlakv.ops.fp8` (``ds_mla`` keeps the
  rope part in bf16: an fp16 rotated value is rounded to bf16 there, a second rounding, as the plain
  FP8 write of a rotated fp16 row does; its tile scales by the call's ``ds_mla_scale_rule``).

and the query: ``q_out[..., :nope] = q_nope``, ``q_out[..., nope:] = rotated q_pe`` in the query's
dtype, or, for a float8_e4m3fn ``q_out``, ``e4m3([q_nope | rotated q_pe] / q_scale)`` (the
per_tensor rule: IEEE division, round to nearest even, saturating to +-448, NaN -> 0x7F).

Row selection is the plain write's: a token's cache row is skipped when ``loc < 0`` (padding),
``loc == reserved_skip_index``, or, under decode context parallelism, ``loc % dcp_world_size !=
dcp_rank``; a kept row lands at ``loc // dcp_world_size``. The query is built for every token,
whatever its ``loc``. ``loc`` and ``positions`` are read at their strides. Every kept row must land
inside ``kv_buffer`` and every position must lie in ``[0, max_pos)``, else ``IndexError`` is raised
before anything is written. The inputs are never modified.
"""

from __future__ import annotations

from typing import Union

import torch

from mlakv.spec import rules
from mlakv.spec.calls import RopeWriteCall

from .fp8 import quantize_mla_rows
from .reference import bit_view, kept_rows, set_mla_kv_buffer_torch

__all__ = [
    "ROPE_DTYPES",
    "rope_rotate_torch",
    "build_q_out_torch",
    "set_mla_kv_buffer_rope_torch",
]

ROPE_DTYPES = (torch.bfloat16, torch.float16)
_CANON_NAN = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[n, 1, d]`` -> ``[n, d]`` view; ``[n, d]`` unchanged."""
    return t.select(1, 0) if t.dim() == 3 else t


def _round_to(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> ``dtype`` (bf16/fp16): round to nearest even; NaN as the dtype's canonical quiet NaN
    (so the result does not depend on the device ``Tensor.to`` runs on). fp32: ``y`` itself."""
    if dtype == torch.float32:
        return y
    out = y.to(dtype).view(torch.int16)
    nan = torch.full_like(out, _CANON_NAN[dtype])
    return torch.where(torch.isnan(y), nan, out).view(dtype)


def rope_rotate_torch(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox_style: bool
) -> torch.Tensor:
    """Rotate ``x [n, ..., rope_dim]`` (bf16/fp16; fp32 too, unrounded, for models that run in fp32)
    by the angles of ``positions [n]``.

    Args:
        x: ``[n, rope_dim]``, ``[n, 1, rope_dim]`` or ``[n, H, rope_dim]``; any strides.
        positions: ``[n]`` int32/int64 (any stride), each in ``[0, max_pos)`` (not checked here).
        cos_sin_cache: ``[max_pos, rope_dim]`` float32: ``cos`` half, then ``sin`` half.
        is_neox_style: rotate halves (True) or interleaved pairs (False).
    Returns:
        A new contiguous tensor of ``x``'s shape and dtype (see the module docstring for the rule).
    """
    d = x.shape[-1]
    half = d // 2
    cs = cos_sin_cache[positions.to(device=cos_sin_cache.device, dtype=torch.long)].to(x.device)  # [n, d]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    cos, sin = cs[:, :half].reshape(shape), cs[:, half:d].reshape(shape)
    xf = x.float()
    if is_neox_style:
        x1, x2 = xf[..., :half], xf[..., half:]
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    o1 = x1 * cos - x2 * sin  # three fp32 operations, each rounded: no fused multiply-add
    o2 = x1 * sin + x2 * cos
    out = torch.cat([o1, o2], dim=-1) if is_neox_style else torch.stack([o1, o2], dim=-1).reshape(xf.shape)
    return _round_to(out, x.dtype)


def build_q_out_torch(
    q_out: torch.Tensor, q_nope: torch.Tensor, q_pe_rotated: torch.Tensor, q_scale: Union[float, torch.Tensor, None]
) -> None:
    """Write ``q_out [n, H, nope + rope] = [q_nope | q_pe_rotated]`` in ``q_out``'s format (in place).

    ``q_out`` of ``q_nope``'s dtype: the values copied bit for bit. ``q_out`` float8_e4m3fn (or
    uint8, the same bytes): ``e4m3(x / q_scale)`` by the per_tensor rule of :mod:`mlakv.ops.fp8`.
    """
    nope = q_nope.shape[-1]
    if q_out.element_size() == 1:
        n, h = q_nope.shape[0], q_nope.shape[1]
        rows = quantize_mla_rows(
            q_nope.reshape(n * h, nope), q_pe_rotated.reshape(n * h, q_pe_rotated.shape[-1]), "per_tensor", q_scale
        )
        q_out.view(torch.uint8).copy_(rows.view(torch.uint8).reshape(q_out.shape))
        return
    out = bit_view(q_out)
    out[..., :nope] = bit_view(q_nope)
    out[..., nope:] = bit_view(q_pe_rotated)


def set_mla_kv_buffer_rope_torch(call: RopeWriteCall) -> None:
    """The reference cache step: rotate ``k_pe`` (and ``q_pe``), write the rows, build ``q_out``.

    ``call``'s fields (validated by the caller, :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope`):
        kv_buffer: ``[num_slots, (1,) row]``: the sources' dtype (``kv_cache_format=None``) or
            uint8/float8_e4m3fn bytes (``"per_tensor"``, ``"ds_mla"``); written in place.
        loc: ``[n]`` int32/int64 slots, any stride (padding ``< 0``).
        k_nope: ``[n, (1,) nope_dim]``; k_pe: ``[n, (1,) rope_dim]`` (before rotation), bf16/fp16.
        positions: ``[n]`` int32/int64, any stride; cos_sin_cache: ``[max_pos, rope_dim]`` float32.
        is_neox_style: rotate halves (True) or interleaved pairs (False).
        q_nope: ``[n, H, nope_dim]``; q_pe: ``[n, H, rope_dim]``; q_out: ``[n, H, nope_dim +
            rope_dim]`` of q's dtype or float8_e4m3fn (then ``q_scale``); all three or none.
        kv_cache_format, k_scale: the pool's format and its per-tensor scale (see :mod:`mlakv.ops.fp8`).
        skip_index (negative: none), dcp_world_size, dcp_rank: the plain write's row selection.
        ds_mla_scale_rule: ds_mla's tile-scale rule (:func:`mlakv.ops.fp8.quantize_mla_rows`).

    Raises ``IndexError`` (before writing anything) for a kept row landing past ``kv_buffer`` or a
    position outside ``[0, max_pos)``.
    """
    (kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, is_neox_style, kv_cache_format, k_scale,
     q_nope, q_pe, q_out, q_scale, skip_index, dcp_world_size, dcp_rank, ds_mla_scale_rule) = call  # fmt: skip
    skip = None if skip_index is None or skip_index < 0 else skip_index
    rules.check_loc_bounds(
        loc, kv_buffer.shape[0], reserved_skip_index=skip, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank
    )
    rules.check_positions_bounds(positions, cos_sin_cache.shape[0])
    k_rot = rope_rotate_torch(_rows(k_pe), positions, cos_sin_cache, is_neox_style)
    q_rot = None if q_pe is None else rope_rotate_torch(q_pe, positions, cos_sin_cache, is_neox_style)
    if kv_cache_format is None:
        set_mla_kv_buffer_torch(
            kv_buffer, loc, _rows(k_nope), k_rot,
            reserved_skip_index=skip, dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )  # fmt: skip
    else:
        rows = quantize_mla_rows(
            _rows(k_nope), k_rot, kv_cache_format, k_scale, ds_mla_scale_rule=ds_mla_scale_rule
        ).view(torch.uint8)
        keep, idx = kept_rows(loc, kv_buffer.shape[0], skip, dcp_world_size, dcp_rank)
        keep = keep.to(rows.device)
        if bool(keep.any()):
            kv = _rows(kv_buffer).view(torch.uint8)
            kv[idx.to(rows.device)[keep].to(kv.device), : rows.shape[1]] = rows[keep].to(kv.device)
    if q_out is not None:
        build_q_out_torch(q_out, q_nope, q_rot, q_scale)
