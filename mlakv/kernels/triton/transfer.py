"""Triton kernel of HiCache's page transfers: token rows (or whole pages) between device and pinned host.

One launch copies units ``src[src_idx[i]] -> dst[dst_idx[i]]`` for any paged layout on either side
(pinned host memory is reached zero-copy through unified addressing), so a backup or a per-layer load
is one kernel on a side stream. A unit is one token row, or a whole page when both sides keep a page's
rows contiguous (then the index vectors hold page-start slots and each unit is one long contiguous
run, the cheapest shape for PCIe). Bytes move in the widest word that divides every size, stride and
address.

The grid is *persistent and bounded*: at most ``max_programs`` programs (one per SM on the GPU), each
looping over tiles of units, so a transfer occupies a known, small number of SMs while attention
keeps the rest. Each program moves a tile of up to ``TILE_WORDS`` words per iteration (all loads of
the tile are issued before its stores), which keeps enough bytes in flight over PCIe with few SMs.

Kept apart from the row write (:mod:`mlakv.kernels.triton.row_write`): different callers, different
launch rules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_copy_rows", "DEFAULT_MAX_PROGRAMS"]

#: Programs (= SMs at most) a transfer uses unless told otherwise: the issue's budget of 8 SMs.
DEFAULT_MAX_PROGRAMS = 8
#: Words one program moves per loop iteration (loads issued together, then stores).
TILE_WORDS = 8192


@triton.jit
def _smid(x):
    # The SM this program runs on (PTX %smid); ``x`` only gives the result its shape.
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _copy_units_kernel(
    src_ptr,
    dst_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    smid_ptr,
    n_units,
    src_page,
    src_page_stride,
    src_row_stride,
    dst_page,
    dst_page_stride,
    dst_row_stride,
    UNIT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    RECORD_SMID: tl.constexpr,
    ALIGN: tl.constexpr,
):
    # Unit i: dst[dst_idx[i]] = src[src_idx[i]] (UNIT words, contiguous on both sides), where slot t
    # lives at (t // page) * page_stride + (t % page) * row_stride words on each side. Either side
    # may be pinned host memory. A tile is ROWS units x BLOCK words; programs stride over tiles.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if RECORD_SMID:
        one = tl.arange(0, 1)
        tl.store(smid_ptr + pid + one, _smid(one))
    n_tiles = tl.cdiv(n_units, ROWS)
    r = tl.arange(0, ROWS)
    w = tl.arange(0, BLOCK)
    for tile in range(pid, n_tiles, nprog):
        u = (tile * ROWS + r).to(tl.int64)
        live = u < n_units
        s = tl.load(src_idx_ptr + u, mask=live, other=0).to(tl.int64)
        d = tl.load(dst_idx_ptr + u, mask=live, other=0).to(tl.int64)
        s_off = (s // src_page) * src_page_stride + (s % src_page) * src_row_stride
        d_off = (d // dst_page) * dst_page_stride + (d % dst_page) * dst_row_stride
        # every offset is a multiple of ALIGN words: lets the compiler use vector loads and stores
        s_off = tl.multiple_of(s_off, ALIGN)
        d_off = tl.multiple_of(d_off, ALIGN)
        for start in tl.static_range(0, UNIT, BLOCK):
            offs = start + w
            m = live[:, None] & (offs < UNIT)[None, :]
            x = tl.load(src_ptr + s_off[:, None] + offs[None, :], mask=m)
            tl.store(dst_ptr + d_off[:, None] + offs[None, :], x, mask=m)


_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _word(*byte_quantities: int) -> tuple[int, torch.dtype]:
    """The widest word (8/4/2/1 bytes) dividing every quantity (sizes, strides, addresses)."""
    for w, dt in _WORD_DTYPES:
        if all(q % w == 0 for q in byte_quantities):
            return w, dt
    raise AssertionError("unreachable: 1 divides everything")


def tile_shape(unit_words: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)`` of a tile for units of ``unit_words`` words: ``BLOCK`` covers a unit (up to
    ``TILE_WORDS``; longer units loop), ``ROWS`` units per tile fill ``TILE_WORDS``."""
    block = min(triton.next_power_of_2(unit_words), TILE_WORDS)
    rows = max(1, TILE_WORDS // block)
    return rows, block


def launch_copy_rows(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    unit_bytes: int,
    src_layout: tuple[int, int, int],
    dst_layout: tuple[int, int, int],
    *,
    max_programs: int = DEFAULT_MAX_PROGRAMS,
    num_warps: int = 16,
    smid_out: torch.Tensor | None = None,
) -> None:
    """Copy ``unit_bytes``-wide units ``src[src_idx[i]] -> dst[dst_idx[i]]`` in one launch.

    The caller (the host pool) has validated the slot values (range, page alignment); this launcher
    only refuses index vectors it would misread (not contiguous int64 of one length).

    Args:
        src, dst: byte-addressable buffers (device or pinned host memory); the layouts address
            from their first byte.
        src_idx, dst_idx: ``[n]`` contiguous int64 slots on the launching device (for page units,
            the first slot of each page).
        unit_bytes: bytes of one unit (a row, or ``page_size`` rows when a page is contiguous).
        src_layout, dst_layout: ``(page_size, page_stride_bytes, row_stride_bytes)``: slot ``t``
            starts at byte ``(t // page_size) * page_stride + (t % page_size) * row_stride``.
        max_programs: the persistent grid's size bound (programs run on at most this many SMs).
        num_warps: warps per program.
        smid_out: optional ``[max_programs]`` int32 device tensor; when given, each program writes
            the SM id it ran on (CUDA only; the benchmark counts the SMs a transfer occupied).
    """
    n = src_idx.shape[0]
    if n == 0:
        return
    if max_programs < 1:
        raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    for name, t in (("src_idx", src_idx), ("dst_idx", dst_idx)):  # read densely: refuse what would misread
        if t.dim() != 1 or t.dtype != torch.int64 or not t.is_contiguous() or t.shape[0] != n:
            raise ValueError(f"{name} must be a contiguous [{n}] int64 vector, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    sp, sps, srs = src_layout
    dp, dps, drs = dst_layout
    w, word = _word(unit_bytes, sps, srs, dps, drs, src.data_ptr(), dst.data_ptr(), src.nbytes, dst.nbytes)
    s_words, d_words = src.view(torch.uint8).view(word), dst.view(torch.uint8).view(word)
    unit = unit_bytes // w
    rows, block = tile_shape(unit)
    grid = min(max_programs, triton.cdiv(n, rows))
    align = 16 // w  # words per 16 bytes, then halved until it divides every stride and the unit
    while align > 1 and any(q % align for q in (unit, sps // w, srs // w, dps // w, drs // w)):
        align //= 2
    record = smid_out is not None
    _copy_units_kernel[(grid,)](
        s_words, d_words, src_idx, dst_idx, smid_out if record else src_idx, n,
        sp, sps // w, srs // w, dp, dps // w, drs // w,
        UNIT=unit, BLOCK=block, ROWS=rows, RECORD_SMID=record, ALIGN=align, num_warps=num_warps,
    )
