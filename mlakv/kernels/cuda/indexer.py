"""Python entry of the JIT CUDA kernels of the DSA indexer K cache (``csrc/indexer.cuh``).

Why: the quantizing store runs once per layer per forward step, and the page-table gather once per
layer per indexer call; at prefill sizes both are bandwidth-bound, so they get a hand-written
kernel (16 lanes per key, several keys in flight per warp) on SM90+. The routing decision is made
in :mod:`mlakv.ops.dispatch`; this module builds the module through
:mod:`mlakv.kernels.cuda.loader` (the one place that compiles), says whether it is usable on a
device (:func:`indexer_jit_available`) and launches it (:func:`indexer_jit_store`,
:func:`indexer_jit_gather`). One module holds every variant (bf16/fp16 sources, int32/int64
indices, 1/2/4 keys per half-warp); the C++ launcher re-checks every memory-safety fact.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch

from mlakv.spec.calls import IndexStoreCall

from .loader import load_cuda_module, sm90_module

__all__ = [
    "STORE_NUM_WARPS",
    "store_steps_for",
    "build_indexer_module",
    "indexer_jit_available",
    "indexer_jit_store",
    "indexer_jit_gather",
]

STORE_NUM_WARPS = 8  # warps per CTA of the store
# Keys per half-warp by call size: (max n, steps); the last row has no bound. Measured on an NVIDIA
# H200 (driver 580.159.04, CUDA 13.0, 2026-12-02, `mlakv bench indexer --sweep`): one key per
# half-warp with 8 warps and the PDL trigger after the wait was the fastest or within 0.05 us of it
# at every n in {1, 8, 64, 512, 4096} and the fastest at 65536 (9.14 us against 11.35 us for 4 keys
# per half-warp); docs/benchmarks.md ("DSA indexer K cache").
STORE_STEPS: tuple[tuple[Optional[int], int], ...] = ((None, 1),)
STORE_EARLY_TRIGGER = False  # the PDL trigger after the wait (the sweep's "wait" columns)
GATHER_TARGET_BLOCKS = 1024  # the gather's grid aims at this many CTAs (blocks per request = this / batch)

_WRAPPER = """\
#include "indexer.cuh"

bool store_index_k(tvm::ffi::TensorView pages, tvm::ffi::TensorView loc, tvm::ffi::TensorView src, int64_t skip_index,
                   int64_t dcp_world, int64_t dcp_rank, bool ue8m0, int64_t steps, int64_t num_warps,
                   bool early_trigger) {{
  return mlakv::indexer::launch_store_index_k<{pdl}>(pages, loc, src, skip_index, dcp_world, dcp_rank, ue8m0, steps,
                                                     num_warps, early_trigger);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(store_index_k, store_index_k);

bool gather_index_k(tvm::ffi::TensorView pages, tvm::ffi::TensorView table, tvm::ffi::TensorView lens,
                    tvm::ffi::TensorView k_out, tvm::ffi::TensorView s_out, int64_t blocks_y) {{
  return mlakv::indexer::launch_gather_index_k<{pdl}>(pages, table, lens, k_out, s_out, blocks_y);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(gather_index_k, gather_index_k);
"""


def build_indexer_module(use_pdl: bool = True, device_capability: Optional[tuple[int, int]] = None) -> Any:
    """Compile (or load from cache) the indexer module; raises ``JitUnavailable`` with the reason."""
    src = _WRAPPER.format(pdl="true" if use_pdl else "false")
    return load_cuda_module(f"indexer_k_{'pdl' if use_pdl else 'nopdl'}", src, device_capability=device_capability)


@functools.lru_cache(maxsize=None)
def _module_for(device_index: int) -> Union[str, Any]:
    """The loaded module for a device, or the reason (str) it cannot be had."""
    return sm90_module(device_index, "indexer kernels", lambda cap: build_indexer_module(True, cap))


def indexer_jit_available(device: torch.device) -> bool:
    """Whether the JIT kernels serve ``device`` (a CUDA device of SM90+ whose module builds)."""
    return device.type == "cuda" and not isinstance(_module_for(device.index or 0), str)


def store_steps_for(n: int) -> int:
    """Keys per half-warp for a store of ``n`` keys (:data:`STORE_STEPS`)."""
    for bound, steps in STORE_STEPS:
        if bound is None or n <= bound:
            return steps
    return STORE_STEPS[-1][1]  # pragma: no cover


def indexer_jit_store(
    call: IndexStoreCall,
    *,
    steps: Optional[int] = None,
    num_warps: int = STORE_NUM_WARPS,
    early_trigger: Optional[bool] = None,
) -> bool:
    """Quantize and store ``call.index_k [n, (1,) 128]`` at slots ``call.loc [n]`` of ``call.index_pages
    [num_pages, 8448]`` (:class:`mlakv.spec.calls.IndexStoreCall`).

    Validated arguments (the launcher re-checks memory safety and raises ``TypeError``/``ValueError``).
    Returns False, launching nothing, when the kernel cannot serve the call here (no module, source
    rows not 16-byte aligned): the caller falls back to Triton. ``steps`` (keys per half-warp, 1/2/4)
    defaults to :func:`store_steps_for`; ``early_trigger`` (the PDL trigger at kernel entry, else after
    the wait) to :data:`STORE_EARLY_TRIGGER`.
    """
    index_pages, loc, index_k, skip_slot, dcp_world_size, dcp_rank, scale_rule = call
    mod = _module_for(index_pages.get_device())
    if isinstance(mod, str):
        return False
    n = loc.shape[0]
    s = store_steps_for(n) if steps is None else steps
    early = STORE_EARLY_TRIGGER if early_trigger is None else early_trigger
    return bool(
        mod.store_index_k(
            index_pages, loc, index_k, skip_slot, dcp_world_size, dcp_rank, scale_rule == "ue8m0", s, num_warps,
            early,
        )
    )  # fmt: skip


def indexer_jit_gather(
    index_pages: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, total: int, max_seq_len: int
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Gather ``(k [total, 128] float8_e4m3fn, scale [total] float32)`` with the CUDA kernel, or None
    (nothing launched) when it cannot serve the call here. Validated arguments."""
    mod = _module_for(index_pages.get_device())
    if isinstance(mod, str):
        return None
    device = index_pages.device
    k = torch.empty((total, 128), dtype=torch.uint8, device=device)
    s = torch.empty((total,), dtype=torch.int32, device=device)
    batch = seq_lens.shape[0]
    pages_per_req = max(1, -(-max_seq_len // 64))
    blocks_y = max(1, min(pages_per_req, -(-GATHER_TARGET_BLOCKS // max(1, batch)), 65535))
    if not mod.gather_index_k(index_pages, page_table, seq_lens, k, s, blocks_y):
        return None
    return k.view(torch.float8_e4m3fn), s.view(torch.float32)
