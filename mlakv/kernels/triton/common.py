"""What every Triton kernel family shares: interpreter detection, PDL support, byte views of float8."""

from __future__ import annotations

import functools

import torch

from mlakv import _env

__all__ = ["interpreting", "pdl_supported", "as_triton_dtype"]


def interpreting() -> bool:
    """Whether kernels run under ``TRITON_INTERPRET`` (CPU tensors; no PDL, no real launch)."""
    return _env.triton_interpreting()


@functools.lru_cache(maxsize=None)
def pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch needs SM90+ and a real (not interpreted) launch."""
    if interpreting():
        return False
    major, _ = torch.cuda.get_device_capability(device_index)
    return major >= 9


def as_triton_dtype(t: torch.Tensor) -> torch.Tensor:
    """float8 pointers are not portable across Triton versions/arches: move their bytes as uint8."""
    if t.element_size() == 1 and t.dtype != torch.uint8:
        return t.view(torch.uint8)
    return t
