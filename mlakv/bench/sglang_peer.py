"""sglang's own row-write kernel as a benchmark provider, built from source the user fetched.

The project never contains sglang's code. ``mlakv fetch-peers sglang`` (:mod:`mlakv.bench.peers`:
sglang's published wheel, the files the benches use) puts it into ``.peers/sglang/``; this module only generates the few lines sglang itself generates to export its kernel
(``SetMlaKVBufferKernel<nope_bytes, rope_bytes, use_pdl>::run``) and builds them through mlakv's
JIT loader with sglang's flags (C++20, ``SGL_CUDA_ARCH``, its include directory). Where the source
is absent the provider is reported as absent and the bench runs without it.

Where the source is looked for, first hit wins: ``$MLAKV_SGLANG_SRC``, ``./.peers/sglang`` in the
current directory, ``.peers/sglang`` next to the installed ``mlakv`` package (a source checkout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from mlakv import _env
from mlakv.kernels.cuda.loader import JitUnavailable, cuda_arch_list, load_cuda_module

from .peers import peer_search_dirs

__all__ = ["peer_dir", "peer_absent_reason", "build_sglang_source", "build_sglang_module", "sglang_set_mla_kv_buffer"]

KERNEL_HEADER = Path("csrc") / "elementwise" / "set_mla_kv_buffer.cuh"  # sglang's file name
FETCH_HINT = "fetch it with `mlakv fetch-peers sglang` (into ./.peers/sglang), or set MLAKV_SGLANG_SRC"

_WRAPPER = """\
#include "elementwise/set_mla_kv_buffer.cuh"

namespace sglang {{
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_mla_kv_buffer, (sglang::SetMlaKVBufferKernel<{nope}, {rope}, {pdl}>::run));
}}  // namespace sglang
"""


def _candidates() -> list[Path]:
    return peer_search_dirs("sglang", _env.path("MLAKV_SGLANG_SRC"))


def peer_dir() -> Optional[Path]:
    """The directory holding sglang's kernel source (``csrc/`` and ``include/``), or None."""
    for d in _candidates():
        if (d / KERNEL_HEADER).is_file() and (d / "include").is_dir():
            return d
    return None


def peer_absent_reason() -> Optional[str]:
    """None when the source is present, else a one-line reason naming where it was looked for."""
    if peer_dir() is not None:
        return None
    where = ", ".join(str(d) for d in _candidates())
    return f"sglang source absent (looked in {where}); {FETCH_HINT}"


def _sgl_cuda_arch(arch: str) -> int:
    """``"9.0a"`` -> 900, the value sglang's headers expect in ``SGL_CUDA_ARCH``."""
    first = arch.replace(";", " ").replace(",", " ").split()[0]
    major, minor = first.rstrip("af").split(".")
    return int(major) * 100 + int(minor) * 10


def build_sglang_source(
    name: str,
    source: str,
    device_capability: Optional[tuple[int, int]] = None,
    extra_flags: tuple[str, ...] = (),
) -> Any:
    """Compile (or load from cache) a few generated lines exporting sglang kernels: ``source`` may
    include any header of the peer's ``csrc/`` and ``include/``; it is built with sglang's flags
    (C++20, ``SGL_CUDA_ARCH``) plus ``extra_flags``.

    Raises :class:`~mlakv.kernels.cuda.loader.JitUnavailable` with the reason when the source is
    absent, the toolchain is missing or the build fails.
    """
    root = peer_dir()
    if root is None:
        raise JitUnavailable(peer_absent_reason())
    arch = cuda_arch_list(device_capability)
    return load_cuda_module(
        name,
        source,
        device_capability=device_capability,
        cxx_std="c++20",
        extra_flags=[f"-DSGL_CUDA_ARCH={_sgl_cuda_arch(arch)}", *extra_flags],
        extra_include_paths=[root / "include", root / "csrc"],
    )


def build_sglang_module(
    nope_bytes: int, rope_bytes: int, use_pdl: bool = True, device_capability: Optional[tuple[int, int]] = None
) -> Any:
    """Compile (or load from cache) sglang's row-write kernel for one row layout (see :func:`build_sglang_source`)."""
    src = _WRAPPER.format(nope=nope_bytes, rope=rope_bytes, pdl="true" if use_pdl else "false")
    return build_sglang_source(
        f"sglang_set_mla_kv_buffer_{nope_bytes}_{rope_bytes}_{'pdl' if use_pdl else 'nopdl'}", src, device_capability
    )


def sglang_set_mla_kv_buffer(kv: torch.Tensor, loc: torch.Tensor, nope: torch.Tensor, rope: torch.Tensor) -> None:
    """Write rows with sglang's kernel, called as sglang calls it.

    Args:
        kv: ``[num_slots, total]`` or ``[num_slots, 1, total]`` on a CUDA device.
        loc: ``[n_loc]`` int32/int64; rows with ``loc == -1`` are skipped (sglang's
            ``reserved_skip_index``; other negative values are not supported by sglang).
        nope: ``[n_loc, nope_dim]``; rope: ``[n_loc, rope_dim]``.
    """
    kv2 = kv.view(kv.shape[0], -1)
    nope2, rope2 = nope.reshape(nope.shape[0], -1), rope.reshape(rope.shape[0], -1)
    es = nope2.element_size()
    major = torch.cuda.get_device_capability(kv.device)[0]
    mod = build_sglang_module(nope2.shape[1] * es, rope2.shape[1] * es, use_pdl=major >= 9)
    mod.set_mla_kv_buffer(kv2, loc, nope2, rope2, 0, -1)
