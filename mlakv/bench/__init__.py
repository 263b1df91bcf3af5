"""mlakv's benchmarks, shipped with the package so ``mlakv bench`` works from an installed copy.

``mlakv bench`` (:mod:`.kv_write`) times every row-write provider side by side;
``mlakv bench hicache`` (:mod:`.hicache`) the HiCache transfers; ``mlakv bench fp8``
(:mod:`.fp8_bench`) the fused FP8 write and dequantizing gather. Run as modules:
``python -m mlakv.bench.move_kv`` (``move_kv_cache``'s one launch vs a torch loop per layer, GPU)
and ``python -m mlakv.bench.custom_op_cost`` (the write's torch custom op's host cost per call). The legacy baseline kernel
(:mod:`.legacy_kernel`) and the sglang peer (:mod:`.sglang_peer`, built only from source the user
fetched) exist only for comparison and are not part of the library. Submodules import torch and
triton lazily, so ``import mlakv.bench`` is cheap.
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["SUBCOMMANDS", "main"]


def _kv_write(argv: list[str]) -> int:
    from .kv_write import main as run

    return run(argv)


def _hicache(argv: list[str]) -> int:
    if "--l3" in argv:  # `mlakv bench hicache --l3 mooncake`: the L3 store bench
        from .hicache_l3 import main as run

        return run(argv)
    from .hicache import main as run

    return run(argv)


def _fp8(argv: list[str]) -> int:
    from .fp8_bench import main as run

    return run(argv)


def _indexer(argv: list[str]) -> int:
    from .indexer import main as run

    return run(argv)


# `mlakv bench <name> ...`: one entry per bench; the row-write bench runs when no name is given.
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {"hicache": _hicache, "fp8": _fp8, "indexer": _indexer}


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``mlakv bench [hicache|fp8] [options]``; returns the process exit code."""
    argv = list(argv or [])
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return _kv_write(argv)
