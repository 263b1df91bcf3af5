"""The HiCache L3 storage interface that every page store implements.

HiCache moves whole host pages (all layers of ``page_size`` tokens) between the pinned host pool
(:class:`mlakv.mem_cache.host_pool.MLATokenToKVPoolHost`, L2) and a page store (L3). The interface
is shaped like sglang's HiCache storage so an engine can swap backends: a local directory
(:class:`mlakv.mem_cache.storage.LocalFileStorage`) or a distributed store shared by many machines
(:class:`mlakv.mem_cache.storage.mooncake.MooncakeStorage`).

This module is a leaf: it imports nothing else of mlakv.
"""

from __future__ import annotations

import abc
from typing import Any, Optional, Sequence, Union

import torch

__all__ = ["HiCacheStorage", "StorageKey", "pool_format"]

#: A page key: ``str`` (or ``bytes``, UTF-8). Anything else is a ``TypeError``.
StorageKey = Union[str, bytes]


def pool_format(host_pool: Any) -> str:
    """What a host pool's page bytes mean, as a string two pools share only if a page of one is a page
    of the other (the byte order inside a page aside, which a store records or keys separately):
    value dtype, FP8 cache format (``raw`` when rows are exact copies of the dtype), ``nope+rope``
    widths, row bytes, the cache format's :meth:`~mlakv.spec.formats.CacheFormat.key` at the pool's
    page size (value dtype, scale kind and tile, arrangement, page bytes: a V41 page never reads as a
    V4 or V41_NEW one), and for a scaled format the scale now in use (``per_tensor``'s ``k_scale``:
    pages quantized with one scale are garbage under another), e.g.
    ``"bfloat16-raw-512+64-1152B-bfloat16:nope512:rope64:bfloat16:none0:rows:page1:1152B"``. Reads a
    CUDA ``k_scale`` (one sync)."""
    dev = host_pool.device_pool
    dtype = str(dev.dtype).removeprefix("torch.")
    fmt = getattr(dev, "kv_cache_format", None) or "raw"
    out = f"{dtype}-{fmt}-{dev.kv_lora_rank}+{dev.qk_rope_head_dim}-{host_pool.row_bytes}B"
    cache_format = getattr(dev, "format", None)
    if cache_format is not None:  # the format's own key: value dtype, scales, arrangement, page bytes
        out += f"-{cache_format.key(dev.page_size)}"
    if getattr(dev, "index_k_buffer", None) is not None:  # a DSA pool: each page carries its indexer half
        out += f"-indexer{dev.index_page_bytes()}B-{dev.index_scale_rule}"
    scale = getattr(dev, "k_scale", None)
    if scale is not None:
        value = float(scale.reshape(-1)[0]) if isinstance(scale, torch.Tensor) else float(scale)
        out += f"-s{value!r}"
    return out


class HiCacheStorage(abc.ABC):
    """A store of fixed-size pages under string keys.

    Attributes:
        page_bytes: the size every page has (``MLATokenToKVPoolHost.page_bytes``).

    Semantics every backend keeps:

    * ``get`` never returns a page that differs from what ``set`` stored: a corrupted, truncated or
      foreign page is a miss (``None``), counted in ``stats()["corrupt"]``. A page is bound to its key
      and to its pool's :func:`pool_format` and shape (layers, tokens): the same bytes found under
      another key, or stored by a pool of another dtype, FP8 format, scale, width, layer range or page
      size, are foreign.
    * ``set`` is all-or-nothing per page: after a crash or an error a key holds its old page or the
      new one, never a torn one. An error (disk full, server gone) raises with a clear message.
    * The batch calls work on whole host pages named by their first token slot
      (``host_indices[i] % page_size == 0``), and move bytes between the host pool's buffer and the
      store without Python byte copies where the backend can.
    """

    page_bytes: int

    # ---- one page ------------------------------------------------------------------------
    @abc.abstractmethod
    def exists(self, key: StorageKey) -> bool:
        """Whether a page is stored under ``key``."""

    @abc.abstractmethod
    def get(self, key: StorageKey) -> Optional[bytes]:
        """The page under ``key`` (``page_bytes`` bytes), or ``None`` if absent or unreadable."""

    @abc.abstractmethod
    def set(self, key: StorageKey, data: Any) -> None:
        """Store one page (``bytes``-like or a 1-D uint8 array/tensor of exactly ``page_bytes`` bytes)."""

    # ---- batches -------------------------------------------------------------------------
    def batch_exists(self, keys: Sequence[StorageKey]) -> int:
        """Length of the leading run of present keys (a prefix match: stops at the first miss)."""
        n = 0
        for k in keys:
            if not self.exists(k):
                break
            n += 1
        return n

    def register_mem_pool_host(self, host_pool: Any) -> None:
        """Attach the host pool whose pages the batch calls move (once, before them)."""
        self.host_pool = host_pool

    @abc.abstractmethod
    def batch_get_into(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> int:
        """Load pages ``keys[i]`` into the host page starting at slot ``host_indices[i]``.

        ``host_indices``: ``[n_keys]`` first token slot of each host page (or ``[n_keys * page_size]``
        token slots of whole pages). Returns how many leading pages were loaded; pages after the
        first miss are not touched (a backend that reads straight into host memory may have written
        into the page at the first miss: its contents are undefined, as for any page not loaded).
        A page stored from a host pool of another layout arrives in this host pool's own layout.
        """

    @abc.abstractmethod
    def batch_set_from(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> int:
        """Store the host pages starting at ``host_indices[i]`` under ``keys[i]``; return how many
        were stored (all of them, or an error is raised)."""

    def stats(self) -> dict[str, int]:
        """Counters: at least ``hits``, ``misses``, ``corrupt``."""
        return dict(getattr(self, "_stats", {"hits": 0, "misses": 0, "corrupt": 0}))
