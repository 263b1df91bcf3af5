"""How a command ends when it is stopped: by Ctrl-C (SIGINT) or by SIGTERM, the signal that ``timeout``,
``kill``, batch schedulers and container runtimes send.

Python turns SIGINT into ``KeyboardInterrupt``, and every bench keeps what it measured when one arrives.
SIGTERM would kill the process at once and lose those rows (a sweep stopped by ``timeout`` wrote
nothing). :func:`run_command` makes SIGTERM raise the same ``KeyboardInterrupt`` while a command runs,
so both signals end alike: the bench saves its rows, then one line on stderr says what stopped it and
what was kept, and the exit code is 128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as a shell
reports a command ended by that signal.

This module imports nothing of mlakv (a leaf), so the command line and every bench's module entry
point share it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator, Optional

__all__ = ["EXIT_INTERRUPTED", "EXIT_TERMINATED", "sigterm_raises_interrupt", "run_command", "run_module"]

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class _Received:
    """The stop signal seen while :func:`sigterm_raises_interrupt` was active (None: none, or SIGINT)."""

    signum: Optional[int] = None


@contextlib.contextmanager
def sigterm_raises_interrupt() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises ``KeyboardInterrupt`` where the program is.

    The previous handler is restored on exit. In another thread (where Python cannot set handlers)
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        _Received.signum = signum
        raise KeyboardInterrupt

    _Received.signum = None
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(label: str, fn: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run ``fn(argv)`` (a command's main; returns its exit code) with SIGTERM raising
    ``KeyboardInterrupt``; an interruption ends as one line on stderr, ``<label>: interrupted (Ctrl-C)``
    or ``<label>: terminated (SIGTERM)``, followed by the interruption's message (what was kept, where),
    and the exit code 130 or 143."""
    try:
        with sigterm_raises_interrupt():
            return fn(argv)
    except KeyboardInterrupt as e:
        terminated = _Received.signum == signal.SIGTERM
        how = "terminated (SIGTERM)" if terminated else "interrupted (Ctrl-C)"
        kept = f": {e}" if str(e) else ""
        print(f"{label}: {how}{kept}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def run_module(label: str, main: Callable[[Optional[list[str]]], int]) -> int:
    """A bench module's ``python -m`` entry: :func:`run_command` over ``sys.argv[1:]``."""
    return run_command(label, main, sys.argv[1:])
