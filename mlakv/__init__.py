"""mlakv: the KV-cache memory pool and fast KV-row writes for MLA (latent attention) models.

The public names below are loaded on first use (PEP 562), so ``import mlakv`` and ``mlakv
--version`` / ``--help`` do not import torch; ``from mlakv import MLATokenToKVPool`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "LocalFileStorage": "mlakv.mem_cache",
    "MLATokenToKVPool": "mlakv.mem_cache",
    "MLATokenToKVPoolHost": "mlakv.mem_cache",
    "get_mla_kv_buffer_torch": "mlakv.mem_cache",
    "kv_write_path": "mlakv.mem_cache",
    "set_mla_kv_buffer_torch": "mlakv.mem_cache",
    "set_mla_kv_buffer_triton": "mlakv.mem_cache",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlakv' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names only (not the helpers this module imports, nor loaded submodules)."""
    return sorted(__all__)
