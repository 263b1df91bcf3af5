"""mlakv.mem_cache: the MLA KV pool, its token-slot allocator, the HiCache host pool and page storage.

The row write and its formats live in :mod:`mlakv.ops`; the names callers know are re-exported here.
"""

from mlakv.ops.dispatch import SUPPORTED_DTYPES, check_loc_bounds, kv_write_path, set_mla_kv_buffer_triton, validate_kv_write
from mlakv.ops.fp8 import (
    KV_CACHE_FORMATS,
    dequantize_mla_rows,
    fp8_row_bytes,
    get_mla_kv_buffer_dequant,
    quantize_mla_rows,
    set_mla_kv_buffer_quant,
)
from mlakv.ops.reference import get_mla_kv_buffer_torch, set_mla_kv_buffer_torch
from mlakv.ops.rope_write import set_mla_kv_buffer_rope

from .allocator import PoolFullError, TokenSlotAllocator
from .dsa_pool import DSATokenToKVPool
from .host_pool import MLATokenToKVPoolHost
from .memory_pool import MLATokenToKVPool
from .storage import LocalFileStorage, prefix_page_key

__all__ = [
    "DSATokenToKVPool",
    "LocalFileStorage",
    "MLATokenToKVPool",
    "MLATokenToKVPoolHost",
    "PoolFullError",
    "TokenSlotAllocator",
    "prefix_page_key",
    "SUPPORTED_DTYPES",
    "check_loc_bounds",
    "get_mla_kv_buffer_torch",
    "kv_write_path",
    "set_mla_kv_buffer_torch",
    "set_mla_kv_buffer_triton",
    "validate_kv_write",
    "KV_CACHE_FORMATS",
    "dequantize_mla_rows",
    "fp8_row_bytes",
    "get_mla_kv_buffer_dequant",
    "quantize_mla_rows",
    "set_mla_kv_buffer_quant",
    "set_mla_kv_buffer_rope",
]
