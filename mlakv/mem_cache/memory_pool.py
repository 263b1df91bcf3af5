"""The device KV pool of an MLA model: one paged buffer per layer, written through the dispatcher.

An MLA layer caches one compressed row per token, ``[k_nope (kv_lora_rank) | k_rope
(qk_rope_head_dim)]``, instead of per-head K and V. :class:`MLATokenToKVPool` owns those rows for
every layer an engine (or a pipeline stage, via ``start_layer``/``end_layer``) runs, and gives the
attention kernels, the write path, transfer engines and HiCache the views they need.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .kv_write import _CHECK_BOUNDS_DEFAULT, set_mla_kv_buffer_triton
from .torch_ref import get_mla_kv_buffer_torch

__all__ = ["MLATokenToKVPool", "FP8_DTYPES"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
LayerRef = Union[int, object]


class MLATokenToKVPool:
    """Per-layer paged KV buffers for MLA.

    Each layer owns ``kv_buffer[layer]`` of shape ``[size + page_size, 1, kv_lora_rank +
    qk_rope_head_dim]``. Slot 0 (the first page) is reserved as the dummy target of padded
    tokens, so usable slots are ``1 .. size + page_size - 1``. float8 pools store uint8
    (``store_dtype``) and view back to ``dtype`` on read.

    Args:
        size: number of token slots to allocate (excluding the reserved page).
        page_size: tokens per page (1 for token granularity).
        dtype: the cache dtype (float16, bfloat16, float32, float8_e4m3fn, float8_e5m2).
        kv_lora_rank: ``nope_dim``, the latent width.
        qk_rope_head_dim: ``rope_dim``.
        layer_num: number of layers held here.
        device: where the buffers live.
        start_layer: global id of the first layer held (pipeline parallelism); default 0.
        end_layer: one past the last global id held; default ``start_layer + layer_num``.
        check_bounds: check ``loc < num_slots`` on every write (syncs; for debugging).
    """

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        layer_num: int,
        device: Union[str, torch.device],
        start_layer: Optional[int] = None,
        end_layer: Optional[int] = None,
        *,
        check_bounds: bool = False,
    ) -> None:
        if size <= 0 or page_size <= 0 or layer_num <= 0:
            raise ValueError(f"size, page_size and layer_num must be positive, got {size}, {page_size}, {layer_num}")
        if kv_lora_rank <= 0 or qk_rope_head_dim <= 0:
            raise ValueError(f"kv_lora_rank and qk_rope_head_dim must be positive, got {kv_lora_rank}, {qk_rope_head_dim}")
        self.size = size
        self.page_size = page_size
        self.dtype = dtype
        self.store_dtype = torch.uint8 if dtype in FP8_DTYPES else dtype
        self.kv_lora_rank = kv_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.kv_cache_dim = kv_lora_rank + qk_rope_head_dim
        self.layer_num = layer_num
        self.device = torch.device(device)
        self.start_layer = 0 if start_layer is None else start_layer
        self.end_layer = self.start_layer + layer_num if end_layer is None else end_layer
        if self.end_layer - self.start_layer != layer_num:
            raise ValueError(
                f"end_layer - start_layer = {self.end_layer} - {self.start_layer} must equal layer_num={layer_num}"
            )
        self.check_bounds = check_bounds
        self._store_view = self.store_dtype != dtype
        self.num_slots = size + page_size
        self.kv_buffer = [
            torch.zeros((self.num_slots, 1, self.kv_cache_dim), dtype=self.store_dtype, device=self.device)
            for _ in range(layer_num)
        ]
        # Views in the pool dtype, made once: writes pass them with sources of the same dtype, so
        # an fp8 pool pays no per-call dtype views (the kernels copy bytes either way).
        self._dtype_views = [b.view(dtype) if self._store_view else b for b in self.kv_buffer]

    # ---- layer lookup -------------------------------------------------------------------
    def _local_layer(self, layer: LayerRef) -> int:
        layer_id = layer if type(layer) is int else getattr(layer, "layer_id", layer)
        if not isinstance(layer_id, int):
            raise TypeError(f"layer must be an int id or have an int .layer_id, got {type(layer).__name__}")
        if not self.start_layer <= layer_id < self.end_layer:
            raise IndexError(f"layer id {layer_id} is outside this pool's layers [{self.start_layer}, {self.end_layer})")
        return layer_id - self.start_layer

    # ---- reads --------------------------------------------------------------------------
    def get_key_buffer(self, layer_id: LayerRef) -> torch.Tensor:
        """The layer's whole buffer ``[num_slots, 1, kv_lora_rank + qk_rope_head_dim]`` as ``dtype``."""
        return self._dtype_views[self._local_layer(layer_id)]

    def get_value_buffer(self, layer_id: LayerRef) -> torch.Tensor:
        """The latent part ``[num_slots, 1, kv_lora_rank]`` of the layer's buffer (a view)."""
        return self.get_key_buffer(layer_id)[..., : self.kv_lora_rank]

    def get_kv_buffer(self, layer_id: LayerRef) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def get_mla_kv_buffer(
        self, layer: LayerRef, loc: torch.Tensor, dst_dtype: Optional[torch.dtype] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather rows ``loc`` of a layer as ``(k_nope [n_loc, kv_lora_rank], k_rope [n_loc, rope_dim])``.

        ``loc`` must hold valid slots. With bounds checking on (``check_bounds=True`` or
        ``MLAKV_CHECK_BOUNDS=1``; it syncs) an invalid slot raises ``IndexError``. Without it, the
        GPU kernel never reads outside the buffer: an invalid slot yields a zero row. The result is
        in the pool ``dtype``, or cast to ``dst_dtype`` when given.
        """
        buf = self.kv_buffer[self._local_layer(layer)]
        if loc.dim() != 1 or loc.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"loc must be a 1-D int32/int64 tensor, got {loc.dim()}-D {loc.dtype}")
        if (self.check_bounds or _CHECK_BOUNDS_DEFAULT or not buf.is_cuda) and loc.numel():
            lo, hi = int(loc.min()), int(loc.max())
            if lo < 0 or hi >= self.num_slots:
                raise IndexError(f"loc values must lie in [0, {self.num_slots}) for a gather, got [{lo}, {hi}]")
        if buf.is_cuda:
            from .triton_kernels import launch_get_kv_rows

            nope, rope = launch_get_kv_rows(buf, loc, self.kv_lora_rank, self.qk_rope_head_dim)
        else:
            nope, rope = get_mla_kv_buffer_torch(buf, loc, self.kv_lora_rank, self.qk_rope_head_dim)
        if self._store_view:
            nope, rope = nope.view(self.dtype), rope.view(self.dtype)
        if dst_dtype is not None and dst_dtype != nope.dtype:
            nope, rope = nope.to(dst_dtype), rope.to(dst_dtype)
        return nope, rope

    # ---- writes -------------------------------------------------------------------------
    def set_kv_buffer(
        self,
        layer: LayerRef,
        loc: torch.Tensor,
        cache_k_nope: torch.Tensor,
        cache_k_rope: torch.Tensor,
    ) -> None:
        """Write ``[k_nope | k_rope]`` rows of one layer at slots ``loc`` (``< 0``: padding, skipped).

        Args:
            layer: global layer id, or an object with ``.layer_id``.
            loc: ``[n_loc]`` int32/int64.
            cache_k_nope: ``[n_loc, (1,) kv_lora_rank]`` in the pool ``dtype``.
            cache_k_rope: ``[n_loc, (1,) qk_rope_head_dim]`` in the pool ``dtype``.
        """
        buf = self._dtype_views[self._local_layer(layer)]
        if cache_k_nope.shape[-1] != self.kv_lora_rank or cache_k_rope.shape[-1] != self.qk_rope_head_dim:
            raise ValueError(
                f"cache_k_nope/cache_k_rope last dims must be kv_lora_rank={self.kv_lora_rank} and "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, got {cache_k_nope.shape[-1]} and {cache_k_rope.shape[-1]}"
            )
        if cache_k_nope.dtype is not self.dtype or cache_k_rope.dtype is not self.dtype:
            raise TypeError(
                f"cache_k_nope/cache_k_rope must be {self.dtype} (the pool dtype), got "
                f"{cache_k_nope.dtype}/{cache_k_rope.dtype}; quantize before writing"
            )
        set_mla_kv_buffer_triton(buf, loc, cache_k_nope, cache_k_rope, check_bounds=self.check_bounds or None)

    set_mla_kv_buffer = set_kv_buffer  # the name some engines call the MLA write by

    # ---- sizes and raw buffers (transfer engines, HiCache) ------------------------------
    def get_kv_size_bytes(self) -> int:
        """Total bytes of all layers' buffers."""
        return sum(b.numel() * b.element_size() for b in self.kv_buffer)

    def get_contiguous_buf_infos(self) -> tuple[list[int], list[int], list[int]]:
        """``(data_ptrs, data_lens, item_lens)`` per layer: base address, buffer bytes, row (slot) bytes."""
        ptrs = [b.data_ptr() for b in self.kv_buffer]
        lens = [b.numel() * b.element_size() for b in self.kv_buffer]
        items = [b[0].numel() * b.element_size() for b in self.kv_buffer]
        return ptrs, lens, items

    def row_bytes(self) -> int:
        """Bytes of one token row of one layer."""
        return self.kv_cache_dim * self.kv_buffer[0].element_size()


