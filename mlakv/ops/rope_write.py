"""The fused cache step of an MLA layer: RoPE, the cache-row write (quantized for FP8 caches), the absorbed query.

At decode batch sizes an MLA layer runs several launch-bound kernels back to back before attention:
RoPE on ``k_pe`` and ``q_pe``, the cache-row write, and the concatenation ``[q_nope | q_pe]`` the
attention kernel takes. :func:`set_mla_kv_buffer_rope` does all of it in one launch, in any of the
pool's cache formats, with every rule of the plain write. This module validates the call against the
rule book (:mod:`mlakv.spec.rules`), checks bounds where asked (always on CPU), and hands the call to
its path: CPU tensors take the reference (:mod:`mlakv.ops.rope_write_reference`); CUDA tensors go to
the dispatcher (:func:`mlakv.ops.dispatch.run_rope_write`), which picks the JIT CUDA kernel (SM90+) or Triton.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from mlakv import _env
from mlakv.spec import rules
from mlakv.spec.calls import RopeWriteCall

from . import dispatch
from .fp8 import check_fp8_format, fp8_row_bytes, scale_tensor
from .rope_write_reference import set_mla_kv_buffer_rope_torch

__all__ = ["KV_CACHE_FORMATS", "set_mla_kv_buffer_rope", "rope_write_row_bytes"]

KV_CACHE_FORMATS = (None, "per_tensor", "ds_mla")
_BYTE_DTYPES = (torch.uint8, torch.float8_e4m3fn)


def rope_write_row_bytes(kv_cache_format: Optional[str], dtype: torch.dtype, nope_dim: int, rope_dim: int) -> int:
    """Bytes of one stored row: ``2 * (nope + rope)`` for 16-bit rows (``kv_cache_format=None``),
    else the FP8 format's (:func:`mlakv.ops.fp8.fp8_row_bytes`). Raises ``ValueError`` for an
    unknown format or widths it cannot hold."""
    if kv_cache_format is None:
        return torch.empty((), dtype=dtype).element_size() * (nope_dim + rope_dim)
    check_fp8_format(kv_cache_format, nope_dim, rope_dim)
    return fp8_row_bytes(kv_cache_format, nope_dim, rope_dim)


def _scale(name: str, value: object, needed: bool, why: str, device: torch.device) -> Optional[torch.Tensor]:
    if not needed:
        if value is not None:
            raise ValueError(f"{name} must be None here ({why})")
        return None
    if value is None:
        raise ValueError(f"{name} is required ({why})")
    try:
        return scale_tensor(value, device)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:  # scale_tensor names k_scale: say which scale it was
        raise type(e)(str(e).replace("k_scale", name)) from None


def set_mla_kv_buffer_rope(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    k_nope: torch.Tensor,
    k_pe: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool,
    *,
    q_nope: Optional[torch.Tensor] = None,
    q_pe: Optional[torch.Tensor] = None,
    q_out: Optional[torch.Tensor] = None,
    kv_cache_format: Optional[str] = None,
    k_scale: Union[float, torch.Tensor, None] = None,
    q_scale: Union[float, torch.Tensor, None] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
    check_bounds: Optional[bool] = None,
    ds_mla_scale_rule: str = "fp32_floor",
) -> Optional[torch.Tensor]:
    """Rotate ``k_pe`` (and ``q_pe``), write the cache rows at ``loc`` and build ``q_out``, in one launch.

    Args:
        kv_buffer: ``[num_slots, (1,) row]``, written in place. ``kv_cache_format=None``: 16-bit rows
            of the sources' dtype (row ``>= nope_dim + rope_dim`` elements); ``"per_tensor"``/``"ds_mla"``:
            uint8/float8_e4m3fn bytes in that FP8 format (:mod:`mlakv.ops.fp8`). Rows may be strided.
        loc: ``[n]`` int32/int64 slots, any stride. ``loc < 0`` (padding) and ``loc ==
            reserved_skip_index`` rows are skipped; with ``dcp_world_size > 1`` only rows with ``loc %
            dcp_world_size == dcp_rank`` are written, at ``loc // dcp_world_size``.
        k_nope: ``[n, kv_lora_rank]`` or ``[n, 1, kv_lora_rank]`` bf16/fp16, rows may be strided.
        k_pe: ``[n, rope_dim]`` or ``[n, 1, rope_dim]``, k_nope's dtype, *before* rotation.
        positions: ``[n]`` int32/int64 token positions, any stride, each in ``[0, max_pos)``.
        cos_sin_cache: ``[max_pos, rope_dim]`` float32 (sglang's/vLLM's table: ``cos`` half then
            ``sin`` half per position; DeepSeek's YaRN table included), last dim contiguous.
        is_neox_style: True rotates halves ``(x[j], x[j + rope_dim/2])``; False interleaved pairs
            ``(x[2j], x[2j + 1])`` (DeepSeek).
        q_nope: ``[n, H, kv_lora_rank]`` (the absorbed, post-``W_UK`` query), k_nope's dtype.
        q_pe: ``[n, H, rope_dim]`` before rotation, k_nope's dtype.
        q_out: ``[n, H, kv_lora_rank + rope_dim]``: q's dtype, or float8_e4m3fn (then ``q_scale``);
            None with ``q_nope``/``q_pe`` given: allocated (float8_e4m3fn when ``q_scale`` is given).
            Must not overlap the inputs.
        kv_cache_format: None, ``"per_tensor"`` (needs ``k_scale``) or ``"ds_mla"`` (rope stays bf16).
        ds_mla_scale_rule: ds_mla's tile-scale rule, ``"fp32_floor"`` (default), ``"fp32"`` or
            ``"ue8m0"`` (:mod:`mlakv.ops.fp8`); other formats ignore it.
        k_scale, q_scale: positive finite float, or a 1-element float32 tensor on the device (read by
            the kernel: CUDA-graph safe).
        reserved_skip_index, dcp_world_size, dcp_rank: the plain write's row selection.
        check_bounds: raise ``IndexError`` before writing anything for a kept row landing past
            ``kv_buffer`` or a position outside ``[0, max_pos)`` (syncs on GPU); default
            ``MLAKV_CHECK_BOUNDS``; always on CPU. Unchecked GPU calls skip such rows, and write
            nothing at all for a token whose position is out of range.

    Returns:
        ``q_out`` (the one passed or allocated), or None when the call has no query.

    Each rotated value is ``(x c - y s, x s + y c)`` in fp32 (no FMA), rounded once to the sources'
    dtype, then written exactly as the plain write / quantizing write / concatenation would write it:
    bit-identical to :func:`mlakv.ops.rope_write_reference.set_mla_kv_buffer_rope_torch` on every
    path. The query is built for every token (padding and other ranks' tokens included). The inputs
    are not modified. ``n == 0`` launches nothing. Raises ``TypeError``/``ValueError`` naming the
    argument for an invalid call.
    """
    if type(is_neox_style) is not bool:
        raise TypeError(f"is_neox_style must be a bool, got {type(is_neox_style).__name__}")
    if kv_cache_format not in KV_CACHE_FORMATS:
        raise ValueError(f"kv_cache_format must be one of {KV_CACHE_FORMATS}, got {kv_cache_format!r}")
    if ds_mla_scale_rule != "fp32_floor":
        rules.check_ds_mla_scale_rule(ds_mla_scale_rule)
    if (reserved_skip_index is not None and type(reserved_skip_index) is not int) or not (
        type(dcp_world_size) is int and type(dcp_rank) is int and 0 <= dcp_rank < dcp_world_size
    ):
        rules.check_row_selection(reserved_skip_index, dcp_world_size, dcp_rank)
    rules.check_rows_tensor("k_nope", k_nope, "n")
    rules.check_rows_tensor("k_pe", k_pe, "n")
    row_bytes = rope_write_row_bytes(kv_cache_format, k_nope.dtype, k_nope.shape[-1], k_pe.shape[-1])
    quantized = kv_cache_format is not None
    if q_out is None and (q_nope is not None or q_pe is not None):
        for name, t in (("q_nope", q_nope), ("q_pe", q_pe)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                raise ValueError(f"q_nope and q_pe come together, each a 3-D [n, H, d] tensor; {name} is {t!r:.60}")
        q_dtype = torch.float8_e4m3fn if q_scale is not None else q_nope.dtype
        q_out = torch.empty(
            (q_nope.shape[0], q_nope.shape[1], q_nope.shape[-1] + q_pe.shape[-1]), dtype=q_dtype, device=q_nope.device
        )
    if not rules.rope_write_ok(kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, q_nope, q_pe, q_out, quantized, row_bytes):
        rules.explain_rope_write(kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, q_nope, q_pe, q_out, quantized, row_bytes)
    device = kv_buffer.device
    ks = _scale("k_scale", k_scale, kv_cache_format == "per_tensor", f"kv_cache_format={kv_cache_format!r}", device)
    q_fp8 = q_out is not None and q_out.dtype in _BYTE_DTYPES
    qs = _scale("q_scale", q_scale, q_fp8, "q_out is float8_e4m3fn" if q_fp8 else "q_out is not FP8", device)
    n = loc.shape[0]
    if n == 0:
        return q_out
    skip = -1 if reserved_skip_index is None or reserved_skip_index < 0 else reserved_skip_index
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if bounds or not kv_buffer.is_cuda:
        rules.check_loc_bounds(
            loc, kv_buffer.shape[0], reserved_skip_index=None if skip < 0 else skip,
            dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )  # fmt: skip
        rules.check_positions_bounds(positions, cos_sin_cache.shape[0])
    call = RopeWriteCall(
        kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, is_neox_style, kv_cache_format, ks,
        q_nope, q_pe, q_out, qs, skip, dcp_world_size, dcp_rank, ds_mla_scale_rule,
    )  # fmt: skip
    if kv_buffer.is_cuda:
        dispatch.run_rope_write(call)
    else:  # the dispatcher's CPU path: the reference
        set_mla_kv_buffer_rope_torch(call)
    return q_out
