"""HiCache's second tier: a pinned host mirror of an MLA device pool, with page transfers.

A hierarchical KV cache keeps prefixes evicted from the GPU (L1) in host memory (L2) and in storage
(L3), so they come back without recomputation. :class:`MLATokenToKVPoolHost` holds the host copy
of an :class:`~mlakv.mem_cache.memory_pool.MLATokenToKVPool`'s rows, hands out host pages, and moves
whole pages between the tiers: device -> host for all layers at once (backup), host -> device one
layer at a time (load), so attention for layer ``i`` can start as soon as layer ``i`` is in.

On CUDA the copies are one zero-copy Triton launch per layer (the kernel reads or writes the pinned
host buffer directly through unified addressing) on a dedicated stream, with one event per layer.
On CPU they are plain indexed copies, so CI tests the same logic.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .memory_pool import MLATokenToKVPool

__all__ = ["MLATokenToKVPoolHost", "host_available_bytes"]

LAYOUTS = ("layer_first", "page_first")


def host_available_bytes() -> Optional[int]:
    """Memory the host can still give (``MemAvailable``), or None if it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class MLATokenToKVPoolHost:
    """Host (L2) copy of an MLA device pool's rows, paged.

    Args:
        device_pool: the device pool mirrored (layers, row width and dtype are taken from it).
        host_to_device_ratio: host token slots per device token slot, when ``host_size`` is None.
        host_size: host token slots (rounded up to whole pages).
        page_size: tokens per host page; defaults to the device pool's.
        layout: ``"layer_first"`` — ``[layer, slot, row]``, each layer contiguous (what per-layer
            loads read); ``"page_first"`` — ``[page, layer, token, row]``, each page's layers
            contiguous (what storage reads and writes).
        pin_memory: pin the buffer when CUDA is present (needed for the zero-copy transfers).
        memory_headroom: fraction of the host's available memory to leave free.

    Raises ``MemoryError`` naming the sizes if the host does not have the memory, before
    allocating anything.
    """

    def __init__(
        self,
        device_pool: MLATokenToKVPool,
        host_to_device_ratio: float = 2.0,
        host_size: Optional[int] = None,
        page_size: Optional[int] = None,
        layout: str = "layer_first",
        pin_memory: bool = True,
        *,
        memory_headroom: float = 0.1,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.device_pool = device_pool
        self.page_size = page_size or device_pool.page_size
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        want = host_size if host_size is not None else int(device_pool.size * host_to_device_ratio)
        if want <= 0:
            raise ValueError(f"host size must be positive, got {want} token slots")
        self.num_pages = -(-want // self.page_size)
        self.size = self.num_pages * self.page_size
        self.layout = layout
        self.layer_num = device_pool.layer_num
        self.start_layer = device_pool.start_layer
        self.dtype = device_pool.dtype
        self.store_dtype = device_pool.store_dtype
        self.row_bytes = device_pool.row_bytes()
        self.page_bytes = self.page_size * self.row_bytes * self.layer_num  # one page, all layers
        total = self.size * self.row_bytes * self.layer_num
        self.nbytes = total
        avail = host_available_bytes()
        if avail is not None and total > avail * (1.0 - memory_headroom):
            raise MemoryError(
                f"host KV pool needs {total / 2**30:.2f} GiB ({self.size} slots x {self.layer_num} layers x "
                f"{self.row_bytes} B) but the host has {avail / 2**30:.2f} GiB available "
                f"({memory_headroom:.0%} kept free); lower host_to_device_ratio or host_size"
            )
        pin = pin_memory and torch.cuda.is_available()
        if layout == "layer_first":
            shape = (self.layer_num, self.size, self.row_bytes)
        else:
            shape = (self.num_pages, self.layer_num, self.page_size, self.row_bytes)
        self.kv_buffer = torch.empty(shape, dtype=torch.uint8, pin_memory=pin)
        self.pinned = pin
        self._free_pages = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._page_free = torch.ones(self.num_pages, dtype=torch.bool)
        self._stream: Optional[torch.cuda.Stream] = None
        self._layer_events: dict[int, torch.cuda.Event] = {}

    # ---- page allocator ------------------------------------------------------------------
    def available_size(self) -> int:
        """Free host token slots."""
        return len(self._free_pages) * self.page_size

    def alloc(self, n_pages: int) -> Optional[torch.Tensor]:
        """Take ``n_pages`` pages; return their token slots ``[n_pages * page_size]`` (int64), or
        None if fewer pages are free."""
        if n_pages < 0:
            raise ValueError(f"n_pages must be >= 0, got {n_pages}")
        if n_pages > len(self._free_pages):
            return None
        pages = torch.tensor([self._free_pages.pop() for _ in range(n_pages)], dtype=torch.int64)
        self._page_free[pages] = False
        return (pages[:, None] * self.page_size + torch.arange(self.page_size)).flatten()

    def free(self, indices: torch.Tensor) -> None:
        """Give back whole pages, named by their token slots (as :meth:`alloc` returned them)."""
        pages = self._pages_of(indices, "indices")
        if bool(self._page_free[pages].any()):
            bad = pages[self._page_free[pages]][0].item()
            raise ValueError(f"indices: page {bad} is already free (double free)")
        self._page_free[pages] = True
        self._free_pages.extend(reversed(pages.tolist()))

    def _pages_of(self, indices: torch.Tensor, name: str) -> torch.Tensor:
        idx = _check_slots(indices, name, self.size, self.page_size)
        return idx.view(-1, self.page_size)[:, 0] // self.page_size

    def _check_transfer(
        self, device_pool: MLATokenToKVPool, host_indices: torch.Tensor, device_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if device_pool.row_bytes() != self.row_bytes or device_pool.layer_num != self.layer_num:
            raise ValueError("device_pool does not match this host pool's row width / layer count")
        for name, t in (("host_indices", host_indices), ("device_indices", device_indices)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a 1-D int32/int64 tensor of token slots")
        if host_indices.numel() != device_indices.numel():
            raise ValueError(
                f"host_indices has {host_indices.numel()} slots but device_indices has {device_indices.numel()}"
            )
        h = _check_slots(host_indices, "host_indices", self.size, self.page_size)
        d = _check_slots(device_indices, "device_indices", device_pool.num_slots, device_pool.page_size)
        return h, d

    # ---- addressing --------------------------------------------------------------------
    def _host_layer(self, local_layer: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The host buffer's start for one layer and its ``(page, page_stride, row_stride)`` in bytes."""
        rb = self.row_bytes
        if self.layout == "layer_first":
            return self.kv_buffer[local_layer], (self.page_size, self.page_size * rb, rb)
        return self.kv_buffer[0, local_layer], (self.page_size, self.layer_num * self.page_size * rb, rb)

    def _host_rows(self, local_layer: int, h: torch.Tensor) -> tuple:
        """CPU path: an index into ``kv_buffer`` selecting the rows of one layer at host slots ``h``."""
        if self.layout == "layer_first":
            return (local_layer, h)
        return (h // self.page_size, local_layer, h % self.page_size)

    # ---- transfers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_transfer_stream(self, device: torch.device, h: torch.Tensor, d: torch.Tensor):
        """Run the body on the transfer stream, after the work queued on the current stream; yield
        the index vectors on the device and an event that is recorded when the body's work ends."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        done = torch.cuda.Event()
        with torch.cuda.stream(stream):
            yield h.to(device, non_blocking=True), d.to(device, non_blocking=True), done
            done.record(stream)

    def backup_from_device_all_layer(
        self, device_pool: MLATokenToKVPool, host_indices: torch.Tensor, device_indices: torch.Tensor
    ) -> None:
        """Copy device rows ``device_indices`` of every layer to host slots ``host_indices``.

        On CUDA the copy runs on this pool's transfer stream after the work already queued on the
        current stream; call :meth:`synchronize` (or wait on :meth:`backup_event`) before reusing
        the device slots.
        """
        h, d = self._check_transfer(device_pool, host_indices, device_indices)
        if h.numel() == 0:
            return
        if device_pool.device.type != "cuda":
            for layer in range(self.layer_num):
                self.kv_buffer[self._host_rows(layer, h)] = _device_rows(device_pool, layer)[d]
            return
        from .transfer_kernels import launch_copy_rows

        with self._on_transfer_stream(device_pool.device, h, d) as (h_dev, d_dev, done):
            for layer in range(self.layer_num):
                host_start, host_layout = self._host_layer(layer)
                src = device_pool.kv_buffer[layer]
                launch_copy_rows(src, host_start, d_dev, h_dev, self.row_bytes, _device_layout(src), host_layout)
        self._backup_event = done

    def backup_event(self) -> Optional[torch.cuda.Event]:
        """The event recorded after the last CUDA backup (None before any)."""
        return getattr(self, "_backup_event", None)

    def load_to_device_per_layer(
        self, device_pool: MLATokenToKVPool, host_indices: torch.Tensor, device_indices: torch.Tensor, layer_id: int
    ) -> None:
        """Copy host slots ``host_indices`` of one layer (global ``layer_id``) to device rows ``device_indices``.

        On CUDA the copy is queued on the transfer stream and an event is recorded for the layer;
        the consumer calls :meth:`wait_until_layer_ready` on its stream before reading the rows.
        """
        local = device_pool._local_layer(layer_id)
        h, d = self._check_transfer(device_pool, host_indices, device_indices)
        if h.numel() == 0:
            return
        dst = device_pool.kv_buffer[local]
        if device_pool.device.type != "cuda":
            _device_rows(device_pool, local)[d] = self.kv_buffer[self._host_rows(local, h)]
            return
        from .transfer_kernels import launch_copy_rows

        with self._on_transfer_stream(device_pool.device, h, d) as (h_dev, d_dev, done):
            host_start, host_layout = self._host_layer(local)
            launch_copy_rows(host_start, dst, h_dev, d_dev, self.row_bytes, host_layout, _device_layout(dst))
        self._layer_events[layer_id] = done

    def wait_until_layer_ready(self, layer_id: int, stream: Optional[torch.cuda.Stream] = None) -> None:
        """Make ``stream`` (default: the current one) wait for layer ``layer_id``'s last load; no host sync."""
        event = self._layer_events.get(layer_id)
        if event is not None:
            (stream or torch.cuda.current_stream()).wait_event(event)

    def synchronize(self) -> None:
        """Block the host until every queued transfer has finished."""
        if self._stream is not None:
            self._stream.synchronize()

    # ---- storage hook (L3) ----------------------------------------------------------------
    def _page_index(self, host_index: int) -> int:
        if not 0 <= host_index < self.size or host_index % self.page_size:
            raise IndexError(f"host_index {host_index} must be a page-aligned slot in [0, {self.size})")
        return host_index // self.page_size

    def get_page_bytes(self, host_index: int) -> bytes:
        """One page (all layers), flat: ``[layer][token][row bytes]``; ``host_index`` is its first slot."""
        page = self._page_index(host_index)
        if self.layout == "page_first":
            data = self.kv_buffer[page]
        else:
            p = self.page_size
            data = self.kv_buffer[:, page * p : (page + 1) * p]
        return data.contiguous().numpy().tobytes()

    def set_page_bytes(self, host_index: int, data: bytes) -> None:
        """Write one page (all layers) from :meth:`get_page_bytes`'s format."""
        page = self._page_index(host_index)
        if len(data) != self.page_bytes:
            raise ValueError(f"data: a page is {self.page_bytes} bytes, got {len(data)}")
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.layer_num, self.page_size, self.row_bytes)
        if self.layout == "page_first":
            self.kv_buffer[page].copy_(src)
        else:
            p = self.page_size
            self.kv_buffer[:, page * p : (page + 1) * p].copy_(src)


def _device_rows(device_pool: MLATokenToKVPool, local_layer: int) -> torch.Tensor:
    """A layer's device buffer as ``[num_slots, row_bytes]`` uint8 (a view)."""
    return device_pool.kv_buffer[local_layer].view(device_pool.num_slots, -1).view(torch.uint8)


def _device_layout(buf: torch.Tensor) -> tuple[int, int, int]:
    """``(page, page_stride, row_stride)`` in bytes of a device buffer: rows at a uniform stride."""
    stride = buf.stride(0) * buf.element_size()
    return (1, stride, stride)


def _check_slots(indices: torch.Tensor, name: str, limit: int, page_size: int) -> torch.Tensor:
    """Validate a token-slot vector (1-D int, in ``[0, limit)``, whole aligned pages); return it as CPU int64."""
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor of token slots")
    idx = indices.to("cpu", torch.int64)
    n = idx.numel()
    if n == 0:
        return idx
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= limit:
        raise IndexError(f"{name}: slots must lie in [0, {limit}), got [{lo}, {hi}]")
    if page_size > 1:
        p = page_size
        if n % p:
            raise ValueError(f"{name}: {n} slots is not a whole number of pages of {p}")
        runs = idx.view(-1, p)
        if bool((runs[:, 0] % p != 0).any()) or bool((runs - runs[:, :1] != torch.arange(p)).any()):
            raise ValueError(f"{name}: slots must come in whole, aligned pages of {p} (t, t+1, ..., t+{p - 1} with t % {p} == 0)")
    return idx
