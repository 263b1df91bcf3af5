"""Triton kernel of the fused MLA cache step: RoPE on ``k_pe``/``q_pe``, the cache-row write, the absorbed query.

The portable GPU path of :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope` (pre-Hopper GPUs, and
layouts the JIT CUDA kernel does not take), and the kernel CI runs on CPU tensors under
``TRITON_INTERPRET=1``. One launch does the work of three kernels: programs ``[0, n)`` each rotate
one token's ``k_pe`` and write its cache row; each program after them builds ``Q_ROWS`` consecutive
``(token, head)`` rows of ``q_out`` (a row per head: the query is most of the bytes at every H > 1,
so its rows are batched per program; the launch table picks ``Q_ROWS`` and the warps). The result is bit-identical to
:mod:`mlakv.ops.rope_write_reference`:

* the rotation is fp32 products and sums, each rounded (the launch passes
  ``enable_fp_fusion=False``, so no multiply-add is contracted into an FMA);
* 16-bit values travel as their int16 bits; bf16 is widened by a shift and rounded by integer
  arithmetic (the interpreter's bf16 casts truncate and flush subnormals; the bit arithmetic is the
  same on every GPU and in the interpreter); fp16 is cast (exact widening, RNE narrowing);
* divisions are correctly rounded (``div_rn``, or the FP8 write's fast quotient for a call's one scale;
  a scale that is a power of two multiplies by its exact reciprocal, :func:`mlakv.kernels.triton.fp8.pow2_reciprocal`,
  with no test of the values); under any other scale, an e4m3 query program whose scale and values all
  lie in that quotient's exact range (one test per program, on the 16-bit source bits) converts without
  a clamp or NaN select per value, any other program a row at a time through the general conversion
  (so its registers do not set the kernel's);
  e4m3 rounding is the FP8 write's (:func:`mlakv.kernels.triton.fp8.e4m3_signed`: the hardware
  conversion on sm_89+, integer arithmetic elsewhere; RNE, saturating, NaN -> 0x7F);
  ``ds_mla``'s tile scales follow the call's rule (``RULE``; the helpers are the FP8 write's,
  :func:`mlakv.kernels.triton.fp8.ds_mla_tile_scale`).

Row selection: a cache row is written only when ``loc >= 0``, ``loc != skip_index``,
``loc % dcp_world == dcp_rank`` (landing at ``loc // dcp_world``) and that row is below
``num_slots``. A token whose position lies outside ``[0, max_pos)`` reads no table row and writes
nothing (neither its cache row nor its ``q_out`` rows); the Python side raises ``IndexError`` for it
when bounds are checked. All offsets are 64-bit. The launcher takes validated arguments.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mlakv.spec.calls import RopeWriteCall

from mlakv.spec.rules import DS_MLA_SCALE_RULES
from mlakv.spec.tuning import rope_triton_launch

from .common import pdl_supported
from .pdl import pdl_close, pdl_open, trigger_code
from .fp8 import (
    divisor_hi, ds_mla_scaled, ds_mla_tile_scale, e4m3_finite, e4m3_signed, native_fp8_supported, pow2_reciprocal,
    quot_fast, quot_in_range,
)  # fmt: skip

__all__ = ["FORMAT_CODE", "launch_rope_write"]

FORMAT_CODE = {None: 0, "per_tensor": 1, "ds_mla": 2}
_SRC_CODE = {torch.bfloat16: 0, torch.float16: 1}


@triton.jit
def _widen(v, SRC: tl.constexpr):
    """int16 bits of a bf16 (SRC 0) or fp16 (SRC 1) value -> fp32, exactly."""
    if SRC == 0:
        r = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        r = v.to(tl.float16, bitcast=True).to(tl.float32)
    return r


@triton.jit
def _bf16_bits(y):
    """fp32 -> bf16 bits (int32, 0..65535): round to nearest even, NaN -> 0x7FC0."""
    u = y.to(tl.int32, bitcast=True)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    return tl.where(y != y, 0x7FC0, r)


@triton.jit
def _round_bits(y, SRC: tl.constexpr):
    """fp32 -> the bits (int32, 0..65535) of the source dtype: bf16 (SRC 0) or fp16 (SRC 1), RNE,
    NaN as the canonical quiet NaN (0x7FC0 / 0x7E00)."""
    if SRC == 0:
        r = _bf16_bits(y)
    else:
        h = y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        r = tl.where(y != y, 0x7E00, h)
    return r


@triton.jit
def _div_by_scale(x, s):
    """fp32 ``x / s`` for the e4m3 conversion, ``s`` the call's one positive scale: the fast correctly rounded
    division of the FP8 write (:func:`mlakv.kernels.triton.fp8.quot_fast`) where ``s``'s biased exponent
    is in [47, 252] (uniform over the launch), else IEEE ``div_rn``; a power-of-two ``s`` multiplies by
    its exact reciprocal (:func:`mlakv.kernels.triton.fp8.pow2_reciprocal`). Either way the e4m3 byte is the one
    of the IEEE quotient."""
    e = s.to(tl.int32, bitcast=True) >> 23
    p = pow2_reciprocal(s)
    if p != 0.0:  # a power of two: the product is the quotient
        y = x * p
    elif (e >= 47) & (e <= 252):
        y = quot_fast(x, s, tl.math.div_rn(tl.full([], 1.0, tl.float32), s), divisor_hi(e))
    else:
        y = tl.math.div_rn(x, s)
    return y


@triton.jit
def _rotate(pe_row, cs_row, HALF: tl.constexpr, HALF_P2: tl.constexpr, NEOX: tl.constexpr, SRC: tl.constexpr, ok,
            JOIN: tl.constexpr = False):
    """Rotate the rope values of rows ``pe_row`` (a pointer, or ``[R, 1]`` pointers) with table rows
    ``cs_row`` (alike): ``(a_off, b_off, ra, rb, jm)``, the pair offsets ``[1, HALF_P2]``, the rotated
    values' source-dtype bits and the mask (``[1 or R, HALF_P2]``). Pair j is (j, j + HALF) (neox) or
    (2j, 2j + 1); ``ok`` (a bool, or ``[R, 1]``) masks the loads. Interleaved pairs are loaded as one
    contiguous ``[R, 2 * HALF_P2]`` block and split in registers (two stride-2 loads made Triton lay
    the pairs out across threads and convert them through shared memory)."""
    j = tl.arange(0, HALF_P2)[None, :]
    jm = (j < HALF) & ((tl.zeros_like(j) + ok.to(tl.int32)) != 0)
    if NEOX:
        a_off = j
        b_off = j + HALF
    else:
        a_off = 2 * j
        b_off = 2 * j + 1
    if NEOX or not JOIN:
        xa = _widen(tl.load(pe_row + a_off, mask=jm, other=0), SRC)
        xb = _widen(tl.load(pe_row + b_off, mask=jm, other=0), SRC)
    else:
        k = tl.arange(0, 2 * HALF_P2)[None, :]
        km = (k < 2 * HALF) & ((tl.zeros_like(k) + ok.to(tl.int32)) != 0)
        x = _widen(tl.load(pe_row + k, mask=km, other=0), SRC)  # [1 or R, 2 * HALF_P2]
        xa, xb = tl.split(tl.reshape(x, (x.shape[0], HALF_P2, 2)))
    c = tl.load(cs_row + j, mask=jm, other=0.0)
    s = tl.load(cs_row + HALF + j, mask=jm, other=0.0)
    ra = _round_bits(xa * c - xb * s, SRC)
    rb = _round_bits(xa * s + xb * c, SRC)
    return a_off, b_off, ra, rb, jm


@triton.jit
def _store_pairs(dst, a_off, b_off, va, vb, jm, HALF_P2: tl.constexpr, NEOX: tl.constexpr, JOIN: tl.constexpr):
    """Store the rotated pairs' values ``va``, ``vb`` (``[1 or R, HALF_P2]``, one dtype) at ``dst + a_off``,
    ``dst + b_off`` under mask ``jm`` (:func:`_rotate`'s); interleaved pairs as one contiguous block
    ``[R, 2 * HALF_P2]`` (each pair side by side in one thread: one wide store, not two strided ones)."""
    if NEOX or not JOIN:
        tl.store(dst + a_off, va, mask=jm)
        tl.store(dst + b_off, vb, mask=jm)
    else:
        rows: tl.constexpr = va.shape[0]
        v = tl.reshape(tl.join(va, vb), (rows, 2 * HALF_P2))
        m = tl.reshape(tl.join(jm, jm), (rows, 2 * HALF_P2))
        tl.store(dst + tl.arange(0, 2 * HALF_P2)[None, :], v, mask=m)


@triton.jit
def _query_load(
    item, n, heads, pos_ptr, pos_stride, max_pos, cs_ptr, cs_stride, q_nope_ptr, q_pe_ptr, q_out_ptr,
    qn_s0, qn_s1, qp_s0, qp_s1, qo_s0, qo_s1,
    NOPE: tl.constexpr, NOPE_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, SRC: tl.constexpr,
    NEOX: tl.constexpr, JOIN: tl.constexpr,
):  # fmt: skip
    """The query rows ``item [R]`` (``(token, head)`` flat indices): ``(q_dst [R, 1], offs, ok_n, nb,
    a_off, b_off, ra, rb, jm)``: destination row pointers, the nope offsets ``[1, NOPE_P2]`` with
    their mask ``ok_n`` and source bits ``nb``, the rotated pairs of :func:`_rotate`. Rows at or past
    ``n * heads`` and tokens whose position is out of range are masked out (nothing read or stored)."""
    live = item < n * heads
    item = tl.where(live, item, 0)
    t = item // heads
    h = item - t * heads
    pos = tl.load(pos_ptr + t * pos_stride).to(tl.int64)
    pos_ok = ((pos >= 0) & (pos < max_pos) & live)[:, None]  # [R, 1]
    cs_row = (cs_ptr + tl.where((pos >= 0) & (pos < max_pos), pos, 0) * cs_stride)[:, None]
    pe_row = (q_pe_ptr + t * qp_s0 + h * qp_s1)[:, None]
    a_off, b_off, ra, rb, jm = _rotate(pe_row, cs_row, HALF, HALF_P2, NEOX, SRC, pos_ok, JOIN)
    offs = tl.arange(0, NOPE_P2)[None, :]
    ok_n = pos_ok & (offs < NOPE)
    nb = tl.load((q_nope_ptr + t * qn_s0 + h * qn_s1)[:, None] + offs, mask=ok_n, other=0)
    q_dst = (q_out_ptr + t * qo_s0 + h * qo_s1)[:, None]
    return q_dst, offs, ok_n, nb, a_off, b_off, ra, rb, jm


@triton.jit
def _query_rows(
    qpid, n, heads, pos_ptr, pos_stride, max_pos, cs_ptr, cs_stride, q_nope_ptr, q_pe_ptr, q_out_ptr, q_scale_ptr,
    qn_s0, qn_s1, qp_s0, qp_s1, qo_s0, qo_s1,
    NOPE: tl.constexpr, NOPE_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, SRC: tl.constexpr,
    NEOX: tl.constexpr, Q_FP8: tl.constexpr, Q_ROWS: tl.constexpr, NATIVE: tl.constexpr, Q_JOIN: tl.constexpr,
):  # fmt: skip
    """Query program ``qpid``: ``Q_ROWS`` consecutive ``(token, head)`` rows of ``q_out`` (rows past
    ``n * heads`` and tokens whose position is out of range write nothing)."""
    item = qpid * Q_ROWS + tl.arange(0, Q_ROWS)
    q_dst, offs, ok_n, nb, a_off, b_off, ra, rb, jm = _query_load(
        item, n, heads, pos_ptr, pos_stride, max_pos, cs_ptr, cs_stride, q_nope_ptr, q_pe_ptr, q_out_ptr,
        qn_s0, qn_s1, qp_s0, qp_s1, qo_s0, qo_s1, NOPE, NOPE_P2, HALF, HALF_P2, SRC, NEOX, Q_JOIN,
    )  # fmt: skip
    if Q_FP8:
        qs = tl.load(q_scale_ptr)
        e = qs.to(tl.int32, bitcast=True) >> 23
        p = pow2_reciprocal(qs)
        # |x|'s 16-bit magnitude must stay below lim: every value finite and (bf16) below the fast
        # division's end divisor_hi(e), a multiple of 2^23, so exact in 16-bit form; any finite fp16 is
        # below it (e >= 47 puts it past 2^21). Tested on the source bits, so only they stay live.
        if SRC == 0:
            lim = divisor_hi(e) >> 16
        else:
            lim = 0x7C00
        if p != 0.0:
            # A power of two (uniform): the product is the quotient for every value, so no test of
            # the values (a block max is a cross-warp reduction); inf saturates, NaN gets its byte.
            yn = _widen(nb, SRC) * p
            ya = _widen(ra.to(tl.int16), SRC) * p
            yb = _widen(rb.to(tl.int16), SRC) * p
            tl.store(q_dst + offs, e4m3_signed(yn, NATIVE), mask=ok_n)
            _store_pairs(q_dst + NOPE, a_off, b_off, e4m3_signed(ya, NATIVE), e4m3_signed(yb, NATIVE), jm, HALF_P2, NEOX, Q_JOIN)
        elif (e >= 47) & (e <= 252) & (
            tl.maximum(tl.max(nb.to(tl.int32) & 0x7FFF), tl.maximum(tl.max(ra & 0x7FFF), tl.max(rb & 0x7FFF))) < lim
        ):
            xn = _widen(nb, SRC)
            xa = _widen(ra.to(tl.int16), SRC)
            xb = _widen(rb.to(tl.int16), SRC)
            r = tl.math.div_rn(tl.full([], 1.0, tl.float32), qs)
            yn = quot_in_range(xn.to(tl.int32, bitcast=True) & 0x7FFFFFFF, xn, qs, r)
            ya = quot_in_range(xa.to(tl.int32, bitcast=True) & 0x7FFFFFFF, xa, qs, r)
            yb = quot_in_range(xb.to(tl.int32, bitcast=True) & 0x7FFFFFFF, xb, qs, r)
            tl.store(q_dst + offs, e4m3_finite(yn, NATIVE), mask=ok_n)
            _store_pairs(q_dst + NOPE, a_off, b_off, e4m3_finite(ya, NATIVE), e4m3_finite(yb, NATIVE), jm, HALF_P2, NEOX, Q_JOIN)
        else:
            # Any other program: the general conversion, one row at a time from memory (the whole
            # block's general path would set the kernel's register count for the common case too).
            for k in range(Q_ROWS):
                g_dst, g_offs, g_ok, g_nb, g_a, g_b, g_ra, g_rb, g_jm = _query_load(
                    qpid * Q_ROWS + k + tl.arange(0, 1), n, heads, pos_ptr, pos_stride, max_pos, cs_ptr, cs_stride,
                    q_nope_ptr, q_pe_ptr, q_out_ptr, qn_s0, qn_s1, qp_s0, qp_s1, qo_s0, qo_s1,
                    NOPE, NOPE_P2, HALF, HALF_P2, SRC, NEOX, False,
                )  # fmt: skip
                gn = e4m3_signed(_div_by_scale(_widen(g_nb, SRC), qs), NATIVE)
                ga = e4m3_signed(_div_by_scale(_widen(g_ra.to(tl.int16), SRC), qs), NATIVE)
                gb = e4m3_signed(_div_by_scale(_widen(g_rb.to(tl.int16), SRC), qs), NATIVE)
                tl.store(g_dst + g_offs, gn, mask=g_ok)
                _store_pairs(g_dst + NOPE, g_a, g_b, ga, gb, g_jm, HALF_P2, NEOX, False)
    else:
        tl.store(q_dst + offs, nb, mask=ok_n)
        _store_pairs(q_dst + NOPE, a_off, b_off, ra.to(tl.int16), rb.to(tl.int16), jm, HALF_P2, NEOX, Q_JOIN)


@triton.jit
def _rope_write_kernel(
    kv_ptr, loc_ptr, pos_ptr, cs_ptr, k_nope_ptr, k_pe_ptr, k_scale_ptr,
    q_nope_ptr, q_pe_ptr, q_out_ptr, q_scale_ptr,
    n, kv_stride, loc_stride, pos_stride, cs_stride, kn_stride, kp_stride,
    qn_s0, qn_s1, qp_s0, qp_s1, qo_s0, qo_s1,
    num_slots, max_pos, skip_index, dcp_world, dcp_rank,
    NOPE: tl.constexpr, NOPE_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
    TILES_P2: tl.constexpr, FORMAT: tl.constexpr, SRC: tl.constexpr, NEOX: tl.constexpr,
    Q_FP8: tl.constexpr, USE_PDL: tl.constexpr, RULE: tl.constexpr = 0, Q_ROWS: tl.constexpr = 1,
    NATIVE: tl.constexpr = False, Q_JOIN: tl.constexpr = False, TRIGGER: tl.constexpr = 1, HEADS: tl.constexpr = 1,
):  # fmt: skip
    # Strides in elements of each pointer's type (kv: int16 for 16-bit rows, bytes for FP8 formats;
    # q_out: int16 or bytes). 16-bit tensors arrive as int16 views. HEADS, the query's heads, is a
    # constant of the build (one build per head count a model runs): a query row's (token, head) is a
    # division by a constant (a shift for a power of two), not a 64-bit division by a runtime value,
    # whose out-of-line slow path the compiler keeps beside it. H200, e4m3 query (docs/benchmarks.md,
    # 2026-12-04): 65536 tokens, H=16 633 us against 713 with the runtime division; 1024 query rows 1.82
    # against 1.90.
    TILES: tl.constexpr = NOPE // 128  # ds_mla's scale tiles
    pid = tl.program_id(0).to(tl.int64)
    pdl_open(USE_PDL, TRIGGER)  # the trigger's place (TRIGGER): mlakv.kernels.triton.pdl
    if pid < n:
        # ---- the cache row of token pid ----
        t = pid
        slot = tl.load(loc_ptr + t * loc_stride).to(tl.int64)
        pos = tl.load(pos_ptr + t * pos_stride).to(tl.int64)
        pos_ok = (pos >= 0) & (pos < max_pos)
        row = slot // dcp_world
        keep = (slot >= 0) & (slot != skip_index) & (slot - row * dcp_world == dcp_rank) & (row < num_slots) & pos_ok
        cs_row = cs_ptr + tl.where(pos_ok, pos, 0) * cs_stride
        a_off, b_off, ra, rb, jm = _rotate(k_pe_ptr + t * kp_stride, cs_row, HALF, HALF_P2, NEOX, SRC, keep)
        dst = kv_ptr + tl.where(keep, row, 0) * kv_stride
        offs = tl.arange(0, NOPE_P2)[None, :]
        keep_n = ((tl.zeros_like(offs) + keep.to(tl.int32)) != 0) & (offs < NOPE)
        if FORMAT == 0:  # 16-bit row: [nope | rotated rope] as bits
            nb = tl.load(k_nope_ptr + t * kn_stride + offs, mask=keep_n, other=0)
            tl.store(dst + offs, nb, mask=keep_n)
            _store_pairs(dst + NOPE, a_off, b_off, ra.to(tl.int16), rb.to(tl.int16), jm, HALF_P2, NEOX, False)
        elif FORMAT == 1:  # per_tensor: e4m3(x / k_scale)
            ks = tl.load(k_scale_ptr)
            nb = tl.load(k_nope_ptr + t * kn_stride + offs, mask=keep_n, other=0)
            tl.store(dst + offs, e4m3_signed(_div_by_scale(_widen(nb, SRC), ks), NATIVE), mask=keep_n)
            qa = e4m3_signed(_div_by_scale(_widen(ra.to(tl.int16), SRC), ks), NATIVE)
            qb = e4m3_signed(_div_by_scale(_widen(rb.to(tl.int16), SRC), ks), NATIVE)
            _store_pairs(dst + NOPE, a_off, b_off, qa, qb, jm, HALF_P2, NEOX, False)
        else:  # ds_mla: [e4m3 nope in tiles of 128 | fp32 tile scales | bf16 rope]
            tt = tl.arange(0, TILES_P2)[:, None]
            toffs = tt * 128 + tl.arange(0, 128)[None, :]
            keep_t = ((tl.zeros([TILES_P2, 128], dtype=tl.int32) + keep.to(tl.int32)) != 0) & (tt < TILES)
            x = _widen(tl.load(k_nope_ptr + t * kn_stride + toffs, mask=keep_t, other=0), SRC)
            scale = ds_mla_tile_scale(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, RULE, 1)  # [TILES_P2]
            if RULE == 0:  # fp32_floor: x / scale
                y = tl.math.div_rn(x, scale[:, None])
            else:  # fp32, ue8m0: x * (1 / scale)
                y = ds_mla_scaled(x, tl.math.div_rn(tl.full([], 1.0, tl.float32), scale)[:, None])
            tl.store(dst + toffs, e4m3_signed(y, NATIVE), mask=keep_t)
            k4 = tl.arange(0, 4)[None, :]
            sbits = scale.to(tl.int32, bitcast=True)[:, None]
            keep_s = ((tl.zeros([TILES_P2, 4], dtype=tl.int32) + keep.to(tl.int32)) != 0) & (tt < TILES)
            tl.store(dst + NOPE + tt * 4 + k4, ((sbits >> (8 * k4)) & 0xFF).to(tl.uint8), mask=keep_s)
            if SRC == 0:
                ba = ra
                bb = rb
            else:  # the rotated fp16 value, rounded to bf16 (the ds_mla rope is bf16)
                ba = _bf16_bits(_widen(ra.to(tl.int16), SRC))
                bb = _bf16_bits(_widen(rb.to(tl.int16), SRC))
            rope_dst = dst + NOPE + 4 * TILES
            tl.store(rope_dst + 2 * a_off, (ba & 0xFF).to(tl.uint8), mask=jm)
            tl.store(rope_dst + 2 * a_off + 1, ((ba >> 8) & 0xFF).to(tl.uint8), mask=jm)
            tl.store(rope_dst + 2 * b_off, (bb & 0xFF).to(tl.uint8), mask=jm)
            tl.store(rope_dst + 2 * b_off + 1, ((bb >> 8) & 0xFF).to(tl.uint8), mask=jm)
    else:
        _query_rows(pid - n, n, HEADS, pos_ptr, pos_stride, max_pos, cs_ptr, cs_stride, q_nope_ptr, q_pe_ptr,
                    q_out_ptr, q_scale_ptr, qn_s0, qn_s1, qp_s0, qp_s1, qo_s0, qo_s1,
                    NOPE, NOPE_P2, HALF, HALF_P2, SRC, NEOX, Q_FP8, Q_ROWS, NATIVE, Q_JOIN)  # fmt: skip
    pdl_close(USE_PDL, TRIGGER)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def launch_rope_write(call: RopeWriteCall, *, num_warps: int = 0, q_rows: int = 0, trigger: Optional[str] = None) -> None:
    """Launch the fused kernel: grid ``(n + cdiv(n * H, q_rows),)`` (``(n,)`` without a query).

    ``call``'s fields (validated by :func:`mlakv.ops.rope_write.set_mla_kv_buffer_rope`):
        kv_buffer: ``[num_slots, (1,) row]``: bf16/fp16 (``kv_cache_format=None``) or
            uint8/float8_e4m3fn bytes (``"per_tensor"``, ``"ds_mla"``).
        loc: ``[n]`` int32/int64, any stride. positions: ``[n]`` int32/int64, any stride.
        k_nope: ``[n, (1,) nope_dim]``; k_pe: ``[n, (1,) rope_dim]``, bf16/fp16, rows strided.
        cos_sin_cache: ``[max_pos, rope_dim]`` float32, last dim contiguous.
        k_scale: ``[1]`` fp32 (per_tensor) or None.
        q_nope: ``[n, H, nope_dim]``, q_pe: ``[n, H, rope_dim]`` (k's dtype), q_out:
            ``[n, H, nope_dim + rope_dim]`` of that dtype or 8-bit (then ``q_scale [1]`` fp32); or None.
        skip_index: a slot skipped like padding (-1: none); dcp_world_size/dcp_rank: the owner rule.
        ds_mla_scale_rule: ds_mla's tile-scale rule (``"fp32_floor"``, ``"fp32"``, ``"ue8m0"``).

    ``num_warps``, ``q_rows`` (query rows per program) and ``trigger`` (the PDL trigger's place, one of
    :data:`mlakv.spec.tuning.TRIGGER_PLACES`) override the launch table
    (:func:`mlakv.spec.tuning.rope_triton_launch`; 0/None: its choice), for the benchmark's sweep.
    """
    (kv_buffer, loc, k_nope, k_pe, positions, cos_sin_cache, is_neox_style, kv_cache_format, k_scale,
     q_nope, q_pe, q_out, q_scale, skip_index, dcp_world_size, dcp_rank, ds_mla_scale_rule) = call  # fmt: skip
    n = loc.shape[0]
    if n == 0:
        return
    kn, kp = _rows(k_nope), _rows(k_pe)
    nope_dim, rope_dim = kn.shape[-1], kp.shape[-1]
    src = _SRC_CODE[kn.dtype]
    kv = _rows(kv_buffer)
    kv = kv.view(torch.int16) if kv_cache_format is None else kv.view(torch.uint8)
    kn, kp = kn.view(torch.int16), kp.view(torch.int16)
    heads = 0
    q_fp8 = False
    qn = qp = qo = kp  # never read without a query (the grid has no query programs)
    if q_out is not None:
        heads = q_nope.shape[1]
        qn, qp = q_nope.view(torch.int16), q_pe.view(torch.int16)
        q_fp8 = q_out.element_size() == 1
        qo = q_out.view(torch.uint8) if q_fp8 else q_out.view(torch.int16)
    dummy = cos_sin_cache  # an fp32 pointer for the scales a call does not read
    use_pdl = kv.is_cuda and pdl_supported(kv.device.index or 0)
    extra = {"launch_pdl": True} if use_pdl else {}
    if kv.is_cuda:
        extra["enable_fp_fusion"] = False  # the rotation's products and sums are rounded one by one
    tiles = nope_dim // 128
    kind = "e4m3" if q_fp8 else "ds_mla" if kv_cache_format == "ds_mla" else "bf16"
    warps, rows, place = rope_triton_launch(n * heads, kind)
    warps, rows, place = num_warps or warps, q_rows or rows, trigger_code(trigger or place)
    _rope_write_kernel[(n + triton.cdiv(n * heads, rows),)](
        kv, loc, positions, cos_sin_cache, kn, kp, k_scale if k_scale is not None else dummy,
        qn, qp, qo, q_scale if q_scale is not None else dummy,
        n, kv.stride(0), loc.stride(0), positions.stride(0), cos_sin_cache.stride(0),
        kn.stride(0), kp.stride(0), qn.stride(0), qn.stride(1) if qn.dim() == 3 else 0,
        qp.stride(0), qp.stride(1) if qp.dim() == 3 else 0, qo.stride(0), qo.stride(1) if qo.dim() == 3 else 0,
        kv.shape[0], cos_sin_cache.shape[0], skip_index, dcp_world_size, dcp_rank,
        NOPE=nope_dim, NOPE_P2=triton.next_power_of_2(nope_dim), HALF=rope_dim // 2,
        HALF_P2=triton.next_power_of_2(max(1, rope_dim // 2)), TILES_P2=triton.next_power_of_2(max(1, tiles)),
        FORMAT=FORMAT_CODE[kv_cache_format], SRC=src, NEOX=bool(is_neox_style), Q_FP8=q_fp8, USE_PDL=use_pdl,
        RULE=DS_MLA_SCALE_RULES.index(ds_mla_scale_rule) if kv_cache_format == "ds_mla" else 0,
        Q_ROWS=rows, NATIVE=kv.is_cuda and native_fp8_supported(kv.device.index or 0), Q_JOIN=rows >= warps,
        TRIGGER=place, HEADS=max(heads, 1), num_warps=warps, **extra,
    )  # fmt: skip
