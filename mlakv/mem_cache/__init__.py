"""mlakv.mem_cache: the MLA KV pool, the row-write dispatcher and their kernels."""

from .kv_write import SUPPORTED_DTYPES, check_loc_bounds, kv_write_path, set_mla_kv_buffer_triton, validate_kv_write
from .host_pool import MLATokenToKVPoolHost
from .memory_pool import MLATokenToKVPool
from .storage import LocalFileStorage, prefix_page_key
from .torch_ref import get_mla_kv_buffer_torch, set_mla_kv_buffer_torch
from .fp8 import (
    KV_CACHE_FORMATS,
    dequantize_mla_rows,
    fp8_row_bytes,
    get_mla_kv_buffer_dequant,
    quantize_mla_rows,
    set_mla_kv_buffer_quant,
)

__all__ = [
    "LocalFileStorage",
    "MLATokenToKVPool",
    "MLATokenToKVPoolHost",
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
]
