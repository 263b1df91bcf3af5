"""Triton kernels of request-ordered paged gathers: the slot plan, and the byte gather fused with it.

vLLM's gathers (``gather_and_maybe_dequant_cache``, ``cp_gather_cache``, the fp8 upconvert, the
indexer gather) describe their output as requests laid end to end: request ``r`` owns output rows
``[min(starts[r], total), min(end_r, total))`` and its ``j``-th row reads logical position
``seq_starts[r] + j`` through its block table. A row no request owns, or whose logical block is past
the table's columns, or whose block id is outside ``[0, num_blocks)``, reads nothing. The plain-torch
version, :func:`mlakv.compat.vllm.gather_plan`'s CPU path, is the reference both kernels are tested
against (about 25 small torch kernels, more than the gather itself at 65536 rows).

- :func:`launch_token_slots` writes each output row's source row (one launch, no cache data moved)
  for the gathers that convert (the dequantizing kernels take one source row per output row).
- :func:`launch_paged_gather` is the byte gather in ONE launch: each program locates its rows'
  slots and copies their bytes straight into the output, one or two byte ranges per slot (the
  indexer cache keeps a slot's key and scale apart), in the widest word that divides every size,
  stride and address, each range as a power-of-two head and a masked tail (no lanes idle on a
  1152-byte row's 1024 + 128). A program loads every range of its rows before it stores the first:
  the output may alias the cache as far as the compiler knows, so a load written after a store
  would wait for memory a second time. Unowned rows are left as they were.

Every program finds its rows' requests by counting the request starts at or before each row, in
vectors of ``REQ_CHUNK`` starts (independent loads: one memory latency for up to that many
requests), so requests must start in non-decreasing order (the gathers check it on the CPU). All
offsets are 64-bit; a located slot is always inside the cache (block id and in-block offset are
range-checked in the kernel), so no table value can make a program read outside its buffer.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from mlakv.kernels.triton.common import pdl_supported, widest_word
from mlakv.kernels.triton.pdl import ENTRY, pdl_open
from mlakv.spec.calls import TokenSlotPlan
from mlakv.spec import tuning

__all__ = ["launch_token_slots", "launch_paged_gather", "GatherPart", "PLAN_BLOCK"]

PLAN_BLOCK = 128  # output rows per program of the slot plan (one per thread of 4 warps)
_MAX_REQ_CHUNK = 64


@triton.jit
def _locate(
    t, live, starts_ptr, seq_starts_ptr, table_ptr,
    num_reqs, total, starts_stride, seq_starts_stride, table_stride0, table_stride1, table_cols,
    block_size, num_blocks,
    TERMINAL: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr, REQ_CHUNK: tl.constexpr,
):  # fmt: skip
    # Output rows t [R] -> (block, offset, ok) [R]: the cache block and in-block offset row t reads.
    # The request: (number of clamped starts <= t) - 1, i.e. the last request starting at or before t.
    cnt = tl.zeros(t.shape, tl.int32)
    for c in range(0, num_reqs, REQ_CHUNK):
        j = c + tl.arange(0, REQ_CHUNK)
        s = tl.load(starts_ptr + j.to(tl.int64) * starts_stride, mask=j < num_reqs, other=0).to(tl.int64)
        s = tl.where(j < num_reqs, tl.minimum(s, total), total + 1)
        cnt += tl.sum((s[None, :] <= t[:, None]).to(tl.int32), axis=1)
    req = cnt.to(tl.int64) - 1
    has = live & (req >= 0)
    rq = tl.where(has, req, 0)
    begin = tl.minimum(tl.load(starts_ptr + rq * starts_stride, mask=has, other=0).to(tl.int64), total)
    nxt = rq + 1
    if TERMINAL:
        end = tl.load(starts_ptr + nxt * starts_stride, mask=has, other=0).to(tl.int64)
    else:
        end = tl.load(starts_ptr + nxt * starts_stride, mask=has & (nxt < num_reqs), other=total).to(tl.int64)
        end = tl.where(nxt < num_reqs, end, total)
    end = tl.minimum(end, total)
    pos = t - begin
    if HAS_SEQ_STARTS:
        pos += tl.load(seq_starts_ptr + rq * seq_starts_stride, mask=has, other=0).to(tl.int64)
    ok = has & (t < end) & (pos >= 0)
    p = tl.where(ok, pos, 0)
    logical = p // block_size
    ok = ok & (logical < table_cols)
    block = tl.load(table_ptr + rq * table_stride0 + tl.where(ok, logical, 0) * table_stride1, mask=ok, other=-1)
    block = block.to(tl.int64)
    ok = ok & (block >= 0) & (block < num_blocks)
    return tl.where(ok, block, 0), tl.where(ok, p - logical * block_size, 0), ok


@triton.jit
def _token_slots_kernel(
    starts_ptr, seq_starts_ptr, table_ptr, slot_ptr,
    num_reqs, total, starts_stride, seq_starts_stride, table_stride0, table_stride1, table_cols,
    block_size, num_blocks, rows_per_block,
    TERMINAL: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr, REQ_CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # PDL: the gather that reads these rows may launch at once; its wait covers this grid's stores.
    pdl_open(USE_PDL, ENTRY)
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = t < total
    block, off, ok = _locate(
        t, live, starts_ptr, seq_starts_ptr, table_ptr, num_reqs, total, starts_stride, seq_starts_stride,
        table_stride0, table_stride1, table_cols, block_size, num_blocks, TERMINAL, HAS_SEQ_STARTS, REQ_CHUNK,
    )  # fmt: skip
    tl.store(slot_ptr + t, tl.where(ok, block * rows_per_block + off, -1), mask=live)


def _pdl(dev: torch.device) -> tuple[bool, dict]:
    """Whether a launch on ``dev`` uses programmatic dependent launch, and the launch keyword for it."""
    use = dev.type == "cuda" and pdl_supported(dev.index or 0)
    return use, ({"launch_pdl": True} if use else {})


def _req_chunk(num_reqs: int) -> int:
    # at least 4: Triton 3.6 fails to compile the count over a [ROWS, 1] tile (RemoveLayoutConversions)
    return min(max(triton.next_power_of_2(max(num_reqs, 1)), 4), _MAX_REQ_CHUNK)


def _plan_args(plan: TokenSlotPlan) -> tuple[list, dict]:
    """The plan's kernel arguments (positional after the output pointers) and its constexprs."""
    block_table, starts, num_reqs, total, block_size, num_blocks, seq_starts, terminal = plan[:8]
    ss = seq_starts if seq_starts is not None else starts
    args = [
        num_reqs, total, starts.stride(0), ss.stride(0), block_table.stride(0), block_table.stride(1),
        block_table.shape[1], block_size, num_blocks,
    ]  # fmt: skip
    consts = dict(TERMINAL=terminal, HAS_SEQ_STARTS=seq_starts is not None, REQ_CHUNK=_req_chunk(num_reqs))
    return [starts, ss, block_table], args, consts


def launch_token_slots(plan: TokenSlotPlan, rows_per_block: Optional[int] = None) -> torch.Tensor:
    """``[total]`` int64 source rows (-1: the row is not read) on ``block_table``'s device, one launch.

    ``plan`` (validated by the caller): ``block_table [num_reqs, max_blocks]`` int32/int64, any strides;
    ``starts``: ``[num_reqs + 1]`` (``terminal``, a ``cu_seq_lens``) or ``[num_reqs]`` int32/int64,
    non-decreasing; ``seq_starts [num_reqs]`` int32/int64 or None. A located row is ``block *
    rows_per_block + offset`` (None: ``block_size``, i.e. vLLM's slot; a padded block layout passes
    its rows per block and gets rows of the cache's row view). See the module docstring.
    """
    slot = torch.empty(plan.total, dtype=torch.int64, device=plan.block_table.device)
    if plan.total == 0:
        return slot
    ptrs, args, consts = _plan_args(plan)
    rpb = plan.block_size if rows_per_block is None else rows_per_block
    use_pdl, extra = _pdl(slot.device)
    _token_slots_kernel[(triton.cdiv(plan.total, PLAN_BLOCK),)](
        ptrs[0], ptrs[1], ptrs[2], slot, *args, rpb, **consts, BLOCK=PLAN_BLOCK, USE_PDL=use_pdl, num_warps=4, **extra,
    )  # fmt: skip
    return slot


# ---- the fused byte gather --------------------------------------------------------------------


class GatherPart(NamedTuple):
    """One byte range a gathered slot contributes to its output row (all sizes in bytes).

    Slot ``(block, offset)`` of ``src`` starts at ``base + block * block_stride + offset * slot_stride``;
    its ``unit`` bytes go to byte ``row * row_stride`` of ``dst``. ``src``/``dst`` are byte views
    (uint8, contiguous, any length) that hold every such range.
    """

    src: torch.Tensor
    dst: torch.Tensor
    base: int
    block_stride: int
    slot_stride: int
    unit: int
    row_stride: int


@triton.jit
def _part_offsets(block, off, t, base, block_stride, slot_stride, row_stride, ALIGN: tl.constexpr):
    # The first word of each row's part: in the cache (slot (block, off)) and in the output (row t).
    s_off = tl.multiple_of(base + block * block_stride + off * slot_stride, ALIGN)
    d_off = tl.multiple_of(t * row_stride, ALIGN)
    return s_off, d_off


@triton.jit
def _head(ptr, first, ok, HEAD: tl.constexpr):
    # Pointers [R, HEAD] to a part's head (HEAD words, a power of two, within the part) from each
    # row's first word, and their mask (the rows with ok; unmasked along the row).
    return ptr + first[:, None] + tl.arange(0, HEAD)[None, :], ok[:, None]


@triton.jit
def _tail(ptr, first, ok, UNIT: tl.constexpr, HEAD: tl.constexpr, TAIL_P2: tl.constexpr):
    # Pointers [R, TAIL_P2] to a part's remaining UNIT - HEAD words, and their mask (words past UNIT off).
    r = HEAD + tl.arange(0, TAIL_P2)
    return ptr + first[:, None] + r[None, :], ok[:, None] & (r < UNIT)[None, :]


@triton.jit
def _load_part(src_ptr, s_off, ok, UNIT: tl.constexpr, HEAD: tl.constexpr, TAIL_P2: tl.constexpr):
    # The UNIT words of each row's part (rows with ok), as (head, tail). Without a tail (TAIL_P2 == 0)
    # the head stands in for it: _store_part stores no tail then.
    p, m = _head(src_ptr, s_off, ok, HEAD)
    head = tl.load(p, mask=m)
    tail = head
    if TAIL_P2 > 0:
        p, m = _tail(src_ptr, s_off, ok, UNIT, HEAD, TAIL_P2)
        tail = tl.load(p, mask=m)
    return head, tail


@triton.jit
def _store_part(dst_ptr, d_off, ok, head, tail, UNIT: tl.constexpr, HEAD: tl.constexpr, TAIL_P2: tl.constexpr):
    # What _load_part loaded, into the output rows with ok.
    p, m = _head(dst_ptr, d_off, ok, HEAD)
    tl.store(p, head, mask=m)
    if TAIL_P2 > 0:
        p, m = _tail(dst_ptr, d_off, ok, UNIT, HEAD, TAIL_P2)
        tl.store(p, tail, mask=m)


@triton.jit
def _paged_gather_kernel(
    starts_ptr, seq_starts_ptr, table_ptr,
    a_src, a_dst, b_src, b_dst,
    num_reqs, total, starts_stride, seq_starts_stride, table_stride0, table_stride1, table_cols,
    block_size, num_blocks,
    a_base, a_block_stride, a_slot_stride, a_row_stride,
    b_base, b_block_stride, b_slot_stride, b_row_stride,
    TERMINAL: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr, REQ_CHUNK: tl.constexpr, ROWS: tl.constexpr,
    A_UNIT: tl.constexpr, A_HEAD: tl.constexpr, A_TAIL_P2: tl.constexpr, A_ALIGN: tl.constexpr,
    B_UNIT: tl.constexpr, B_HEAD: tl.constexpr, B_TAIL_P2: tl.constexpr, B_ALIGN: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    # ROWS output rows per program: locate each row's slot, then copy part A (and part B when
    # B_UNIT > 0) of it. Strides are in each part's words.
    pdl_open(USE_PDL, ENTRY)
    t = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = t < total
    block, off, ok = _locate(
        t, live, starts_ptr, seq_starts_ptr, table_ptr, num_reqs, total, starts_stride, seq_starts_stride,
        table_stride0, table_stride1, table_cols, block_size, num_blocks, TERMINAL, HAS_SEQ_STARTS, REQ_CHUNK,
    )  # fmt: skip
    # Every load (both parts, head and tail) before the first store (see the module docstring).
    a_s, a_d = _part_offsets(block, off, t, a_base, a_block_stride, a_slot_stride, a_row_stride, A_ALIGN)
    a_head, a_tail = _load_part(a_src, a_s, ok, A_UNIT, A_HEAD, A_TAIL_P2)
    if B_UNIT > 0:
        b_s, b_d = _part_offsets(block, off, t, b_base, b_block_stride, b_slot_stride, b_row_stride, B_ALIGN)
        b_head, b_tail = _load_part(b_src, b_s, ok, B_UNIT, B_HEAD, B_TAIL_P2)
    _store_part(a_dst, a_d, ok, a_head, a_tail, A_UNIT, A_HEAD, A_TAIL_P2)
    if B_UNIT > 0:
        _store_part(b_dst, b_d, ok, b_head, b_tail, B_UNIT, B_HEAD, B_TAIL_P2)


def _words(part: GatherPart) -> tuple[list, list, dict]:
    """A part as word views, its strides in words and its constexprs (``X_`` for the caller's prefix)."""
    w, word = widest_word(
        part.unit, part.base, part.block_stride, part.slot_stride, part.row_stride,
        part.src.data_ptr(), part.dst.data_ptr(),
    )  # fmt: skip
    views = [_word_view(part.src, word), _word_view(part.dst, word)]
    unit = part.unit // w
    head = 1 << (unit.bit_length() - 1)
    rest = unit - head
    align = 16 // w
    while align > 1 and any((q // w) % align for q in (part.unit, part.base, part.block_stride, part.slot_stride,
                                                        part.row_stride)):  # fmt: skip
        align //= 2
    strides = [part.base // w, part.block_stride // w, part.slot_stride // w, part.row_stride // w]
    consts = dict(UNIT=unit, HEAD=head, TAIL_P2=triton.next_power_of_2(rest) if rest else 0, ALIGN=align)
    return views, strides, consts


def _word_view(buf: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """``buf`` (contiguous bytes) as whole words of ``word`` from its first byte (a trailing partial word dropped)."""
    b = buf.view(torch.uint8).reshape(-1)
    size = torch.empty((), dtype=word).element_size()
    return b[: b.numel() // size * size].view(word)


def launch_paged_gather(
    plan: TokenSlotPlan,
    part_a: GatherPart,
    part_b: Optional[GatherPart] = None,
    *,
    rows_per_program: int = 0,
    num_warps: int = 0,
) -> None:
    """For every output row ``t < plan.total`` that a request owns: copy the parts of its slot into
    row ``t`` of each part's ``dst`` (one launch); unowned rows are not written.

    ``plan`` as :func:`launch_token_slots`; ``part_a``, ``part_b`` (optional, e.g. the indexer
    scale next to its key): :class:`GatherPart` byte ranges, validated by the caller (every located
    slot's range inside ``src``, every row's inside ``dst``). ``rows_per_program``/``num_warps``:
    0 takes the launch table's row (:func:`mlakv.spec.tuning.paged_gather_launch`), else forces it.
    """
    total = plan.total
    if total == 0 or plan.num_reqs == 0 or plan.block_table.shape[1] == 0:
        return
    ptrs, args, consts = _plan_args(plan)
    a_views, a_strides, a_consts = _words(part_a)
    if part_b is not None:
        b_views, b_strides, b_consts = _words(part_b)
    else:
        b_views, b_strides, b_consts = a_views, [0, 0, 0, 0], dict(UNIT=0, HEAD=1, TAIL_P2=0, ALIGN=1)
    rows, warps = tuning.paged_gather_launch(total, part_a.unit + (part_b.unit if part_b is not None else 0))
    rows, warps = rows_per_program or rows, num_warps or warps
    use_pdl, extra = _pdl(plan.block_table.device)
    consts.update({f"A_{k}": v for k, v in a_consts.items()}, **{f"B_{k}": v for k, v in b_consts.items()})
    key = (rows, warps, tuple(sorted(consts.items())))
    if key in _UNCOMPILABLE:
        rows = 1
    try:
        _paged_gather_kernel[(triton.cdiv(total, rows),)](
            *ptrs, *a_views, *b_views, *args, *a_strides, *b_strides,
            **consts, ROWS=rows, USE_PDL=use_pdl, num_warps=warps, **extra,
        )  # fmt: skip
    except RuntimeError:
        # Triton 3.6 fails to compile some small tiles for sm_90 (a [32, 4] int64 tile of 32-byte rows:
        # "PassManager::run failed" in RemoveLayoutConversions). The compile fails before anything
        # launches, so the call is redone with one row per program, the shape every unit compiles in.
        if rows == 1:
            raise
        _UNCOMPILABLE.add(key)
        _paged_gather_kernel[(total,)](
            *ptrs, *a_views, *b_views, *args, *a_strides, *b_strides,
            **consts, ROWS=1, USE_PDL=use_pdl, num_warps=warps, **extra,
        )  # fmt: skip


#: Launch shapes (rows, warps, constexprs) Triton could not compile here: they take one row per program.
_UNCOMPILABLE: set = set()
