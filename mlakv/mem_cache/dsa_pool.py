"""The device KV pool of a DeepSeek-V3.2 / V4 model with sparse attention: the MLA cache and the DSA
indexer's key cache, per layer, in one object.

Why: DSA's lightning indexer scores every cached token for each query and keeps its own cache — one
128-value FP8 key and one fp32 scale per token (the page format:
:mod:`mlakv.ops.indexer_reference`). Both caches address the same token slots, so an engine
allocates, frees, moves and transfers them together. :class:`DSATokenToKVPool` is
:class:`~mlakv.mem_cache.memory_pool.MLATokenToKVPool` (every MLA method unchanged) plus, per layer,
``index_pages [num_index_pages, 8448]`` uint8 covering every physical slot: the token in physical row
``r`` of the MLA buffer has its indexer key in slot ``r`` (page ``r // 64``), so one ``loc`` serves
both writes, with the same padding, reserved-slot and DCP rules. An engine can treat it as sglang
treats its ``DSATokenToKVPool``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from mlakv.ops.indexer import get_index_k_buffer as _gather_index_k
from mlakv.ops.indexer import set_index_k_buffer as _store_index_k
from mlakv.ops.indexer_reference import INDEX_FORMAT
from mlakv.spec import rules

from .memory_pool import RESERVED_SLOT, MLATokenToKVPool

__all__ = ["DSATokenToKVPool"]

LayerRef = Union[int, object]


class DSATokenToKVPool(MLATokenToKVPool):
    """:class:`MLATokenToKVPool` plus the DSA indexer's key cache of every layer.

    Args:
        size, page_size, dtype, kv_lora_rank, qk_rope_head_dim, layer_num, device, start_layer,
            end_layer, and the keyword options: as :class:`MLATokenToKVPool`.
        index_head_dim: the indexer key's width; 128 (the only width the format has).
        index_scale_rule: ``"fp32"`` (sglang's scale, default) or ``"ue8m0"`` (rounded up to a power of two).

    Attributes:
        index_k_buffer: per layer, ``[num_index_pages, 8448]`` uint8 (64 slots per page:
            ``num_index_pages = ceil(num_slots / 64)``).
        index_page_size: 64, slots per indexer page.

    The indexer's page-table gather (:meth:`get_index_k_and_scale`) addresses 64-slot pages: a
    request's page table holds, for its tokens ``64 c .. 64 c + 63``, the indexer page holding their
    slots, which exists when the pool's pages are whole indexer pages (``page_size % 64 == 0``, as
    sglang's DSA pool has it). Raises ``MemoryError`` when the indexer pages do not fit the device's
    free memory after the MLA buffers.
    """

    def __init__(
        self, *args: Any, index_head_dim: int = rules.INDEX_HEAD_DIM, index_scale_rule: str = "fp32", **kwargs: Any
    ) -> None:
        if isinstance(index_head_dim, bool) or index_head_dim != rules.INDEX_HEAD_DIM:
            raise ValueError(f"index_head_dim must be {rules.INDEX_HEAD_DIM} (the indexer key's width), got {index_head_dim!r}")
        rules.check_index_scale_rule(index_scale_rule)
        super().__init__(*args, **kwargs)
        layer_num = self.layer_num
        self.index_head_dim = rules.INDEX_HEAD_DIM
        self.index_page_size = rules.INDEX_PAGE_TOKENS
        self.index_scale_rule = index_scale_rule
        self.num_index_pages = -(-self.num_slots // rules.INDEX_PAGE_TOKENS)
        need = layer_num * self.num_index_pages * rules.INDEX_PAGE_BYTES
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if free is not None and need > free:
            raise MemoryError(
                f"DSATokenToKVPool's indexer pages need {need / 2**30:.2f} GiB ({layer_num} layers x "
                f"{self.num_index_pages} pages x {rules.INDEX_PAGE_BYTES} bytes) but {self.device} has "
                f"{free / 2**30:.2f} GiB free after the MLA buffers"
            )
        shape = INDEX_FORMAT.buffer_shape(self.num_index_pages * rules.INDEX_PAGE_TOKENS, rules.INDEX_PAGE_TOKENS)
        self.index_k_buffer = [torch.zeros(shape, dtype=torch.uint8, device=self.device) for _ in range(layer_num)]

    # ---- the indexer cache ------------------------------------------------------------------
    def set_index_k_buffer(self, layer: LayerRef, loc: torch.Tensor, index_k: torch.Tensor) -> None:
        """Quantize and store one layer's indexer keys at *logical* slots ``loc`` (one launch on the GPU).

        ``loc``: ``[n]`` int32/int64, any stride, the same slots the layer's MLA rows were written at
        (padding ``< 0`` and the reserved slot 0 skipped; with DCP this rank keeps ``loc % W ==
        dcp_rank`` at ``loc // W``). ``index_k``: ``[n, 128]`` or ``[n, 1, 128]`` bf16/fp16.
        Bounds as the MLA write (``check_bounds``).
        """
        _store_index_k(
            self.index_k_buffer[self.local_layer(layer)], loc, index_k, check_bounds=self.check_bounds,
            reserved_skip_index=RESERVED_SLOT, dcp_world_size=self.dcp_world_size, dcp_rank=self.dcp_rank,
            scale_rule=self.index_scale_rule,
        )  # fmt: skip

    def get_index_k_buffer(self, layer: LayerRef) -> torch.Tensor:
        """The layer's indexer pages ``[num_index_pages, 8448]`` uint8 (physical slots; a view, not a copy)."""
        return self.index_k_buffer[self.local_layer(layer)]

    get_index_k_with_scale_buffer = get_index_k_buffer  # sglang's name for the same buffer

    def get_index_k_and_scale(
        self,
        layer: LayerRef,
        page_table: torch.Tensor,
        seq_lens: torch.Tensor,
        total_tokens: Optional[int] = None,
        max_seq_len: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the indexer keys of whole requests: ``(k [total, 128] float8_e4m3fn, scale [total] float32)``.

        ``page_table [batch, max_pages]`` holds indexer page ids (64 slots each), ``seq_lens [batch]``
        the requests' lengths; ``total_tokens``/``max_seq_len`` as :func:`mlakv.ops.indexer.get_index_k_buffer`
        (None: computed, which syncs). Bounds as the pool's ``check_bounds``.
        """
        return _gather_index_k(
            self.index_k_buffer[self.local_layer(layer)], page_table, seq_lens, total_tokens=total_tokens,
            max_seq_len=max_seq_len, check_bounds=self.check_bounds,
        )  # fmt: skip

    def get_k_and_scale(
        self,
        layer_id: LayerRef,
        seq_len_tensor: torch.Tensor,
        page_indices: torch.Tensor,
        seq_len_sum: Optional[int] = None,
        max_seq_len: Optional[int] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`get_index_k_and_scale` with the argument order of sglang's index-key cache."""
        return self.get_index_k_and_scale(layer_id, page_indices, seq_len_tensor, seq_len_sum, max_seq_len)

    # ---- whole-pool operations that must carry the indexer half -----------------------------
    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor, *, disjoint: bool = False) -> None:
        """Copy slots ``src_loc -> tgt_loc`` (physical) in every layer's MLA rows and indexer keys and
        scales, from the pre-move state. The MLA half: :meth:`MLATokenToKVPool.move_kv_cache`; the
        indexer half: the same pairs (pairs with a slot outside the buffer are skipped unchecked on GPU;
        the MLA half has raised for them first when checked)."""
        super().move_kv_cache(tgt_loc, src_loc, disjoint=disjoint)
        tgt = tgt_loc.to(self.device, torch.int64).reshape(-1)
        src = src_loc.to(self.device, torch.int64).reshape(-1)
        limit = self.num_index_pages * rules.INDEX_PAGE_TOKENS
        keep = (tgt >= 0) & (tgt < limit) & (src >= 0) & (src < limit)
        tgt, src = tgt[keep], src[keep]
        if tgt.numel() == 0:
            return
        key_cols = torch.arange(rules.INDEX_HEAD_DIM, device=self.device)
        scale_cols = torch.arange(4, device=self.device)
        key_off = rules.INDEX_PAGE_TOKENS * rules.INDEX_HEAD_DIM

        def cols(slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            page, pos = (slot // rules.INDEX_PAGE_TOKENS)[:, None], (slot % rules.INDEX_PAGE_TOKENS)[:, None]
            return page, pos * rules.INDEX_HEAD_DIM + key_cols, key_off + pos * 4 + scale_cols

        tp, tk, ts = cols(tgt)
        sp, sk, ss = cols(src)
        for buf in self.index_k_buffer:
            keys, scales = buf[sp, sk], buf[sp, ss]  # read everything before writing: overlapping sets move the old bytes
            buf[tp, tk] = keys
            buf[tp, ts] = scales

    def get_cpu_copy(self, indices: torch.Tensor, chunk_size: int = 8192) -> dict[str, list[list[torch.Tensor]]]:
        """Copy slots ``indices`` (``[n]`` int, physical rows) of every layer to the CPU: the MLA rows and
        the same slots' indexer keys and scales, so a retracted request resumes with both halves (its
        slots may be reused while it is offloaded). Syncs the device.

        Returns ``{"kv": kv, "index_k": index_k}`` (the keys of sglang's DSA pool): ``kv[layer][chunk]``
        as :meth:`MLATokenToKVPool.get_cpu_copy`; ``index_k[layer][chunk]``: ``[<= chunk_size, 132]``
        uint8, row ``i`` the slot's 128 key bytes then its 4 scale bytes, ``indices`` taken
        ``chunk_size`` at a time as for ``kv``. Slot by slot, so any slots may be copied (sglang copies
        whole indexer pages and needs page-aligned ``indices``).
        """
        kv = super().get_cpu_copy(indices, chunk_size)  # checks indices and chunk_size
        idx = self._checked_slots(indices, "indices")
        index_k = []
        for buf in self.index_k_buffer:
            flat = buf.view(-1)
            index_k.append([flat[self._index_bytes(idx[i : i + chunk_size])].to("cpu")
                            for i in range(0, idx.numel(), chunk_size)])  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"kv": kv, "index_k": index_k}

    def load_cpu_copy(self, kv_cache_cpu: dict[str, list[list[torch.Tensor]]], indices: torch.Tensor) -> None:
        """Write back what :meth:`get_cpu_copy` returned at slots ``indices`` (same count and chunking):
        the MLA rows and the indexer keys and scales. Every check (both halves) runs before anything
        is written; a snapshot without its indexer half (an MLA pool's list) raises ``TypeError``."""
        if not isinstance(kv_cache_cpu, dict) or set(kv_cache_cpu) != {"kv", "index_k"}:
            raise TypeError(
                "kv_cache_cpu must be the dict a DSATokenToKVPool's get_cpu_copy returns ({'kv': ..., 'index_k': ...}), "
                f"got {type(kv_cache_cpu).__name__}" + (f" with keys {sorted(kv_cache_cpu)}" if isinstance(kv_cache_cpu, dict) else "")
            )
        idx = self._checked_slots(indices, "indices")
        index_k = kv_cache_cpu["index_k"]
        if not isinstance(index_k, (list, tuple)) or len(index_k) != self.layer_num:
            raise ValueError(f"kv_cache_cpu['index_k'] must hold {self.layer_num} layers of chunks")
        width = rules.INDEX_HEAD_DIM + 4
        for layer, chunks in enumerate(index_k):
            for c in chunks:
                if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != width or c.dtype != torch.uint8:
                    raise ValueError(f"kv_cache_cpu['index_k'][{layer}]: chunks must be [rows, {width}] uint8")
            got = sum(c.shape[0] for c in chunks)
            if got != idx.numel():
                raise ValueError(f"kv_cache_cpu['index_k'][{layer}] holds {got} slots but indices has {idx.numel()}")
        super().load_cpu_copy(kv_cache_cpu["kv"], indices)  # checks the MLA half, then writes it
        for buf, chunks in zip(self.index_k_buffer, index_k):
            flat, start = buf.view(-1), 0
            for c in chunks:
                flat[self._index_bytes(idx[start : start + c.shape[0]])] = c.to(self.device, non_blocking=True)
                start += c.shape[0]

    def _index_bytes(self, slots: torch.Tensor) -> torch.Tensor:
        """Byte offsets ``[n, 132]`` (int64) into a layer's flattened indexer pages of slots ``slots`` (``[n]``
        int64 on the pool device): the slot's 128 key bytes, then its 4 scale bytes."""
        page, pos = slots // rules.INDEX_PAGE_TOKENS, slots % rules.INDEX_PAGE_TOKENS
        base = (page * rules.INDEX_PAGE_BYTES)[:, None]
        keys = base + pos[:, None] * rules.INDEX_HEAD_DIM + torch.arange(rules.INDEX_HEAD_DIM, device=slots.device)
        key_bytes = rules.INDEX_PAGE_TOKENS * rules.INDEX_HEAD_DIM
        scales = base + key_bytes + pos[:, None] * 4 + torch.arange(4, device=slots.device)
        return torch.cat([keys, scales], dim=1)

    # ---- sizes and raw buffers (transfer engines, HiCache) ----------------------------------
    def get_index_k_size_bytes(self) -> int:
        """Bytes of all layers' indexer pages."""
        return sum(b.numel() for b in self.index_k_buffer)

    def get_kv_size_bytes(self) -> int:
        """Bytes of all layers' buffers: the MLA rows and the indexer pages."""
        return super().get_kv_size_bytes() + self.get_index_k_size_bytes()

    def get_state_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """``(data_ptrs, data_lens, item_lens)`` of the indexer pages per layer: base address, buffer
        bytes, page bytes (8448; one item is one 64-slot page). The MLA rows' infos stay
        :meth:`get_contiguous_buf_infos` (one item per slot)."""
        ptrs = [b.data_ptr() for b in self.index_k_buffer]
        lens = [b.numel() for b in self.index_k_buffer]
        items = [rules.INDEX_PAGE_BYTES for _ in self.index_k_buffer]
        return ptrs, lens, items

    def index_page_bytes(self) -> int:
        """Bytes of one indexer page of one layer (64 slots: 64 x 128 key bytes + 64 x 4 scale bytes)."""
        return rules.INDEX_PAGE_BYTES
