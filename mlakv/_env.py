"""Every environment variable mlakv reads, parsed in one place with one truth table.

Boolean flags: ``1/true/yes/on`` -> True, ``0/false/no/off/""`` (or unset) -> the flag's default is
False for every flag; case and surrounding spaces are ignored; anything else raises ``ValueError``
naming the variable. The two flags the write path consults (``MLAKV_CHECK_BOUNDS``,
``MLAKV_DISABLE_JIT``) are read once, at import of this module; the paths are read where used (a
test or a process may point them elsewhere).

| variable | meaning |
|---|---|
| ``MLAKV_CHECK_BOUNDS`` | check slots on GPU writes/gathers and raise ``IndexError`` (syncs) |
| ``MLAKV_DISABLE_JIT`` | never use the JIT CUDA kernels (every GPU call takes Triton) |
| ``MLAKV_REQUIRE_JIT_BUILD`` | tests: a missing nvcc/tvm-ffi fails instead of skipping (CI) |
| ``MLAKV_CACHE_DIR`` | where built kernel modules are cached (else ``TVM_FFI_CACHE_DIR``, ``~/.cache/tvm-ffi``) |
| ``MLAKV_SGLANG_SRC`` | bench: sglang's kernel source tree (else ``.peers/sglang``) |
| ``MLAKV_VLLM_SRC`` | bench: vLLM's fetched cache kernel source (else ``.peers/vllm``) |
| ``MLAKV_MOONCAKE_MASTER`` | the ``mooncake_master`` binary to run (else the wheel's) |
| ``TRITON_INTERPRET`` | Triton's own: kernels run on CPU tensors through the interpreter |

This module imports nothing of mlakv (a leaf).
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = [
    "TRUE_VALUES",
    "FALSE_VALUES",
    "parse_flag",
    "flag",
    "path",
    "CHECK_BOUNDS",
    "DISABLE_JIT",
    "triton_interpreting",
]

TRUE_VALUES = frozenset(("1", "true", "yes", "on"))
FALSE_VALUES = frozenset(("0", "false", "no", "off", ""))


def parse_flag(name: str, value: Optional[str]) -> bool:
    """The truth table of every boolean flag: ``value`` of variable ``name`` (None: unset -> False)."""
    if value is None:
        return False
    v = value.strip().lower()
    if v in TRUE_VALUES:
        return True
    if v in FALSE_VALUES:
        return False
    raise ValueError(f"{name}={value!r} is not understood; use 1/true/yes/on or 0/false/no/off")


def flag(name: str) -> bool:
    """The current value of boolean flag ``name`` from the environment (read now)."""
    return parse_flag(name, os.environ.get(name))


def path(name: str) -> Optional[str]:
    """The value of a path variable, or None when unset or empty."""
    value = os.environ.get(name)
    return value or None


def triton_interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (``TRITON_INTERPRET``)."""
    return flag("TRITON_INTERPRET")


# Read once: the write path's defaults (an unknown value raises at import, naming the variable).
CHECK_BOUNDS: bool = flag("MLAKV_CHECK_BOUNDS")
DISABLE_JIT: bool = flag("MLAKV_DISABLE_JIT")
