"""HiCache transfer bandwidth: backup (device -> host, all layers) and per-layer load (host -> device)
of scattered whole pages, against ``copy_`` of one contiguous pinned block of the same bytes.

    python benchmarks/hicache_bench.py [--pages 1024,16384] [--layers 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost  # noqa: E402


def _time(fn, reps=5) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", default="1024,16384")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=64)
    args = ap.parse_args(argv)
    P, L = args.page_size, args.layers
    print(f"# HiCache transfers on {torch.cuda.get_device_name()}: bf16 512+64 (1152 B rows), page {P}, {L} layers")
    print("| pages | layout | bytes | backup GB/s | load GB/s (all layers, per-layer calls) | D2H copy_ GB/s | H2D copy_ GB/s | backup/ceiling | load/ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n_pages in [int(x) for x in args.pages.split(",")]:
        pool = MLATokenToKVPool(n_pages * P, P, torch.bfloat16, 512, 64, L, "cuda")
        for b in pool.kv_buffer:
            b.view(torch.uint8).random_(0, 256)
        nbytes = n_pages * P * pool.row_bytes() * L
        dev_block = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        host_block = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        d2h = nbytes / _time(lambda: host_block.copy_(dev_block, non_blocking=True)) / 1e9
        h2d = nbytes / _time(lambda: dev_block.copy_(host_block, non_blocking=True)) / 1e9
        del dev_block, host_block
        for layout in ("layer_first", "page_first"):
            host = MLATokenToKVPoolHost(pool, host_size=n_pages * P, layout=layout)
            perm = torch.randperm(n_pages)  # scattered pages on both sides
            dev_slots = ((perm[:, None] + 1) % n_pages * P + torch.arange(P)).flatten()
            host_slots = host.alloc(n_pages)[torch.randperm(n_pages)[:, None] * P + torch.arange(P)].flatten()

            def backup():
                host.backup_from_device_all_layer(pool, host_slots, dev_slots)
                host.synchronize()

            def load():
                for layer in range(L):
                    host.load_to_device_per_layer(pool, host_slots, dev_slots, layer)
                host.synchronize()

            d_cuda = dev_slots.cuda()
            ref = [b[d_cuda].clone() for b in pool.kv_buffer]
            backup()
            for b in pool.kv_buffer:
                b.view(torch.uint8).random_(0, 256)
            load()
            ok = all(torch.equal(a.view(torch.uint8), b[d_cuda].view(torch.uint8)) for a, b in zip(ref, pool.kv_buffer))
            if not ok:
                print(f"| {n_pages} | {layout} | WRONG: round trip differs, not timed |")
                continue
            bk = nbytes / _time(backup) / 1e9
            ld = nbytes / _time(load) / 1e9
            print(f"| {n_pages} | {layout} | {nbytes / 2**20:.0f} MiB | {bk:.1f} | {ld:.1f} | {d2h:.1f} | {h2d:.1f} | {bk / d2h:.0%} | {ld / h2d:.0%} |")
            del host
        del pool
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
