"""Argument types shared by the command-line entries (``mlakv demo``, ``mlakv bench ...``).

A leaf module: argparse ``type=`` callables that turn a bad value into argparse's one-line usage
error (exit 2) instead of a traceback.
"""

from __future__ import annotations

import argparse

__all__ = ["positive_int"]


def positive_int(text: str) -> int:
    """An integer >= 1, or ``argparse.ArgumentTypeError`` naming the value."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v
