"""Host cost of calling the row write through its torch custom op instead of directly.

The pool uses ``torch.ops.mlakv.set_mla_kv_buffer`` only inside ``torch.compile``; eager callers
call the dispatcher directly. This measures what the op's dispatch adds per call (schema parsing,
the dispatcher, autograd/functionalization keys) on the host: a decode-sized write (``n_loc=1``,
512 + 64 bf16) and an empty one (``n_loc=0``: validation only, so the op's own cost stands
out), both sides doing the same work. Medians over rounds of interleaved batches.

    python scripts/custom_op_cost.py [--calls 20000] [--rounds 15] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mlakv.mem_cache import custom_ops  # noqa: F401  (registers torch.ops.mlakv.*)
from mlakv.mem_cache.kv_write import set_mla_kv_buffer_triton


def _per_call_us(fn, calls: int, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    kv = torch.randn(1024, 1, 576).to(torch.bfloat16).to(dev)
    op = torch.ops.mlakv.set_mla_kv_buffer
    print(f"device={dev} bf16 512+64, {args.rounds} rounds x {args.calls} calls, medians in us/call")
    print("| n_loc | direct | via custom op | extra | ratio |")
    print("|---|---|---|---|---|")
    for n_loc in (0, 1):  # 0: the dispatcher validates and returns, so the op's own cost stands out
        loc = torch.arange(7, 7 + n_loc, device=dev)
        nope = torch.randn(n_loc, 512).to(torch.bfloat16).to(dev)
        rope = torch.randn(n_loc, 64).to(torch.bfloat16).to(dev)
        direct = lambda: set_mla_kv_buffer_triton(kv, loc, nope, rope)  # noqa: E731
        via_op = lambda: op(kv, loc, nope, rope)  # noqa: E731
        for f in (direct, via_op):  # warm-up (first calls build caches, JIT modules)
            _per_call_us(f, 200, sync)
        d, o = [], []
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits both alike
            d.append(_per_call_us(direct, args.calls, sync))
            o.append(_per_call_us(via_op, args.calls, sync))
        md, mo = statistics.median(d), statistics.median(o)
        print(f"| {n_loc} | {md:.2f} | {mo:.2f} | {mo - md:.2f} | {mo / md:.2f}x |")

if __name__ == "__main__":
    main()
