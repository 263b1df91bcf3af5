"""Launch tuning of the JIT row-write kernel, one row per GPU family (or model, where measured).

The dispatcher reads ``min_n_loc`` (the JIT path is taken for ``n_loc >= min_n_loc``, else the
Triton row kernel) and the JIT entry reads the launch shape for a given ``n_loc`` from ``steps``.
Every row names the run that measured it; a new GPU gets a row by running
``python -m mlakv bench --tune`` on it, not by guessing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "LaunchStep",
    "LaunchTuning",
    "TUNING",
    "gpu_family",
    "tuning_key",
    "tuning_for",
    "TRITON_ROW_STEPS",
    "triton_row_launch",
    "TRITON_CONVERT_STEPS",
    "TRITON_CONVERT_MEASURED",
    "triton_convert_launch",
    "TRITON_GATHER_STEPS",
    "TRITON_GATHER_MEASURED",
    "triton_gather_launch",
    "ROPE_WRITE_WARPS",
    "ROPE_WRITE_EARLY_MAX_ITEMS",
    "rope_write_launch",
    "ROPE_TRITON_STEPS",
    "ROPE_TRITON_MEASURED",
    "ROPE_TRITON_SWEEP",
    "rope_triton_launch",
    "FP8_JIT_STEPS",
    "FP8_JIT_MEASURED",
    "FP8_JIT_THREADS_PER_ROW",
    "FP8_JIT_PACKED",
    "fp8_jit_threads",
    "fp8_jit_launch",
    "TRIGGER_PLACES",
    "FP8_TRITON_STEPS",
    "FP8_TRITON_MEASURED",
    "fp8_triton_launch",
    "FP8_TRITON_PARTS",
    "FP8_TRITON_PARTS_MEASURED",
    "fp8_triton_parts",
    "V4_TRITON_STEPS",
    "V4_TRITON_MEASURED",
    "V4_TRITON_SWEEP",
    "v4_triton_launch",
    "PAGED_GATHER_STEPS",
    "PAGED_GATHER_MEASURED",
    "PAGED_GATHER_SWEEP",
    "paged_gather_launch",
    "INDEXER_TRITON_STEPS",
    "INDEXER_TRITON_MEASURED",
    "INDEXER_TRITON_SWEEP",
    "indexer_triton_launch",
    "MOVE_TRITON_STEPS",
    "MOVE_TRITON_MEASURED",
    "MOVE_TRITON_SWEEP",
    "move_triton_launch",
    "HICACHE_COPY_STEPS",
    "HICACHE_COPY_MEASURED",
    "HICACHE_COPY_SWEEP",
    "hicache_copy_launch",
]


@dataclass(frozen=True)
class LaunchStep:
    """Launch shape for calls with ``n_loc <= max_n_loc`` (``None``: no upper bound).

    ``early_trigger``: the kernel lets the next (PDL) grid launch at entry instead of right after
    its ``griddepcontrol.wait``; see the kernel's header comment.
    """

    max_n_loc: int | None
    num_warps: int
    items_per_warp: int
    use_tma: bool
    early_trigger: bool = False


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

    def launch(self, n_loc: int) -> tuple[int, int, bool, bool]:
        """``(num_warps, items_per_warp, use_tma, early_trigger)`` for a call of ``n_loc`` rows."""
        for s in self.steps:
            if s.max_n_loc is None or n_loc <= s.max_n_loc:
                return s.num_warps, s.items_per_warp, s.use_tma, s.early_trigger
        raise AssertionError("the last step must have max_n_loc=None")


TUNING: dict[str, LaunchTuning] = {
    # Seed values, tuned on a GB300 before this project (not re-measured here): TMA bulk stores,
    # JIT from 768 rows, 4 warps per CTA up to 768 rows, else 8.
    "blackwell": LaunchTuning(
        768,
        (LaunchStep(768, 4, 1, True), LaunchStep(None, 8, 1, True)),
        "seed: GB300 (threshold 768; 4 warps up to 768 rows else 8)",
    ),
    # H100 80GB HBM3. Every call goes to the JIT kernel (its one-warp-per-row kernel,
    # set_mla_kv_row_kernel). From the side-by-side probes of 2026-11-24 (docs/benchmarks.md, "What
    # decides a small call"): 8 warps x 1 row, direct stores (1 warp, 2 rows per warp, streaming
    # stores and TMA measured equal or slower); the PDL trigger at kernel entry up to 256 rows, right
    # after the wait above (at 1024 rows an entry trigger measured 1.6-1.9x slower; at 4096 rows 1 %).
    "hopper": LaunchTuning(
        0,
        (
            LaunchStep(256, 8, 1, False, early_trigger=True),
            LaunchStep(None, 8, 1, False, early_trigger=False),
        ),
        "H100 80GB HBM3, side-by-side probes with sglang 0.5.23, 2026-11-24 (docs/benchmarks.md)",
    ),
}


# H200 (sm_90 like the H100; the row is chosen by device name, see tuning_key). Its own run,
# 2026-11-24 (`python -m mlakv bench --layouts bf16,u8 --no-cold --tune`, docs/benchmarks.md "H200"):
# with the H100's shape auto was at or below sglang 0.5.23 at all 24 points and within 1.07x of the
# fastest of 13 launch variants at every size; every variant that beat it (2 or 4 warps per CTA at
# 8-128 rows, 4 warps at 2048-65536) did so by less than the run's own spread between two providers
# that launch the same kernel (auto vs jit: up to 6 % at 1 row). The H100's shape stands, measured.
TUNING["hopper-h200"] = LaunchTuning(
    0,
    TUNING["hopper"].steps,
    "H200, mlakv bench --tune with sglang 0.5.23 side by side, 2026-11-24 (docs/benchmarks.md)",
)


def gpu_family(capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``hopper``; ``(10, x)`` and newer -> ``blackwell``; older -> ``pre-hopper``."""
    major = capability[0]
    if major == 9:
        return "hopper"
    if major >= 10:
        return "blackwell"
    return "pre-hopper"


def tuning_key(capability: tuple[int, int], device_name: str) -> str:
    """The TUNING row for a GPU: a row of its own model where one was measured (``hopper-h200``
    for an H200), else its family's (Hopper's for families not measured yet)."""
    family = gpu_family(capability)
    if family == "hopper" and "H200" in device_name.upper():
        return "hopper-h200"
    return family if family in TUNING else "hopper"


@functools.lru_cache(maxsize=None)
def _tuning_for_index(index: int) -> LaunchTuning:
    return TUNING[tuning_key(torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))]


def tuning_for(device: torch.device) -> LaunchTuning:
    """The tuning row for ``device`` (see :func:`tuning_key`)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _tuning_for_index(index)


# The Triton row kernel (every pre-Hopper GPU's path, and the fallback elsewhere):
# (max n_loc, bytes per warp, bytes per program, PDL trigger at entry), by increasing n_loc; warps =
# clamp(BLOCK bytes / bytes per warp, 1, 8) and rows per program = max(1, bytes per program / BLOCK
# bytes) with BLOCK = next_pow2(row width) elements. Counting a program's rows in bytes gives a
# narrow row more of them: the sweeps' fastest shapes hold about 8 KB per program from 4096 rows for
# both measured layouts (bf16 512+64: 4 rows of 2048 bytes; u8 656: 8 rows of 1024), which rows
# counted per program gave only one of them.
# History: H100, 2026-11-24 (docs/benchmarks.md, "Triton launch sweep"): the PDL trigger at program
# entry won at every size; several rows per program win from 768 rows. H200, 2026-12-03 09:22 UTC
# (docs/h200-2026-12-03/run10): the kernel as two blocks per program (nope, rope), every load before
# any store; rows per program then fixed per size (1 x 4 from 4096 rows: u8 at 16384 rows 7.58 us
# against 6.37 for its fastest 1 x 8).
# H200, 2026-12-03 14:09 UTC (`mlakv bench --layouts bf16,u8 --providers jit,triton --no-cold --quick
# --triton-sweep --sizes 1,8,64,512,1024,4096,16384,65536`, 32 shapes each checked bit-exact;
# docs/h200-2026-12-03/run12): each row is the rule whose worse layout is nearest its own fastest
# shape: one warp of one row to 64 rows (bf16 0.58-0.64 us against 0.65-0.72 for the old 8 warps,
# both layouts at their fastest); 4 KB per program to 1024 (bf16 1 x 2 and u8 1 x 4 at 512, within
# 1.04x; 2 x 2 and 1 x 4 at 1024, within 1.03x; the old 8 x 4 took bf16 1.25x there); 8 warps of 8 KB
# at 4096 (both fastest); one warp of 8 KB above (u8 16384 rows 6.37 us against the old 7.56;
# within 1.01x of both fastest at 65536).
TRITON_ROW_STEPS: tuple[tuple[int | None, int, int, bool], ...] = (
    (64, 2048, 1024, True),
    (512, 2048, 4096, True),
    (1024, 1024, 4096, True),
    (4096, 128, 8192, True),
    (None, 2048, 8192, True),
)
TRITON_ROW_MEASURED = "NVIDIA H200, 2026-12-03 14:09 UTC: `mlakv bench --triton-sweep` (docs/h200-2026-12-03/run12)"

# The converting write (fp16/fp32 sources converted in registers; the row kernel with conversion): its own
# rows (max n_loc, num_warps, rows per program, PDL trigger at entry), by increasing n_loc. Converting
# costs registers and instructions per value, so fewer warps per row pay: H200, 2026-12-03 09:19 UTC
# (`mlakv bench parity --families convert --convert-sweep`, fp32 -> bf16 512+64, 32 shapes each checked
# bit-exact; docs/h200-2026-12-03/run10), the fastest shape per n: w1r1l 0.88 us at 1, w1r1e at 8-64
# (0.95-0.96), w1r2l 1.53 at 512 (the row table's w1r2e 2.24), w1r1e 1.66 at 1024 (w1r2e 2.53), w8r4e
# 5.37 at 4096 (w1r4e 5.99), w1r4e at 16384 and 65536.
TRITON_CONVERT_STEPS: tuple[tuple[int | None, int, int, bool], ...] = (
    (1, 1, 1, False),
    (64, 1, 1, True),
    (512, 1, 2, False),
    (1024, 1, 1, True),
    (4096, 8, 4, True),
    (None, 1, 4, True),
)
TRITON_CONVERT_MEASURED = (
    "NVIDIA H200, 2026-12-03 09:19 UTC: `mlakv bench parity --families convert --convert-sweep` (docs/h200-2026-12-03/run10)"
)


def _row_at(steps: tuple[tuple, ...], n: int, bound: str = "max n") -> tuple:
    """The rest of the first row ``(max n, *rest)`` of a launch table ``steps`` (by increasing max n,
    the last one open: ``None``) that covers ``n``; every table's lookup. ``bound`` names the first
    column in the error a table without an open last row raises."""
    for max_n, *rest in steps:
        if max_n is None or n <= max_n:
            return tuple(rest)
    raise AssertionError(f"the last launch step must have {bound} None, got {steps[-1][0] if steps else 'no rows'}")


# The plain gather (kernels/triton/row_write.py, ``launch_get_kv_rows``): its own rows (max n_loc,
# num_warps, rows per program, PDL trigger at entry), by increasing n_loc; each the fastest shape of the
# sweep at that n (bf16 512+64, 32 shapes each checked bit-exact; docs/h200-2026-12-03/run11): 4 warps x
# 2 rows 0.69-0.73 us at 1-8 rows, 2 x 2 at 512-1024 (1.11 us against 1.52 at the write's borrowed
# 8 x 1), 4 x 8 with the trigger after the stores at 4096 (2.37 against 5.60 at one row per program),
# 2 x 4 at 16384 (9.38 against 20.67), 4 x 4 at 65536 (38.42 against 79.80; torch's index_select 46.35).
TRITON_GATHER_STEPS: tuple[tuple[int | None, int, int, bool], ...] = (
    (8, 4, 2, True),
    (64, 4, 1, True),
    (1024, 2, 2, True),
    (4096, 4, 8, False),
    (16384, 2, 4, True),
    (None, 4, 4, True),
)
TRITON_GATHER_MEASURED = (
    "NVIDIA H200, 2026-12-03 11:09 UTC: `mlakv bench parity --families gather --sweep gather` (docs/h200-2026-12-03/run11)"
)


def triton_gather_launch(n_loc: int) -> tuple[int, int, bool]:
    """``(num_warps, rows_per_program, early_trigger)`` of the Triton gather of ``n_loc`` rows
    (:data:`TRITON_GATHER_STEPS`)."""
    return _row_at(TRITON_GATHER_STEPS, n_loc)


def triton_convert_launch(n_loc: int) -> tuple[int, int, bool]:
    """``(num_warps, rows_per_program, early_trigger)`` of the Triton row kernel for a converting write
    (a source dtype other than the buffer's) of ``n_loc`` rows (:data:`TRITON_CONVERT_STEPS`)."""
    return _row_at(TRITON_CONVERT_STEPS, n_loc)


def triton_row_launch(n_loc: int, block_bytes: int) -> tuple[int, int, bool]:
    """``(num_warps, rows_per_program, early_trigger)`` of the Triton row kernel for a call of
    ``n_loc`` rows whose ``BLOCK`` spans ``block_bytes`` (:data:`TRITON_ROW_STEPS`)."""
    bytes_per_warp, bytes_per_program, early = _row_at(TRITON_ROW_STEPS, n_loc)
    return max(1, min(8, block_bytes // bytes_per_warp)), max(1, bytes_per_program // block_bytes), early


# The fused RoPE + cache-row + query kernel (csrc/rope_write.cuh): one warp per item (a cache row or
# one head's query row), ROPE_WRITE_WARPS per CTA, the PDL trigger at kernel entry for calls of at
# most ROPE_WRITE_EARLY_MAX_ITEMS items (n * (H + 1)), else right after the wait. Taken over from the
# plain write's Hopper row, whose items are warps too (8 warps per CTA; entry trigger up to 256 warps,
# 1.5-2.2x slower at 512-1024 on the H100). Checked on an H200, 2026-12-03 04:44 UTC (`mlakv bench rope
# --providers fused --sweep --variants fp8 --heads 16,128 --sizes 1,64,1024,16384`, docs/h200-2026-12-03/
# run8/rope_sweep.md): from 64 tokens the table's launch is within 2 % of the fastest variant (the entry
# trigger at n=64, H=16, 1088 items: 2.90 us against 1.58, so the bound stays); at one token the trigger
# after the wait was faster (1.34 us against 1.48 at H=16, 1.42 against 1.46 at H=128). Only the e4m3
# variant was timed, so the rows stay as they are.
ROPE_WRITE_WARPS = 8
ROPE_WRITE_EARLY_MAX_ITEMS = 256


def rope_write_launch(n_items: int) -> tuple[int, bool]:
    """``(num_warps, early_trigger)`` of the fused RoPE write for a call of ``n_items`` warp items."""
    return ROPE_WRITE_WARPS, n_items <= ROPE_WRITE_EARLY_MAX_ITEMS


# The fused RoPE write's Triton kernel (kernels/triton/rope_write.py): per call kind ("e4m3": an FP8
# query; "ds_mla": ds_mla cache rows with a 16-bit or no query; "bf16": any other cache rows with a
# 16-bit or no query), (max query rows n * H, warps, query rows per program) by increasing n * H; the
# cache-row programs take the same warps. Measured on an H200 (`mlakv bench rope --triton-sweep`, each
# shape checked against the reference first):
# * bf16 and ds_mla, 2026-12-03 04:53 UTC (`--variants bf16,ds_mla --heads 16,128 --sizes 8,64,512,4096`):
#   one warp of one row up to 1024 rows (n=64, H=16: bf16 1.65 us against 1.76 for 4 x 2, ds_mla 1.71
#   against 2.14), except ds_mla's first 128 rows, where 1 warp leaves its cache rows' tile arithmetic
#   too few threads (n=8, H=16: 1.59 us against 1.22 for 4 x 1); then 4 warps x 2 rows, 8 from 16385
#   (within 1 % of the fastest shape at 8192-524288 rows). bf16 up to 128 rows: 2026-12-02 23:06 UTC
#   found one warp faster there by up to 15 % too.
# * e4m3, 2026-12-03 04:44 UTC, the kernel with the per-program common case (`--variants fp8 --heads
#   16,128 --sizes 1,64,1024,16384`): 4 warps x 1 row to 128 rows, 1 x 1 to 1024 (2.02 us against 2.53 at
#   n=64, H=16), then 2 warps x 2 rows to 16384 query rows (n=1024, H=16: 14.4 us against 21.2 for 4 x 2).
#   Above 16384 query rows, 4 warps x 8 rows from the sweep of 2026-12-03
#   20:51 UTC, the kernel with joined query pairs (`--variants fp8 --heads 16,128 --sizes
#   8,64,1024,16384,65536 --providers fused,fused-triton --triton-sweep`; docs/h200-2026-12-03/run19):
#   n=16384, H=128: 1145 us against 1283 for 2 x 2; n=65536, H=16: 667 against 712 (4 x 4: 666).
ROPE_TRITON_STEPS: dict[str, tuple[tuple[int | None, int, int, str], ...]] = {
    "bf16": ((1024, 1, 1, "wait"), (16384, 4, 2, "wait"), (None, 4, 8, "wait")),
    "ds_mla": ((128, 4, 1, "wait"), (1024, 1, 1, "wait"), (16384, 4, 2, "wait"), (None, 4, 8, "wait")),
    "e4m3": ((128, 2, 2, "entry"), (8192, 4, 4, "wait"), (None, 4, 8, "wait")),
}
ROPE_TRITON_MEASURED = (
    "NVIDIA H200, 2026-12-03: bf16 and ds_mla 04:53 UTC (docs/h200-2026-12-03/run8); e4m3 2026-12-04 06:20 UTC "
    "(docs/h200-2026-12-04/run33, to 65536 query rows) and 2026-12-03 20:51 UTC (docs/h200-2026-12-03/run19, "
    "above 16384); `mlakv bench rope --triton-sweep`"
)
# The bf16 and ds_mla rows' PDL trigger sits right after the wait ("wait" of TRIGGER_PLACES), where the
# kernel had it when they were measured; they predate the kernel's constant head count (2026-12-04),
# which made the e4m3 query's multi-row shapes faster (H=16, 65536 tokens: 713 -> 633 us). The e4m3 rows
# were re-swept on the query's product path for a power-of-two scale (`--variants fp8 --heads 16,128
# --sizes 1,8,64,512`, every shape at each of the three trigger places): to 128 query rows two warps
# and two rows per program with the trigger at entry (1.02-1.11 us, against 1.25-1.39 for the old
# rows), four warps and four rows to 8192 (1.45-5.68 us, within 0.04 us of the fastest shape at every
# point), four warps and eight rows above (65536 rows: 30.23 us, the fastest; the row of run19 above
# 16384). 8193-65535 query rows were not swept again: the boundary sits at the last measured size.
# the shapes `mlakv bench rope --triton-sweep` times: (warps, query rows per program)
ROPE_TRITON_SWEEP: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (4, 1), (4, 2), (4, 4), (4, 8), (8, 4), (8, 8), (8, 16))


def rope_triton_launch(q_items: int, kind: str = "bf16") -> tuple[int, int, str]:
    """``(num_warps, query rows per program, PDL trigger place)`` of the fused RoPE write's Triton kernel for ``q_items = n * H``
    query rows of a call of ``kind`` (a key of :data:`ROPE_TRITON_STEPS`: ``"e4m3"`` for an FP8 query,
    else ``"ds_mla"`` for ds_mla cache rows, else ``"bf16"``)."""
    return _row_at(ROPE_TRITON_STEPS[kind], q_items)


# The FP8 family (quantizing write, dequantizing gather): its own rows, not the plain write's.
# JIT (csrc/fp8.cuh): (max n_loc, warps per CTA, PDL trigger at entry, threads per row) by increasing
# n_loc, per kernel ("quant_per_tensor", "quant_ds_mla", "dequant" for both formats). A row's 16-byte
# chunks are spread over its threads (32, 64 or 128: one to three chunks each for 512 + 64); rows per CTA =
# 32 * warps / threads per row. Few rows per CTA at small n spread a call over more SMs; more
# threads per row shorten each thread's dependent chain (load, widen, amax, shuffle, divide, convert,
# store), which is what a call of few rows waits for. Measured (each row the sweep's fastest shape, or
# one within 0.01 us of it where that lets a row span more sizes; every shape checked bit-exact first;
# each format's write timed on its own, the gathers on both formats' sum; docs/h200-2026-12-03/run16/
# fp8_tune.md): the writes take 128 threads per row in 4-warp CTAs at 1-64 rows (per_tensor to 512;
# ds_mla at one row 0.82 us against 0.81 for 16 warps), 64 threads in 8-warp CTAs to 1024 rows (512:
# ds_mla 1.14 us against 1.26 for the old 16-warp row), 64 threads to 4096, one warp per row above
# (PDL trigger at entry for per_tensor from 1025 rows). The gathers launch with PDL: 128 threads per
# row to 64 rows, 64 threads to 4096 (16-warp CTAs with the trigger at entry from 1025), one warp above.
# The writes' rows at one row and at 65-4096 rows were re-swept on the per_tensor product path for a
# power-of-two scale and the ds_mla max.NaN amax (docs/h200-2026-12-04/run35): per_tensor takes 128
# threads per row in 8-warp CTAs to 1024 rows (512: 0.98 us against 1.07 for the old row; 1024: 1.12
# against 1.37) and 64 threads in 16-warp CTAs with the trigger at entry to 4096 (2.84 against 2.96);
# ds_mla the trigger at entry at one row (0.81 against 0.86) and at 65-512 rows (128 threads, 4 warps:
# 1.10 against 1.19 at 512), 64 threads in 16-warp CTAs at 513-1024 (1.30 against 1.51); its 4096-row
# shape stood (3.24, within 0.01 us of the fastest).
# 2026-12-04 10:28-10:55 UTC (docs/h200-2026-12-04/run36-run38): the per_tensor write takes packed rows
# (FP8_JIT_PACKED, one thread per chunk) at 1-8 and 65-1024 rows, swept with every aligned shape at
# 1-65536 rows (run38, `--tune-kinds quant_per_tensor`): 1024 rows 1.09 us against 1.12 for the 128-thread
# row, 512 rows 0.96 against 1.02. 9-64 rows keep 128 threads per row in 4-warp CTAs: the sweep's three
# fastest shapes tied at 0.81 us, and under a scale that is not a power of two the packed shape it
# picked (trigger at entry) took 1.17 us at 64 rows against 0.83 for this one (the benches of run38 and
# run36; this kernel's machine code is the same in both). One warp per row in 8-warp CTAs at
# 4097-16384 (8.13 against 8.51) and 4-warp CTAs with the trigger after the wait at 16385-65536 (28.55
# against 28.83). ds_mla at 2-8 rows
# takes 64 threads per row (run36: 0.85 against 0.91 us); the gathers at 1-8 rows (run37).
# The other rows here and the Triton rows below predate the per_tensor product path and
# the ds_mla max.NaN amax (2026-12-04), except the Triton per_tensor write's rows at 65-4096 rows: re-swept
# on the product path (docs/h200-2026-12-04/run33), the 1024-row shape moved from 4 rows per program to 2
# (1.57 -> 1.28 us; the JIT write took 1.28 in the run before). The 512 and 4096 rows stood.
FP8_JIT_STEPS: dict[str, tuple[tuple[int | None, int, bool, int], ...]] = {
    "quant_per_tensor": ((1, 16, False, -1), (8, 4, False, -1), (64, 4, False, 128), (1024, 8, False, -1),
                         (4096, 16, True, 64), (16384, 8, False, 32), (65536, 4, False, 32), (None, 4, True, 32)),
    "quant_ds_mla": ((1, 4, True, 128), (8, 4, False, 64), (64, 4, False, 128), (512, 4, True, 128),
                     (1024, 16, False, 64), (4096, 4, False, 64), (None, 4, False, 32)),
    "dequant": ((1, 4, True, 128), (8, 4, False, 64), (64, 4, False, 128), (1024, 4, False, 64), (4096, 16, True, 64),
                (None, 4, False, 32)),
}  # fmt: skip
FP8_JIT_MEASURED = (
    "NVIDIA H200, 2026-12-03 18:37 UTC: `mlakv bench fp8 --tune --tune-families jit "
    "--sizes 1,8,64,512,1024,4096,65536` (docs/h200-2026-12-03/run16); the writes at 1 and 65-4096 rows "
    "2026-12-04 06:33 UTC: `mlakv bench fp8 --tune --tune-families jit --tune-kinds "
    "quant_per_tensor,quant_ds_mla --sizes 1,512,1024,4096` (docs/h200-2026-12-04/run35); quant_ds_mla at 2-8 "
    "rows 10:33 UTC: `mlakv bench fp8 --tune --tune-families jit --tune-kinds quant_per_tensor,quant_ds_mla "
    "--sizes 8,64` (run36); dequant at 1-8 rows 10:51 UTC: `mlakv bench fp8 --tune --tune-families jit "
    "--tune-kinds dequant_per_tensor --sizes 1,8,64,512,1024,4096` (run37); quant_per_tensor with packed rows "
    "10:55 UTC: `mlakv bench fp8 --tune --tune-families jit --tune-kinds quant_per_tensor "
    "--sizes 1,8,64,512,1024,4096,16384,65536` (run38)"
)
# The threads per row a JIT FP8 kernel takes (the template variants each module holds).
FP8_JIT_THREADS_PER_ROW: tuple[int, ...] = (32, 64, 128)
# The JIT per_tensor write's packed launch, a threads-per-row value of FP8_JIT_STEPS["quant_per_tensor"]:
# one thread per 16-byte source chunk and the rows laid end to end over the CTA's threads, (nope + rope) / 8
# threads a row (72 for 512 + 64), so no thread idles (at 128 threads per row 56 of them hold no chunk).
FP8_JIT_PACKED = -1


def fp8_jit_threads(threads: int, num_warps: int, nope_dim: int, rope_dim: int) -> tuple[int, int]:
    """``(num_warps, threads_per_row)`` as the JIT launchers take them, for a launch row's ``threads``
    and ``num_warps``: :data:`FP8_JIT_PACKED` becomes the row's chunk count ``(nope_dim + rope_dim) // 8``;
    where that count is a multiple of 32 the packed layout is an aligned one, and the call takes 128
    threads per row on whole rows (``num_warps`` rounded up to a multiple of 4). Any other value passes."""
    if threads != FP8_JIT_PACKED:
        return num_warps, threads
    chunks = (nope_dim + rope_dim) // 8
    if chunks % 32:
        return num_warps, chunks
    return min(32, -(-num_warps // 4) * 4), 128


def fp8_jit_launch(kind: str, n_loc: int) -> tuple[int, bool, int]:
    """``(num_warps, early_trigger, threads_per_row)`` of the JIT FP8 kernel ``kind`` (``quant_per_tensor``,
    ``quant_ds_mla``, ``dequant``)
    for ``n_loc`` rows: warps per CTA, the PDL trigger at kernel entry (else right after the wait), threads
    per row (rows per CTA = 32 * num_warps / threads_per_row; :data:`FP8_JIT_PACKED`: rows packed,
    :func:`fp8_jit_threads`)."""
    return _row_at(FP8_JIT_STEPS[kind], n_loc)


# Where a Triton kernel lets the next (PDL) grid launch (kernels/triton/pdl.py): before its wait
# ("entry"), right after it ("wait"), or after its stores ("end").
TRIGGER_PLACES: tuple[str, ...] = ("entry", "wait", "end")

# Triton (kernels/triton/fp8.py): (max n_loc, num_warps, rows per program, PDL trigger place of
# TRIGGER_PLACES) by increasing n_loc, per kernel: "quant_per_tensor", "quant_ds_mla", "dequant_per_tensor", "dequant_ds_mla".
# Measured: each row is the fastest shape of one sweep of every kernel at n_loc 1, 8, 64, 512, 1024,
# 4096, 16384, 65536 (every shape checked bit-exact before it was timed; every shape with the trigger
# at entry and right after the wait, then the fastest with it after the stores; docs/h200-2026-12-03/
# run23/tune/fp8_tune.md). Up to 64 rows the trigger sits at entry. Right after the wait: the ds_mla
# gather at 65-4096 rows, the per_tensor gather and write at 513-1024, the ds_mla write at 65-1024. At
# 1024 rows the gathers' best shapes with it there take 1.28-1.29 us, against 1.50 or more for every
# shape with it at entry (the 1024-row gap to the CUDA kernel of earlier runs); the ds_mla gather at
# 4096 2.20 against 2.38; the ds_mla write at 512 1.26 against 1.50. At 16384-65536 rows the places
# are within 1 % of one another.
FP8_TRITON_STEPS: dict[str, tuple[tuple[int | None, int, int, str], ...]] = {
    "quant_per_tensor": ((64, 4, 1, "entry"), (512, 2, 1, "entry"), (1024, 4, 2, "wait"), (4096, 8, 4, "entry"),
                         (16384, 2, 4, "entry"), (None, 2, 4, "end")),
    "quant_ds_mla": ((1, 4, 1, "entry"), (8, 1, 1, "entry"), (64, 2, 1, "entry"), (1024, 4, 4, "wait"),
                     (16384, 4, 8, "entry"), (None, 2, 4, "entry")),
    "dequant_per_tensor": ((64, 4, 1, "entry"), (512, 2, 4, "entry"), (1024, 4, 2, "wait"), (4096, 8, 4, "entry"),
                           (16384, 2, 4, "entry"), (None, 4, 4, "entry")),
    "dequant_ds_mla": ((1, 4, 1, "entry"), (64, 4, 2, "entry"), (512, 4, 4, "wait"), (1024, 2, 2, "wait"),
                       (4096, 2, 4, "wait"), (16384, 4, 8, "end"), (None, 4, 4, "wait")),
}  # fmt: skip
FP8_TRITON_MEASURED = (
    "NVIDIA H200, 2026-12-03 23:20 UTC: `mlakv bench fp8 --tune --tune-families triton "
    "--sizes 1,8,64,512,1024,4096,16384,65536` (docs/h200-2026-12-03/run23); quant_per_tensor at 65-4096 "
    "rows 2026-12-04 06:19 UTC: `mlakv bench fp8 --tune --tune-families triton --tune-kinds quant_per_tensor "
    "--sizes 512,1024,4096` (docs/h200-2026-12-04/run33); quant_ds_mla at 2-8 rows 2026-12-04 10:31 UTC: "
    "`mlakv bench fp8 --tune --tune-families triton --tune-kinds quant_ds_mla --sizes 8,512,1024` "
    "(docs/h200-2026-12-04/run36)"
)


# The ds_mla write's programs per block of rows (kernels/triton/fp8.py, ``parts_per_row``): (max n_loc,
# parts) by increasing n_loc. A part takes its share of the row's 128-value tiles (each with its own
# scale) and of the rope, so parts need no cross-warp reduction; they shorten a warp's dependent chain,
# which is what a call of few rows waits for. From the same sweep as FP8_TRITON_STEPS (parts 1, 2, 4
# at each shape that gives a part 4-16 values a thread): two parts at 64 and 512 rows (4 warps x 4
# rows in 2 parts, trigger after the wait: 1.26 us at 512) and at 4096-16384. Re-swept at 8, 512 and
# 1024 rows (docs/h200-2026-12-04/run36): one warp per row in 4 parts at 2-8 rows (0.81 us against 0.98
# for 2 warps in one part), one part at 9-1024 rows (512: 1.27, tied with 2 parts).
FP8_TRITON_PARTS: dict[str, tuple[tuple[int | None, int], ...]] = {
    "quant_ds_mla": ((1, 1), (8, 4), (1024, 1), (16384, 2), (None, 1)),
}
FP8_TRITON_PARTS_MEASURED = FP8_TRITON_MEASURED


def fp8_triton_parts(kind: str, n_loc: int) -> int:
    """Programs per block of rows of the Triton FP8 kernel ``kind`` for ``n_loc`` rows (1: no split;
    only ``quant_ds_mla`` splits, :data:`FP8_TRITON_PARTS`)."""
    return _row_at(FP8_TRITON_PARTS.get(kind, ((None, 1),)), n_loc)[0]


def fp8_triton_launch(kind: str, n_loc: int) -> tuple[int, int, str]:
    """``(num_warps, rows_per_program, trigger)`` of the Triton FP8 kernel ``kind`` for ``n_loc`` rows;
    ``trigger`` is a place of :data:`TRIGGER_PLACES`."""
    return _row_at(FP8_TRITON_STEPS[kind], n_loc)


# The DeepSeek-V4 family store (csrc/v4_store.cuh, one warp per token): (max n, warps per CTA,
# tokens per warp, PDL trigger at entry) by increasing n. Measured (V41, with and without the
# in-kernel RoPE, every shape checked bit-exact first): at 1-64 tokens two warps per CTA with the
# trigger after the wait (n=64: 1.05 us against 1.14 at entry), from there four warps of one token
# (n=4096: 2.87 us against 3.40 for eight warps of two; n=65536: 26.4 against 27.6, with RoPE 30.1
# against 32.8).
V4_JIT_STEPS: tuple[tuple[int | None, int, int, bool], ...] = (
    (64, 2, 1, False),
    (None, 4, 1, False),
)
V4_JIT_MEASURED = (
    "NVIDIA H200, 2026-12-02 15:33 UTC: `mlakv bench v4 --layouts v41 --rope --sweep --sizes 1,8,64,4096,65536`"
)
# Triton (kernels/triton/v4_store.py, one [tokens, 512] block per program): per token encoding
# (0 v4, 1 v41, 2 v41_fp4; the interleaved layouts take their twin's), (max n, num_warps, tokens per
# program (a power of two), PDL trigger at entry) by increasing n. Measured: each row is the sweep's
# fastest shape at n 1, 64, 1024, 4096, 65536 (every shape checked bit-exact first): one warp of one
# token to 1024 tokens (v41: 0.76 / 0.81 / 1.55 us, against 0.88 / 1.02 / 2.33 for the seeds), then
# per encoding; docs/benchmarks.md has the table.
V4_TRITON_STEPS: dict[int, tuple[tuple[int | None, int, int, bool], ...]] = {
    0: ((1024, 1, 1, True), (None, 2, 4, True)),  # v4: 4096 3.52, 65536 32.35 us
    1: ((1024, 1, 1, True), (4096, 4, 4, True), (None, 4, 8, True)),  # v41: 3.24, 28.78
    2: ((1024, 1, 1, True), (4096, 2, 2, True), (None, 2, 4, True)),  # v41_fp4: 4.25, 35.50
}
V4_TRITON_MEASURED = (
    "NVIDIA H200, 2026-12-02 (device clock 15:51 UTC): `mlakv bench v4 --layouts v41,v4,v41_fp4 --sizes "
    "1,64,1024,4096,65536 --providers mlakv-jit,mlakv-triton --triton-sweep`"
)
# The launch shapes the sweep times: (num_warps, tokens per program), 16 or 32 values a thread.
V4_TRITON_SWEEP: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16))


def v4_jit_launch(n: int) -> tuple[int, int, bool]:
    """``(num_warps, tokens_per_warp, early_trigger)`` of the JIT V4-family store for ``n`` tokens."""
    return _row_at(V4_JIT_STEPS, n)


def v4_triton_launch(n: int, encoding: int = 1) -> tuple[int, int, bool]:
    """``(num_warps, tokens_per_program, early_trigger)`` of the Triton V4-family store for ``n`` tokens
    of ``encoding`` (0 ``v4``, 1 ``v41``, 2 ``v41_fp4``)."""
    return _row_at(V4_TRITON_STEPS[encoding], n)


# The fused paged byte gather (kernels/triton/paged_plan.py, the vLLM face's gathers): (max n rows,
# bytes per program, num_warps) by increasing n; a program takes the power of two of rows nearest
# below its bytes over the row's bytes (1 to 128). Rows of a size class share a shape, so the table
# is in bytes. Measured (sweep below, every shape checked first): 1152-byte rows one per program to
# 1024 rows (n=1024: 2.37 us against 3.28 for four), four from there (n=65536: 39.7-39.9 us for
# 4-8 rows, 45.5 for two); the indexer's 132-byte rows 16 per program to 1024 rows (1.43 us against
# 1.86 for one), 32 from there (n=65536: 6.29 us against 7.02 for 64, 11.84 for 8).
PAGED_GATHER_STEPS: tuple[tuple[int | None, int, int], ...] = (
    (64, 1152, 4),
    (1024, 2200, 4),
    (None, 4608, 4),
)
PAGED_GATHER_MEASURED = "NVIDIA H200, 2026-12-02 17:41 UTC: `python -m mlakv.bench.vllm_ops --sweep --ops gather,upconvert --sizes 1,64,1024,16384,65536`"
# The launch shapes the sweep times: (rows per program, num_warps).
PAGED_GATHER_SWEEP: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 4), (2, 4), (4, 4), (8, 4), (8, 8), (16, 4), (16, 8), (32, 4), (64, 4), (64, 8),
)  # fmt: skip
_PAGED_GATHER_MAX_ROWS = 128


def paged_gather_launch(n: int, row_bytes: int) -> tuple[int, int]:
    """``(rows_per_program, num_warps)`` of the fused paged gather for ``n`` output rows of ``row_bytes``."""
    per_program, warps = _row_at(PAGED_GATHER_STEPS, n)
    rows = max(1, min(per_program // max(row_bytes, 1), _PAGED_GATHER_MAX_ROWS))
    return 1 << (rows.bit_length() - 1), warps


# The DSA indexer K cache's Triton store (kernels/triton/indexer.py, one [keys, 128] block per
# program): (max n, num_warps, keys per program (a power of two)) by increasing n: the fastest
# shapes of `mlakv bench indexer --triton-sweep` (every shape of INDEXER_TRITON_SWEEP, each checked
# bit-exact first; docs/h200-2026-12-02/run6/indexer_triton_sweep.md), measured on the store before it
# took the hardware e4m3 conversion (2026-12-03). With these rows the converting store measured 0.81-0.98x
# the JIT store's time at every n of `mlakv bench parity` (docs/h200-2026-12-03/run7); the sweep has not
# been re-run on it.
INDEXER_TRITON_STEPS: tuple[tuple[int | None, int, int], ...] = ((1024, 4, 4), (4096, 1, 4), (16384, 8, 16), (None, 8, 64))
INDEXER_TRITON_MEASURED = (
    "NVIDIA H200, 2026-12-02 23:07 UTC: `mlakv bench indexer --sizes 1,64,1024,4096,16384,65536 --triton-sweep`"
)
# The launch shapes the sweep times: (num_warps, keys per program).
INDEXER_TRITON_SWEEP: tuple[tuple[int, int], ...] = tuple(
    (warps, keys) for warps in (1, 2, 4, 8) for keys in (4, 8, 16, 32, 64)
)


def indexer_triton_launch(n: int) -> tuple[int, int]:
    """``(num_warps, keys_per_program)`` of the Triton indexer K store for ``n`` keys."""
    return _row_at(INDEXER_TRITON_STEPS, n)


# The row move's Triton kernels (kernels/triton/move.py; what a move does: mlakv.ops.move), one launch over
# every layer; per kernel, (max n, *launch shape) by increasing n (the rows a call moves in each layer):
# * "direct" (disjoint sets, one program per (row, layer)): (num_warps, block words at most); a row is
#   copied in blocks of next_pow2(min(row words, that bound)) words (a power of two).
# * "staged" (any sets, one program per (layer, column block) that loops over every row twice, through
#   a scratch): (num_warps, rows per step, column words per program), both powers of two; the grid is
#   layers x ceil(row words / column words).
# Measured (NVIDIA H200, 61 layers of 65536 bf16 512+64 slots, every shape checked bit-exact against the
# torch move first): direct takes one warp per program from 9 rows (n=4096: 157 us against 176 for the
# old 4 warps); staged takes 64 rows a step and 16-word columns from 9 rows (n=4096: 345 us against 608
# for the old 16 rows x 32 words), 8 warps at 8 rows and from 65 (2 warps between, within 1 % of 8).
MOVE_TRITON_STEPS: dict[str, tuple[tuple[int | None, ...], ...]] = {
    "direct": ((8, 4, 1024), (None, 1, 1024)),
    "staged": ((8, 8, 16, 16), (64, 2, 64, 16), (None, 8, 64, 16)),
}
MOVE_TRITON_MEASURED = "NVIDIA H200, 2026-12-03 04:42 UTC: `python -m mlakv.bench.move_kv --sweep` (docs/h200-2026-12-03/run8)"
# The launch shapes the sweep times, per kernel: direct (num_warps, block words at most); staged
# (num_warps, rows per step, column words).
MOVE_TRITON_SWEEP: dict[str, tuple[tuple[int, ...], ...]] = {
    "direct": tuple((warps, block) for warps in (1, 2, 4, 8) for block in (64, 1024)),
    "staged": tuple((warps, rows, cols) for warps in (1, 2, 4, 8) for rows in (16, 64) for cols in (16, 32)),
}


def move_triton_launch(kind: str, n: int) -> tuple[int, ...]:
    """The launch shape of the Triton row move's ``kind`` kernel for a call moving ``n`` rows per layer:
    ``"direct"``: ``(num_warps, block words at most)``; ``"staged"``: ``(num_warps, rows per step,
    column words)``."""
    return _row_at(MOVE_TRITON_STEPS[kind], n)


# HiCache's device <-> pinned host copy (kernels/triton/transfer.py, one launch per layer of a transfer):
# (max bytes one launch moves, num_warps, tile words) by increasing bytes. A program of the persistent
# grid moves a tile of up to that many words per loop iteration (all the tile's loads, then its
# stores), so warps and tile decide the bytes in flight over PCIe; the grid's size (at most
# max_programs, default 8) is the SM budget a transfer may take from attention, the caller's
# decision, not this table's. Keyed by bytes, not units, since a unit is a row or a whole page.
# Measured (NVIDIA H200 over PCIe, 8 SMs, 1024 and 16384 pages of 64 x 1152 bytes, three layouts): every
# shape from 8 warps x 8192 words up moves 45-46 GB/s (1024 pages) and 50-51 GB/s (16384), 90-93 % of
# the measured PCIe ceiling; smaller tiles lose up to half on page_first loads. The fastest by the
# round trip is 8 warps x 8192 words, within 0.5 % of the old 16 x 8192 (noise at this bound).
HICACHE_COPY_STEPS: tuple[tuple[int | None, int, int], ...] = ((None, 8, 8192),)
HICACHE_COPY_MEASURED = "NVIDIA H200, 2026-12-03 04:43 UTC: `mlakv bench hicache --pages 1024,16384 --sweep` (docs/h200-2026-12-03/run8)"
# The launch shapes the sweep times: (num_warps, tile words), 8 to 32 words a thread.
HICACHE_COPY_SWEEP: tuple[tuple[int, int], ...] = (
    (4, 2048), (4, 4096), (8, 4096), (8, 8192), (16, 4096), (16, 8192), (16, 16384), (32, 8192), (32, 16384),
    (32, 32768),
)  # fmt: skip


def hicache_copy_launch(nbytes: int) -> tuple[int, int]:
    """``(num_warps, tile_words)`` of the HiCache copy kernel for a launch moving ``nbytes`` bytes."""
    return _row_at(HICACHE_COPY_STEPS, nbytes, "max bytes")
