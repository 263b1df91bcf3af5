"""A small DeepSeek-style MLA model served through the pool: the library used as an engine uses it."""

from .allocator import PoolFullError, TokenSlotAllocator
from .engine import DecodeGraphRunner, Engine, Request
from .mla import DictKVCache, MLAConfig, MLAModel, PoolKVCache

__all__ = [
    "DecodeGraphRunner",
    "DictKVCache",
    "Engine",
    "MLAConfig",
    "MLAModel",
    "PoolFullError",
    "PoolKVCache",
    "Request",
    "TokenSlotAllocator",
]
