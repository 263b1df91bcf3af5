"""The DSA indexer K cache in plain torch: its page format, the quantizing store and the gather.

Why this module exists: DeepSeek-V3.2 / V4 sparse attention picks the tokens each query attends to
with a "lightning indexer", which keeps a cache of its own beside the MLA cache: one 128-value key
per token, stored as FP8 e4m3 with one fp32 scale. This module is the spec of that cache: the CPU
path of :mod:`mlakv.ops.indexer` and the oracle every kernel (Triton, JIT CUDA) is tested against
bit for bit. It is written for obviousness, not speed.

The page (one layer's buffer is ``index_pages [num_pages, 8448]`` uint8)::

    page p holds slots 64 p .. 64 p + 63
    bytes [0, 8192)     64 keys of 128 e4m3 bytes; slot s at (s % 64) * 128
    bytes [8192, 8448)  64 fp32 scales (little-endian); slot s at 8192 + (s % 64) * 4

so a token costs 132 bytes and slot ``s`` lives in page ``s // 64``.

The quantization of one key ``x`` (128 bf16/fp16 values, widened to fp32 exactly) is sglang's
(``FusedStoreCacheIndexerKernel`` in ``deepseek_v4/store.cuh``), matched bit for bit, including its
multiply by the reciprocal (``x * (1 / scale)``, which rounds differently from ``x / scale``)::

    amax  = max |x_i|                      NaN ignored (CUDA's fmaxf); +-inf counts
    scale = fp32(max(1e-4f, amax) / 448)   IEEE fp32 division ("fp32" rule)
    inv   = fp32(1 / scale)                IEEE fp32 reciprocal
    q_i   = e4m3(clip(fp32(x_i * inv)))    clip(y) = fmaxf(fminf(y, 448), -448), then RNE

``clip`` follows CUDA's ``fminf``/``fmaxf``, which return the non-NaN operand, so a NaN product
becomes +448 (byte ``0x7E``) whatever its sign. What that gives at the edges:

* an all-zero key: ``scale = 1e-4f / 448``, every byte 0 (``-0.0`` stays ``0x80``);
* tiny and subnormal inputs: quantize to +-0 (the floor keeps ``inv <= 4.48e6``);
* a key holding +-inf: ``amax = inf``, ``scale = inf``, ``inv = 0``; finite values become +-0 and
  each +-inf becomes ``inf * 0 = NaN``, stored as ``0x7E``;
* NaN values: ignored by ``amax``; stored as ``0x7E``. An all-NaN key gets the floor scale.

The ``"ue8m0"`` rule (vLLM's optional rounding of the indexer scale) rounds ``scale`` up to a
power of two before the reciprocal (``2^ceil(log2(scale))``, by the fp32 bits: exponent + 1 when
the mantissa is not zero); ``inv`` is then exact. Everything else is the same.

Row selection is the one rule of every mlakv write: ``loc`` is read at its own stride; rows with
``loc < 0`` (padding), ``loc == reserved_skip_index`` or, under decode context parallelism
(``dcp_world_size = W > 1``), ``loc % W != dcp_rank`` are skipped; a kept row lands at slot
``loc // W``; a slot past the buffer is skipped here (the public op raises ``IndexError`` for it first).

The gather (what the indexer's top-k kernel reads): for request ``b`` with ``seq_lens[b]`` tokens,
token ``j`` lives in page ``page_table[b, j // 64]`` at position ``j % 64``; the keys of all
requests come out concatenated in request order as ``k [total, 128]`` e4m3 and ``scale [total]``
fp32. A token whose page id is negative or past the buffer, or whose ``j // 64`` is past the page
table's width, gives a zero key and a zero scale.
"""

from __future__ import annotations

import torch

from mlakv.spec import formats as _formats
from mlakv.spec.calls import IndexStoreCall
from mlakv.spec.rules import (
    INDEX_AMAX_FLOOR,
    INDEX_E4M3_MAX,
    INDEX_HEAD_DIM,
    INDEX_PAGE_BYTES,
    INDEX_PAGE_TOKENS,
    INDEX_SCALE_RULES,
    INDEX_SOURCE_DTYPES,
    check_index_scale_rule,
)

from .reference import kept_rows

__all__ = [
    "INDEX_HEAD_DIM",
    "INDEX_PAGE_TOKENS",
    "INDEX_KEY_BYTES",
    "INDEX_PAGE_BYTES",
    "INDEX_SCALE_OFFSET",
    "INDEX_E4M3_MAX",
    "INDEX_AMAX_FLOOR",
    "INDEX_SCALE_RULES",
    "INDEX_SOURCE_DTYPES",
    "INDEX_FORMAT",
    "index_k_scales",
    "quantize_index_k",
    "dequantize_index_k",
    "index_k_num_slots",
    "slot_byte_offsets",
    "store_index_k_reference",
    "gather_index_k_reference",
]

# (head dim 128, 64 slots and 8448 bytes per page, the source dtypes, scale rules, 448 and the 1e-4f
# amax floor: the rule book's)
INDEX_KEY_BYTES = INDEX_HEAD_DIM  # one e4m3 byte per value
INDEX_SCALE_OFFSET = INDEX_PAGE_TOKENS * INDEX_KEY_BYTES  # 8192: where a page's scales start
_check_rule = check_index_scale_rule
INDEX_FORMAT = _formats.paged_format("indexer")  # the cache format's entry (sizes, slot addressing, L3 key)


def _keys(index_k: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` / ``[n, 1, 128]`` bf16/fp16 -> ``[n, 128]`` fp32 (exact widening)."""
    if not isinstance(index_k, torch.Tensor):
        raise TypeError(f"index_k must be a torch.Tensor, got {type(index_k).__name__}")
    x = index_k.select(1, 0) if index_k.dim() == 3 and index_k.shape[1] == 1 else index_k
    if x.dim() != 2 or x.shape[-1] != INDEX_HEAD_DIM:
        raise ValueError(f"index_k must be [n, {INDEX_HEAD_DIM}] or [n, 1, {INDEX_HEAD_DIM}], got shape {tuple(index_k.shape)}")
    if x.dtype not in INDEX_SOURCE_DTYPES:
        raise TypeError(f"index_k dtype must be one of {INDEX_SOURCE_DTYPES}, got {x.dtype}")
    return x.float()


def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, v, dtype=torch.float32)


def _ue8m0_round_up(s: torch.Tensor) -> torch.Tensor:
    """Positive fp32 ``s`` -> ``2^ceil(log2 s)`` by the bits (exponent + 1 when the mantissa is not 0;
    the largest finite binade rounds up to inf, inf stays inf)."""
    b = s.view(torch.int32)
    exp = (b >> 23) & 0xFF
    up = exp + ((b & 0x7FFFFF) != 0).to(torch.int32)
    return (up.clamp(max=255) << 23).view(torch.float32)


def index_k_scales(index_k: torch.Tensor, scale_rule: str = "fp32") -> torch.Tensor:
    """The fp32 scale of each key: ``max(1e-4f, amax) / 448`` (IEEE), amax NaN-ignoring.

    Args:
        index_k: ``[n, 128]`` or ``[n, 1, 128]`` bf16/fp16.
        scale_rule: ``"fp32"`` (sglang) or ``"ue8m0"`` (rounded up to a power of two).
    Returns:
        ``[n]`` float32.
    """
    _check_rule(scale_rule)
    x = _keys(index_k)
    a = x.abs()
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    amax = a.amax(dim=1) if x.shape[0] else torch.zeros(0, dtype=torch.float32, device=x.device)
    floored = torch.maximum(amax, _f32(INDEX_AMAX_FLOOR, amax))
    # IEEE division by a tensor: torch's CUDA ``t / scalar`` multiplies by the reciprocal instead
    scale = floored / _f32(INDEX_E4M3_MAX, floored)
    return _ue8m0_round_up(scale) if scale_rule == "ue8m0" else scale


def _e4m3_clip_bytes(y: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3 bytes as sglang's pack_fp8: fminf(y, 448) then fmaxf(., -448) (NaN -> +448), RNE."""
    y = torch.where(torch.isnan(y), _f32(INDEX_E4M3_MAX, y), y)
    return y.clamp(-INDEX_E4M3_MAX, INDEX_E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def quantize_index_k(index_k: torch.Tensor, scale_rule: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize keys as the store does: ``(q [n, 128] uint8 e4m3 bytes, scale [n] float32)``.

    ``q = e4m3(clip(x * (1 / scale)))`` in fp32, the product rounded once (see the module docstring).
    """
    scale = index_k_scales(index_k, scale_rule)
    x = _keys(index_k)
    inv = torch.ones_like(scale) / scale  # IEEE reciprocal (a tensor quotient)
    return _e4m3_clip_bytes(x * inv[:, None]), scale


def dequantize_index_k(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` e4m3 bytes (uint8 or float8_e4m3fn) and ``[n]`` fp32 scales -> ``[n, 128]`` fp32
    (``e4m3 * scale``; for checking the error bound, not a kernel's spec)."""
    return q.view(torch.float8_e4m3fn).float() * scale[:, None].float()


def index_k_num_slots(index_pages: torch.Tensor) -> int:
    """Token slots a ``[num_pages, 8448]`` buffer holds (``64 * num_pages``)."""
    return index_pages.shape[0] * INDEX_PAGE_TOKENS


def slot_byte_offsets(slot: int) -> tuple[int, int, int]:
    """``(page, key byte offset in the page, scale byte offset in the page)`` of slot ``slot`` (the
    format entry's addressing, :meth:`mlakv.spec.formats.CacheFormat.slot_offsets`)."""
    page = slot // INDEX_PAGE_TOKENS
    key, scale = INDEX_FORMAT.slot_offsets(slot, INDEX_PAGE_TOKENS)
    base = page * INDEX_FORMAT.page_bytes(INDEX_PAGE_TOKENS)
    return page, key - base, scale - base


def _pages(index_pages: torch.Tensor) -> torch.Tensor:
    if not isinstance(index_pages, torch.Tensor) or index_pages.dim() != 2 or index_pages.shape[1] != INDEX_PAGE_BYTES:
        shape = tuple(index_pages.shape) if isinstance(index_pages, torch.Tensor) else type(index_pages).__name__
        raise ValueError(f"index_pages must be [num_pages, {INDEX_PAGE_BYTES}], got {shape}")
    if index_pages.dtype != torch.uint8:
        raise TypeError(f"index_pages must be uint8, got {index_pages.dtype}")
    return index_pages


def store_index_k_reference(call: IndexStoreCall) -> None:
    """Quantize ``index_k`` and write each kept key and scale into its slot (in place).

    ``call`` (:class:`mlakv.spec.calls.IndexStoreCall`):
        index_pages: ``[num_pages, 8448]`` uint8 (any page stride; written in place).
        loc: ``[n]`` int32/int64 logical slots, any stride.
        index_k: ``[n, 128]`` or ``[n, 1, 128]`` bf16/fp16.
        skip_slot (negative: none), dcp_world_size, dcp_rank: the row selection (module docstring).
        scale_rule: ``"fp32"`` or ``"ue8m0"``.

    Nothing but the kept slots' 128 key bytes and 4 scale bytes changes. Several kept rows with one
    slot: any one of them may win (as on every path).
    """
    index_pages, loc, index_k, skip_slot, dcp_world_size, dcp_rank, scale_rule = call
    pages = _pages(index_pages)
    q, scale = quantize_index_k(index_k, scale_rule)
    skip = None if skip_slot is None or skip_slot < 0 else skip_slot
    keep, slot = kept_rows(loc, index_k_num_slots(pages), skip, dcp_world_size, dcp_rank)
    keep = keep.to(pages.device)
    slot = slot.to(pages.device)[keep]
    if slot.numel() == 0:
        return
    q, sbytes = q.to(pages.device)[keep], scale.to(pages.device)[keep].contiguous().view(torch.uint8).view(-1, 4)
    page, pos = slot // INDEX_PAGE_TOKENS, slot % INDEX_PAGE_TOKENS
    cols = torch.arange(INDEX_KEY_BYTES, device=pages.device)
    pages[page[:, None], pos[:, None] * INDEX_KEY_BYTES + cols] = q
    cols4 = torch.arange(4, device=pages.device)
    pages[page[:, None], INDEX_SCALE_OFFSET + pos[:, None] * 4 + cols4] = sbytes


def gather_index_k_reference(
    index_pages: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the keys of requests into contiguous tensors (the spec; the CPU path).

    Args:
        index_pages: ``[num_pages, 8448]`` uint8.
        page_table: ``[batch, max_pages]`` int32/int64 page ids, any strides.
        seq_lens: ``[batch]`` int32/int64 tokens per request (negative counts as 0).
    Returns:
        ``(k [total, 128] float8_e4m3fn, scale [total] float32)`` with ``total = sum(seq_lens)``,
        request ``b``'s token ``j`` at row ``sum(seq_lens[:b]) + j``; a token with no valid page
        (page id negative or past the buffer, or ``j // 64`` past the table's width) gives a zero key
        and scale 0 (all bits zero).
    """
    pages = _pages(index_pages)
    dev = pages.device
    lens = seq_lens.to(device=dev, dtype=torch.long).clamp(min=0)
    table = page_table.to(device=dev, dtype=torch.long)
    total = int(lens.sum()) if lens.numel() else 0
    req = torch.repeat_interleave(torch.arange(lens.shape[0], device=dev), lens)  # [total] request of each row
    first = torch.cumsum(lens, 0) - lens  # each request's first row
    j = torch.arange(total, device=dev) - first[req]  # token index inside its request
    col = j // INDEX_PAGE_TOKENS
    width = table.shape[1]
    if width:
        page = torch.where(col < width, table[req, col.clamp(max=width - 1)], torch.full_like(col, -1))
    else:
        page = torch.full_like(col, -1)
    ok = (page >= 0) & (page < pages.shape[0])
    page = torch.where(ok, page, torch.zeros_like(page))
    pos = j % INDEX_PAGE_TOKENS
    k = pages[page[:, None], pos[:, None] * INDEX_KEY_BYTES + torch.arange(INDEX_KEY_BYTES, device=dev)]
    s = pages[page[:, None], INDEX_SCALE_OFFSET + pos[:, None] * 4 + torch.arange(4, device=dev)]
    k = torch.where(ok[:, None], k, torch.zeros_like(k)).contiguous()
    s = torch.where(ok[:, None], s, torch.zeros_like(s)).contiguous()
    return k.view(torch.float8_e4m3fn), s.view(torch.float32).view(total)
