"""Triton kernel of the paged-gather plan: which cache slot each output row of a request-ordered gather reads.

vLLM's gathers (``gather_and_maybe_dequant_cache``, ``cp_gather_cache``, the fp8 upconvert, the
indexer gather) describe their output as requests laid end to end: request ``r`` owns output rows
``[min(starts[r], total), min(end_r, total))`` and its ``j``-th row reads logical position
``seq_starts[r] + j`` through its block table. mlakv's gathers take one source slot per output row;
this kernel computes those slots in one launch (the plain-torch version,
:func:`mlakv.compat.vllm.gather_plan`'s CPU path, is the reference it is tested against: about 25
small torch kernels, which at 65536 rows cost more than the gather itself). It moves no cache data.

A program handles ``BLOCK`` output rows; each finds its request by scanning the request starts
(``num_reqs`` scalar loads per program, cached), so requests must start in non-decreasing order.
A row no request owns, or whose logical block is past the table's columns, or whose block id is
outside ``[0, num_blocks)``, gets slot -1. All offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlakv.spec.calls import TokenSlotPlan

__all__ = ["launch_token_slots", "PLAN_BLOCK"]

PLAN_BLOCK = 1024  # output rows per program


@triton.jit
def _token_slots_kernel(
    starts_ptr, seq_starts_ptr, table_ptr, slot_ptr,
    num_reqs, total, starts_stride, seq_starts_stride, table_stride0, table_stride1, table_cols,
    block_size, num_blocks,
    TERMINAL: tl.constexpr, HAS_SEQ_STARTS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = t < total
    # the last request whose (clamped) start is at or before t
    req = tl.full([BLOCK], -1, tl.int64)
    for r in range(0, num_reqs):
        b = tl.minimum(tl.load(starts_ptr + r * starts_stride).to(tl.int64), total)
        req = tl.where(b <= t, r, req)
    has = req >= 0
    rq = tl.where(has, req, 0)
    begin = tl.minimum(tl.load(starts_ptr + rq * starts_stride, mask=live & has, other=0).to(tl.int64), total)
    nxt = rq + 1
    if TERMINAL:
        end = tl.load(starts_ptr + nxt * starts_stride, mask=live & has, other=0).to(tl.int64)
    else:
        end = tl.load(starts_ptr + nxt * starts_stride, mask=live & has & (nxt < num_reqs), other=total).to(tl.int64)
        end = tl.where(nxt < num_reqs, end, total)
    end = tl.minimum(end, total)
    pos = t - begin
    if HAS_SEQ_STARTS:
        pos += tl.load(seq_starts_ptr + rq * seq_starts_stride, mask=live & has, other=0).to(tl.int64)
    ok = live & has & (t < end) & (pos >= 0)
    p = tl.where(ok, pos, 0)
    logical = p // block_size
    ok = ok & (logical < table_cols)
    block = tl.load(table_ptr + rq * table_stride0 + tl.where(ok, logical, 0) * table_stride1, mask=ok, other=-1)
    block = block.to(tl.int64)
    ok = ok & (block >= 0) & (block < num_blocks)
    slot = tl.where(ok, block * block_size + (p - logical * block_size), -1)
    tl.store(slot_ptr + t, slot, mask=live)


def launch_token_slots(plan: TokenSlotPlan) -> torch.Tensor:
    """``slot [total]`` int64 (-1: the row is not read) on ``block_table``'s device, one launch.

    ``plan`` (validated by the caller): ``block_table [num_reqs, max_blocks]`` int32/int64, any strides;
    ``starts``: ``[num_reqs + 1]`` (``terminal``, a ``cu_seq_lens``) or ``[num_reqs]`` int32/int64,
    non-decreasing; ``seq_starts [num_reqs]`` int32/int64 or None. See the module docstring.
    """
    block_table, starts, num_reqs, total, block_size, num_blocks, seq_starts, terminal = plan
    slot = torch.empty(total, dtype=torch.int64, device=block_table.device)
    if total == 0:
        return slot
    ss = seq_starts if seq_starts is not None else starts
    _token_slots_kernel[(triton.cdiv(total, PLAN_BLOCK),)](
        starts, ss, block_table, slot,
        num_reqs, total, starts.stride(0), ss.stride(0), block_table.stride(0), block_table.stride(1),
        block_table.shape[1], block_size, num_blocks,
        TERMINAL=terminal, HAS_SEQ_STARTS=seq_starts is not None, BLOCK=PLAN_BLOCK, num_warps=4,
    )  # fmt: skip
    return slot
