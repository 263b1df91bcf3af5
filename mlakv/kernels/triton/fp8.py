"""Triton kernels of the FP8 KV cache: the fused quantizing write and the dequantizing gather.

They are the GPU path where the JIT CUDA kernel cannot serve (pre-Hopper GPUs, odd widths or
alignments) and run on CPU tensors under ``TRITON_INTERPRET=1`` in CI. Every result is bit-identical
to :func:`mlakv.ops.fp8.quantize_mla_rows` / :func:`mlakv.ops.fp8.dequantize_mla_rows` (the formats
are specified there).

How a program works (the shape of the CUDA kernel, ``csrc/fp8.cuh``, in Triton's terms):

* It handles ``ROWS`` rows (a 2-D ``[ROWS, width]`` block; ds_mla nope as ``[ROWS, tiles, 128]``,
  each tile exactly 128 wide). The nope and rope parts are separate blocks, so a 512 + 64 row has no
  masked padding; a program's rows past ``n_loc`` re-read the last row and store nothing.
* Division ``x / s`` is the correctly rounded quotient without ``div.rn`` per value: ``r = 1 / s``
  (IEEE, once per divisor), then ``q0 = a * r`` and two FMA corrections (Markstein:
  ``q += r * fma(-s, q, a)``), on ``a = |x|``, the sign put back on the e4m3 byte. The sequence is
  exact while no remainder or quotient nears underflow or overflow: ``s`` positive and normal with
  biased exponent ``e`` in ``[39, 252]`` and ``|x|`` zero or with exponent in ``[max(27, e - 100),
  e + 101)`` (the CUDA kernel's range, :func:`launch_div_probe` and tests/test_fp8.py check it). Outside
  it the e4m3 byte needs no exact quotient: ``|x|`` is clamped below ``2^(e + 101)`` (its quotient
  > 2^100 saturates to 448 either way; inf does too, NaN is set to 0x7F after), and a smaller ``|x|``
  gives a quotient below 2^-11, e4m3 zero however its last bits fall (e >= 39). per_tensor with a
  ``k_scale`` outside that exponent range (a program-uniform test) divides with ``div_rn``, and one
  that is a power of two in [2^-126, 2^125] (the common ``k_scale`` of 1) multiplies by its exact
  reciprocal (:func:`pow2_reciprocal`: the product is the quotient itself); a ds_mla
  tile whose scale is below 2^-88 has both its values and its scale multiplied by the same power of
  two first (exact, the quotient unchanged) so its division is in range too. That is ds_mla's
  ``fp32_floor`` rule, in full; a program whose tiles all have their amax in ``[2^-79, 2^109)`` (the
  common case, one program-uniform test) takes a shorter path with the same bits: no inf or NaN to
  exclude or encode, the scale ``amax / 448`` itself a fast quotient, no rescaling, no clamp. The
  general path then runs a tile at a time from memory, so its registers do not set the kernel's
  (Triton 3.6, sm_90, 2 warps x 4 rows: 64 registers per thread; 94 with the general path over the
  whole block, 80 before the common case). The tile amax is an integer max over biased
  ``|x|`` bits (the excluded inf / NaN bits wrap negative): no select per value. Its ``fp32`` and ``ue8m0`` rules (``RULE`` 1, 2) take no quotient: each value
  is multiplied by the tile's IEEE reciprocal ``div_rn(1, s)`` (:func:`ds_mla_tile_scale`,
  :func:`ds_mla_scaled`; ``div_rn`` and the product keep fp32 subnormals, no ``.ftz``); they take the
  same common case (a normal scale: a finite reciprocal, so a zero stays itself with no select).
* Conversions: with ``NATIVE`` (an sm_89+ GPU, not the interpreter) fp32 -> e4m3 is the hardware's
  ``cvt.rn.satfinite.e4m3x2.f32`` (RNE, saturating) and e4m3 -> fp32, fp32 -> bf16/fp16 are Triton
  casts; otherwise (the interpreter, older GPUs) integer bit arithmetic that gives the same bits
  (the interpreter's bf16 cast flushes fp32 subnormals; pre-sm_89 Triton has no e4m3 casts). NaN is
  stored as the canonical 0x7F (sign dropped) and dequantizes to the destination's canonical NaN.
  per_tensor's hardware path converts the signed quotient (the sign comes from the hardware; only
  a NaN's byte is replaced, by 0x7F): ORing the sign into the bytes of one ``cvt...e4m3x2`` made
  LLVM pack ``{pair, pair >> 8}`` into one 32-bit register, which ptxas 12.8/12.9 (the one Triton
  3.6 runs for sm_90) miscompiles: it folds the pack into the conversion (``F2FP ... MERGE_C``) and
  computes the shift before it, from a stale register, so a pair's second byte came out as bits of
  a source value. tests/test_fp8.py checks the PTX (and, where Triton ships nvdisasm, the machine
  code) of both quantizing kernels at every launch shape for that pattern.
* Stores are wide: Triton vectorizes each row's block when the row addresses allow (16-byte rows),
  ds_mla's tile scales go out as fp32 words and its rope as bf16 words when the rows are 4-byte
  aligned (``ALIGN4``; byte stores otherwise).
* PDL (sm_90+): the program waits on the previous grid before its first load and lets the next grid
  launch at the place its launch row names (``TRIGGER``: before the wait, right after it, or after
  the stores; :mod:`mlakv.kernels.triton.pdl`).

Every float constant that feeds fp32 arithmetic is an explicit fp32 tensor or an exact fp32 normal
literal (a bare literal outside fp32's normal range is fp64 to some Triton versions). Launchers take
arguments the caller (:mod:`mlakv.ops.fp8`) has validated and do no checking of their own; their
launch shape comes from :func:`mlakv.spec.tuning.fp8_triton_launch` unless the caller overrides it
(the benchmark's sweep). A row whose slot is negative (padding), ``skip_slot`` or ``>= num_slots`` is
not written; the gather reads nothing for a slot outside ``[0, num_slots)`` (its row comes out zeros).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from mlakv.spec.rules import DS_MLA_SCALE_RULES
from mlakv.spec.tuning import fp8_triton_launch, fp8_triton_parts

from .common import interpreting, pdl_supported
from .pdl import pdl_close, pdl_open, trigger_code

__all__ = [
    "launch_quant_write",
    "launch_dequant_gather",
    "launch_div_probe",
    "launch_pow2_probe",
    "native_fp8_supported",
    "ds_mla_tile_scale",
    "ds_mla_scaled",
    "divisor_hi",
    "quot_fast",
    "e4m3_signed",
    "e4m3_finite",
    "quot_in_range",
    "pow2_reciprocal",
]

_DST_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_DST_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@functools.lru_cache(maxsize=None)
def native_fp8_supported(device_index: int) -> bool:
    """Whether Triton converts fp32 <-> e4m3 in hardware here: a CUDA sm_89+ GPU, not interpreted."""
    if interpreting() or torch.version.cuda is None:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


# ---- conversions ---------------------------------------------------------------------------------
@triton.jit
def _e4m3_mag(y, NATIVE: tl.constexpr):
    """Non-negative fp32 (inf allowed, not NaN) -> e4m3 magnitude byte (int32 0..0x7E): RNE, saturating to 448."""
    if NATIVE:
        m = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        u = y.to(tl.int32, bitcast=True)
        # normal range: round the 23-bit mantissa to 3 bits (RNE), then rebias the exponent 127 -> 7
        normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - 960
        # subnormal range (y < 2^-6): m * 2^-9, m = rne(y * 512), 0..8 (8 is the smallest normal);
        # adding 2^23 in fp32 rounds to an integer, RNE (both constants fp32, so no Triton makes it fp64)
        small = tl.where(y < 0.015625, y, 0.0)
        two_pow_23 = tl.full([], 8388608.0, tl.float32)
        sub = ((small * tl.full([], 512.0, tl.float32) + two_pow_23) - two_pow_23).to(tl.int32)
        m = tl.where(y < 0.015625, sub, normal)
        m = tl.where(y >= 448.0, 0x7E, m)
    return m


@triton.jit
def _div_fast(a, s, r):
    """``a / s`` correctly rounded for ``a >= 0`` in the exact range (module docstring); ``r = 1 / s`` (IEEE)."""
    q0 = a * r
    q1 = tl.fma(r, tl.fma(-s, q0, a), q0)
    return tl.fma(r, tl.fma(-s, q1, a), q1)


@triton.jit
def divisor_hi(e):
    """``|x|``'s bits must stay below ``min(e + 101, 255) << 23`` for the exact range (int32)."""
    return tl.minimum(e + 101, 255) << 23


@triton.jit
def pow2_reciprocal(s):
    """``1 / s`` where the fp32 scalar ``s`` is a power of two in [2^-126, 2^125] (biased exponent ``e``
    in [1, 252], no mantissa bits): exact and normal, so ``x * pow2_reciprocal(s)`` is ``x / s`` rounded
    once (subnormal or not), the quotient itself. 0.0 for every other ``s`` (not a power of two,
    negative, zero, subnormal, above 2^125, inf, NaN): the one test of the product path, the CUDA
    kernels' ``Divisor::p``."""
    sb = s.to(tl.int32, bitcast=True)
    e = sb >> 23  # a negative s has a negative e
    ok = ((sb & 0x7FFFFF) == 0) & (e >= 1) & (e <= 252)
    return tl.where(ok, ((254 - tl.minimum(tl.maximum(e, 1), 252)) << 23).to(tl.float32, bitcast=True), 0.0)


@triton.jit
def quot_fast(x, s, r, hi):
    """fp32 ``x / s`` for :func:`e4m3_signed`, ``s`` positive with biased exponent ``e`` in [39, 252]
    (``r = 1 / s`` IEEE, ``hi = divisor_hi(e)``): the correctly rounded
    quotient of the clamped ``|x|`` (out of the exact range it rounds to the same e4m3 byte) with
    ``x``'s sign; NaN stays NaN."""
    xb = x.to(tl.int32, bitcast=True)
    ab = xb & 0x7FFFFFFF
    q = _div_fast(tl.minimum(ab, hi - 1).to(tl.float32, bitcast=True), s, r).to(tl.int32, bitcast=True)
    return tl.where(ab > 0x7F800000, xb, q | (xb & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def quot_in_range(ab, x, s, r):
    """fp32 ``x / s`` correctly rounded, with ``x``'s sign (a zero's too), for ``|x|`` (bits ``ab``) below
    ``divisor_hi(e)`` and ``s`` as in :func:`quot_fast`: its quotient without the clamp and the NaN
    select, for values a caller has shown to lie there (no inf or NaN among them)."""
    q = _div_fast(ab.to(tl.float32, bitcast=True), s, r).to(tl.int32, bitcast=True)
    return (q | (x.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_signed(y, NATIVE: tl.constexpr):
    """fp32 -> e4m3 byte (uint8): RNE, saturating to +-448, NaN -> 0x7F. ``NATIVE``: the hardware
    converts the signed value (no sign OR on its bytes: the ptxas 12.8/12.9 miscompile of the module
    docstring)."""
    if NATIVE:
        r = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
        r = tl.where(y != y, tl.full(y.shape, 0x7F, tl.uint8), r)
    else:
        yb = y.to(tl.int32, bitcast=True)
        ab = yb & 0x7FFFFFFF
        byte = _e4m3_mag(ab.to(tl.float32, bitcast=True), False) | ((yb >> 24) & 0x80)
        r = tl.where(ab > 0x7F800000, 0x7F, byte).to(tl.uint8)
    return r


@triton.jit
def _src_f32(v, IS_BF16: tl.constexpr, NATIVE: tl.constexpr):
    """A loaded source value as fp32, exactly. bf16 sources arrive as their int16 bits: widened by a
    shift in the interpreter (its bf16 -> fp32 cast flushes fp32 subnormals), by the cast on a GPU;
    fp16 is cast (every fp16 value is a normal fp32)."""
    if IS_BF16:
        if NATIVE:
            r = v.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            r = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _bf16_bits(y, NATIVE: tl.constexpr):
    """fp32 -> bf16 bits (int32 0..65535): RNE, NaN -> 0x7FC0."""
    if NATIVE:
        r = y.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        u = y.to(tl.int32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(y != y, 0x7FC0, r)


@triton.jit
def _dst_bits(y, DST: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 -> the destination dtype's bits (int32): 0 bf16, 1 fp16, 2 fp32; canonical NaN."""
    if DST == 0:
        r = _bf16_bits(y, NATIVE)
    elif DST == 1:
        h = y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        r = tl.where(y != y, 0x7E00, h)
    else:
        r = tl.where(y != y, 0x7FC00000, y.to(tl.int32, bitcast=True))
    return r


@triton.jit
def _e4m3_value(b, NATIVE: tl.constexpr):
    """e4m3 byte (uint8) -> fp32 (exact); 0x7F/0xFF -> NaN."""
    if NATIVE:
        v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        w = b.to(tl.int32)
        s = (w & 0x80) << 24
        e = (w >> 3) & 15
        m = w & 7
        normal = s | ((e + 120) << 23) | (m << 20)
        sub = (m.to(tl.float32) * tl.full([], 0.001953125, tl.float32)).to(tl.int32, bitcast=True) | s  # m * 2^-9
        bits = tl.where(e == 0, sub, normal)
        bits = tl.where((w & 0x7F) == 0x7F, 0x7FC00000, bits)
        v = bits.to(tl.float32, bitcast=True)
    return v


# ---- program setup shared by the kernels ---------------------------------------------------------
@triton.jit
def _rows_of_program(loc_ptr, loc_stride, n_loc, ROWS: tl.constexpr, PARTS: tl.constexpr = 1):
    """``(i, src, slot)``: the program's call rows ``[ROWS]`` (int64), each clamped to ``n_loc - 1``
    for reading (a program's rows past the call re-read the last row; they are never stored), and
    their slots (-1 for rows past the call). ``PARTS`` programs in a row share each block of rows
    (program ``p`` takes block ``p // PARTS``, part ``p % PARTS`` of it)."""
    i = (tl.program_id(0) // PARTS).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    src = tl.minimum(i, n_loc - 1)
    slot = tl.load(loc_ptr + src * loc_stride).to(tl.int64)
    return i, src, tl.where(i < n_loc, slot, -1)


@triton.jit
def _load_block(base, cols, W: tl.constexpr, WP2: tl.constexpr, IS_BF16: tl.constexpr, NATIVE: tl.constexpr):
    """``[ROWS, WP2]`` source values as fp32 from row bases ``base [ROWS, 1]`` (columns past W: 0)."""
    if W == WP2:
        v = tl.load(base + cols)
    else:
        v = tl.load(base + cols, mask=cols < W, other=0)
    return _src_f32(v, IS_BF16, NATIVE)


@triton.jit
def _store_block(ptrs, cols, vals, live, W: tl.constexpr, WP2: tl.constexpr):
    if W == WP2:
        tl.store(ptrs, vals, mask=live)
    else:
        tl.store(ptrs, vals, mask=live & (cols < W))


# ---- ds_mla's tile-scale rules (shared with the fused RoPE write's kernel) -------------------------
@triton.jit
def ds_mla_tile_scale(ab, RULE: tl.constexpr, AXIS: tl.constexpr):
    """A ds_mla tile's fp32 scale by rule code ``RULE`` (0 ``fp32_floor``, 1 ``fp32``, 2 ``ue8m0``:
    :data:`mlakv.spec.rules.DS_MLA_SCALE_RULES`; the reference is
    :func:`mlakv.ops.fp8.ds_mla_tile_scales`), from the ``|x|`` bits ``ab`` (int32) of its values,
    reduced over ``AXIS``. The amax is a max over bits (their order is the values' order): over the
    finite ones for rule 0, NaN excluded and inf kept otherwise. The constants are fp32 tensors, not
    Python floats: some Triton versions type a bare literal outside fp32's normal range (FLT_MIN
    written as 1.17549435e-38 is a hair below 2^-126) as fp64, which makes the scale fp64 and
    ``div_rn`` (fp32 only) refuse to compile."""
    e4m3_max = tl.full([], 448.0, tl.float32)
    # The excluded bits wrap past 2^31 when biased (int32 arithmetic wraps), so an integer max skips
    # them with no select per value: rule 0 biases by 2^23 (inf and NaN wrap), the others by
    # 2^23 - 1 (NaN wraps, inf stays); an all-excluded tile's max is clamped to the bias (amax 0).
    bias = 0x800000 if RULE == 0 else 0x7FFFFF
    amax = (tl.maximum(tl.max(ab + bias, axis=AXIS), bias) - bias).to(tl.float32, bitcast=True)
    if RULE == 0:
        s = tl.maximum(tl.math.div_rn(amax, e4m3_max), tl.full([], 1.1754943508222875e-38, tl.float32))  # 2^-126
    else:
        s = tl.math.div_rn(amax, e4m3_max)  # fp32: no floor (0 for an all-zero tile; subnormals kept)
        if RULE == 2:
            s = ue8m0_up(s)
    return s


@triton.jit
def ue8m0_up(s):
    """``ue8m0``'s scale from ``amax / 448`` (fp32): at least 1e-4f, then up to a power of two (inf stays)."""
    s = tl.maximum(s, tl.full([], 9.999999747378752e-05, tl.float32))  # 1e-4f exactly
    sb = s.to(tl.int32, bitcast=True)
    sb = (sb & 0x7F800000) + tl.where((sb & 0x7FFFFF) != 0, 0x800000, 0)
    return sb.to(tl.float32, bitcast=True)


@triton.jit
def ds_mla_scaled(x, inv):
    """``x * inv`` (fp32, ``inv`` the IEEE ``1 / scale``) with a zero kept as itself: the quotient of
    the ``fp32`` and ``ue8m0`` rules before the e4m3 rounding (:func:`mlakv.ops.fp8.ds_mla_quotients`)."""
    return tl.where(x == 0, x, x * inv)


# ---- the quantizing write ------------------------------------------------------------------------
@triton.jit
def e4m3_finite(y, NATIVE: tl.constexpr):
    """fp32 without NaN -> e4m3 byte (uint8): RNE, saturating to +-448, inf included (:func:`e4m3_signed`
    without its NaN byte)."""
    if NATIVE:
        r = y.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    else:
        r = e4m3_signed(y, False)
    return r


@triton.jit
def _ds_mla_tiles_general(x, ab, RULE: tl.constexpr, NATIVE: tl.constexpr):
    """``(scale [ROWS, TILES_P2] fp32, bytes [ROWS, TILES_P2, 128] uint8)`` of ds_mla tiles of any
    values (inf, NaN, a tiny or huge amax) by rule ``RULE``: the path of a program that the common
    case of :func:`_quant_ds_mla_kernel` does not cover."""
    scale = ds_mla_tile_scale(ab, RULE, 2)  # [ROWS, TILES_P2]
    sb = scale.to(tl.int32, bitcast=True)
    if RULE == 0:
        # x / scale. A scale below 2^-88 (biased exponent e < 39): values and divisor times 2^k,
        # k = 39 - e, exact (|x| <= 448 * scale stays tiny; the GPU keeps fp32 subnormals), the
        # quotient unchanged.
        k = tl.maximum(39 - (sb >> 23), 0)
        s2 = (sb + (k << 23)).to(tl.float32, bitcast=True)
        p2 = ((127 + k) << 23).to(tl.float32, bitcast=True)
        r = tl.math.div_rn(tl.full([], 1.0, tl.float32), s2)
        hi = divisor_hi((sb >> 23) + k)
        q = e4m3_signed(quot_fast(x * p2[:, :, None], s2[:, :, None], r[:, :, None], hi[:, :, None]), NATIVE)
    else:
        # fp32: x * (1 / scale); ue8m0: x / 2^k, the exact product x * 2^-k (1 / inf = 0: finite
        # values -> +-0, inf -> NaN, as x / inf)
        q = e4m3_signed(ds_mla_scaled(x, tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)[:, :, None]), NATIVE)
    return scale, q


@triton.jit
def _quant_per_tensor_kernel(
    kv_ptr, loc_ptr, nope_ptr, rope_ptr, scale_ptr,
    kv_row_stride, loc_stride, nope_row_stride, rope_row_stride, num_slots, skip_slot, n_loc,
    NOPE: tl.constexpr, NOPE_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr, ROWS: tl.constexpr,
    SRC_IS_BF16: tl.constexpr, NATIVE: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER: tl.constexpr,
):  # fmt: skip
    # kv[loc[i], :NOPE+ROPE] = e4m3([nope[i] | rope[i]] / k_scale) for ROWS rows; all offsets int64.
    pdl_open(USE_PDL, TRIGGER)
    i, src, slot = _rows_of_program(loc_ptr, loc_stride, n_loc, ROWS)
    live = ((slot >= 0) & (slot < num_slots) & (slot != skip_slot))[:, None]
    dst = (kv_ptr + slot * kv_row_stride)[:, None]
    cn = tl.arange(0, NOPE_P2)[None, :]
    xn = _load_block((nope_ptr + src * nope_row_stride)[:, None], cn, NOPE, NOPE_P2, SRC_IS_BF16, NATIVE)
    if ROPE > 0:
        cr = tl.arange(0, ROPE_P2)[None, :]
        xr = _load_block((rope_ptr + src * rope_row_stride)[:, None], cr, ROPE, ROPE_P2, SRC_IS_BF16, NATIVE)
    s = tl.load(scale_ptr)
    e = s.to(tl.int32, bitcast=True) >> 23  # a negative s has a negative e
    p = pow2_reciprocal(s)
    # The branch yields the signed fp32 quotients; they are converted once, after it.
    if p != 0.0:  # uniform: a power of two, x * (1/s) is x / s
        yn = xn * p
        if ROPE > 0:
            yr = xr * p
    elif (e >= 47) & (e <= 252):  # uniform: the fast division (values below 2^(e-100) quantize to zero)
        r = tl.math.div_rn(tl.full([], 1.0, tl.float32), s)
        hi = divisor_hi(e)
        yn = quot_fast(xn, s, r, hi)
        if ROPE > 0:
            yr = quot_fast(xr, s, r, hi)
    else:
        yn = tl.math.div_rn(xn, s)
        if ROPE > 0:
            yr = tl.math.div_rn(xr, s)
    _store_block(dst + tl.max_contiguous(cn, [1, 8]), cn, e4m3_signed(yn, NATIVE), live, NOPE, NOPE_P2)
    if ROPE > 0:
        _store_block(dst + NOPE + tl.max_contiguous(cr, [1, 8]), cr, e4m3_signed(yr, NATIVE), live, ROPE, ROPE_P2)
    pdl_close(USE_PDL, TRIGGER)


@triton.jit
def _store_tiles(dst, live, t, offs, q, scale, TILES: tl.constexpr, ALIGN4: tl.constexpr):
    """Store ds_mla tiles ``t [T]`` of rows ``dst [ROWS]`` (byte pointers; ``live [ROWS]``): their e4m3
    bytes ``q [ROWS, T, 128]`` at ``offs [1, T, 128]`` and their scales ``scale [ROWS, T]`` after the
    ``TILES`` tiles, as fp32 words (``ALIGN4``: 4-byte aligned rows) or 4 little-endian bytes each;
    tiles ``t >= TILES`` (a power-of-two block's padding) are not stored."""
    NOPE: tl.constexpr = TILES * 128
    live_t = live[:, None] & (t[None, :] < TILES)  # [ROWS, T]
    tl.store(dst[:, None, None] + tl.max_contiguous(offs, [1, 1, 8]), q, mask=live_t[:, :, None])
    if ALIGN4:
        tl.store((dst + NOPE).to(tl.pointer_type(tl.float32))[:, None] + t[None, :], scale, mask=live_t)
    else:
        kb = tl.arange(0, 4)[None, None, :]
        sbytes = (scale.to(tl.int32, bitcast=True)[:, :, None] >> (8 * kb)) & 0xFF
        tl.store(dst[:, None, None] + NOPE + t[None, :, None] * 4 + kb, sbytes.to(tl.uint8), mask=live_t[:, :, None])


@triton.jit
def _quant_ds_mla_kernel(
    kv_ptr, loc_ptr, nope_ptr, rope_ptr,
    kv_row_stride, loc_stride, nope_row_stride, rope_row_stride, num_slots, skip_slot, n_loc,
    TILES: tl.constexpr, TILES_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr, ROWS: tl.constexpr,
    SRC_IS_BF16: tl.constexpr, NATIVE: tl.constexpr, ALIGN4: tl.constexpr, USE_PDL: tl.constexpr,
    TRIGGER: tl.constexpr, RULE: tl.constexpr = 0, PARTS: tl.constexpr = 1, ROPE_PART: tl.constexpr = 0,
):  # fmt: skip
    # ROWS rows of [e4m3 nope (TILES x 128) | TILES fp32 scales | ROPE bf16]; a tile's scale and
    # quotients by the scale rule RULE (ds_mla_tile_scale: 0 fp32_floor, 1 fp32, 2 ue8m0).
    # PARTS programs share ROWS rows: part p takes tiles [p * TILES_P2, (p + 1) * TILES_P2) (TILES_P2
    # is then the tiles per part, TILES = PARTS * TILES_P2) and rope columns [p * ROPE_PART, (p + 1) *
    # ROPE_PART). Each tile's scale is its own, so a part needs nothing from another: a row's
    # dependent chain (load, amax, scale, quotient, convert, store) is spread over PARTS warps with no
    # cross-warp reduction.
    NOPE: tl.constexpr = TILES * 128
    pdl_open(USE_PDL, TRIGGER)
    i, src, slot = _rows_of_program(loc_ptr, loc_stride, n_loc, ROWS, PARTS)
    part = tl.program_id(0) % PARTS
    live = (slot >= 0) & (slot < num_slots) & (slot != skip_slot)  # [ROWS]
    dst = kv_ptr + slot * kv_row_stride  # [ROWS]
    t = part * TILES_P2 + tl.arange(0, TILES_P2)  # this part's tiles (absolute indices)
    offs = t[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]  # [1, TILES_P2, 128]
    base = (nope_ptr + src * nope_row_stride)[:, None, None]
    if TILES == TILES_P2 * PARTS:
        v = tl.load(base + offs)
    else:
        v = tl.load(base + offs, mask=offs < NOPE, other=0)
    # The rope is loaded here, before any store: kv may alias a source as far as the compiler knows, so
    # a load after a store would be issued only after it, a second memory round trip per program.
    RP: tl.constexpr = ROPE_P2 if PARTS == 1 else ROPE_PART
    if ROPE > 0:
        cr = part * RP + tl.arange(0, RP)[None, :]
        rbase = (rope_ptr + src * rope_row_stride)[:, None]
        if ROPE == RP * PARTS:
            rv = tl.load(rbase + cr)
        else:
            rv = tl.load(rbase + cr, mask=cr < ROPE, other=0)
    x = _src_f32(v, SRC_IS_BF16, NATIVE)  # [ROWS, TILES_P2, 128]
    xb = x.to(tl.int32, bitcast=True)
    ab = xb & 0x7FFFFFFF
    # The common case, decided once per program: every tile's |x| maximum (one integer max per value)
    # lies in [2^-79, 2^109). Then no value is inf or NaN (every rule's amax is the plain maximum),
    # amax / 448 is the fast quotient (amax's exponent is in its exact range) and >= 2^-88. fp32_floor:
    # no floor to apply, no power-of-two rescaling, and every |x| <= amax in the exact range of x /
    # scale (or quotients below 2^-11). fp32 and ue8m0: the scale is normal, so its reciprocal is
    # finite and x * (1 / scale) keeps a zero as itself. So no clamp, no NaN byte, no select per value.
    m = tl.max(ab, axis=2)  # [ROWS, TILES_P2]
    common = ((m >= (48 << 23)) & (m < (236 << 23))) | (t[None, :] >= TILES)
    if tl.min(common.to(tl.int32)) == 1:
        e4m3_max = tl.full([], 448.0, tl.float32)
        scale = _div_fast(m.to(tl.float32, bitcast=True), e4m3_max, tl.math.div_rn(tl.full([], 1.0, tl.float32), e4m3_max))
        if RULE == 2:
            scale = ue8m0_up(scale)
        r = tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)
        if RULE == 0:
            y = quot_in_range(ab, x, scale[:, :, None], r[:, :, None])
        else:
            y = x * r[:, :, None]
        _store_tiles(dst, live, t, offs, e4m3_finite(y, NATIVE), scale, TILES, ALIGN4)
    else:
        # Any other program: the general rule, a tile at a time from memory (the whole block's
        # general path would set the kernel's register count for the common case too).
        for k in range(TILES if PARTS == 1 else TILES_P2):
            tk = part * TILES_P2 + k + tl.arange(0, 1)
            ok = tk[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]  # [1, 1, 128]
            xk = _src_f32(tl.load(base + ok), SRC_IS_BF16, NATIVE)
            sk, qk = _ds_mla_tiles_general(xk, xk.to(tl.int32, bitcast=True) & 0x7FFFFFFF, RULE, NATIVE)
            _store_tiles(dst, live, tk, ok, qk, sk, TILES, ALIGN4)
    # the rope as bf16: raw bits of a bf16 source, an fp16 source rounded (RNE)
    if ROPE > 0:
        if SRC_IS_BF16:
            rb = rv
        else:
            rb = _bf16_bits(rv.to(tl.float32), NATIVE).to(tl.int16)
        live_r = live[:, None]
        if ROPE != RP * PARTS:
            live_r = live_r & (cr < ROPE)
        rdst = dst[:, None] + NOPE + 4 * TILES
        if ALIGN4:
            tl.store(rdst.to(tl.pointer_type(tl.int16)) + cr, rb.to(tl.int16), mask=live_r)
        else:
            rb = rb.to(tl.int32)
            tl.store(rdst + 2 * cr, (rb & 0xFF).to(tl.uint8), mask=live_r)
            tl.store(rdst + 2 * cr + 1, ((rb >> 8) & 0xFF).to(tl.uint8), mask=live_r)
    pdl_close(USE_PDL, TRIGGER)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _aligned4(kv: torch.Tensor) -> bool:
    return kv.data_ptr() % 4 == 0 and (kv.shape[0] <= 1 or kv.stride(0) % 4 == 0)


def _launch_shape(kind: str, n_loc: int, num_warps: int, rows_per_program: int, trigger: Optional[str]):
    """``(num_warps, rows, TRIGGER code)``: the table's row for ``kind`` at ``n_loc``, overridden where given."""
    warps, rows, place = fp8_triton_launch(kind, n_loc)
    return num_warps or warps, rows_per_program or rows, trigger_code(trigger or place)


def launch_quant_write(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache_format: str,
    k_scale: Optional[torch.Tensor],
    skip_slot: int = -1,
    *,
    num_warps: int = 0,
    rows_per_program: int = 0,
    trigger: Optional[str] = None,
    native: Optional[bool] = None,
    scale_rule: str = "fp32_floor",
    parts_per_row: int = 0,
) -> None:
    """Launch the fused quantizing write: ``rows_per_program`` rows per program (ds_mla: split over
    ``parts_per_row`` programs, each taking its share of the row's tiles and rope).

    Args (validated by :func:`mlakv.ops.fp8.set_mla_kv_buffer_quant`):
        kv_buffer: ``[num_slots, (1,) >= row_bytes]`` uint8/float8_e4m3fn.
        loc: ``[n_loc]`` int32/int64, any stride. k_nope: ``[n_loc, (1,) nope_dim]``,
        k_rope: ``[n_loc, (1,) rope_dim]`` bf16/fp16. k_scale: ``[1]`` fp32 (per_tensor) or None.
        skip_slot: rows with this slot are skipped like padding (-1: none).
        num_warps, rows_per_program, trigger: override the launch table
            (:func:`mlakv.spec.tuning.fp8_triton_launch`; 0/None: its choice), for the benchmark's sweep;
            ``trigger`` is a place of :data:`mlakv.spec.tuning.TRIGGER_PLACES` (``"entry"``,
            ``"wait"``, ``"end"``).
        native: force the hardware fp8 conversions on or off (None: on where supported); the
            results are the same bits either way (the tests run both on a GPU).
        scale_rule: ds_mla's tile-scale rule, ``"fp32_floor"``, ``"fp32"`` or ``"ue8m0"``
            (``ds_mla_scale_rule`` of :mod:`mlakv.ops.fp8`; per_tensor ignores it).
        parts_per_row: ds_mla only: programs per block of rows (0: the table's,
            :func:`mlakv.spec.tuning.fp8_triton_parts`), lowered to what the tiles allow
            (:func:`ds_mla_parts`).
    """
    n_loc = loc.shape[0]
    if n_loc == 0:
        return
    kv = _rows(kv_buffer).view(torch.uint8)
    nope, rope = _rows(k_nope), _rows(k_rope)
    nope_dim, rope_dim = nope.shape[-1], rope.shape[-1]
    src_is_bf16 = nope.dtype == torch.bfloat16
    if src_is_bf16:  # the kernels widen bf16 bits themselves (see _src_f32)
        nope, rope = nope.view(torch.int16), rope.view(torch.int16)
    if rope_dim == 0:
        rope = nope  # never read; an empty tensor's pointer may be null
    on_gpu = kv.is_cuda
    use_pdl = on_gpu and pdl_supported(kv.device.index or 0)
    if native is None:
        native = on_gpu and native_fp8_supported(kv.device.index or 0)
    extra = {"launch_pdl": True} if use_pdl else {}
    common = dict(ROPE=rope_dim, ROPE_P2=_p2(rope_dim), SRC_IS_BF16=src_is_bf16, NATIVE=bool(native), USE_PDL=use_pdl)
    if kv_cache_format == "per_tensor":
        warps, rows, place = _launch_shape("quant_per_tensor", n_loc, num_warps, rows_per_program, trigger)
        _quant_per_tensor_kernel[(triton.cdiv(n_loc, rows),)](
            kv, loc, nope, rope, k_scale,
            kv.stride(0), loc.stride(0), nope.stride(0), rope.stride(0), kv.shape[0], skip_slot, n_loc,
            NOPE=nope_dim, NOPE_P2=_p2(nope_dim), ROWS=rows, TRIGGER=place, num_warps=warps, **common, **extra,
        )  # fmt: skip
        return
    tiles = nope_dim // 128
    warps, rows, place = _launch_shape("quant_ds_mla", n_loc, num_warps, rows_per_program, trigger)
    parts = ds_mla_parts(tiles, parts_per_row or fp8_triton_parts("quant_ds_mla", n_loc))
    split = dict(PARTS=parts, ROPE_PART=_p2(triton.cdiv(rope_dim, parts))) if parts > 1 else {}
    _quant_ds_mla_kernel[(triton.cdiv(n_loc, rows) * parts,)](
        kv, loc, nope, rope,
        kv.stride(0), loc.stride(0), nope.stride(0), rope.stride(0), kv.shape[0], skip_slot, n_loc,
        TILES=tiles, TILES_P2=_p2(tiles) if parts == 1 else tiles // parts, ROWS=rows, ALIGN4=_aligned4(kv),
        TRIGGER=place, RULE=DS_MLA_SCALE_RULES.index(scale_rule),
        num_warps=warps, **split, **common, **extra,
    )  # fmt: skip


def ds_mla_parts(tiles: int, wanted: int) -> int:
    """The programs a ds_mla row's ``tiles`` are split over for ``wanted`` parts: the largest count
    ``<= wanted`` that gives every part the same power-of-two number of tiles (1 if none does)."""
    for p in range(min(wanted, tiles), 1, -1):
        if tiles % p == 0 and (tiles // p) & (tiles // p - 1) == 0:
            return p
    return 1


# ---- the dequantizing gather ---------------------------------------------------------------------
@triton.jit
def _gather_rows(loc_ptr, loc_stride, n_loc, num_slots, ROWS: tl.constexpr):
    """``(i, slot, ok, out_ok)``: call rows, their slots (0 where not valid), whether a slot is read
    (in ``[0, num_slots)``) and whether the row is stored (inside the call)."""
    i, src, slot = _rows_of_program(loc_ptr, loc_stride, n_loc, ROWS)
    ok = (slot >= 0) & (slot < num_slots)
    return i, tl.where(ok, slot, 0), ok, i < n_loc


@triton.jit
def _dequant_per_tensor_kernel(
    kv_ptr, loc_ptr, nope_out_ptr, rope_out_ptr, scale_ptr,
    kv_row_stride, loc_stride, num_slots, n_loc, nope_out_stride, rope_out_stride,
    NOPE: tl.constexpr, NOPE_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr, ROWS: tl.constexpr,
    DST: tl.constexpr, NATIVE: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER: tl.constexpr,
    SKIP_INVALID: tl.constexpr = False,
):  # fmt: skip
    # Output rows at their own strides; SKIP_INVALID: a row whose slot is not read is not stored either.
    pdl_open(USE_PDL, TRIGGER)
    i, slot, ok, out_ok = _gather_rows(loc_ptr, loc_stride, n_loc, num_slots, ROWS)
    if SKIP_INVALID:
        out_ok = out_ok & ok
    src = (kv_ptr + slot * kv_row_stride)[:, None]
    s = tl.load(scale_ptr)
    cn = tl.arange(0, NOPE_P2)[None, :]
    mn = ok[:, None]
    if NOPE != NOPE_P2:
        mn = mn & (cn < NOPE)
    bn = tl.load(src + tl.max_contiguous(cn, [1, 8]), mask=mn, other=0)
    # Every load before the first store: the outputs may alias kv as far as the compiler knows, so a
    # load written after a store is issued after it, a second memory round trip per program.
    if ROPE > 0:
        cr = tl.arange(0, ROPE_P2)[None, :]
        mr = ok[:, None]
        if ROPE != ROPE_P2:
            mr = mr & (cr < ROPE)
        br = tl.load(src + NOPE + tl.max_contiguous(cr, [1, 8]), mask=mr, other=0)
    vn = _dst_bits(_e4m3_value(bn, NATIVE) * s, DST, NATIVE)
    _store_block(nope_out_ptr + i[:, None] * nope_out_stride + cn, cn, vn.to(nope_out_ptr.dtype.element_ty),
                 out_ok[:, None], NOPE, NOPE_P2)  # fmt: skip
    if ROPE > 0:
        vr = _dst_bits(_e4m3_value(br, NATIVE) * s, DST, NATIVE)
        _store_block(rope_out_ptr + i[:, None] * rope_out_stride + cr, cr, vr.to(rope_out_ptr.dtype.element_ty),
                     out_ok[:, None], ROPE, ROPE_P2)  # fmt: skip
    pdl_close(USE_PDL, TRIGGER)


@triton.jit
def _dequant_ds_mla_kernel(
    kv_ptr, loc_ptr, nope_out_ptr, rope_out_ptr,
    kv_row_stride, loc_stride, num_slots, n_loc, nope_out_stride, rope_out_stride,
    TILES: tl.constexpr, TILES_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr, ROWS: tl.constexpr,
    DST: tl.constexpr, NATIVE: tl.constexpr, ALIGN4: tl.constexpr, USE_PDL: tl.constexpr,
    TRIGGER: tl.constexpr, SKIP_INVALID: tl.constexpr = False,
):  # fmt: skip
    NOPE: tl.constexpr = TILES * 128
    pdl_open(USE_PDL, TRIGGER)
    i, slot, ok, out_ok = _gather_rows(loc_ptr, loc_stride, n_loc, num_slots, ROWS)
    if SKIP_INVALID:
        out_ok = out_ok & ok
    src = kv_ptr + slot * kv_row_stride  # [ROWS]
    t = tl.arange(0, TILES_P2)
    ok_t = ok[:, None] & (t[None, :] < TILES)
    if ALIGN4:
        scale = tl.load((src + NOPE).to(tl.pointer_type(tl.float32))[:, None] + t[None, :], mask=ok_t, other=0.0)
    else:
        kb = tl.arange(0, 4)[None, None, :]
        sb = tl.load(src[:, None, None] + NOPE + t[None, :, None] * 4 + kb, mask=ok_t[:, :, None], other=0)
        scale = tl.sum(sb.to(tl.int32) << (8 * kb), axis=2).to(tl.float32, bitcast=True)
    offs = t[None, :, None] * 128 + tl.arange(0, 128)[None, None, :]
    mq = ok_t[:, :, None]  # the tile mask folds away when TILES is a power of two
    b = tl.load(src[:, None, None] + tl.max_contiguous(offs, [1, 1, 8]), mask=mq, other=0)
    # The rope is loaded before the first store (as in the per_tensor gather): a load written after a
    # store through outputs the compiler cannot tell from kv is issued after it.
    if ROPE > 0:
        cr = tl.arange(0, ROPE_P2)[None, :]
        mr = ok[:, None]
        if ROPE != ROPE_P2:
            mr = mr & (cr < ROPE)
        rsrc = src[:, None] + NOPE + 4 * TILES
        if ALIGN4:
            bf = tl.load(rsrc.to(tl.pointer_type(tl.int16)) + cr, mask=mr, other=0).to(tl.int32) & 0xFFFF
        else:
            lo = tl.load(rsrc + 2 * cr, mask=mr, other=0).to(tl.int32)
            hi = tl.load(rsrc + 2 * cr + 1, mask=mr, other=0).to(tl.int32)
            bf = lo | (hi << 8)
    out = _dst_bits(_e4m3_value(b, NATIVE) * scale[:, :, None], DST, NATIVE).to(nope_out_ptr.dtype.element_ty)
    on = out_ok[:, None, None]
    if TILES == TILES_P2:
        tl.store(nope_out_ptr + i[:, None, None] * nope_out_stride + offs, out, mask=on)
    else:
        tl.store(nope_out_ptr + i[:, None, None] * nope_out_stride + offs, out, mask=on & (offs < NOPE))
    if ROPE > 0:
        if DST == 0:
            rb = bf
        else:
            rb = _dst_bits((bf << 16).to(tl.float32, bitcast=True), DST, NATIVE)
        _store_block(rope_out_ptr + i[:, None] * rope_out_stride + cr, cr, rb.to(rope_out_ptr.dtype.element_ty),
                     out_ok[:, None], ROPE, ROPE_P2)  # fmt: skip
    pdl_close(USE_PDL, TRIGGER)


def launch_dequant_gather(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    kv_cache_format: str,
    nope_dim: int,
    rope_dim: int,
    k_scale: Optional[torch.Tensor],
    dst_dtype: torch.dtype,
    *,
    num_warps: int = 0,
    rows_per_program: int = 0,
    trigger: Optional[str] = None,
    native: Optional[bool] = None,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    skip_invalid: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather and dequantize ``kv_buffer[loc]`` into ``([n_loc, nope_dim], [n_loc, rope_dim])`` of ``dst_dtype``.

    ``kv_buffer [num_slots, (1,) >= row_bytes]`` uint8/float8_e4m3fn; ``loc [n_loc]`` int32/int64, any
    stride; ``k_scale [1]`` fp32 (per_tensor) or None. Rows whose slot is outside ``[0, num_slots)``
    come out as zeros (nothing is read for them). The keyword options are
    :func:`launch_quant_write`'s (table ``dequant_<format>``); ``out``: the two output tensors to write
    (``[n_loc, nope_dim]``, ``[n_loc, rope_dim]`` of ``dst_dtype``, any row stride, last dim
    contiguous; validated by the caller) instead of new ones; ``skip_invalid``: rows whose slot is
    outside ``[0, num_slots)`` are not written (instead of zeros).
    """
    n_loc = loc.shape[0]
    if out is not None:
        nope_out, rope_out = out
    else:
        nope_out = torch.empty((n_loc, nope_dim), dtype=dst_dtype, device=kv_buffer.device)
        rope_out = torch.empty((n_loc, rope_dim), dtype=dst_dtype, device=kv_buffer.device)
    if n_loc == 0:
        return nope_out, rope_out
    kv = _rows(kv_buffer).view(torch.uint8)
    n_bits, r_bits = nope_out.view(_DST_INT[dst_dtype]), rope_out.view(_DST_INT[dst_dtype])
    if rope_dim == 0:
        r_bits = n_bits  # never written; an empty tensor's pointer may be null
    on_gpu = kv.is_cuda
    use_pdl = on_gpu and pdl_supported(kv.device.index or 0)
    if native is None:
        native = on_gpu and native_fp8_supported(kv.device.index or 0)
    extra = {"launch_pdl": True} if use_pdl else {}
    warps, rows, place = _launch_shape(f"dequant_{kv_cache_format}", n_loc, num_warps, rows_per_program, trigger)
    common = dict(ROPE=rope_dim, ROPE_P2=_p2(rope_dim), ROWS=rows, DST=_DST_CODE[dst_dtype], NATIVE=bool(native),
                  USE_PDL=use_pdl, TRIGGER=place, num_warps=warps, **extra)  # fmt: skip
    if skip_invalid:
        common["SKIP_INVALID"] = True
    grid = (triton.cdiv(n_loc, rows),)
    strides = (n_bits.stride(0), r_bits.stride(0))
    if kv_cache_format == "per_tensor":
        _dequant_per_tensor_kernel[grid](
            kv, loc, n_bits, r_bits, k_scale, kv.stride(0), loc.stride(0), kv.shape[0], n_loc, *strides,
            NOPE=nope_dim, NOPE_P2=_p2(nope_dim), **common,
        )  # fmt: skip
    else:
        tiles = nope_dim // 128
        _dequant_ds_mla_kernel[grid](
            kv, loc, n_bits, r_bits, kv.stride(0), loc.stride(0), kv.shape[0], n_loc, *strides,
            TILES=tiles, TILES_P2=_p2(tiles), ALIGN4=_aligned4(kv), **common,
        )  # fmt: skip
    return nope_out, rope_out


# ---- the division, on its own (the tests' probe) ------------------------------------------------
@triton.jit
def _div_probe_kernel(a_ptr, b_ptr, q_ptr, n, BLOCK: tl.constexpr):
    # q[i, j] = a[i, j] / b[i] (8 per divisor) as the quantizing kernels divide: the fast sequence
    # where (a, b) is in its exact range, else div_rn; the sign of a put back on the quotient.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    s = tl.load(b_ptr + i, mask=m, other=1.0)
    j = tl.arange(0, 8)[None, :]
    a = tl.load(a_ptr + i[:, None] * 8 + j, mask=m[:, None], other=0.0)
    e = s.to(tl.int32, bitcast=True) >> 23
    r = tl.math.div_rn(tl.full([], 1.0, tl.float32), s)
    xb = a.to(tl.int32, bitcast=True)
    ab = xb & 0x7FFFFFFF
    ea = ab >> 23
    in_range = ((e >= 2) & (e <= 252))[:, None] & (
        (ab == 0) | ((ea >= tl.maximum(e - 100, 27)[:, None]) & (ab < divisor_hi(e)[:, None]))
    )
    fast = _div_fast(ab.to(tl.float32, bitcast=True), s[:, None], r[:, None])
    fast = (fast.to(tl.int32, bitcast=True) | (xb & -2147483648)).to(tl.float32, bitcast=True)
    q = tl.where(in_range, fast, tl.math.div_rn(a, s[:, None]))
    tl.store(q_ptr + i[:, None] * 8 + j, q, mask=m[:, None])


def launch_div_probe(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [n, 8] / b [n]`` (contiguous fp32) as the quantizing kernels divide (for the tests)."""
    q = torch.empty_like(a)
    n = b.shape[0]
    block = 1 << 14 if interpreting() else 256  # the interpreter: few large programs
    if n:
        _div_probe_kernel[(triton.cdiv(n, block),)](a, b, q, n, BLOCK=block)
    return q


@triton.jit
def _pow2_probe_kernel(s_ptr, p_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(p_ptr + i, pow2_reciprocal(tl.load(s_ptr + i, mask=m, other=3.0)), mask=m)


def launch_pow2_probe(s: torch.Tensor) -> torch.Tensor:
    """:func:`pow2_reciprocal` of each scale of ``s [n]`` (contiguous fp32), elementwise (for the tests)."""
    p = torch.empty_like(s)
    n = s.shape[0]
    block = 1 << 12 if interpreting() else 256
    if n:
        _pow2_probe_kernel[(triton.cdiv(n, block),)](s, p, n, BLOCK=block)
    return p
