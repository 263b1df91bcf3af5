"""Whether Mooncake can run here, and the command that fixes it when it cannot.

Missing pieces are reported as :class:`MooncakeUnavailable`: the wheel not installed, or Debian's
``libibverbs1`` missing (the wheel's binaries and its Python extension link ``libibverbs.so.1`` even
when they only speak TCP). A leaf: it imports nothing else of mlakv.
"""

from __future__ import annotations

import ctypes.util
import importlib.util

__all__ = ["APT_HINT", "PIP_HINT", "MooncakeUnavailable", "check_mooncake", "libibverbs_present"]

PIP_HINT = "pip install mooncake-transfer-engine-non-cuda  (or mooncake-transfer-engine where CUDA is wanted)"
APT_HINT = "apt-get install -y libibverbs1"


class MooncakeUnavailable(RuntimeError):
    """Mooncake (the Python wheel, its master binary or the libibverbs it links) is not installed."""


def libibverbs_present() -> bool:
    """Whether libibverbs (which Mooncake's libraries and master link, even over TCP) can be loaded."""
    if ctypes.util.find_library("ibverbs"):
        return True
    try:
        ctypes.CDLL("libibverbs.so.1")
        return True
    except OSError:
        return False


def check_mooncake() -> None:
    """Raise :class:`MooncakeUnavailable` naming the fix if ``mooncake.store`` cannot be imported."""
    if importlib.util.find_spec("mooncake") is None:
        raise MooncakeUnavailable(f"Mooncake is not installed: {PIP_HINT}")
    if not libibverbs_present():
        raise MooncakeUnavailable(f"Mooncake needs libibverbs.so.1 (even over TCP), which is missing: {APT_HINT}")
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        hint = APT_HINT if "ibverbs" in str(e) else PIP_HINT
        raise MooncakeUnavailable(f"cannot import mooncake.store ({e}); fix: {hint}") from e
