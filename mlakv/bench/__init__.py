"""mlakv's benchmarks, shipped with the package so ``mlakv bench`` works from an installed copy.

``mlakv bench`` (:mod:`.kv_write`) times every row-write provider side by side;
``mlakv bench hicache`` (:mod:`.hicache`) the HiCache transfers, and with ``--l3 mooncake``
(:mod:`.hicache_l3`) the L3 store; ``mlakv bench fp8`` (:mod:`.fp8_bench`) the fused FP8 write and
dequantizing gather; ``mlakv bench rope`` (:mod:`.rope_write`) the fused RoPE + row write + query step;
``mlakv bench v4`` (:mod:`.v4_store`) the DeepSeek-V4 family's paged-cache store against sglang's;
``mlakv bench demo-step`` (:mod:`.demo_step`) the demo model's decode step with the fused cache step
against the separate kernels; ``mlakv bench vllm`` (:mod:`.vllm_ops`) vLLM's MLA cache ops on mlakv's
face beside vLLM's own kernels; ``mlakv bench parity`` (:mod:`.parity`) every family's Triton kernels
against its CUDA kernels in one run (it runs the family benches; they import nothing of each other). Run as modules: ``python -m mlakv.bench.move_kv`` (``move_kv_cache``'s one
launch vs a torch loop per layer, and with ``--sweep`` its kernels' launch shapes; GPU), ``python -m mlakv.bench.custom_op_cost`` (the write's torch
custom op's host cost per call) and ``python -m mlakv.bench.host_cost`` (the eager write's host cost
step by step). Every bench reads its clocks from :mod:`.timing`; none imports another but ``parity``; the
command lines are in :mod:`.options` (parsed before torch loads). The legacy baseline kernel
(:mod:`.legacy_kernel`) and the sglang peer (:mod:`.sglang_peer`, built only from source fetched
with ``mlakv fetch-peers``, :mod:`.peers`) exist only for comparison and are not part of the library.
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["SUBCOMMANDS", "main"]


def _kv_write(argv: list[str]) -> int:
    from .kv_write import main as run

    return run(argv)


def _hicache(argv: list[str]) -> int:
    from .options import wants_l3

    if wants_l3(argv):  # `mlakv bench hicache --l3 mooncake`: the L3 store bench
        from .hicache_l3 import main as run

        return run(argv)
    from .hicache import main as run

    return run(argv)


def _fp8(argv: list[str]) -> int:
    from .fp8_bench import main as run

    return run(argv)


def _rope(argv: list[str]) -> int:
    from .rope_write import main as run

    return run(argv)


def _indexer(argv: list[str]) -> int:
    from .indexer import main as run

    return run(argv)


def _v4(argv: list[str]) -> int:
    from .v4_store import main as run

    return run(argv)


def _vllm(argv: list[str]) -> int:
    from .vllm_ops import main as run

    return run(argv)


def _parity(argv: list[str]) -> int:
    from .parity import main as run

    return run(argv)


def _demo_step(argv: list[str]) -> int:
    from .demo_step import main as run

    return run(argv)


# `mlakv bench <name> ...`: one entry per bench; the row-write bench runs when no name is given.
SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "hicache": _hicache, "fp8": _fp8, "indexer": _indexer, "rope": _rope, "v4": _v4, "demo-step": _demo_step,
    "vllm": _vllm, "parity": _parity,
}  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``mlakv bench [hicache|fp8] [options]``; returns the process exit code.

    The command line is parsed first without torch (``--help`` and usage errors answer at once),
    then the bench module loads and runs.
    """
    from .options import parser_for

    argv = list(argv or [])
    sub = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    rest = argv[1:] if sub else argv
    parser_for(argv).parse_args(rest)
    return SUBCOMMANDS[sub](rest) if sub else _kv_write(rest)
