"""Row-write benchmark (``mlakv bench``): every provider side by side, against the roofline.

Method (GPU): for each (layout, n_loc), 8 layers' inputs (sources, loc and a kv buffer each) are
written one after another inside one CUDA graph; ``do_bench_cudagraph`` gives the median replay
time, divided by 8 for the per-call time, taken twice (providers in forward, then reverse order)
and averaged. Each provider is checked bit-exactly against the torch reference before it is timed;
a wrong provider is reported, never timed. For n_loc >= 1024 a cold median (L2 flushed between
calls) is taken too. The same run measures the device-to-device copy bandwidth (bytes read +
written) and the graph time of a one-element kernel; the launch floor is the faster of that and the
fastest call measured (:func:`launch_floor_us`), and the roofline of a call is the larger of the
launch floor and the bytes it moves at copy bandwidth.

With ``--triton-sweep`` (GPU) it also times the Triton row kernel alone at every launch shape
(num_warps 1/2/4/8 x rows per program 1/2/4/8 x the PDL trigger at entry or after the stores), each
shape checked bit-exactly first the same way (a wrong one shows WRONG and is not timed), at each
layout and n_loc of the run; the report gives per point the fastest shape, the runner-up and the
launch table's current choice, then the ``mlakv.spec.tuning.TRITON_ROW_STEPS`` rows the fastest
shapes make, per layout (results.json keeps every time under ``triton_sweep``).

Without a GPU it times the CPU (torch) path and says so: both CPU providers are torch indexing
copies (the dispatcher adds its argument checks), so the table shows their spread (min / median /
max over repeats) and ranks nothing; ``--triton-sweep`` is reported as not run.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import mlakv
from mlakv.mem_cache import MLATokenToKVPool, kv_write_path, set_mla_kv_buffer_torch, set_mla_kv_buffer_triton
from mlakv.spec.tuning import triton_row_launch

from .options import (
    CPU_PROVIDERS,
    CPU_QUICK_SIZES,
    CPU_SIZES,
    DEFAULT_SIZES,
    PROVIDERS,
    QUICK_SIZES,
)
from .options import kv_write_parser as build_parser
from .report import PARTIAL_NOTE, launch_grid, table_steps
from .timing import (
    INPUT_SETS,
    cold_median_us,
    copy_bandwidth_gbs,
    graph_median_us,
    host_rounds_us,
    one_element_graph_us,
    on_progress,
    progress,
    rotating,
)

LAYOUTS = {
    "bf16": (torch.bfloat16, 512, 64),
    "fp16": (torch.float16, 512, 64),
    "u8": (torch.uint8, 528, 128),
}
LAYERS = INPUT_SETS  # input sets per timed graph (one per layer), so sources do not sit in L2
CPU_LABEL = "CPU (torch path; GPU numbers need a GPU)"


# ---- providers ---------------------------------------------------------------------------------
def set_mla_kv_buffer_torch_index_put(kv, loc, nope, rope) -> None:
    """The ``torch`` provider: two ``index_put_`` calls (no padding support, as engines did).

    ``kv [S, (1,) nope_dim + rope_dim]``, ``loc [n]``, ``nope [n, nope_dim]``, ``rope [n, rope_dim]``.
    """
    kv2 = kv.view(kv.shape[0], -1)
    d = nope.shape[-1]
    kv2[:, :d].index_put_((loc,), nope)
    kv2[:, d : d + rope.shape[-1]].index_put_((loc,), rope)


def provider_fn(name: str, jit_kw: Optional[dict] = None) -> Callable:
    """The write function ``fn(kv, loc, nope, rope)`` of a provider (``jit-*`` variants take ``jit_kw``)."""
    if name == "auto":
        return set_mla_kv_buffer_triton
    if name == "torch":
        return set_mla_kv_buffer_torch_index_put
    if name == "triton":
        from mlakv.kernels.triton.row_write import launch_set_kv_rows

        return launch_set_kv_rows
    if name == "legacy":
        from .legacy_kernel import legacy_set_mla_kv_buffer

        return legacy_set_mla_kv_buffer
    if name == "sglang":
        from .sglang_peer import sglang_set_mla_kv_buffer

        return sglang_set_mla_kv_buffer
    if name.startswith("jit"):
        from mlakv import jit_kernel

        kw = dict(jit_kw or {})

        def run(kv, loc, nope, rope):
            jit_kernel.set_mla_kv_buffer(kv, loc, nope, rope, **kw)

        return run
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def provider_unavailable(name: str, layout: tuple) -> Optional[str]:
    """None if the provider can run here for ``layout``, else why not (one line)."""
    base = "jit" if name.startswith("jit") else name
    if base == "sglang":
        from .sglang_peer import peer_absent_reason

        absent = peer_absent_reason()
        if absent:
            return absent
    if not torch.cuda.is_available():
        return None if base in CPU_PROVIDERS else "needs a CUDA GPU (none here)"
    dtype, nd, rd = layout
    es = torch.empty((), dtype=dtype).element_size()
    if base == "jit":
        from mlakv import jit_kernel

        if not jit_kernel.can_use_set_mla_kv_buffer(nd * es, rd * es):
            return "JIT kernel unavailable here (the log says why)"
    if base == "sglang":
        from mlakv.jit_kernel import JitUnavailable

        from .sglang_peer import build_sglang_module

        if torch.cuda.get_device_capability()[0] < 9:
            return "sglang's kernel needs SM90+"
        try:
            progress(f"building sglang's kernel for {nd * es}+{rd * es} bytes (first use compiles, ~1 min)")
            build_sglang_module(nd * es, rd * es, use_pdl=True)
        except JitUnavailable as e:
            return f"sglang build failed: {e}"
    return None


# ---- inputs ----------------------------------------------------------------------------------
@dataclass
class LayerInputs:
    """One layer's call: ``kv [S, 1, total]``, ``loc [n]`` (distinct, random), ``nope``, ``rope``."""

    kv: torch.Tensor
    loc: torch.Tensor
    nope: torch.Tensor
    rope: torch.Tensor


def make_layers(layout: tuple, n_loc: int, loc_dtype: torch.dtype, device, layers: int) -> list[LayerInputs]:
    """``layers`` independent random inputs of ``n_loc`` rows (the kv buffers hold random bytes)."""
    dtype, nd, rd = layout
    out = []
    num_slots = n_loc + 64
    for _ in range(layers):
        if dtype == torch.uint8:
            nope = torch.randint(0, 256, (n_loc, nd), dtype=dtype, device=device)
            rope = torch.randint(0, 256, (n_loc, rd), dtype=dtype, device=device)
        else:
            nope = torch.randn(n_loc, nd, device=device).to(dtype)
            rope = torch.randn(n_loc, rd, device=device).to(dtype)
        kv = torch.empty((num_slots, 1, nd + rd), dtype=dtype, device=device)
        kv.view(torch.uint8).random_(0, 256)
        loc = torch.randperm(num_slots, device=device)[:n_loc].to(loc_dtype)
        out.append(LayerInputs(kv, loc, nope, rope))
    return out


def check_provider(fn: Callable, inp: LayerInputs) -> Optional[str]:
    """Bit-exact check against the torch reference on a fresh poisoned copy; None if correct."""
    expected = inp.kv.clone()
    set_mla_kv_buffer_torch(expected, inp.loc, inp.nope, inp.rope)
    got = inp.kv.clone()
    fn(got, inp.loc, inp.nope, inp.rope)
    if got.is_cuda:
        torch.cuda.synchronize()
    a, b = got.view(torch.uint8), expected.view(torch.uint8)
    if torch.equal(a, b):
        return None
    bad = (a != b).reshape(a.shape[0], -1).any(dim=1).sum().item()
    return f"WRONG: {bad} rows differ from the reference"


# ---- timing (mlakv.bench.timing) -------------------------------------------------------------
def _graph_time_per_call_us(fn: Callable, layers: list[LayerInputs]) -> float:
    """CUDA-graph median per call of ``fn`` over the layers' input sets, one call each per replay."""
    return graph_median_us(rotating(fn, [(i.kv, i.loc, i.nope, i.rope) for i in layers]), calls=len(layers))


# ---- the sweep -------------------------------------------------------------------------------
@dataclass
class Row:
    """One (layout, loc dtype, n_loc) point: per-provider medians, spreads and reasons."""

    layout: str
    n_loc: int
    loc_dtype: str
    path: str
    times_us: dict = field(default_factory=dict)  # provider -> median per call
    spread_us: dict = field(default_factory=dict)  # provider -> [min, median, max] over repeats
    cold_us: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # provider -> why not timed (WRONG/ERROR: a failure)

    def bytes_moved(self) -> int:
        """Bytes read plus bytes written by one call."""
        dtype, nd, rd = LAYOUTS[self.layout]
        es = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_loc * (nd + rd) * es

    def roofline_us(self, copy_gbs: float, tiny_us: float) -> float:
        """The fastest a call can be: max(launch floor, its bytes at copy bandwidth)."""
        return max(tiny_us, self.bytes_moved() / (copy_gbs * 1e9) * 1e6)


def run_sweep(
    layouts: list[str],
    sizes: list[int],
    providers: list[str],
    loc_dtypes: list[torch.dtype],
    cold: bool,
    jit_variants: Optional[dict] = None,
    into: Optional[list[Row]] = None,
) -> list[Row]:
    """Check then time each provider at each point; providers that cannot run are left out.

    Each finished row is appended to ``into`` (a new list by default) as soon as it is measured, so
    a caller that is interrupted keeps the rows done so far; returns that list.
    """
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows: list[Row] = [] if into is None else into
    variants = {p: None for p in providers}
    variants.update(jit_variants or {})
    for lname in layouts:
        layout = LAYOUTS[lname]
        progress(f"layout {lname} ({layout[1]}+{layout[2]} {str(layout[0]).split('.')[-1]}): sizes {sizes}")
        for loc_dtype in loc_dtypes:
            for n in sizes:
                layers = make_layers(layout, n, loc_dtype, device, LAYERS if cuda else 1)
                i0 = layers[0]
                row = Row(lname, n, str(loc_dtype).split(".")[-1], kv_write_path(i0.kv, i0.loc, i0.nope, i0.rope))
                timed_fns = {}
                for p, kw in variants.items():
                    fn = provider_fn("jit" if p.startswith("jit") else p, kw)
                    try:
                        err = check_provider(fn, i0)
                    except Exception as e:  # noqa: BLE001 - reported, not timed
                        err = f"ERROR: {type(e).__name__}: {e}"
                    if err:
                        row.errors[p] = err
                    else:
                        timed_fns[p] = fn
                if cuda:
                    # Two passes, forward then reverse order, and the mean of the two medians:
                    # at ~1 us per call, the position in the sequence alone moved medians by ~0.3 us.
                    order = list(timed_fns)
                    first = {p: _graph_time_per_call_us(timed_fns[p], layers) for p in order}
                    second = {p: _graph_time_per_call_us(timed_fns[p], layers) for p in reversed(order)}
                    for p in order:
                        row.times_us[p] = (first[p] + second[p]) / 2
                        row.spread_us[p] = [min(first[p], second[p]), row.times_us[p], max(first[p], second[p])]
                    if cold and n >= 1024:
                        row.cold_us = {p: cold_median_us(lambda f=timed_fns[p]: f(i0.kv, i0.loc, i0.nope, i0.rope)) for p in order}
                else:
                    # Round-robin over the providers, so drift hits them alike.
                    samples: dict[str, list[float]] = {p: [] for p in timed_fns}
                    for _ in range(7):
                        for p, f in timed_fns.items():
                            samples[p] += host_rounds_us(lambda f=f: f(i0.kv, i0.loc, i0.nope, i0.rope), n=10, rounds=1)
                    for p, v in samples.items():
                        row.times_us[p] = statistics.median(v)
                        row.spread_us[p] = [min(v), statistics.median(v), max(v)]
                rows.append(row)  # before the progress line: a Ctrl-C after the line keeps this row
                progress(f"  {lname} {row.loc_dtype} n_loc={n}: " + ", ".join(f"{k}={v:.2f}us" for k, v in row.times_us.items()))
                del layers
                if cuda:
                    torch.cuda.empty_cache()
    return rows


# ---- the Triton launch sweep (--triton-sweep) -----------------------------------------------
# The launch overrides timed: every shape the table names for the benched layouts (its warps are
# clamp(BLOCK bytes / bytes per warp, 1, 8), a power of two; its rows per program bytes per program /
# BLOCK bytes, 1-8 for 8 KB programs of 1024- and 2048-byte blocks).
TRITON_SWEEP_WARPS = (1, 2, 4, 8)
TRITON_SWEEP_ROWS = (1, 2, 4, 8)
TRITON_SWEEP_TRIGGER = (True, False)  # the PDL trigger at program entry, or after the stores


def triton_sweep_shapes() -> list[tuple[int, int, bool]]:
    """``(num_warps, rows_per_program, early_trigger)`` in the order they are timed, which is also the
    order a tie in time falls back on (fewer warps, then fewer rows, then the trigger at entry; see
    :func:`_fastest_order`)."""
    grid = launch_grid(
        num_warps=TRITON_SWEEP_WARPS, rows_per_program=TRITON_SWEEP_ROWS, early_trigger=TRITON_SWEEP_TRIGGER
    )
    return [(g["num_warps"], g["rows_per_program"], g["early_trigger"]) for g in grid]


def _shape_key(warps: int, rows: int, early: bool) -> str:
    """``w4r2e``: 4 warps, 2 rows per program, PDL trigger at entry (``l``: after the stores); the
    FP8 tune's spelling, so the two reports read alike."""
    return f"w{warps}r{rows}{'e' if early else 'l'}"


def _parse_shape_key(key: str) -> tuple[int, int, bool]:
    """``w4r2e`` -> ``(4, 2, True)``: the inverse of :func:`_shape_key` (results.json holds keys)."""
    w, _, r = key[1:-1].partition("r")
    return int(w), int(r), key[-1] == "e"


def _block_bytes(layout: tuple) -> int:
    """The row kernel's ``BLOCK`` in bytes for ``layout``: next_pow2(row width) elements, what the
    table's bytes per warp divide (``row_write.row_kernel_block``, without importing Triton)."""
    dtype, nd, rd = layout
    return (1 << (nd + rd - 1).bit_length()) * torch.empty((), dtype=dtype).element_size()


def _sweep_write(warps: int, rows: int, early: bool) -> Callable:
    """The Triton row kernel at one launch shape, as a provider's write ``fn(kv, loc, nope, rope)``."""
    from mlakv.kernels.triton.row_write import launch_set_kv_rows

    return functools.partial(launch_set_kv_rows, num_warps=warps, rows_per_program=rows, early_trigger=early)


def _checked_shapes(
    inp: LayerInputs, shapes: list[tuple[int, int, bool]]
) -> tuple[dict[str, Callable], dict[str, str]]:
    """Each shape's write checked bit-exactly against the reference (:func:`check_provider`): the
    writes to time by key, and why the others are not (``WRONG: ...`` / ``ERROR: ...``)."""
    fns: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    for warps, rows, early in shapes:
        key, fn = _shape_key(warps, rows, early), _sweep_write(warps, rows, early)
        try:
            err = check_provider(fn, inp)
        except Exception as e:  # noqa: BLE001 - reported, not timed
            err = f"ERROR: {type(e).__name__}: {e}"
        if err:
            errors[key] = err
        else:
            fns[key] = fn
    return fns, errors


def run_triton_sweep(
    layouts: list[str], sizes: list[int], into: Optional[dict] = None, device: str = "cuda", layers: int = LAYERS
) -> dict:
    """Check, then time the Triton row kernel at every :func:`triton_sweep_shapes` shape per layout and n_loc.

    Returns ``into`` (a new dict by default), filled as each point is measured so an interrupted run
    keeps the points done: ``{"pdl": bool, "layouts": {layout: {"block_bytes": B, "sizes": {"<n>":
    {"table": key, "times_us": {key: us}, "errors": {key: why}}}}}}``; ``table`` is the launch
    table's current shape (:func:`mlakv.spec.tuning.triton_row_launch`), timed too if the grid lacks it.
    Times are the provider sweep's: CUDA-graph median per call over ``layers`` input sets, the mean of
    a forward and a reverse pass over the shapes (the position in the sequence alone moves ~1 us
    medians). ``device``: where the inputs live; the checks also run on CPU tensors under
    ``TRITON_INTERPRET=1``, the timing needs CUDA.
    """
    res: dict = {} if into is None else into
    if device == "cuda":
        from mlakv.kernels.triton.common import pdl_supported

        pdl = pdl_supported(torch.cuda.current_device())
    else:
        pdl = False
    res.update(pdl=pdl, layouts=res.get("layouts", {}))
    grid = triton_sweep_shapes()
    for lname in layouts:
        layout = LAYOUTS[lname]
        block = _block_bytes(layout)
        by_n = res["layouts"].setdefault(lname, {"block_bytes": block, "sizes": {}})["sizes"]
        progress(f"Triton launch sweep, {lname} (BLOCK {block} bytes): {len(grid)} shapes at n_loc {sizes}")
        for n in sizes:
            table = triton_row_launch(n, block)
            shapes = grid + ([table] if table not in grid else [])
            inputs = make_layers(layout, n, torch.int64, device, layers)
            fns, errors = _checked_shapes(inputs[0], shapes)
            order = list(fns)
            first = {k: _graph_time_per_call_us(fns[k], inputs) for k in order}
            second = {k: _graph_time_per_call_us(fns[k], inputs) for k in reversed(order)}
            by_n[str(n)] = {"table": _shape_key(*table), "times_us": {k: (first[k] + second[k]) / 2 for k in order},
                            "errors": errors}  # fmt: skip
            ranked = _fastest_order(by_n[str(n)]["times_us"], None)
            if ranked:
                progress(f"  {lname} n_loc={n}: fastest {ranked[0]} {by_n[str(n)]['times_us'][ranked[0]]:.2f} us"
                         + (f"; {len(errors)} shapes wrong" if errors else ""))  # fmt: skip
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    return res


def _fastest_order(times: dict[str, float], prev: Optional[str]) -> list[str]:
    """Shape keys by time, fastest first. Shapes equal at the report's precision (0.01 us) are one
    result to the reader: among them ``prev`` (the smaller size's winner) goes first, since a tie is
    no reason for a new table row, then the sweep's order (fewest warps, fewest rows, entry trigger)."""
    rank = {_shape_key(*s): i for i, s in enumerate(triton_sweep_shapes())}
    return sorted(times, key=lambda k: (round(times[k], 2), k != prev, rank.get(k, len(rank)), k))


def _triton_row_steps(best: list[tuple[int, str]], block_bytes: int) -> list[tuple]:
    """``[(n_loc, fastest key), ...]`` by increasing n_loc -> ``TRITON_ROW_STEPS`` rows ``(max n_loc,
    bytes per warp, bytes per program, trigger at entry)``: one row per size where the shape changes,
    equal neighbours merged, the last open (None). Warps become bytes per warp = ``block_bytes //
    warps`` and rows bytes per program = ``rows * block_bytes``, the table's units, which give the
    same shape back for this layout's BLOCK only."""
    shapes = []
    for n, key in best:
        warps, rows, early = _parse_shape_key(key)
        shapes.append((n, (max(1, block_bytes // warps), rows * block_bytes, early)))
    return table_steps(shapes)


def format_triton_sweep(sweep: dict) -> str:
    """The report's section of a ``--triton-sweep``: per layout and n_loc the fastest shape and its
    time, the runner-up, the table's current choice and its time, the shapes found wrong; then per
    layout the ``TRITON_ROW_STEPS`` rows the fastest shapes make. A run without a GPU says why not."""
    lines = ["", "## Triton row kernel launch sweep (`--triton-sweep`)"]
    if sweep.get("not_run"):
        return "\n".join([*lines, f"not run: {sweep['not_run']}"])
    lines.append(
        "us per call (CUDA-graph median, mean of two passes), each shape checked bit-exact first; shape wWrR + e|l: "
        "W warps, R rows per program, the PDL trigger at program entry (e) or after the stores (l); table: the "
        "launch table's current choice (mlakv.spec.tuning.TRITON_ROW_STEPS)"
        + ("" if sweep.get("pdl") else "; PDL is off on this device, so e and l run alike")
    )
    for lname, lay in sweep.get("layouts", {}).items():
        block = lay["block_bytes"]
        dtype, nd, rd = LAYOUTS[lname]
        head = ["n_loc", "fastest", "us", "next", "us", "table", "us", "table / fastest", "wrong"]
        lines += ["", f"### {lname} {nd}+{rd} (BLOCK {block} bytes)", *_table_head("", head)[1:]]
        best: list[tuple[int, str]] = []
        wrong_notes: list[str] = []
        prev = None
        for n in sorted(lay["sizes"], key=int):
            point = lay["sizes"][n]
            times, errors, table = point["times_us"], point["errors"], point["table"]
            ranked = _fastest_order(times, prev)
            wrong = ", ".join(errors) or "-"
            wrong_notes += [f"- n_loc={n} {k}: {e}" for k, e in errors.items()]
            t_table = f"{times[table]:.2f}" if table in times else ("WRONG" if table in errors else "-")
            if not ranked:
                lines.append(f"| {n} | - | - | - | - | {table} | {t_table} | - | {wrong} |")
                continue
            k0 = ranked[0]
            k1 = ranked[1] if len(ranked) > 1 else None
            nxt = f"{k1} | {times[k1]:.2f}" if k1 else "- | -"
            vs = f"{times[table] / times[k0]:.2f}x" if table in times else "-"
            lines.append(f"| {n} | {k0} | {times[k0]:.2f} | {nxt} | {table} | {t_table} | {vs} | {wrong} |")
            best.append((int(n), k0))
            prev = k0
        if wrong_notes:
            lines += ["", "shapes reported wrong (not timed):", *wrong_notes]
        if best:
            lines += ["", f"TRITON_ROW_STEPS rows the fastest shapes make, for {lname} {nd}+{rd} (bytes per warp = "
                      f"{block} // warps, bytes per program = rows x {block}; another BLOCK reads them as other "
                      "shapes):", "",
                      f"    {tuple(_triton_row_steps(best, block))!r}"]  # fmt: skip
    return "\n".join(lines)


def _triton_sweep_wrong(sweep: Optional[dict]) -> bool:
    """Whether a swept launch shape wrote something other than the reference (or failed)."""
    layouts = (sweep or {}).get("layouts", {}).values()
    return any(point["errors"] for lay in layouts for point in lay["sizes"].values())


def host_costs() -> dict:
    """Eager host cost per call (µs, median of 5 rounds) of ``pool.set_kv_buffer`` and the entries, n_loc=1."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for lname in ("bf16", "u8"):
        dtype, nd, rd = LAYOUTS[lname]
        pool_dtype = torch.float8_e4m3fn if dtype == torch.uint8 else dtype
        pool = MLATokenToKVPool(4096, 1, pool_dtype, nd, rd, 1, device)
        loc = torch.arange(1, 2, device=device)
        es = torch.empty((), dtype=pool_dtype).element_size()
        nope = torch.randint(0, 256, (1, nd * es), dtype=torch.uint8, device=device).view(pool_dtype)
        rope = torch.randint(0, 256, (1, rd * es), dtype=torch.uint8, device=device).view(pool_dtype)
        med = lambda call: statistics.median(host_rounds_us(call))  # noqa: E731
        out[f"pool.set_kv_buffer[{lname}, n_loc=1]"] = med(lambda: pool.set_kv_buffer(0, loc, nope, rope))
        kv = pool.kv_buffer[0]
        n8, r8 = nope.view(kv.dtype), rope.view(kv.dtype)
        out[f"set_mla_kv_buffer_triton[{lname}, n_loc=1] -> {kv_write_path(kv, loc, n8, r8)}"] = med(
            lambda: set_mla_kv_buffer_triton(kv, loc, n8, r8)
        )
        if torch.cuda.is_available():
            from mlakv import jit_kernel
            from mlakv.kernels.triton.row_write import launch_set_kv_rows

            out[f"triton row kernel launch alone[{lname}, n_loc=1]"] = med(lambda: launch_set_kv_rows(kv, loc, n8, r8))
            if jit_kernel.can_use_set_mla_kv_buffer(nd * es, rd * es):
                out[f"jit_kernel.set_mla_kv_buffer (checked entry)[{lname}, n_loc=1]"] = med(
                    lambda: jit_kernel.set_mla_kv_buffer(kv, loc, n8, r8)
                )
    return out


def launch_floor_us(rows: list[Row], one_element_us: float) -> float:
    """The launch floor a call is read against: the faster of a one-element kernel in a graph and the
    fastest call measured in this run (any provider, any size).

    A plain one-element kernel is not a true floor: row kernels that trigger their dependents early
    (PDL) overlap the next launch and ran below it on the H100 (0.69 vs 1.18 µs), which read as
    over 100 % of a roofline built on it. No call is faster than the launch floor, so the fastest
    one measured bounds it from above.
    """
    times = [t for r in rows for t in r.times_us.values()]
    return min([one_element_us, *times])


# ---- report ----------------------------------------------------------------------------------
def _table_head(note: str, head: list[str]) -> list[str]:
    """A table's first lines: the note above it, the header row and the separator."""
    return [note, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def format_table(rows: list[Row], providers: list[str], copy_gbs: Optional[float], tiny_us: Optional[float]) -> str:
    """Markdown table of the sweep. On CPU: median [min-max] per provider and no ranking."""
    if copy_gbs is None or tiny_us is None:
        head = ["layout", "loc", "n_loc", "path"] + [f"{p} median [min-max]" for p in providers] + ["auto GB/s"]
        lines = _table_head(
            f"{CPU_LABEL}: host wall time per call, us, over 7 round-robin repeats. auto = the dispatcher "
            "(argument checks + the torch reference copy), torch = two bare index_put_: on CPU this measures "
            "host overhead, not a kernel, so nothing is ranked.",
            head,
        )
        for r in rows:
            cells = [r.layout, r.loc_dtype, str(r.n_loc), r.path]
            for p in providers:
                lo, med, hi = r.spread_us.get(p, (None, None, None))
                cells.append(f"{med:.2f} [{lo:.2f}-{hi:.2f}]" if med is not None else _why_cell(r, p))
            auto = r.times_us.get("auto")
            cells.append(f"{r.bytes_moved() / (auto * 1e-6) / 1e9:.2f}" if auto else "-")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    head = ["layout", "loc", "n_loc", "path"] + providers + ["best", "auto/best", "roofline", "auto %roofline", "auto GB/s"]
    if "sglang" in providers:
        head.append("sglang/auto")
    if "legacy" in providers:
        head.append("legacy/auto")
    lines = _table_head(
        "us per call (CUDA-graph median, mean of two passes); roofline = max(launch floor, bytes at copy bandwidth); "
        "best leaves out the provider auto dispatched to (`path`: the same kernel)",
        head,
    )
    for r in rows:
        cells = [r.layout, r.loc_dtype, str(r.n_loc), r.path]
        cells += [f"{r.times_us[p]:.2f}" if p in r.times_us else _why_cell(r, p) for p in providers]
        timed = r.times_us
        # The provider auto dispatched to runs the same kernel as auto: not a rival, never "best".
        rivals = {p: t for p, t in timed.items() if not (p == r.path and "auto" in timed)}
        best = min(rivals, key=rivals.get) if rivals else None
        auto = timed.get("auto")
        roof = r.roofline_us(copy_gbs, tiny_us)
        cells.append(best or "-")
        cells.append(f"{auto / timed[best]:.2f}" if auto and best else "-")
        cells.append(f"{roof:.2f}")
        cells.append(f"{100 * roof / auto:.0f}%" if auto else "-")
        cells.append(f"{r.bytes_moved() / (auto * 1e-6) / 1e9:.0f}" if auto else "-")
        for peer in ("sglang", "legacy"):
            if peer in providers:
                t = timed.get(peer)
                cells.append(f"{t / auto:.2f}" if t and auto else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _why_cell(r: Row, p: str) -> str:
    return "wrong" if r.errors.get(p, "").startswith(("WRONG", "ERROR")) else "-"


def plot(
    rows: list[Row], providers: list[str], copy_gbs: Optional[float], tiny_us: Optional[float], path: Path, device: str
) -> Optional[str]:
    """Write the log-log plot; returns a note instead when matplotlib is missing or nothing was timed.

    GPU: top row µs per call with the roofline, bottom row % of roofline per provider. CPU: the
    median with its min-max band, titled as a CPU run.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'mlakv[plot]')"
    layouts = [l for l in LAYOUTS if any(r.layout == l and r.times_us for r in rows)]
    if not layouts:
        return "nothing was timed: no plot"
    gpu = copy_gbs is not None and tiny_us is not None
    nrows = 2 if gpu else 1
    fig, axes = plt.subplots(nrows, len(layouts), figsize=(6 * len(layouts), 4.2 * nrows), squeeze=False)
    for col, lname in enumerate(layouts):
        lrows = [r for r in rows if r.layout == lname and r.loc_dtype == "int64"] or [r for r in rows if r.layout == lname]
        ax = axes[0][col]
        for p in providers:
            pts = [(r.n_loc, *r.spread_us[p]) for r in lrows if p in r.spread_us]
            if not pts:
                continue
            xs, lo, med, hi = zip(*pts)
            (line,) = ax.plot(xs, med, marker="o", ms=3, label=p)
            if not gpu:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        if gpu:  # drawn densely, so the knee between the launch and bandwidth floors shows
            lo_n, hi_n = min(r.n_loc for r in lrows), max(r.n_loc for r in lrows)
            dense = sorted({round(lo_n * (hi_n / lo_n) ** (i / 199)) for i in range(200)})
            roof = [Row(lname, n, "int64", "").roofline_us(copy_gbs, tiny_us) for n in dense]
            ax.plot(dense, roof, "k--", lw=1, label="roofline: max(launch floor, bytes / copy bandwidth)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n_loc (rows per call)")
        ax.set_ylabel("µs per call" + ("" if gpu else " (median, min-max band)"))
        ax.set_title(f"{lname} {LAYOUTS[lname][1]}+{LAYOUTS[lname][2]}" + ("" if gpu else f" — {CPU_LABEL}"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        if gpu:
            ax2 = axes[1][col]
            for p in providers:
                pts = [(r.n_loc, 100 * r.roofline_us(copy_gbs, tiny_us) / r.times_us[p]) for r in lrows if p in r.times_us]
                if pts:
                    ax2.plot(*zip(*pts), marker="o", ms=3, label=p)
            ax2.axhline(100, color="k", ls="--", lw=1)
            ax2.set_xscale("log")
            ax2.set_ylim(0, 110)
            ax2.set_xlabel("n_loc (rows per call)")
            ax2.set_ylabel("% of roofline")
            ax2.grid(True, which="both", alpha=0.3)
            ax2.legend(fontsize=8)
    fig.suptitle(f"mlakv bench — {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---- command line (the parser: mlakv.bench.options) -------------------------------------------
def _report(rows: list[Row], shown: list[str], providers: list[str], dev: str, cuda: bool, copy_gbs: Optional[float],
            tiny_us: Optional[float], hosts: dict, not_run: dict, interrupted: bool,
            triton_sweep: Optional[dict] = None) -> tuple[str, Optional[float]]:  # fmt: skip
    """The markdown report and the launch floor it used; a ``--triton-sweep``'s results (``triton_sweep``)
    make its last section."""
    floor_us = launch_floor_us(rows, tiny_us) if cuda and tiny_us is not None else None
    lines = [f"# mlakv {mlakv.__version__} bench — {dev} — {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if interrupted:
        lines.append(f"INTERRUPTED (Ctrl-C): the {len(rows)} rows measured before it; the rest of the sweep did not run")
    if cuda and copy_gbs is not None and floor_us is not None:
        lines.append(f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s; launch floor: {floor_us:.2f} us (the faster of a "
                     f"one-element kernel in a graph, {tiny_us:.2f} us, and the fastest call in this run)")  # fmt: skip
    lines.append(format_table(rows, shown, copy_gbs if cuda else None, floor_us))
    if not_run:
        lines.append("\nnot run here:")
        lines += [f"- {p}: {why}" for p, why in not_run.items()]
    cold_rows = [r for r in rows if r.cold_us]
    if cold_rows:
        lines.append("\ncold (L2 flushed, eager, median) us/call")
        lines.append("| layout | n_loc | " + " | ".join(providers) + " |")
        lines.append("|" + "---|" * (2 + len(providers)))
        for r in cold_rows:
            lines.append(f"| {r.layout} | {r.n_loc} | " + " | ".join(f"{r.cold_us[p]:.2f}" if p in r.cold_us else "-" for p in providers) + " |")
    if hosts:
        lines.append("\neager host cost per call (median of 5 rounds, no sync), us")
        lines += [f"- {k}: {v:.2f}" for k, v in hosts.items()]
    wrong = [(r.layout, r.n_loc, p, e) for r in rows for p, e in r.errors.items() if e.startswith(("WRONG", "ERROR"))]
    if wrong:
        lines.append("\nproviders reported wrong (not timed):")
        lines += [f"- {l} n_loc={n} {p}: {e}" for l, n, p, e in wrong]
    if triton_sweep is not None:
        lines.append(format_triton_sweep(triton_sweep))
    return "\n".join(lines), floor_us


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench``: returns 0, 1 when a provider (or a ``--triton-sweep`` launch shape) was wrong, 2 on a
    usage error.

    Ctrl-C writes results.json and report.md with the rows measured so far, then raises
    ``KeyboardInterrupt`` saying so (the command line turns it into one line and exit 130).
    """
    ap = build_parser()
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    t_start = time.time()

    if args.sizes:
        sizes = args.sizes
    elif cuda:
        sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    else:
        sizes = CPU_QUICK_SIZES if args.quick else CPU_SIZES

    not_run = {}
    for p in args.providers:
        reasons = {provider_unavailable(p, LAYOUTS[l]) for l in args.layouts} - {None}
        if reasons:
            not_run[p] = "; ".join(sorted(reasons))
    providers = [p for p in args.providers if p not in not_run]
    for p, why in not_run.items():
        progress(f"provider {p} not run here: {why}")
    if not providers:
        ap.error(f"none of the providers {', '.join(args.providers)} can run here (see above)")

    jit_variants = {}
    if args.tune and cuda and "jit" in providers:
        grid = [(False, w, i) for w in (1, 2, 4, 8, 16) for i in (1, 2)] + [(True, w, 1) for w in (2, 4, 8)]
        for tma, warps, items in grid:
            jit_variants[f"jit-{'tma' if tma else 'st'}-w{warps}-i{items}"] = dict(
                num_warps=warps, items_per_warp=items, use_tma=tma
            )
    shown = providers + sorted(jit_variants)

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    hosts: dict = {}
    copy_gbs = tiny_us = None
    interrupted = False
    triton_sweep: Optional[dict] = None  # filled as measured, so Ctrl-C keeps the points done
    if args.triton_sweep:
        triton_sweep = {} if cuda else {"not_run": "needs a CUDA GPU (none here): the Triton kernel is timed on one"}
    if cuda:
        dev = torch.cuda.get_device_name()
    else:
        dev = f"{CPU_LABEL} [{platform.processor() or platform.machine()}]"

    def save(partial: bool = False) -> tuple[str, Optional[float]]:
        """Write results.json and report.md from what is measured now (``partial``: mid-run, marked so);
        the report and the launch floor it used."""
        report, floor_us = _report(rows, shown, providers, dev, cuda, copy_gbs, tiny_us, hosts, not_run, interrupted,
                                   triton_sweep)  # fmt: skip
        result = dict(
            device=dev, cpu_only=not cuda, torch=torch.__version__, mlakv=mlakv.__version__,
            date=time.strftime("%Y-%m-%d"), copy_gbs=copy_gbs, one_element_kernel_us=tiny_us, launch_floor_us=floor_us,
            rows=[asdict(r) for r in rows], host_cost_us=hosts, not_run=not_run, interrupted=interrupted,
        )  # fmt: skip
        if triton_sweep is not None:
            result["triton_sweep"] = triton_sweep
        if partial:
            result["partial"], report = True, report + PARTIAL_NOTE
        (args.out / "results.json").write_text(json.dumps(result, indent=1))
        (args.out / "report.md").write_text(report + "\n")
        return report, floor_us

    def measured() -> int:
        sweep_layouts = (triton_sweep or {}).get("layouts", {}).values()
        return len(rows) + sum(len(lay["sizes"]) for lay in sweep_layouts)

    written = [0]

    def checkpoint() -> None:  # a run killed outright (no Ctrl-C, no SIGTERM handler) keeps its rows
        kept = measured()
        if kept > written[0]:
            written[0] = kept
            save(partial=True)

    try:
        with on_progress(checkpoint):
            if cuda:
                progress(f"mlakv {mlakv.__version__} bench on {dev}: measuring copy bandwidth and the launch floor")
                copy_gbs, tiny_us = copy_bandwidth_gbs(), one_element_graph_us(LAYERS)
            run_sweep(args.layouts, sizes, providers, [torch.int64], cold=cuda and not args.no_cold,
                      jit_variants=jit_variants, into=rows)  # fmt: skip
            if not args.quick and cuda and "bf16" in args.layouts:
                progress("int32 loc spot check")
                run_sweep(["bf16"], [128, 16384], providers, [torch.int32], cold=False, into=rows)
            if args.triton_sweep and cuda:
                run_triton_sweep(args.layouts, sizes, into=triton_sweep)
            progress("eager host cost per call")
            hosts = host_costs()
    except KeyboardInterrupt:
        interrupted = True

    report, floor_us = save()
    if interrupted:
        n = len(rows)
        raise KeyboardInterrupt(f"{n} row{'s' if n != 1 else ''} measured so far, in {args.out}/results.json and report.md")
    print(report)
    note = plot(rows, shown, copy_gbs, floor_us, args.out / "kv_write_bench.png", dev)
    if note:
        print(note)
    written = "results.json, report.md" + ("" if note else ", kv_write_bench.png")
    progress(f"done in {time.time() - t_start:.0f} s; wrote {written} in {args.out}/")
    wrong = any(e.startswith(("WRONG", "ERROR")) for r in rows for e in r.errors.values())
    return 1 if wrong or _triton_sweep_wrong(triton_sweep) else 0
