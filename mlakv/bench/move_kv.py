"""Benchmark of ``move_kv_cache``: mlakv's one-launch Triton move vs one indexed copy per layer.

sglang moves the accepted draft tokens' rows in every layer after a speculative-decoding step;
done with torch indexing that is ``kv[tgt] = kv[src]`` per layer (a gather and a scatter each).
mlakv's kernel covers every layer in one launch: ``staged`` (any overlap; the default) or
``direct`` (disjoint sets). Rows are moved within 61-layer bf16 512+64 buffers; medians of CUDA
events over repeated launches, side by side, with ratios to the torch loop.

    python -m mlakv.bench.move_kv [--layers 61] [--n 8 64 512 4096]
"""

from __future__ import annotations

import argparse

import torch

from mlakv.kernels.triton.move import launch_move_kv_rows
from mlakv.ops.move import move_kv_cache_torch

from .timing import event_median_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--slots", type=int, default=65536)
    ap.add_argument("--n", type=int, nargs="+", default=[8, 64, 512, 4096])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mlakv.bench.move_kv needs a CUDA GPU")
    bufs = [torch.randn(args.slots, 1, 576, device="cuda").to(torch.bfloat16) for _ in range(args.layers)]
    print(f"{torch.cuda.get_device_name()}, {args.layers} layers x {args.slots} slots, bf16 512+64; median us")
    print("| n rows | torch loop (per layer) | mlakv staged | mlakv direct | staged vs torch | direct vs torch |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        perm = torch.randperm(args.slots - 1, device="cuda") + 1
        src, tgt = perm[:n], perm[n : 2 * n]  # disjoint, so all three may run
        t_torch = event_median_us(lambda: move_kv_cache_torch(bufs, tgt, src))
        t_staged = event_median_us(lambda: launch_move_kv_rows(bufs, tgt, src))
        t_direct = event_median_us(lambda: launch_move_kv_rows(bufs, tgt, src, disjoint=True))
        print(f"| {n} | {t_torch:.1f} | {t_staged:.1f} | {t_direct:.1f} | {t_torch / t_staged:.2f}x | {t_torch / t_direct:.2f}x |")


if __name__ == "__main__":
    main()
