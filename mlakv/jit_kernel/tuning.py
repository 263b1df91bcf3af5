"""Launch tuning of the JIT row-write kernel, one row per GPU family.

The dispatcher reads ``min_n_loc`` (the JIT path is taken for ``n_loc >= min_n_loc``, else the
Triton row kernel) and the JIT entry reads the launch shape for a given ``n_loc`` from ``steps``.
Every row names the run that measured it; a new GPU gets a row by running
``python -m mlakv bench --tune`` on it, not by guessing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["LaunchStep", "LaunchTuning", "TUNING", "gpu_family", "tuning_for"]


@dataclass(frozen=True)
class LaunchStep:
    """Launch shape for calls with ``n_loc <= max_n_loc`` (``None``: no upper bound)."""

    max_n_loc: int | None
    num_warps: int
    items_per_warp: int
    use_tma: bool


@dataclass(frozen=True)
class LaunchTuning:
    """How the JIT kernel is launched on one GPU family.

    Attributes:
        min_n_loc: smallest n_loc the dispatcher sends to the JIT kernel (0: every call).
        steps: launch shapes by increasing ``max_n_loc``; the last has ``max_n_loc=None``.
        measured: where the numbers come from.
    """

    min_n_loc: int
    steps: tuple[LaunchStep, ...]
    measured: str

    def launch(self, n_loc: int) -> tuple[int, int, bool]:
        """``(num_warps, items_per_warp, use_tma)`` for a call of ``n_loc`` rows."""
        for s in self.steps:
            if s.max_n_loc is None or n_loc <= s.max_n_loc:
                return s.num_warps, s.items_per_warp, s.use_tma
        raise AssertionError("the last step must have max_n_loc=None")


TUNING: dict[str, LaunchTuning] = {
    # Seed values, tuned on a GB300 before this project (not re-measured here): TMA bulk stores,
    # JIT from 768 rows, 4 warps per CTA up to 768 rows, else 8.
    "blackwell": LaunchTuning(
        768,
        (LaunchStep(768, 4, 1, True), LaunchStep(None, 8, 1, True)),
        "seed: GB300 (threshold 768; 4 warps up to 768 rows else 8)",
    ),
    # H100 80GB HBM3 (docs/benchmarks.md, 2026-11-24). Every call goes to the JIT kernel: at
    # n_loc <= 128 it is within ~0.2 us of the Triton row kernel on the device (equal or faster for
    # the uint8 row, up to 0.18 us slower for 16-bit rows) at a sixth of its eager host cost; from
    # 512 rows it is faster (1.3-2.4x at 1024-65536). Direct vectorised stores measured equal to or
    # faster than TMA bulk stores; 8 warps x 1 row per warp was within 0-7% of the best variant at
    # every size from 1 to 65536 rows (1/2/4/16 warps, 2 rows per warp and TMA measured too).
    "hopper": LaunchTuning(
        0,
        (LaunchStep(None, 8, 1, False),),
        "H100 80GB HBM3, python -m mlakv bench --tune, 2026-11-24 (docs/benchmarks.md)",
    ),
}


def gpu_family(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``hopper``; ``(10, x)`` and newer -> ``blackwell``; older -> ``pre-hopper``."""
    major = capability[0]
    if major == 9:
        return "hopper"
    if major >= 10:
        return "blackwell"
    return "pre-hopper"


@functools.lru_cache(maxsize=None)
def _tuning_for_index(index: int) -> LaunchTuning:
    family = gpu_family(torch.cuda.get_device_capability(index))
    return TUNING.get(family, TUNING["hopper"])


def tuning_for(device: torch.device) -> LaunchTuning:
    """The tuning row for ``device``'s family (Hopper's row for families not measured yet)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _tuning_for_index(index)
