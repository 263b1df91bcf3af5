"""Where a Triton kernel lets the next grid launch (programmatic dependent launch, sm_90+).

Why a module: every Triton kernel of mlakv waits on the grid before it and triggers the next one the
same way; the place of the trigger is a launch choice (:data:`mlakv.spec.tuning.TRIGGER_PLACES`): the
FP8 and RoPE families name it per launch row, the row kernel, the row gather and the V4 stores choose
entry or after the stores (their tables' ``early_trigger``), the paged gather and its plan trigger at
entry and the indexer store right after the wait.
On H200, in CUDA graphs of back-to-back calls, the place moves a call of a few hundred rows by up to a
microsecond (docs/benchmarks.md), so it is measured per kernel and size, not fixed.

A kernel calls :func:`pdl_open` before its first load and :func:`pdl_close` after its last store:

* ``TRIGGER == 0`` (``"entry"``): trigger, then wait;
* ``TRIGGER == 1`` (``"wait"``): wait, then trigger;
* ``TRIGGER == 2`` (``"end"``): wait; trigger after the stores.

The trigger carries no memory order: the next grid's wait covers all of this grid whatever the place,
so the place changes timing only, never what a later kernel reads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mlakv.spec.tuning import TRIGGER_PLACES

__all__ = ["pdl_open", "pdl_close", "trigger_code", "ENTRY", "WAIT", "END"]

#: the ``TRIGGER`` codes of the places, for kernels with a fixed place or a two-way choice
ENTRY = tl.constexpr(0)
WAIT = tl.constexpr(1)
END = tl.constexpr(2)


def trigger_code(place: str) -> int:
    """The ``TRIGGER`` constexpr of a place of :data:`~mlakv.spec.tuning.TRIGGER_PLACES`; any other
    value raises ``ValueError``."""
    if place not in TRIGGER_PLACES:
        raise ValueError(f"trigger: expected one of {TRIGGER_PLACES}, got {place!r}")
    return TRIGGER_PLACES.index(place)


@triton.jit
def pdl_open(USE_PDL: tl.constexpr, TRIGGER: tl.constexpr):
    """Before the kernel's first load: the wait on the grid before, and the trigger at ``entry``/``wait``."""
    if USE_PDL:
        if TRIGGER == ENTRY:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if TRIGGER == WAIT:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_close(USE_PDL: tl.constexpr, TRIGGER: tl.constexpr):
    """After the kernel's last store: the trigger at ``end``."""
    if USE_PDL:
        if TRIGGER == END:
            tl.extra.cuda.gdc_launch_dependents()
