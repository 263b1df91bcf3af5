"""Cache formats as data: one entry per format says how a token's values become bytes and where they live.

Everything that sizes, addresses or keys a cache reads this table: the pool (allocation, views, sizes,
buffer infos), the gathers, the host pool and L3 keys (the format's :meth:`CacheFormat.key`), the
kernels' compile-time arguments and the tests. Adding a format means one entry here, its kernels and
its tests.

Two arrangements exist:

``rows``
    One slot is one row of ``token_bytes`` bytes; the layer's buffer is ``[num_slots, 1, row]`` in the
    format's ``store_dtype`` (its elements: ``row_elems``). Slot ``s`` starts at byte
    ``s * token_bytes``; a format with per-token scales keeps them inside the row, at ``scale_offset``.
``split_pages``
    A page of ``page_size`` slots holds ``page_size`` data rows of ``data_bytes``, then ``page_size``
    scale rows of ``scale_bytes``, padded up to a multiple of ``page_align`` bytes. The buffer is
    ``[num_pages, page_bytes]`` uint8. Slot ``s`` lives in page ``s // page_size`` at row
    ``s % page_size``: data at ``page * page_bytes + row * data_bytes``, scales at
    ``page * page_bytes + page_size * data_bytes + row * scale_bytes``.

Formats with more than one variant by width (the 16-bit rows, ``per_tensor``, ``ds_mla``) are made
by :func:`resolve` from ``(name, dtype, nope_dim, rope_dim)``; the DeepSeek-V4 family and the DSA
indexer cache have fixed widths.

This module imports nothing of mlakv (a leaf of :mod:`mlakv.spec`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = [
    "CacheFormat",
    "ROWS",
    "SPLIT_PAGES",
    "FP8_FORMATS",
    "PAGED_FORMATS",
    "FORMAT_NAMES",
    "DS_MLA_TILE",
    "raw_rows",
    "per_tensor",
    "ds_mla",
    "resolve",
    "paged_format",
    "register_paged_format",
]

ROWS = "rows"
SPLIT_PAGES = "split_pages"

DS_MLA_TILE = 128  # nope values per fp32 scale of the ds_mla row
FP8_FORMATS = ("per_tensor", "ds_mla")  # quantized row formats of the 576-value MLA row


@dataclass(frozen=True)
class CacheFormat:
    """One cache format (see the module docstring for the two arrangements).

    Attributes:
        name: the format's name as the pool's ``kv_cache_format`` takes it (raw rows: the dtype's name).
        nope_dim, rope_dim: values per token in each part (what a write takes, what a gather returns).
        value_dtype: how the nope values are stored: a torch dtype, or ``"e2m1"`` (two per byte).
        rope: how the rope values are stored: ``"raw"`` (as the buffer dtype), ``"bf16"`` (as bf16
            whatever the source), ``"quantized"`` (like the nope values), ``"none"`` (rope_dim 0).
        scale_kind: ``"none"``, ``"tensor"`` (one fp32 for the whole cache, outside it), ``"fp32"``
            (fp32 per tile), ``"ue8m0"`` (a power-of-two exponent byte per tile) or ``"e4m3"`` (an e4m3
            scale per tile).
        scale_tile: values per scale (0: none or per tensor).
        data_bytes: bytes of a token's data (values; for ``rows``, scales inside the row included).
        scale_bytes: bytes of a token's scale row (``split_pages``) or of its in-row scales (``rows``).
        scale_offset: where the in-row scales start (``rows``; -1 when none).
        arrangement: :data:`ROWS` or :data:`SPLIT_PAGES`.
        page_align: ``split_pages``: a page's bytes are padded up to a multiple of this.
        store_dtype: the dtype of the layer buffer's elements.
    """

    name: str
    nope_dim: int
    rope_dim: int
    value_dtype: Union[torch.dtype, str]
    rope: str
    scale_kind: str
    scale_tile: int
    data_bytes: int
    scale_bytes: int
    scale_offset: int
    arrangement: str
    page_align: int
    store_dtype: torch.dtype

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def paged(self) -> bool:
        """Whether the buffer is a set of block-split pages (``split_pages``)."""
        return self.arrangement == SPLIT_PAGES

    @property
    def quantized(self) -> bool:
        """Whether a write quantizes (a 16-bit source becomes the format's bytes)."""
        return self.scale_kind != "none"

    @property
    def token_bytes(self) -> int:
        """Bytes one token occupies (data and scales; page padding not included)."""
        return self.data_bytes if self.arrangement == ROWS else self.data_bytes + self.scale_bytes

    @property
    def row_elems(self) -> int:
        """``rows``: elements of ``store_dtype`` per row (the buffer's last dim)."""
        es = torch.empty((), dtype=self.store_dtype).element_size()
        return self.data_bytes // es

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` slots (``split_pages``: padded to ``page_align``)."""
        raw = page_size * self.token_bytes
        if self.arrangement == ROWS:
            return raw
        return -(-raw // self.page_align) * self.page_align

    def buffer_shape(self, num_slots: int, page_size: int) -> tuple[int, ...]:
        """Shape of one layer's buffer holding ``num_slots`` slots (a whole number of pages)."""
        if self.arrangement == ROWS:
            return (num_slots, 1, self.row_elems)
        if num_slots % page_size:
            raise ValueError(f"num_slots={num_slots} must be a multiple of page_size={page_size} for {self.name!r}")
        return (num_slots // page_size, self.page_bytes(page_size))

    def buffer_bytes(self, num_slots: int, page_size: int) -> int:
        """Bytes of one layer's buffer (see :meth:`buffer_shape`)."""
        n = 1
        for d in self.buffer_shape(num_slots, page_size):
            n *= d
        return n * torch.empty((), dtype=self.store_dtype).element_size()

    # ---- addressing ----------------------------------------------------------------------------
    def slot_offsets(self, slot: int, page_size: int) -> tuple[int, int]:
        """``(data, scale)`` byte offsets of ``slot`` in a layer buffer (scale -1 when the format has none
        stored per token)."""
        if self.arrangement == ROWS:
            base = slot * self.data_bytes
            return base, (base + self.scale_offset if self.scale_offset >= 0 else -1)
        page, row = divmod(slot, page_size)
        base = page * self.page_bytes(page_size)
        return base + row * self.data_bytes, base + page_size * self.data_bytes + row * self.scale_bytes

    def key(self, page_size: int) -> str:
        """What must match for stored bytes to be read back into a cache of this format (HiCache L3)."""
        return (
            f"{self.name}:nope{self.nope_dim}:rope{self.rope_dim}:{_dtype_name(self.value_dtype)}:"
            f"{self.scale_kind}{self.scale_tile}:{self.arrangement}:page{page_size}:{self.page_bytes(page_size)}B"
        )


def _dtype_name(d: Union[torch.dtype, str]) -> str:
    return d if isinstance(d, str) else str(d).replace("torch.", "")


# ---- the row formats of the 576-value MLA row --------------------------------------------------
def raw_rows(dtype: torch.dtype, nope_dim: int, rope_dim: int) -> CacheFormat:
    """Rows that are exact copies of ``dtype`` values: ``[nope | rope]``, ``(nope + rope) * size`` bytes."""
    es = torch.empty((), dtype=dtype).element_size()
    store = torch.uint8 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype
    return CacheFormat(
        name=_dtype_name(dtype), nope_dim=nope_dim, rope_dim=rope_dim, value_dtype=dtype,
        rope="raw" if rope_dim else "none", scale_kind="none", scale_tile=0,
        data_bytes=(nope_dim + rope_dim) * es, scale_bytes=0, scale_offset=-1,
        arrangement=ROWS, page_align=1, store_dtype=store,
    )  # fmt: skip


def per_tensor(nope_dim: int, rope_dim: int) -> CacheFormat:
    """``[nope | rope]`` as e4m3 bytes, ``e4m3(x / k_scale)`` with one fp32 ``k_scale`` for the cache."""
    return CacheFormat(
        name="per_tensor", nope_dim=nope_dim, rope_dim=rope_dim, value_dtype=torch.float8_e4m3fn,
        rope="quantized" if rope_dim else "none", scale_kind="tensor", scale_tile=0,
        data_bytes=nope_dim + rope_dim, scale_bytes=0, scale_offset=-1,
        arrangement=ROWS, page_align=1, store_dtype=torch.uint8,
    )  # fmt: skip


def ds_mla(nope_dim: int, rope_dim: int) -> CacheFormat:
    """DeepSeek-V3.2's row: nope e4m3 in tiles of 128, one fp32 scale per tile, then rope as bf16
    (656 bytes for 512 + 64). How a writer picks the scales is its rule
    (:data:`mlakv.spec.rules.DS_MLA_SCALE_RULES`); every rule's rows have this layout."""
    if nope_dim <= 0 or nope_dim % DS_MLA_TILE:
        raise ValueError(f"kv_cache_format='ds_mla' needs kv_lora_rank % {DS_MLA_TILE} == 0, got {nope_dim}")
    tiles = nope_dim // DS_MLA_TILE
    return CacheFormat(
        name="ds_mla", nope_dim=nope_dim, rope_dim=rope_dim, value_dtype=torch.float8_e4m3fn,
        rope="bf16" if rope_dim else "none", scale_kind="fp32", scale_tile=DS_MLA_TILE,
        data_bytes=nope_dim + 4 * tiles + 2 * rope_dim, scale_bytes=4 * tiles, scale_offset=nope_dim,
        arrangement=ROWS, page_align=1, store_dtype=torch.uint8,
    )  # fmt: skip


# ---- fixed-width paged formats (DeepSeek-V4 family, DSA indexer) --------------------------------
def _paged(name, nope, rope, value, rope_kind, scale_kind, tile, data, scale, align, interleaved=False) -> CacheFormat:
    if interleaved:  # each token's scales right after its data: rows of data + scale bytes, no padding
        return CacheFormat(
            name=name, nope_dim=nope, rope_dim=rope, value_dtype=value, rope=rope_kind, scale_kind=scale_kind,
            scale_tile=tile, data_bytes=data + scale, scale_bytes=scale, scale_offset=data, arrangement=ROWS,
            page_align=1, store_dtype=torch.uint8,
        )  # fmt: skip
    return CacheFormat(
        name=name, nope_dim=nope, rope_dim=rope, value_dtype=value, rope=rope_kind, scale_kind=scale_kind,
        scale_tile=tile, data_bytes=data, scale_bytes=scale, scale_offset=-1, arrangement=SPLIT_PAGES,
        page_align=align, store_dtype=torch.uint8,
    )  # fmt: skip


_E4M3 = torch.float8_e4m3fn
_PAGED: dict[str, CacheFormat] = {
    # 448 e4m3 nope + 64 bf16 rope; 7 ue8m0 scales (one per 64 nope values) + 1 pad byte.
    "v4": _paged("v4", 448, 64, _E4M3, "bf16", "ue8m0", 64, 576, 8, 576),
    # 512 e4m3 (rope quantized too); 16 ue8m0 scales, one per 32 values.
    "v41": _paged("v41", 448, 64, _E4M3, "quantized", "ue8m0", 32, 512, 16, 512),
    # 512 e2m1 two per byte (even index in the low nibble); 32 e4m3 scales, one per 16 values.
    "v41_fp4": _paged("v41_fp4", 448, 64, "e2m1", "quantized", "e4m3", 16, 256, 32, 256),
    "v41_new": _paged("v41_new", 448, 64, _E4M3, "quantized", "ue8m0", 32, 512, 16, 1, interleaved=True),
    "v41_fp4_new": _paged("v41_fp4_new", 448, 64, "e2m1", "quantized", "e4m3", 16, 256, 32, 1, interleaved=True),
    # DSA lightning-indexer keys: 128 e4m3 per token, one fp32 scale per token; pages of 64 tokens.
    "indexer": _paged("indexer", 128, 0, _E4M3, "none", "fp32", 128, 128, 4, 1),
}
PAGED_FORMATS = tuple(_PAGED)
FORMAT_NAMES = FP8_FORMATS + PAGED_FORMATS


def register_paged_format(fmt: CacheFormat) -> None:
    """Add (or replace) a fixed-width format by name: what a new format's module calls, once."""
    _PAGED[fmt.name] = fmt


def paged_format(name: str) -> CacheFormat:
    """The fixed-width format ``name`` (DeepSeek-V4 family, ``indexer``); ``ValueError`` names the known ones."""
    try:
        return _PAGED[name]
    except KeyError:
        raise ValueError(f"unknown cache format {name!r}; fixed-width formats are {tuple(_PAGED)}") from None


def resolve(name: Optional[str], dtype: torch.dtype, nope_dim: int, rope_dim: int) -> CacheFormat:
    """The format a pool of ``dtype`` with ``[nope_dim | rope_dim]`` rows stores for ``kv_cache_format=name``.

    ``None``: raw rows of ``dtype``. ``"per_tensor"`` / ``"ds_mla"``: the FP8 row formats (``dtype``
    must be ``float8_e4m3fn``). A fixed-width format must match its widths. Raises ``ValueError``
    naming the format and what was expected.
    """
    if name is None:
        return raw_rows(dtype, nope_dim, rope_dim)
    if name in FP8_FORMATS:
        if nope_dim <= 0 or rope_dim < 0:
            raise ValueError(f"kv_lora_rank (nope_dim) must be positive and rope_dim >= 0, got {nope_dim}, {rope_dim}")
        return per_tensor(nope_dim, rope_dim) if name == "per_tensor" else ds_mla(nope_dim, rope_dim)
    if not isinstance(name, str) or name not in _PAGED:
        raise ValueError(f"kv_cache_format must be None or one of {FP8_FORMATS + tuple(_PAGED)}, got {name!r}")
    fmt = _PAGED[name]
    if fmt.nope_dim + fmt.rope_dim != nope_dim + rope_dim:
        raise ValueError(
            f"kv_cache_format={name!r} stores {fmt.nope_dim + fmt.rope_dim} values per token; "
            f"kv_lora_rank + qk_rope_head_dim = {nope_dim} + {rope_dim} does not match"
        )
    return fmt
