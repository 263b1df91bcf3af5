"""mlakv: the KV-cache memory pool and fast KV-row writes for MLA (latent attention) models."""

from .mem_cache import (
    LocalFileStorage,
    MLATokenToKVPool,
    MLATokenToKVPoolHost,
    get_mla_kv_buffer_torch,
    kv_write_path,
    set_mla_kv_buffer_torch,
    set_mla_kv_buffer_triton,
)

__version__ = "0.1.0"

__all__ = [
    "LocalFileStorage",
    "MLATokenToKVPool",
    "MLATokenToKVPoolHost",
    "__version__",
    "get_mla_kv_buffer_torch",
    "kv_write_path",
    "set_mla_kv_buffer_torch",
    "set_mla_kv_buffer_triton",
]
