"""HiCache's second tier: a pinned host mirror of an MLA device pool, with page transfers.

A hierarchical KV cache keeps prefixes evicted from the GPU (L1) in host memory (L2) and in storage
(L3), so they come back without recomputation. :class:`MLATokenToKVPoolHost` holds the host copy
of an :class:`~mlakv.mem_cache.memory_pool.MLATokenToKVPool`'s rows, hands out host pages, and moves
whole pages between the tiers: device -> host for all layers at once (backup), host -> device one
layer at a time (load), so attention for layer ``i`` can start as soon as layer ``i`` is in.

The method set and its meaning follow sglang 0.5.23's ``MLATokenToKVPoolHost`` (``alloc`` in
tokens, ``free`` returning the count, ``get_data_page``/``set_from_flat_data_page``,
``get_page_buffer_meta``, the three layouts, the trailing ``io_backend`` argument), so an engine
written against sglang's host pool can drive this one.

On CUDA the ``"kernel"`` backend is one zero-copy Triton launch per layer (the kernel reads or writes
the pinned host buffer directly through unified addressing) on a dedicated stream, with one event
per layer and a bounded number of SMs; ``"direct"`` is plain ``copy_`` of contiguous runs. On CPU
both are plain indexed copies, so CI tests the same logic.

Index vectors are never trusted from an earlier call: a transfer always moves the slots the vectors
hold *now*. A CPU vector is copied (privately) and compared with the copy last validated, so it is
validated again only when its values changed, whatever wrote them (a numpy alias, ``.data``, an
inference tensor without a version counter). A CUDA vector on the kernel path is validated on the
host (one sync) the first time it is seen and then read by the kernel itself at its current values,
with the kernel's own bounds (a slot out of range or a page start off its page is skipped, as every
unchecked GPU path does; with the device pool's ``check_bounds`` it is validated on every call): the
per-layer loads of a batch make no host sync.

What a host row holds follows the device pool's cache format (``pool.format``,
:mod:`mlakv.spec.formats`): for a ``rows`` format, one device row; for a block-split paged format
(the DeepSeek-V4 family's ``[num_pages, page_bytes]`` layers) a slot's share of a page, ``page_bytes /
page_size`` bytes, so the host page is the device page byte for byte and transfers of whole aligned
pages copy pages (the host page size must be the device's); for a DSA pool
(:class:`~mlakv.mem_cache.dsa_pool.DSATokenToKVPool`) each row also carries the slot's indexer key
and scale (132 bytes) after the MLA bytes, so one host page, one stored page and one prefix hit hold
both halves of the same tokens.

The page allocator (:meth:`alloc`, :meth:`free`, :meth:`available_size`, :meth:`clear`) is safe to
call from several threads (sglang's cache controller does): one lock makes each call atomic, so a
page is never handed out twice and a double free is refused even when two threads race.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mlakv.spec import rules
from mlakv.spec.rules import INDEX_HEAD_DIM, INDEX_PAGE_BYTES, INDEX_PAGE_TOKENS
from .memory_pool import MLATokenToKVPool, host_available_bytes

__all__ = ["MLATokenToKVPoolHost", "host_available_bytes", "unit_row_bytes", "LAYOUTS", "IO_BACKENDS"]

#: ``layer_first`` ``[layer, size, 1, D]``; ``page_first`` ``[size, layer, 1, D]`` (a token's layers
#: together); ``page_first_direct`` ``[pages, layer, page_size, 1, D]`` (a page's layers together).
LAYOUTS = ("layer_first", "page_first", "page_first_direct")
IO_BACKENDS = ("kernel", "direct")


def _as_int(value: Any, name: str) -> int:
    """``value`` as a Python int: ints and numpy integers; bools, floats and the rest are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _as_fraction(value: Any, name: str, lo: float, hi: float, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}")
    return v


@dataclass
class _Slots:
    """One validated index vector of a transfer.

    Either ``cpu`` holds a private copy of the values validated (never an alias of the caller's
    tensor), or ``live`` is the caller's CUDA vector, which the kernel reads at its current values
    with its own bounds (``key`` says which tensor was validated on the host, so it is not synced on
    again; it keeps ``live`` alive, so its id stays its own)."""

    scope: tuple  # (limit, page_size): what the values were checked against
    n: int
    cpu: Optional[torch.Tensor] = None  # [n] int64, CPU, private
    live: Optional[torch.Tensor] = None  # [n] the caller's int32/int64 CUDA vector (kernel path)
    key: Optional[tuple] = None
    dev: Optional[torch.Tensor] = None  # ``cpu`` on the device, for the kernel (made on first use)


@dataclass
class _Batch:
    """A validated transfer: its two index vectors and the kernel's unit (token row or page)."""

    h: _Slots
    d: _Slots
    n: int
    page_units: bool = False

    @property
    def h_cpu(self) -> torch.Tensor:
        return self.h.cpu

    @property
    def d_cpu(self) -> torch.Tensor:
        return self.d.cpu


class MLATokenToKVPoolHost:
    """Host (L2) copy of an MLA device pool's rows, paged.

    Args:
        device_pool: the device pool mirrored (layers, row width and dtype are taken from it).
        host_to_device_ratio: host token slots per device token slot (finite, >= 1), when
            ``host_size`` is None.
        host_size: host token slots (rounded up to whole pages; at least the device pool's size).
        page_size: tokens per host page; defaults to the device pool's.
        layout: one of :data:`LAYOUTS`. ``page_first`` and ``page_first_direct`` keep each page's
            bytes contiguous (zero-copy storage I/O); ``layer_first`` keeps each layer contiguous.
        pin_memory: pin the buffer when CUDA is present (the zero-copy "kernel" transfers need it; an
            unpinned pool uses plain copies whatever io_backend says).
        memory_headroom: fraction in [0, 1) of the host's available memory to leave free.
        transfer_sms: the most SMs a ``"kernel"`` transfer occupies (its persistent grid size).

    ``kv_buffer`` is in the device pool's ``store_dtype`` with a head dim of 1, shaped as the
    layout says (``D = kv_lora_rank + qk_rope_head_dim`` for rows of the pool dtype; otherwise the
    host row's bytes in ``store_dtype`` elements: ``row_bytes = mla_row_bytes + index_row_bytes``,
    see the module docstring). A paged (V4-family) pool needs ``page_size`` equal to its own and
    dividing its page bytes (``ValueError`` naming both otherwise). Raises ``MemoryError`` naming the sizes
    if the host does not have the memory, before allocating anything.
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
        transfer_sms: int = 8,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        headroom = _as_fraction(memory_headroom, "memory_headroom", 0.0, 1.0, hi_open=True)
        self.device_pool = device_pool
        self.page_size = device_pool.page_size if page_size is None else _as_int(page_size, "page_size")
        if self.page_size <= 0:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        if host_size is None:
            ratio = _as_fraction(host_to_device_ratio, "host_to_device_ratio", 1.0, float("inf"), hi_open=True)
            want = int(device_pool.size * ratio)
        else:
            want = _as_int(host_size, "host_size")
            if want < device_pool.size:
                raise ValueError(
                    f"host_size={want} is smaller than the device pool ({device_pool.size} slots): the host "
                    "pool must hold at least every device slot"
                )
        self.format = getattr(device_pool, "format", None)  # the device pool's cache format (mlakv.spec.formats)
        if _is_paged(device_pool) and self.page_size != device_pool.page_size:
            raise ValueError(
                f"page_size={self.page_size}: a {self.format.name!r} pool keeps block-split pages, so a host page must "
                f"be one device page of {device_pool.page_size} slots"
            )
        self.transfer_sms = _as_int(transfer_sms, "transfer_sms")
        if self.transfer_sms < 1:
            raise ValueError(f"transfer_sms must be >= 1, got {self.transfer_sms}")
        self.num_pages = -(-want // self.page_size)
        self.size = self.num_pages * self.page_size
        self.layout = layout
        self.layer_num = device_pool.layer_num
        self.start_layer = device_pool.start_layer
        self.dtype = device_pool.dtype
        self.store_dtype = device_pool.store_dtype
        self.kv_cache_dim = device_pool.kv_cache_dim
        self.mla_row_bytes = unit_row_bytes(device_pool)
        self.index_row_bytes = _index_row_bytes(device_pool)  # a DSA pool: the slot's indexer key + scale
        self.row_bytes = self.mla_row_bytes + self.index_row_bytes
        if _is_paged(device_pool) or self.index_row_bytes:  # the host row is no longer one device row
            self.kv_cache_dim = self.row_bytes // torch.empty((), dtype=self.store_dtype).element_size()
        self.page_bytes = self.page_size * self.row_bytes * self.layer_num  # one page, all layers
        self.size_per_token = self.row_bytes * self.layer_num
        total = self.size * self.row_bytes * self.layer_num
        self.nbytes = total
        avail = host_available_bytes()
        if avail is not None and total > avail * (1.0 - headroom):
            raise MemoryError(
                f"host KV pool needs {total / 2**30:.2f} GiB ({self.size} slots x {self.layer_num} layers x "
                f"{self.row_bytes} B) but the host has {avail / 2**30:.2f} GiB available "
                f"({headroom:.0%} kept free); lower host_to_device_ratio or host_size"
            )
        self.pin_memory = pin_memory and torch.cuda.is_available()
        L, P, D = self.layer_num, self.page_size, self.kv_cache_dim
        shape = {
            "layer_first": (L, self.size, 1, D),
            "page_first": (self.size, L, 1, D),
            "page_first_direct": (self.num_pages, L, P, 1, D),
        }[layout]
        self.kv_buffer = torch.empty(shape, dtype=self.store_dtype, pin_memory=self.pin_memory)
        self.pinned = self.pin_memory
        self.device = torch.device("cpu")
        self._bytes = self.kv_buffer.view(-1).view(torch.uint8)  # flat bytes of the whole buffer
        rb = self.row_bytes
        self._rows = {  # byte view a (layer, slots) row selection indexes
            "layer_first": self._bytes.view(L, self.size, rb),
            "page_first": self._bytes.view(self.size, L, rb),
            "page_first_direct": self._bytes.view(self.num_pages, L, P, rb),
        }[layout]
        self._lock = threading.Lock()  # the page allocator's state changes only under it
        self._free_pages = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._page_free = torch.ones(self.num_pages, dtype=torch.bool)
        self._stream: Optional[torch.cuda.Stream] = None
        self._layer_events: dict[int, torch.cuda.Event] = {}
        self._checked: dict[str, _Slots] = {}  # the last validated vector per argument name

    # ---- page allocator (sglang meaning: sizes in tokens) ---------------------------------
    def available_size(self) -> int:
        """Free host token slots (thread-safe)."""
        with self._lock:
            return len(self._free_pages) * self.page_size

    def alloc(self, need_size: int) -> Optional[torch.Tensor]:
        """Take ``need_size`` token slots (a multiple of ``page_size``) as whole free pages.

        Returns their slots ``[need_size]`` (int64, page by page, ascending within a page), or None
        if fewer are free (nothing taken). Thread-safe.
        """
        need = _as_int(need_size, "need_size")
        if need < 0 or need % self.page_size:
            raise ValueError(f"need_size must be a non-negative multiple of page_size={self.page_size}, got {need}")
        n_pages = need // self.page_size
        with self._lock:
            if n_pages > len(self._free_pages):
                return None
            taken = [self._free_pages.pop() for _ in range(n_pages)]
            pages = torch.tensor(taken, dtype=torch.int64)
            self._page_free[pages] = False
        return (pages[:, None] * self.page_size + torch.arange(self.page_size)).flatten()

    def free(self, indices: torch.Tensor) -> int:
        """Give back whole pages named by their token slots (as :meth:`alloc` returned them).

        Returns the number of token slots freed. A page named twice, a page already free, or a
        vector that is not whole aligned pages is refused (``ValueError``) and nothing is freed.
        Thread-safe: the check and the free are one step under the allocator's lock, so when two
        threads free the same pages exactly one succeeds and the other gets the double-free error.
        """
        pages = self.pages_of(indices, "indices")
        uniq, counts = torch.unique(pages, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"indices: page {int(uniq[counts > 1][0])} is named more than once (double free)")
        with self._lock:
            already = self._page_free[pages]
            if bool(already.any()):
                raise ValueError(f"indices: page {int(pages[already][0])} is already free (double free)")
            self._page_free[pages] = True
            self._free_pages.extend(reversed(pages.tolist()))
        return int(pages.numel()) * self.page_size

    def clear(self) -> None:
        """Every page free again (thread-safe)."""
        with self._lock:
            self._free_pages = list(range(self.num_pages - 1, -1, -1))
            self._page_free.fill_(True)

    def pages_of(self, indices: torch.Tensor, name: str = "indices") -> torch.Tensor:
        """Page numbers ``[n_pages]`` of the whole, aligned pages that token slots ``indices [n]`` name
        (the rule book's slot rule; ``IndexError``/``ValueError`` naming ``name`` otherwise)."""
        idx = _check_slots(indices, name, self.size, self.page_size)
        return idx.reshape(-1, self.page_size)[:, 0] // self.page_size

    # ---- validation: the values the vectors hold now ---------------------------------------
    def _prepare(self, device_pool: MLATokenToKVPool, host_indices: Any, device_indices: Any, io_backend: str) -> _Batch:
        """Validate a transfer's index vectors, as they are now (see the module docstring)."""
        got = unit_row_bytes(device_pool) + _index_row_bytes(device_pool)
        if got != self.row_bytes or device_pool.layer_num != self.layer_num:
            raise ValueError(
                f"device_pool: rows of {got} B x {device_pool.layer_num} layers do not match "
                f"this host pool's {self.row_bytes} B x {self.layer_num} layers"
            )
        fmt = getattr(device_pool, "format", None)
        if fmt is not None and self.format is not None and fmt.key(device_pool.page_size) != self.format.key(self.page_size):
            raise ValueError(
                f"device_pool: its cache format {fmt.key(device_pool.page_size)} is not this host pool's "
                f"{self.format.key(self.page_size)}"
            )
        for name, t in (("host_indices", host_indices), ("device_indices", device_indices)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a 1-D int32/int64 tensor of token slots, got {type(t).__name__}")
        if host_indices.numel() != device_indices.numel():
            raise ValueError(
                f"host_indices has {host_indices.numel()} slots but device_indices has {device_indices.numel()}"
            )
        kernel = _kernel_path(device_pool.device, io_backend, self.pinned)
        live_ok = kernel and not device_pool.check_bounds
        where = _buffer_device(device_pool)
        h = self._slots(host_indices, "host_indices", self.size, self.page_size, where, live_ok)
        d = self._slots(device_indices, "device_indices", device_pool.num_slots, device_pool.page_size,
                        where, live_ok)  # fmt: skip
        P = self.page_size
        page_units = P > 1 and device_pool.page_size % P == 0 and self.layout != "page_first" and not self.index_row_bytes
        return _Batch(h, d, h.n, page_units=page_units)

    def _slots(self, t: torch.Tensor, name: str, limit: int, page_size: int, device: torch.device, live_ok: bool) -> _Slots:
        """One index vector, validated unless it is the vector last validated under ``name`` with the
        same values (CPU: compared with the private copy) or the same CUDA tensor read live."""
        scope = (limit, page_size)
        last = self._checked.get(name)
        if live_ok and t.device == device and t.dim() == 1 and t.dtype in rules.LOC_DTYPES:
            version = None if t.is_inference() else t._version  # inference tensors have no counter
            key = (id(t), t.data_ptr(), t.shape[0], t.stride(0), t.dtype, version)
            if last is not None and last.key == key and last.scope == scope:
                return last
            _check_slots(t, name, limit, page_size)  # one host sync; later calls: the kernel's bounds
            s = _Slots(scope, t.shape[0], live=t, key=key)
        else:
            if t.dim() == 1 and t.dtype in rules.LOC_DTYPES:
                now = torch.empty(t.shape[0], dtype=torch.int64)
                now.copy_(t)  # a private copy of the values as they are now (one sync for a device vector)
                if last is not None and last.cpu is not None and last.scope == scope and torch.equal(last.cpu, now):
                    return last
                t = now
            s = _Slots(scope, t.shape[0] if t.dim() else 0, cpu=_check_slots(t, name, limit, page_size))
        self._checked[name] = s
        return s

    # ---- addressing --------------------------------------------------------------------
    def _host_layer(self, local_layer: int) -> tuple[int, tuple[int, int, int]]:
        """Byte offset of layer ``local_layer``'s slot 0 in the host buffer, and its
        ``(page, page_stride, row_stride)`` in bytes."""
        rb, L, P = self.row_bytes, self.layer_num, self.page_size
        if self.layout == "layer_first":
            return local_layer * self.size * rb, (P, P * rb, rb)
        if self.layout == "page_first":
            return local_layer * rb, (1, L * rb, L * rb)
        return local_layer * P * rb, (P, L * P * rb, rb)

    def _host_rows(self, local_layer: int, h: torch.Tensor) -> tuple:
        """An index into ``self._rows`` selecting the byte rows of one layer at host slots ``h``."""
        if self.layout == "layer_first":
            return (local_layer, h)
        if self.layout == "page_first":
            return (h, local_layer)
        return (h // self.page_size, local_layer, h % self.page_size)

    def _host_row_run(self, local_layer: int, slot: int, n: int) -> torch.Tensor:
        """Host rows ``slot .. slot + n - 1`` of one layer as a ``[n, row_bytes]`` byte view."""
        if self.layout == "layer_first":
            return self._rows[local_layer, slot : slot + n]
        if self.layout == "page_first":
            return self._rows[slot : slot + n, local_layer]
        p, o = divmod(slot, self.page_size)
        return self._rows[p, local_layer, o : o + n]

    # ---- transfers -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_transfer_stream(self, device: torch.device):
        """Run the body on the transfer stream, after the work queued on the current stream; yield
        an event that is recorded when the body's work ends."""
        if self._stream is None:
            with self._lock:  # threads share one transfer stream (synchronize() waits for it)
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=device)
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(device))
        done = torch.cuda.Event()
        with torch.cuda.stream(stream):
            yield done
            done.record(stream)

    def _copy_layer(self, device_pool: MLATokenToKVPool, b: _Batch, local: int, to_host: bool, io_backend: str) -> None:
        """One layer of a validated batch, on the current (transfer) stream or the CPU."""
        dev = _device_rows(device_pool, local)
        if _kernel_path(device_pool.device, io_backend, self.pinned):
            from mlakv.kernels.triton.transfer import launch_copy_rows

            P = self.page_size if b.page_units else 1
            hv, dv = _kernel_vector(b.h, device_pool.device, P), _kernel_vector(b.d, device_pool.device, P)
            off, host_layout = self._host_layer(local)
            host = self._bytes[off:]
            mla = self.mla_row_bytes
            dev_layout = (1, mla, mla)
            unit = mla * P
            if P > 1:  # page units start at page-aligned slots: the row stride is never used, so give it
                # the unit's own size, which keeps the copy's word width (a V4 page's slot share is 585 B)
                dev_layout, host_layout = (P, unit, unit), (host_layout[0], host_layout[1], unit)
            # the kernel's own bounds: a unit whose slot is outside [0, limit) or off its page is skipped
            hl, dl = self.size, device_pool.num_slots
            if to_host:
                launch_copy_rows(dev, host, dv, hv, unit, dev_layout, host_layout, max_programs=self.transfer_sms,
                                 src_limit=dl, src_align=P, dst_limit=hl, dst_align=P)
            else:
                launch_copy_rows(host, dev, hv, dv, unit, host_layout, dev_layout, max_programs=self.transfer_sms,
                                 src_limit=hl, src_align=P, dst_limit=dl, dst_align=P)
            if self.index_row_bytes:  # the indexer half: keys, then scales, each slot's into its host row
                index = device_pool.index_k_buffer[local].view(-1)
                il = device_pool.num_index_pages * INDEX_PAGE_TOKENS
                for dev_off, host_off, width in _index_parts(mla):
                    d_layout = (INDEX_PAGE_TOKENS, INDEX_PAGE_BYTES, width)
                    if to_host:
                        launch_copy_rows(index[dev_off:], self._bytes[off + host_off :], dv, hv, width, d_layout, host_layout,
                                         max_programs=self.transfer_sms, src_limit=il, dst_limit=hl)  # fmt: skip
                    else:
                        launch_copy_rows(self._bytes[off + host_off :], index[dev_off:], hv, dv, width, host_layout, d_layout,
                                         max_programs=self.transfer_sms, src_limit=hl, dst_limit=il)  # fmt: skip
            return
        mla = slice(0, self.mla_row_bytes)
        if self.index_row_bytes:
            self._copy_index_half(device_pool, b, local, to_host)
        if device_pool.device.type != "cuda":
            sel = self._host_rows(local, b.h_cpu) + (mla,)
            if to_host:
                self._rows[sel] = dev[b.d_cpu]
            else:
                dev[b.d_cpu] = self._rows[sel]
            return
        for hs, ds, n in _runs(b.h_cpu, b.d_cpu, self._host_run_limit()):  # "direct" on CUDA
            host = self._host_row_run(local, hs, n)[:, mla]
            if to_host:
                host.copy_(dev[ds : ds + n], non_blocking=True)
            else:
                dev[ds : ds + n].copy_(host, non_blocking=True)

    def _copy_index_half(self, device_pool: Any, b: _Batch, local: int, to_host: bool) -> None:
        """A DSA pool's indexer keys and scales of one layer, plain torch (CPU, and CUDA ``"direct"``
        or unpinned: gathered on the device into ``[n, 132]``, one copy across, scattered; syncs)."""
        pages = device_pool.index_k_buffer[local]
        keys = pages[:, : INDEX_PAGE_TOKENS * INDEX_HEAD_DIM].unflatten(1, (INDEX_PAGE_TOKENS, INDEX_HEAD_DIM))
        scales = pages[:, INDEX_PAGE_TOKENS * INDEX_HEAD_DIM :].unflatten(1, (INDEX_PAGE_TOKENS, 4))
        d = b.d_cpu.to(pages.device)
        page, pos = d // INDEX_PAGE_TOKENS, d % INDEX_PAGE_TOKENS
        sel = self._host_rows(local, b.h_cpu) + (slice(self.mla_row_bytes, self.row_bytes),)
        if to_host:
            self._rows[sel] = torch.cat([keys[page, pos], scales[page, pos]], 1).cpu()
        else:
            both = self._rows[sel].to(pages.device)
            keys[page, pos] = both[:, :INDEX_HEAD_DIM]
            scales[page, pos] = both[:, INDEX_HEAD_DIM:]

    def _host_run_limit(self) -> int:
        """Longest run of consecutive host slots that is one contiguous block of a layer's rows."""
        return {"layer_first": self.size, "page_first": 1, "page_first_direct": self.page_size}[self.layout]

    def backup_from_device_all_layer(
        self,
        device_pool: MLATokenToKVPool,
        host_indices: torch.Tensor,
        device_indices: torch.Tensor,
        io_backend: str = "kernel",
    ) -> None:
        """Copy device rows ``device_indices`` of every layer to host slots ``host_indices``.

        Args:
            host_indices, device_indices: ``[n]`` int32/int64 token slots, whole aligned pages when
                the page size is > 1, any stride (strided, expanded and offset views are honoured).
            io_backend: ``"kernel"`` (zero-copy Triton kernel) or ``"direct"`` (``copy_`` of runs).

        On CUDA the copy runs on this pool's transfer stream after the work already queued on the
        current stream; call :meth:`synchronize` (or wait on :meth:`backup_event`) before reusing
        the device slots.
        """
        _check_backend(io_backend)
        b = self._prepare(device_pool, host_indices, device_indices, io_backend)
        if b.n == 0:
            return
        if device_pool.device.type != "cuda":
            for layer in range(self.layer_num):
                self._copy_layer(device_pool, b, layer, True, io_backend)
            return
        with self._on_transfer_stream(device_pool.device) as done:
            for layer in range(self.layer_num):
                self._copy_layer(device_pool, b, layer, True, io_backend)
        self._backup_event = done

    def backup_event(self) -> Optional[torch.cuda.Event]:
        """The event recorded after the last CUDA backup (None before any)."""
        return getattr(self, "_backup_event", None)

    def load_to_device_per_layer(
        self,
        device_pool: MLATokenToKVPool,
        host_indices: torch.Tensor,
        device_indices: torch.Tensor,
        layer_id: int,
        io_backend: str = "kernel",
    ) -> None:
        """Copy host slots ``host_indices`` of one layer (global ``layer_id``) to device rows ``device_indices``.

        The index vectors are validated on the first layer of a batch (one host sync for a CUDA
        vector); later layers move the slots the vectors hold then, without a host sync (see the
        module docstring).
        On CUDA the copy is queued on the transfer stream and an event is recorded for the layer;
        the consumer calls :meth:`wait_until_layer_ready` on its stream before reading the rows.
        """
        _check_backend(io_backend)
        local = device_pool.local_layer(layer_id)
        b = self._prepare(device_pool, host_indices, device_indices, io_backend)
        if b.n == 0:
            return
        if device_pool.device.type != "cuda":
            self._copy_layer(device_pool, b, local, False, io_backend)
            return
        with self._on_transfer_stream(device_pool.device) as done:
            self._copy_layer(device_pool, b, local, False, io_backend)
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

    # ---- pages for storage (L3) -------------------------------------------------------------
    def page_index(self, index: Any, name: str = "index") -> int:
        """Page number of the page whose first token slot is ``index``."""
        i = _as_int(index, name)
        if not 0 <= i < self.size or i % self.page_size:
            raise IndexError(f"{name}={i} must be a page-aligned slot (a multiple of {self.page_size}) in [0, {self.size})")
        return i // self.page_size

    def page_is_contiguous(self) -> bool:
        """Whether each page's bytes (all layers) are one contiguous block of ``kv_buffer``."""
        return self.layout != "layer_first"

    def page_view(self, index: int) -> torch.Tensor:
        """The bytes of the page starting at slot ``index`` as a ``[page_bytes]`` uint8 view, in the
        layout's own order (``page_first``: token-major; ``page_first_direct``: layer-major).
        Only for contiguous-page layouts (``ValueError`` for ``layer_first``)."""
        page = self.page_index(index)
        if not self.page_is_contiguous():
            raise ValueError("page_view: layout 'layer_first' keeps a page's layers apart; use get_page_bytes")
        start = page * self.page_bytes
        return self._bytes[start : start + self.page_bytes]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        """The page starting at slot ``index``, a view of ``kv_buffer`` (sglang's meaning: the
        layout's own order; ``flat`` flattens it, which copies for ``layer_first``)."""
        page = self.page_index(index)
        P = self.page_size
        if self.layout == "layer_first":
            data = self.kv_buffer[:, page * P : (page + 1) * P]
        elif self.layout == "page_first":
            data = self.kv_buffer[page * P : (page + 1) * P]
        else:
            data = self.kv_buffer[page : page + 1]
        return data.flatten() if flat else data

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        """A zero page in ``store_dtype``, flat ``[layer_num * page_size * D]`` (a buffer to read into)."""
        return torch.zeros(self.layer_num * self.page_size * self.kv_cache_dim, dtype=self.store_dtype, pin_memory=self.pin_memory)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        """Write the page starting at slot ``index`` from ``data_page`` (``store_dtype``, ``layer_num *
        page_size * D`` elements, in this layout's order, as :meth:`get_data_page` gives it)."""
        dst = self.get_data_page(index, flat=False)
        if not isinstance(data_page, torch.Tensor):
            raise TypeError(f"data_page must be a tensor, got {type(data_page).__name__}")
        want = self.layer_num * self.page_size * self.kv_cache_dim
        if data_page.dtype != self.store_dtype or data_page.numel() != want:
            raise ValueError(
                f"data_page must be {want} elements of {self.store_dtype}, got {data_page.numel()} of {data_page.dtype}"
            )
        dst.copy_(data_page.reshape(dst.shape))

    def get_page_buffer_meta(self, indices: torch.Tensor) -> tuple[list[int], list[int]]:
        """Zero-copy storage I/O: ``(ptrs, nbytes)`` of the host pages holding token slots ``indices``
        (whole aligned pages). Contiguous-page layouts give one ``(ptr, page_bytes)`` per page;
        ``layer_first`` gives one entry per page per layer (``page_size * row_bytes`` each)."""
        pages = self.pages_of(indices, "indices").tolist()
        base, rb, P = self._bytes.data_ptr(), self.row_bytes, self.page_size
        if self.page_is_contiguous():
            return [base + p * self.page_bytes for p in pages], [self.page_bytes] * len(pages)
        ptrs = [base + (layer * self.size + p * P) * rb for p in pages for layer in range(self.layer_num)]
        return ptrs, [P * rb] * len(ptrs)

    def get_page_bytes(self, host_index: int) -> bytes:
        """One page (all layers) in the canonical layer-major order ``[layer][token][row bytes]``
        (the same for every layout); ``host_index`` is its first slot."""
        return self._page_layer_major(host_index).contiguous().numpy().tobytes()

    def _page_layer_major(self, host_index: int) -> torch.Tensor:
        """The page as a ``[layer, page_size, row_bytes]`` byte view (strided for some layouts)."""
        page = self.page_index(host_index, "host_index")
        P = self.page_size
        if self.layout == "layer_first":
            return self._rows[:, page * P : (page + 1) * P]
        if self.layout == "page_first":
            return self._rows[page * P : (page + 1) * P].transpose(0, 1)
        return self._rows[page]

    def set_page_bytes(self, host_index: int, data: Any) -> None:
        """Write one page (all layers) from :meth:`get_page_bytes`'s format: ``bytes``-like, or a
        uint8 numpy array / CPU tensor, of exactly ``page_bytes`` bytes."""
        src = page_bytes_tensor(data, self.page_bytes, "data")
        self._page_layer_major(host_index).copy_(src.view(self.layer_num, self.page_size, self.row_bytes))


def page_bytes_tensor(data: Any, page_bytes: int, name: str) -> torch.Tensor:
    """``data`` (``bytes``-like, or a uint8 numpy array / CPU tensor) as a flat ``[page_bytes]``
    uint8 tensor, without a copy where possible; sizes are counted in bytes."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.device.type != "cpu":
            raise TypeError(f"{name}: a page tensor must be uint8 on the CPU, got {data.dtype} on {data.device}")
        t = data.reshape(-1)
    elif isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"{name}: a page array must be uint8, got {data.dtype} (view it as uint8 first)")
        with warnings.catch_warnings():  # a read-only array: the tensor is only ever read
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(data).reshape(-1))
    elif isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        mv = mv.cast("B") if mv.contiguous else memoryview(mv.tobytes())
        if mv.nbytes == 0:
            t = torch.empty(0, dtype=torch.uint8)
        else:
            with warnings.catch_warnings():  # read-only bytes: the tensor is only ever read
                warnings.simplefilter("ignore", UserWarning)
                t = torch.frombuffer(mv, dtype=torch.uint8)
    else:
        raise TypeError(f"{name} must be bytes-like, a uint8 numpy array or a uint8 tensor, got {type(data).__name__}")
    if t.numel() != page_bytes:
        raise ValueError(f"{name}: a page is {page_bytes} bytes, got {t.numel()}")
    return t


def _is_paged(device_pool: Any) -> bool:
    """Whether ``device_pool`` keeps block-split pages (``[num_pages, page_bytes]`` layers whose token
    bytes are not one row per slot: :data:`mlakv.spec.formats.SPLIT_PAGES`)."""
    fmt = getattr(device_pool, "format", None)
    return fmt is not None and fmt.paged


def _index_row_bytes(device_pool: Any) -> int:
    """Bytes of a slot's indexer half a host row carries for ``device_pool``: 132 (its 128 e4m3 key
    bytes, then its 4 fp32 scale bytes) for a DSA pool (one with ``index_k_buffer``), else 0."""
    return INDEX_HEAD_DIM + 4 if getattr(device_pool, "index_k_buffer", None) is not None else 0


def _index_parts(mla_row_bytes: int) -> tuple[tuple[int, int, int], ...]:
    """``(device byte offset in an indexer page, host byte offset in a row, width)`` of the keys and
    the scales of a slot (the transfer kernel's two extra launches)."""
    return ((0, mla_row_bytes, INDEX_HEAD_DIM), (INDEX_PAGE_TOKENS * INDEX_HEAD_DIM, mla_row_bytes + INDEX_HEAD_DIM, 4))


def unit_row_bytes(device_pool: Any) -> int:
    """Bytes a host slot holds per layer for ``device_pool``: its row (``rows`` formats), or for a
    block-split paged format a slot's share of a page, ``page_bytes / page_size`` (data rows, scale
    rows and padding together), so ``page_size`` consecutive host rows are the device page's bytes in
    order and a transfer of whole aligned pages copies pages bit for bit. Raises ``ValueError`` when
    ``page_size`` does not divide the page's bytes (such a page cannot be cut into slot rows)."""
    if not _is_paged(device_pool):
        return device_pool.row_bytes()
    P = device_pool.page_size
    page = device_pool.format.page_bytes(P)
    if page % P:
        raise ValueError(
            f"device_pool: a {device_pool.format.name!r} page of {P} slots is {page} bytes, not a multiple of "
            f"page_size={P}; the host pool moves such pages as page_size rows and cannot mirror it"
        )
    return page // P


def _kernel_path(device: torch.device, io_backend: str, pinned: bool) -> bool:
    """The one place that picks the copy path: the zero-copy Triton kernel for ``"kernel"`` on CUDA
    with a pinned host buffer (the kernel reaches host memory through unified addressing, which
    pageable memory does not have); plain torch copies otherwise (indexed on CPU, ``copy_`` of
    contiguous runs for ``"direct"`` or a pageable host buffer)."""
    return io_backend == "kernel" and device.type == "cuda" and pinned


def _check_backend(io_backend: Any) -> None:
    if io_backend not in IO_BACKENDS:
        raise ValueError(f"io_backend must be one of {IO_BACKENDS}, got {io_backend!r}")


def _buffer_device(device_pool: MLATokenToKVPool) -> torch.device:
    """The device the pool's buffers are on, as a tensor reports it (``cuda:0``): the pool's own
    ``device`` may be ``torch.device("cuda")`` without an index, which compares unequal to every CUDA
    tensor's device, so a CUDA index vector would never be recognised as on the pool's GPU."""
    return device_pool.kv_buffer[0].device


def _device_rows(device_pool: MLATokenToKVPool, local_layer: int) -> torch.Tensor:
    """A layer's device buffer as ``[num_slots, row_bytes]`` uint8 (a view)."""
    return device_pool.kv_buffer[local_layer].view(device_pool.num_slots, -1).view(torch.uint8)


def _runs(h: torch.Tensor, d: torch.Tensor, host_limit: int) -> list[tuple[int, int, int]]:
    """``(host_start, device_start, length)`` runs where both slot vectors go up by one, cut so a
    run never crosses a multiple of ``host_limit`` on the host side."""
    hl, dl = h.tolist(), d.tolist()
    out: list[tuple[int, int, int]] = []
    for hs, ds in zip(hl, dl):
        if out:
            h0, d0, n = out[-1]
            if hs == h0 + n and ds == d0 + n and hs % host_limit:
                out[-1] = (h0, d0, n + 1)
                continue
        out.append((hs, ds, 1))
    return out


def _check_slots(indices: Any, name: str, limit: int, page_size: int) -> torch.Tensor:
    """:func:`mlakv.spec.rules.check_token_slots`: a private contiguous CPU int64 copy of a valid
    token-slot vector. One host sync for a device vector."""
    return rules.check_token_slots(indices, name, limit, page_size)


def _kernel_vector(s: _Slots, device: torch.device, page: int) -> torch.Tensor:
    """The index vector the transfer kernel reads for ``s``: the caller's CUDA vector itself (marked
    as used on the transfer stream), or the validated copy uploaded once; every ``page``-th slot
    (a strided view) when the kernel moves whole pages."""
    if s.live is not None:
        v = s.live
        if v.is_cuda:
            v.record_stream(torch.cuda.current_stream(device))  # read on the transfer stream
    else:
        if s.dev is None:
            s.dev = s.cpu.to(device, non_blocking=True)
        v = s.dev
    return v[::page] if page > 1 else v
