"""Plain-torch store and gather of the DeepSeek-V4 family's paged caches (V4, V41, V41_FP4 and the
interleaved V41_NEW / V41_FP4_NEW).

This is the CPU path of :mod:`mlakv.ops.v4` and the reference every kernel of the family is tested
against (bit-exact), so it is written for obviousness, not speed: whole-tensor torch operations,
each rounding spelled out. The formats' byte geometry (data and scale rows, page padding) comes from
:mod:`mlakv.spec.formats`; the numbers below are the values' rules.

A token is ``[512]`` bf16 or fp16 values, ``nope (448) | rope (64)``. Optionally its RoPE tail is
rotated first (:func:`rotate_rope_tail`): pairs ``(x[448 + 2k], x[449 + 2k])`` by ``(cos_k, sin_k)``
in fp32, ``x' = x c - y s``, ``y' = x s + y c``, each product and sum rounded separately (no fused
multiply-add), then rounded back to the input dtype (nearest even; a NaN becomes the dtype's
canonical quiet NaN, bf16 ``0x7FC0`` / fp16 ``0x7E00``). Then it is quantized:

``v4`` (448 e4m3 + 64 bf16 per token, 7 ue8m0 scales)
    Nope tiles of 64 values. Scale ``2^ceil(log2(max(amax, 1e-4) / 448))``, stored as its biased
    exponent byte ``E``; values ``e4m3(x * 2^(127 - E))`` rounded to nearest even (the product is
    exact and ``|x / scale| <= 448``). The rope values are stored as bf16 (bf16 input: its bits;
    fp16: rounded to bf16, nearest even, canonical NaN). The 8th scale byte (padding) is never
    written. For finite input this is, byte for byte, sglang's V4 store kernel.
``v41`` / ``v41_new`` (512 e4m3, 16 ue8m0 scales)
    All 512 values (rope included) in tiles of 32; scale ``2^ceil(log2(max(amax / 448, 1e-4)))``,
    values as for ``v4``.
``v41_fp4`` / ``v41_fp4_new`` (512 e2m1 two per byte, even index in the low nibble, 32 e4m3 scales)
    Tiles of 16; scale ``e4m3(clamp(amax / 6, 2^-9, 448))`` (IEEE fp32 division, nearest even);
    codes ``e2m1(x / scale)`` (IEEE fp32 division, nearest even on the grid
    ``{0, .5, 1, 1.5, 2, 3, 4, 6}``, saturating at 6, the sign kept also for a value that rounds to 0).

Non-finite values (the rules of sglang's oracle ``dsv41_kv_quant_reference``, as it computes on the CPU):

* ue8m0 layouts (``v4``'s nope tiles too): a tile holding a NaN gets the scale byte ``0xFF`` and every
  value the e4m3 NaN ``0x7F``, or ``0xFF`` for a NaN input with its sign bit set; a tile holding
  +-inf and no NaN gets ``0xFF``, its finite values ``+-0`` (``0x00`` / ``0x80``) and its infinities
  ``0xFF``.
* e2m1 layouts: a tile holding a NaN gets the scale byte ``0x7F`` (e4m3 NaN) and the codes 0, or
  ``0x8`` for a NaN input with its sign bit set; an infinity (without NaN) is an ordinary, huge
  value (scale 448, code ``+-6``).

The gather dequantizes to bf16: ``e4m3 * 2^(E - 127)`` (``E = 0``: ``2^-127``; ``E = 255``: NaN),
``e2m1 * e4m3 scale``, each product exact in fp32 and rounded to bf16 (nearest even, NaN as
``0x7FC0``); ``v4``'s rope is returned as stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mlakv.spec import formats as _formats

from .reference import kept_rows

__all__ = [
    "V4_LAYOUTS",
    "V4_DIM",
    "V4_NOPE",
    "V4_ROPE",
    "V4Geometry",
    "v4_geometry",
    "round_to_dtype",
    "rope_cos_sin",
    "rotate_rope_tail",
    "e2m1_codes",
    "quantize_v4_tokens",
    "dequantize_v4_tokens",
    "set_v4_kv_buffer_torch",
    "get_v4_kv_buffer_torch",
]

V4_LAYOUTS = ("v4", "v41", "v41_fp4", "v41_new", "v41_fp4_new")
V4_DIM = 512
V4_NOPE = 448
V4_ROPE = 64
_E4M3_MAX = 448.0
_E2M1_MAX = 6.0
_FP4_MIN_SCALE = 2.0**-9
# The smallest ue8m0 exponent byte: 2^-13 (V41: max(amax / 448, 1e-4)) and 2^-22 (V4: max(amax, 1e-4) / 448).
_MIN_EXPONENT = {"v4": 105, "v41": 114}


@dataclass(frozen=True)
class V4Geometry:
    """Where a token's bytes go in a page of one V4-family layout.

    Attributes:
        layout: the format's name (``v4``, ``v41``, ``v41_fp4``, ``v41_new``, ``v41_fp4_new``).
        encoding: the token encoding (``v4``, ``v41`` or ``v41_fp4``; the ``_new`` layouts store their
            block-split twin's bytes).
        value_bytes: bytes of a token's values (576 / 512 / 256).
        scale_bytes: bytes reserved for a token's scales (8 / 16 / 32).
        scales: scale bytes a store writes (7 / 16 / 32; ``v4``'s 8th byte is padding).
        tile: values per scale (64 / 32 / 16).
        quantized: values quantized per token (448 for ``v4``, whose rope is stored as bf16; else 512).
        interleaved: each token's scales right after its values (the ``_new`` layouts).
    """

    layout: str
    encoding: str
    value_bytes: int
    scale_bytes: int
    scales: int
    tile: int
    quantized: int
    interleaved: bool
    fmt: _formats.CacheFormat

    @property
    def fp4(self) -> bool:
        return self.encoding == "v41_fp4"

    @property
    def token_bytes(self) -> int:
        return self.value_bytes + self.scale_bytes

    def page_bytes(self, page_size: int) -> int:
        """Bytes of a page of ``page_size`` tokens (block-split: padded to the reader's alignment)."""
        return self.fmt.page_bytes(page_size)

    def data_offset(self, row, page_size: int):
        """Byte offset of row ``row``'s values inside its page (ints or int64 tensors)."""
        return row * (self.token_bytes if self.interleaved else self.value_bytes)

    def kernel_geometry(self, page_size: int) -> dict:
        """The kernels' geometry arguments: ``page_size``, and a row ``r``'s values at byte ``r *
        data_stride`` of its page, its scales at ``scale_base + r * scale_stride``."""
        return dict(
            page_size=page_size,
            data_stride=self.data_offset(1, page_size),
            scale_base=self.scale_offset(0, page_size),
            scale_stride=self.scale_offset(1, page_size) - self.scale_offset(0, page_size),
        )

    def scale_offset(self, row, page_size: int):
        """Byte offset of row ``row``'s first scale byte inside its page."""
        if self.interleaved:
            return row * self.token_bytes + self.value_bytes
        return page_size * self.value_bytes + row * self.scale_bytes


def v4_geometry(layout: str) -> V4Geometry:
    """The :class:`V4Geometry` of ``layout``; ``ValueError`` names the known layouts."""
    if layout not in V4_LAYOUTS:
        raise ValueError(f"layout must be one of {V4_LAYOUTS}, got {layout!r}")
    fmt = _formats.paged_format(layout)
    interleaved = not fmt.paged
    value_bytes = fmt.scale_offset if interleaved else fmt.data_bytes
    quantized = fmt.nope_dim + (fmt.rope_dim if fmt.rope == "quantized" else 0)
    encoding = {"v41_new": "v41", "v41_fp4_new": "v41_fp4"}.get(layout, layout)
    return V4Geometry(
        layout=layout, encoding=encoding, value_bytes=value_bytes, scale_bytes=fmt.scale_bytes,
        scales=quantized // fmt.scale_tile, tile=fmt.scale_tile, quantized=quantized,
        interleaved=interleaved, fmt=fmt,
    )  # fmt: skip


# ---- roundings -------------------------------------------------------------------------------


def _bits32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> its bits as non-negative int64 (0 .. 2^32 - 1)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits32(u: torch.Tensor) -> torch.Tensor:
    """int64 bits (0 .. 2^32 - 1) -> fp32."""
    return (((u & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32)


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 bits (int64 0..65535), nearest even, NaN -> 0x7FC0."""
    u = _bits32(x)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return torch.where(torch.isnan(x), 0x7FC0, r)


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16 / fp16, nearest even, a NaN as the dtype's canonical quiet NaN."""
    if dtype == torch.bfloat16:
        return _bf16_bits(x).to(torch.int16).view(torch.bfloat16)
    if dtype == torch.float16:
        h = x.to(torch.float16).view(torch.int16)
        return torch.where(torch.isnan(x), torch.tensor(0x7E00, dtype=torch.int16), h).view(torch.float16)
    raise TypeError(f"round_to_dtype: dtype must be bfloat16 or float16, got {dtype}")


def _widen(kv: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> fp32, exactly (bf16 by its bits, so NaN payloads and subnormals are kept)."""
    if kv.dtype == torch.bfloat16:
        return (kv.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)
    return kv.to(torch.float32)


# ---- RoPE ------------------------------------------------------------------------------------


def rope_cos_sin(
    n: int,
    *,
    freqs_cis: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(cos, sin)``, each ``[n, 32]`` fp32, from one of two sources:

    * ``freqs_cis [n, 64]`` fp32, ``(cos_k, sin_k)`` interleaved per token (sglang's ``freqs_cis``,
      a complex64 ``[n, 32]`` viewed as real); or
    * ``positions [n]`` int32/int64 and ``cos_sin_cache [max_pos, 64]`` fp32 whose row ``p`` is
      ``cos_0..cos_31 | sin_0..sin_31`` (sglang's rotary ``cos_sin_cache``).
    """
    if freqs_cis is not None:
        f = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
        f = f.reshape(n, V4_ROPE).to(torch.float32)
        return f[:, 0::2], f[:, 1::2]
    if positions is None or cos_sin_cache is None:
        raise ValueError("rope_cos_sin needs freqs_cis, or positions with cos_sin_cache")
    rows = cos_sin_cache[positions.to(torch.long)].to(torch.float32)
    return rows[:, : V4_ROPE // 2], rows[:, V4_ROPE // 2 :]


def rotate_rope_tail(kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``kv [n, 512]`` bf16/fp16 with its last 64 values rotated by ``cos, sin [n, 32]`` fp32
    (interleaved pairs, fp32 arithmetic without fused multiply-add, rounded back to ``kv.dtype``;
    see the module docstring). Returns a new tensor."""
    x = _widen(kv[:, V4_NOPE:])
    a, b = x[:, 0::2], x[:, 1::2]
    c, s = cos.to(torch.float32), sin.to(torch.float32)
    ra = a * c - b * s  # torch rounds each product and the difference separately
    rb = a * s + b * c
    rot = torch.stack((ra, rb), dim=-1).reshape(x.shape)
    out = kv.clone()
    out[:, V4_NOPE:] = round_to_dtype(rot, kv.dtype)
    return out


# ---- quantization --------------------------------------------------------------------------


def _ue8m0_tiles(x: torch.Tensor, encoding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [n, T, tile]`` fp32 with one ue8m0 scale per tile: ``(codes [n, T, tile] uint8,
    scale bytes [n, T] uint8)``."""
    absx = x.abs()
    nan_tile = torch.isnan(x).any(dim=-1)
    inf_tile = torch.isinf(x).any(dim=-1) & ~nan_tile
    amax = torch.where(torch.isnan(absx), 0.0, absx).amax(dim=-1)
    finite_amax = torch.where(nan_tile | inf_tile, 1.0, amax)
    # scale = 2^ceil(log2(q)) with q the rounded fp32 quotient, floored; its exponent read from q's bits
    if encoding == "v4":
        q = torch.clamp_min(finite_amax, 1e-4) / _E4M3_MAX
    else:
        q = torch.clamp_min(finite_amax / _E4M3_MAX, 1e-4)
    u = _bits32(q)
    exponent = (u >> 23) + ((u & 0x7FFFFF) != 0).to(torch.int64)
    exponent = torch.clamp_min(exponent, _MIN_EXPONENT[encoding])
    inv_scale = _from_bits32((254 - exponent) << 23)  # 2^(127 - E), exact
    codes = (x * inv_scale[..., None]).to(torch.float8_e4m3fn).view(torch.uint8)  # exact product, |.| <= 448
    sign = torch.signbit(x).to(torch.uint8) << 7
    nan_codes = torch.where(torch.isnan(x), 0x7F | sign, torch.full_like(sign, 0x7F))
    inf_codes = torch.where(torch.isinf(x), torch.full_like(sign, 0xFF), sign)
    codes = torch.where(nan_tile[..., None], nan_codes, codes)
    codes = torch.where(inf_tile[..., None], inf_codes, codes)
    scale = torch.where(nan_tile | inf_tile, 0xFF, exponent).to(torch.uint8)
    return codes, scale


def e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    """fp32 -> e2m1 codes (uint8 0..15): nearest even on {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating at
    6, the sign bit (0x8) from q's sign. NaN: the magnitude code 0."""
    a = torch.nan_to_num(q.abs(), nan=0.0, posinf=_E2M1_MAX)
    v = torch.where(a < 2.0, torch.round(a * 2.0) / 2.0, torch.where(a < 4.0, torch.round(a), torch.round(a / 2.0) * 2.0))
    v = torch.clamp_max(v, _E2M1_MAX)
    mag = torch.where(v < 2.0, v * 2.0, torch.where(v < 4.0, v + 2.0, v / 2.0 + 4.0)).to(torch.uint8)
    return mag | (torch.signbit(q).to(torch.uint8) << 3)


def _fp4_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [n, T, 16]`` fp32 with one e4m3 scale per tile: ``(codes [n, T, 16] uint8 0..15,
    scale bytes [n, T] uint8)``."""
    nan_tile = torch.isnan(x).any(dim=-1)
    amax = torch.where(torch.isnan(x), 0.0, x.abs()).amax(dim=-1)
    raw = torch.clamp(amax / _E2M1_MAX, _FP4_MIN_SCALE, _E4M3_MAX)  # inf -> 448
    scale = raw.to(torch.float8_e4m3fn)
    codes = e2m1_codes(x / scale.to(torch.float32)[..., None])
    nan_codes = (torch.isnan(x) & torch.signbit(x)).to(torch.uint8) << 3
    codes = torch.where(nan_tile[..., None], nan_codes, codes)
    scale_bytes = torch.where(nan_tile, 0x7F, scale.view(torch.uint8).to(torch.int64)).to(torch.uint8)
    return codes, scale_bytes


def quantize_v4_tokens(kv: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode tokens ``kv [n, 512]`` bf16/fp16 (already rotated) in ``layout``'s token encoding.

    Returns ``(values [n, value_bytes] uint8, scales [n, scales] uint8)``: 576 / 512 / 256 value bytes
    and 7 / 16 / 32 scale bytes (``v4``'s padding byte is not part of the result).
    """
    g = v4_geometry(layout)
    n = kv.shape[0]
    x = _widen(kv)
    if g.encoding == "v41_fp4":
        codes, scales = _fp4_tiles(x.reshape(n, g.scales, g.tile))
        codes = codes.reshape(n, V4_DIM)
        return codes[:, 0::2] | (codes[:, 1::2] << 4), scales
    codes, scales = _ue8m0_tiles(x[:, : g.quantized].reshape(n, g.scales, g.tile), g.encoding)
    codes = codes.reshape(n, g.quantized)
    if g.encoding == "v4":
        rope = kv[:, V4_NOPE:]
        rope_bits = rope.contiguous().view(torch.int16) if kv.dtype == torch.bfloat16 else round_to_dtype(_widen(rope), torch.bfloat16).view(torch.int16)
        codes = torch.cat((codes, rope_bits.contiguous().view(torch.uint8).reshape(n, 2 * V4_ROPE)), dim=1)
    return codes, scales


def _e8m0_value(b: torch.Tensor) -> torch.Tensor:
    """ue8m0 byte -> fp32 ``2^(b - 127)`` (``b = 0``: ``2^-127``, a subnormal; ``0xFF``: NaN)."""
    e = b.to(torch.int64)
    v = torch.where(e == 0, 0x00400000, e << 23)
    return torch.where(e == 255, float("nan"), _from_bits32(v))


_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def dequantize_v4_tokens(values: torch.Tensor, scales: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`quantize_v4_tokens`: ``values [n, value_bytes]``, ``scales [n, >= scales]``
    uint8 -> ``[n, 512]`` bf16 (see the module docstring)."""
    g = v4_geometry(layout)
    n = values.shape[0]
    sc = scales[:, : g.scales]
    if g.fp4:
        codes = torch.stack((values & 0xF, values >> 4), dim=-1).reshape(n, V4_DIM).to(torch.int64)
        table = torch.tensor(_E2M1_VALUES, dtype=torch.float32, device=values.device)
        v = table[codes & 7]
        v = torch.where((codes & 8) != 0, -v, v)
        s = sc.contiguous().view(torch.float8_e4m3fn).to(torch.float32)
        out = (v.reshape(n, g.scales, g.tile) * s[..., None]).reshape(n, V4_DIM)
        return _bf16_bits(out).to(torch.int16).view(torch.bfloat16)
    q = values[:, : g.quantized].contiguous().view(torch.float8_e4m3fn).to(torch.float32)
    out = (q.reshape(n, g.scales, g.tile) * _e8m0_value(sc)[..., None]).reshape(n, g.quantized)
    out = _bf16_bits(out).to(torch.int16)
    if g.encoding == "v4":
        rope = values[:, V4_NOPE : V4_NOPE + 2 * V4_ROPE].contiguous().view(torch.int16)
        out = torch.cat((out, rope), dim=1)
    return out.view(torch.bfloat16)


# ---- the paged store and gather ------------------------------------------------------------


def _byte_columns(base: torch.Tensor, width: int) -> torch.Tensor:
    return base[:, None] + torch.arange(width, dtype=torch.int64, device=base.device)[None, :]


def set_v4_kv_buffer_torch(
    kv_pages: torch.Tensor,
    loc: torch.Tensor,
    kv: torch.Tensor,
    layout: str,
    page_size: int,
    *,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> None:
    """Store tokens ``kv [n, 512]`` (bf16/fp16, rows may be strided) into pages ``kv_pages
    [num_pages, page_bytes]`` uint8 (rows may be strided) at slots ``loc [n]``, in ``layout``.

    Row selection as every write (:func:`mlakv.ops.reference.kept_rows`): ``loc < 0``,
    ``loc == reserved_skip_index`` and other DCP ranks' slots are skipped; a kept token lands at
    slot ``loc // dcp_world_size``, page ``slot // page_size``, row ``slot % page_size``; slots past
    ``num_pages * page_size`` are skipped (the ops layer raises for them first). With ``cos, sin
    [n, 32]`` fp32 the RoPE tail is rotated first (:func:`rotate_rope_tail`). Only the token's value
    bytes and its written scale bytes change; page padding and ``v4``'s pad byte keep their contents.
    """
    g = v4_geometry(layout)
    keep, slot = kept_rows(loc.cpu(), kv_pages.shape[0] * page_size, reserved_skip_index, dcp_world_size, dcp_rank)
    if not bool(keep.any()):
        return
    device = kv_pages.device
    idx = keep.nonzero().flatten()
    x = kv.reshape(kv.shape[0], -1)[idx.to(kv.device)]
    if cos is not None:
        x = rotate_rope_tail(x, cos[idx.to(cos.device)], sin[idx.to(sin.device)])
    values, scales = quantize_v4_tokens(x.cpu(), layout)
    slot = slot[idx]
    page, row = slot // page_size, slot % page_size
    page_idx = page[:, None].to(device)
    kv_pages[page_idx, _byte_columns(g.data_offset(row, page_size), g.value_bytes).to(device)] = values.to(device)
    kv_pages[page_idx, _byte_columns(g.scale_offset(row, page_size), g.scales).to(device)] = scales.to(device)


def get_v4_kv_buffer_torch(kv_pages: torch.Tensor, loc: torch.Tensor, layout: str, page_size: int) -> torch.Tensor:
    """Gather and dequantize slots ``loc [n]`` of ``kv_pages [num_pages, page_bytes]`` to ``[n, 512]``
    bf16 (a new tensor on ``kv_pages``' device). A slot outside ``[0, num_pages * page_size)``
    (padding or out of range) gives a zero row; the ops layer refuses out-of-range slots first."""
    g = v4_geometry(layout)
    slot = loc.cpu().to(torch.int64)
    valid = (slot >= 0) & (slot < kv_pages.shape[0] * page_size)
    slot = torch.where(valid, slot, 0)
    page, row = slot // page_size, slot % page_size
    pages = kv_pages.cpu()
    if pages.shape[0] == 0:
        return torch.zeros((slot.shape[0], V4_DIM), dtype=torch.bfloat16, device=kv_pages.device)
    values = pages[page[:, None], _byte_columns(g.data_offset(row, page_size), g.value_bytes)]
    scales = pages[page[:, None], _byte_columns(g.scale_offset(row, page_size), g.scales)]
    out = dequantize_v4_tokens(values, scales, layout)
    out = torch.where(valid[:, None], out, torch.zeros((), dtype=torch.bfloat16))
    return out.to(kv_pages.device)
