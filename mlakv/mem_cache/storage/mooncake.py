"""HiCache's third tier on Mooncake Store: pages shared by every engine that talks to one master.

:class:`MooncakeStorage` implements :class:`~mlakv.mem_cache.storage.base.HiCacheStorage` on a real
Mooncake Store (the distributed KV store sglang's ``--hicache-storage-backend mooncake`` and vLLM's
``MooncakeStoreConnector`` use), so a page backed up by one node is found by another. It is the
same store those engines use, over TCP here and RDMA in production; mlakv adds only what a page
cache needs on top:

* **Keys that name what a page is.** :func:`mooncake_page_key` prefixes the caller's prefix hash with
  the model id, the layer range, the page size and the format (dtype, FP8 cache format, widths, row
  bytes, ``per_tensor``'s ``k_scale``, and the byte order inside a page: ``LTR`` layer-major for
  ``layer_first``/``page_first_direct``, ``TLR`` token-major for ``page_first``), so pools of
  different layouts or scales never read each other's pages.
* **A checksum per page, bound to its key.** Every object is the page followed by a 16-byte trailer
  (magic, version, XXH3-64 of the page seeded with a hash of the object's full store key). A read
  whose size or trailer does not match is a miss, counted in ``stats()["corrupt"]``: so is an object
  copied under another key (by a raw client, a buggy peer), since its checksum was seeded with the
  key it was written for, and the key names the pool's format and scale. (XXH3 guards against
  mistakes, not against an adversary with write access to the store.)
* **Zero copy.** The host pool's buffer is registered with the store once; the batch calls hand the
  store the pieces ``MLATokenToKVPoolHost.get_page_buffer_meta`` names (one per page for
  ``page_first`` / ``page_first_direct``, one per layer of a page for ``layer_first``), plus the
  page's trailer slot in a small registered array. The single-page ``get``/``set`` copy, and use
  the canonical ``[layer][token][row]`` order of ``get_page_bytes``/``set_page_bytes``.
* **Faults said clearly.** No master at setup: :class:`MooncakeConnectionError` at once (the caller keeps
  HiCache on L2). The master gone during a batch: that batch raises :class:`MooncakeConnectionError`,
  its destination host pages are zeroed (never half-loaded), and later calls fail fast until
  ``retry_interval`` has passed, then reconnect if the master is back. The store full: ``set`` is
  refused with :class:`MooncakeStoreFull` naming how many pages were stored. (Mooncake is a cache:
  above its high watermark it evicts older objects in the background, so earlier pages may make room
  for later ones; what it still holds reads back exactly.)

Across host layouts: pages are stored in the host pool's own byte order (that is what makes the
batches zero-copy), and the order is part of the key. A ``page_first`` (token-major) pool and a
layer-major pool (``layer_first``, ``page_first_direct``) therefore do not share pages: to each other
such a page is a miss, never a page in the wrong order. Layer-major pools of either layout share.

Not thread-safe: one storage object per engine thread.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .mooncake_install import MooncakeUnavailable, check_mooncake
from .base import HiCacheStorage, StorageKey, pool_format

__all__ = [
    "MooncakeConnectionError",
    "MooncakeStorage",
    "MooncakeStoreError",
    "MooncakeStoreFull",
    "TRAILER_BYTES",
    "default_checksum_threads",
    "mooncake_page_key",
    "page_format",
]

#: The trailer after each page: magic, version, reserved, XXH3-64 of the page seeded with the XXH3-64
#: of the object's store key. XXH3 rather than zlib's CRC-32 because the checksum is this layer's main
#: cost: ~12 GB/s against ~2 GB/s per core.
_TRAILER = struct.Struct("<4sHHQ")
TRAILER_BYTES = _TRAILER.size  # 16
_MAGIC = b"MLKV"
_VERSION = 2  # 2: the checksum is seeded with the store key

# Mooncake's error codes (mooncake-store/include/types.h) that this module reacts to.
_NO_AVAILABLE_HANDLE = -200  # no space left in any segment
_OBJECT_NOT_FOUND = -704
_RPC_FAIL = -900
_CODE_NAMES = {
    -200: "NO_AVAILABLE_HANDLE (store full)",
    -600: "INVALID_PARAMS",
    -704: "OBJECT_NOT_FOUND",
    -900: "RPC_FAIL (master unreachable)",
}


class MooncakeStoreError(RuntimeError):
    """A Mooncake operation failed (the message names the key, the code and its meaning)."""


class MooncakeConnectionError(MooncakeStoreError):
    """The master is not reachable (at setup, or it went away). HiCache can go on without L3."""


class MooncakeStoreFull(MooncakeStoreError):
    """The store has no room for a page; ``stored`` pages of the batch (its leading ones) were stored."""

    def __init__(self, msg: str, stored: int) -> None:
        super().__init__(msg)
        self.stored = stored


def _code(rc: int) -> str:
    return f"{rc} {_CODE_NAMES.get(rc, '')}".strip()


def _token_major(host_pool: Any) -> bool:
    """Whether the pool's pages are stored token-major (``page_first``: ``[token][layer][row]``)."""
    return host_pool.layout == "page_first"


def page_format(host_pool: Any) -> str:
    """The page format of a pool as a key component: :func:`~mlakv.mem_cache.storage.base.pool_format`
    (dtype, FP8 cache format, ``nope+rope`` widths, row bytes, the cache format's key at the pool's
    page size, ``per_tensor``'s scale) and the byte order of a stored page, e.g.
    ``"bfloat16-v41-448+64-528B-v41:nope448:rope64:float8_e4m3fn:ue8m032:split_pages:page64:33792B-LTR"``.
    Pools with different formats (a V41 and a V4 pool) or ``k_scale`` values get different keys."""
    order = "TLR" if _token_major(host_pool) else "LTR"
    return f"{pool_format(host_pool)}-{order}"


def mooncake_page_key(
    prefix_hash: StorageKey, model_id: str, layer_range: tuple[int, int], page_size: int, fmt: str
) -> str:
    """The store key of one page: ``mlakv/<model_id>/L<start>-<end>/P<page_size>/<fmt>/<prefix_hash>``.

    ``prefix_hash`` is the page's chained prefix hash (:func:`mlakv.mem_cache.storage.prefix_page_key`);
    ``layer_range`` is ``[start, end)`` of the layers the page holds; ``fmt`` is :func:`page_format`.
    Two pools share pages only if all five agree.
    """
    if isinstance(prefix_hash, bytes):
        prefix_hash = prefix_hash.decode()
    if not isinstance(prefix_hash, str) or not prefix_hash:
        raise TypeError(f"prefix_hash must be a non-empty str or bytes, got {prefix_hash!r}")
    for name, part in (("model_id", model_id), ("fmt", fmt)):
        if not isinstance(part, str) or not part or "/" in part:
            raise ValueError(f"{name} must be a non-empty string without '/', got {part!r}")
    start, end = (int(x) for x in layer_range)
    if not 0 <= start < end:
        raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, got {layer_range}")
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    return f"mlakv/{model_id}/L{start}-{end}/P{page_size}/{fmt}/{prefix_hash}"


def _require_xxhash():
    """The ``xxhash`` module (page checksums), or :class:`MooncakeUnavailable` naming the install."""
    try:
        import xxhash
    except ImportError as e:
        raise MooncakeUnavailable("MooncakeStorage checksums pages with XXH3: pip install xxhash") from e
    return xxhash


def default_checksum_threads(cores: Optional[int] = None) -> int:
    """Hash threads for ``cores`` CPU cores (default: this host's): ``min(4, cores // 4)``, at least 1.

    XXH3 runs at ~40 GB/s on data in cache but at DRAM speed (~16-18 GB/s on the 2-core CPU machine)
    on a batch, so a thread per core does not scale it; and the loopback/RDMA transfer needs cores
    of its own. Threads only pay where cores (and memory channels) are to spare."""
    cores = (os.cpu_count() or 1) if cores is None else int(cores)
    return max(1, min(4, cores // 4))


def _master_listening(addr: str, timeout: float) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class MooncakeStorage(HiCacheStorage):
    """Host pages of one :class:`~mlakv.mem_cache.host_pool.MLATokenToKVPoolHost` in a Mooncake Store.

    Args:
        host_pool: the host (L2) pool whose pages are stored; its buffer is registered with the store.
        master_addr: the master's RPC address, ``"host:port"`` (``MooncakeMaster.master_addr``).
        metadata_url: the transfer engine's metadata server (``MooncakeMaster.metadata_url``).
        model_id: names the model in every key (no ``/``).
        local_hostname: this node's address as the other nodes reach it.
        global_segment_bytes: memory this node contributes to the store (at least 16 MiB).
        local_buffer_bytes: the client's staging buffer for the non-zero-copy ``get``/``set``.
        protocol, rdma_devices: ``"tcp"`` (tests, CPU machines) or ``"rdma"`` with device names.
        connect_timeout: seconds to wait for the master's port before giving up.
        retry_interval: after a connection failure, calls fail fast for this many seconds, then
            the next call tries to reconnect.
        checksum_threads: threads computing a batch's page checksums; default :func:`default_checksum_threads`
            (one below 8 cores). The checksum is most of this layer's cost over raw Mooncake, and it is
            bound by memory bandwidth, not by the core: on a 2-core host a second hash thread only takes
            a core from the transfer (set +24 % over raw with 2 threads, +12 % with 1: measured).
        pipeline_pages: pages per chunk of a batch (the first chunks of a set and the last of a
            get are smaller, from ``pipeline_pages // 8``, where hash threads run); hashing one chunk
            overlaps moving the next.

    Raises :class:`MooncakeConnectionError` at once if no master listens at ``master_addr``, and
    :class:`~mlakv.mem_cache.storage.mooncake_install.MooncakeUnavailable` if Mooncake is not installed.
    Call :meth:`close` (or use ``with``) while the master still runs: a client whose master died
    takes several seconds to close.
    """

    def __init__(
        self,
        host_pool: Any,
        master_addr: str,
        metadata_url: str,
        *,
        model_id: str = "default",
        local_hostname: str = "127.0.0.1",
        global_segment_bytes: int = 256 << 20,
        local_buffer_bytes: int = 64 << 20,
        protocol: str = "tcp",
        rdma_devices: str = "",
        connect_timeout: float = 2.0,
        retry_interval: float = 5.0,
        checksum_threads: Optional[int] = None,
        pipeline_pages: int = 64,
    ) -> None:
        check_mooncake()
        self._xxh = _require_xxhash()
        if global_segment_bytes < 16 << 20:
            raise ValueError(f"global_segment_bytes must be at least 16 MiB (Mooncake's minimum), got {global_segment_bytes}")
        self.master_addr, self.metadata_url = master_addr, metadata_url
        self.model_id = model_id
        self._setup_args = (local_hostname, metadata_url, int(global_segment_bytes), int(local_buffer_bytes),
                            protocol, rdma_devices, master_addr)
        self.connect_timeout, self.retry_interval = connect_timeout, retry_interval
        self._store = None
        self._down_since: Optional[float] = None
        self._down_reason = ""
        self._stats = {"hits": 0, "misses": 0, "corrupt": 0, "stored": 0, "errors": 0}
        threads = default_checksum_threads() if checksum_threads is None else int(checksum_threads)
        if threads < 1:
            raise ValueError(f"checksum_threads must be >= 1, got {checksum_threads}")
        if pipeline_pages < 1:
            raise ValueError(f"pipeline_pages must be >= 1, got {pipeline_pages}")
        self.pipeline_pages = int(pipeline_pages)
        self._hash_pool = ThreadPoolExecutor(threads, thread_name_prefix="mlakv-xxh3") if threads > 1 else None
        self.host_pool = None
        self.register_mem_pool_host(host_pool)
        if local_buffer_bytes < self.page_bytes + TRAILER_BYTES:
            raise ValueError(f"local_buffer_bytes ({local_buffer_bytes}) must hold one page + trailer "
                             f"({self.page_bytes + TRAILER_BYTES} B)")
        self._connect()

    # ---- connection ----------------------------------------------------------------------
    def _connect(self) -> None:
        """Set up a client on a listening master and register the host buffers (raises if not)."""
        if not _master_listening(self.master_addr, self.connect_timeout):
            raise MooncakeConnectionError(
                f"Mooncake master at {self.master_addr} is not reachable (nothing listens there); "
                "start one (mlakv.testing.mooncake_master.MooncakeMaster) or run HiCache without L3"
            )
        from mooncake.store import MooncakeDistributedStore

        store = MooncakeDistributedStore()
        rc = store.setup(*self._setup_args)
        if rc != 0:
            raise MooncakeConnectionError(
                f"Mooncake client setup against master {self.master_addr} (metadata {self.metadata_url}) failed: rc={rc}"
            )
        for name, t in (("host pool buffer", self._flat), ("write trailers", self._wtrail_t),
                        ("read trailers", self._rtrail_t)):
            rc = store.register_buffer(t.data_ptr(), t.numel() * t.element_size())
            if rc != 0:
                store.close()
                raise MooncakeStoreError(f"registering the {name} with Mooncake failed: rc={rc}")
        self._store = store
        self._down_since = None

    def _client(self):
        """The live client; fails fast while the master is known to be down, reconnects after
        ``retry_interval``."""
        if self._store is not None and self._down_since is None:
            return self._store
        if self._down_since is not None and time.monotonic() - self._down_since < self.retry_interval:
            raise MooncakeConnectionError(
                f"Mooncake master {self.master_addr} is down ({self._down_reason}); failing fast for "
                f"{self.retry_interval:.0f}s before trying to reconnect"
            )
        old, self._store = self._store, None
        if old is not None and _master_listening(self.master_addr, self.connect_timeout):
            old.close()
        try:
            self._connect()
        except MooncakeConnectionError as e:
            self._mark_down(str(e))
            raise
        return self._store

    def _mark_down(self, reason: str) -> None:
        self._down_since = time.monotonic()
        self._down_reason = reason
        self._stats["errors"] += 1

    def close(self) -> None:
        """Close the client (its segment leaves the store). Safe to call twice."""
        store, self._store = self._store, None
        if store is not None:
            store.close()
        if self._hash_pool is not None:
            self._hash_pool.shutdown()
            self._hash_pool = None

    def __enter__(self) -> "MooncakeStorage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def raw_client(self):
        """The underlying ``MooncakeDistributedStore`` (for tests and the raw-bytes benchmark)."""
        return self._client()

    # ---- pool and keys ---------------------------------------------------------------------
    def register_mem_pool_host(self, host_pool: Any) -> None:
        """Attach ``host_pool`` (the batch calls move its pages); sets ``page_bytes`` and the key
        namespace from its layout. Re-registering a different pool re-registers the buffers."""
        if not hasattr(host_pool, "get_page_buffer_meta"):
            raise TypeError("host_pool must be an MLATokenToKVPoolHost (it has no get_page_buffer_meta)")
        if host_pool.kv_buffer.device.type != "cpu" or not host_pool.kv_buffer.is_contiguous():
            raise ValueError("host_pool.kv_buffer must be a contiguous CPU (pinned or pageable) tensor")
        first = self.host_pool is None
        self.host_pool = host_pool
        self.page_size = host_pool.page_size
        self.page_bytes = host_pool.page_bytes
        self.layer_range = (host_pool.start_layer, host_pool.start_layer + host_pool.layer_num)
        self.format = page_format(host_pool)
        self._flat = host_pool.kv_buffer.view(-1).view(torch.uint8)  # the whole buffer as bytes
        self._np = self._flat.numpy()
        self._base = self._flat.data_ptr()
        self._wtrail_t = torch.zeros(host_pool.num_pages, TRAILER_BYTES, dtype=torch.uint8)
        self._rtrail_t = torch.zeros(host_pool.num_pages, TRAILER_BYTES, dtype=torch.uint8)
        self._wtrail, self._rtrail = self._wtrail_t.numpy(), self._rtrail_t.numpy()
        if not first and self._store is not None:
            old, self._store = self._store, None
            old.close()
            self._connect()

    def store_key(self, key: StorageKey) -> str:
        """The Mooncake key of page ``key`` (a prefix hash) for this pool (its format as it is now)."""
        return self._store_keys([key])[0]

    def _store_keys(self, keys: Sequence[StorageKey]) -> list[str]:
        """The store keys of ``keys``; the pool's format (a ``per_tensor`` scale may have changed since
        the last call) is read once per call."""
        self.format = page_format(self.host_pool)
        return [mooncake_page_key(k, self.model_id, self.layer_range, self.page_size, self.format) for k in keys]

    def _seed(self, skey: str) -> int:
        """The checksum seed of the object stored under ``skey``: binds its bytes to the key."""
        return self._xxh.xxh3_64_intdigest(skey.encode())

    def _segments(self, pages: Sequence[int]) -> list[list[tuple[int, int]]]:
        """Per host page, its ``(ptr, nbytes)`` pieces in stored order (the host pool's
        ``get_page_buffer_meta``: one piece for contiguous-page layouts, one per layer otherwise)."""
        p = self.page_size
        slots = (torch.tensor(pages, dtype=torch.int64)[:, None] * p + torch.arange(p)).flatten()
        ptrs, nbytes = self.host_pool.get_page_buffer_meta(slots)
        k = len(ptrs) // len(pages)
        return [list(zip(ptrs[i * k : (i + 1) * k], nbytes[i * k : (i + 1) * k])) for i in range(len(pages))]

    def _views(self, segs: list[tuple[int, int]]) -> list[np.ndarray]:
        """numpy views (no copy) of one page's pieces."""
        out = []
        for ptr, n in segs:
            off = ptr - self._base
            if not 0 <= off <= self._np.size - n:
                raise RuntimeError(f"host pool piece [{off}, {off + n}) lies outside its buffer ({self._np.size} B)")
            out.append(self._np[off : off + n])
        return out

    def _checksum(self, segs: list[tuple[int, int]], seed: int) -> int:
        """XXH3-64 of one page's pieces, in order, seeded with its key's seed."""
        views = self._views(segs)
        if len(views) == 1:
            return self._xxh.xxh3_64_intdigest(views[0], seed=seed)
        h = self._xxh.xxh3_64(seed=seed)
        for v in views:
            h.update(v)
        return h.intdigest()

    def _trailer(self, digest: int) -> bytes:
        return _TRAILER.pack(_MAGIC, _VERSION, 0, digest)

    def _trailer_ok(self, trailer: bytes, digest: int) -> bool:
        magic, version, _, want = _TRAILER.unpack(trailer)
        return magic == _MAGIC and version == _VERSION and want == digest

    def _pages(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> list[int]:
        """Validate ``host_indices`` (first slots ``[n_keys]`` or whole pages ``[n_keys * page_size]``)
        and return the host page numbers."""
        if not isinstance(host_indices, torch.Tensor) or host_indices.dim() != 1 or host_indices.dtype not in (torch.int32, torch.int64):
            raise ValueError("host_indices must be a 1-D int32/int64 tensor of host token slots")
        n, p = len(keys), self.page_size
        idx = host_indices.to("cpu", torch.int64)
        if idx.numel() == n * p and p > 1:
            runs = idx.view(n, p)
            if bool((runs - runs[:, :1] != torch.arange(p)).any()):
                raise ValueError(f"host_indices: [n_keys * page_size] slots must be whole pages of {p} in order")
            idx = runs[:, 0]
        elif idx.numel() != n:
            raise ValueError(f"host_indices has {idx.numel()} entries; expected {n} (one per key) or {n * p} (whole pages)")
        size = self.host_pool.size
        if n and (int(idx.min()) < 0 or int(idx.max()) >= size):
            raise IndexError(f"host_indices: slots must lie in [0, {size}), got [{int(idx.min())}, {int(idx.max())}]")
        if bool((idx % p != 0).any()):
            raise ValueError(f"host_indices: each page's first slot must be a multiple of page_size={p}")
        pages = (idx // p).tolist()
        if len(set(pages)) != len(pages):
            raise ValueError("host_indices: a host page appears twice in one batch")
        return pages

    def _scrub(self, segs: Sequence[list[tuple[int, int]]]) -> None:
        """Zero host pages (given by their pieces) that may hold a partial or unverified transfer."""
        for page_segs in segs:
            for v in self._views(page_segs):
                v[...] = 0

    def _check_rpc(self, codes: Sequence[int], what: str) -> None:
        if any(c == _RPC_FAIL for c in codes):
            msg = f"Mooncake {what} failed: master {self.master_addr} unreachable (code {_code(_RPC_FAIL)})"
            self._mark_down(msg)
            raise MooncakeConnectionError(msg)

    # ---- one page ------------------------------------------------------------------------
    def exists(self, key: StorageKey) -> bool:
        """Whether a page is stored under ``key`` (checksum not read)."""
        return self.batch_exists([key]) == 1

    def batch_exists(self, keys: Sequence[StorageKey]) -> int:
        """Length of the leading run of present keys, in one round trip to the master."""
        if not keys:
            return 0
        skeys = self._store_keys(keys)
        codes = self._client().batch_is_exist(skeys)
        n = 0
        if any(c < 0 for c in codes):  # -1 / RPC_FAIL: the master did not answer
            self._check_rpc([_RPC_FAIL], "batch_is_exist")
        for c in codes:
            if c != 1:
                break
            n += 1
        return n

    def get(self, key: StorageKey) -> Optional[bytes]:
        """The page under ``key`` (``page_bytes`` bytes), or ``None`` if absent, truncated, foreign or
        corrupt (counted in ``stats()``)."""
        skey = self.store_key(key)
        data = self._client().get(skey)
        if not data:
            probe = self._client().batch_is_exist([skey])
            self._check_rpc(probe, f"get of {skey!r}")
            self._stats["misses"] += 1
            return None
        if len(data) != self.page_bytes + TRAILER_BYTES:
            self._stats["corrupt"] += 1
            return None
        page = memoryview(data)[: self.page_bytes]
        if not self._trailer_ok(bytes(data[self.page_bytes :]), self._xxh.xxh3_64_intdigest(page, seed=self._seed(skey))):
            self._stats["corrupt"] += 1
            return None
        self._stats["hits"] += 1
        return self._reorder(page, to_stored=False)

    def _reorder(self, buf: memoryview, to_stored: bool) -> bytes:
        """A page between the canonical ``[layer][token][row]`` order and the stored order."""
        if not _token_major(self.host_pool):
            return bytes(buf)
        h = self.host_pool
        a = np.frombuffer(buf, dtype=np.uint8)
        shape = (h.layer_num, h.page_size, h.row_bytes) if to_stored else (h.page_size, h.layer_num, h.row_bytes)
        return a.reshape(shape).transpose(1, 0, 2).tobytes()

    def set(self, key: StorageKey, data: Any) -> None:
        """Store one page (``bytes``-like or a 1-D uint8 array/tensor of ``page_bytes`` bytes) with
        its checksum. Raises :class:`MooncakeStoreFull` or :class:`MooncakeConnectionError`."""
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.dim() != 1:
                raise TypeError(f"data: a tensor page must be 1-D uint8, got {data.dtype} with {data.dim()} dims")
            data = data.cpu().numpy()
        buf = memoryview(data).cast("B")
        if buf.nbytes != self.page_bytes:
            raise ValueError(f"data: a page is {self.page_bytes} bytes, got {buf.nbytes}")
        stored = self._reorder(buf, to_stored=True)
        skey = self.store_key(key)
        rc = self._client().put(skey, stored + self._trailer(self._xxh.xxh3_64_intdigest(stored, seed=self._seed(skey))))
        self._raise_put([rc], [skey], 0)
        self._stats["stored"] += 1

    def _raise_put(self, codes: Sequence[int], skeys: Sequence[str], base: int) -> None:
        self._check_rpc(codes, "put")
        for i, c in enumerate(codes):
            if c == _NO_AVAILABLE_HANDLE:
                raise MooncakeStoreFull(
                    f"Mooncake store full: page {base + i} ({skeys[i]!r}) refused ({_code(c)}); "
                    f"{base + i} earlier pages of this batch were stored, the rest were not (Mooncake evicts "
                    "older objects in the background above its high watermark; a later set may fit)", stored=base + i)
            if c != 0:
                raise MooncakeStoreError(
                    f"Mooncake put of {skeys[i]!r} failed: {_code(c)}; {base + i} earlier pages of this batch were stored")

    # ---- batches -------------------------------------------------------------------------
    def _chunks(self, n: int, small_first: bool) -> list[tuple[int, int]]:
        """``[lo, hi)`` chunks of ``n`` pages: sizes double from ``pipeline_pages // 8`` up to
        ``pipeline_pages`` (``small_first``: a set, whose first chunk is hashed before anything
        moves) or shrink the same way towards the end (a get, whose last chunk is hashed after
        everything moved), so the part of the hashing that overlaps no transfer stays small. Without
        hash threads nothing overlaps: equal chunks (each chunk is one more Mooncake call)."""
        c = self.pipeline_pages
        ramp = self._hash_pool is not None
        sizes, step, total = [], (max(1, c // 8) if ramp else c), 0
        while total < n:
            sizes.append(min(step, n - total))
            total += sizes[-1]
            step = min(c, 2 * step)
        if ramp and not small_first:
            sizes.reverse()
        bounds, lo = [], 0
        for size in sizes:
            bounds.append((lo, lo + size))
            lo += size
        return bounds

    def _hash_async(self, all_segs: Sequence[list[tuple[int, int]]], seeds: Sequence[int], lo: int, hi: int) -> list:
        """Start hashing pages ``[lo, hi)`` (page ``i`` seeded with ``seeds[i]``) on the hash threads
        (inline without them); returns one future-like object per page (``.result()`` gives the digest)."""
        if self._hash_pool is None:
            return [_Done(self._checksum(all_segs[i], seeds[i])) for i in range(lo, hi)]
        return [self._hash_pool.submit(self._checksum, all_segs[i], seeds[i]) for i in range(lo, hi)]

    def batch_set_from(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> int:
        """Store host pages ``host_indices`` under ``keys`` straight from the host buffer (zero copy),
        each with its checksum trailer. Returns ``len(keys)``; raises :class:`MooncakeStoreFull`
        (``.stored`` leading pages went in) or :class:`MooncakeConnectionError`.

        The batch goes in chunks of ``pipeline_pages``; chunk ``k + 1`` is hashed while chunk ``k``
        is put."""
        pages = self._pages(keys, host_indices)
        if not pages:
            return 0
        skeys = self._store_keys(keys)
        seeds = [self._seed(k) for k in skeys]
        tbase = self._wtrail_t.data_ptr()
        all_segs = self._segments(pages)
        chunks = self._chunks(len(pages), small_first=True)
        pending = self._hash_async(all_segs, seeds, *chunks[0])
        for ci, (lo, hi) in enumerate(chunks):
            digests = [f.result() for f in pending]
            if ci + 1 < len(chunks):
                pending = self._hash_async(all_segs, seeds, *chunks[ci + 1])
            ptrs, sizes = [], []
            for i, digest in zip(range(lo, hi), digests):
                page = pages[i]
                self._wtrail[page] = np.frombuffer(self._trailer(digest), dtype=np.uint8)
                ptrs.append([p for p, _ in all_segs[i]] + [tbase + page * TRAILER_BYTES])
                sizes.append([n for _, n in all_segs[i]] + [TRAILER_BYTES])
            try:
                codes = self._client().batch_put_from_multi_buffers(skeys[lo:hi], ptrs, sizes)
                self._raise_put(codes, skeys[lo:hi], lo)
            except MooncakeStoreError:
                if ci + 1 < len(chunks):
                    for f in pending:
                        f.result()
                raise
            self._stats["stored"] += hi - lo
        return len(pages)

    def batch_get_into(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> int:
        """Load pages ``keys`` into host pages ``host_indices`` (zero copy) and verify each checksum.

        Returns ``n``: the leading pages that were present and verified. Only the leading run of
        present keys (one ``batch_is_exist``) is fetched, so pages after the first absent key are not
        touched; a page fetched but failing its checksum (or lost between the check and the fetch)
        and every fetched page after it are zeroed and not counted. If the master goes away during
        the batch, every page of the batch is zeroed and :class:`MooncakeConnectionError` is raised.
        Destination pages must be pages the caller allocated for this load.

        Pages come in chunks of ``pipeline_pages``; chunk ``k`` is hashed while chunk ``k + 1`` is
        fetched, and a chunk with a missing or short page ends the fetching.
        """
        pages = self._pages(keys, host_indices)
        if not pages:
            return 0
        lead = self.batch_exists(keys)
        if lead == 0:
            self._stats["misses"] += 1
            return 0
        pages = pages[:lead]
        skeys = self._store_keys(keys[:lead])
        seeds = [self._seed(k) for k in skeys]
        tbase = self._rtrail_t.data_ptr()
        all_segs = self._segments(pages)
        want = self.page_bytes + TRAILER_BYTES
        codes: list[int] = []
        sums: dict[int, Any] = {}
        try:
            for lo, hi in self._chunks(len(pages), small_first=False):
                ptrs = [[p for p, _ in all_segs[i]] + [tbase + pages[i] * TRAILER_BYTES] for i in range(lo, hi)]
                sizes = [[n for _, n in all_segs[i]] + [TRAILER_BYTES] for i in range(lo, hi)]
                got = self._client().batch_get_into_multi_buffers(skeys[lo:hi], ptrs, sizes)
                self._check_rpc(got, "batch_get_into")
                codes.extend(got)
                ok = [i for i in range(lo, hi) if codes[i] == want]
                if ok:
                    first, last = ok[0], ok[-1] + 1
                    sums.update(zip(range(first, last), self._hash_async(all_segs, seeds, first, last)))
                if len(ok) < hi - lo:
                    break
        except MooncakeStoreError:
            for f in sums.values():
                f.result()
            self._scrub(all_segs)
            raise
        n = 0
        for i, page in enumerate(pages[: len(codes)]):
            if codes[i] == _OBJECT_NOT_FOUND:  # removed or evicted since the existence check
                self._stats["misses"] += 1
                break
            if codes[i] != want or not self._trailer_ok(self._rtrail[page].tobytes(), sums[i].result()):
                self._stats["corrupt"] += 1  # wrong size (foreign object) or checksum mismatch
                break
            n += 1
        for f in sums.values():
            f.result()
        self._scrub(all_segs[n : len(codes)])
        self._stats["hits"] += n
        if n == lead and lead < len(keys):
            self._stats["misses"] += 1
        return n


class _Done:
    """An already computed result with a future's ``result()``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def result(self) -> int:
        return self.value
