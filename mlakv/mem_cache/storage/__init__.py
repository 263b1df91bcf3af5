"""HiCache L3 page storage: the interface (``base``), local files (``local``), Mooncake Store (``mooncake``,
imported on use: it needs the optional Mooncake wheel)."""

from .base import HiCacheStorage, StorageKey
from .local import LocalFileStorage, prefix_page_key

__all__ = ["HiCacheStorage", "LocalFileStorage", "StorageKey", "prefix_page_key"]
