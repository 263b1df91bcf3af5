"""``mlakv`` / ``python -m mlakv``: the command-line entry points (bench, demo, fetch-peers, --version).

Each command is one function that takes the rest of the command line and returns the exit code;
the command's own options live beside it (``mlakv.bench.options``, ``mlakv.demo.options``, parsed
before torch loads), so a new option is added there, not here. Every command ends the same way on
Ctrl-C or SIGTERM: one line on stderr (what was kept, where the command says), exit code 130 or 143
(:mod:`mlakv._interrupt`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional

from . import __version__
from ._interrupt import EXIT_INTERRUPTED, EXIT_TERMINATED, run_command

__all__ = ["COMMANDS", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "build_parser", "main"]


def _bench(argv: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(argv)


def _demo(argv: list[str]) -> int:
    from .demo.options import build_parser

    build_parser().parse_args(argv)  # --help and usage errors answer before torch loads
    from .demo.serve import main as demo_main

    return demo_main(argv)


def _fetch_peers(argv: list[str]) -> int:
    from .bench.peers import main as fetch_main

    return fetch_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "bench": (_bench, "time every KV-row write provider side by side (`mlakv bench hicache`: HiCache transfers)"),
    "demo": (_demo, "serve a small MLA model through the pool: prefill, decode, write share, reference check"),
    "fetch-peers": (_fetch_peers, "download the source of the projects the benches compare with (sglang) into .peers/"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``mlakv [--version] <command> [options]``."""
    ap = argparse.ArgumentParser(
        prog="mlakv",
        description="mlakv: the KV-cache memory pool for MLA models. `mlakv <command> --help` for a command's options.",
    )
    ap.add_argument("--version", action="version", version=f"mlakv {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``mlakv`` script; returns the exit code (2 on a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    ap = build_parser()
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
            ap.error(f"unrecognized argument {argv[0]} (before the command only --help and --version are known)")
        ap.parse_args(argv)  # --help, --version, or a usage error (exit 2); a missing command also errors
        return 2
    name = argv[0]
    return run_command(f"mlakv {name}", COMMANDS[name][0], argv[1:])
