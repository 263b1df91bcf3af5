"""The benches' command lines, apart from the benches so they parse before torch loads.

``mlakv bench [hicache|fp8] --help`` and every usage error answer from here in a fraction of a
second: this module imports neither torch nor any bench (only :mod:`mlakv.argtypes`). Each bench
module takes its parser and defaults from here (``build_parser``), so the option a bench reads and
the help a user reads are one definition. :func:`parser_for` picks the parser of a
``mlakv bench`` command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Optional, Sequence

from mlakv.argtypes import out_dir, positive_int

__all__ = [
    "LAYOUT_NAMES",
    "PROVIDERS",
    "CPU_PROVIDERS",
    "csv_of",
    "csv_ints",
    "add_sweep_options",
    "kv_write_parser",
    "hicache_parser",
    "move_kv_parser",
    "hicache_l3_parser",
    "fp8_parser",
    "rope_parser",
    "indexer_parser",
    "v4_parser",
    "demo_step_parser",
    "vllm_parser",
    "parity_parser",
    "wants_l3",
    "parser_for",
]

# ---- mlakv bench (row write) -------------------------------------------------------------------
LAYOUT_NAMES = ["bf16", "fp16", "u8"]  # mlakv.bench.kv_write.LAYOUTS: (dtype, nope, rope) of each
DEFAULT_SIZES = [1, 8, 32, 128, 512, 768, 1024, 2048, 4096, 8192, 16384, 65536]
QUICK_SIZES = [1, 128, 1024, 16384, 65536]
CPU_SIZES = [1, 32, 1024, 8192]
CPU_QUICK_SIZES = [1, 1024]
PROVIDERS = ["auto", "jit", "triton", "sglang", "legacy", "torch"]
CPU_PROVIDERS = ["auto", "torch"]
MAX_SIZE = 1 << 24

# ---- mlakv bench hicache [--l3 mooncake] --------------------------------------------------------
HOST_LAYOUTS = ["layer_first", "page_first", "page_first_direct"]
GPU_PAGES = [1024, 16384]
CPU_PAGES = [64, 512]
L3_GPU_MACHINE_PAGES = [64, 256, 1024]
L3_CPU_PAGES = [64, 128, 256]  # 1024 pages of 4.3 MiB need ~18 GiB (two host pools + two segments)

# ---- mlakv bench fp8 -----------------------------------------------------------------------------
FP8_SIZES = [1, 8, 64, 512, 1024, 4096, 16384, 65536]
FP8_TUNE_FAMILIES = ["jit", "triton"]
FP8_TUNE_KINDS = ["quant_per_tensor", "quant_ds_mla", "dequant_per_tensor", "dequant_ds_mla"]

# ---- mlakv bench rope ----------------------------------------------------------------------------
ROPE_VARIANTS = ["bf16", "fp8", "ds_mla"]  # mlakv.bench.rope_write.VARIANTS: (cache format, query dtype) of each
ROPE_SIZES = [1, 8, 32, 64, 128, 512, 1024, 4096, 16384]
ROPE_QUICK_SIZES = [1, 64, 128, 1024, 16384]
ROPE_CPU_SIZES = [1, 32]
ROPE_PROVIDERS = ["fused", "fused-triton", "unfused", "sglang"]
ROPE_SWEEP = ["jit", "jit-early", "jit-late", "jit-w4"]  # "jit": the CUDA kernel at the table's launch, forced


def csv_of(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type: a comma list of ``choices`` (duplicates dropped), or a usage error naming the bad items."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad)) or repr(text)}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))

    return parse


def csv_ints(what: str, lo: int = 1, hi: Optional[int] = None, dedup: bool = True) -> Callable[[str], list[int]]:
    """An argparse type: a comma list of integers in ``lo..hi`` (``what`` names them in the error)."""
    bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"

    def parse(text: str) -> list[int]:
        try:
            vals = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of integers ({what}), got {text!r}") from None
        if not vals or any(v < lo or (hi is not None and v > hi) for v in vals):
            raise argparse.ArgumentTypeError(f"{what} must be integers {bounds}, got {text!r}")
        return list(dict.fromkeys(vals)) if dedup else vals

    return parse


def kv_write_parser() -> argparse.ArgumentParser:
    """The ``mlakv bench`` parser (the row-write providers side by side)."""
    ap = argparse.ArgumentParser(
        prog="mlakv bench",
        description="Time every KV-row write provider side by side on this machine's device, against the "
        "roofline; write a table, results.json and a plot. Other benches: `mlakv bench hicache --help` (HiCache "
        "transfers; with --l3 mooncake the L3 store), `mlakv bench fp8 --help` (the FP8 cache's write and gather). "
        "Ctrl-C or SIGTERM stops it and keeps the rows measured so far.",
    )
    ap.add_argument("--layouts", type=csv_of(LAYOUT_NAMES, "layout"), default=list(LAYOUT_NAMES),
                    help=f"comma list of {', '.join(LAYOUT_NAMES)} (default: all)")  # fmt: skip
    ap.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE), default=None,
                    help=f"comma list of n_loc values, 1..{MAX_SIZE} (default: GPU {DEFAULT_SIZES}; CPU {CPU_SIZES})")  # fmt: skip
    ap.add_argument("--providers", type=csv_of(PROVIDERS, "provider"), default=list(PROVIDERS),
                    help=f"comma list of {', '.join(PROVIDERS)} (default: all that can run here; on CPU only "
                    f"{' and '.join(CPU_PROVIDERS)} can; sglang needs its source: `mlakv fetch-peers sglang`)")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help=f"fewer sizes (GPU {QUICK_SIZES}, CPU {CPU_QUICK_SIZES}) and no int32 spot check")  # fmt: skip
    ap.add_argument("--no-cold", action="store_true", help="GPU: skip the L2-flushed medians")
    ap.add_argument("--tune", action="store_true", help="GPU: also time JIT launch variants (warps x items x TMA/direct)")
    ap.add_argument("--triton-sweep", action="store_true",
                    help="GPU: also time the Triton row kernel at every launch shape (warps 1,2,4,8 x rows per program "
                    "1,2,4,8 x PDL trigger at entry or after the stores), each checked bit-exact first, and report "
                    "per layout the TRITON_ROW_STEPS rows the fastest shapes make")  # fmt: skip
    ap.add_argument("--out", type=out_dir, default=Path("bench-out"),
                    help="directory for results.json, report.md and the plot (checked writable before the sweep)")  # fmt: skip
    return ap


def add_sweep_options(p: argparse.ArgumentParser, stem: str, sweep_help: str) -> None:
    """A Triton-only bench's ``--sweep`` (its launch shapes beside the table's) and ``--out DIR``
    (``{stem}.json`` and ``{stem}.md``; default: print only)."""
    p.add_argument("--sweep", action="store_true", help=sweep_help)
    p.add_argument("--out", type=out_dir, default=None, help=f"directory for {stem}.json and {stem}.md (default: print only)")


def hicache_parser() -> argparse.ArgumentParser:
    """The ``mlakv bench hicache`` parser (device <-> host transfers; ``--l3`` hands over to the L3 bench)."""
    ap = argparse.ArgumentParser(
        prog="mlakv bench hicache",
        description="HiCache transfer bandwidth: backup and per-layer load of scattered pages against a "
        "contiguous copy of the same bytes. With --l3 mooncake: the L3 store bench instead.",
    )
    ap.add_argument("--pages", type=csv_ints("page counts"), default=None,
                    help=f"comma list of page counts (default: GPU {GPU_PAGES}, CPU {CPU_PAGES})")  # fmt: skip
    ap.add_argument("--layers", type=positive_int, default=2, help="layers in the pool (default 2)")
    ap.add_argument("--page-size", type=positive_int, default=64, help="tokens per page (default 64)")
    ap.add_argument("--layouts", type=str, choices=HOST_LAYOUTS + ["both"], default="both",
                    help="host pool layout(s) to time (default \"both\": every layout)")  # fmt: skip
    ap.add_argument("--sms", type=csv_ints("SM budgets"), default=[8],
                    help="comma list of SM budgets for the transfer kernel (its grid size), e.g. 4,8,16,132 (default 8)")  # fmt: skip
    add_sweep_options(ap, "hicache", "GPU: time the transfer kernel at every launch shape of mlakv.spec.tuning."
                      "HICACHE_COPY_SWEEP (warps x tile words) beside the launch table's, each shape's round trip "
                      "checked bit-exact first, and print the HICACHE_COPY_STEPS rows the fastest shapes make")  # fmt: skip
    ap.add_argument("--l3", choices=["mooncake"], default=None,
                    help="time the HiCache L3 store instead: mlakv's MooncakeStorage against raw Mooncake calls, two "
                    "clients of one local master (its own options: `mlakv bench hicache --l3 mooncake --help`)")  # fmt: skip
    return ap


# ---- python -m mlakv.bench.move_kv ---------------------------------------------------------------
MOVE_SIZES = [8, 64, 512, 4096]


def move_kv_parser(
    description: str = "Benchmark of move_kv_cache: mlakv's one-launch Triton move vs one indexed copy per layer.",
) -> argparse.ArgumentParser:
    """The ``python -m mlakv.bench.move_kv`` parser."""
    p = argparse.ArgumentParser(prog="python -m mlakv.bench.move_kv", description=description)
    p.add_argument("--layers", type=positive_int, default=61, help="layers (buffers) every move covers (default 61)")
    p.add_argument("--slots", type=positive_int, default=65536, help="slots per layer buffer (default 65536)")
    p.add_argument("--n", type=positive_int, nargs="+", default=list(MOVE_SIZES),
                   help=f"rows each move moves per layer, 1..slots/2 (default {' '.join(map(str, MOVE_SIZES))})")  # fmt: skip
    add_sweep_options(p, "move_kv", "also time both Triton kernels (direct, staged) at every launch shape of "
                      "mlakv.spec.tuning.MOVE_TRITON_SWEEP beside the table's, each checked bit-exact against the "
                      "torch move first, and print the MOVE_TRITON_STEPS rows the fastest shapes make")  # fmt: skip
    return p


def hicache_l3_parser(description: str = "HiCache L3 on Mooncake Store: what mlakv's storage layer costs.") -> argparse.ArgumentParser:
    """The ``mlakv bench hicache --l3 mooncake`` parser."""
    ap = argparse.ArgumentParser(prog="mlakv bench hicache --l3 mooncake", description=description)
    ap.add_argument("--l3", choices=["mooncake"], required=True, help="the L3 store to time")
    ap.add_argument("--pages", type=csv_ints("batch sizes (pages)", dedup=False), default=None,
                    help=f"comma list of batch sizes in pages (default: CUDA machine {L3_GPU_MACHINE_PAGES}, CPU {L3_CPU_PAGES})")  # fmt: skip
    ap.add_argument("--layers", type=positive_int, default=61, help="layers per page (default 61)")
    ap.add_argument("--page-size", type=positive_int, default=64, help="tokens per page (default 64)")
    ap.add_argument("--reps", type=positive_int, default=9, help="timed rounds per batch size (default 9)")
    ap.add_argument("--checksum-threads", type=positive_int, default=None,
                    help="MooncakeStorage checksum_threads (default: its own, default_checksum_threads())")  # fmt: skip
    ap.add_argument("--verbose", action="store_true",
                    help="show Mooncake's own log at every level (default: its warnings and errors only, the "
                    "expected 'metadata not found' of a new client left out)")  # fmt: skip
    return ap


def fp8_parser(description: str = "FP8 KV-cache benchmark: the fused quantizing write and the dequantizing gather.") -> argparse.ArgumentParser:
    """The ``mlakv bench fp8`` parser."""
    p = argparse.ArgumentParser(prog="mlakv bench fp8", description=description)
    p.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE, dedup=False), default=list(FP8_SIZES),
                   help=f"comma list of n_loc values, 1..{MAX_SIZE} (default {','.join(map(str, FP8_SIZES))})")  # fmt: skip
    p.add_argument("--out", type=out_dir, default=Path("bench-out"),
                   help="directory for fp8.json and fp8.md (checked writable before measuring)")  # fmt: skip
    p.add_argument("--tune", action="store_true",
                   help="GPU: instead, time the launch alternatives (Triton warps x rows per program x PDL trigger, "
                   "JIT threads per row x rows per CTA x trigger) and print the tuning table rows they make "
                   "(fp8_tune.json/md)")  # fmt: skip
    p.add_argument("--tune-families", type=csv_of(FP8_TUNE_FAMILIES, "family"), default=list(FP8_TUNE_FAMILIES),
                   help="comma list of the kernel families the launch sweep times: jit and/or triton (default both)")  # fmt: skip
    p.add_argument("--tune-kinds", type=csv_of(FP8_TUNE_KINDS, "kind"), default=list(FP8_TUNE_KINDS),
                   help="comma list of the kernels the launch sweep times: quant_per_tensor, quant_ds_mla and/or "
                   "dequant (default all)")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="GPU: time nothing; call each write and gather provider once per size inside the NVTX range "
                   "'mlakv-profile' (after warm-up calls), for ncu --nvtx --nvtx-include 'mlakv-profile/'")  # fmt: skip
    p.add_argument("--graph-lengths", type=csv_ints("graph-lengths", 1, 65536), default=None,
                   help="GPU: instead, time each write and gather provider in CUDA graphs of these many runs of its "
                   "8-set body (comma list, e.g. 16,256,2048,8192), then 4 times in a row with the bench's timer "
                   "(fp8_graph_lengths.json/md): does a call's time depend on the graph, or move between calls?")  # fmt: skip
    return p


def rope_parser() -> argparse.ArgumentParser:
    """The ``mlakv bench rope`` parser (the fused RoPE + row write + query step against the kernels it replaces)."""
    p = argparse.ArgumentParser(
        prog="mlakv bench rope",
        description="The fused MLA cache step (RoPE on k_pe/q_pe, the row write, the absorbed query; one launch) "
        "against the unfused sequence (a RoPE kernel, the write, the query concat) and sglang's "
        "set_mla_kv_concat_q, each checked byte-equal to the reference first; CUDA-graph medians.",
    )
    p.add_argument("--variants", type=csv_of(ROPE_VARIANTS, "variant"), default=list(ROPE_VARIANTS),
                   help="comma list of bf16 (bf16 rows, bf16 query), fp8 (per_tensor rows, e4m3 query), "
                   "ds_mla (ds_mla rows, bf16 query); default all")  # fmt: skip
    p.add_argument("--heads", type=csv_ints("heads", 1, 1024), default=[16, 128], help="query heads H (default 16,128)")
    p.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE), default=None,
                   help=f"tokens n (default: GPU {ROPE_SIZES}; CPU {ROPE_CPU_SIZES})")  # fmt: skip
    p.add_argument("--quick", action="store_true", help=f"GPU sizes {ROPE_QUICK_SIZES}")
    p.add_argument("--providers", type=csv_of(ROPE_PROVIDERS + ROPE_SWEEP, "provider"), default=list(ROPE_PROVIDERS),
                   help=f"comma list of {', '.join(ROPE_PROVIDERS + ROPE_SWEEP)} (default {','.join(ROPE_PROVIDERS)})")  # fmt: skip
    p.add_argument("--sweep", action="store_true", help=f"also time the JIT kernel's launch variants {','.join(ROPE_SWEEP)}")
    p.add_argument("--triton-sweep", action="store_true",
                   help="also time the Triton kernel at every launch shape of mlakv.spec.tuning.ROPE_TRITON_SWEEP "
                   "(warps x query rows per program), each checked against the reference first")  # fmt: skip
    p.add_argument("--style", choices=["interleaved", "neox"], default="interleaved",
                   help="RoPE pairs: interleaved (DeepSeek, default) or neox (rotate halves)")  # fmt: skip
    p.add_argument("--sglang-max-n", type=positive_int, default=8192,
                   help="largest n sglang's kernel is run at (a build of it ended in an illegal access at 16384)")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    return p


# ---- mlakv bench indexer -------------------------------------------------------------------------
INDEXER_SIZES = [1, 8, 64, 512, 4096, 65536]


def indexer_parser(
    description: str = "DSA indexer K cache benchmark: the quantizing store (mlakv, its kernels, sglang's) and the gather.",
) -> argparse.ArgumentParser:
    """The ``mlakv bench indexer`` parser."""
    p = argparse.ArgumentParser(prog="mlakv bench indexer", description=description)
    p.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE, dedup=False), default=list(INDEXER_SIZES),
                   help=f"comma list of key counts, 1..{MAX_SIZE} (default {','.join(map(str, INDEXER_SIZES))})")  # fmt: skip
    p.add_argument("--sweep", action="store_true",
                   help="also time the JIT store at every launch shape (keys per half-warp, warps, PDL trigger place)")  # fmt: skip
    p.add_argument("--triton-sweep", action="store_true",
                   help="also time the Triton store at every launch shape of mlakv.spec.tuning.INDEXER_TRITON_SWEEP "
                        "(warps x keys per program), each checked against the reference first, and print the "
                        "INDEXER_TRITON_STEPS rows the fastest shapes make")  # fmt: skip
    p.add_argument("--out", type=out_dir, default=Path("bench-out"),
                   help="directory for indexer.json and indexer.md (checked writable before measuring)")  # fmt: skip
    return p


# ---- mlakv bench v4 ------------------------------------------------------------------------------
V4_LAYOUTS = ["v4", "v41", "v41_fp4", "v41_new", "v41_fp4_new"]
V4_SIZES = [1, 8, 64, 512, 1024, 4096, 16384, 65536]
V4_PROVIDERS = ["mlakv", "mlakv-jit", "mlakv-triton", "sglang"]


def v4_parser(
    description: str = "DeepSeek-V4 family paged-cache store: mlakv (public op, JIT, Triton) against sglang's store.",
) -> argparse.ArgumentParser:
    """The ``mlakv bench v4`` parser."""
    p = argparse.ArgumentParser(prog="mlakv bench v4", description=description)
    p.add_argument("--layouts", type=csv_of(V4_LAYOUTS, "layout"), default=["v4", "v41", "v41_fp4"],
                   help=f"comma list of {', '.join(V4_LAYOUTS)} (default v4,v41,v41_fp4)")  # fmt: skip
    p.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE, dedup=False), default=list(V4_SIZES),
                   help=f"comma list of token counts (default {','.join(map(str, V4_SIZES))})")  # fmt: skip
    p.add_argument("--providers", type=csv_of(V4_PROVIDERS, "provider"), default=list(V4_PROVIDERS),
                   help=f"comma list of {', '.join(V4_PROVIDERS)} (default all)")  # fmt: skip
    p.add_argument("--rope", action="store_true",
                   help="also time the store with the in-kernel RoPE (freqs_cis; mlakv also with positions + cos_sin_cache)")  # fmt: skip
    p.add_argument("--sweep", action="store_true",
                   help="also time the JIT store at every launch shape (warps per CTA x tokens per warp x PDL trigger)")  # fmt: skip
    p.add_argument("--triton-sweep", action="store_true",
                   help="also time the Triton store at every launch shape of mlakv.spec.tuning.V4_TRITON_SWEEP "
                        "(warps x tokens per program), each checked against the reference first")  # fmt: skip
    p.add_argument("--out", type=out_dir, default=Path("bench-out"),
                   help="directory for v4.json and v4.md (checked writable before measuring)")  # fmt: skip
    return p


# ---- mlakv bench demo-step -----------------------------------------------------------------------
DEMO_STEP_FORMATS = ["bf16", "per_tensor", "ds_mla"]  # mlakv.bench.demo_step.POOL_OF: the pool of each
DEMO_STEP_BATCHES = [1, 32, 128]
DEMO_STEP_CPU_BATCHES = [1, 4]


def demo_step_parser(
    description: str = "The demo model's whole decode step with the fused cache step (RoPE + row write + query, one "
    "launch per layer) against the separate kernels (RoPE, the write, the query concat), side by side; CUDA-graph "
    "medians on a GPU, eager wall clock on a CPU.",
) -> argparse.ArgumentParser:
    """The ``mlakv bench demo-step`` parser."""
    p = argparse.ArgumentParser(prog="mlakv bench demo-step", description=description)
    p.add_argument("--formats", type=csv_of(DEMO_STEP_FORMATS, "cache format"), default=list(DEMO_STEP_FORMATS),
                   help=f"comma list of {', '.join(DEMO_STEP_FORMATS)} (default all)")  # fmt: skip
    p.add_argument("--batch-sizes", type=csv_ints("decode batch sizes", 1, 4096), default=None,
                   help=f"decode batch sizes (default: GPU {','.join(map(str, DEMO_STEP_BATCHES))}; CPU "
                   f"{','.join(map(str, DEMO_STEP_CPU_BATCHES))})")  # fmt: skip
    p.add_argument("--context", type=positive_int, default=None,
                   help="tokens per request's context, the new one included (default: GPU 64, as the demo; CPU 8)")  # fmt: skip
    p.add_argument("--layers", type=positive_int, default=None, help="model layers (default: GPU 4, as the demo; CPU 1)")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="timing rounds, the variants alternating; the median is reported (default 3)")  # fmt: skip
    p.add_argument("--out", type=out_dir, default=Path("bench-out"),
                   help="directory for demo_step.json and demo_step.md (checked writable before measuring)")  # fmt: skip
    return p


# ---- mlakv bench vllm ----------------------------------------------------------------------------
VLLM_SIZES = [1, 64, 1024, 16384, 65536]
VLLM_PROVIDERS = ("mlakv", "vllm")


def vllm_parser(
    description: str = "vLLM's MLA cache ops: mlakv's face (mlakv.compat.vllm) and vLLM's own kernels side by side, "
    "against copy bandwidth.",
) -> argparse.ArgumentParser:
    """The ``mlakv bench vllm`` parser (also ``python -m mlakv.bench.vllm_ops``)."""
    p = argparse.ArgumentParser(prog="mlakv bench vllm", description=description)
    p.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE, dedup=False), default=list(VLLM_SIZES),
                   help=f"comma list of token counts (default {','.join(map(str, VLLM_SIZES))})")  # fmt: skip
    p.add_argument("--ops", default="", help="only ops whose name contains one of these (comma list), e.g. concat")
    p.add_argument("--providers", type=csv_of(VLLM_PROVIDERS, "provider"), default=list(VLLM_PROVIDERS),
                   help="comma list of mlakv, vllm (default both); vllm builds vLLM's kernels from .peers/vllm "
                        "(MLAKV_VLLM_SRC)")  # fmt: skip
    p.add_argument("--sweep", action="store_true",
                   help="also time the fused paged gathers at every launch shape of "
                        "mlakv.spec.tuning.PAGED_GATHER_SWEEP, each checked first")  # fmt: skip
    p.add_argument("--out", type=out_dir, default=None, help="directory for vllm_ops.json and vllm_ops.md")
    return p


# ---- mlakv bench parity -----------------------------------------------------------------------
PARITY_FAMILIES = ["row", "fp8", "rope", "v4", "indexer", "convert", "gather"]  # mlakv.bench.parity.FAMILIES
PARITY_SWEEPS = ["convert", "gather"]  # mlakv.bench.parity.SWEEPS
PARITY_SIZES = [1, 8, 64, 512, 1024, 4096, 16384, 65536]
PARITY_LIMIT = 1.15  # the goal: each Triton kernel within this factor of the CUDA kernel for the same call


def parity_parser(
    description: str = "Triton against the JIT CUDA kernels, every kernel family in one run (the family benches "
    "at the same sizes, each provider checked bit-exact first): one triton / jit ratio per kernel, case and n.",
) -> argparse.ArgumentParser:
    """The ``mlakv bench parity`` parser."""
    p = argparse.ArgumentParser(prog="mlakv bench parity", description=description)
    p.add_argument("--families", type=csv_of(PARITY_FAMILIES, "family"), default=list(PARITY_FAMILIES),
                   help=f"comma list of {', '.join(PARITY_FAMILIES)} (default all)")  # fmt: skip
    p.add_argument("--sizes", type=csv_ints("sizes", 1, MAX_SIZE), default=list(PARITY_SIZES),
                   help=f"comma list of n (default {','.join(map(str, PARITY_SIZES))})")  # fmt: skip
    p.add_argument("--sweep", type=csv_of(PARITY_SWEEPS, "sweep family"), default=[],
                   help=f"comma list of {', '.join(PARITY_SWEEPS)}: with those families, also time their Triton kernel at "
                        "every launch shape of the row kernel's sweep (each checked bit-exact first) and report the "
                        "fastest per n and the launch-table rows they make")  # fmt: skip
    p.add_argument("--convert-sweep", action="store_true", help="the same as --sweep convert")
    p.add_argument("--passes", type=positive_int, default=1,
                   help="run the families this many times (every other pass in reverse order); each side of a point "
                   "is the median over the passes, and the report lists the points whose times differ between "
                   "passes by more than 10%% (default 1)")  # fmt: skip
    p.add_argument("--out", type=out_dir, default=Path("bench-out"),
                   help="directory for parity.json and parity.md (checked writable before measuring)")  # fmt: skip
    return p


def wants_l3(argv: Sequence[str]) -> bool:
    """Whether a ``mlakv bench hicache`` command line asks for the L3 bench (``--l3 X`` or ``--l3=X``)."""
    return any(a == "--l3" or a.startswith("--l3=") for a in argv)


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of a ``mlakv bench ...`` command line (``argv``: what follows ``bench``)."""
    if argv and argv[0] == "hicache":
        return hicache_l3_parser() if wants_l3(argv[1:]) else hicache_parser()
    if argv and argv[0] == "fp8":
        return fp8_parser()
    if argv and argv[0] == "rope":
        return rope_parser()
    if argv and argv[0] == "indexer":
        return indexer_parser()
    if argv and argv[0] == "v4":
        return v4_parser()
    if argv and argv[0] == "demo-step":
        return demo_step_parser()
    if argv and argv[0] == "vllm":
        return vllm_parser()
    if argv and argv[0] == "parity":
        return parity_parser()
    return kv_write_parser()
