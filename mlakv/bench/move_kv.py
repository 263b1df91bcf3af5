"""Benchmark of ``move_kv_cache``: mlakv's one-launch Triton move vs one indexed copy per layer.

sglang moves the accepted draft tokens' rows in every layer after a speculative-decoding step;
done with torch indexing that is ``kv[tgt] = kv[src]`` per layer (a gather and a scatter each).
mlakv's kernel covers every layer in one launch: ``staged`` (any overlap; the default) or
``direct`` (disjoint sets). Rows are moved within 61-layer bf16 512+64 buffers; medians of CUDA
events over repeated launches, side by side, with ratios to the torch loop.

With ``--sweep`` each Triton kernel also runs at every launch shape of
:data:`mlakv.spec.tuning.MOVE_TRITON_SWEEP` (``direct wW bB``: W warps, blocks of at most B words;
``staged wW rR cC``: W warps, R rows a step, C words a program) beside the launch table's (``table``):
CUDA-graph medians over 8 rotating sets of disjoint index pairs (:mod:`mlakv.bench.timing`; no host
launch cost). Before it is timed, each shape moves fresh random rows of buffers with the same layers
and rows (``direct``: disjoint pairs; ``staged``: overlapping ones) and must leave them bit-equal to
:func:`mlakv.ops.move.move_kv_cache_torch`'s move; a shape that does not is reported ``WRONG`` and not
timed. The report gives per kernel and n the fastest shape against the table's, and the
``MOVE_TRITON_STEPS`` rows those shapes make. ``--out DIR`` writes ``move_kv.json`` and ``move_kv.md``.

    python -m mlakv.bench.move_kv [--layers 61] [--slots 65536] [--n 8 64 512 4096] [--sweep] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from mlakv.kernels.triton.move import launch_move_kv_rows
from mlakv.ops.move import move_kv_cache_torch
from mlakv.spec import tuning

from . import timing
from .options import move_kv_parser
from .report import cell, ratio, rows_kept_on_interrupt, table_steps, write_results
from .timing import event_median_us

__all__ = ["KINDS", "shape_name", "shape_of", "sweep_movers", "move_is_exact", "run_sweep", "format_report", "main"]

KINDS = ("direct", "staged")
TABLE = "table"  # the sweep's name for the launch table's own shape
ROW_ELEMS = 576  # bf16 512 + 64
#: ms of calls in each CUDA graph the sweep replays (ten replays a shape; half the timing module's
#: default, which keeps the sweep of the default sizes under a minute on an H200)
SWEEP_REP_MS = 20
# a shape's letters in its name and the launcher's override keywords, per kernel
_LETTERS = {"direct": ("w", "b"), "staged": ("w", "r", "c")}
_OVERRIDES = {"direct": ("num_warps", "block_words"), "staged": ("num_warps", "rows_per_step", "column_words")}

Mover = Callable[[Sequence[torch.Tensor], torch.Tensor, torch.Tensor], None]
TimeUs = Callable[[Callable[[], None], int], float]


def shape_name(kind: str, shape: Sequence[int]) -> str:
    """A sweep shape's name: ``("staged", (4, 16, 32))`` -> ``staged w4 r16 c32``."""
    return " ".join([kind, *(f"{letter}{v}" for letter, v in zip(_LETTERS[kind], shape))])


def shape_of(name: str) -> tuple[str, tuple[int, ...]]:
    """``(kernel, shape)`` of a sweep name: ``direct w4 b1024`` -> ``("direct", (4, 1024))``."""
    kind, *parts = name.split()
    return kind, tuple(int(p[1:]) for p in parts)


def sweep_movers(kind: str, shapes: Optional[Sequence[Sequence[int]]] = None) -> dict[str, Mover]:
    """``{name: move(kv_buffers, tgt_loc, src_loc)}``: the ``kind`` kernel (``direct`` or ``staged``) at
    the launch table's shape (``table``), then at each of ``shapes`` (default: the sweep's,
    :data:`~mlakv.spec.tuning.MOVE_TRITON_SWEEP`), each forced through the launcher's overrides."""
    from mlakv.kernels.triton import move

    disjoint = kind == "direct"
    out: dict[str, Mover] = {TABLE: lambda b, t, s: move.launch_move_kv_rows(b, t, s, disjoint=disjoint)}
    for shape in tuning.MOVE_TRITON_SWEEP[kind] if shapes is None else shapes:
        kw = dict(zip(_OVERRIDES[kind], shape))
        out[shape_name(kind, shape)] = lambda b, t, s, kw=kw: move.launch_move_kv_rows(b, t, s, disjoint=disjoint, **kw)
    return out


def move_is_exact(fn: Mover, kind: str, layers: int, n: int, device: str = "cuda") -> bool:
    """Whether ``fn`` moves ``n`` rows of fresh random bytes in ``layers`` bf16 ``[slots, 1, 576]``
    buffers (``slots``: ``4n + 8`` rounded up to a multiple of 16, so the kernel is the one the timed
    call runs, specialized alike) exactly as :func:`~mlakv.ops.move.move_kv_cache_torch` does (every
    byte of every layer compared): random disjoint pairs for ``direct``, random overlapping ones (half
    the targets are sources) for ``staged``."""
    slots = -(-(4 * n + 8) // 16) * 16
    bufs = [torch.empty(slots, 1, ROW_ELEMS, dtype=torch.bfloat16, device=device) for _ in range(layers)]
    for b in bufs:
        b.view(torch.uint8).random_(0, 256)
    perm = torch.randperm(slots, device=device)
    src = perm[:n]
    tgt = perm[n : 2 * n] if kind == "direct" else perm[n // 2 : n // 2 + n][torch.randperm(n, device=device)]
    want = [b.clone() for b in bufs]
    move_kv_cache_torch(want, tgt, src)
    fn(bufs, tgt, src)
    timing.sync(device)
    return all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(bufs, want))


def run_sweep(
    bufs: Sequence[torch.Tensor],
    sizes: Sequence[int],
    shapes: Optional[dict[str, Sequence[Sequence[int]]]] = None,
    time_us: TimeUs = lambda body, calls: timing.graph_median_us(body, calls=calls, rep=SWEEP_REP_MS),
    into: Optional[list] = None,
) -> list[dict]:
    """One row per kernel and n: ``{"kernel", "n", "table_shape", "times": {name: µs or "WRONG"}}``,
    the table's shape and every sweep shape (``shapes``: per kernel, default the sweep's) timed on
    ``bufs`` (the layers, ``[slots, 1, 576]`` bf16) over :data:`~mlakv.bench.timing.INPUT_SETS`
    rotating sets of disjoint pairs (``time_us(body, calls)``: µs per call, default the CUDA-graph
    median of graphs of :data:`SWEEP_REP_MS` ms), each checked by :func:`move_is_exact` first. The
    buffers should have a multiple of 16 slots, as the check's do. The rows go into ``into`` (the list
    returned) as each is measured, so an interrupted sweep keeps them."""
    device = str(bufs[0].device)
    slots = bufs[0].shape[0]
    rows: list[dict] = [] if into is None else into
    for n in sizes:
        pairs = []
        for _ in range(timing.INPUT_SETS):
            perm = torch.randperm(slots - 1, device=device) + 1  # slot 0 is the pool's padding slot
            pairs.append((perm[n : 2 * n], perm[:n]))
        for kind in KINDS:
            timing.progress(f"move_kv sweep: {kind}, n={n}")
            times: dict[str, Any] = {}
            for name, fn in sweep_movers(kind, None if shapes is None else shapes.get(kind, ())).items():
                if not move_is_exact(fn, kind, len(bufs), n, device):
                    times[name] = "WRONG"
                    continue
                times[name] = time_us(timing.rotating(lambda t, s, fn=fn: fn(bufs, t, s), pairs), len(pairs))
            rows.append({"kernel": kind, "n": n, "table_shape": list(tuning.move_triton_launch(kind, n)), "times": times})
    return rows


def _sweep_tables(rows: list[dict]) -> list[str]:
    """Per kernel a markdown table: one line per shape, one column per n."""
    out: list[str] = []
    for kind in KINDS:
        mine = [r for r in rows if r["kernel"] == kind]
        if not mine:
            continue
        names = list(dict.fromkeys(name for r in mine for name in r["times"]))
        out += ["", f"| {kind} | " + " | ".join(f"n={r['n']}" for r in mine) + " |", "|---" * (len(mine) + 1) + "|"]
        out += [f"| {name} | " + " | ".join(cell(r["times"].get(name, "-")) for r in mine) + " |" for name in names]
    return out


def _fastest(rows: list[dict]) -> list[str]:
    """Per kernel and n, the fastest sweep shape against the table's, then the ``MOVE_TRITON_STEPS``
    rows those shapes make (a size given twice counts its fastest time); nothing without a timed shape."""
    lines: list[str] = []
    steps: dict[str, list] = {}
    for kind in KINDS:
        best: dict[int, tuple[float, str, dict]] = {}
        for r in rows:
            if r["kernel"] != kind:
                continue
            swept = {k: v for k, v in r["times"].items() if k != TABLE and isinstance(v, float)}
            if swept:
                name = min(swept, key=swept.get)
                if r["n"] not in best or swept[name] < best[r["n"]][0]:
                    best[r["n"]] = (swept[name], name, r)
        for n in sorted(best):
            us, name, r = best[n]
            table = r["times"].get(TABLE)
            vs = f" ({ratio(us, table)} the table's {shape_name(kind, r['table_shape'])}: {cell(table)} µs)"
            lines.append(f"- {kind} n={n}: {name}: {us:.2f} µs" + vs)
        if best:
            steps[kind] = table_steps([(n, shape_of(best[n][1])[1]) for n in sorted(best)])
    if not lines:
        return []
    table = "{" + ", ".join(f'"{k}": {tuple(v)!r}' for k, v in steps.items()) + "}"
    return ["", "Fastest launch shape per kernel and n (`--sweep`):", "", *lines, "", f"MOVE_TRITON_STEPS = {table}"]


def format_report(res: dict) -> str:
    """Markdown: the torch loop against both kernels at the table's launch (event medians), then with a
    sweep, each kernel's shapes side by side (graph medians), the fastest per n and the table rows they make."""
    out = [
        f"{res['device']}, {res['layers']} layers x {res['slots']} slots, bf16 512+64; median µs of CUDA events "
        "around eager calls (host launch included)",
        "",
        "| n rows | torch loop (per layer) | mlakv staged | mlakv direct | staged vs torch | direct vs torch |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(f"| {r['n']} | {r['torch']:.1f} | {r['staged']:.1f} | {r['direct']:.1f} | "
                   f"{r['torch'] / r['staged']:.2f}x | {r['torch'] / r['direct']:.2f}x |")  # fmt: skip
    if res.get("sweep"):
        out += ["", f"Launch sweep: µs per call, CUDA-graph median ({SWEEP_REP_MS} ms graphs) over {timing.INPUT_SETS} "
                "rotating sets of disjoint pairs; every shape checked bit-exact against the torch move first (WRONG: "
                "not timed); `table`: the launch table's shape"]  # fmt: skip
        out += _sweep_tables(res["sweep"]) + _fastest(res["sweep"])
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mlakv.bench.move_kv [options]`` (:func:`mlakv.bench.options.move_kv_parser`); exits
    without a CUDA GPU. Returns 0."""
    ap = move_kv_parser(__doc__.splitlines()[0])
    args = ap.parse_args(argv)
    too_many = [n for n in args.n if 2 * n > args.slots - 1]
    if too_many:
        ap.error(f"--n {too_many[0]}: two disjoint sets of n rows need 2n <= slots - 1 = {args.slots - 1}")
    if not torch.cuda.is_available():
        raise SystemExit("mlakv.bench.move_kv needs a CUDA GPU")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "layers": args.layers, "slots": args.slots, "rows": []}
    save = lambda note="": _emit(res, args.out, note)  # noqa: E731
    where = f"in {args.out}/move_kv.json and .md" if args.out is not None else "printed above"
    with rows_kept_on_interrupt(res, save, where):
        _measure(args.layers, args.slots, args.n, args.sweep, res)
    save()
    return 0


def _measure(layers: int, slots: int, sizes: Sequence[int], sweep: bool, res: dict) -> None:
    """On ``layers`` buffers of ``slots`` rows: the eager rows (torch loop, staged, direct at the table's
    launch), then with ``sweep`` the launch sweep, each row into ``res`` as it is measured."""
    bufs = [torch.randn(slots, 1, ROW_ELEMS, device="cuda").to(torch.bfloat16) for _ in range(layers)]
    for n in sizes:
        perm = torch.randperm(slots - 1, device="cuda") + 1
        src, tgt = perm[:n], perm[n : 2 * n]  # disjoint, so all three may run
        res["rows"].append({
            "n": n,
            "torch": event_median_us(lambda: move_kv_cache_torch(bufs, tgt, src)),
            "staged": event_median_us(lambda: launch_move_kv_rows(bufs, tgt, src)),
            "direct": event_median_us(lambda: launch_move_kv_rows(bufs, tgt, src, disjoint=True)),
        })  # fmt: skip
    if sweep:
        res["sweep"] = []
        run_sweep(bufs, sizes, into=res["sweep"])


def _emit(res: dict, out: Optional[Path], note: str = "") -> None:
    """The report (and ``note``) printed, or with ``--out`` written there (and printed)."""
    text = format_report(res) + note
    if out is not None:
        write_results(out, "move_kv", res, text)
    else:
        print(text)


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.move_kv", main))
