"""Triton kernels of the DSA indexer K cache: the quantizing store and the page-table gather.

Why: they are the GPU path where the JIT CUDA kernel cannot serve (pre-Hopper GPUs, misaligned
sources, no toolchain) and they run on CPU tensors under ``TRITON_INTERPRET=1`` in CI. The format
and the arithmetic are specified in :mod:`mlakv.ops.indexer_reference` (sglang's
``x * (1 / scale)``); both kernels are bit-identical to it. The widening of bf16 sources is integer
bit arithmetic, and so is the e4m3 rounding except on sm_89+ GPUs, where the hardware's saturating
conversion gives the same bytes (``NATIVE``, as in :mod:`mlakv.kernels.triton.fp8`); so the bytes are
the same on every GPU generation and in the interpreter (whose bf16 cast flushes subnormals);
divisions are IEEE (``div_rn``) and every float constant is an explicit fp32 tensor.

Launchers take arguments that :mod:`mlakv.ops.indexer` has validated and check nothing themselves
(except the store's launch overrides). The store's launch shape (warps, keys per program) comes from
:func:`mlakv.spec.tuning.indexer_triton_launch`; the keys per program decide which program
quantizes a key, never its bytes. Offsets are 64-bit. Rows whose slot is padding (``< 0``), the skip
slot, another DCP rank's, or past the buffer are not written; the gather reads nothing for a token
without a valid page (its key and scale come out as zeros) and never writes a row at or past ``total``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlakv.spec import rules
from mlakv.spec.calls import IndexStoreCall
from mlakv.spec.tuning import indexer_triton_launch

from .common import interpreting, pdl_supported
from .pdl import WAIT, pdl_open
from .fp8 import e4m3_finite, native_fp8_supported

# The rule book's constants as compile-time constants (a compiled kernel reads only constexpr globals).
INDEX_AMAX_FLOOR = tl.constexpr(rules.INDEX_AMAX_FLOOR)
INDEX_E4M3_MAX = tl.constexpr(rules.INDEX_E4M3_MAX)

__all__ = ["INTERPRETER_STORE_ROWS", "launch_store_index_k", "launch_gather_index_k"]

# Keys per program of the store under the interpreter, unless overridden: few, so that the small
# calls of CPU tests span several programs (on a GPU the launch table decides).
INTERPRETER_STORE_ROWS = 4
GATHER_TOKENS = 64  # tokens per program of the gather (one page)


@triton.jit
def _e4m3_clipped_byte(y):
    """fp32 -> e4m3 byte (int32) as sglang's pack_fp8: fminf(y, 448) then fmaxf(., -448) (a NaN
    becomes +448), then round to nearest even."""
    y = tl.where(y != y, tl.full([], 448.0, tl.float32), y)
    y = tl.minimum(tl.maximum(y, tl.full([], -448.0, tl.float32)), tl.full([], 448.0, tl.float32))
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a_bits = u & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # normal e4m3 (|y| >= 2^-6): keep 3 mantissa bits (RNE), rebias the exponent 127 -> 7 (120 << 3)
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - 960
    # subnormal e4m3: m * 2^-9 with m = rne(|y| * 512) in 0..8 (adding 2^23 in fp32 rounds to an integer)
    tiny = tl.where(a < 0.015625, a, 0.0)
    two23 = tl.full([], 8388608.0, tl.float32)
    sub = ((tiny * tl.full([], 512.0, tl.float32) + two23) - two23).to(tl.int32)
    return tl.where(a < 0.015625, sub, normal) | sign


@triton.jit
def _store_kernel(
    pages_ptr, pages_i32_ptr, loc_ptr, src_ptr,
    n_rows, page_stride, loc_stride, src_stride, num_slots, skip_slot, dcp_world, dcp_rank,
    IS_BF16: tl.constexpr, UE8M0: tl.constexpr, HAS_DCP: tl.constexpr, ROWS: tl.constexpr, USE_PDL: tl.constexpr,
    NATIVE: tl.constexpr = False,
):  # fmt: skip
    # ROWS keys per program: key r of the call is quantized and stored at slot loc[r] (row rules above).
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    in_call = r < n_rows
    pdl_open(USE_PDL, WAIT)  # the trigger right after the wait; the next grid's wait still covers all of this grid
    raw = tl.load(loc_ptr + r * loc_stride, mask=in_call, other=-1).to(tl.int64)
    cols = tl.arange(0, 128)
    v = tl.load(src_ptr + r[:, None] * src_stride + cols[None, :], mask=in_call[:, None], other=0)
    if IS_BF16:  # widened by a shift: exact, subnormals kept
        x = (v.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = v.to(tl.float32)
    # NaN ignored (CUDA fmaxf), inf counts: an integer max over |x| bits + (2^23 - 1), where NaN's bits
    # wrap negative (int32 arithmetic wraps) and inf's stay the largest; no select per value.
    bias = 0x7FFFFF
    ab = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    amax = (tl.maximum(tl.max(ab + bias, axis=1), bias) - bias).to(tl.float32, bitcast=True)
    floor = tl.full([], INDEX_AMAX_FLOOR, tl.float32)
    scale = tl.math.div_rn(tl.maximum(amax, floor), tl.full([], INDEX_E4M3_MAX, tl.float32))
    if UE8M0:  # round up to a power of two by the bits
        sb = scale.to(tl.int32, bitcast=True)
        up = ((sb >> 23) & 0xFF) + ((sb & 0x7FFFFF) != 0).to(tl.int32)
        scale = (tl.minimum(up, 255) << 23).to(tl.float32, bitcast=True)
    inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), scale)
    y = x * inv[:, None]
    if NATIVE:  # NaN -> +448, then the hardware's saturating RNE conversion: pack_fp8's clamp and rounding
        q = e4m3_finite(tl.where(y != y, tl.full([], 448.0, tl.float32), y), True)
    else:
        q = _e4m3_clipped_byte(y)
    live = in_call & (raw >= 0) & (raw != skip_slot)
    if HAS_DCP:
        slot = raw // dcp_world
        live &= (raw - slot * dcp_world) == dcp_rank
    else:
        slot = raw
    live &= slot < num_slots
    page = slot // 64
    pos = slot - page * 64
    key = pages_ptr + page * page_stride + pos * 128
    tl.store(key[:, None] + cols[None, :], q.to(tl.uint8), mask=live[:, None])
    scale_at = pages_i32_ptr + page * (page_stride // 4) + 2048 + pos
    tl.store(scale_at, scale.to(tl.int32, bitcast=True), mask=live)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def launch_store_index_k(call: IndexStoreCall, *, num_warps: int = 0, rows_per_program: int = 0) -> None:
    """Quantize ``call.index_k [n, (1,) 128]`` (bf16/fp16) and store keys and scales at slots ``loc
    [n]`` of ``index_pages [num_pages, 8448]`` uint8 (page stride a multiple of 16 bytes;
    :class:`mlakv.spec.calls.IndexStoreCall`). One launch, grid ``(ceil(n / keys per program),)``;
    ``n == 0`` launches nothing. ``skip_slot`` -1: none.

    ``num_warps`` / ``rows_per_program`` (keys per program, a power of two) override the launch
    table (:func:`mlakv.spec.tuning.indexer_triton_launch`; the bench's sweep); 0 takes the table's
    choice (under the interpreter ``INTERPRETER_STORE_ROWS`` keys per program). The bytes stored
    are the same at every shape."""
    index_pages, loc, index_k, skip_slot, dcp_world_size, dcp_rank, scale_rule = call
    ue8m0 = scale_rule == "ue8m0"
    n = loc.shape[0]
    warps, rows = indexer_triton_launch(n)
    if interpreting():
        rows = INTERPRETER_STORE_ROWS
    rows = rows_per_program or rows
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows_per_program (keys per program) must be a power of two, got {rows}")
    if n == 0:
        return
    x = _rows(index_k)
    is_bf16 = x.dtype == torch.bfloat16
    if is_bf16:  # the kernel widens bf16 bits itself
        x = x.view(torch.int16)
    use_pdl = index_pages.is_cuda and pdl_supported(index_pages.device.index or 0)
    native = index_pages.is_cuda and native_fp8_supported(index_pages.device.index or 0)
    extra = {"launch_pdl": True} if use_pdl else {}
    _store_kernel[(triton.cdiv(n, rows),)](
        index_pages, index_pages.view(torch.int32), loc, x,
        n, index_pages.stride(0), loc.stride(0), x.stride(0), index_pages.shape[0] * 64, skip_slot,
        dcp_world_size, dcp_rank,
        IS_BF16=is_bf16, UE8M0=ue8m0, HAS_DCP=dcp_world_size > 1, ROWS=rows, USE_PDL=use_pdl, NATIVE=native,
        num_warps=num_warps or warps, **extra,
    )  # fmt: skip


@triton.jit
def _gather_kernel(
    pages_ptr, pages_i32_ptr, table_ptr, lens_ptr, k_out_ptr, s_out_ptr,
    table_stride0, table_stride1, table_width, lens_stride, num_pages, page_stride, total,
    BATCH_P2: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    # Program (b, t): tokens t * TOKENS .. of request b; its first output row is sum(seq_lens[:b]).
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1).to(tl.int64) * TOKENS
    seq_len = tl.maximum(tl.load(lens_ptr + b * lens_stride).to(tl.int64), 0)
    if t0 < seq_len:
        prev = tl.arange(0, BATCH_P2).to(tl.int64)
        before = tl.load(lens_ptr + prev * lens_stride, mask=prev < b, other=0).to(tl.int64)
        start = tl.sum(tl.maximum(before, 0), axis=0)
        j = t0 + tl.arange(0, TOKENS).to(tl.int64)
        valid = j < seq_len
        col = j // 64
        in_table = valid & (col < table_width)
        page = tl.load(table_ptr + b * table_stride0 + col * table_stride1, mask=in_table, other=-1).to(tl.int64)
        ok = in_table & (page >= 0) & (page < num_pages)
        pos = j - col * 64
        cols = tl.arange(0, 128)
        k = tl.load(pages_ptr + (page * page_stride + pos * 128)[:, None] + cols[None, :], mask=ok[:, None], other=0)
        s = tl.load(pages_i32_ptr + page * (page_stride // 4) + 2048 + pos, mask=ok, other=0)
        row = start + j
        out = valid & (row < total)
        tl.store(k_out_ptr + row[:, None] * 128 + cols[None, :], k, mask=out[:, None])
        tl.store(s_out_ptr + row, s, mask=out)


def launch_gather_index_k(
    index_pages: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, total: int, max_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather keys and scales of ``seq_lens [batch]`` requests through ``page_table [batch, max_pages]``
    into new ``(k [total, 128] float8_e4m3fn, scale [total] float32)``. One launch, grid
    ``(batch, ceil(max_seq_len / 64))``; ``total == 0`` or no tokens launches nothing."""
    device = index_pages.device
    k = torch.empty((total, 128), dtype=torch.uint8, device=device)
    s = torch.empty((total,), dtype=torch.int32, device=device)
    batch = seq_lens.shape[0]
    if total > 0 and batch > 0 and max_seq_len > 0:
        _gather_kernel[(batch, triton.cdiv(max_seq_len, GATHER_TOKENS))](
            index_pages, index_pages.view(torch.int32), page_table, seq_lens, k, s,
            page_table.stride(0), page_table.stride(1), page_table.shape[1], seq_lens.stride(0),
            index_pages.shape[0], index_pages.stride(0), total,
            BATCH_P2=triton.next_power_of_2(batch), TOKENS=GATHER_TOKENS, num_warps=4,
        )  # fmt: skip
    return k.view(torch.float8_e4m3fn), s.view(torch.float32)
