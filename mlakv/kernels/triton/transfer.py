"""Triton kernel of HiCache's page transfers: token rows (or whole pages) between device and pinned host.

One launch copies units ``src[src_idx[i]] -> dst[dst_idx[i]]`` for any paged layout on either side
(pinned host memory is reached zero-copy through unified addressing), so a backup or a per-layer load
is one kernel on a side stream. A unit is one token row, or a whole page when both sides keep a page's
rows contiguous (then the index vectors hold page-start slots and each unit is one long contiguous
run, the cheapest shape for PCIe). Bytes move in the widest word that divides every size, stride and
address.

The grid is *persistent and bounded*: at most ``max_programs`` programs (one per SM on the GPU), each
looping over tiles of units, so a transfer occupies a known, small number of SMs while attention
keeps the rest. Each program moves a tile of up to ``tile_words`` words per iteration, which keeps
enough bytes in flight over PCIe with few SMs. The warps and the tile words come from
:func:`mlakv.spec.tuning.hicache_copy_launch` (by the bytes a launch moves) unless the launcher is told
otherwise (the bench's sweep); the grid's bound is the caller's.

Every load of a tile is issued before its first store: the destination may alias the source as far
as the compiler knows, so a load written after a store would be issued after it and wait for memory a
second time. A unit longer than a tile moves a tile at a time, and a remainder past its last whole
tile of at most half a tile is loaded with that tile: a 64 x 1152-byte page at the table's 8192-word
tiles (8192 + 1024 words) waits for memory once. A longer remainder moves on its own (held together,
the two would not fit in registers at the sweep's largest tiles).

Every unit is bounds-checked in the kernel, whatever the caller validated: a unit whose slot is
negative, ``>= limit``, not a multiple of ``align`` (a page start off its page), or whose words do
not lie inside its buffer is skipped. So the index vectors may be read at their current values (the
host pool hands the kernel a caller's CUDA vector without copying it) and no value in them can make
the kernel touch memory outside ``src`` or ``dst``.

Kept apart from the row write (:mod:`mlakv.kernels.triton.row_write`): different callers, different
launch rules.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mlakv.kernels.triton.common import widest_word
from mlakv.spec import tuning

__all__ = ["launch_copy_rows", "DEFAULT_MAX_PROGRAMS"]

#: Programs (= SMs at most) a transfer uses unless told otherwise: the issue's budget of 8 SMs.
DEFAULT_MAX_PROGRAMS = 8


@triton.jit
def _smid(x):
    # The SM this program runs on (PTX %smid); ``x`` only gives the result its shape.
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _piece(ptr, first, live, start, w, UNIT: tl.constexpr):
    # Pointers [ROWS, BLOCK] to words [start, start + BLOCK) of a tile's units (each from its first
    # word; w: tl.arange(0, BLOCK)), and their mask (live units, words below UNIT).
    offs = start + w
    m = live[:, None] & (offs < UNIT)[None, :]
    return ptr + first[:, None] + offs[None, :], m


@triton.jit
def _copy_units_kernel(
    src_ptr,
    dst_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    smid_ptr,
    n_units,
    src_idx_stride,
    dst_idx_stride,
    src_limit,
    dst_limit,
    src_align,
    dst_align,
    src_words,
    dst_words,
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
    # A unit whose slot is outside [0, limit), off its alignment, or whose words leave the buffer
    # is skipped (its slot is replaced by 0 first, so even its address arithmetic stays tame).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if RECORD_SMID:
        one = tl.arange(0, 1)
        tl.store(smid_ptr + pid + one, _smid(one))
    # A unit in pieces of BLOCK words, each loaded, then stored; a remainder past the last whole piece
    # of at most half a piece is loaded together with that piece (PAIRED; see the module docstring).
    # SOLO: the words copied a piece at a time.
    LAST: tl.constexpr = (UNIT - 1) // BLOCK * BLOCK  # where the unit's last piece starts
    PAIRED: tl.constexpr = LAST > 0 and UNIT % BLOCK != 0 and UNIT % BLOCK <= BLOCK // 2
    SOLO: tl.constexpr = LAST - BLOCK if PAIRED else UNIT
    n_tiles = tl.cdiv(n_units, ROWS)
    r = tl.arange(0, ROWS)
    w = tl.arange(0, BLOCK)
    for tile in range(pid, n_tiles, nprog):
        u = (tile * ROWS + r).to(tl.int64)
        live = u < n_units
        s = tl.load(src_idx_ptr + u * src_idx_stride, mask=live, other=0).to(tl.int64)
        d = tl.load(dst_idx_ptr + u * dst_idx_stride, mask=live, other=0).to(tl.int64)
        ok = live & (s >= 0) & (s < src_limit) & (s % src_align == 0)
        ok = ok & (d >= 0) & (d < dst_limit) & (d % dst_align == 0)
        s = tl.where(ok, s, 0)
        d = tl.where(ok, d, 0)
        s_off = (s // src_page) * src_page_stride + (s % src_page) * src_row_stride
        d_off = (d // dst_page) * dst_page_stride + (d % dst_page) * dst_row_stride
        live = ok & (s_off + UNIT <= src_words) & (d_off + UNIT <= dst_words)
        # every offset is a multiple of ALIGN words: lets the compiler use vector loads and stores
        s_off = tl.multiple_of(s_off, ALIGN)
        d_off = tl.multiple_of(d_off, ALIGN)
        for start in tl.static_range(0, SOLO, BLOCK):
            p, m = _piece(src_ptr, s_off, live, start, w, UNIT)
            x = tl.load(p, mask=m)
            p, m = _piece(dst_ptr, d_off, live, start, w, UNIT)
            tl.store(p, x, mask=m)
        if PAIRED:  # both loads, the last whole piece's and the remainder's, then their stores
            p, m = _piece(src_ptr, s_off, live, LAST - BLOCK, w, UNIT)
            x = tl.load(p, mask=m)
            p, m = _piece(src_ptr, s_off, live, LAST, w, UNIT)
            y = tl.load(p, mask=m)
            p, m = _piece(dst_ptr, d_off, live, LAST - BLOCK, w, UNIT)
            tl.store(p, x, mask=m)
            p, m = _piece(dst_ptr, d_off, live, LAST, w, UNIT)
            tl.store(p, y, mask=m)


def tile_shape(unit_words: int, tile_words: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)`` of a tile of ``tile_words`` words (a power of two) for units of ``unit_words``
    words: ``BLOCK`` covers a unit (up to ``tile_words``; longer units loop, the remainder past their
    last whole tile loaded with it), ``ROWS`` units per tile fill ``tile_words``."""
    block = min(triton.next_power_of_2(unit_words), tile_words)
    rows = max(1, tile_words // block)
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
    num_warps: int = 0,
    tile_words: int = 0,
    smid_out: torch.Tensor | None = None,
    src_limit: int | None = None,
    dst_limit: int | None = None,
    src_align: int = 1,
    dst_align: int = 1,
) -> None:
    """Copy ``unit_bytes``-wide units ``src[src_idx[i]] -> dst[dst_idx[i]]`` in one launch.

    Unchecked on the host (no sync): the kernel skips a unit whose slot on either side is negative,
    ``>= *_limit``, not a multiple of ``*_align``, or whose bytes are not all inside its buffer.
    This launcher refuses only index vectors it would misread (not 1-D int32/int64 of one length).

    Args:
        src, dst: byte-addressable buffers (device or pinned host memory); the layouts address
            from their first byte.
        src_idx, dst_idx: ``[n]`` int32/int64 slots on the launching device, any stride (for page
            units, the first slot of each page).
        unit_bytes: bytes of one unit (a row, or ``page_size`` rows when a page is contiguous).
        src_layout, dst_layout: ``(page_size, page_stride_bytes, row_stride_bytes)``: slot ``t``
            starts at byte ``(t // page_size) * page_stride + (t % page_size) * row_stride``.
        max_programs: the persistent grid's size bound (programs run on at most this many SMs).
        num_warps, tile_words: warps per program and the words a program moves per loop iteration
            (a power of two); 0 takes the launch table's choice for the call's ``n * unit_bytes``
            bytes (:func:`mlakv.spec.tuning.hicache_copy_launch`), else overrides it (the bench's
            sweep). The bytes copied are the same at every shape.
        smid_out: optional ``[max_programs]`` int32 device tensor; when given, each program writes
            the SM id it ran on (CUDA only; the benchmark counts the SMs a transfer occupied).
        src_limit, dst_limit: slots must be below these (default: no limit but the buffer's end).
        src_align, dst_align: slots must be multiples of these (page units: the page size).
    """
    n = src_idx.shape[0]
    if n == 0:
        return
    if max_programs < 1:
        raise ValueError(f"max_programs must be >= 1, got {max_programs}")
    if tile_words and (tile_words < 1 or tile_words & (tile_words - 1)):
        raise ValueError(f"tile_words must be a power of two, got {tile_words}")
    for name, t in (("src_idx", src_idx), ("dst_idx", dst_idx)):  # refuse what the kernel would misread
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64) or t.shape[0] != n:
            raise ValueError(f"{name} must be a [{n}] int32/int64 vector, got {tuple(t.shape)} {t.dtype}")
    for name, v in (("src_align", src_align), ("dst_align", dst_align)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    no_limit = 1 << 62
    sp, sps, srs = src_layout
    dp, dps, drs = dst_layout
    w, word = widest_word(unit_bytes, sps, srs, dps, drs, src.data_ptr(), dst.data_ptr(), src.nbytes, dst.nbytes)
    for name, t in (("src", src), ("dst", dst)):  # the kernel addresses every buffer from its first byte
        if not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous buffer, got strides {tuple(t.stride())}")
    # flattened first: a buffer's last dim need not be a multiple of the word (e.g. 585-byte rows)
    s_words = src.view(torch.uint8).reshape(-1).view(word)
    d_words = dst.view(torch.uint8).reshape(-1).view(word)
    unit = unit_bytes // w
    warps, tile = tuning.hicache_copy_launch(n * unit_bytes)
    rows, block = tile_shape(unit, tile_words or tile)
    grid = min(max_programs, triton.cdiv(n, rows))
    align = 16 // w  # words per 16 bytes, then halved until it divides every stride and the unit
    while align > 1 and any(q % align for q in (unit, sps // w, srs // w, dps // w, drs // w)):
        align //= 2
    record = smid_out is not None
    _copy_units_kernel[(grid,)](
        s_words, d_words, src_idx, dst_idx, smid_out if record else src_idx, n,
        src_idx.stride(0), dst_idx.stride(0),
        no_limit if src_limit is None else src_limit, no_limit if dst_limit is None else dst_limit,
        src_align, dst_align, s_words.numel(), d_words.numel(),
        sp, sps // w, srs // w, dp, dps // w, drs // w,
        UNIT=unit, BLOCK=block, ROWS=rows, RECORD_SMID=record, ALIGN=align, num_warps=num_warps or warps,
    )
