"""Triton kernels of the DeepSeek-V4 family's paged caches: the quantizing store (optionally rotating
the RoPE tail first) and the dequantizing gather, each beside its launcher.

They are the GPU path where the JIT CUDA kernel cannot serve (pre-Hopper GPUs, misaligned pages or
tokens) and run on CPU tensors under ``TRITON_INTERPRET=1`` in CI. The formats are specified, and
their plain-torch reference written, in :mod:`mlakv.ops.v4_reference`; these kernels are bit-exact
with it.

How the store works (the CUDA kernel's work split, ``csrc/v4_store.cuh``, in Triton's terms):

* A program stores ``TOKENS`` tokens (the launch table's tokens per program,
  :func:`mlakv.spec.tuning.v4_triton_launch`) as one block of their 16-bit input bits: ``[TOKENS,
  TILES, K]`` for the ue8m0 layouts (v41: 16 tiles of 32 values, v4: 8 of 64), ``[TOKENS, 32, 8]``
  (even, odd) pairs as 4-byte words for fp4 (16-bit loads put together where ``kv`` is not 4-byte
  aligned). Loads and stores are 16-byte vectors; the block's codes go out as one masked store per
  token row and the scale bytes as another. A program's rows past the call re-read the last token
  and store nothing; without DCP the token loads do not wait for ``loc``.
* Tile amax: a max over the tile's axis of the 16-bit magnitudes (as integers NaN > inf > finite, so
  no float max, whose NaN rule differs between the GPU and numpy). The ue8m0 exponent is read off the
  amax's bits (exact); values are multiplied by its exact inverse power of two.
* e4m3 (``NATIVE``: an sm_89+ GPU): the hardware ``cvt.rn.satfinite.e4m3x2.f32`` of the signed
  product (no sign bits ORed into its bytes: that pack is what ptxas 12.8/12.9 miscompiles, see
  :mod:`mlakv.kernels.triton.fp8`; ``tests/test_v4_triton_tokens.py`` looks for it at every launch
  shape); otherwise (the interpreter, older GPUs) integer bit arithmetic giving the same bytes.
* e2m1 (fp4): the code of ``x / scale`` from compares with the exact thresholds ``m_j * scale``
  (no division per value); ``PACKED`` (sm_90): both values of a word per instruction in inline PTX
  (packed bf16x2 / f16x2 compares, the CUDA kernel's three-level search); otherwise integer compares.
* Tiles holding a NaN or an infinity (the oracle's rules) are rare: the program rewrites their bytes
  in a branch taken only when one of its tiles needs it.
* The RoPE tail (values 448..511) is loaded again as 32 (even, odd) pairs, rotated in fp32 with
  separately rounded products (the launch turns off fused multiply-add, ``enable_fp_fusion=False``),
  rounded back to the input dtype, and quantized as its own small block (its tiles' bytes replace
  the unrotated ones: the block's store leaves them out).

Where compiled code and the interpreter could disagree, the kernels use neither side's rule: signs
are set by XOR / OR on the bits (a compiled ``-x`` may be ``0 - x``: ``+0``, not ``-0``, for a
zero), NaN is detected on the bits, 16-bit inputs are widened by their bits (the hardware fp16 ->
fp32 conversion may return a canonical NaN, losing a negative NaN's sign), and no result depends on
how fp32 denormals are treated (the GPU code is built without flush-to-zero;
``tests/test_v4_store.py`` checks the PTX of both paths).

Layout codes (``encoding``): 0 ``v4``, 1 ``v41``, 2 ``v41_fp4``; the interleaved layouts pass their
geometry (``data_stride``, ``scale_base``, ``scale_stride``) with their twin's code.

Launchers take arguments the ops layer (:mod:`mlakv.ops.v4`) has validated and do no checking of
their own. Row selection is the library's: ``loc`` read at its stride; ``loc < 0``, ``loc ==
skip_index`` and other DCP ranks' slots skipped; a kept token lands at slot ``loc // dcp_world``;
a slot past the pages (or, with a position table, a position outside it) is skipped, never written.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from mlakv.spec.calls import V4StoreCall
from mlakv.spec.tuning import v4_triton_launch

from .common import interpreting, pdl_supported
from .pdl import END, ENTRY, pdl_close, pdl_open
from .fp8 import native_fp8_supported

__all__ = ["ENCODINGS", "launch_v4_store", "launch_v4_gather", "packed_half_compare_supported"]

ENCODINGS = {"v4": 0, "v41": 1, "v41_fp4": 2}


@functools.lru_cache(maxsize=None)
def packed_half_compare_supported(device_index: int) -> bool:
    """Whether the fp4 store compares packed bf16x2 / f16x2 pairs in inline PTX here (``set...bf16x2``
    needs sm_90): a CUDA sm_90+ GPU, not interpreted."""
    if interpreting() or torch.version.cuda is None:
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


# ---- roundings (integer bit arithmetic: the same on every GPU and in the interpreter) ----------


@triton.jit
def _f32(v, IS_BF16: tl.constexpr):
    """A loaded 16-bit value (bf16 or fp16, as its int16 bits) as fp32, exactly, by its bits: sign and
    NaN payload kept. (The hardware fp16 -> fp32 conversion may return a canonical NaN, dropping a
    negative NaN's sign, which the NaN codes keep.)"""
    h = v.to(tl.int32) & 0xFFFF
    if IS_BF16:
        r = (h << 16).to(tl.float32, bitcast=True)
    else:
        r = _fp16_value_bits(h).to(tl.float32, bitcast=True)
    return r


@triton.jit
def _fp16_value_bits(h):
    """fp16 bits (int32 0..65535) -> the fp32 bits of the same value (exact; NaN payload and sign kept)."""
    s = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    normal = ((e + 112) << 23) | (m << 13)
    special = 0x7F800000 | (m << 13)
    # a subnormal m * 2^-24 is a normal fp32 value (the product is exact, no denormal involved)
    sub = (m.to(tl.float32) * tl.full([], 5.9604644775390625e-08, tl.float32)).to(tl.int32, bitcast=True)
    r = tl.where(e == 0, sub, tl.where(e == 31, special, normal))
    return r | s


@triton.jit
def _is_nan_bits(u):
    """NaN test on fp32 bits (an integer compare: no float compare's NaN semantics involved)."""
    return (u & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def _bf16_of_bits(u):
    """fp32 bits -> bf16 bits (int32 0..65535): nearest even, NaN -> 0x7FC0."""
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(_is_nan_bits(u), 0x7FC0, r)


@triton.jit
def _bf16_bits(y):
    """fp32 -> bf16 bits (int32 0..65535): nearest even, NaN -> 0x7FC0."""
    return _bf16_of_bits(y.to(tl.int32, bitcast=True))


@triton.jit
def _round_to_input(y, IS_BF16: tl.constexpr):
    """fp32 -> the input dtype and back to fp32 (nearest even, canonical NaN); also its 16 bits."""
    if IS_BF16:
        b = _bf16_bits(y)
        r = (b << 16).to(tl.float32, bitcast=True)
    else:
        # the IEEE conversion (cvt.rn.f16.f32, subnormal results kept); back to fp32 by the bits
        nan = _is_nan_bits(y.to(tl.int32, bitcast=True))
        b = tl.where(nan, 0x7E00, y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
        r = _fp16_value_bits(b).to(tl.float32, bitcast=True)
    return r, b


@triton.jit
def _e4m3_byte(a_bits):
    """|y| as fp32 bits (finite, at most 448) -> the e4m3 magnitude byte (0..0x7E), nearest even."""
    a = a_bits.to(tl.float32, bitcast=True)
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - 960
    # below 2^-6: a multiple of 2^-9; adding 2^23 in fp32 rounds a * 512 to an integer, nearest even
    small = tl.where(a < 0.015625, a, 0.0)
    two23 = tl.full([], 8388608.0, tl.float32)
    sub = ((small * tl.full([], 512.0, tl.float32) + two23) - two23).to(tl.int32)
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def _e4m3_value(b):
    """e4m3 byte (int32 0..255) -> fp32, exactly; 0x7F / 0xFF -> NaN."""
    s = (b & 0x80) << 24
    e = (b >> 3) & 15
    m = b & 7
    normal = s | ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * tl.full([], 0.001953125, tl.float32)).to(tl.int32, bitcast=True) | s
    bits = tl.where(e == 0, sub, normal)
    bits = tl.where((b & 0x7F) == 0x7F, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


# ---- the store ---------------------------------------------------------------------------------


@triton.jit
def _program_max(amax16):
    """The largest of a ``[TOKENS, TILES]`` block (one value for the whole program)."""
    return tl.max(tl.max(amax16, axis=1), axis=0)


@triton.jit
def _ue8m0_special(code, h, amax16, INF16: tl.constexpr):
    """The codes of :func:`_ue8m0_quantize` with the tiles holding a NaN or an infinity rewritten."""
    hb = h.to(tl.int32)
    sign = (hb >> 8) & 0x80
    m = hb & 0x7FFF
    nan_t = (amax16 > INF16)[:, :, None]
    inf_t = (amax16 == INF16)[:, :, None]
    c = tl.where(inf_t, tl.where(m == INF16, 0xFF, sign), code.to(tl.int32))
    return tl.where(nan_t, tl.where(m > INF16, 0x7F | sign, 0x7F), c).to(tl.uint8)


@triton.jit
def _ue8m0_quantize(h, amax16, IS_BF16: tl.constexpr, FLOOR: tl.constexpr, INF16: tl.constexpr,
                    NATIVE: tl.constexpr, BRANCH: tl.constexpr):  # fmt: skip
    """e4m3 bytes of tiles of 16-bit input values ``h [TOKENS, TILES, K]`` (their bits: int16, or
    int32 0..65535) under one ue8m0 scale per tile, and the scale bytes ``[TOKENS, TILES]`` (both
    uint8). ``amax16 [TOKENS, TILES]``: each tile's largest 16-bit magnitude (NaN > inf > finite as
    integers). The scale exponent is read off the amax's fp32 bits (exact: ``2^ceil(log2(amax /
    448))``, at least ``2^(FLOOR - 127)``); values are multiplied by its exact inverse (``|.| <= 448``
    in a finite tile) and rounded to e4m3, nearest even: ``NATIVE``, the hardware conversion of the
    signed product (no sign bits are ORed into its bytes: see the module docstring); otherwise
    integer bit arithmetic on the magnitude, the sign from the input's bits. A tile holding a NaN:
    scale 0xFF, values 0x7F (0xFF for a negative NaN); holding +-inf (no NaN): scale 0xFF,
    infinities 0xFF, finite values +-0. Those tiles are rare: with ``BRANCH`` the program rewrites
    them only when one of its tiles needs it (a program-wide test), otherwise always (small blocks)."""
    a = _f32(amax16, IS_BF16).to(tl.int32, bitcast=True)
    e = tl.maximum((a >> 23) - 8 + ((a & 0x7FFFFF) > 0x600000).to(tl.int32), FLOOR)
    inv = ((254 - e) << 23).to(tl.float32, bitcast=True)[:, :, None]  # 2^(127 - e), exact
    if NATIVE:
        code = (_f32(h, IS_BF16) * inv).to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:  # the magnitude's product, from the magnitude's bits (no float abs)
        q = (_f32(h & 0x7FFF, IS_BF16) * inv).to(tl.int32, bitcast=True)
        code = (_e4m3_byte(q) | ((h.to(tl.int32) >> 8) & 0x80)).to(tl.uint8)
    if BRANCH:
        if _program_max(amax16) >= INF16:
            code = _ue8m0_special(code, h, amax16, INF16)
    else:
        code = _ue8m0_special(code, h, amax16, INF16)
    scale = tl.where(amax16 >= INF16, 0xFF, e).to(tl.uint8)
    return code, scale


@triton.jit
def _bits16(t, IS_BF16: tl.constexpr):
    """A positive fp32 value exact in the 16-bit input type and normal there -> its 16-bit bits (int32)."""
    u = t.to(tl.int32, bitcast=True)
    if IS_BF16:
        r = u >> 16
    else:
        r = (u >> 13) - 0x1C000  # fp32 exponent 127 + k -> fp16 15 + k; the mantissa fits 10 bits
    return r


@triton.jit
def _e2m1_count(m, sign, t0, t1, t2, t3, t4, t5, t6):
    """e2m1 codes of 16-bit magnitudes ``m [TOKENS, TILES, P]`` (no NaN) against the tiles' thresholds
    ``t_j [TOKENS, TILES]`` (16-bit bits of ``m_j * scale``, exact): the nearest even code of ``|x| /
    scale`` (ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), ORed with
    ``sign`` (0 or 8)."""
    code = (
        (m > t0[:, :, None]).to(tl.int32)
        + (m >= t1[:, :, None]).to(tl.int32)
        + (m > t2[:, :, None]).to(tl.int32)
        + (m >= t3[:, :, None]).to(tl.int32)
        + (m > t4[:, :, None]).to(tl.int32)
        + (m >= t5[:, :, None]).to(tl.int32)
        + (m > t6[:, :, None]).to(tl.int32)
    )
    return code | sign


# One word holding an (even, odd) pair of 16-bit values (the even one in the low half) in, its e2m1
# byte out: the search of the CUDA kernel (csrc/v4_store.cuh, fp4_chunk) on both values at once. $1:
# the pair; $2..$8: the thresholds t0..t6, each in both halves. hi = |x| >= t3 (code >= 4; the tie
# 1.75 goes up, to the even 2), mid = |x| >= (hi ? t5 : t1), lo = |x| > (hi ? (mid ? t6 : t4) :
# (mid ? t2 : t0)); code = 4 hi + 2 mid + lo | the sign (bit 15 -> bit 3). The compares are packed
# float compares of magnitudes (no flush of subnormals); a NaN tile's bytes are replaced after.
_E2M1_PAIR_ASM = """{
.reg .b32 a, hi, mid, lo, t, u, c;
and.b32 a, $1, 0x7FFF7FFF;
set.ge.u32.%(ty)s hi, a, $5;
lop3.b32 t, $7, $3, hi, 0xE4;
set.ge.u32.%(ty)s mid, a, t;
lop3.b32 t, $8, $6, mid, 0xE4;
lop3.b32 u, $4, $2, mid, 0xE4;
lop3.b32 t, t, u, hi, 0xE4;
set.gt.u32.%(ty)s lo, a, t;
and.b32 c, hi, 0x00040004;
lop3.b32 c, mid, 0x00020002, c, 0xEA;
lop3.b32 c, lo, 0x00010001, c, 0xEA;
shr.b32 u, $1, 12;
lop3.b32 c, u, 0x00080008, c, 0xEA;
shr.b32 u, c, 12;
and.b32 c, c, 0xF;
lop3.b32 $0, u, 0xF0, c, 0xEA;
}"""
E2M1_PAIR_ASM_BF16: tl.constexpr = tl.constexpr(_E2M1_PAIR_ASM % {"ty": "bf16x2"})
E2M1_PAIR_ASM_F16: tl.constexpr = tl.constexpr(_E2M1_PAIR_ASM % {"ty": "f16x2"})


@triton.jit
def _both_halves(t, like):
    """A tile threshold ``t [TOKENS, TILES]`` (16-bit bits, int32) in both halves of a word, over the
    tile (``like``'s shape ``[TOKENS, TILES, P]``)."""
    return tl.broadcast_to((t * 0x10001)[:, :, None], like.shape)


@triton.jit
def _fp4_special(byte, w, nan_t, INF16: tl.constexpr):
    """The bytes of :func:`_fp4_quantize` with the tiles holding a NaN rewritten (0, or the sign of a NaN)."""
    ne = tl.where((w & 0x7FFF) > INF16, (w >> 12) & 0x8, 0)
    no = tl.where(((w >> 16) & 0x7FFF) > INF16, (w >> 24) & 0x80, 0)
    return tl.where(nan_t[:, :, None], (ne | no).to(tl.uint8), byte)


@triton.jit
def _fp4_quantize(w, IS_BF16: tl.constexpr, INF16: tl.constexpr, PACKED: tl.constexpr, BRANCH: tl.constexpr):
    """e2m1 bytes ``[TOKENS, TILES, 8]`` (uint8: the even value's code in the low nibble) of tiles of
    8 pairs ``w [TOKENS, TILES, 8]`` (int32 words: the even value's 16-bit input bits in the low half,
    the odd one's in the high half), one e4m3 scale per tile: ``e4m3(clamp(amax / 6, 2^-9, 448))``,
    and the scale bytes ``[TOKENS, TILES]``. Codes come from comparing magnitudes with the exact
    thresholds ``m_j * scale`` (no division per value; an infinity is a huge value: code +-6):
    ``PACKED`` (sm_90+), both values of a word per instruction in inline PTX; otherwise as integers.
    A tile holding a NaN: scale 0x7F, codes 0 (0x8 for a negative NaN); ``BRANCH`` as
    :func:`_ue8m0_quantize`'s."""
    m = w & 0x7FFF7FFF
    amax16 = tl.max(tl.maximum(m & 0xFFFF, m >> 16), axis=2)  # NaN > inf > finite as integers
    nan_t = amax16 > INF16
    a = _f32(tl.where(nan_t, 0, amax16), IS_BF16)
    # clamp(amax / 6, 2^-9, 448) on the quotient's bits (non-negative: ordered as integers); no float
    # max/min (whose NaN rule differs between the GPU and the interpreter)
    raw = tl.math.div_rn(a, tl.full(a.shape, 6.0, tl.float32)).to(tl.int32, bitcast=True)
    raw = tl.minimum(tl.maximum(raw, 0x3B000000), 0x43E00000)  # 2^-9, 448
    sb = _e4m3_byte(raw)
    sv = _e4m3_value(sb)
    t0 = _bits16(sv * 0.25, IS_BF16)
    t1 = _bits16(sv * 0.75, IS_BF16)
    t2 = _bits16(sv * 1.25, IS_BF16)
    t3 = _bits16(sv * 1.75, IS_BF16)
    t4 = _bits16(sv * 2.5, IS_BF16)
    t5 = _bits16(sv * 3.5, IS_BF16)
    t6 = _bits16(sv * 5.0, IS_BF16)
    if PACKED:
        byte = tl.inline_asm_elementwise(
            E2M1_PAIR_ASM_BF16 if IS_BF16 else E2M1_PAIR_ASM_F16, "=r,r,r,r,r,r,r,r,r",
            [w, _both_halves(t0, w), _both_halves(t1, w), _both_halves(t2, w), _both_halves(t3, w),
             _both_halves(t4, w), _both_halves(t5, w), _both_halves(t6, w)],
            dtype=tl.int32, is_pure=True, pack=1,
        ).to(tl.uint8)  # fmt: skip
    else:
        he = w & 0xFFFF
        ho = (w >> 16) & 0xFFFF
        ce = _e2m1_count(he & 0x7FFF, (he >> 12) & 0x8, t0, t1, t2, t3, t4, t5, t6)
        co = _e2m1_count(ho & 0x7FFF, (ho >> 12) & 0x8, t0, t1, t2, t3, t4, t5, t6)
        byte = (ce | (co << 4)).to(tl.uint8)
    if BRANCH:
        if _program_max(amax16) > INF16:
            byte = _fp4_special(byte, w, nan_t, INF16)
    else:
        byte = _fp4_special(byte, w, nan_t, INF16)
    return byte, tl.where(nan_t, 0x7F, sb).to(tl.uint8)


@triton.jit
def _store_bytes16(dst, b16, live, TOKENS: tl.constexpr, W: tl.constexpr):
    """Store 16-bit values ``b16 [TOKENS, W]`` (int32 0..65535) little-endian at byte rows ``dst [TOKENS]``."""
    by = tl.reshape(tl.join(b16 & 0xFF, (b16 >> 8) & 0xFF), [TOKENS, 2 * W])
    tl.store(dst[:, None] + tl.arange(0, 2 * W)[None, :], by.to(tl.uint8), mask=live[:, None])


@triton.jit
def _v4_store_kernel(
    pages_ptr, loc_ptr, kv_ptr, cs_ptr, pos_ptr,
    page_stride, num_slots, loc_stride, kv_stride, cs_stride, pos_stride, max_pos,
    skip_index, dcp_world, dcp_rank, n,
    ENC: tl.constexpr, PAGE_SIZE: tl.constexpr, DATA_STRIDE: tl.constexpr, SCALE_BASE: tl.constexpr,
    SCALE_STRIDE: tl.constexpr, IS_BF16: tl.constexpr, ROPE: tl.constexpr, TOKENS: tl.constexpr,
    NATIVE: tl.constexpr, PACKED: tl.constexpr, PAIRS: tl.constexpr, DCP: tl.constexpr, USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
):  # fmt: skip
    # One program stores TOKENS tokens as one [TOKENS, 512] block; every offset is int64. PDL: the
    # trigger carries no memory ordering (the next grid's wait covers this grid's stores), so it may
    # come at entry.
    pdl_open(USE_PDL, ENTRY if EARLY_TRIGGER else END)
    INF16: tl.constexpr = 0x7F80 if IS_BF16 else 0x7C00
    i = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
    src = tl.minimum(i, n - 1)  # a program's tokens past the call re-read the last one; never stored
    raw = tl.load(loc_ptr + src * loc_stride).to(tl.int64)
    raw = tl.where(i < n, raw, -1)
    slot = raw // dcp_world  # dcp_world == 1 is specialised by Triton: no division then
    live = (raw >= 0) & (raw != skip_index) & ((raw - slot * dcp_world) == dcp_rank) & (slot < num_slots)
    if ROPE == 2:  # a position outside the table: the token is skipped (nothing is read past the table)
        pos = tl.load(pos_ptr + src * pos_stride).to(tl.int64)
        live = live & (pos >= 0) & (pos < max_pos)
        pos = tl.where(live, pos, 0)
    # Without DCP the source loads do not depend on loc (issued beside it, unmasked); with DCP only the
    # kept tokens' sources are read.
    if DCP:
        need = live
    else:
        need = i >= -1  # every row (its mask folds away)
    page = slot // PAGE_SIZE
    row = slot - page * PAGE_SIZE
    base = pages_ptr + page * page_stride
    data = base + row * DATA_STRIDE  # [TOKENS] byte pointers
    scales = base + SCALE_BASE + row * SCALE_STRIDE
    kv_row = kv_ptr + src * kv_stride  # [TOKENS]

    # The RoPE tail (values 448..511) as its 32 (even, odd) pairs, rotated and rounded to the input dtype:
    # fp32 values re, ro [TOKENS, 32] and their 16-bit bits be, bo.
    if ROPE != 0:
        p64 = tl.arange(0, 64)[None, :]
        tail = tl.load(kv_row[:, None] + 448 + p64, mask=need[:, None], other=0)
        te, to = tl.split(tl.reshape(tail, [TOKENS, 32, 2]))
        xe = _f32(te, IS_BF16)
        xo = _f32(to, IS_BF16)
        if ROPE == 1:  # freqs_cis [n, 64]: (cos_k, sin_k) interleaved
            f = tl.load(cs_ptr + src[:, None] * cs_stride + p64, mask=need[:, None], other=0.0)
            c, s = tl.split(tl.reshape(f, [TOKENS, 32, 2]))
        else:  # cos_sin_cache [max_pos, 64]: cos_0..31 | sin_0..31 at row pos (read for kept tokens only)
            p32 = tl.arange(0, 32)[None, :]
            row_cs = cs_ptr + pos[:, None] * cs_stride
            c = tl.load(row_cs + p32, mask=live[:, None], other=0.0)
            s = tl.load(row_cs + 32 + p32, mask=live[:, None], other=0.0)
        re, be = _round_to_input(xe * c - xo * s, IS_BF16)  # products and sums rounded apart (no FMA)
        ro, bo = _round_to_input(xe * s + xo * c, IS_BF16)

    if ENC == 2:  # v41_fp4: 32 tiles of 16 values (8 pairs), two codes per byte
        k8 = tl.arange(0, 32)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
        if PAIRS:  # the rows' pairs as 4-byte words (kv 4-byte aligned, even row stride)
            kvw = kv_ptr.to(tl.pointer_type(tl.int32))
            w = tl.load(kvw + (src * (kv_stride // 2))[:, None, None] + k8, mask=need[:, None, None], other=0)
        else:  # 16-bit loads, the pairs put together
            k16 = tl.arange(0, 32)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
            h = tl.load(kv_row[:, None, None] + k16, mask=need[:, None, None], other=0).to(tl.int32)
            he, ho = tl.split(tl.reshape(h, [TOKENS, 32, 8, 2]))
            w = (he & 0xFFFF) | (ho << 16)
        byte, sc = _fp4_quantize(w, IS_BF16, INF16, PACKED, True)
        t = tl.arange(0, 32)[None, :]
        if ROPE == 0:
            tl.store(data[:, None, None] + k8, byte, mask=live[:, None, None])
            tl.store(scales[:, None] + t, sc, mask=live[:, None])
        else:  # the last 4 tiles come from the rotated tail
            tl.store(data[:, None, None] + k8, byte, mask=live[:, None, None] & (k8 < 224))
            tl.store(scales[:, None] + t, sc, mask=live[:, None] & (t < 28))
            rbyte, rsc = _fp4_quantize(tl.reshape(be | (bo << 16), [TOKENS, 4, 8]), IS_BF16, INF16, PACKED, False)
            r32 = tl.arange(0, 32)[None, :]
            tl.store(data[:, None] + 224 + r32, tl.reshape(rbyte, [TOKENS, 32]), mask=live[:, None])
            tl.store(scales[:, None] + 28 + tl.arange(0, 4)[None, :], rsc, mask=live[:, None])
    else:
        TILES: tl.constexpr = 16 if ENC == 1 else 8  # v41: 16 tiles of 32 values; v4: 8 tiles of 64 (7 stored)
        K: tl.constexpr = 512 // TILES
        FLOOR: tl.constexpr = 114 if ENC == 1 else 105
        k3 = tl.arange(0, TILES)[None, :, None] * K + tl.arange(0, K)[None, None, :]
        h = tl.load(kv_row[:, None, None] + k3, mask=need[:, None, None], other=0)
        # v4's unrotated tail is loaded here, before any store: the pages may alias the source as far as the
        # compiler knows, so a load after a store would be issued only after it (a second memory round trip)
        if ENC == 0 and ROPE == 0:
            if IS_BF16:  # the input's own bytes
                kvb = kv_ptr.to(tl.pointer_type(tl.uint8))
                b128 = tl.arange(0, 128)[None, :]
                rb = tl.load(kvb + (src * kv_stride * 2 + 896)[:, None] + b128, mask=need[:, None], other=0)
            else:
                tail = tl.load(kv_row[:, None] + 448 + tl.arange(0, 64)[None, :], mask=need[:, None], other=0)
        amax16 = tl.max(h & 0x7FFF, axis=2)
        code, sc = _ue8m0_quantize(h, amax16, IS_BF16, FLOOR, INF16, NATIVE, True)
        t = tl.arange(0, TILES)[None, :]
        if ENC == 1 and ROPE == 0:
            tl.store(data[:, None, None] + k3, code, mask=live[:, None, None])
            tl.store(scales[:, None] + t, sc, mask=live[:, None])
        else:  # values 0..447 from the block (v4: 7 tiles; v41 with RoPE: 14)
            tl.store(data[:, None, None] + k3, code, mask=live[:, None, None] & (k3 < 448))
            tl.store(scales[:, None] + t, sc, mask=live[:, None] & (t < 448 // K))
        if ENC == 1 and ROPE != 0:  # the rotated tail: 2 tiles of 32 values
            h2 = tl.reshape(tl.join(be, bo), [TOKENS, 2, 32])
            rcode, rsc = _ue8m0_quantize(h2, tl.max(h2 & 0x7FFF, axis=2), IS_BF16, FLOOR, INF16, NATIVE, False)
            r64 = tl.arange(0, 64)[None, :]
            tl.store(data[:, None] + 448 + r64, tl.reshape(rcode, [TOKENS, 64]), mask=live[:, None])
            tl.store(scales[:, None] + 14 + tl.arange(0, 2)[None, :], rsc, mask=live[:, None])
        if ENC == 0:  # v4: the 64 rope values as bf16 (little-endian) at bytes 448..575
            if ROPE != 0:
                if IS_BF16:
                    r16 = tl.reshape(tl.join(be, bo), [TOKENS, 64])
                else:  # the rotated fp16 values -> bf16, nearest even
                    r16 = tl.reshape(tl.join(_bf16_bits(re), _bf16_bits(ro)), [TOKENS, 64])
                _store_bytes16(data + 448, r16, live, TOKENS, 64)
            elif IS_BF16:  # the input's own bytes (loaded above)
                tl.store(data[:, None] + 448 + b128, rb, mask=live[:, None])
            else:  # fp16 -> bf16, nearest even
                _store_bytes16(data + 448, _bf16_bits(_f32(tail, IS_BF16)), live, TOKENS, 64)
    pdl_close(USE_PDL, ENTRY if EARLY_TRIGGER else END)


def launch_v4_store(
    call: V4StoreCall,
    *,
    encoding: int,
    page_size: int,
    data_stride: int,
    scale_base: int,
    scale_stride: int,
    num_warps: int = 0,
    rows_per_program: int = 0,
    early_trigger: Optional[bool] = None,
) -> None:
    """Launch the store (validated arguments; ``n >= 1``).

    Args:
        call: :class:`mlakv.spec.calls.V4StoreCall`: ``kv_pages [num_pages, >= page bytes]`` uint8
            (last dim contiguous, any page stride), ``loc [n]``, ``kv [n, 512]``, the rotation
            (``freqs_cis``, or ``positions`` with ``cos_sin_cache``: see the module docstring) and
            the row selection.
        encoding: 0 ``v4``, 1 ``v41``, 2 ``v41_fp4`` (the interleaved layouts: their twin's).
        page_size: tokens per page (a power of two).
        data_stride, scale_base, scale_stride: a row ``r``'s values at byte ``r * data_stride`` of
            its page, its scales at ``scale_base + r * scale_stride``.
        num_warps / rows_per_program / early_trigger: override the launch table
            (:func:`mlakv.spec.tuning.v4_triton_launch`; the bench's sweep). ``rows_per_program``:
            tokens per program, a power of two.
    """
    kv_pages, loc, kv, freqs_cis, positions, cos_sin_cache, skip_index, dcp_world_size, dcp_rank = call
    n = loc.shape[0]
    is_bf16 = kv.dtype == torch.bfloat16
    src = kv.view(torch.int16)  # both dtypes read as their bits (see _f32)
    rope = 0
    cs, pos, cs_stride, pos_stride, max_pos = src, loc, 0, 0, 0
    if freqs_cis is not None:
        rope, cs, cs_stride = 1, freqs_cis, freqs_cis.stride(0)
    elif positions is not None:
        rope, cs, cs_stride = 2, cos_sin_cache, cos_sin_cache.stride(0)
        pos, pos_stride, max_pos = positions, positions.stride(0), cos_sin_cache.shape[0]
    warps, tokens, early = v4_triton_launch(n, encoding)
    tokens = rows_per_program or tokens
    if tokens & (tokens - 1):
        raise ValueError(f"rows_per_program (tokens per program) must be a power of two, got {tokens}")
    device = kv_pages.device.index or 0
    use_pdl = kv_pages.is_cuda and pdl_supported(device)
    native = kv_pages.is_cuda and native_fp8_supported(device)
    packed = native and packed_half_compare_supported(device)
    pairs = kv.data_ptr() % 4 == 0 and src.stride(0) % 2 == 0  # the rows' (even, odd) pairs as int32 words
    extra = {"launch_pdl": True} if use_pdl else {}
    _v4_store_kernel[(triton.cdiv(n, tokens),)](
        kv_pages, loc, src, cs, pos,
        kv_pages.stride(0), kv_pages.shape[0] * page_size, loc.stride(0), src.stride(0), cs_stride, pos_stride, max_pos,
        skip_index, dcp_world_size, dcp_rank, n,
        ENC=encoding, PAGE_SIZE=page_size, DATA_STRIDE=data_stride, SCALE_BASE=scale_base, SCALE_STRIDE=scale_stride,
        IS_BF16=is_bf16, ROPE=rope, TOKENS=tokens, NATIVE=native, PACKED=packed, PAIRS=pairs, DCP=dcp_world_size > 1, USE_PDL=use_pdl,
        EARLY_TRIGGER=early if early_trigger is None else early_trigger,
        num_warps=num_warps or warps, enable_fp_fusion=False, **extra,
    )  # fmt: skip


# ---- the gather --------------------------------------------------------------------------------


@triton.jit
def _v4_gather_kernel(
    pages_ptr, loc_ptr, out_ptr, page_stride, num_slots, loc_stride,
    ENC: tl.constexpr, PAGE_SIZE: tl.constexpr, DATA_STRIDE: tl.constexpr, SCALE_BASE: tl.constexpr,
    SCALE_STRIDE: tl.constexpr,
):  # fmt: skip
    # out[i] = the bf16 values of slot loc[i]; a slot outside [0, num_slots) reads nothing: zeros.
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + i * loc_stride).to(tl.int64)
    valid = (slot >= 0) & (slot < num_slots)
    slot = tl.where(valid, slot, 0)
    page = slot // PAGE_SIZE
    row = slot - page * PAGE_SIZE
    base = pages_ptr + page * page_stride
    data = base + row * DATA_STRIDE
    scales = base + SCALE_BASE + row * SCALE_STRIDE
    e = tl.arange(0, 512)
    valid_e = (tl.zeros([512], dtype=tl.int32) + valid.to(tl.int32)) != 0
    if ENC == 2:
        b = tl.load(data + e // 2, mask=valid_e, other=0).to(tl.int32)
        code = tl.where((e & 1) == 0, b & 0xF, b >> 4)
        idx = code & 7
        mag = tl.where(idx < 4, idx.to(tl.float32) * 0.5, tl.where(idx < 6, (idx - 2).to(tl.float32), (idx - 4).to(tl.float32) * 2.0))
        s = _e4m3_value(tl.load(scales + e // 16, mask=valid_e, other=0).to(tl.int32))
        # the code's sign flips the exact product's sign bit (IEEE: sign(v * s) = sign(v) ^ sign(s), zeros
        # included); a compiled float negation may be 0 - x, which gives +0 for a zero magnitude
        bits = _bf16_of_bits((mag * s).to(tl.int32, bitcast=True) ^ ((code & 8) << 28))
    else:
        TILE: tl.constexpr = 32 if ENC == 1 else 64
        if ENC == 1:
            mq = valid_e
        else:
            mq = valid_e & (e < 448)
        b = tl.load(data + e, mask=mq, other=0).to(tl.int32)
        sb = tl.load(scales + e // TILE, mask=mq, other=0).to(tl.int32)
        scale = tl.where(sb == 0, 0x00400000, sb << 23)
        scale = tl.where(sb == 255, 0x7FC00000, scale).to(tl.float32, bitcast=True)
        bits = _bf16_bits(_e4m3_value(b) * scale)
        if ENC == 0:  # the rope values: bf16 little-endian at bytes 448 + 2 (e - 448)
            r = tl.maximum(e - 448, 0)
            in_rope = valid_e & (e >= 448)
            lo = tl.load(data + 448 + 2 * r, mask=in_rope, other=0).to(tl.int32)
            hi = tl.load(data + 449 + 2 * r, mask=in_rope, other=0).to(tl.int32)
            bits = tl.where(e >= 448, lo | (hi << 8), bits)
    bits = tl.where(valid_e, bits, 0)
    tl.store(out_ptr + i * 512 + e, bits.to(tl.int16))


def launch_v4_gather(
    kv_pages: torch.Tensor,
    loc: torch.Tensor,
    *,
    encoding: int,
    page_size: int,
    data_stride: int,
    scale_base: int,
    scale_stride: int,
) -> torch.Tensor:
    """Gather and dequantize slots ``loc [n]`` (validated; physical slots, any stride) of ``kv_pages
    [num_pages, >= page bytes]`` uint8 into a new ``[n, 512]`` bf16 tensor; a slot outside the pages
    gives a zero row. Geometry arguments as :func:`launch_v4_store`."""
    n = loc.shape[0]
    out = torch.empty((n, 512), dtype=torch.bfloat16, device=kv_pages.device)
    if n == 0:
        return out
    _v4_gather_kernel[(n,)](
        kv_pages, loc, out.view(torch.int16), kv_pages.stride(0), kv_pages.shape[0] * page_size, loc.stride(0),
        ENC=encoding, PAGE_SIZE=page_size, DATA_STRIDE=data_stride, SCALE_BASE=scale_base, SCALE_STRIDE=scale_stride,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out
