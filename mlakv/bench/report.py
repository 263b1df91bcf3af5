"""Markdown cells, result files and launch sweeps shared by the family benchmarks.

Each benchmark prints its tables and writes ``<stem>.json`` (the raw results) and ``<stem>.md``
(the tables) under ``--out``; the cell formats (µs to two places, a share of copy bandwidth as a
percentage, a ratio with an ``x``) are the same in every table, so they live here once, as does the
grid of launch overrides a ``--sweep`` times (:func:`launch_grid`) and the launch-table rows a sweep's
fastest shapes make (:func:`table_steps`, and :func:`merged_steps` for a sweep of some sizes folded into the
table it re-measures).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from .timing import on_progress

__all__ = [
    "cell", "pct", "ratio", "provider_table", "write_results", "run_on_gpu", "measured_rows", "INTERRUPTED_NOTE",
    "PARTIAL_NOTE", "checkpoint", "rows_kept_on_interrupt",
    "launch_grid", "table_steps", "merged_steps",
]  # fmt: skip


def cell(v: Any) -> str:
    """A time in µs to two places; a string (an absent provider's reason, ``-``) as it is."""
    return v if isinstance(v, str) else f"{v:.2f}"


def pct(v: Any) -> str:
    """A fraction as a whole percentage; ``-`` for None or a string."""
    return "-" if v is None or isinstance(v, str) else f"{v:.0%}"


def ratio(a: Any, b: Any) -> str:
    """``a / b`` to two places with an ``x``; ``-`` when either is None or a string."""
    return "-" if a is None or b is None or isinstance(a, str) or isinstance(b, str) else f"{a / b:.2f}x"


def provider_table(rows: list[dict], names: list[str], ratios: dict[str, tuple[str, str]]) -> list[str]:
    """A markdown table, one line a row: ``n``, ``path``, each provider's time (``names``), mlakv's
    share of copy bandwidth, then one column a ratio (``title -> (numerator, denominator)`` keys)."""
    out = [
        "| n | path | " + " | ".join([*names, "mlakv of copy bw", *ratios]) + " |",
        "|---" * (len(names) + 3 + len(ratios)) + "|",
    ]
    for r in rows:
        cells = [cell(r.get(k, "-")) for k in names] + [pct(r.get("mlakv of copy bw"))]
        cells += [ratio(r.get(a), r.get(b)) for a, b in ratios.values()]
        out.append(f"| {r['n']} | {r['path']} | " + " | ".join(cells) + " |")
    return out


def write_results(out: Union[str, Path], stem: str, res: dict, text: str, echo: bool = True) -> None:
    """Print the tables ``text`` (unless ``echo`` is False: a bench that printed its rows as it measured
    them), then write ``out/<stem>.json`` (``res``) and ``out/<stem>.md``."""
    if echo:
        print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")


def run_on_gpu(what: str, out: Union[str, Path], stem: str, run: Callable[[dict], object],
               tables: Callable[[dict], str]) -> int:
    """A benchmark's main after its command line: without a CUDA GPU say so and measure nothing;
    else ``run(res)``, which fills the dict ``res`` as it measures, then print and write its tables
    (:func:`write_results`). Returns the exit code 0.

    While it runs, the files hold what is measured so far (rewritten at each progress line after new rows,
    ``"partial": true`` in the JSON and a note under the tables), so a run killed outright (SIGKILL, a lost
    machine) keeps its rows too. Interrupted (Ctrl-C, or SIGTERM under
    :func:`mlakv._interrupt.run_command`) after some rows were measured, it writes those, with
    ``"interrupted": true`` in the JSON and a note under the tables, and raises ``KeyboardInterrupt``
    saying where they are; before any row, it just re-raises."""
    import torch

    if not torch.cuda.is_available():
        print(f"{what}: no CUDA GPU here; the kernels' timings need one (nothing measured)")
        return 0
    res: dict = {}
    save = lambda note="": write_results(out, stem, res, tables(res) + note)  # noqa: E731
    kept = rows_kept_on_interrupt(res, save, f"in {Path(out) / stem}.json and .md")
    with on_progress(checkpoint(res, out, stem, tables)), kept:
        run(res)
    save()
    return 0


PARTIAL_NOTE = "\n\nPARTIAL: the run has not finished (or was killed); the rows above are the ones measured so far."


def checkpoint(res: dict, out: Union[str, Path], stem: str, tables: Callable[[dict], str],
               count: Optional[Callable[[dict], int]] = None) -> Callable[[], None]:  # fmt: skip
    """A hook (for :func:`mlakv.bench.timing.on_progress`) that writes ``out/<stem>.json`` and ``.md``
    (quietly, with ``"partial": true`` and :data:`PARTIAL_NOTE`) whenever ``res`` holds more rows
    (``count(res)``, :func:`measured_rows` by default) than at its last write."""
    count = count or measured_rows
    written = [0]

    def hook() -> None:
        kept = count(res)
        if kept > written[0]:
            write_results(out, stem, {**res, "partial": True}, tables(res) + PARTIAL_NOTE, echo=False)
            written[0] = kept

    return hook


INTERRUPTED_NOTE = "\n\nINTERRUPTED: the rows above are the ones measured before the run was stopped."


@contextlib.contextmanager
def rows_kept_on_interrupt(res: dict, save: Callable[[str], None], where: str) -> Iterator[None]:
    """Around a bench's measuring, which fills ``res`` as it goes: on ``KeyboardInterrupt`` (Ctrl-C, or
    SIGTERM under :func:`mlakv._interrupt.run_command`) after some rows, mark ``res`` interrupted, call
    ``save(INTERRUPTED_NOTE)`` (print or write its tables with that note under them) and raise
    ``KeyboardInterrupt("N rows measured so far, <where>")``; before any row, re-raise as it is."""
    try:
        yield
    except KeyboardInterrupt:
        kept = measured_rows(res)
        if not kept:
            raise
        res["interrupted"] = True
        save(INTERRUPTED_NOTE)
        raise KeyboardInterrupt(f"{kept} row{'s' if kept != 1 else ''} measured so far, {where}") from None


def measured_rows(res: dict) -> int:
    """How many rows a bench's partial result ``res`` holds: the items of its top-level lists of rows
    (dicts; a list of sizes is not rows)."""
    return sum(len(v) for v in res.values() if isinstance(v, list) and v and isinstance(v[0], dict))


def launch_grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the launch overrides ``axes`` (keyword -> values), the last axis fastest:
    ``launch_grid(num_warps=(4, 8), early_trigger=(True, False))`` gives four keyword dicts."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def table_steps(best: Sequence[tuple[int, tuple]]) -> list[tuple]:
    """``[(n, shape), ...]`` by increasing n (each size's fastest launch shape, a tuple) -> launch-table
    rows ``(max n, *shape)``: one row per size where the shape changes, equal neighbours merged, the last
    row open (``None``), as the tables of :mod:`mlakv.spec.tuning` read them."""
    steps: list[tuple] = []
    for n, shape in best:
        if steps and steps[-1][1:] == tuple(shape):
            steps[-1] = (n, *shape)
        else:
            steps.append((n, *shape))
    if steps:
        steps[-1] = (None, *steps[-1][1:])
    return steps


def merged_steps(current: Sequence[tuple], best: Sequence[tuple[int, tuple]]) -> list[tuple]:
    """A sweep of some sizes folded into the launch table it re-measures: ``current`` the table's rows
    ``(max n, *shape)`` (increasing, the last open), ``best`` ``[(n, shape), ...]`` each swept size's
    fastest shape. Each swept size takes its fastest shape, with the sizes between it and the next lower
    boundary (swept or the table's); every size the sweep does not reach keeps the table's shape there:
    above the largest swept size, and at and below a boundary of the table that no swept size shares.
    Equal neighbours merge; the last row stays open. ``table_steps(best)`` instead opens the largest
    swept size's shape to every larger n, which a sweep of a few sizes has not measured."""
    if not best:
        return list(current)

    def shape_at(n: int) -> tuple:
        return next(tuple(r[1:]) for r in current if r[0] is None or n <= r[0])

    swept = {int(n): tuple(shape) for n, shape in best}
    bounds = sorted(set(swept) | {r[0] for r in current if r[0] is not None})
    points = [(b, swept[b] if b in swept else shape_at(b)) for b in bounds] + [(None, shape_at(bounds[-1] + 1))]
    rows: list[tuple] = []
    for bound, shape in points:
        if rows and rows[-1][1:] == shape:
            rows[-1] = (bound, *shape)
        else:
            rows.append((bound, *shape))
    return rows
