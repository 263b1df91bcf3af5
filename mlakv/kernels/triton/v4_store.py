"""Triton kernels of the DeepSeek-V4 family's paged caches: the quantizing store (optionally rotating
the RoPE tail first) and the dequantizing gather, each beside its launcher.

They are the GPU path where the JIT CUDA kernel cannot serve (pre-Hopper GPUs, misaligned pages or
tokens) and run on CPU tensors under ``TRITON_INTERPRET=1`` in CI. The formats are specified, and
their plain-torch reference written, in :mod:`mlakv.ops.v4_reference`; these kernels are bit-exact
with it. Every rounding is integer bit arithmetic or an IEEE operation (``div_rn``), never a Triton
float8 or bf16 cast, so the result is the same on every GPU generation and in the interpreter; the
launch turns off fused multiply-add (``enable_fp_fusion=False``), which the RoPE rotation's
separately rounded products need.

Where compiled code and the interpreter disagree, the kernels use neither side's rule: signs are set
by XOR / OR on the bits (a compiled ``-x`` may be ``0 - x``: ``+0``, not ``-0``, for a zero), NaN is
detected on the bits (no float ``max``/``min``, whose NaN rule is the operand's on the GPU and NaN's
in numpy), 16-bit inputs are widened by their bits (the hardware fp16 -> fp32 conversion may return
a canonical NaN, losing a negative NaN's sign), and no result depends on how fp32 denormals are
treated (the GPU code is built without flush-to-zero; ``tests/test_v4_store.py`` checks the PTX).

A token's 512 values are handled as two ``[256]`` vectors, the even and the odd elements (the RoPE
pairs, and the two nibbles or bytes of each output pair); a tile of ``T`` values is ``T / 2``
consecutive pairs. Layout codes (``encoding``): 0 ``v4``, 1 ``v41``, 2 ``v41_fp4``; the interleaved
layouts pass their geometry (``data_stride``, ``scale_base``, ``scale_stride``) with their twin's code.

Launchers take arguments the ops layer (:mod:`mlakv.ops.v4`) has validated and do no checking of
their own. Row selection is the library's: ``loc`` read at its stride; ``loc < 0``, ``loc ==
skip_index`` and other DCP ranks' slots skipped; a kept token lands at slot ``loc // dcp_world``;
a slot past the pages (or, with a position table, a position outside it) is skipped, never written.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mlakv.spec.calls import V4StoreCall
from mlakv.spec.tuning import v4_triton_launch

from .common import pdl_supported

__all__ = ["ENCODINGS", "launch_v4_store", "launch_v4_gather"]

ENCODINGS = {"v4": 0, "v41": 1, "v41_fp4": 2}


# ---- roundings (integer bit arithmetic; the same on every GPU and in the interpreter) ----------


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


@triton.jit
def _ue8m0_codes(x, ab, amax, FLOOR: tl.constexpr):
    """e4m3 bytes of ``x [T, K]`` (fp32; ``ab`` its |bits|) under one ue8m0 scale per row of
    ``amax [T]`` (the rows' max |bits|), and the scale bytes ``[T]``. A row holding a NaN: scale 0xFF,
    values 0x7F (0xFF for a negative NaN); holding +-inf (no NaN): scale 0xFF, infinities 0xFF,
    finite values +-0."""
    exponent = (amax >> 23) - 8 + ((amax & 0x7FFFFF) > 0x600000).to(tl.int32)
    exponent = tl.maximum(exponent, FLOOR)
    inv = ((254 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(127 - E), exact
    q = x * inv[:, None]  # exact
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    finite_row = (amax < 0x7F800000)[:, None]
    mag = _e4m3_byte(tl.where(finite_row, q.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0))
    finite_code = mag | sign
    nan_row = (amax > 0x7F800000)[:, None]
    inf_row = (amax == 0x7F800000)[:, None]
    is_nan = ab > 0x7F800000
    is_inf = ab == 0x7F800000
    code = tl.where(nan_row, tl.where(is_nan, 0x7F | sign, 0x7F), finite_code)
    code = tl.where(inf_row, tl.where(is_inf, 0xFF, sign), code)
    scale = tl.where(amax >= 0x7F800000, 0xFF, exponent)
    return code, scale


@triton.jit
def _e2m1_codes(x, ab, t0, t1, t2, t3, t4, t5, t6, nan_row):
    """e2m1 codes of ``x [T, K]`` (fp32, |bits| ``ab``) against the row's thresholds ``t_j = m_j *
    scale`` (``m = .25 .75 1.25 1.75 2.5 3.5 5``, exact): the nearest even code of ``x / scale``, as
    the IEEE quotient gives it for 16-bit inputs; the sign bit 0x8 from ``x``. A NaN row: 0, or 0x8
    for a negative NaN."""
    a = ab.to(tl.float32, bitcast=True)
    code = (
        (a > t0[:, None]).to(tl.int32)
        + (a >= t1[:, None]).to(tl.int32)
        + (a > t2[:, None]).to(tl.int32)
        + (a >= t3[:, None]).to(tl.int32)
        + (a > t4[:, None]).to(tl.int32)
        + (a >= t5[:, None]).to(tl.int32)
        + (a > t6[:, None]).to(tl.int32)
    )
    sign = (x.to(tl.int32, bitcast=True) >> 28) & 0x8
    code = code | sign
    return tl.where(nan_row[:, None], tl.where(ab > 0x7F800000, sign, 0), code)


# ---- the store ---------------------------------------------------------------------------------


@triton.jit
def _v4_store_token(
    pages_ptr, loc_ptr, kv_ptr, cs_ptr, pos_ptr,
    page_stride, num_slots, loc_stride, kv_stride, cs_stride, pos_stride, max_pos,
    skip_index, dcp_world, dcp_rank, n, i,
    ENC: tl.constexpr, PAGE_SIZE: tl.constexpr, DATA_STRIDE: tl.constexpr, SCALE_BASE: tl.constexpr,
    SCALE_STRIDE: tl.constexpr, IS_BF16: tl.constexpr, ROPE: tl.constexpr,
):  # fmt: skip
    in_call = i < n
    raw = tl.load(loc_ptr + tl.minimum(i, n - 1) * loc_stride).to(tl.int64)  # n >= 1 when launched
    raw = tl.where(in_call, raw, -1)
    slot = raw // dcp_world  # dcp_world == 1 is specialised by Triton: no division then
    live = (raw >= 0) & (raw != skip_index) & ((raw - slot * dcp_world) == dcp_rank) & (slot < num_slots)
    if ROPE == 2:  # a position outside the table: the token is skipped (nothing is read past the table)
        pos = tl.load(pos_ptr + tl.minimum(i, n - 1) * pos_stride).to(tl.int64)
        live = live & (pos >= 0) & (pos < max_pos)
        pos = tl.where(live, pos, 0)
    # Without DCP the source loads do not depend on loc (issued beside it); with DCP only the kept
    # tokens' sources are read.
    need = in_call & (live | (dcp_world == 1))
    pair = tl.arange(0, 256)
    need_p = (tl.zeros([256], dtype=tl.int32) + need.to(tl.int32)) != 0
    live_p = (tl.zeros([256], dtype=tl.int32) + live.to(tl.int32)) != 0
    src = kv_ptr + i * kv_stride
    ve = tl.load(src + 2 * pair, mask=need_p, other=0)
    vo = tl.load(src + 2 * pair + 1, mask=need_p, other=0)
    xe = _f32(ve, IS_BF16)
    xo = _f32(vo, IS_BF16)
    if IS_BF16:  # the input's own bits (v4 stores bf16 rope bits as given)
        ke = ve.to(tl.int32) & 0xFFFF
        ko = vo.to(tl.int32) & 0xFFFF
    else:  # unused: fp16 rope is rounded to bf16 from its value
        ke = tl.zeros([256], dtype=tl.int32)
        ko = tl.zeros([256], dtype=tl.int32)
    if ROPE != 0:
        k = tl.maximum(pair - 224, 0)  # the 32 RoPE pairs are pairs 224..255
        is_rope = pair >= 224
        if ROPE == 1:
            m = is_rope & need_p  # freqs_cis [n, 64]: (cos_k, sin_k) interleaved
            c = tl.load(cs_ptr + i * cs_stride + 2 * k, mask=m, other=0.0)
            s = tl.load(cs_ptr + i * cs_stride + 2 * k + 1, mask=m, other=0.0)
        else:  # cos_sin_cache [max_pos, 64]: cos_0..31 | sin_0..31 at row pos (read for kept tokens only)
            m = is_rope & live_p
            c = tl.load(cs_ptr + pos * cs_stride + k, mask=m, other=0.0)
            s = tl.load(cs_ptr + pos * cs_stride + 32 + k, mask=m, other=0.0)
        re, be = _round_to_input(xe * c - xo * s, IS_BF16)  # products and sums rounded apart (no FMA)
        ro, bo = _round_to_input(xe * s + xo * c, IS_BF16)
        xe = tl.where(is_rope, re, xe)
        xo = tl.where(is_rope, ro, xo)
        ke = tl.where(is_rope, be, ke)
        ko = tl.where(is_rope, bo, ko)
    page = slot // PAGE_SIZE
    row = slot - page * PAGE_SIZE
    base = pages_ptr + page * page_stride
    data = base + row * DATA_STRIDE
    scales = base + SCALE_BASE + row * SCALE_STRIDE
    abe = xe.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    abo = xo.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if ENC == 2:  # v41_fp4: 32 tiles of 16 values = 8 pairs
        xe2 = tl.reshape(xe, [32, 8])
        xo2 = tl.reshape(xo, [32, 8])
        ae = tl.reshape(abe, [32, 8])
        ao = tl.reshape(abo, [32, 8])
        amax = tl.maximum(tl.max(ae, axis=1), tl.max(ao, axis=1))
        nan_row = amax > 0x7F800000
        amax_f = tl.where(nan_row, 0, amax).to(tl.float32, bitcast=True)
        # clamp(amax / 6, 2^-9, 448) on the quotient's bits (non-negative: ordered as integers), no
        # float max/min (whose NaN rule differs between the GPU and the interpreter)
        raw_s = tl.math.div_rn(amax_f, tl.full([32], 6.0, tl.float32)).to(tl.int32, bitcast=True)
        raw_s = tl.minimum(tl.maximum(raw_s, 0x3B000000), 0x43E00000)  # 2^-9, 448
        sb = _e4m3_byte(raw_s)
        sv = _e4m3_value(sb)
        ce = _e2m1_codes(xe2, ae, sv * 0.25, sv * 0.75, sv * 1.25, sv * 1.75, sv * 2.5, sv * 3.5, sv * 5.0, nan_row)
        co = _e2m1_codes(xo2, ao, sv * 0.25, sv * 0.75, sv * 1.25, sv * 1.75, sv * 2.5, sv * 3.5, sv * 5.0, nan_row)
        out = tl.reshape(ce | (co << 4), [256])
        tl.store(data + pair, out.to(tl.uint8), mask=live_p)
        t = tl.arange(0, 32)
        live_t = (tl.zeros([32], dtype=tl.int32) + live.to(tl.int32)) != 0
        tl.store(scales + t, tl.where(nan_row, 0x7F, sb).to(tl.uint8), mask=live_t)
    else:
        TILES: tl.constexpr = 16 if ENC == 1 else 8  # v41: 16 tiles of 32 values; v4: 8 tiles of 64
        K: tl.constexpr = 256 // TILES
        FLOOR: tl.constexpr = 114 if ENC == 1 else 105
        ae = tl.reshape(abe, [TILES, K])
        ao = tl.reshape(abo, [TILES, K])
        amax = tl.maximum(tl.max(ae, axis=1), tl.max(ao, axis=1))
        ce, sc = _ue8m0_codes(tl.reshape(xe, [TILES, K]), ae, amax, FLOOR)
        co, sc = _ue8m0_codes(tl.reshape(xo, [TILES, K]), ao, amax, FLOOR)
        out = tl.reshape(tl.join(tl.reshape(ce, [256]), tl.reshape(co, [256])), [512])
        e = tl.arange(0, 512)
        live_e = (tl.zeros([512], dtype=tl.int32) + live.to(tl.int32)) != 0
        t = tl.arange(0, TILES)
        live_t = (tl.zeros([TILES], dtype=tl.int32) + live.to(tl.int32)) != 0
        if ENC == 1:
            tl.store(data + e, out.to(tl.uint8), mask=live_e)
            tl.store(scales + t, sc.to(tl.uint8), mask=live_t)
        else:  # v4: 448 e4m3 values, then the 64 rope values as bf16 (little-endian bytes)
            tl.store(data + e, out.to(tl.uint8), mask=live_e & (e < 448))
            tl.store(scales + t, sc.to(tl.uint8), mask=live_t & (t < 7))
            if IS_BF16:
                re16, ro16 = ke, ko
            else:  # fp16 (rotated or not) -> bf16, nearest even
                re16 = _bf16_bits(xe)
                ro16 = _bf16_bits(xo)
            bits = tl.reshape(tl.join(re16, ro16), [512])  # element j's bf16 bits
            by = tl.reshape(tl.join(bits & 0xFF, (bits >> 8) & 0xFF), [1024])  # byte f = 2 j + (0 | 1)
            f = tl.arange(0, 1024)
            live_f = (tl.zeros([1024], dtype=tl.int32) + live.to(tl.int32)) != 0
            tl.store(data + (f - 448), by.to(tl.uint8), mask=live_f & (f >= 896))


@triton.jit
def _v4_store_kernel(
    pages_ptr, loc_ptr, kv_ptr, cs_ptr, pos_ptr,
    page_stride, num_slots, loc_stride, kv_stride, cs_stride, pos_stride, max_pos,
    skip_index, dcp_world, dcp_rank, n,
    ENC: tl.constexpr, PAGE_SIZE: tl.constexpr, DATA_STRIDE: tl.constexpr, SCALE_BASE: tl.constexpr,
    SCALE_STRIDE: tl.constexpr, IS_BF16: tl.constexpr, ROPE: tl.constexpr, ROWS: tl.constexpr,
    USE_PDL: tl.constexpr, EARLY_TRIGGER: tl.constexpr,
):  # fmt: skip
    # One program stores ROWS tokens; every offset is int64. PDL: the trigger carries no memory
    # ordering (the next grid's wait covers this grid's stores), so it may come at entry.
    if USE_PDL and EARLY_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    for r in tl.static_range(ROWS):
        _v4_store_token(
            pages_ptr, loc_ptr, kv_ptr, cs_ptr, pos_ptr, page_stride, num_slots, loc_stride, kv_stride, cs_stride,
            pos_stride, max_pos, skip_index, dcp_world, dcp_rank, n, tl.program_id(0).to(tl.int64) * ROWS + r,
            ENC, PAGE_SIZE, DATA_STRIDE, SCALE_BASE, SCALE_STRIDE, IS_BF16, ROPE,
        )  # fmt: skip
    if USE_PDL and not EARLY_TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()


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
            (:func:`mlakv.spec.tuning.v4_triton_launch`; the bench's sweep).
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
    warps, rows, early = v4_triton_launch(n)
    rows = rows_per_program or rows
    use_pdl = kv_pages.is_cuda and pdl_supported(kv_pages.device.index or 0)
    extra = {"launch_pdl": True} if use_pdl else {}
    _v4_store_kernel[(triton.cdiv(n, rows),)](
        kv_pages, loc, src, cs, pos,
        kv_pages.stride(0), kv_pages.shape[0] * page_size, loc.stride(0), src.stride(0), cs_stride, pos_stride, max_pos,
        skip_index, dcp_world_size, dcp_rank, n,
        ENC=encoding, PAGE_SIZE=page_size, DATA_STRIDE=data_stride, SCALE_BASE=scale_base, SCALE_STRIDE=scale_stride,
        IS_BF16=is_bf16, ROPE=rope, ROWS=rows, USE_PDL=use_pdl,
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
