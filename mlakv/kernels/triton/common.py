"""What every Triton kernel family shares: interpreter detection, PDL support, byte views of float8, copy words."""

from __future__ import annotations

import functools

import torch

from mlakv import _env

__all__ = ["interpreting", "pdl_supported", "as_triton_dtype", "widest_word"]


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


_WORD_DTYPES = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def widest_word(*byte_quantities: int) -> tuple[int, torch.dtype]:
    """The widest word (8/4/2/1 bytes) dividing every quantity (sizes, strides, addresses): the
    byte copies move data in it."""
    for w, dt in _WORD_DTYPES:
        if all(q % w == 0 for q in byte_quantities):
            return w, dt
    raise AssertionError("unreachable: 1 divides everything")
