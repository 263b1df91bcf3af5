"""Python entry of the fused RoPE + cache-row + query JIT kernel (``csrc/rope_write.cuh``).

The routing decision is made in :mod:`mlakv.ops.dispatch`; this module says whether the kernel can
serve a call (:func:`rope_write_widths_reason`, :func:`rope_write_cuda` returning False), builds the
module through :mod:`mlakv.kernels.cuda.loader` (the one place that compiles) and launches it. One
module is built per ``(kv_cache_format, source dtype, nope_dim, rope_dim, use_pdl)``; it holds both
RoPE styles, both PDL trigger places and (``ds_mla``) every tile-scale rule, and exports two functions:

* ``rope_write(kv, loc, k_nope, k_pe, positions, cos_sin, k_scale, has_q, q_nope, q_pe, q_out,
  q_scale, is_neox, skip_index, dcp_world, dcp_rank, num_warps, early_trigger, scale_rule) -> bool``:
  the launcher's checks, then one launch on the current stream (False: misaligned, nothing launched);
* ``check_rope_write(kv, loc, k_nope, k_pe, positions, cos_sin, k_scale, has_q, q_nope, q_pe, q_out,
  q_scale, dcp_world, dcp_rank) -> bool``: the checks alone, on tensors of any device (the
  rule-parity test runs it on CPU tensors).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Any, Iterable, Optional, Union

import torch

from mlakv.spec.calls import RopeWriteCall
from mlakv.spec.rules import check_ds_mla_scale_rule
from mlakv.spec.tuning import rope_write_launch

from .loader import JitUnavailable, load_cuda_module, sm90_module

__all__ = [
    "FORMAT_CODE",
    "rope_write_widths_reason",
    "build_rope_write_module",
    "prebuild_rope_write_modules",
    "rope_write_module",
    "rope_write_cuda",
]

FORMAT_CODE = {None: 0, "per_tensor": 1, "ds_mla": 2}
_DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}

_WRAPPER = """\
#include "rope_write.cuh"

using tvm::ffi::TensorView;

bool rope_write(TensorView kv, TensorView loc, TensorView k_nope, TensorView k_pe, TensorView positions,
                TensorView cos_sin, TensorView k_scale, bool has_q, TensorView q_nope, TensorView q_pe,
                TensorView q_out, TensorView q_scale, bool is_neox, int64_t skip_index, int64_t dcp_world,
                int64_t dcp_rank, int64_t num_warps, bool early_trigger, int64_t scale_rule) {{
  return mlakv::rope::launch_rope_write<{fmt}, {bf16}, {nope}, {rope}, {pdl}>(
      kv, loc, k_nope, k_pe, positions, cos_sin, k_scale, has_q, q_nope, q_pe, q_out, q_scale, is_neox, skip_index,
      dcp_world, dcp_rank, num_warps, early_trigger, scale_rule);
}}
bool check_rope_write(TensorView kv, TensorView loc, TensorView k_nope, TensorView k_pe, TensorView positions,
                      TensorView cos_sin, TensorView k_scale, bool has_q, TensorView q_nope, TensorView q_pe,
                      TensorView q_out, TensorView q_scale, int64_t dcp_world, int64_t dcp_rank) {{
  return mlakv::rope::check_rope_write<{fmt}, {bf16}, {nope}, {rope}>(
      kv, loc, k_nope, k_pe, positions, cos_sin, k_scale, has_q, q_nope, q_pe, q_out, q_scale, dcp_world, dcp_rank);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(rope_write, rope_write);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(check_rope_write, check_rope_write);
"""


def rope_write_widths_reason(
    kv_cache_format: Optional[str], dtype: torch.dtype, nope_dim: int, rope_dim: int
) -> Optional[str]:
    """Why the CUDA kernel cannot be built for this layout, or None: a known format, bf16/fp16
    sources, ``rope_dim == 64`` (two values per lane) and ``nope_dim`` a positive multiple of 8
    (16-byte chunks; ``ds_mla``: of 128, its tile)."""
    if kv_cache_format not in FORMAT_CODE:
        return f"unknown kv_cache_format {kv_cache_format!r}"
    if dtype not in _DTYPE_NAME:
        return f"sources must be bfloat16 or float16 for the CUDA kernel, got {dtype}"
    if rope_dim != 64:
        return f"the CUDA kernel takes rope_dim == 64, got {rope_dim}"
    if nope_dim <= 0 or nope_dim % (128 if kv_cache_format == "ds_mla" else 8):
        return f"nope_dim={nope_dim} must be a positive multiple of {128 if kv_cache_format == 'ds_mla' else 8}"
    return None


def build_rope_write_module(
    kv_cache_format: Optional[str],
    dtype: torch.dtype,
    nope_dim: int,
    rope_dim: int,
    use_pdl: bool = True,
    device_capability: Optional[tuple[int, int]] = None,
) -> Any:
    """Compile (or load from cache) the module for one layout; raises ``JitUnavailable``."""
    reason = rope_write_widths_reason(kv_cache_format, dtype, nope_dim, rope_dim)
    if reason:
        raise JitUnavailable(reason)
    src = _WRAPPER.format(
        fmt=FORMAT_CODE[kv_cache_format],
        bf16="true" if dtype == torch.bfloat16 else "false",
        nope=nope_dim,
        rope=rope_dim,
        pdl="true" if use_pdl else "false",
    )
    fmt = kv_cache_format or "rows16"
    name = f"rope_write_{fmt}_{_DTYPE_NAME[dtype]}_{nope_dim}_{rope_dim}_{'pdl' if use_pdl else 'nopdl'}"
    return load_cuda_module(name, src, device_capability=device_capability)


def _build_in_child(job: tuple) -> Optional[str]:
    """One module build in a worker process: None, or why it failed."""
    fmt, dtype_name, nope_dim, rope_dim, capability = job
    try:
        build_rope_write_module(fmt, getattr(torch, dtype_name), nope_dim, rope_dim, True, capability)
    except JitUnavailable as e:
        return str(e)
    return None


def prebuild_rope_write_modules(
    layouts: Iterable[tuple[Optional[str], torch.dtype]],
    device_capability: tuple[int, int],
    nope_dim: int = 512,
    rope_dim: int = 64,
    processes: Optional[int] = None,
) -> dict[tuple[Optional[str], torch.dtype], Optional[str]]:
    """Build the modules of several ``(kv_cache_format, dtype)`` layouts at once, one process each
    (the loader builds one module at a time per process; nvcc uses one core), into the disk cache a
    later :func:`rope_write_module` loads from. Returns ``{layout: None or why it failed}``. The
    workers are spawned and never touch the GPU."""
    layouts = list(layouts)
    jobs = [(f, str(d).split(".")[-1], nope_dim, rope_dim, tuple(device_capability)) for f, d in layouts]
    if not jobs:
        return {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes or max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = pool.map(_build_in_child, jobs)
    return dict(zip(layouts, results))


@functools.lru_cache(maxsize=None)
def rope_write_module(
    device_index: int, kv_cache_format: Optional[str], dtype: torch.dtype, nope_dim: int, rope_dim: int
) -> Union[str, Any]:
    """The loaded module for a device and layout, or the reason (str) it cannot be had (logged once)."""
    reason = rope_write_widths_reason(kv_cache_format, dtype, nope_dim, rope_dim)
    if reason:
        return reason
    return sm90_module(
        device_index, "fused RoPE write",
        lambda cap: build_rope_write_module(kv_cache_format, dtype, nope_dim, rope_dim, True, cap),
    )  # fmt: skip


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def rope_write_cuda(call: RopeWriteCall, *, num_warps: int = 0, early_trigger: Optional[bool] = None) -> bool:
    """Launch the fused kernel on a validated ``call`` (as
    :func:`mlakv.kernels.triton.rope_write.launch_rope_write` takes it); False, launching nothing, when
    the kernel cannot serve the call here (no module for this device/layout, or the alignment does not
    suit its vectors), so the caller falls back. ``num_warps``/``early_trigger`` override the
    launch row (0/None: :func:`mlakv.spec.tuning.rope_write_launch`), for the benchmark's sweep.
    """
    c = call
    if not c.kv_buffer.is_cuda:
        return False
    mod = rope_write_module(c.kv_buffer.get_device(), c.kv_cache_format, c.k_nope.dtype, c.k_nope.shape[-1], c.k_pe.shape[-1])
    if isinstance(mod, str):
        return False
    kv = c.kv_buffer if c.kv_cache_format is None or c.kv_buffer.dtype == torch.uint8 else c.kv_buffer.view(torch.uint8)
    q_out = c.q_out
    has_q = q_out is not None
    if has_q and q_out.element_size() == 1 and q_out.dtype != torch.uint8:
        q_out = q_out.view(torch.uint8)
    warps, early = rope_write_launch(c.loc.shape[0] * (1 + (c.q_nope.shape[1] if has_q else 0)))
    dummy = c.cos_sin_cache  # fp32, on the device: stands for the tensors a call does not pass
    return bool(
        mod.rope_write(
            kv, c.loc, _rows(c.k_nope), _rows(c.k_pe), c.positions, c.cos_sin_cache,
            c.k_scale if c.k_scale is not None else dummy, has_q,
            c.q_nope if has_q else dummy, c.q_pe if has_q else dummy, q_out if has_q else dummy,
            c.q_scale if c.q_scale is not None else dummy, bool(c.is_neox_style), int(c.skip_index),
            int(c.dcp_world_size), int(c.dcp_rank), num_warps or warps, early if early_trigger is None else early_trigger,
            check_ds_mla_scale_rule(c.ds_mla_scale_rule),
        )  # fmt: skip
    )
