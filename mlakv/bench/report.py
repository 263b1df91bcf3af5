"""Markdown cells and result files shared by the family benchmarks (indexer, V4 store).

Each benchmark prints its tables and writes ``<stem>.json`` (the raw results) and ``<stem>.md``
(the tables) under ``--out``; the cell formats (µs to two places, a share of copy bandwidth as a
percentage, a ratio with an ``x``) are the same in every table, so they live here once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

__all__ = ["cell", "pct", "ratio", "write_results"]


def cell(v: Any) -> str:
    """A time in µs to two places; a string (an absent provider's reason, ``-``) as it is."""
    return v if isinstance(v, str) else f"{v:.2f}"


def pct(v: Any) -> str:
    """A fraction as a whole percentage; ``-`` for None or a string."""
    return "-" if v is None or isinstance(v, str) else f"{v:.0%}"


def ratio(a: Any, b: Any) -> str:
    """``a / b`` to two places with an ``x``; ``-`` when either is None or a string."""
    return "-" if a is None or b is None or isinstance(a, str) or isinstance(b, str) else f"{a / b:.2f}x"


def write_results(out: Union[str, Path], stem: str, res: dict, text: str) -> None:
    """Print the tables ``text``, then write ``out/<stem>.json`` (``res``) and ``out/<stem>.md``."""
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")
