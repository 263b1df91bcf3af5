"""HiCache's third tier: pages in storage, under a key derived from the token prefix they cache.

:class:`LocalFileStorage` keeps one file per page. A page is written to a temporary file in the
same directory, flushed, and renamed into place, so a reader never sees a partial page: a crash
mid-write leaves at most a stray temporary file, never a short page under a real key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["LocalFileStorage", "prefix_page_key"]


def prefix_page_key(token_ids: Sequence[int], prior_key: Optional[str] = None) -> str:
    """Key of one page: a hash chained over the keys of the pages before it and this page's tokens.

    Two requests sharing a prefix get the same keys for the shared pages, and a page's key changes
    if anything before it does.
    """
    h = hashlib.sha256()
    if prior_key:
        h.update(prior_key.encode())
    h.update(b"|")
    h.update(",".join(str(int(t)) for t in token_ids).encode())
    return h.hexdigest()


class LocalFileStorage:
    """Pages of exactly ``page_bytes`` bytes in files under ``root``.

    Args:
        root: directory (created if missing).
        page_bytes: the size every page must have (``MLATokenToKVPoolHost.page_bytes``).
    """

    def __init__(self, root: str | os.PathLike, page_bytes: int) -> None:
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {page_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.page_bytes = page_bytes

    def _path(self, key: str) -> Path:
        if not key or not all(c.isalnum() or c in "-_" for c in key):
            raise ValueError(f"key must be a non-empty string of letters, digits, '-' and '_', got {key!r}")
        return self.root / f"{key}.page"

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> Optional[bytes]:
        """The page stored under ``key``, or None. A file of the wrong size is refused with an error."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != self.page_bytes:
            raise ValueError(f"stored page {key!r} is {len(data)} bytes, expected {self.page_bytes}")
        return data

    def set(self, key: str, data: bytes) -> None:
        """Store one page atomically (temporary file, fsync, rename). Refuses a page of the wrong size."""
        if len(data) != self.page_bytes:
            raise ValueError(f"data: a page is {self.page_bytes} bytes, got {len(data)}")
        path = self._path(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
