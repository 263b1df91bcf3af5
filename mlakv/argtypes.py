"""Argument types shared by the command-line entries (``mlakv demo``, ``mlakv bench ...``).

A leaf module: argparse ``type=`` callables that turn a bad value into argparse's one-line usage
error (exit 2) instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["positive_int", "out_dir"]


def positive_int(text: str) -> int:
    """An integer >= 1, or ``argparse.ArgumentTypeError`` naming the value."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def out_dir(text: str) -> Path:
    """A directory the command can write its results into, checked when the command line is parsed
    (before any measurement): an existing directory we can create a file in, or a path whose nearest
    existing ancestor is such a directory (the command creates the rest). An existing file, a
    read-only directory or file system, or a missing permission is ``argparse.ArgumentTypeError``
    (argparse's one-line usage error, exit 2) naming the path and why."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} cannot be created: {str(probe)!r} is not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".mlakv-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        why = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror)
        where = "" if probe == path else f" (its existing parent {str(probe)!r})"
        raise argparse.ArgumentTypeError(f"{text!r} is not writable{where}: {why}") from None
    return path
