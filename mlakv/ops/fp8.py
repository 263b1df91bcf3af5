"""FP8 KV cache: the stored row formats, their plain-torch reference, and the quantizing write / dequantizing gather.

Serving engines keep MLA's latent cache in FP8 and quantize *inside* the KV write (one launch, no
temporary). This module is the spec of the two formats and the one place that routes the fused
write and gather to a path (torch on CPU, the JIT CUDA kernel on SM90+, Triton elsewhere), with the
same rules as the plain byte write: padding rows (``loc < 0``) are skipped, slots ``>= num_slots``
are never written, ``n_loc == 0`` launches nothing, source rows and ``loc`` may be strided (or
expanded, stride 0), offsets are 64-bit, and bad arguments raise an error naming the argument.

Formats (``kv_cache_format``):

``"per_tensor"``
    Row = ``[nope | rope]`` as e4m3 bytes (``nope_dim + rope_dim`` bytes). Each value is
    ``e4m3(x / k_scale)``: IEEE fp32 division, round to nearest even, saturating to +-448.
    ``k_scale`` is a positive finite Python float (rounded to fp32) or a 1-element fp32 tensor on
    the cache's device (read by the kernel, so it may change between CUDA-graph replays; its value
    is not checked).

``"ds_mla"`` (DeepSeek-V3.2's 656-byte row for 512 + 64)
    Bytes ``[0, nope)``: the nope values in e4m3, in tiles of 128. Bytes ``[nope, nope + 4 * T)``
    (``T = nope / 128``): the tile scales as little-endian fp32. Bytes ``[nope + 4 T, nope + 4 T + 2
    rope)``: the rope values as bf16 (raw bits for bf16 sources; fp16 sources are rounded to bf16,
    RNE). Needs ``nope % 128 == 0``; row bytes ``= nope + 4 * nope / 128 + 2 * rope``. How a tile's
    scale is chosen is the write's ``ds_mla_scale_rule`` (below); every rule writes this row and
    every reader decodes it the same way, ``e4m3 * scale``.

``ds_mla_scale_rule`` (:data:`mlakv.spec.rules.DS_MLA_SCALE_RULES`; the arithmetic:
:func:`ds_mla_tile_scales`, :func:`ds_mla_quotients`; docs/formats.md says which reader expects which):

``"fp32_floor"`` (the default; vLLM's rule before 0.33)
    ``scale_t = max(amax_t / 448, FLT_MIN)`` with ``amax_t`` over the tile's **finite** ``|x|``;
    each value ``e4m3(x / scale_t)`` (IEEE division, RNE, saturating). One NaN or inf does not wipe
    out the precision of the other 127 values (with inf in the amax, every finite value would
    quantize to 0 and inf itself to NaN): an inf stores as ``+-448`` and dequantizes to
    ``+-448 * scale_t``, and a tile with no finite non-zero value gets ``FLT_MIN`` (an all-zero
    tile dequantizes to exact zeros).
``"fp32"`` (sglang's DSA quantizer, ``quant_k_cache``)
    ``scale_t = amax_t / 448`` with no floor, ``amax_t`` over ``|x|`` with NaN ignored and inf kept
    (an ``fmax`` reduction); each value ``e4m3(x * (1 / scale_t))``: the IEEE reciprocal, then the
    product (not the quotient: the two round differently). A zero stays a zero of its sign where the
    reciprocal is infinite, so an all-zero tile stores scale 0 and zeros and reads back as zeros
    (sglang's kernel leaves ``0 * inf`` to Triton's NaN handling there). A tile whose ``amax`` is
    below about ``448 * 2^-128`` has an infinite reciprocal: its non-zero values store as ``+-448`` (they
    read back as ``+-448 * scale_t``, about ``+-amax_t``). An inf makes the scale inf: the tile's
    finite values store as ``+-0``, the inf as NaN.
``"ue8m0"`` (vLLM 0.33's ``fp8_ds_mla``, FlashMLA's reference quantizer; docs/vllm.md)
    ``scale_t = 2^ceil(log2(max(amax_t / 448, 1e-4)))`` (``1e-4`` as fp32; the power of two taken
    by exponent arithmetic), ``amax_t`` as ``"fp32"`` (an inf gives an inf scale, as there); each
    value ``e4m3(x / scale_t)``, an exact division, so only the e4m3 rounding remains.

``per_tensor`` also takes float32 sources (``x / k_scale`` in fp32 directly), written the same
unfused way on the GPU.

Non-finite sources (both formats): NaN is stored as the canonical e4m3 NaN ``0x7F`` (its sign is
dropped), ``+-inf`` saturates to ``+-448`` (where the scale is finite).

Dequantization (``dst_dtype`` bf16, fp16 or fp32): ``e4m3 -> fp32``, times the fp32 scale, rounded
to ``dst_dtype`` (RNE); a NaN comes out as that dtype's canonical quiet NaN (bf16 ``0x7FC0``, fp16
``0x7E00``, fp32 ``0x7FC00000``). ``ds_mla`` rope is the stored bf16 (raw bits for a bf16
destination, converted otherwise). The error bound: ``|deq - x| <= scale * ulp_e4m3(x / scale) / 2``
for ``|x / scale| <= 448``, plus the final rounding to ``dst_dtype``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from mlakv import _env
from mlakv.spec import rules

__all__ = [
    "KV_CACHE_FORMATS",
    "SOURCE_DTYPES",
    "PER_TENSOR_SOURCE_DTYPES",
    "DS_MLA_SCALE_RULES",
    "DEQUANT_DTYPES",
    "E4M3_MAX",
    "DS_MLA_TILE",
    "fp8_row_bytes",
    "check_fp8_format",
    "quantize_mla_rows",
    "dequantize_mla_rows",
    "set_mla_kv_buffer_quant",
    "get_mla_kv_buffer_dequant",
    "fp8_write_path",
    "pow2_ceil",
    "ds_mla_tile_scales",
    "ds_mla_quotients",
    "scale_tensor",
    "check_pool_fp8",
]

KV_CACHE_FORMATS = ("per_tensor", "ds_mla")
SOURCE_DTYPES = (torch.bfloat16, torch.float16)
PER_TENSOR_SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DS_MLA_SCALE_RULES = rules.DS_MLA_SCALE_RULES  # ("fp32_floor", "fp32", "ue8m0"): see the module docstring
DEQUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
E4M3_MAX = 448.0
DS_MLA_TILE = 128
FLT_MIN = 2.0**-126  # 1.17549435e-38, the smallest normal fp32 (torch.finfo(torch.float32).tiny)
_KV_DTYPES = (torch.uint8, torch.float8_e4m3fn)
_E4M3_NAN = 0x7F
_CANON_NAN_BITS = {torch.bfloat16: 0x7FC0, torch.float16: 0x7E00, torch.float32: 0x7FC00000}
_INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# ---- the rule book of the formats -------------------------------------------------------------
def check_fp8_format(kv_cache_format: object, nope_dim: int, rope_dim: int) -> None:
    """Raise ``ValueError`` unless ``kv_cache_format`` is a known format that can hold these widths."""
    if kv_cache_format not in KV_CACHE_FORMATS:
        raise ValueError(f"kv_cache_format must be one of {KV_CACHE_FORMATS}, got {kv_cache_format!r}")
    if nope_dim <= 0 or rope_dim < 0:
        raise ValueError(f"kv_lora_rank (nope_dim) must be positive and rope_dim >= 0, got {nope_dim}, {rope_dim}")
    if kv_cache_format == "ds_mla" and nope_dim % DS_MLA_TILE:
        raise ValueError(f"kv_cache_format='ds_mla' needs kv_lora_rank % {DS_MLA_TILE} == 0, got {nope_dim}")


def fp8_row_bytes(kv_cache_format: str, nope_dim: int, rope_dim: int) -> int:
    """Bytes of one stored row: ``nope + rope`` (per_tensor), ``nope + 4 * nope/128 + 2 * rope`` (ds_mla)."""
    check_fp8_format(kv_cache_format, nope_dim, rope_dim)
    if kv_cache_format == "per_tensor":
        return nope_dim + rope_dim
    return nope_dim + 4 * (nope_dim // DS_MLA_TILE) + 2 * rope_dim


_SCALES: dict[tuple, torch.Tensor] = {}


def scale_tensor(k_scale: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """``k_scale`` as the 1-element fp32 tensor on ``device`` the kernels read (floats are cached).

    Raises ``TypeError``/``ValueError`` naming ``k_scale`` for a wrong type, dtype, shape, device, or
    a float that is not positive and finite.
    """
    if isinstance(k_scale, torch.Tensor):
        if k_scale.dtype != torch.float32 or k_scale.numel() != 1:
            raise TypeError(f"k_scale tensor must be 1-element float32, got {k_scale.dtype} shape {tuple(k_scale.shape)}")
        if k_scale.device.type != device.type or (
            k_scale.device.index != device.index and None not in (k_scale.device.index, device.index)
        ):
            raise ValueError(f"k_scale is on {k_scale.device} but kv_buffer is on {device}")
        return k_scale.reshape(1)
    if isinstance(k_scale, bool) or not isinstance(k_scale, (float, int)):
        raise TypeError(f"k_scale must be a float or a 1-element float32 tensor, got {type(k_scale).__name__}")
    v = float(torch.tensor(float(k_scale), dtype=torch.float32))
    if not (v > 0.0 and v != float("inf")):
        raise ValueError(f"k_scale must be positive and finite (as fp32), got {k_scale!r}")
    t = _SCALES.get((v, device))
    if t is None:
        t = _SCALES[(v, device)] = torch.tensor([v], dtype=torch.float32, device=device)
    if isinstance(k_scale, float):
        _SCALES[(k_scale, device)] = t  # the float as given -> its fp32 tensor (the write's fast path)
    return t


def check_pool_fp8(
    kv_cache_format: Optional[str],
    k_scale: Union[float, torch.Tensor, None],
    dtype: torch.dtype,
    kv_lora_rank: int,
    rope_dim: int,
    dcp_world_size: int,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """The pool's fp8 settings check: returns the ``k_scale`` tensor the kernels read (per_tensor) or None.

    ``kv_cache_format=None`` needs ``k_scale=None``; a format needs ``dtype=torch.float8_e4m3fn``,
    widths the format can hold, no decode context parallelism, and ``k_scale`` as the format
    wants (see :func:`scale_tensor`). A tensor ``k_scale`` is kept by reference: writing a new
    value into it changes the scale of later writes and gathers (CUDA graphs included).
    """
    if kv_cache_format is None:
        if k_scale is not None:
            raise ValueError("k_scale is only used with kv_cache_format='per_tensor'")
        return None
    check_fp8_format(kv_cache_format, kv_lora_rank, rope_dim)
    if dtype != torch.float8_e4m3fn:
        raise TypeError(f"kv_cache_format={kv_cache_format!r} needs dtype=torch.float8_e4m3fn, got {dtype}")
    if dcp_world_size != 1:
        raise ValueError(f"kv_cache_format={kv_cache_format!r} does not support dcp_world_size={dcp_world_size} (needs 1)")
    return _check_k_scale(kv_cache_format, k_scale, device)


def _rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def _bytes_as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, k]`` uint8 (any row stride) -> ``[n, k / itemsize]`` of ``dtype``, from compact rows.
    An empty slice (``k == 0``, e.g. no rope, or ``n == 0``) is returned as a new empty tensor:
    ``contiguous()`` keeps its strides (an empty tensor counts as contiguous), and an odd row
    stride cannot be viewed as a wider dtype."""
    if b.numel() == 0:
        return torch.empty((b.shape[0], b.shape[1] // dtype.itemsize), dtype=dtype, device=b.device)
    return b.contiguous().view(dtype)


def _source_dtypes(kv_cache_format: object) -> tuple[torch.dtype, ...]:
    return PER_TENSOR_SOURCE_DTYPES if kv_cache_format == "per_tensor" else SOURCE_DTYPES


def _check_sources(
    k_nope: object, k_rope: object, kv_cache_format: object, ds_mla_scale_rule: str = "fp32_floor"
) -> tuple[int, int, int]:
    rules.check_rows_tensor("k_nope", k_nope, "n_loc")
    rules.check_rows_tensor("k_rope", k_rope, "n_loc")
    rules.check_ds_mla_scale_rule(ds_mla_scale_rule)
    allowed = _source_dtypes(kv_cache_format)
    for name, t in (("k_nope", k_nope), ("k_rope", k_rope)):
        if t.dtype not in allowed:
            raise TypeError(f"{name} dtype must be one of {allowed} to quantize as {kv_cache_format!r}, got {t.dtype}")
    if k_rope.dtype != k_nope.dtype:
        raise TypeError(f"k_rope dtype {k_rope.dtype} must match k_nope dtype {k_nope.dtype}")
    if k_rope.device != k_nope.device:
        raise ValueError(f"k_rope is on {k_rope.device} but k_nope is on {k_nope.device}")
    if k_rope.shape[0] != k_nope.shape[0]:
        raise ValueError(f"k_rope: dim 0 is {k_rope.shape[0]} but k_nope has {k_nope.shape[0]} rows")
    nope_dim, rope_dim = k_nope.shape[-1], k_rope.shape[-1]
    check_fp8_format(kv_cache_format, nope_dim, rope_dim)
    return k_nope.shape[0], nope_dim, rope_dim


def _check_k_scale(kv_cache_format: str, k_scale: object, device: torch.device) -> Optional[torch.Tensor]:
    if kv_cache_format == "per_tensor":
        if k_scale is None:
            raise ValueError("k_scale is required for kv_cache_format='per_tensor'")
        return scale_tensor(k_scale, device)  # type: ignore[arg-type]
    if k_scale is not None:
        raise ValueError("k_scale must be None for kv_cache_format='ds_mla' (its scales are per tile, in the row)")
    return None


# ---- the reference (plain torch; the spec every kernel is tested against) ----------------------
def _e4m3_bytes(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 bytes: RNE, saturating to +-448, NaN -> 0x7F. ``[...]`` float32 -> ``[...]`` uint8."""
    q = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.where(torch.isnan(y), torch.full_like(q, _E4M3_NAN), q)


def _to_dst(y: torch.Tensor, dst_dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> ``dst_dtype`` (RNE) with NaN as the dtype's canonical quiet NaN."""
    out = y.to(dst_dtype)
    bits = out.view(_INT_OF[dst_dtype])
    nan = torch.full_like(bits, _CANON_NAN_BITS[dst_dtype])
    return torch.where(torch.isnan(y), nan, bits).view(dst_dtype)


def _bf16_bits_of(x: torch.Tensor) -> torch.Tensor:
    """Source values as bf16 bits: raw for bf16, RNE (canonical NaN) for fp16. Returns int16."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16)
    return _to_dst(x.float(), torch.bfloat16).view(torch.int16)


def quantize_mla_rows(
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache_format: str,
    k_scale: Union[float, torch.Tensor, None] = None,
    *,
    ds_mla_scale_rule: str = "fp32_floor",
) -> torch.Tensor:
    """The stored rows for ``[k_nope | k_rope]`` (the reference quantizer, plain torch).

    Args:
        k_nope: ``[n, nope_dim]`` or ``[n, 1, nope_dim]``, bf16 or fp16 (per_tensor: or fp32).
        k_rope: ``[n, rope_dim]`` or ``[n, 1, rope_dim]``, same dtype and device.
        kv_cache_format: ``"per_tensor"`` or ``"ds_mla"`` (see the module docstring).
        k_scale: per_tensor only: float or 1-element fp32 tensor on the sources' device.
        ds_mla_scale_rule: ds_mla's tile-scale rule, ``"fp32_floor"`` (default), ``"fp32"`` or
            ``"ue8m0"`` (see the module docstring; per_tensor ignores it).
    Returns:
        per_tensor: ``[n, nope_dim + rope_dim]`` float8_e4m3fn; ds_mla: ``[n, fp8_row_bytes]`` uint8.
    """
    n, nope_dim, rope_dim = _check_sources(k_nope, k_rope, kv_cache_format, ds_mla_scale_rule)
    scale = _check_k_scale(kv_cache_format, k_scale, k_nope.device)
    nope = _rows2d(k_nope).float()
    rope = _rows2d(k_rope)
    if kv_cache_format == "per_tensor":
        y = torch.cat([nope, rope.float()], dim=1) / scale
        return _e4m3_bytes(y).view(torch.float8_e4m3fn)
    tiles = nope_dim // DS_MLA_TILE
    x = nope.reshape(n, tiles, DS_MLA_TILE)
    scales = ds_mla_tile_scales(x, ds_mla_scale_rule)
    q = _e4m3_bytes(ds_mla_quotients(x, scales, ds_mla_scale_rule)).reshape(n, nope_dim)
    scale_bytes = scales.reshape(n, tiles).contiguous().view(torch.uint8)
    rope_bytes = _bf16_bits_of(rope).contiguous().view(torch.uint8).reshape(n, 2 * rope_dim)
    return torch.cat([q, scale_bytes, rope_bytes], dim=1)


def ds_mla_tile_scales(x: torch.Tensor, rule: str = "fp32_floor") -> torch.Tensor:
    """The fp32 scale of every ds_mla tile under ``rule`` (the reference; the module docstring states
    the rules). ``x``: ``[n, tiles, 128]`` float32 (a row's nope values as tiles) -> ``[n, tiles, 1]``.

    ``amax`` is taken over the finite ``|x|`` (``"fp32_floor"``) or over ``|x|`` with NaN ignored
    (``"fp32"``, ``"ue8m0"``: an ``fmax`` reduction keeps inf); ``amax / 448`` is the IEEE quotient
    (divided by a tensor: torch's CUDA ``t / scalar`` multiplies by the reciprocal, off by one ulp
    at times); then the floor ``FLT_MIN``, no floor, or the floor ``1e-4f`` and the power of two at
    or above (:func:`pow2_ceil`).
    """
    rules.check_ds_mla_scale_rule(rule, "rule")
    a = x.abs()
    keep = torch.isfinite(a) if rule == "fp32_floor" else ~torch.isnan(a)
    a = torch.where(keep, a, torch.zeros_like(a))
    amax = a.amax(dim=2, keepdim=True) if x.shape[0] else torch.zeros(0, x.shape[1], 1, device=x.device)
    s = amax / torch.full_like(amax, E4M3_MAX)
    if rule == "fp32_floor":
        return torch.clamp_min(s, FLT_MIN)
    if rule == "fp32":
        return s
    return pow2_ceil(torch.maximum(s, torch.full_like(s, rules.DS_MLA_UE8M0_FLOOR)))


def ds_mla_quotients(x: torch.Tensor, scales: torch.Tensor, rule: str = "fp32_floor") -> torch.Tensor:
    """``x / scale`` as ``rule`` computes it, before the e4m3 rounding: ``x [n, tiles, 128]`` and
    ``scales [n, tiles, 1]`` float32 -> ``[n, tiles, 128]`` float32.

    ``"fp32_floor"`` and ``"ue8m0"``: the IEEE quotient (exact for ue8m0's powers of two).
    ``"fp32"``: ``x * (1 / scale)``, the IEEE reciprocal then the product, with a zero kept as
    itself (``0 * inf`` where the scale is 0 or tiny).
    """
    rules.check_ds_mla_scale_rule(rule, "rule")
    if rule != "fp32":
        return x / scales
    inv = torch.ones_like(scales) / scales
    return torch.where(x == 0, x, x * inv)


def pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2(s))`` of positive normal fp32 values (and +inf), exactly, by bit arithmetic.

    A power of two is kept; anything else goes up to the next power of two (the exponent field
    plus one, mantissa cleared); past 2^127 that is +inf, as ``exp2f(128)``.
    """
    bits = s.view(torch.int32)
    up = (bits & 0x7F800000) + torch.where((bits & 0x7FFFFF) != 0, 0x00800000, 0).to(torch.int32)
    return up.view(torch.float32)


def dequantize_mla_rows(
    rows: torch.Tensor,
    kv_cache_format: str,
    kv_lora_rank: int,
    rope_dim: int,
    k_scale: Union[float, torch.Tensor, None] = None,
    dst_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode stored rows back to ``(k_nope [n, kv_lora_rank], k_rope [n, rope_dim])`` in ``dst_dtype``.

    Args:
        rows: ``[n, row_bytes]`` or ``[n, 1, row_bytes]`` (at least :func:`fp8_row_bytes` bytes),
            uint8 or float8_e4m3fn.
        kv_cache_format, kv_lora_rank, rope_dim: the format and widths the rows were written with.
        k_scale: per_tensor only, as for :func:`quantize_mla_rows`.
        dst_dtype: bf16 (default), fp16 or fp32.
    """
    rb = fp8_row_bytes(kv_cache_format, kv_lora_rank, rope_dim)
    _check_rows_buffer("rows", rows, rb, "n")
    _check_dst(dst_dtype)
    scale = _check_k_scale(kv_cache_format, k_scale, rows.device)
    b = _rows2d(rows).view(torch.uint8)[:, :rb]
    n = b.shape[0]
    if kv_cache_format == "per_tensor":
        y = _bytes_as(b, torch.float8_e4m3fn).float() * scale
        out = _to_dst(y, dst_dtype)
        return out[:, :kv_lora_rank].contiguous(), out[:, kv_lora_rank:].contiguous()
    tiles = kv_lora_rank // DS_MLA_TILE
    q = _bytes_as(b[:, :kv_lora_rank], torch.float8_e4m3fn).float().reshape(n, tiles, DS_MLA_TILE)
    scales = _bytes_as(b[:, kv_lora_rank : kv_lora_rank + 4 * tiles], torch.float32).reshape(n, tiles, 1)
    nope = _to_dst((q * scales).reshape(n, kv_lora_rank), dst_dtype)
    rope_bf16 = _bytes_as(b[:, kv_lora_rank + 4 * tiles : rb], torch.bfloat16)
    rope = rope_bf16.clone() if dst_dtype == torch.bfloat16 else _to_dst(rope_bf16.float(), dst_dtype)
    return nope, rope


def _check_out(out: object, n_loc: int, nope_dim: int, rope_dim: int, dst_dtype: torch.dtype, device: torch.device) -> None:
    """Raise naming ``out`` unless it is two ``[n_loc, nope_dim]`` / ``[n_loc, rope_dim]`` tensors of
    ``dst_dtype`` on ``device`` with contiguous last dims."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError(f"out must be a pair (k_nope_out, k_rope_out), got {type(out).__name__}")
    for name, t, width in (("out[0]", out[0], nope_dim), ("out[1]", out[1], rope_dim)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or tuple(t.shape) != (n_loc, width):
            raise ValueError(f"{name} must be [n_loc={n_loc}, {width}], got shape {tuple(t.shape)}")
        if t.dtype != dst_dtype:
            raise TypeError(f"{name} dtype {t.dtype} must be dst_dtype {dst_dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but kv_buffer is on {device}")
        if width > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: the last dim must be contiguous, got strides {tuple(t.stride())}")
        if n_loc > 1 and width and t.stride(0) < width:
            raise ValueError(f"{name}: rows overlap (dim 0 stride {t.stride(0)} < {width})")


def _check_dst(dst_dtype: object) -> None:
    if dst_dtype not in DEQUANT_DTYPES:
        raise TypeError(f"dst_dtype must be one of {DEQUANT_DTYPES}, got {dst_dtype}")


def _check_rows_buffer(name: str, t: object, row_bytes: int, n_what: str) -> None:
    rules.check_rows_tensor(name, t, n_what)
    if t.dtype not in _KV_DTYPES:
        raise TypeError(f"{name} must be uint8 or float8_e4m3fn (the stored bytes), got {t.dtype}")
    if t.shape[-1] < row_bytes:
        raise ValueError(f"{name}: last dim holds {t.shape[-1]} bytes but the format's row needs {row_bytes}")


def _check_loc(loc: object, n_loc: Optional[int], device: torch.device) -> None:
    rules.check_loc(loc)
    if loc.device != device:
        raise ValueError(f"loc is on {loc.device} but kv_buffer is on {device}")
    if n_loc is not None and loc.shape[0] != n_loc:
        raise ValueError(f"k_nope/k_rope: dim 0 is {n_loc} but loc has n_loc={loc.shape[0]} entries")


def validate_quant_write(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache_format: str,
    k_scale: Union[float, torch.Tensor, None],
    ds_mla_scale_rule: str = "fp32_floor",
) -> tuple[int, Optional[torch.Tensor]]:
    """Check a quantizing write's arguments; return ``(n_loc, k_scale tensor or None)``.

    Raises ``TypeError``/``ValueError`` naming the argument, the dim and what was expected. The
    common (valid) case is one boolean expression (this runs on every layer's write); only a
    failure walks the rules one by one to name the broken one (a float32 per_tensor source always
    takes the rule-by-rule path).
    """
    if ds_mla_scale_rule not in _RULE_SET:
        return _validate_slow(kv_buffer, loc, k_nope, k_rope, kv_cache_format, k_scale, ds_mla_scale_rule)
    try:
        fast = _fast_valid(kv_buffer, loc, k_nope, k_rope, kv_cache_format, k_scale)
    except (AttributeError, IndexError, TypeError, RuntimeError):
        fast = None
    if fast is not None:
        return fast
    return _validate_slow(kv_buffer, loc, k_nope, k_rope, kv_cache_format, k_scale)


_ROW_BYTES: dict[tuple, Optional[int]] = {}
_RULE_SET = frozenset(DS_MLA_SCALE_RULES)
_SRC_SET = frozenset(SOURCE_DTYPES)
_KV_SET = frozenset(_KV_DTYPES)
_LOC_SET = frozenset(rules.LOC_DTYPES)


def _fast_valid(kv_buffer, loc, k_nope, k_rope, kv_cache_format, k_scale) -> Optional[tuple[int, Optional[torch.Tensor]]]:
    """``(n_loc, scale)`` when every rule holds (the common case), else None (the slow path names the error)."""
    key = (kv_cache_format, k_nope.shape[-1], k_rope.shape[-1])
    rb = _ROW_BYTES.get(key, -1)
    if rb == -1:
        try:
            rb = _ROW_BYTES[key] = fp8_row_bytes(*key)
        except (ValueError, TypeError):
            rb = _ROW_BYTES[key] = None
    if rb is None:
        return None
    device = kv_buffer.device
    n_loc = loc.shape[0]
    kv_rows = kv_buffer.shape[0]
    ok = (
        k_nope.dtype in _SRC_SET
        and k_rope.dtype is k_nope.dtype
        and kv_buffer.dtype in _KV_SET
        and loc.dtype in _LOC_SET
        and loc.ndim == 1
        and k_nope.shape[0] == n_loc
        and k_rope.shape[0] == n_loc
        and kv_buffer.shape[-1] >= rb
        and (kv_rows <= 1 or kv_buffer.stride(0) >= kv_buffer.shape[-1])
        and rules.rows_ok(kv_buffer)
        and rules.rows_ok(k_nope)
        and rules.rows_ok(k_rope)
        and loc.device == device
        and k_nope.device == device
        and k_rope.device == device
    )
    if not ok:
        return None
    if kv_cache_format == "ds_mla":
        return (n_loc, None) if k_scale is None else None
    if (
        type(k_scale) is torch.Tensor
        and k_scale.dtype is torch.float32
        and k_scale.ndim == 1
        and k_scale.shape[0] == 1
        and k_scale.device == device
    ):
        return n_loc, k_scale
    if type(k_scale) is float:
        t = _SCALES.get((k_scale, device))  # the fp32-rounded value of a float seen before
        if t is not None:
            return n_loc, t
    return None


def _validate_slow(
    kv_buffer, loc, k_nope, k_rope, kv_cache_format, k_scale, ds_mla_scale_rule: str = "fp32_floor"
) -> tuple[int, Optional[torch.Tensor]]:
    n_loc, nope_dim, rope_dim = _check_sources(k_nope, k_rope, kv_cache_format, ds_mla_scale_rule)
    rb = fp8_row_bytes(kv_cache_format, nope_dim, rope_dim)
    _check_rows_buffer("kv_buffer", kv_buffer, rb, "num_slots")
    kv2 = _rows2d(kv_buffer)
    if kv2.shape[0] > 1 and kv2.stride(0) < kv2.shape[-1]:
        raise ValueError(f"kv_buffer: rows overlap (row stride {kv2.stride(0)} < row width {kv2.shape[-1]})")
    if k_nope.device != kv_buffer.device:
        raise ValueError(f"k_nope is on {k_nope.device} but kv_buffer is on {kv_buffer.device}")
    _check_loc(loc, n_loc, kv_buffer.device)
    return n_loc, _check_k_scale(kv_cache_format, k_scale, kv_buffer.device)


# ---- the fused write and gather: the one place that picks their path ---------------------------
def _jit_enabled() -> bool:
    return not _env.DISABLE_JIT


def _jit_serves(k_nope: torch.Tensor) -> bool:
    """The JIT kernel quantizes bf16/fp16 sources (every scale rule)."""
    return _jit_enabled() and k_nope.dtype is not torch.float32


def fp8_write_path(
    kv_buffer: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, kv_cache_format: str
) -> str:
    """The path the quantizing write takes for these (valid) arguments: ``torch``, ``jit`` or ``triton``
    (the same for every ``ds_mla_scale_rule``)."""
    if not kv_buffer.is_cuda:
        return "torch"
    if _jit_serves(k_nope):
        from mlakv.kernels.cuda import fp8 as mla_fp8

        if mla_fp8.fp8_jit_accepts(kv_buffer, k_nope, k_rope, kv_cache_format):
            return "jit"
    return "triton"


def set_mla_kv_buffer_quant(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache_format: str,
    k_scale: Union[float, torch.Tensor, None] = None,
    *,
    check_bounds: Optional[bool] = None,
    reserved_skip_index: Optional[int] = None,
    ds_mla_scale_rule: str = "fp32_floor",
) -> None:
    """Quantize ``[k_nope | k_rope]`` and write the stored rows at slots ``loc`` (fused, one launch).

    Args:
        kv_buffer: ``[num_slots, row_bytes_or_more]`` or ``[num_slots, 1, ...]``, uint8 or
            float8_e4m3fn, last dim contiguous; bytes past :func:`fp8_row_bytes` are untouched.
        loc: ``[n_loc]`` int32/int64, any stride; ``loc[i] < 0`` is padding (skipped), a slot
            ``>= num_slots`` is skipped (or raises ``IndexError`` with bounds checking).
        k_nope: ``[n_loc, (1,) nope_dim]`` bf16/fp16; k_rope: ``[n_loc, (1,) rope_dim]``, same
            dtype; rows may be strided.
        kv_cache_format: ``"per_tensor"`` or ``"ds_mla"``.
        k_scale: per_tensor: float or 1-element fp32 device tensor; ds_mla: None.
        check_bounds: raise ``IndexError`` for ``loc >= num_slots`` first (syncs); default
            ``MLAKV_CHECK_BOUNDS``.
        reserved_skip_index: a slot whose rows are skipped like padding (the pool's dummy slot).
        ds_mla_scale_rule: ds_mla's tile-scale rule, ``"fp32_floor"`` (default), ``"fp32"`` or
            ``"ue8m0"`` (the module docstring; every path computes each). float32 per_tensor
            sources run the reference quantizer on the device and the plain row write (two
            passes; same bytes).

    The result is bit-identical to ``quantize_mla_rows`` on every path.
    """
    n_loc, scale = validate_quant_write(kv_buffer, loc, k_nope, k_rope, kv_cache_format, k_scale, ds_mla_scale_rule)
    if reserved_skip_index is not None and (
        isinstance(reserved_skip_index, bool) or not isinstance(reserved_skip_index, int)
    ):
        raise TypeError(f"reserved_skip_index must be an int or None, got {type(reserved_skip_index).__name__}")
    skip = -1 if reserved_skip_index is None or reserved_skip_index < 0 else reserved_skip_index
    if n_loc == 0:
        return
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if bounds or not kv_buffer.is_cuda:
        rules.check_loc_bounds(loc, kv_buffer.shape[0], reserved_skip_index=None if skip < 0 else skip)
    if not kv_buffer.is_cuda:
        _write_torch(kv_buffer, loc, k_nope, k_rope, kv_cache_format, scale, skip, ds_mla_scale_rule)
        return
    if k_nope.dtype not in _SRC_SET:
        _write_unfused(kv_buffer, loc, k_nope, k_rope, kv_cache_format, scale, skip, ds_mla_scale_rule)
        return
    if _jit_serves(k_nope):
        from mlakv.kernels.cuda import fp8 as mla_fp8

        if mla_fp8.fp8_jit_write(
            kv_buffer, loc, k_nope, k_rope, kv_cache_format, scale, skip, scale_rule=ds_mla_scale_rule
        ):
            return
    from mlakv.kernels.triton.fp8 import launch_quant_write

    launch_quant_write(kv_buffer, loc, k_nope, k_rope, kv_cache_format, scale, skip, scale_rule=ds_mla_scale_rule)


def _write_unfused(kv_buffer, loc, k_nope, k_rope, kv_cache_format, scale, skip: int, ds_mla_scale_rule: str) -> None:
    """GPU path of what the fused kernels do not take (float32 per_tensor sources): the reference
    quantizer on the device, then the plain row write of the stored bytes (no sync: padding,
    ``skip`` and rows past the buffer are skipped by the row kernel)."""
    from .dispatch import set_mla_kv_buffer_triton

    rows = quantize_mla_rows(k_nope, k_rope, kv_cache_format, scale, ds_mla_scale_rule=ds_mla_scale_rule).view(torch.uint8)
    kv = _rows2d(kv_buffer).view(torch.uint8)[:, : rows.shape[1]]
    set_mla_kv_buffer_triton(
        kv, loc, rows, rows[:, :0], check_bounds=False, reserved_skip_index=None if skip < 0 else skip
    )


def _write_torch(
    kv_buffer, loc, k_nope, k_rope, kv_cache_format, scale, skip: int, ds_mla_scale_rule: str = "fp32_floor"
) -> None:
    rows = quantize_mla_rows(k_nope, k_rope, kv_cache_format, scale, ds_mla_scale_rule=ds_mla_scale_rule).view(torch.uint8)
    keep = (loc >= 0) & (loc != skip)
    idx = loc[keep].to(torch.long)
    _rows2d(kv_buffer).view(torch.uint8)[idx, : rows.shape[1]] = rows[keep]


def get_mla_kv_buffer_dequant(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    kv_cache_format: str,
    kv_lora_rank: int,
    rope_dim: int,
    k_scale: Union[float, torch.Tensor, None] = None,
    dst_dtype: torch.dtype = torch.bfloat16,
    *,
    check_bounds: Optional[bool] = None,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    skip_invalid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather rows ``kv_buffer[loc]`` and dequantize them (fused on the GPU: one launch, JIT CUDA on
    SM90+ where the widths and alignment suit it, else Triton; torch on CPU).

    Args:
        kv_buffer: ``[num_slots, (1,) >= row_bytes]`` uint8/float8_e4m3fn.
        loc: ``[n_loc]`` int32/int64, any stride. The plain gather's rule: a padding slot (``< 0``)
            gives a zero row; a slot ``>= num_slots`` raises ``IndexError`` when bounds are checked
            (always on CPU; on GPU with ``check_bounds``, which syncs) and gives a zero row otherwise.
        kv_cache_format, kv_lora_rank, rope_dim, k_scale: as written.
        dst_dtype: bf16 (default), fp16 or fp32.
        out: ``(k_nope_out [n_loc, kv_lora_rank], k_rope_out [n_loc, rope_dim])`` of ``dst_dtype``
            on the buffer's device (any row stride, last dim contiguous) to write instead of new
            tensors (e.g. column slices of one ``[n_loc, kv_lora_rank + rope_dim]`` output); the
            GPU path is then the Triton kernel.
        skip_invalid: rows whose slot is outside ``[0, num_slots)`` keep their bytes in ``out``
            (instead of becoming zeros); needs ``out``.
    Returns:
        ``(k_nope [n_loc, kv_lora_rank], k_rope [n_loc, rope_dim])``: new contiguous tensors, or ``out``.
    """
    rb = fp8_row_bytes(kv_cache_format, kv_lora_rank, rope_dim)
    _check_rows_buffer("kv_buffer", kv_buffer, rb, "num_slots")
    _check_loc(loc, None, kv_buffer.device)
    _check_dst(dst_dtype)
    scale = _check_k_scale(kv_cache_format, k_scale, kv_buffer.device)
    if out is not None:
        _check_out(out, loc.shape[0], kv_lora_rank, rope_dim, dst_dtype, kv_buffer.device)
    elif skip_invalid:
        raise ValueError("skip_invalid needs out (rows that are not written must be somebody's)")
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if bounds or not kv_buffer.is_cuda:
        rules.check_loc_bounds(loc, kv_buffer.shape[0])
    if not kv_buffer.is_cuda:
        valid = loc >= 0
        rows = _rows2d(kv_buffer).view(torch.uint8)[loc.clamp(min=0).to(torch.long), :rb]
        rows = torch.where(valid[:, None], rows, torch.zeros_like(rows))
        nope, rope = dequantize_mla_rows(rows, kv_cache_format, kv_lora_rank, rope_dim, scale, dst_dtype)
        if out is None:
            return nope, rope
        keep = valid if skip_invalid else torch.ones_like(valid)
        for o, v in zip(out, (nope, rope)):
            o.copy_(torch.where(keep[:, None], v, o))
        return out
    if out is not None:
        from mlakv.kernels.triton.fp8 import launch_dequant_gather

        return launch_dequant_gather(
            kv_buffer, loc, kv_cache_format, kv_lora_rank, rope_dim, scale, dst_dtype, out=out, skip_invalid=skip_invalid
        )
    if _jit_enabled():
        from mlakv.kernels.cuda import fp8 as mla_fp8

        out = mla_fp8.fp8_jit_gather(kv_buffer, loc, kv_cache_format, kv_lora_rank, rope_dim, scale, dst_dtype)
        if out is not None:
            return out
    from mlakv.kernels.triton.fp8 import launch_dequant_gather

    return launch_dequant_gather(kv_buffer, loc, kv_cache_format, kv_lora_rank, rope_dim, scale, dst_dtype)
