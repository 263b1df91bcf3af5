"""Host cost of calling the row write through its torch custom op instead of directly.

The pool uses ``torch.ops.mlakv.set_mla_kv_buffer`` only inside ``torch.compile`` (and a CUDA graph
replay pays nothing at all); eager callers call the dispatcher directly. This measures what the
op's dispatch adds per call on the host: a decode-sized write (``n_loc=1``, 512 + 64 bf16) and an
empty one (``n_loc=0``: validation only, so the op's own cost stands out), both sides doing the same
work, next to the floor: an op of the same schema whose kernel is an empty Python function (what
torch's dispatcher charges for any Python-implemented op: parsing the arguments against the schema,
the boxed dispatch, the call back into Python). Medians over rounds of interleaved batches.

    python -m mlakv.bench.custom_op_cost [--calls 20000] [--rounds 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

from mlakv.ops import custom_ops  # noqa: F401  (registers torch.ops.mlakv.*)
from mlakv.ops.dispatch import set_mla_kv_buffer_triton

from .timing import interleaved_us

_FLOOR_LIB: Optional[torch.library.Library] = None


def _floor_op() -> torch._ops.OpOverload:
    """``mlakv_bench::empty_write``: the write's schema, an empty kernel (the dispatcher's floor)."""
    global _FLOOR_LIB
    if _FLOOR_LIB is None:
        _FLOOR_LIB = torch.library.Library("mlakv_bench", "DEF")
        schema = torch.ops.mlakv.set_mla_kv_buffer.default._schema
        _FLOOR_LIB.define("empty_write" + str(schema)[len(str(schema.name)) :])
        _FLOOR_LIB.impl("empty_write", lambda *args: None, "CompositeExplicitAutograd")
    return torch.ops.mlakv_bench.empty_write.default


def main(argv: Optional[list[str]] = None) -> int:
    """Print the table (markdown): per ``n_loc``, direct and via-op us/call, the extra and the floor."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    kv = torch.randn(1024, 1, 576).to(torch.bfloat16).to(dev)
    op, floor = torch.ops.mlakv.set_mla_kv_buffer.default, _floor_op()
    print(f"device={dev} bf16 512+64, {args.rounds} rounds x {args.calls} calls, medians in us/call")
    print("| n_loc | direct | via custom op | extra | ratio | empty op (floor) |")
    print("|---|---|---|---|---|---|")
    for n_loc in (0, 1):  # 0: the dispatcher validates and returns, so the op's own cost stands out
        loc = torch.arange(7, 7 + n_loc, device=dev)
        nope = torch.randn(n_loc, 512).to(torch.bfloat16).to(dev)
        rope = torch.randn(n_loc, 64).to(torch.bfloat16).to(dev)
        runs = {
            "direct": lambda: set_mla_kv_buffer_triton(kv, loc, nope, rope),
            "op": lambda: op(kv, loc, nope, rope),
            "floor": lambda: floor(kv, loc, nope, rope),
        }
        # 200 warm-up calls each (first calls build caches, JIT modules), then interleaved rounds, so
        # drift in machine load hits all alike
        med = interleaved_us(runs, args.calls, args.rounds, sync, warmup=200)
        md, mo, mf = med["direct"], med["op"], med["floor"]
        print(f"| {n_loc} | {md:.2f} | {mo:.2f} | {mo - md:.2f} | {mo / md:.2f}x | {mf:.2f} |")
    return 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    raise SystemExit(run_module("mlakv.bench.custom_op_cost", main))
