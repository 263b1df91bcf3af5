"""Python entry of the JIT CUDA store of the DeepSeek-V4 family's paged caches (``csrc/v4_store.cuh``).

The routing decision is made in :mod:`mlakv.ops.v4`; this module builds the kernel's modules through
:mod:`mlakv.kernels.cuda.loader` (the one place that compiles), says whether the kernel serves a call
(:func:`v4_jit_store` returns False, launching nothing, when it cannot) and launches it. One module is
built per token encoding (``v4``, ``v41``, ``v41_fp4``; the interleaved layouts share their twin's);
it holds the bf16/fp16, int32/int64 loc, RoPE-mode and tokens-per-warp variants, and exports:

* ``v4_store(pages, loc, kv, freqs, positions, table, layout, page_size, rope, skip_index, dcp_world,
  dcp_rank, num_warps, items, early_trigger, pdl) -> bool``: the launcher's checks, then one launch
  on the current stream (False: an address or row stride is not a multiple of 16 bytes);
* ``check_v4_store(pages, loc, kv, freqs, positions, table, layout, page_size, rope, dcp_world,
  dcp_rank) -> bool``: the checks alone, on tensors of any device (the rule-parity test runs it on
  CPU tensors).

Layout codes (``LAYOUT_CODE``) are mlakv's own: 0 ``v4``, 1 ``v41``, 2 ``v41_fp4``, 3 ``v41_new``,
4 ``v41_fp4_new``. RoPE modes: 0 none, 1 ``freqs_cis [n, 64]``, 2 ``positions [n]`` into
``cos_sin_cache [max_pos, 64]``; the unused tensor arguments take any tensor of the device.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch

from mlakv.spec.calls import V4StoreCall
from mlakv.spec.tuning import v4_jit_launch

from .loader import JitUnavailable, load_cuda_module, sm90_module

__all__ = [
    "LAYOUT_CODE",
    "ENCODING_OF",
    "build_v4_store_module",
    "v4_store_module",
    "v4_jit_store",
]

LAYOUT_CODE = {"v4": 0, "v41": 1, "v41_fp4": 2, "v41_new": 3, "v41_fp4_new": 4}
ENCODING_OF = {"v4": 0, "v41": 1, "v41_fp4": 2, "v41_new": 1, "v41_fp4_new": 2}

_WRAPPER = """\
#include "v4_store.cuh"

using tvm::ffi::TensorView;

bool v4_store(TensorView pages, TensorView loc, TensorView kv, TensorView freqs, TensorView positions,
              TensorView table, int64_t layout, int64_t page_size, int64_t rope, int64_t skip_index,
              int64_t dcp_world, int64_t dcp_rank, int64_t num_warps, int64_t items, bool early_trigger, bool pdl) {{
  return mlakv::v4::launch_v4_store<{enc}>(pages, loc, kv, freqs, positions, table, layout, page_size, rope,
                                          skip_index, dcp_world, dcp_rank, num_warps, items, early_trigger, pdl);
}}
bool check_v4_store(TensorView pages, TensorView loc, TensorView kv, TensorView freqs, TensorView positions,
                    TensorView table, int64_t layout, int64_t page_size, int64_t rope, int64_t dcp_world,
                    int64_t dcp_rank) {{
  return mlakv::v4::check_v4_store(pages, loc, kv, freqs, positions, table, layout, page_size, rope, dcp_world,
                                   dcp_rank);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(v4_store, v4_store);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(check_v4_store, check_v4_store);
"""


def build_v4_store_module(encoding: int, device_capability: Optional[tuple[int, int]] = None) -> Any:
    """Compile (or load from cache) the module of one token encoding (0 ``v4``, 1 ``v41``, 2
    ``v41_fp4``); raises ``JitUnavailable``."""
    if encoding not in (0, 1, 2):
        raise JitUnavailable(f"unknown V4-family encoding {encoding!r}")
    return load_cuda_module(f"v4_store_enc{encoding}", _WRAPPER.format(enc=encoding), device_capability=device_capability)


@functools.lru_cache(maxsize=None)
def _module_for(device_index: int, encoding: int) -> Union[str, Any]:
    """The loaded module for a device and encoding, or the reason (str) it cannot be had."""
    return sm90_module(device_index, "V4-family store", lambda cap: build_v4_store_module(encoding, cap))


def v4_store_module(device: torch.device, layout: str) -> Union[str, Any]:
    """The module serving ``layout`` on ``device`` (CUDA), or the reason (str) it cannot be had."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _module_for(index, ENCODING_OF[layout])


def v4_jit_store(
    call: V4StoreCall,
    layout: str,
    page_size: int,
    *,
    num_warps: int = 0,
    items: int = 0,
    early_trigger: Optional[bool] = None,
    pdl: bool = True,
) -> bool:
    """Launch the store; False (nothing launched) when the kernel cannot serve the call here (no module
    on this device, or an address / row stride of ``kv_pages``, ``kv``, ``freqs_cis`` or
    ``cos_sin_cache`` not a multiple of 16 bytes), so the caller falls back. The module's launcher
    checks every rule itself and raises ``TypeError``/``ValueError`` for invalid arguments.

    ``call``: :class:`mlakv.spec.calls.V4StoreCall` (``kv [n, (1,) 512]`` here); ``layout`` and
    ``page_size`` say how its pages are laid out. ``num_warps`` / ``items`` / ``early_trigger``
    override the launch table (:func:`mlakv.spec.tuning.v4_jit_launch`; 0 / None: its choice).
    """
    kv_pages, loc, kv, freqs_cis, positions, cos_sin_cache, skip_index, dcp_world_size, dcp_rank = call
    if not kv_pages.is_cuda:
        return False
    mod = v4_store_module(kv_pages.device, layout)
    if isinstance(mod, str):
        return False
    rope = 1 if freqs_cis is not None else 2 if positions is not None else 0
    dummy = kv  # the unused tensor arguments: any tensor of the device
    warps, it, early = v4_jit_launch(loc.shape[0])
    return bool(
        mod.v4_store(
            kv_pages, loc, kv,
            freqs_cis if freqs_cis is not None else dummy,
            positions if positions is not None else dummy,
            cos_sin_cache if cos_sin_cache is not None else dummy,
            LAYOUT_CODE[layout], page_size, rope, skip_index, dcp_world_size, dcp_rank,
            num_warps or warps, items or it, early if early_trigger is None else early_trigger, pdl,
        )  # fmt: skip
    )
