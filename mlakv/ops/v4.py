"""The DeepSeek-V4 family's paged caches: the public store (quantized, optionally RoPE-rotated, inside
the write) and the dequantizing gather.

Why: DeepSeek-V4's sparse-attention decode (FlashMLA) reads block-split fp8 / fp4 pages, not 576-value
rows, and every layer of every step writes thousands of tokens into them; the quantization (and the
rotation of the RoPE tail) belongs inside that write, one launch. This module is the one entry: it
validates a call against the rule book (:mod:`mlakv.spec.rules`), takes the page geometry from the
format table (:mod:`mlakv.spec.formats`), checks bounds where asked, and lets the dispatcher
(:func:`mlakv.ops.dispatch.run_v4_store`) run it: the plain-torch reference on CPU
(:mod:`mlakv.ops.v4_reference`, which is also the spec of the bytes), the JIT CUDA kernel on SM90+
(:mod:`mlakv.kernels.cuda.v4_store`), Triton otherwise or where the JIT kernel declines an alignment
(:mod:`mlakv.kernels.triton.v4_store`). Every path gives the same bytes.

Layouts (``layout``, as the pool's ``kv_cache_format``): ``v4`` (584 B/token), ``v41`` (528),
``v41_fp4`` (288), and ``v41_new`` / ``v41_fp4_new`` (the same bytes, each token's scales right after
its data). See :mod:`mlakv.ops.v4_reference` for the values' rules and ``docs/formats.md`` for the pages.
"""

from __future__ import annotations

from typing import Optional

import torch

from mlakv import _env
from mlakv.spec import rules
from mlakv.spec.calls import V4StoreCall

from . import dispatch
from .v4_reference import V4_LAYOUTS, v4_geometry

__all__ = ["V4_LAYOUTS", "set_v4_kv_buffer", "get_v4_kv_buffer", "v4_store_path", "v4_page_bytes", "V4Route", "bind_v4"]

_ENCODING = {"v4": 0, "v41": 1, "v41_fp4": 2}


def v4_page_bytes(layout: str, page_size: int) -> int:
    """Bytes of one page of ``page_size`` tokens in ``layout`` (the buffer's dim 1)."""
    return v4_geometry(layout).page_bytes(rules.check_page_size(page_size))


def v4_store_path(kv_pages: torch.Tensor, layout: str) -> str:
    """The backend a store into ``kv_pages`` takes: ``torch``, ``jit`` or ``triton`` (see the dispatcher)."""
    v4_geometry(layout)
    return dispatch.v4_store_path(kv_pages, layout)


def _real_freqs(freqs_cis: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """A complex64 ``[n, 32]`` freqs_cis as its fp32 ``[n, 64]`` (cos, sin) view; anything else as given."""
    if isinstance(freqs_cis, torch.Tensor) and freqs_cis.dtype == torch.complex64 and freqs_cis.dim() == 2:
        return torch.view_as_real(freqs_cis).flatten(1)
    return freqs_cis


def set_v4_kv_buffer(
    kv_pages: torch.Tensor,
    loc: torch.Tensor,
    kv: torch.Tensor,
    layout: str,
    page_size: int,
    *,
    freqs_cis: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    cos_sin_cache: Optional[torch.Tensor] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
    check_bounds: Optional[bool] = None,
) -> str:
    """Quantize tokens into ``layout``'s pages at slots ``loc`` (one launch on the GPU).

    Args:
        kv_pages: ``[num_pages, page_bytes]`` uint8, one layer's pages (:func:`v4_page_bytes`); bytes
            contiguous, any page stride; slot ``s`` lives in page ``s // page_size``, row ``s % page_size``.
        loc: ``[n]`` int32/int64 logical slots, any stride (strided, expanded and offset views are
            honoured). ``loc < 0`` is padding and ``loc == reserved_skip_index`` is skipped; with
            ``dcp_world_size = W > 1`` only ``loc % W == dcp_rank`` is stored, at slot ``loc // W``.
        kv: ``[n, 512]`` or ``[n, 1, 512]`` bf16/fp16 tokens, ``nope (448) | rope (64)``; rows may be strided.
        layout: ``v4``, ``v41``, ``v41_fp4``, ``v41_new`` or ``v41_fp4_new``.
        page_size: tokens per page, a power of two (FlashMLA reads 64).
        freqs_cis: ``[n, 64]`` fp32 ``(cos_k, sin_k)`` pairs (or complex64 ``[n, 32]``): rotate the
            RoPE tail in the store (fp32, rounded back to ``kv``'s dtype, then quantized); or
        positions, cos_sin_cache: ``[n]`` int32/int64 positions into a ``[max_pos, 64]`` fp32 table of
            ``cos_0..cos_31 | sin_0..sin_31`` rows (sglang's ``cos_sin_cache``), the same rotation.
        reserved_skip_index, dcp_world_size, dcp_rank: the row selection above.
        check_bounds: raise ``IndexError`` before writing anything when a kept slot is ``>= num_pages *
            page_size`` or a position lies outside the table (syncs); default ``MLAKV_CHECK_BOUNDS``,
            always on for CPU tensors. Unchecked GPU calls skip such tokens (never an access outside
            the tensors).

    Returns the path taken (``torch``, ``jit`` or ``triton``). Only each kept token's value bytes and
    written scale bytes change (page padding and ``v4``'s pad byte keep their contents). ``n == 0``
    launches nothing. A slot that several kept tokens target holds unspecified bytes afterwards.
    Raises ``TypeError``/``ValueError`` naming the argument for anything the rule book refuses.
    """
    g = v4_geometry(layout)
    page_size = rules.check_page_size(page_size)
    page_bytes = g.page_bytes(page_size)
    n = loc.shape[0] if isinstance(loc, torch.Tensor) and loc.dim() >= 1 else 0
    freqs_cis = _real_freqs(freqs_cis, n)
    if not rules.v4_store_ok(kv_pages, loc, kv, page_bytes, freqs_cis, positions, cos_sin_cache):
        rules.explain_v4_store(kv_pages, loc, kv, page_bytes, freqs_cis, positions, cos_sin_cache)
    skip = rules.check_row_selection(reserved_skip_index, dcp_world_size, dcp_rank)
    if n == 0:
        return dispatch.v4_store_path(kv_pages, layout)
    kv = kv.select(1, 0) if kv.dim() == 3 else kv
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if bounds or not kv_pages.is_cuda:
        rules.check_loc_bounds(
            loc, kv_pages.shape[0] * page_size, reserved_skip_index=None if skip < 0 else skip,
            dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )  # fmt: skip
        if positions is not None:
            rules.check_positions_bounds(positions, cos_sin_cache.shape[0])
    call = V4StoreCall(kv_pages, loc, kv, freqs_cis, positions, cos_sin_cache, skip, dcp_world_size, dcp_rank)
    return dispatch.run_v4_store(call, layout, page_size, g.kernel_geometry(page_size), _ENCODING[g.encoding])


def get_v4_kv_buffer(
    kv_pages: torch.Tensor, loc: torch.Tensor, layout: str, page_size: int, *, check_bounds: Optional[bool] = None
) -> torch.Tensor:
    """Gather and dequantize slots ``loc`` of ``layout``'s pages: ``[n, 512]`` bf16 (a new tensor).

    Args:
        kv_pages: ``[num_pages, page_bytes]`` uint8, one layer's pages.
        loc: ``[n]`` int32/int64 slots of these pages (physical: no DCP mapping), any stride. ``loc <
            0`` gives a zero row.
        check_bounds: raise ``IndexError`` for a slot ``>= num_pages * page_size`` (syncs); default
            ``MLAKV_CHECK_BOUNDS``, always on for CPU tensors. Unchecked GPU calls give a zero row.

    Values: ``e4m3 * 2^(E - 127)`` or ``e2m1 * e4m3 scale``, rounded to bf16; ``v4``'s rope as stored.
    """
    g = v4_geometry(layout)
    page_size = rules.check_page_size(page_size)
    page_bytes = g.page_bytes(page_size)
    rules.check_v4_gather(kv_pages, loc, page_bytes)
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if (bounds or not kv_pages.is_cuda) and loc.numel():
        num_slots = kv_pages.shape[0] * page_size
        bad = loc >= num_slots
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"loc[{i}] = {int(loc[i])} is out of range for kv_pages with num_pages * page_size = {num_slots}")
    return dispatch.run_v4_gather(kv_pages, loc, layout, page_size, g.kernel_geometry(page_size), _ENCODING[g.encoding])


# ---- a pool's store and gather, bound once (MLATokenToKVPool with a V4-family kv_cache_format) -------


class V4Route:
    """The store and gather of one V4-family pool, with the row selection and bounds policy bound once
    (the pool's ``set_kv_buffer`` / ``get_mla_kv_buffer`` call it). Built by :func:`bind_v4`.

    Attributes:
        layout, page_size: the format and tokens per page.
        buffers / views: the layers' page buffers ``[num_pages, page_bytes]`` uint8 (``views`` is the
            same list: what ``get_key_buffer`` returns, the pages FlashMLA reads).
        check_bounds: whether writes and gathers check slots (settable).
    """

    __slots__ = ("layout", "page_size", "buffers", "views", "check_bounds", "skip", "dcp_world_size", "dcp_rank")

    def __init__(self, layout, page_size, buffers, *, check_bounds, reserved_skip_index, dcp_world_size, dcp_rank):
        self.layout = layout
        self.page_size = page_size
        self.buffers = buffers
        self.views = buffers
        self.check_bounds = check_bounds
        self.skip = reserved_skip_index
        self.dcp_world_size = dcp_world_size
        self.dcp_rank = dcp_rank

    def write(
        self,
        layer: int,
        loc: torch.Tensor,
        k_nope: torch.Tensor,
        k_rope: torch.Tensor,
        *,
        freqs_cis: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        cos_sin_cache: Optional[torch.Tensor] = None,
    ) -> None:
        """Store tokens ``[k_nope (448) | k_rope (64)]`` of local layer ``layer`` at logical slots ``loc``.

        Two views of one ``[n, 512]`` row (what the pool's full-row form passes) are stored from that
        row directly; separate tensors are joined first (one copy)."""
        kv = _joined(k_nope, k_rope)
        set_v4_kv_buffer(
            self.buffers[layer], loc, kv, self.layout, self.page_size, freqs_cis=freqs_cis, positions=positions,
            cos_sin_cache=cos_sin_cache, reserved_skip_index=self.skip, dcp_world_size=self.dcp_world_size,
            dcp_rank=self.dcp_rank, check_bounds=self.check_bounds,
        )  # fmt: skip

    def gather(self, layer: int, loc: torch.Tensor, dst_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical slots ``loc`` of local layer ``layer`` dequantized: ``(k_nope [n, 448], k_rope [n, 64])``
        views of one new bf16 ``[n, 512]`` tensor (cast to ``dst_dtype`` when given)."""
        out = get_v4_kv_buffer(self.buffers[layer], loc, self.layout, self.page_size, check_bounds=self.check_bounds)
        if dst_dtype is not None and dst_dtype != out.dtype:
            out = out.to(dst_dtype)
        return out[:, : rules.V4_DIM - rules.V4_ROPE_DIM], out[:, rules.V4_DIM - rules.V4_ROPE_DIM :]


def _joined(k_nope: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """``[n, 512]``: the row both views cut (no copy), or the two concatenated."""
    for name, t in (("k_nope", k_nope), ("k_rope", k_rope)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    a = k_nope.select(1, 0) if k_nope.dim() == 3 and k_nope.shape[1] == 1 else k_nope
    b = k_rope.select(1, 0) if k_rope.dim() == 3 and k_rope.shape[1] == 1 else k_rope
    nope = rules.V4_DIM - rules.V4_ROPE_DIM
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != nope or b.shape[-1] != rules.V4_ROPE_DIM or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"a V4-family token is [n, {nope}] nope + [n, {rules.V4_ROPE_DIM}] rope (or one [n, {rules.V4_DIM}] row), "
            f"got {tuple(k_nope.shape)} and {tuple(k_rope.shape)}"
        )
    if (
        a.dtype == b.dtype
        and a.device == b.device
        and a.stride() == b.stride()
        and a.stride(-1) == 1
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.data_ptr() == a.data_ptr() + nope * a.element_size()
    ):
        return a.as_strided((a.shape[0], rules.V4_DIM), (a.stride(0), 1))
    return torch.cat((a, b.to(a.dtype) if b.dtype != a.dtype else b), dim=-1)


def bind_v4(
    layout: str,
    page_size: int,
    buffers: list[torch.Tensor],
    *,
    check_bounds: bool,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
) -> V4Route:
    """Bind the store and gather of a pool whose layers are ``buffers`` (``[num_pages, page_bytes]``
    uint8 each). The options are checked here, once (``TypeError``/``ValueError`` naming the option)."""
    v4_geometry(layout)
    page_size = rules.check_page_size(page_size)
    if not isinstance(check_bounds, bool):
        raise TypeError(f"check_bounds must be a bool, got {type(check_bounds).__name__}")
    rules.check_row_selection(reserved_skip_index, dcp_world_size, dcp_rank)
    return V4Route(
        layout, page_size, list(buffers), check_bounds=check_bounds, reserved_skip_index=reserved_skip_index,
        dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
    )  # fmt: skip
