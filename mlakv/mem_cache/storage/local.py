"""HiCache's third tier on a local (or shared) file system: one checksummed file per page.

:class:`LocalFileStorage` implements :class:`~mlakv.mem_cache.storage.base.HiCacheStorage`. Each page
is one file named by a hash of its key (bounded length, any key bytes), holding a fixed header —
magic, format version, the byte order of the page (layer-major or token-major), the page size, its
layers and tokens, a digest of the key, a digest of the pool's page format (dtype, FP8 format and
scale, widths, row bytes, the cache format's key, a DSA pool's indexer half, layer range, page size:
:func:`~mlakv.mem_cache.storage.base.pool_format`)
and a BLAKE2b checksum — followed by the page bytes. A reader opens without blocking, checks that
the path is a regular file of the right size before reading and the header and checksum after: a
FIFO or other special file, a truncated, corrupted or foreign file (another key, another pool
format or shape) is a miss (``None``), counted and logged once, never returned and never waited on.
Pages of the two byte orders (``page_first``'s token-major and the layer-major layouts) are the
same page: a reader reorders them into its own layout.

A page is written to a hidden temporary file in the same directory
(``.tmp-<writer>-<pid>-<random>``, a name no key maps to), fsynced and renamed into place, so a
reader sees the old page or the new one, never a torn one, whatever happens to the writer.
``<writer>`` is a digest of the full host name, the boot id and the pid namespace, so two hosts or
two containers sharing the directory never take each other's names for their own. Temporary files
of dead writers (same writer id, pid gone) or older than ``stale_temp_age_s`` are removed when a
store opens its directory (and by :meth:`LocalFileStorage.remove_stale_temp_files`); another
writer's in-flight file is never removed by its pid.

``prefix_page_key`` derives a page's key from the token prefix it caches.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..host_pool import page_bytes_tensor
from .base import HiCacheStorage, StorageKey, pool_format

__all__ = ["LocalFileStorage", "prefix_page_key", "ORDER_LAYER_MAJOR", "ORDER_TOKEN_MAJOR"]

logger = logging.getLogger(__name__)

_MAGIC = b"MLAKVPG\x00"
_VERSION = 2
#: magic, version, order, reserved, page_bytes, layers, tokens, key digest, page-format digest, checksum
_HEADER = struct.Struct("<8sHBBQII32s32s32s")
_PREFIX_LEN = _HEADER.size - 32  # the header bytes the checksum covers (all but the checksum)
#: page bytes as ``[layer][token][row]`` (``get_page_bytes``; ``page_first_direct``; ``layer_first``)
ORDER_LAYER_MAJOR = 0
#: page bytes as ``[token][layer][row]`` (the ``page_first`` layout's own order)
ORDER_TOKEN_MAJOR = 1
_TMP_PREFIX = ".tmp-"
_SUFFIX = ".page"


def prefix_page_key(token_ids: Sequence[int], prior_key: Optional[str] = None) -> str:
    """Key of one page: a SHA-256 chained over the key of the page before it and this page's tokens.

    Two requests sharing a prefix get the same keys for the shared pages, and a page's key changes
    if anything before it does.

    Args:
        token_ids: the page's token ids: Python/numpy ints or a 1-D integer tensor (floats and
            bools are refused, never truncated).
        prior_key: the previous page's key (``None`` for the first page).
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool or token_ids.dtype.is_complex:
            raise TypeError(f"token_ids must hold integers, got a {token_ids.dtype} tensor")
        tokens = token_ids.reshape(-1).tolist()
    else:
        tokens = list(token_ids)
        for t in tokens:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"token_ids must hold integers, got {type(t).__name__} {t!r}")
    if prior_key is not None and not isinstance(prior_key, str):
        raise TypeError(f"prior_key must be a str or None, got {type(prior_key).__name__}")
    h = hashlib.sha256()
    if prior_key:
        h.update(prior_key.encode())
    h.update(b"|")
    h.update(",".join(str(int(t)) for t in tokens).encode())
    return h.hexdigest()


def _key_bytes(key: Any) -> bytes:
    if isinstance(key, str):
        kb = key.encode("utf-8", "surrogatepass")
    elif isinstance(key, bytes):
        kb = key
    else:
        raise TypeError(f"key must be str or bytes, got {type(key).__name__}")
    if not kb:
        raise ValueError("key must not be empty")
    return kb


def _writer_identity() -> tuple[str, bool]:
    """What makes this process's pids meaningful to another process: the full host name, the boot
    id and the pid namespace; and whether the namespace could be read (only then may a dead pid in
    a temporary file's name be trusted)."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("?")
    try:
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
        known = True
    except OSError:
        parts.append("?")
        known = False
    return "|".join(parts), known


def _checksum(prefix: bytes, payload: Any) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    h.update(prefix)
    h.update(payload)
    return h.digest()


class LocalFileStorage(HiCacheStorage):
    """Pages of exactly ``page_bytes`` bytes in checksummed files under ``root``.

    Args:
        root: directory (created if missing).
        page_bytes: the size every page has (``MLATokenToKVPoolHost.page_bytes``).
        stale_temp_age_s: a temporary file older than this is stale even if its writer's pid is
            alive (another host on a shared file system, or a reused pid).
        fsync: fsync each page and the directory before a ``set`` returns (durability across power
            loss; atomicity does not depend on it).

    ``stats()``: ``hits``, ``misses``, ``corrupt`` (pages refused on read: damaged, foreign, or not a
    regular file), ``sets``, ``set_errors``, ``stale_removed``.

    Until :meth:`register_mem_pool_host` the store holds raw pages (no pool format); after it, every
    page it writes carries the pool's format and shape, and a page of another format is a miss.
    """

    def __init__(self, root: str | os.PathLike, page_bytes: int, *, stale_temp_age_s: float = 3600.0, fsync: bool = True) -> None:
        if isinstance(page_bytes, bool) or not isinstance(page_bytes, (int, np.integer)) or page_bytes <= 0:
            raise ValueError(f"page_bytes must be a positive int, got {page_bytes!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.page_bytes = int(page_bytes)
        self.file_bytes = _HEADER.size + self.page_bytes
        self.stale_temp_age_s = float(stale_temp_age_s)
        self.fsync = fsync
        self.host_pool: Any = None
        identity, self._pids_comparable = _writer_identity()
        self._writer = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
        self._stats = {"hits": 0, "misses": 0, "corrupt": 0, "sets": 0, "set_errors": 0, "stale_removed": 0}
        self._warned_corrupt = False
        self.remove_stale_temp_files()

    # ---- names ------------------------------------------------------------------------------
    def path_of(self, key: StorageKey) -> Path:
        """The file a key's page lives in: ``<40 hex digits>.page`` whatever the key's length."""
        return self.root / (hashlib.blake2b(_key_bytes(key), digest_size=20).hexdigest() + _SUFFIX)

    @staticmethod
    def _key_digest(kb: bytes) -> bytes:
        return hashlib.blake2b(kb, digest_size=32, person=b"mlakv-page-key").digest()

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files whose writer is dead (this writer id: same host, boot and pid
        namespace; pid gone) or that are older than ``stale_temp_age_s``; return how many were removed."""
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        for e in entries:
            if not e.name.startswith(_TMP_PREFIX):
                continue
            parts = e.name[len(_TMP_PREFIX) :].split("-")
            dead = False
            if len(parts) == 3 and parts[0] == self._writer and self._pids_comparable and parts[1].isdigit():
                pid = int(parts[1])
                if pid != os.getpid():
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        dead = True
                    except PermissionError:
                        pass
            try:
                old = now - e.stat(follow_symlinks=False).st_mtime > self.stale_temp_age_s
                if dead or old:
                    os.unlink(e.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError:  # read-only directory: nothing we can do, readers never see them anyway
                continue
        self._stats["stale_removed"] += removed
        return removed

    # ---- one page ---------------------------------------------------------------------------
    def exists(self, key: StorageKey) -> bool:
        """Whether a regular file of the right size is stored under ``key`` (its header and checksum
        are checked on read)."""
        try:
            st = os.stat(self.path_of(key))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == self.file_bytes

    # ---- the page format --------------------------------------------------------------------
    def page_identity(self) -> str:
        """The format every page this store writes carries and every page it reads must carry: ``""``
        (raw pages) before :meth:`register_mem_pool_host`, else the pool's :func:`pool_format` with
        its layer range and page size, e.g. ``"bfloat16-raw-512+64-1152B-L0-61-P64"``."""
        host = self.host_pool
        if host is None:
            return ""
        return f"{pool_format(host)}-L{host.start_layer}-{host.start_layer + host.layer_num}-P{host.page_size}"

    def _format_digest(self) -> bytes:
        return hashlib.blake2b(self.page_identity().encode(), digest_size=32, person=b"mlakv-page-fmt").digest()

    def get(self, key: StorageKey) -> Optional[bytes]:
        """The page under ``key`` in layer-major order (``[layer][token][row]``), or ``None`` if absent,
        truncated, corrupted or written for another key."""
        kb = _key_bytes(key)
        buf = bytearray(self.page_bytes)
        got = self._read(kb, memoryview(buf), self._format_digest())
        if got is None:
            return None
        order, layers, tokens = got
        if order == ORDER_TOKEN_MAJOR:
            return _reorder(np.frombuffer(buf, np.uint8), tokens, layers).tobytes()
        return bytes(buf)

    def set(self, key: StorageKey, data: Any) -> None:
        """Store one page (``bytes``-like, or a uint8 numpy array / CPU tensor of exactly
        ``page_bytes`` bytes), layer-major as :meth:`MLATokenToKVPoolHost.get_page_bytes` gives it.
        All or nothing: an error (disk full, read-only directory) raises ``OSError`` naming the key
        and leaves the key's previous page in place."""
        kb = _key_bytes(key)
        page = page_bytes_tensor(data, self.page_bytes, "data")
        host = self.host_pool
        layers, tokens = (0, 0) if host is None else (host.layer_num, host.page_size)
        self._write(kb, key, page.numpy(), ORDER_LAYER_MAJOR, layers, tokens, self._format_digest())

    # ---- batches (host pool pages, no Python byte copies for contiguous-page layouts) ----------
    def register_mem_pool_host(self, host_pool: Any) -> None:
        if getattr(host_pool, "page_bytes", None) != self.page_bytes:
            raise ValueError(
                f"host_pool: its pages are {getattr(host_pool, 'page_bytes', None)} bytes, this store's are {self.page_bytes}"
            )
        self.host_pool = host_pool

    def _host_pages(self, keys: Sequence[StorageKey], host_indices: Any) -> list[int]:
        """First slot of each host page named by ``host_indices`` (``[n_keys]`` page starts or
        ``[n_keys * page_size]`` token slots), validated against the registered host pool."""
        host = self.host_pool
        if host is None:
            raise RuntimeError("register_mem_pool_host(host_pool) must be called before the batch calls")
        if not isinstance(keys, (list, tuple)):
            raise TypeError(f"keys must be a list or tuple of keys, got {type(keys).__name__}")
        if not isinstance(host_indices, torch.Tensor) or host_indices.dim() != 1 or host_indices.dtype not in (torch.int32, torch.int64):
            raise TypeError("host_indices must be a 1-D int32/int64 tensor")
        idx = host_indices.to("cpu", torch.int64).contiguous()
        P = host.page_size
        if idx.numel() == len(keys) * P and P > 1:
            pages = host.pages_of(idx, "host_indices") * P
        elif idx.numel() == len(keys):
            pages = idx
            for s in pages.tolist():
                host.page_index(s, "host_indices")
        else:
            raise ValueError(
                f"host_indices has {idx.numel()} entries for {len(keys)} keys: expected one page start per key "
                f"or {P} token slots per key"
            )
        return pages.tolist()

    def batch_get_into(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> int:
        """Load pages ``keys[i]`` into host pages ``host_indices`` (see the interface); returns how
        many leading pages were loaded. The page at the first miss may have been written into
        (its contents are undefined); pages after it are not touched."""
        starts = self._host_pages(keys, host_indices)
        host = self.host_pool
        own_order = ORDER_TOKEN_MAJOR if host.layout == "page_first" else ORDER_LAYER_MAJOR
        fmt = self._format_digest()
        done = 0
        for key, start in zip(keys, starts):
            kb = _key_bytes(key)
            if host.page_is_contiguous():
                view = host.page_view(start).numpy()
                got = self._read(kb, memoryview(view), fmt)
                if got is None:
                    break
                if got[0] != own_order:  # stored by a host of the other page order: reorder in place
                    L, P = host.layer_num, host.page_size
                    a, b = (L, P) if got[0] == ORDER_LAYER_MAJOR else (P, L)  # the stored leading dims
                    view[:] = _reorder(view.copy(), a, b)
            else:
                buf = bytearray(self.page_bytes)
                got = self._read(kb, memoryview(buf), fmt)
                if got is None:
                    break
                page = np.frombuffer(buf, np.uint8)
                if got[0] == ORDER_TOKEN_MAJOR:
                    page = _reorder(page, host.page_size, host.layer_num)
                host.set_page_bytes(start, page)
            done += 1
        return done

    def batch_set_from(self, keys: Sequence[StorageKey], host_indices: torch.Tensor) -> int:
        """Store host pages ``host_indices`` under ``keys[i]`` (contiguous-page layouts: straight from
        the host buffer, in its own order); returns how many were stored (all, or it raises)."""
        starts = self._host_pages(keys, host_indices)
        host = self.host_pool
        fmt = self._format_digest()
        for key, start in zip(keys, starts):
            kb = _key_bytes(key)
            if host.page_is_contiguous():
                order = ORDER_TOKEN_MAJOR if host.layout == "page_first" else ORDER_LAYER_MAJOR
                self._write(kb, key, host.page_view(start).numpy(), order, host.layer_num, host.page_size, fmt)
            else:
                self._write(kb, key, np.frombuffer(host.get_page_bytes(start), np.uint8), ORDER_LAYER_MAJOR,
                            host.layer_num, host.page_size, fmt)
        return len(starts)

    # ---- file I/O ---------------------------------------------------------------------------
    def _corrupt(self, path: Path, why: str) -> None:
        self._stats["corrupt"] += 1
        if not self._warned_corrupt:
            self._warned_corrupt = True
            logger.warning("LocalFileStorage: refusing page %s (%s); further refusals are only counted", path, why)

    def _read(self, kb: bytes, into: memoryview, fmt: bytes) -> Optional[tuple[int, int, int]]:
        """Read and verify the page of key bytes ``kb`` and page-format digest ``fmt`` into ``into``
        (``page_bytes`` bytes); return ``(order, layers, tokens)`` or ``None`` on a miss (absent or
        refused). Never blocks on a special file: opened with ``O_NONBLOCK``, refused unless regular."""
        path = self.root / (hashlib.blake2b(kb, digest_size=20).hexdigest() + _SUFFIX)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            self._stats["misses"] += 1
            return None
        except OSError as e:  # a socket, a FIFO that refuses, no permission: not a page we can read
            self._corrupt(path, f"cannot be opened ({e.strerror})")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._corrupt(path, "not a regular file (a FIFO, device or directory)")
                return None
            size = st.st_size
            if size != self.file_bytes:
                self._corrupt(path, f"file is {size} bytes, expected {self.file_bytes}")
                return None
            with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
                head = _read_exact(f, memoryview(bytearray(_HEADER.size)))
                if head is None:
                    self._corrupt(path, "short read of the header")
                    return None
                magic, version, order, _, page_bytes, layers, tokens, kdig, fdig, csum = _HEADER.unpack(head)
                if magic != _MAGIC or version != _VERSION:
                    self._corrupt(path, f"not a page file of format version {_VERSION}")
                    return None
                if page_bytes != self.page_bytes or order not in (ORDER_LAYER_MAJOR, ORDER_TOKEN_MAJOR):
                    self._corrupt(path, f"header says {page_bytes} page bytes, order {order}")
                    return None
                if kdig != self._key_digest(kb):
                    self._corrupt(path, "written for another key")
                    return None
                if fdig != fmt:
                    self._corrupt(path, f"written by a pool of another page format or shape (this store's: "
                                        f"{self.page_identity() or 'raw pages'})")
                    return None
                if _read_exact(f, into) is None:
                    self._corrupt(path, "short read of the page")
                    return None
            if _checksum(bytes(head[:_PREFIX_LEN]), into) != csum:
                self._corrupt(path, "checksum mismatch")
                return None
            if order == ORDER_TOKEN_MAJOR and (layers * tokens == 0 or self.page_bytes % (layers * tokens)):
                self._corrupt(path, f"token-major page with a bad shape ({layers} layers x {tokens} tokens)")
                return None
        finally:
            os.close(fd)
        self._stats["hits"] += 1
        return order, layers, tokens

    def _write(self, kb: bytes, key: Any, payload: np.ndarray, order: int, layers: int, tokens: int, fmt: bytes) -> None:
        """Write ``payload`` (``[page_bytes]`` uint8) under key bytes ``kb`` with page-format digest
        ``fmt``: temp file, fsync, rename."""
        path = self.root / (hashlib.blake2b(kb, digest_size=20).hexdigest() + _SUFFIX)
        prefix = _HEADER.pack(
            _MAGIC, _VERSION, order, 0, self.page_bytes, layers, tokens, self._key_digest(kb), fmt, b"\0" * 32
        )[:_PREFIX_LEN]
        mv = memoryview(payload).cast("B")
        header = prefix + _checksum(prefix, mv)
        tmp = self.root / f"{_TMP_PREFIX}{self._writer}-{os.getpid()}-{secrets.token_hex(8)}"
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            _write_all(fd, memoryview(header))
            _write_all(fd, mv)
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(self.root)
        except OSError as e:
            self._stats["set_errors"] += 1
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                    errno.EFBIG: "the file size limit was hit", errno.EROFS: "the file system is read-only",
                    errno.EACCES: "the directory is not writable",
                    errno.ENOENT: "its temporary file was removed by another process before the rename (is "
                                  "stale_temp_age_s shorter than a write?)"}.get(e.errno, e.strerror or str(e))
            raise OSError(e.errno, f"LocalFileStorage.set: storing key {key!r} in {self.root} failed: {what} "
                                   "(the key keeps its previous page)") from e
        self._stats["sets"] += 1

    def stats(self) -> dict[str, int]:
        return dict(self._stats)


def _reorder(page: np.ndarray, a: int, b: int) -> np.ndarray:
    """A ``[a, b, row]`` byte page with its two leading axes swapped (token-major <-> layer-major)."""
    row = page.size // (a * b)
    return np.ascontiguousarray(page.reshape(a, b, row).transpose(1, 0, 2)).reshape(-1)


def _read_exact(f, into: memoryview) -> Optional[memoryview]:
    """Fill ``into`` from ``f``; return it, or None if the file ended first."""
    got = 0
    n = into.nbytes
    flat = into.cast("B") if into.format != "B" else into
    while got < n:
        k = f.readinto(flat[got:])
        if not k:
            return None
        got += k
    return into


def _write_all(fd: int, data: memoryview) -> None:
    flat = data.cast("B") if data.format != "B" else data
    done = 0
    while done < flat.nbytes:
        done += os.write(fd, flat[done:])


def _fsync_dir(root: Path) -> None:
    try:
        dfd = os.open(root, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
