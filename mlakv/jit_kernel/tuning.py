"""Launch tuning of the JIT row-write kernel, one row per GPU family.

The dispatcher reads ``min_n_loc`` (the JIT path is taken for ``n_loc >= min_n_loc``, else the
Triton row kernel) and the JIT entry reads the launch shape. Every row names the run that measured
it; a new GPU gets a row by running ``python -m mlakv bench`` on it, not by guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LaunchTuning", "TUNING", "gpu_family", "tuning_for"]


@dataclass(frozen=True)
class LaunchTuning:
    """How the JIT kernel is launched on one GPU family.

    Attributes:
        min_n_loc: smallest n_loc the dispatcher sends to the JIT kernel.
        warps_small / warps_large: warps per CTA below / from ``large_from`` rows.
        large_from: n_loc at which ``warps_large`` takes over.
        items_per_warp: rows each warp writes (1, 2 or 4).
        use_tma: stage rows in shared memory and store with cp.async.bulk (else direct stores).
        measured: where the numbers come from.
    """

    min_n_loc: int
    warps_small: int
    warps_large: int
    large_from: int
    items_per_warp: int
    use_tma: bool
    measured: str

    def warps(self, n_loc: int) -> int:
        return self.warps_large if n_loc >= self.large_from else self.warps_small


TUNING: dict[str, LaunchTuning] = {
    # Seed values, tuned on a GB300 before this project (not re-measured here).
    "blackwell": LaunchTuning(768, 4, 8, 769, 1, True, "seed: GB300, threshold 768, 4 warps up to 768 rows else 8"),
    # Placeholder until the H100 run lands; replaced by the measured row.
    "hopper": LaunchTuning(768, 4, 8, 769, 1, True, "seed (GB300 values), pending H100 measurement"),
}


def gpu_family(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``hopper``; ``(10, x)``/``(11, x)``/``(12, x)`` -> ``blackwell``; older -> ``pre-hopper``."""
    major = capability[0]
    if major == 9:
        return "hopper"
    if major >= 10:
        return "blackwell"
    return "pre-hopper"


def tuning_for(device: torch.device) -> LaunchTuning:
    """The tuning row for ``device``'s family (Hopper's row for families not measured yet)."""
    family = gpu_family(torch.cuda.get_device_capability(device))
    return TUNING.get(family, TUNING["hopper"])
