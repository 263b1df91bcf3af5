"""Compile a Triton kernel for sm_90 without a GPU, specialized as a launch specializes it.

Why: CI has no GPU, yet a kernel must be shown to build for Hopper, and its PTX and machine code read
(tests look for contracted FMAs, flushed subnormals, the e4m3 packing ptxas miscompiles, the order of a
kernel's global loads and stores). A launch
marks 16-byte aligned pointers and integers divisible by 16, and makes an integer equal to 1 a
constant; :func:`compile_sm90` does the same, so the code it returns is the code a launch would run.
Run it where ``TRITON_INTERPRET`` is unset (the interpreter compiles nothing).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import Any, Optional, Union

__all__ = ["compile_sm90", "sass_of", "memory_order", "sass_functions", "loads_after_exit", "loads_before_wait"]


def with_defaults(fn: Any, consts: dict[str, Any]) -> dict[str, Any]:
    """``consts`` plus the defaults of ``fn``'s constexpr parameters it leaves out (a compile needs a
    value for every parameter; the launchers pass only what differs from the default)."""
    return {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}


def compile_sm90(fn: Any, ptrs: dict[str, str], ints: dict[str, int], consts: dict[str, Any], *,
                 int_type: str = "i32", **options: Any) -> Any:  # fmt: skip
    """The compiled kernel ``fn`` (a ``@triton.jit`` function) for sm_90: ``ptrs`` maps pointer
    arguments to their Triton types (``"*u8"``; all marked 16-byte aligned), ``ints`` integer arguments
    to example values (1: a constant; a multiple of 16: marked so; typed ``int_type``), ``consts`` the
    constexpr arguments; ``options`` go to ``triton.compile`` (``num_warps=4``, ``enable_fp_fusion=False``).
    ``.asm["ptx"]``, ``.asm["cubin"]`` hold the code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index = fn.arg_names.index
    sig: dict[str, str] = dict(ptrs)
    attrs = {(index(k),): [["tt.divisibility", 16]] for k in ptrs}
    consts = with_defaults(fn, consts)
    cx = dict(consts)
    for k, v in ints.items():
        if v == 1:
            sig[k], cx[k] = "constexpr", 1
        else:
            sig[k] = int_type
            if v % 16 == 0 and v:
                attrs[(index(k),)] = [["tt.divisibility", 16]]
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs={(index(a),): v for a, v in cx.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _triton_tool(name: str) -> Optional[str]:
    """The path of a CUDA binary tool Triton ships (``nvdisasm``, ``cuobjdump``), or None."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def sass_of(kernel: Any) -> Optional[str]:
    """The machine code of a compiled kernel, disassembled by the ``nvdisasm`` Triton ships; None where
    Triton ships none (or produced no cubin)."""
    nvdisasm = _triton_tool("nvdisasm")
    if nvdisasm is None or "cubin" not in kernel.asm:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout or None


def _sass_ops(*names: str) -> re.Pattern:
    """A pattern for the SASS instructions ``names`` (their opcode without modifiers), each match
    ``(predicate or "", opcode)``: ``@P0 EXIT`` gives ``("@P0 ", "EXIT")``."""
    return re.compile(r"/\*[0-9a-f]{4}\*/\s+(@!?U?P\w+\s+)?(" + "|".join(names) + r")\b")


_GLOBAL_ACCESS = _sass_ops("LDG", "STG")


def memory_order(sass: str) -> list[tuple[str, int]]:
    """The global loads and stores of machine code ``sass`` in program order, as runs: ``[("LDG", 8),
    ("STG", 6)]`` for eight loads, then six stores.

    A kernel whose destination may alias a source (the compiler cannot tell) keeps every load written
    after a store after it: ``[("LDG", 7), ("STG", 4), ("LDG", 1), ("STG", 1)]`` waits for memory twice
    per program where loads first would wait once. Branches are not followed: a run of code laid out
    after another is listed after it."""
    runs: list[tuple[str, int]] = []
    for _, op in _GLOBAL_ACCESS.findall(sass):
        if runs and runs[-1][0] == op:
            runs[-1] = (op, runs[-1][1] + 1)
        else:
            runs.append((op, 1))
    return runs


def sass_functions(library: Union[str, os.PathLike]) -> Optional[dict[str, str]]:
    """The machine code of every kernel in a built shared library (a JIT module:
    :func:`mlakv.kernels.cuda.loader.library_of`), disassembled by the ``cuobjdump`` Triton ships:
    ``{mangled kernel name: SASS}``; None where Triton ships no ``cuobjdump``."""
    cuobjdump = _triton_tool("cuobjdump")
    if cuobjdump is None:
        return None
    text = subprocess.run([cuobjdump, "-sass", str(library)], capture_output=True, text=True, check=True).stdout
    out: dict[str, str] = {}
    for part in re.split(r"\n\s*Function : ", text)[1:]:
        name, _, body = part.partition("\n")
        out[name.strip()] = body
    return out


_LOAD_OR_EXIT = _sass_ops("LDG", "EXIT")


def loads_after_exit(sass: str) -> int:
    """How many global loads ``sass`` lays out after its first conditional exit that follows a global
    load: 0 when every load is issued before any thread may leave on a test of what was loaded.

    A write kernel reads loc, its sources and any scale independently of each other, so all of them can
    be in flight at once and the kernel waits for memory once. A load placed after a test of loc (the
    compiler sinks a load whose value only the store path uses into that path) waits a second round
    trip. Branches are not followed; an exit at entry (before any load: a thread with no row) does not
    count."""
    loaded = False
    after = None
    for pred, op in _LOAD_OR_EXIT.findall(sass):
        if op == "LDG":
            if after is not None:
                after += 1
            loaded = True
        elif pred and loaded and after is None:
            after = 0
    return after or 0


_LOAD_OR_WAIT = _sass_ops("LDG", "ACQBULK")


def loads_before_wait(sass: str) -> Optional[int]:
    """How many global loads ``sass`` lays out before its first ``ACQBULK`` (``griddepcontrol.wait``,
    the wait of programmatic dependent launch for the grid before it); None when it has no wait.

    A kernel launched with PDL may start while the kernel before it still writes its inputs: a load
    issued before the wait can read them stale. Branches are not followed."""
    ops = [op for _, op in _LOAD_OR_WAIT.findall(sass)]
    return ops.index("ACQBULK") if "ACQBULK" in ops else None
