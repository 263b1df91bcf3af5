"""Triton kernels of the FP8 KV cache: the fused quantizing row write and the dequantizing gather.

They are the GPU path where the JIT CUDA kernel cannot serve (pre-Hopper GPUs, odd widths or
alignments) and run on CPU tensors under ``TRITON_INTERPRET=1`` in CI. The e4m3 and bf16 roundings,
and the widening of bf16 sources to fp32, are done with integer bit arithmetic rather than Triton
casts, so the result is the same on every GPU generation and in the interpreter (whose bf16 cast
flushes subnormals), and bit-identical to :func:`mlakv.ops.fp8.quantize_mla_rows`.
Divisions are IEEE (``div_rn``); every float constant that feeds fp32 arithmetic is an explicit
fp32 tensor (a bare literal outside fp32's normal range is fp64 to some Triton versions). The formats are specified in :mod:`mlakv.ops.fp8`.

Launchers take arguments the caller (``fp8.py``) has validated and do no checking of their own.
One program handles one row; a row whose slot is negative (padding) or ``>= num_slots`` is not
written, and the gather reads nothing for an invalid slot (its row comes out as zeros).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import pdl_supported

__all__ = ["launch_quant_write", "launch_dequant_gather"]

_DST_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_DST_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@triton.jit
def _e4m3_byte(y):
    """fp32 -> e4m3 byte (int32 0..255): RNE, saturate to +-448, NaN -> 0x7F."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a_bits = u & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    safe = tl.where(a_bits > 0x7F800000, 0, a_bits)  # keep NaN from overflowing the rounding add
    # normal range: round the 23-bit mantissa to 3 bits (RNE), then rebias the exponent 127 -> 7
    normal = ((safe + 0x7FFFF + ((safe >> 20) & 1)) >> 20) - 960
    # subnormal range (|y| < 2^-6): m * 2^-9, m = rne(|y| * 512), 0..8 (8 is the smallest normal)
    # (adding 2^23 in fp32 rounds to an integer, RNE; both constants fp32 so no Triton makes it fp64)
    small = tl.where(a < 0.015625, a, 0.0)
    two_pow_23 = tl.full([], 8388608.0, tl.float32)
    sub = ((small * tl.full([], 512.0, tl.float32) + two_pow_23) - two_pow_23).to(tl.int32)
    mag = tl.where(a < 0.015625, sub, normal)
    mag = tl.where(a >= 448.0, 0x7E, mag)
    return tl.where(a_bits > 0x7F800000, 0x7F, mag | sign)


@triton.jit
def _bf16_bits(y):
    """fp32 -> bf16 bits (int32 0..65535): RNE, NaN -> 0x7FC0."""
    u = y.to(tl.int32, bitcast=True)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(y != y, 0x7FC0, r)


@triton.jit
def _src_f32(v, IS_BF16: tl.constexpr):
    """A loaded source value as fp32, exactly. bf16 sources arrive as their int16 bits and are
    widened by a shift (the interpreter's bf16 -> fp32 cast flushes fp32 subnormals to zero; the
    shift keeps them, as the GPU does); fp16 is cast (every fp16 value is a normal fp32)."""
    if IS_BF16:
        r = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        r = v.to(tl.float32)
    return r


@triton.jit
def _dst_bits(y, DST: tl.constexpr):
    """fp32 -> the destination dtype's bits (int32): 0 bf16, 1 fp16, 2 fp32; canonical NaN."""
    if DST == 0:
        r = _bf16_bits(y)
    elif DST == 1:
        h = y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        r = tl.where(y != y, 0x7E00, h)
    else:
        r = tl.where(y != y, 0x7FC00000, y.to(tl.int32, bitcast=True))
    return r


@triton.jit
def _e4m3_value(b):
    """e4m3 byte (int32 0..255) -> fp32 (exact); 0x7F/0xFF -> NaN."""
    s = (b & 0x80) << 24
    e = (b >> 3) & 15
    m = b & 7
    normal = s | ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * tl.full([], 0.001953125, tl.float32)).to(tl.int32, bitcast=True) | s  # m * 2^-9
    bits = tl.where(e == 0, sub, normal)
    bits = tl.where((b & 0x7F) == 0x7F, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _quant_per_tensor_kernel(
    kv_ptr, loc_ptr, nope_ptr, rope_ptr, scale_ptr,
    kv_row_stride, loc_stride, nope_row_stride, rope_row_stride, num_slots, skip_slot,
    NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK: tl.constexpr, SRC_IS_BF16: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # kv[loc[i], :NOPE+ROPE] = e4m3([nope[i] | rope[i]] / k_scale); all offsets in int64.
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next grid's wait still covers all of this grid
    slot = tl.load(loc_ptr + row * loc_stride).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    in_nope = offs < NOPE
    in_rope = (offs >= NOPE) & (offs < NOPE + ROPE)
    a = _src_f32(tl.load(nope_ptr + row * nope_row_stride + offs, mask=in_nope, other=0), SRC_IS_BF16)
    b = _src_f32(tl.load(rope_ptr + row * rope_row_stride + (offs - NOPE), mask=in_rope, other=0), SRC_IS_BF16)
    s = tl.load(scale_ptr)
    q = _e4m3_byte(tl.math.div_rn(tl.where(in_nope, a, b), s))
    slot_b = tl.zeros([BLOCK], dtype=tl.int64) + slot
    live = (slot_b >= 0) & (slot_b < num_slots) & (slot_b != skip_slot)
    tl.store(kv_ptr + slot * kv_row_stride + offs, q.to(tl.uint8), mask=(offs < NOPE + ROPE) & live)


@triton.jit
def _quant_ds_mla_kernel(
    kv_ptr, loc_ptr, nope_ptr, rope_ptr,
    kv_row_stride, loc_stride, nope_row_stride, rope_row_stride, num_slots, skip_slot,
    TILES: tl.constexpr, TILES_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr,
    SRC_IS_BF16: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # One row: [e4m3 nope (TILES x 128) | TILES fp32 scales | ROPE bf16]. Scale of a tile =
    # max(amax of its finite |x| / 448, FLT_MIN).
    NOPE: tl.constexpr = TILES * 128
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()  # the next grid's wait still covers all of this grid
    slot = tl.load(loc_ptr + row * loc_stride).to(tl.int64)
    t = tl.arange(0, TILES_P2)[:, None]
    offs = t * 128 + tl.arange(0, 128)[None, :]
    in_tile = (t < TILES) & (offs >= 0)
    x = _src_f32(tl.load(nope_ptr + row * nope_row_stride + offs, mask=in_tile, other=0), SRC_IS_BF16)
    ax = tl.abs(x)
    amax = tl.max(tl.where(ax < float("inf"), ax, 0.0), axis=1)  # NaN and inf excluded
    # The constants are fp32 tensors, not Python floats: some Triton versions type a bare literal
    # outside fp32's normal range (FLT_MIN written as 1.17549435e-38 is a hair below 2^-126) as
    # fp64, which makes `scale` fp64 and div_rn (fp32 only) refuse to compile.
    e4m3_max = tl.full([], 448.0, tl.float32)
    flt_min = tl.full([], 1.1754943508222875e-38, tl.float32)  # 2^-126 exactly
    scale = tl.maximum(tl.math.div_rn(amax, e4m3_max), flt_min)
    q = _e4m3_byte(tl.math.div_rn(x, scale[:, None]))
    slot_t = tl.zeros([TILES_P2, 128], dtype=tl.int64) + slot
    live_t = (slot_t >= 0) & (slot_t < num_slots) & (slot_t != skip_slot)
    dst = kv_ptr + slot * kv_row_stride
    tl.store(dst + offs, q.to(tl.uint8), mask=in_tile & live_t)
    # scales as 4 little-endian bytes each
    k = tl.arange(0, 4)[None, :]
    sbits = scale.to(tl.int32, bitcast=True)[:, None]
    slot_s = tl.zeros([TILES_P2, 4], dtype=tl.int64) + slot
    live_s = (slot_s >= 0) & (slot_s < num_slots) & (slot_s != skip_slot) & (t < TILES)
    tl.store(dst + NOPE + t * 4 + k, ((sbits >> (8 * k)) & 0xFF).to(tl.uint8), mask=live_s)
    # rope as bf16 bytes
    r = tl.arange(0, ROPE_P2)
    in_r = r < ROPE
    if SRC_IS_BF16:
        rb = tl.load(rope_ptr + row * rope_row_stride + r, mask=in_r, other=0).to(tl.int32) & 0xFFFF
    else:
        rb = _bf16_bits(tl.load(rope_ptr + row * rope_row_stride + r, mask=in_r, other=0).to(tl.float32))
    slot_r = tl.zeros([ROPE_P2], dtype=tl.int64) + slot
    live_r = (slot_r >= 0) & (slot_r < num_slots) & (slot_r != skip_slot) & in_r
    rope_dst = dst + NOPE + 4 * TILES + 2 * r
    tl.store(rope_dst, (rb & 0xFF).to(tl.uint8), mask=live_r)
    tl.store(rope_dst + 1, ((rb >> 8) & 0xFF).to(tl.uint8), mask=live_r)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def launch_quant_write(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache_format: str,
    k_scale: Optional[torch.Tensor],
    skip_slot: int = -1,
) -> None:
    """Launch the fused quantizing write: grid ``(n_loc,)``, one program per row.

    Args (validated by :func:`mlakv.ops.fp8.set_mla_kv_buffer_quant`):
        kv_buffer: ``[num_slots, (1,) >= row_bytes]`` uint8/float8_e4m3fn.
        loc: ``[n_loc]`` int32/int64, any stride. k_nope: ``[n_loc, (1,) nope_dim]``,
        k_rope: ``[n_loc, (1,) rope_dim]`` bf16/fp16. k_scale: ``[1]`` fp32 (per_tensor) or None.
        skip_slot: rows with this slot are skipped like padding (-1: none).
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
    use_pdl = kv.is_cuda and pdl_supported(kv.device.index or 0)
    extra = {"launch_pdl": True} if use_pdl else {}
    if kv_cache_format == "per_tensor":
        block = triton.next_power_of_2(nope_dim + rope_dim)
        _quant_per_tensor_kernel[(n_loc,)](
            kv, loc, nope, rope, k_scale,
            kv.stride(0), loc.stride(0), nope.stride(0), rope.stride(0), kv.shape[0], skip_slot,
            NOPE=nope_dim, ROPE=rope_dim, BLOCK=block, SRC_IS_BF16=src_is_bf16, USE_PDL=use_pdl,
            num_warps=max(1, min(8, block // 256)), **extra,
        )  # fmt: skip
        return
    tiles = nope_dim // 128
    _quant_ds_mla_kernel[(n_loc,)](
        kv, loc, nope, rope,
        kv.stride(0), loc.stride(0), nope.stride(0), rope.stride(0), kv.shape[0], skip_slot,
        TILES=tiles, TILES_P2=triton.next_power_of_2(tiles), ROPE=rope_dim,
        ROPE_P2=triton.next_power_of_2(max(1, rope_dim)), SRC_IS_BF16=src_is_bf16, USE_PDL=use_pdl,
        num_warps=max(1, min(8, tiles)), **extra,
    )  # fmt: skip


@triton.jit
def _dequant_per_tensor_kernel(
    kv_ptr, loc_ptr, nope_out_ptr, rope_out_ptr, scale_ptr,
    kv_row_stride, loc_stride, num_slots,
    NOPE: tl.constexpr, ROPE: tl.constexpr, BLOCK: tl.constexpr, DST: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + row * loc_stride).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    slot_b = tl.zeros([BLOCK], dtype=tl.int64) + slot
    valid = (slot_b >= 0) & (slot_b < num_slots)
    b = tl.load(kv_ptr + slot * kv_row_stride + offs, mask=(offs < NOPE + ROPE) & valid, other=0).to(tl.int32)
    out = _dst_bits(_e4m3_value(b) * tl.load(scale_ptr), DST).to(nope_out_ptr.dtype.element_ty)
    tl.store(nope_out_ptr + row * NOPE + offs, out, mask=offs < NOPE)
    tl.store(rope_out_ptr + row * ROPE + (offs - NOPE), out, mask=(offs >= NOPE) & (offs < NOPE + ROPE))


@triton.jit
def _dequant_ds_mla_kernel(
    kv_ptr, loc_ptr, nope_out_ptr, rope_out_ptr,
    kv_row_stride, loc_stride, num_slots,
    TILES: tl.constexpr, TILES_P2: tl.constexpr, ROPE: tl.constexpr, ROPE_P2: tl.constexpr, DST: tl.constexpr,
):  # fmt: skip
    NOPE: tl.constexpr = TILES * 128
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(loc_ptr + row * loc_stride).to(tl.int64)
    src = kv_ptr + slot * kv_row_stride
    t = tl.arange(0, TILES_P2)[:, None]
    offs = t * 128 + tl.arange(0, 128)[None, :]
    slot_t = tl.zeros([TILES_P2, 128], dtype=tl.int64) + slot
    ok_t = (slot_t >= 0) & (slot_t < num_slots) & (t < TILES)
    b = tl.load(src + offs, mask=ok_t, other=0).to(tl.int32)
    k = tl.arange(0, 4)[None, :]
    slot_s = tl.zeros([TILES_P2, 4], dtype=tl.int64) + slot
    ok_s = (slot_s >= 0) & (slot_s < num_slots) & (t < TILES)
    sb = tl.load(src + NOPE + t * 4 + k, mask=ok_s, other=0).to(tl.int32)
    scale = tl.sum(sb << (8 * k), axis=1).to(tl.float32, bitcast=True)
    out = _dst_bits(_e4m3_value(b) * scale[:, None], DST).to(nope_out_ptr.dtype.element_ty)
    tl.store(nope_out_ptr + row * NOPE + offs, out, mask=t < TILES)
    r = tl.arange(0, ROPE_P2)
    slot_r = tl.zeros([ROPE_P2], dtype=tl.int64) + slot
    ok_r = (slot_r >= 0) & (slot_r < num_slots) & (r < ROPE)
    lo = tl.load(src + NOPE + 4 * TILES + 2 * r, mask=ok_r, other=0).to(tl.int32)
    hi = tl.load(src + NOPE + 4 * TILES + 2 * r + 1, mask=ok_r, other=0).to(tl.int32)
    bf = lo | (hi << 8)
    if DST == 0:
        rb = bf
    else:
        rb = _dst_bits((bf << 16).to(tl.float32, bitcast=True), DST)
    tl.store(rope_out_ptr + row * ROPE + r, rb.to(rope_out_ptr.dtype.element_ty), mask=r < ROPE)


def launch_dequant_gather(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    kv_cache_format: str,
    nope_dim: int,
    rope_dim: int,
    k_scale: Optional[torch.Tensor],
    dst_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather and dequantize ``kv_buffer[loc]`` into ``([n_loc, nope_dim], [n_loc, rope_dim])`` of ``dst_dtype``.

    Rows whose slot is outside ``[0, num_slots)`` come out as zeros (nothing is read for them).
    """
    n_loc = loc.shape[0]
    nope_out = torch.empty((n_loc, nope_dim), dtype=dst_dtype, device=kv_buffer.device)
    rope_out = torch.empty((n_loc, rope_dim), dtype=dst_dtype, device=kv_buffer.device)
    if n_loc == 0:
        return nope_out, rope_out
    kv = _rows(kv_buffer).view(torch.uint8)
    n_bits, r_bits = nope_out.view(_DST_INT[dst_dtype]), rope_out.view(_DST_INT[dst_dtype])
    dst = _DST_CODE[dst_dtype]
    if kv_cache_format == "per_tensor":
        block = triton.next_power_of_2(nope_dim + rope_dim)
        _dequant_per_tensor_kernel[(n_loc,)](
            kv, loc, n_bits, r_bits, k_scale, kv.stride(0), loc.stride(0), kv.shape[0],
            NOPE=nope_dim, ROPE=rope_dim, BLOCK=block, DST=dst, num_warps=max(1, min(8, block // 256)),
        )  # fmt: skip
    else:
        tiles = nope_dim // 128
        _dequant_ds_mla_kernel[(n_loc,)](
            kv, loc, n_bits, r_bits, kv.stride(0), loc.stride(0), kv.shape[0],
            TILES=tiles, TILES_P2=triton.next_power_of_2(tiles), ROPE=rope_dim,
            ROPE_P2=triton.next_power_of_2(max(1, rope_dim)), DST=dst, num_warps=max(1, min(8, tiles)),
        )  # fmt: skip
    return nope_out, rope_out
