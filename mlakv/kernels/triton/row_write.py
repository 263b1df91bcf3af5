"""Triton kernels of the pool: the row write (the dispatcher's portable GPU path) and the gather.

The HiCache page transfers live in :mod:`mlakv.kernels.triton.transfer`.

Each kernel sits beside its launcher. Launchers take tensors that the dispatcher has already
validated; they do no checking of their own. Every kernel is bit-exact: it only moves elements,
and float8 tensors reach it as uint8 views; the one exception is the row write's dtype conversion
(a 16/32-bit float source into a 16/32-bit float buffer of another dtype), done in registers with
round-to-nearest-even, bit-identical to ``src.to(dtype)`` for every value but NaN (a NaN stays a NaN;
into bf16 it is 0x7FC0, where torch's own casts give 0xFFFF on the CPU and 0x7FFF on sm_80+ GPUs).
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how CI exercises them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mlakv.spec.tuning import triton_convert_launch, triton_gather_launch, triton_row_launch

from .common import as_triton_dtype, interpreting, pdl_supported
from .pdl import END, ENTRY, pdl_close, pdl_open

__all__ = ["launch_set_kv_rows", "launch_get_kv_rows", "row_kernel_block"]


def row_kernel_block(nope_dim: int, rope_dim: int) -> int:
    """The row's block: the next power of two of the row width. The write's launch table reads its size
    in bytes (``TRITON_ROW_STEPS``' bytes per warp and per program), though the write and the gather load the nope and
    rope parts as two blocks of their own powers of two."""
    return triton.next_power_of_2(nope_dim + rope_dim)


# A converting write's float codes (-1 for all three: a same-dtype call, a plain copy). bf16 values
# travel as their int16 bits and are converted by integer arithmetic: the interpreter's bf16 casts
# truncate and flush fp32 subnormals, the GPU's round to nearest even; the bit arithmetic is the
# same everywhere and matches ``Tensor.to``.
_FLOAT_CODE = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@triton.jit
def _convert(v, SRC: tl.constexpr, DST: tl.constexpr):
    """A loaded source value in the buffer's storage type (code 0: bf16 as int16 bits, 1: fp16, 2: fp32).

    Widened to fp32 exactly (bf16: its bits shifted up; fp16: a cast), then narrowed with round to
    nearest even (bf16: on the bits, a NaN becomes the quiet NaN 0x7FC0; fp16: a cast). SRC == DST: v.
    """
    if SRC == DST:
        r = v
    else:
        if SRC == 0:
            y = ((v.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            y = v.to(tl.float32)
        if DST == 0:
            u = y.to(tl.int32, bitcast=True)
            r = tl.where(y != y, 0x7FC0, ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF).to(tl.int16)
        elif DST == 1:
            r = y.to(tl.float16)
        else:
            r = y
    return r


@triton.jit
def _to_dst(v, valid, SRC: tl.constexpr, DST: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """A loaded block ``v`` in the buffer's storage type; ``valid`` masks the values that are stored.

    NATIVE_BF16 (fp16/fp32 into bf16 on the GPU): a block whose valid values hold no NaN (decided once
    per block) takes the hardware's round-to-nearest-even conversion, bit-identical to the integer one
    for every non-NaN value; a block with a NaN takes the integer one, whose NaN is 0x7FC0 (the
    hardware's is 0x7FFF). Otherwise :func:`_convert`.
    """
    if NATIVE_BF16:
        y = v.to(tl.float32)
        nan = (y != y) & valid
        if tl.max(nan.to(tl.int32)) == 0:
            r = y.to(tl.bfloat16).to(tl.int16, bitcast=True)
        else:
            r = _convert(v, SRC, DST)
    else:
        r = _convert(v, SRC, DST)
    return r


def _two_block_launch(
    kv: torch.Tensor, nope_dim: int, rope_dim: int, table: tuple[int, int, bool], num_warps: int, rows: int,
    early_trigger: Optional[bool],
) -> tuple[int, dict]:
    """``(rows per program, the launch's keywords)`` of a two-block row kernel (the write, the gather):
    the blocks' widths, ``table``'s ``(num_warps, rows, early)`` with the caller's overrides (0/None:
    the table's), and the dependent launch where the GPU has it."""
    warps, table_rows, early = table
    use_pdl = kv.is_cuda and pdl_supported(kv.device.index or 0)
    rows = rows or table_rows
    kw = dict(
        NOPE=nope_dim, ROPE=rope_dim, NOPE_P2=triton.next_power_of_2(nope_dim),
        ROPE_P2=triton.next_power_of_2(max(rope_dim, 1)), ROWS=rows, USE_PDL=use_pdl,
        EARLY_TRIGGER=early if early_trigger is None else early_trigger, num_warps=num_warps or warps,
    )  # fmt: skip
    if use_pdl:
        kw["launch_pdl"] = True
    return rows, kw


@triton.jit
def _set_kv_rows_kernel(
    kv_ptr,
    loc_ptr,
    nope_ptr,
    rope_ptr,
    kv_row_stride,
    nope_row_stride,
    rope_row_stride,
    loc_stride,
    num_slots,
    skip_index,
    dcp_world,
    dcp_rank,
    n_loc,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    NOPE_P2: tl.constexpr,
    ROPE_P2: tl.constexpr,
    ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
    SRC_NOPE: tl.constexpr = -1,
    SRC_ROPE: tl.constexpr = -1,
    DST: tl.constexpr = -1,
    NATIVE_BF16: tl.constexpr = False,
):
    # One program writes ROWS whole rows as two blocks, [ROWS, NOPE_P2] and [ROWS, ROPE_P2] (Triton lays
    # 16-byte vectors along a row, then its warps over the rest of the row and the other rows, so a
    # program of several warps stores several rows at once):
    # kv[row, :NOPE+ROPE] = [nope[i] | rope[i]],
    # row = loc[i] // dcp_world. Strides are in elements; every product is formed in int64 (slot *
    # stride may pass 2^31). PDL: the trigger carries no memory ordering (the next grid's wait covers
    # this grid's stores), so it may come at entry (EARLY_TRIGGER) or after the stores; the tuning
    # table picks per size.
    pdl_open(USE_PDL, ENTRY if EARLY_TRIGGER else END)
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    src = tl.minimum(i, n_loc - 1)  # rows past the call re-read the last row and store nothing
    slot = tl.load(loc_ptr + src * loc_stride).to(tl.int64)
    slot = tl.where(i < n_loc, slot, -1)
    # The row selection rule (the same on every path): padding, the reserved slot and other DCP
    # ranks' slots are skipped; so is a row landing past the buffer (never a write outside it).
    row = slot // dcp_world  # dcp_world == 1 is specialised by Triton: no division then
    live = ((slot >= 0) & (slot != skip_index) & ((slot - row * dcp_world) == dcp_rank) & (row < num_slots))[:, None]
    # Without DCP the source loads do not depend on loc: they are issued alongside it (one memory
    # round trip before the store, not two) and a skipped row only masks off the store. With DCP
    # most rows are other ranks': their sources are not read.
    need = live | ((tl.zeros([ROWS, 1], dtype=tl.int32) + dcp_world) == 1)
    # The nope and rope parts are separate blocks (each its own power of two), loaded and stored
    # apart: no per-element select between two loads of one padded block. A converting write
    # (SRC_* != DST) converts each source value in registers (see _to_dst).
    dst = kv_ptr + row[:, None] * kv_row_stride
    on = tl.arange(0, NOPE_P2)[None, :]
    mn = on < NOPE
    # Both loads come before either store: kv may alias a source as far as the compiler knows, so a load
    # after a store is issued only after it, a second memory round trip per program.
    a = _to_dst(tl.load(nope_ptr + src[:, None] * nope_row_stride + on, mask=mn & need), mn & need, SRC_NOPE, DST, NATIVE_BF16)
    if ROPE > 0:
        orr = tl.arange(0, ROPE_P2)[None, :]
        mr = orr < ROPE
        b = _to_dst(tl.load(rope_ptr + src[:, None] * rope_row_stride + orr, mask=mr & need), mr & need, SRC_ROPE, DST, NATIVE_BF16)
    tl.store(dst + on, a, mask=mn & live)
    if ROPE > 0:
        tl.store(dst + NOPE + orr, b, mask=mr & live)
    pdl_close(USE_PDL, ENTRY if EARLY_TRIGGER else END)


def launch_set_kv_rows(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    cache_k_nope: torch.Tensor,
    cache_k_rope: torch.Tensor,
    *,
    skip_index: int = -1,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
    num_warps: int = 0,
    rows_per_program: int = 0,
    early_trigger: Optional[bool] = None,
) -> None:
    """Launch the row kernel: ``rows_per_program`` rows per program, each row as two blocks (nope, rope).

    ``num_warps``/``rows_per_program``/``early_trigger`` override the launch table
    (:func:`mlakv.spec.tuning.triton_row_launch`, or for a converting write
    :func:`mlakv.spec.tuning.triton_convert_launch`; 0/None: its choice) — for the benchmarks' sweeps.

    Args (validated by the dispatcher; 2-D or 3-D with a middle dim of 1):
        kv_buffer: ``[num_slots, (1,) total]``, last dim contiguous.
        loc: ``[n_loc]`` int32/int64, read at its stride; rows with ``loc < 0``, ``loc ==
            skip_index`` (-1: none) or ``loc % dcp_world_size != dcp_rank`` are skipped, the others
            land at ``loc // dcp_world_size`` (and are skipped if that is ``>= num_slots``).
        cache_k_nope: ``[n_loc, (1,) nope_dim]``; cache_k_rope: ``[n_loc, (1,) rope_dim]``, rope_dim may be 0.
            Each in ``kv_buffer``'s dtype, or (16/32-bit floats) another one, converted in the kernel.
    """
    n_loc = loc.shape[0]
    nope_dim, rope_dim = cache_k_nope.shape[-1], cache_k_rope.shape[-1]
    codes = {}
    if cache_k_nope.dtype != kv_buffer.dtype or cache_k_rope.dtype != kv_buffer.dtype:  # a converting write
        codes = dict(
            SRC_NOPE=_FLOAT_CODE[cache_k_nope.dtype], SRC_ROPE=_FLOAT_CODE[cache_k_rope.dtype], DST=_FLOAT_CODE[kv_buffer.dtype]
        )
        # the hardware bf16 conversion (see the kernel): on a GPU, one source type (fp16 or fp32) for both parts
        codes["NATIVE_BF16"] = (
            kv_buffer.is_cuda and not interpreting() and kv_buffer.dtype == torch.bfloat16
            and cache_k_nope.dtype == cache_k_rope.dtype
        )  # fmt: skip
        kv, nope, rope = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t for t in (kv_buffer, cache_k_nope, cache_k_rope))
    else:
        kv, nope, rope = (as_triton_dtype(t) for t in (kv_buffer, cache_k_nope, cache_k_rope))
    if rope_dim == 0:
        rope = nope  # never read; an empty tensor's pointer may be null
    if codes:  # a converting write: its own launch rows
        table = triton_convert_launch(n_loc)
    else:
        table = triton_row_launch(n_loc, row_kernel_block(nope_dim, rope_dim) * kv.element_size())
    rows, launch = _two_block_launch(kv, nope_dim, rope_dim, table, num_warps, rows_per_program, early_trigger)
    _set_kv_rows_kernel[(triton.cdiv(n_loc, rows),)](
        kv, loc, nope, rope, kv.stride(0), nope.stride(0), rope.stride(0), loc.stride(0), kv.shape[0],
        skip_index, dcp_world_size, dcp_rank, n_loc, **codes, **launch,
    )  # fmt: skip


@triton.jit
def _get_kv_rows_kernel(
    kv_ptr,
    loc_ptr,
    nope_out_ptr,
    rope_out_ptr,
    kv_row_stride,
    loc_stride,
    num_slots,
    n_loc,
    NOPE: tl.constexpr,
    ROPE: tl.constexpr,
    NOPE_P2: tl.constexpr,
    ROPE_P2: tl.constexpr,
    ROWS: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_TRIGGER: tl.constexpr,
):
    # One program reads ROWS rows kv[loc[i]] and splits each into nope_out[i] and rope_out[i], as two
    # blocks [ROWS, NOPE_P2] and [ROWS, ROPE_P2] (the write's layout). A slot outside [0, num_slots)
    # (padding or out of range) reads nothing: its row comes out as zeros. Rows past the call (the last
    # program's tail) read loc's last entry and store nothing. PDL: every load and store comes after the
    # wait (the previous grid may write kv, or have read memory the outputs now reuse); the trigger
    # carries no memory ordering, so it may come at entry or after the stores.
    pdl_open(USE_PDL, ENTRY if EARLY_TRIGGER else END)
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    out = (i < n_loc)[:, None]
    slot = tl.load(loc_ptr + tl.minimum(i, n_loc - 1) * loc_stride).to(tl.int64)
    valid = ((slot >= 0) & (slot < num_slots))[:, None] & out
    src = kv_ptr + tl.where(valid, slot[:, None], 0) * kv_row_stride  # [ROWS, 1]; no product past the buffer
    on = tl.arange(0, NOPE_P2)[None, :]
    mn = on < NOPE
    # both loads before either store: an output may alias kv as far as the compiler knows
    a = tl.load(src + on, mask=mn & valid, other=0)
    if ROPE > 0:
        orr = tl.arange(0, ROPE_P2)[None, :]
        mr = orr < ROPE
        b = tl.load(src + NOPE + orr, mask=mr & valid, other=0)
    tl.store(nope_out_ptr + i[:, None] * NOPE + on, a, mask=mn & out)
    if ROPE > 0:
        tl.store(rope_out_ptr + i[:, None] * ROPE + orr, b, mask=mr & out)
    pdl_close(USE_PDL, ENTRY if EARLY_TRIGGER else END)


def launch_get_kv_rows(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    nope_dim: int,
    rope_dim: int,
    *,
    num_warps: int = 0,
    rows_per_program: int = 0,
    early_trigger: Optional[bool] = None,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``kv_buffer[loc]`` as ``([n_loc, nope_dim], [n_loc, rope_dim])`` (new contiguous tensors,
    or ``out``: two such tensors of ``kv_buffer``'s dtype and device, every element written).

    ``kv_buffer [num_slots, (1,) total]``, last dim contiguous; ``loc [n_loc]`` int32/int64 physical
    rows, read at its stride. Rows whose slot is outside ``[0, num_slots)`` come out as zeros (nothing is
    read for them). ``num_warps``/``rows_per_program``/``early_trigger`` override the gather's launch
    table (:func:`mlakv.spec.tuning.triton_gather_launch`; 0/None: its choice) — for the sweep.
    """
    n_loc = loc.shape[0]
    if out is None:
        nope_out = torch.empty((n_loc, nope_dim), dtype=kv_buffer.dtype, device=kv_buffer.device)
        rope_out = torch.empty((n_loc, rope_dim), dtype=kv_buffer.dtype, device=kv_buffer.device)
    else:
        nope_out, rope_out = out
        for name, t, width in (("out[0]", nope_out, nope_dim), ("out[1]", rope_out, rope_dim)):
            if t.shape != (n_loc, width) or t.dtype != kv_buffer.dtype or t.device != kv_buffer.device or not t.is_contiguous():
                raise ValueError(
                    f"{name}: expected a contiguous [{n_loc}, {width}] {kv_buffer.dtype} tensor on {kv_buffer.device}, "
                    f"got {list(t.shape)} {t.dtype} on {t.device} (contiguous: {t.is_contiguous()})"
                )
    if n_loc == 0:
        return nope_out, rope_out
    kv, n_out, r_out = (as_triton_dtype(t) for t in (kv_buffer, nope_out, rope_out))
    if rope_dim == 0:
        r_out = n_out  # never written; an empty tensor's pointer may be null
    rows, launch = _two_block_launch(
        kv, nope_dim, rope_dim, triton_gather_launch(n_loc), num_warps, rows_per_program, early_trigger
    )
    _get_kv_rows_kernel[(triton.cdiv(n_loc, rows),)](
        kv, loc, n_out, r_out, kv.stride(0), loc.stride(0), kv.shape[0], n_loc, **launch
    )  # fmt: skip
    return nope_out, rope_out
