"""``python -m mlakv bench | demo``: the command-line entry points."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

USAGE = """usage: python -m mlakv <command> [options]

commands:
  bench   time every row-write provider side by side (python -m mlakv bench --help)
  demo    serve a small MLA model through the pool: prefill, decode, write share, reference check
"""


def _bench(argv: list[str]) -> int:
    # The harness (and the legacy baseline it compares against) lives in the repo's benchmarks/.
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "kv_write_bench.py").exists():
        print("python -m mlakv bench runs from a source checkout (benchmarks/ not found next to mlakv/)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.kv_write_bench import main

    return main(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        return _bench(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2
