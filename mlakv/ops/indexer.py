"""The DSA indexer K cache's public ops: the quantizing store and the page-table gather.

Why: DeepSeek-V3.2 / V4's lightning indexer writes one 128-value key per token per layer and reads
the keys of whole requests back for its top-k; both happen every step, so each is one launch with
the quantization fused into the store. This module is the one entry for both: it validates the call
against the rule book (:mod:`mlakv.spec.rules`), asks the dispatcher (:func:`mlakv.ops.dispatch.indexer_backend`)
which backend serves the device, and runs it — the plain-torch reference on CPU
(:mod:`mlakv.ops.indexer_reference`, which is also the spec), the JIT CUDA kernels on SM90+
(:mod:`mlakv.kernels.cuda.indexer`), Triton otherwise or where the JIT kernel declines a layout
(:mod:`mlakv.kernels.triton.indexer`). Every path gives the same bytes.

The format and the quantization are sglang's (``FusedStoreCacheIndexerKernel``: ``x * (1 / scale)``
with ``scale = max(1e-4, amax) / 448``); see :mod:`mlakv.ops.indexer_reference`.
"""

from __future__ import annotations

from typing import Optional

import torch

from mlakv import _env
from mlakv.spec import rules
from mlakv.spec.calls import IndexStoreCall

from . import dispatch
from .indexer_reference import gather_index_k_reference, store_index_k_reference

__all__ = ["set_index_k_buffer", "get_index_k_buffer", "index_k_path"]


def index_k_path(index_pages: torch.Tensor) -> str:
    """The backend the store and gather take for a buffer on this device: ``torch``, ``jit`` or ``triton``."""
    return dispatch.indexer_backend(index_pages.device)


def set_index_k_buffer(
    index_pages: torch.Tensor,
    loc: torch.Tensor,
    index_k: torch.Tensor,
    *,
    check_bounds: Optional[bool] = None,
    reserved_skip_index: Optional[int] = None,
    dcp_world_size: int = 1,
    dcp_rank: int = 0,
    scale_rule: str = "fp32",
) -> None:
    """Quantize indexer keys and store them with their scales at slots ``loc`` (one launch on the GPU).

    Args:
        index_pages: ``[num_pages, 8448]`` uint8, one layer's pages (page stride and base address
            multiples of 16 bytes); slot ``s`` lives in page ``s // 64``.
        loc: ``[n]`` int32/int64 logical slots, any stride (strided, expanded and offset views are
            honoured). ``loc < 0`` is padding, ``loc == reserved_skip_index`` is skipped; with
            ``dcp_world_size = W > 1`` only ``loc % W == dcp_rank`` is written, at slot ``loc // W``.
        index_k: ``[n, 128]`` or ``[n, 1, 128]`` bf16/fp16, rows may be strided.
        check_bounds: raise ``IndexError`` before writing anything when a kept slot is ``>= 64 *
            num_pages`` (syncs); default ``MLAKV_CHECK_BOUNDS``, always on for CPU tensors. Unchecked
            GPU calls skip such rows (never a write outside ``index_pages``).
        reserved_skip_index, dcp_world_size, dcp_rank: the row selection above.
        scale_rule: ``"fp32"`` (sglang's scale, default) or ``"ue8m0"`` (rounded up to a power of two).

    Only the kept slots' 128 key bytes and 4 scale bytes change. ``n == 0`` launches nothing. A slot
    that several kept rows target holds one of them (which one is unspecified). Raises
    ``TypeError``/``ValueError`` naming the argument for anything the rule book refuses.
    """
    if not rules.index_store_ok(index_pages, loc, index_k):
        rules.explain_index_store(index_pages, loc, index_k)
    skip = rules.check_row_selection(reserved_skip_index, dcp_world_size, dcp_rank)
    rules.check_index_scale_rule(scale_rule)
    if loc.shape[0] == 0:
        return
    on_gpu = index_pages.is_cuda
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if bounds or not on_gpu:
        rules.check_loc_bounds(
            loc, index_pages.shape[0] * rules.INDEX_PAGE_TOKENS, reserved_skip_index=None if skip < 0 else skip,
            dcp_world_size=dcp_world_size, dcp_rank=dcp_rank,
        )  # fmt: skip
    call = IndexStoreCall(index_pages, loc, index_k, skip, dcp_world_size, dcp_rank, scale_rule)
    backend = dispatch.indexer_backend(index_pages.device)
    if backend == "torch":
        store_index_k_reference(call)
        return
    if backend == "jit":
        from mlakv.kernels.cuda.indexer import indexer_jit_store

        if indexer_jit_store(call):
            return
    from mlakv.kernels.triton.indexer import launch_store_index_k

    launch_store_index_k(call)


def get_index_k_buffer(
    index_pages: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    total_tokens: Optional[int] = None,
    max_seq_len: Optional[int] = None,
    check_bounds: Optional[bool] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the indexer keys of whole requests into contiguous tensors (what the indexer's top-k reads).

    Args:
        index_pages: ``[num_pages, 8448]`` uint8, one layer's pages.
        page_table: ``[batch, max_pages]`` int32/int64 page ids, any strides: request ``b``'s token
            ``j`` lives in page ``page_table[b, j // 64]`` at position ``j % 64``.
        seq_lens: ``[batch]`` int32/int64 tokens per request, any stride.
        total_tokens: ``sum(seq_lens)``, the output's rows; None: computed (syncs on GPU).
        max_seq_len: at least ``max(seq_lens)`` (sizes the grid); None: computed (syncs on GPU).
        check_bounds: check the values first (syncs): ``seq_lens >= 0``, ``total_tokens`` and
            ``max_seq_len`` right (``ValueError``), every used page column inside the table and page id
            inside ``index_pages`` (``IndexError``). Default ``MLAKV_CHECK_BOUNDS``; always on for CPU
            tensors. Unchecked GPU calls read nothing outside the tensors: a token without a valid page
            gives a zero key and scale, rows at or past ``total_tokens`` are not written (rows a wrong
            ``total_tokens`` or ``max_seq_len`` leaves out are unspecified).
    Returns:
        ``(k [total, 128] float8_e4m3fn, scale [total] float32)``, new contiguous tensors, request
        ``b``'s tokens from row ``sum(seq_lens[:b])`` on.
    """
    rules.check_index_gather(index_pages, page_table, seq_lens)
    if total_tokens is None:
        total_tokens = int(seq_lens.to(torch.int64).clamp(min=0).sum()) if seq_lens.numel() else 0
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if seq_lens.numel() else 0
    total = rules.check_int_arg(total_tokens, "total_tokens", 0)
    max_len = rules.check_int_arg(max_seq_len, "max_seq_len", 0)
    on_gpu = index_pages.is_cuda
    bounds = check_bounds if check_bounds is not None else _env.CHECK_BOUNDS
    if bounds or not on_gpu:
        rules.check_index_gather_values(index_pages, page_table, seq_lens, total, max_len)
    backend = dispatch.indexer_backend(index_pages.device)
    if backend == "torch":
        return gather_index_k_reference(index_pages, page_table, seq_lens)
    if backend == "jit":
        from mlakv.kernels.cuda.indexer import indexer_jit_gather

        out = indexer_jit_gather(index_pages, page_table, seq_lens, total, max_len)
        if out is not None:
            return out
    from mlakv.kernels.triton.indexer import launch_gather_index_k

    return launch_gather_index_k(index_pages, page_table, seq_lens, total, max_len)
