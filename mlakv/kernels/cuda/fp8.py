"""Python entry of the JIT CUDA FP8 kernels (``csrc/fp8.cuh``): the quantizing write and the dequantizing gather.

The routing decision is made in :mod:`mlakv.ops.fp8` (the fp8 dispatcher); this module says
whether the kernel can serve a call (:func:`fp8_jit_accepts`), launches it (:func:`fp8_jit_write`,
:func:`fp8_jit_gather`) and builds the module through :mod:`mlakv.kernels.cuda.loader`, the one place that compiles. One module
is built per ``(format, nope_dim, rope_dim, use_pdl)``; it holds the bf16/fp16 and int32/int64 loc
variants and, for ds_mla, the kernel of each tile-scale rule (``scale_rule``, picked per call).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch

from .loader import JitUnavailable, load_cuda_module, sm90_module
from mlakv.spec.rules import check_ds_mla_scale_rule
from mlakv.spec.tuning import fp8_jit_launch, fp8_jit_threads

__all__ = [
    "build_mla_fp8_module",
    "fp8_jit_widths_reason",
    "fp8_jit_accepts",
    "fp8_jit_write",
    "fp8_jit_gather",
]

_FORMAT_CODE = {"per_tensor": 0, "ds_mla": 1}

_WRAPPER = """\
#include "fp8.cuh"

bool mla_fp8_quant(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView nope,
                   tvm::ffi::TensorView rope, tvm::ffi::TensorView scale, int64_t skip_slot, int64_t num_warps,
                   bool early_trigger, int64_t scale_rule, int64_t threads_per_row) {{
  return mlakv::fp8::launch_mla_fp8_quant<{fmt}, {nope}, {rope}, {pdl}>(
      kv, loc, nope, rope, scale, skip_slot, num_warps, early_trigger, scale_rule, threads_per_row);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mla_fp8_quant, mla_fp8_quant);

bool mla_fp8_gather(tvm::ffi::TensorView kv, tvm::ffi::TensorView loc, tvm::ffi::TensorView scale,
                    tvm::ffi::TensorView nope_out, tvm::ffi::TensorView rope_out, int64_t num_warps,
                    bool early_trigger, int64_t threads_per_row) {{
  return mlakv::fp8::launch_mla_fp8_gather<{fmt}, {nope}, {rope}, {pdl}>(kv, loc, scale, nope_out, rope_out,
                                                                         num_warps, early_trigger, threads_per_row);
}}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mla_fp8_gather, mla_fp8_gather);
"""


def fp8_jit_widths_reason(kv_cache_format: str, nope_dim: int, rope_dim: int) -> Optional[str]:
    """Why the CUDA kernel cannot serve these widths, or None: both multiples of 8 values (one
    16-byte chunk), and for ds_mla ``nope_dim % 512 == 0`` (the rope then starts on 16 bytes)."""
    if kv_cache_format not in _FORMAT_CODE:
        return f"unknown kv_cache_format {kv_cache_format!r}"
    if nope_dim <= 0 or rope_dim <= 0 or nope_dim % 8 or rope_dim % 8:
        return f"nope_dim={nope_dim} and rope_dim={rope_dim} must be positive multiples of 8"
    if kv_cache_format == "ds_mla" and nope_dim % 512:
        return f"ds_mla needs nope_dim % 512 == 0 for the JIT kernel, got {nope_dim}"
    return None


def build_mla_fp8_module(
    kv_cache_format: str,
    nope_dim: int,
    rope_dim: int,
    use_pdl: bool = True,
    device_capability: Optional[tuple[int, int]] = None,
) -> Any:
    """Compile (or load from cache) the module for one format and row layout; raises ``JitUnavailable``."""
    reason = fp8_jit_widths_reason(kv_cache_format, nope_dim, rope_dim)
    if reason:
        raise JitUnavailable(reason)
    src = _WRAPPER.format(
        fmt=_FORMAT_CODE[kv_cache_format], nope=nope_dim, rope=rope_dim, pdl="true" if use_pdl else "false"
    )
    name = f"mla_fp8_{kv_cache_format}_{nope_dim}_{rope_dim}_{'pdl' if use_pdl else 'nopdl'}"
    return load_cuda_module(name, src, device_capability=device_capability)


@functools.lru_cache(maxsize=None)
def _fn_for(device_index: int, kv_cache_format: str, nope_dim: int, rope_dim: int) -> Union[str, Any]:
    """The loaded module for a device and layout, or the reason (str) it cannot be had."""
    reason = fp8_jit_widths_reason(kv_cache_format, nope_dim, rope_dim)
    if reason:
        return reason
    return sm90_module(
        device_index, "fp8 kernels", lambda cap: build_mla_fp8_module(kv_cache_format, nope_dim, rope_dim, True, cap)
    )


@functools.lru_cache(maxsize=None)
def _dummy_scale(device: torch.device) -> torch.Tensor:
    """The launcher's ``scale`` argument for ds_mla, which never reads it."""
    return torch.ones(1, dtype=torch.float32, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.select(1, 0) if t.dim() == 3 else t


def _aligned(t: torch.Tensor) -> bool:
    return (t.data_ptr() | (t.stride(0) * t.element_size())) % 16 == 0


def fp8_jit_accepts(kv_buffer: torch.Tensor, k_nope: torch.Tensor, k_rope: torch.Tensor, kv_cache_format: str) -> bool:
    """Whether the CUDA kernel serves this (valid) call: SM90+, widths, module builds, 16-byte
    aligned row addresses and strides of ``kv_buffer``, ``k_nope`` and ``k_rope``."""
    if not kv_buffer.is_cuda:
        return False
    fn = _fn_for(kv_buffer.get_device(), kv_cache_format, k_nope.shape[-1], k_rope.shape[-1])
    return not isinstance(fn, str) and all(_aligned(_rows(t)) for t in (kv_buffer, k_nope, k_rope))


def fp8_jit_write(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    k_nope: torch.Tensor,
    k_rope: torch.Tensor,
    kv_cache_format: str,
    k_scale: Optional[torch.Tensor],
    skip_slot: int = -1,
    *,
    num_warps: int = 0,
    early_trigger: Optional[bool] = None,
    scale_rule: str = "fp32_floor",
    threads_per_row: int = 0,
) -> bool:
    """Launch the quantizing write on validated arguments; False (nothing launched) when the kernel
    cannot serve the call here (no module, misaligned), so the caller falls back.

    Shapes: ``kv_buffer [num_slots, (1,) >= row_bytes]`` uint8/float8_e4m3fn, ``loc [n_loc]``,
    ``k_nope [n_loc, (1,) nope_dim]``, ``k_rope [n_loc, (1,) rope_dim]``, ``k_scale [1]`` fp32 or
    None. Rows whose slot is ``skip_slot`` are skipped like padding (-1: none). The launch shape —
    threads per row (32, 64 or 128, or per_tensor's packed rows: :data:`mlakv.spec.tuning.FP8_JIT_PACKED`),
    warps per CTA (rows per CTA = 32 * warps / threads per row) and
    the PDL trigger's place — comes from the FP8 family's launch row for ``n_loc``
    (:func:`mlakv.spec.tuning.fp8_jit_launch`); ``num_warps``/``early_trigger``/``threads_per_row``
    override it (0/None/0: the table's), for the benchmark's sweep and the tests; a shape that is not
    a whole number of rows raises ``ValueError``. ``scale_rule``: ds_mla's tile-scale rule
    (``"fp32_floor"``, ``"fp32"``, ``"ue8m0"``; per_tensor ignores it).
    """
    rule = check_ds_mla_scale_rule(scale_rule, "scale_rule")
    mod = _fn_for(kv_buffer.get_device(), kv_cache_format, k_nope.shape[-1], k_rope.shape[-1])
    if isinstance(mod, str):
        return False
    fn = mod.mla_fp8_quant
    kv = kv_buffer if kv_buffer.dtype == torch.uint8 else kv_buffer.view(torch.uint8)
    if k_scale is None:
        k_scale = _dummy_scale(kv_buffer.device)
    warps, early, threads = fp8_jit_launch(f"quant_{kv_cache_format}", loc.shape[0])
    if early_trigger is not None:
        early = early_trigger
    warps, threads = fp8_jit_threads(threads_per_row or threads, num_warps or warps, k_nope.shape[-1], k_rope.shape[-1])
    return bool(fn(kv, loc, k_nope, k_rope, k_scale, skip_slot, warps, early, rule, threads))


def fp8_jit_gather(
    kv_buffer: torch.Tensor,
    loc: torch.Tensor,
    kv_cache_format: str,
    nope_dim: int,
    rope_dim: int,
    k_scale: Optional[torch.Tensor],
    dst_dtype: torch.dtype,
    *,
    num_warps: int = 0,
    early_trigger: Optional[bool] = None,
    threads_per_row: int = 0,
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Gather and dequantize ``kv_buffer[loc]`` with the CUDA kernel: ``(k_nope [n_loc, nope_dim],
    k_rope [n_loc, rope_dim])`` in ``dst_dtype`` (bf16/fp16/fp32), or None (nothing launched) when
    the kernel cannot serve the call here. Validated arguments; an invalid slot gives a zero row.
    The kernel launches with PDL (it waits for the kernel before it ahead of its first read). Threads
    per row, warps per CTA and the PDL trigger's place: :func:`mlakv.spec.tuning.fp8_jit_launch`
    (``dequant``), or ``threads_per_row`` / ``num_warps`` / ``early_trigger`` (0/0/None: the table's)."""
    if not kv_buffer.is_cuda:
        return None
    mod = _fn_for(kv_buffer.get_device(), kv_cache_format, nope_dim, rope_dim)
    if isinstance(mod, str):
        return None
    kv = kv_buffer if kv_buffer.dtype == torch.uint8 else kv_buffer.view(torch.uint8)
    n = loc.shape[0]
    nope_out = torch.empty((n, nope_dim), dtype=dst_dtype, device=kv_buffer.device)
    rope_out = torch.empty((n, rope_dim), dtype=dst_dtype, device=kv_buffer.device)
    scale = k_scale if k_scale is not None else _dummy_scale(kv_buffer.device)
    warps, early, threads = fp8_jit_launch("dequant", n)
    if early_trigger is not None:
        early = early_trigger
    if not mod.mla_fp8_gather(kv, loc, scale, nope_out, rope_out, num_warps or warps, early, threads_per_row or threads):
        return None
    return nope_out, rope_out
