"""Triton kernel of HiCache's page transfers: token rows between device and pinned host buffers.

One launch copies ``row_bytes``-wide rows ``src[src_idx[i]] -> dst[dst_idx[i]]`` for any paged
layout on either side (pinned host memory is reached zero-copy through unified addressing), so a
backup or a per-layer load is one kernel on a side stream. Bytes are moved in the widest word that
divides every size, stride and address. Kept apart from the row write
(:mod:`mlakv.mem_cache.triton_kernels`): different callers, different launch rules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_copy_rows"]


@triton.jit
def _copy_rows_kernel(
    src_ptr,
    dst_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    src_page,
    src_page_stride,
    src_row_stride,
    dst_page,
    dst_page_stride,
    dst_row_stride,
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Row i: dst[dst_idx[i]] = src[src_idx[i]], where token slot t lives at
    # (t // page) * page_stride + (t % page) * row_stride (elements) on each side. Either side may be
    # pinned host memory (zero-copy through unified addressing).
    i = tl.program_id(0).to(tl.int64)
    s = tl.load(src_idx_ptr + i).to(tl.int64)
    d = tl.load(dst_idx_ptr + i).to(tl.int64)
    s_off = (s // src_page) * src_page_stride + (s % src_page) * src_row_stride
    d_off = (d // dst_page) * dst_page_stride + (d % dst_page) * dst_row_stride
    for start in tl.static_range(0, ROW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(src_ptr + s_off + offs, mask=offs < ROW)
        tl.store(dst_ptr + d_off + offs, x, mask=offs < ROW)


_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _word(*byte_quantities: int) -> tuple[int, torch.dtype]:
    """The widest word (8/4/2/1 bytes) dividing every quantity (sizes, strides, addresses)."""
    for w, dt in _WORD_DTYPES:
        if all(q % w == 0 for q in byte_quantities):
            return w, dt
    raise AssertionError("unreachable: 1 divides everything")


def launch_copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    row_bytes: int,
    src_layout: tuple[int, int, int],
    dst_layout: tuple[int, int, int],
) -> None:
    """Copy ``row_bytes``-wide token rows ``src[src_idx[i]] -> dst[dst_idx[i]]`` in one launch.

    Args:
        src, dst: contiguous byte-addressable buffers (device or pinned host memory).
        src_idx, dst_idx: ``[n]`` int64 token slots on the launching device.
        src_layout, dst_layout: ``(page_size, page_stride_bytes, row_stride_bytes)``: slot ``t``
            starts at byte ``(t // page_size) * page_stride + (t % page_size) * row_stride``.
    """
    n = src_idx.shape[0]
    if n == 0:
        return
    sp, sps, srs = src_layout
    dp, dps, drs = dst_layout
    w, word = _word(row_bytes, sps, srs, dps, drs, src.data_ptr(), dst.data_ptr())
    s_words, d_words = src.view(torch.uint8).view(word), dst.view(torch.uint8).view(word)
    row = row_bytes // w
    block = min(triton.next_power_of_2(row), 1024)
    _copy_rows_kernel[(n,)](
        s_words, d_words, src_idx, dst_idx,
        sp, sps // w, srs // w, dp, dps // w, drs // w,
        ROW=row, BLOCK=block, num_warps=4,
    )
