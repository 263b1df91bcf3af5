"""Triton against CUDA, every kernel family in one run: the table the "every GPU gets the fast path" goal reads.

Why: GPUs other than Hopper (A100, L40S, consumer cards, AMD) run mlakv's Triton kernels; the goal
is each within 1.15x of the JIT CUDA kernel for the same call at every n. Each family bench already
times its JIT and Triton kernels side by side, every provider checked bit-exact against the
reference before it is timed: the row write (:mod:`.kv_write`), the FP8 write and dequantizing
gather (:mod:`.fp8_bench`), the fused RoPE write (:mod:`.rope_write`), the DeepSeek-V4 family store
(:mod:`.v4_store`) and the DSA indexer store and gather (:mod:`.indexer`). This module runs them at
the same sizes in one process and reads one ratio per (kernel, case, n) out of their results:
``triton / jit`` (a wrong or absent provider shows its reason instead). It is the one bench that
imports other benches (their run functions); they import nothing of it or of each other.

Kernels with no CUDA twin are read against their bytes instead: the converting write (fp32 sources
into a bf16 cache, converted in registers) is timed here beside the JIT byte write of the already
converted rows (the same output) and the call's bytes at copy bandwidth. The move, the HiCache copy
and the vLLM face's paged gathers have their own benches (``python -m mlakv.bench.move_kv``,
``mlakv bench hicache``, ``mlakv bench vllm``).

The plain gather (``kv[loc]`` split into nope and rope; Triton on every GPU) has no JIT twin either: it
is read against torch's CUDA gather of the same rows (``index_select``, one kernel, the same bytes).

The converting write and the gather have their own launch rows (``TRITON_CONVERT_STEPS``,
``TRITON_GATHER_STEPS``). ``--sweep convert,gather`` (``--convert-sweep``: convert) times them at every
launch shape of the row kernel's sweep too, each shape checked bit-exact first, and reports the fastest
per n against the table's shape and the table rows the fastest shapes make.

Timings of one call can differ between runs by more than the goal's margin (the same shape has measured
1.49 us in one run and 2.45 in the next). ``--passes N`` runs the families N times, each pass in the
reverse family order of the one before; each side of a point is the median over the passes, and the
report lists the points where a side's times differ by more than :data:`SPREAD_LIMIT` between passes.

Run: ``python -m mlakv bench parity [--families row,fp8,rope,v4,indexer,convert,gather] [--sizes ...]
[--sweep convert,gather] [--passes N] [--out DIR]``; writes ``parity.json`` and ``parity.md`` under ``--out``.
"""

from __future__ import annotations

import datetime
import functools
import platform
import statistics
from typing import Any, Callable, Optional, Sequence

import torch

from .options import PARITY_FAMILIES, PARITY_LIMIT
from .options import parity_parser as build_parser
from .report import run_on_gpu, table_steps
from .timing import INPUT_SETS, copy_bandwidth_gbs, graph_median_us, progress, rotating

__all__ = ["FAMILIES", "SPREAD_LIMIT", "entry", "ratio_of", "verdict", "merge_passes", "spread", "run_parity",
           "format_tables", "main"]  # fmt: skip

#: a point whose side's times differ between passes by more than this factor (max / min) is listed
SPREAD_LIMIT = 1.10


def entry(family: str, case: str, n: int, jit: Any, triton: Any) -> dict:
    """One measured point: ``jit`` and ``triton`` are µs per call, or a string saying why there is no time."""
    return {"family": family, "case": case, "n": n, "jit": jit, "triton": triton}


def ratio_of(e: dict) -> Optional[float]:
    """``triton / jit`` of a point; None when either side has no time."""
    j, t = e.get("jit"), e.get("triton")
    if isinstance(j, (int, float)) and isinstance(t, (int, float)) and j > 0:
        return t / j
    return None


def verdict(entries: list[dict], limit: float = PARITY_LIMIT) -> str:
    """``met`` when every point of a case has ``triton / jit <= limit``; else ``MISSED`` with the worst point
    (or the first point that has no ratio)."""
    worst: Optional[tuple[float, int]] = None
    for e in entries:
        r = ratio_of(e)
        if r is None:
            return f"no ratio at n={e['n']}"
        if worst is None or r > worst[0]:
            worst = (r, e["n"])
    if worst is None:
        return "no points"
    return "met" if worst[0] <= limit else f"MISSED (worst {worst[0]:.2f}x at n={worst[1]})"


def merge_passes(passes: list[list[dict]]) -> list[dict]:
    """One point per (family, case, n) out of several passes' points, in the first pass's order: each side
    (``jit``, ``triton``) the median of its times over the passes, or the first reason a pass had no time
    (a wrong provider stays wrong); ``"passes"`` holds each side's per-pass values. The other keys (a
    sweep, a bound) are the first pass's."""
    by: dict[tuple, list[dict]] = {}
    for points in passes:
        for p in points:
            by.setdefault((p["family"], p["case"], p["n"]), []).append(p)
    out = []
    for seen in by.values():
        merged = dict(seen[0])
        merged["passes"] = {side: [p.get(side) for p in seen] for side in ("jit", "triton")}
        for side, values in merged["passes"].items():
            times = [v for v in values if isinstance(v, (int, float))]
            reasons = [v for v in values if not isinstance(v, (int, float))]
            merged[side] = reasons[0] if reasons else statistics.median(times)
        out.append(merged)
    return out


def spread(e: dict) -> Optional[float]:
    """The larger of the two sides' max / min over a merged point's passes; None with fewer than two
    timed passes on both sides."""
    worst = None
    for values in e.get("passes", {}).values():
        times = [v for v in values if isinstance(v, (int, float)) and v > 0]
        if len(times) >= 2:
            r = max(times) / min(times)
            worst = r if worst is None else max(worst, r)
    return worst


# ---- each family: its bench's run function, read into points ------------------------------------
def _row_write(sizes: list[int]) -> list[dict]:
    from .kv_write import run_sweep

    out = []
    for r in run_sweep(["bf16", "u8"], sizes, ["jit", "triton"], [torch.int64], cold=False):
        case = {"bf16": "bf16 512+64", "u8": "u8 656 (FP8 rows as bytes)"}[r.layout]
        side = {p: r.times_us.get(p, r.errors.get(p, "absent")) for p in ("jit", "triton")}
        out.append(entry("row write", case, r.n_loc, side["jit"], side["triton"]))
    return out


def _fp8(sizes: list[int]) -> list[dict]:
    from .fp8_bench import run_fp8_bench

    res = run_fp8_bench(sizes, rules=False)
    out = [entry("fp8 write", r["fmt"], r["n_loc"], r.get("jit", "absent"), r.get("triton", "absent")) for r in res["write"]]
    out += [entry("fp8 gather", f"{g['fmt']} -> bf16", g["n_loc"], g.get("jit", "absent"), g.get("triton", "absent"))
            for g in res["gather"]]  # fmt: skip
    return out


def _rope(sizes: list[int]) -> list[dict]:
    from .rope_write import run

    rep = run(["bf16", "fp8", "ds_mla"], [16, 128], sizes, ["jit", "fused-triton"], False, 0)
    out = []
    for r in rep["results"]:
        side = {}
        for name in ("jit", "fused-triton"):
            side[name] = r["times_us"].get(name) or ("WRONG" if name in r["wrong"] else r["absent"].get(name, "absent"))
        out.append(entry("rope write", f"{r['variant']} H={r['heads']}", r["n"], side["jit"], side["fused-triton"]))
    return out


def _v4(sizes: list[int]) -> list[dict]:
    from .v4_store import run_v4_bench

    res = run_v4_bench(["v4", "v41", "v41_fp4"], sizes, ["mlakv-jit", "mlakv-triton"])
    return [entry("v4 store", r["layout"], r["n"], r.get("mlakv-jit", "absent"), r.get("mlakv-triton", "absent"))
            for r in res["rows"]]  # fmt: skip


def _indexer(sizes: list[int]) -> list[dict]:
    from .indexer import run_indexer_bench

    res = run_indexer_bench(sizes)
    out = [entry("indexer", "store", r["n"], r.get("mlakv-jit", "absent"), r.get("mlakv-triton", "absent")) for r in res["store"]]
    # the gather's "mlakv" provider is the op on its path: the JIT kernel on SM90+ (its row says so)
    out += [entry("indexer", "gather", g["n"], g.get("mlakv", "absent"), g.get("mlakv-triton", "absent")) for g in res["gather"]]
    return out


def _sweep_key(warps: int, rows: int, early: bool) -> str:
    """``w1r2e``: 1 warp, 2 rows per program, the PDL trigger at entry (``l``: after the stores), as the
    row write's sweep spells its shapes."""
    return f"w{warps}r{rows}{'e' if early else 'l'}"


def _convert(sizes: list[int], sweep: bool = False) -> list[dict]:
    """The converting write (fp32 -> bf16, 512 + 64): Triton only. ``jit`` holds the JIT byte write of the
    converted rows (the same output bytes, half the source bytes); ``bound`` the converting call's bytes
    at copy bandwidth. With ``sweep``, ``"sweep"`` holds the time (or ``"WRONG"``) of every launch shape
    of the row kernel's sweep (:func:`mlakv.bench.kv_write.triton_sweep_shapes`) and ``"table"`` the key
    of the shape the launch table gave."""
    from mlakv import jit_kernel
    from mlakv.kernels.triton.row_write import launch_set_kv_rows
    from mlakv.ops.reference import set_mla_kv_buffer_torch
    from mlakv.spec.tuning import triton_convert_launch

    copy_gbs = copy_bandwidth_gbs()
    out = []
    for n in sizes:
        progress(f"parity: converting write n={n}")
        sets = []
        for _ in range(INPUT_SETS):
            kv = torch.empty(n + 64, 1, 576, dtype=torch.bfloat16, device="cuda")
            kv.view(torch.int16).random_(-(1 << 15), 1 << 15)
            nope, rope = torch.randn(n, 512, device="cuda"), torch.randn(n, 64, device="cuda")
            loc = torch.randperm(n + 64, device="cuda")[:n]
            sets.append((kv, loc, nope, rope, nope.to(torch.bfloat16), rope.to(torch.bfloat16)))
        kv, loc, nope, rope, nb, rb = sets[0]
        want = kv.cpu().clone()
        set_mla_kv_buffer_torch(want, loc.cpu(), nb.cpu(), rb.cpu())
        base = kv.clone()  # the poisoned rows, before any timed call writes them
        got = base.clone()
        launch_set_kv_rows(got, loc, nope, rope)
        t: Any = "WRONG"
        if torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)):
            t = graph_median_us(rotating(lambda kv, loc, a, b, c, d: launch_set_kv_rows(kv, loc, a, b), sets), calls=len(sets))
        j = graph_median_us(
            rotating(lambda kv, loc, a, b, c, d: jit_kernel.set_mla_kv_buffer(kv, loc, c, d), sets), calls=len(sets)
        )
        e = entry("converting write", "fp32 -> bf16 (vs JIT byte write of bf16 rows)", n, j, t)
        e["bound"] = n * (576 * 4 + 8 + 576 * 2) / (copy_gbs * 1e3)
        if sweep:
            e["table"] = _sweep_key(*triton_convert_launch(n))

            def measure(launch: dict) -> Any:
                write = functools.partial(launch_set_kv_rows, **launch)
                got = base.clone()
                write(got, loc, nope, rope)
                if not torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)):
                    return "WRONG"
                return graph_median_us(rotating(lambda kv, loc, a, b, c, d: write(kv, loc, a, b), sets), calls=len(sets))

            e["sweep"] = _sweep_shapes(measure)
        out.append(e)
        sets.clear()  # frees the input sets before the next size
        torch.cuda.empty_cache()
    return out


def _sweep_shapes(measure: Callable[[dict], Any]) -> dict[str, Any]:
    """``{shape key: µs or "WRONG"}``: ``measure`` (launch overrides -> a checked time) at every launch
    shape of the row kernel's sweep (:func:`mlakv.bench.kv_write.triton_sweep_shapes`)."""
    from .kv_write import triton_sweep_shapes

    return {
        _sweep_key(w, r, early): measure(dict(num_warps=w, rows_per_program=r, early_trigger=early))
        for w, r, early in triton_sweep_shapes()
    }


GATHER_CASE = "bf16 512+64 (CUDA: torch index_select)"


def _gather(sizes: list[int], sweep: bool = False) -> list[dict]:
    """The plain gather (bf16 512 + 64 rows at random slots): the Triton kernel against torch's CUDA
    gather of the same rows (``index_select`` of ``[num_slots, 576]``: one kernel, the same bytes read
    and written), which sits in ``jit``. With ``sweep``, ``"sweep"`` and ``"table"`` as in :func:`_convert`."""
    from mlakv.kernels.triton.row_write import launch_get_kv_rows
    from mlakv.spec.tuning import triton_gather_launch

    out = []
    for n in sizes:
        progress(f"parity: gather n={n}")
        slots = n + 64
        sets = []
        for _ in range(INPUT_SETS):
            kv = torch.empty(slots, 1, 576, dtype=torch.bfloat16, device="cuda")
            kv.view(torch.int16).random_(-(1 << 15), 1 << 15)
            sets.append((kv, torch.randperm(slots, device="cuda")[:n]))
        kv, loc = sets[0]
        want = kv.cpu().view(slots, 576)[loc.cpu()].view(torch.int16)  # the rule, on the CPU

        def timed(fn: Callable[..., Any], rows: Callable[[Any], torch.Tensor]) -> Any:
            got = rows(fn(kv, loc))
            if not torch.equal(got.cpu().view(torch.int16), want):
                return "WRONG"
            return graph_median_us(rotating(fn, sets), calls=len(sets))

        def triton_rows(r: Any) -> torch.Tensor:
            return torch.cat(r, dim=1)

        peer = timed(lambda kv, loc: torch.index_select(kv.view(kv.shape[0], 576), 0, loc), lambda r: r)
        e = entry("gather", GATHER_CASE, n, peer, timed(lambda kv, loc: launch_get_kv_rows(kv, loc, 512, 64), triton_rows))
        if sweep:
            e["table"] = _sweep_key(*triton_gather_launch(n))
            e["sweep"] = _sweep_shapes(
                lambda launch: timed(lambda kv, loc: launch_get_kv_rows(kv, loc, 512, 64, **launch), triton_rows)
            )
        out.append(e)
        sets.clear()  # frees the input sets before the next size
        torch.cuda.empty_cache()
    return out


#: ``--families`` name -> its runner (sizes -> points); the converting write has no CUDA twin (read apart)
FAMILIES: dict[str, Callable[[list[int]], list[dict]]] = {
    "row": _row_write, "fp8": _fp8, "rope": _rope, "v4": _v4, "indexer": _indexer, "convert": _convert,
    "gather": _gather,
}  # fmt: skip
#: the families ``--sweep`` times at every launch shape: their runners take ``sweep=True``
SWEEPS: dict[str, Callable[..., list[dict]]] = {"convert": _convert, "gather": _gather}
assert set(FAMILIES) == set(PARITY_FAMILIES)


def run_parity(
    families: list[str], sizes: list[int], into: Optional[dict] = None, convert_sweep: bool = False,
    sweep: Sequence[str] = (), passes: int = 1,
) -> dict:
    """Run each family's bench at ``sizes``; ``{"device", "versions", "date", "sizes", "passes", "points": [...]}``
    (GPU only). Points go into ``into`` as each family finishes, so an interrupted run keeps them. ``sweep``: the
    families of :data:`SWEEPS` (among ``families``) timed at every launch shape too; ``convert_sweep``
    adds ``convert`` to them. ``passes`` > 1: the families run that many times, every other pass in
    reverse order, and the points are :func:`merge_passes` of the passes (``"pass_points"`` keeps each
    pass's own)."""
    import triton

    res = {} if into is None else into
    res.update(
        device=torch.cuda.get_device_name(), sizes=list(sizes), points=[],
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        versions={"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                  "python": platform.python_version()},
        passes=passes,
    )  # fmt: skip
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    res["pass_points"] = []
    for k in range(passes):
        res["pass_points"].append([])
        for fam in families if k % 2 == 0 else families[::-1]:
            progress(f"parity: {fam}" + (f" (pass {k + 1} of {passes})" if passes > 1 else ""))
            swept = fam in sweep or (fam == "convert" and convert_sweep)
            runner = functools.partial(SWEEPS[fam], sweep=True) if swept else FAMILIES[fam]
            res["pass_points"][-1] += runner(sizes)
            res["points"] = res["pass_points"][0] if passes == 1 else merge_passes(res["pass_points"])
    if passes == 1:
        del res["pass_points"]
    return res


def _cases(points: list[dict]) -> dict[tuple[str, str], list[dict]]:
    by: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        by.setdefault((p["family"], p["case"]), []).append(p)
    return by


def _ratio_cell(e: Optional[dict]) -> str:
    if e is None:
        return "-"
    r = ratio_of(e)
    if r is not None:
        return f"**{r:.2f}**" if r > PARITY_LIMIT else f"{r:.2f}"
    why = e["triton"] if not isinstance(e["triton"], (int, float)) else e["jit"]
    return str(why)[:40]


def _us(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)[:24]


def format_tables(res: dict) -> str:
    """Markdown: the ratio table (``triton / jit`` per case and n, bold above the limit, a verdict per case),
    then the times (``jit / triton`` µs)."""
    sizes = res["sizes"]
    v = res.get("versions", {})
    n_passes = res.get("passes", 1)
    over = f"; each side the median of {n_passes} passes" if n_passes > 1 else ""
    head = [f"device: {res['device']}; torch {v.get('torch')}, triton {v.get('triton')}, CUDA {v.get('cuda')}; "
            f"{res.get('date')}; times: µs per call, median CUDA-graph replay over {INPUT_SETS} input sets, each provider "
            f"checked bit-exact first{over}; goal: triton / jit <= {PARITY_LIMIT}", ""]  # fmt: skip
    cases = _cases([p for p in res["points"] if p["family"] != "converting write"])
    cols = " | ".join(f"n={n}" for n in sizes)
    out = head + ["| kernel | case | " + cols + " | verdict |", "|---|---|" + "---|" * len(sizes) + "---|"]
    for (fam, case), pts in cases.items():
        at = {p["n"]: p for p in pts}
        out.append(f"| {fam} | {case} | " + " | ".join(_ratio_cell(at.get(n)) for n in sizes) + f" | {verdict(pts)} |")
    out += ["", "times (jit / triton µs)", "", "| kernel | case | " + cols + " |", "|---|---|" + "---|" * len(sizes)]
    for (fam, case), pts in cases.items():
        at = {p["n"]: p for p in pts}
        cells = [f"{_us(at[n]['jit'])} / {_us(at[n]['triton'])}" if n in at else "-" for n in sizes]
        out.append(f"| {fam} | {case} | " + " | ".join(cells) + " |")
    conv = [p for p in res["points"] if p["family"] == "converting write"]
    if conv:
        out += ["", "converting write (Triton only: fp32 sources into a bf16 cache; no CUDA twin)", "",
                "| n | triton µs | JIT byte write of the converted rows µs | bound µs | triton / bound |",
                "|---|---|---|---|---|"]  # fmt: skip
        for p in conv:
            rb = f"{p['triton'] / p['bound']:.2f}x" if isinstance(p["triton"], (int, float)) else "-"
            out.append(f"| {p['n']} | {_us(p['triton'])} | {_us(p['jit'])} | {_us(p['bound'])} | {rb} |")
        out += _sweep_lines(conv, "converting write", "TRITON_CONVERT_STEPS")
    out += _sweep_lines([p for p in res["points"] if p["family"] == "gather"], "gather", "TRITON_GATHER_STEPS")
    out += _spread_lines(res["points"], n_passes)
    return "\n".join(out)


def _spread_lines(points: list[dict], n_passes: int) -> list[str]:
    """The points whose times differ between passes by more than :data:`SPREAD_LIMIT` (``--passes``)."""
    if n_passes < 2:
        return []
    wide = [(p, r) for p in points if (r := spread(p)) is not None and r > SPREAD_LIMIT]
    out = ["", f"between passes: {len(wide)} of {len(points)} points have a side whose {n_passes} times differ by more "
           f"than {SPREAD_LIMIT:.2f}x (max / min; the tables above take the medians)"]  # fmt: skip
    if wide:
        out += ["", "| kernel | case | n | jit µs per pass | triton µs per pass | max / min |", "|---|---|---|---|---|---|"]
        for p, r in wide:
            cells = [", ".join(_us(v) for v in p["passes"][side]) for side in ("jit", "triton")]
            out.append(f"| {p['family']} | {p['case']} | {p['n']} | {cells[0]} | {cells[1]} | {r:.2f}x |")
    return out


def _sweep_lines(points: list[dict], kernel: str, table: str) -> list[str]:
    """A ``--sweep`` section of ``kernel``: per n the fastest launch shape against the table's, the shapes
    found wrong, then the rows ``(max n, num_warps, rows per program, trigger at entry)`` of its launch
    table (``table``) that the fastest shapes make; empty without a sweep."""
    swept = [p for p in points if p.get("sweep")]
    if not swept:
        return []
    out = ["", f"{kernel}, launch sweep (`--sweep`): µs per call; shape wWrR + e|l: W warps, R rows "
           "per program, the PDL trigger at entry (e) or after the stores (l); table: the shape its launch table "
           f"({table}) gives it", "", "| n | fastest | µs | table | µs | table / fastest | wrong |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    best = []
    for p in swept:
        times = {k: v for k, v in p["sweep"].items() if isinstance(v, (int, float))}
        wrong = ", ".join(k for k, v in p["sweep"].items() if not isinstance(v, (int, float))) or "-"
        if not times:
            out.append(f"| {p['n']} | - | - | {p['table']} | - | - | {wrong} |")
            continue
        k0 = min(times, key=times.get)
        t_table = times.get(p["table"])
        vs = f"{t_table / times[k0]:.2f}x" if t_table is not None else "-"
        out.append(f"| {p['n']} | {k0} | {times[k0]:.2f} | {p['table']} | {_us(t_table) if t_table else '-'} | {vs} | {wrong} |")
        w, _, rest = k0[1:].partition("r")
        best.append((p["n"], (int(w), int(rest[:-1]), rest[-1] == "e")))
    if best:
        out += ["", "rows (max n, num_warps, rows per program, trigger at entry) the fastest shapes make:", "",
                f"    {tuple(table_steps(best))!r}"]  # fmt: skip
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench parity``: returns 0 (also without a GPU: nothing to measure), 2 on a usage error."""
    args = build_parser().parse_args(argv)
    run = lambda res: run_parity(args.families, args.sizes, into=res, convert_sweep=args.convert_sweep,  # noqa: E731
                                 sweep=args.sweep, passes=args.passes)  # fmt: skip
    return run_on_gpu("parity bench", args.out, "parity", run, format_tables)
