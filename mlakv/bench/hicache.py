"""HiCache transfer bandwidth (``mlakv bench hicache``): backup (device -> host, all layers) and
per-layer load (host -> device) of scattered whole pages, against ``copy_`` of one contiguous block
of the same bytes (the ceiling).

On a GPU the host pool is pinned and the copies are mlakv's zero-copy page kernels on a side
stream. Without a GPU the "device" pool lives on the CPU too, the copies are the torch indexing
path, and the output says so: those numbers are host memory bandwidth, not PCIe.
"""

from __future__ import annotations

from typing import Optional

import torch

from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost

from .options import CPU_PAGES, GPU_PAGES, HOST_LAYOUTS, wants_l3
from .options import hicache_parser as build_parser
from .timing import progress, sync, wall_median_s

CPU_LABEL = "CPU copies (torch path; the 'device' pool is on the CPU; GPU numbers need a GPU)"


def copy_ceilings_gbs(nbytes: int, device: torch.device) -> tuple[float, float]:
    """(to-host, to-device) GB/s of one contiguous ``copy_`` of ``nbytes`` (pinned host on GPU)."""
    dev_block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host_block = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    d2h = nbytes / wall_median_s(lambda: host_block.copy_(dev_block, non_blocking=True), device) / 1e9
    h2d = nbytes / wall_median_s(lambda: dev_block.copy_(host_block, non_blocking=True), device) / 1e9
    return d2h, h2d


def bench_host_layout(
    pool: MLATokenToKVPool, n_pages: int, layout: str, device: torch.device, sms: int = 8
) -> Optional[tuple[float, float]]:
    """(backup GB/s, load GB/s) of ``n_pages`` scattered pages through a host pool of ``layout``;
    None if the round trip does not reproduce the device rows bit-exactly (then nothing is timed).
    ``sms``: the transfer kernel's persistent grid (the most SMs it occupies)."""
    P, L = pool.page_size, pool.layer_num
    host = MLATokenToKVPoolHost(pool, host_size=n_pages * P, layout=layout, transfer_sms=sms)
    perm = torch.randperm(n_pages)  # scattered pages on both sides
    dev_slots = ((perm[:, None] + 1) % n_pages * P + torch.arange(P)).flatten()
    host_slots = host.alloc(n_pages * P)
    host_slots = host_slots.view(n_pages, P)[torch.randperm(n_pages)].flatten()

    def backup():
        host.backup_from_device_all_layer(pool, host_slots, dev_slots)
        host.synchronize()

    def load():
        for layer in range(L):
            host.load_to_device_per_layer(pool, host_slots, dev_slots, layer)
        host.synchronize()

    d = dev_slots.to(device)
    ref = [b[d].clone() for b in pool.kv_buffer]
    backup()
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)
    load()
    sync(device)
    if not all(torch.equal(a.view(torch.uint8), b[d].view(torch.uint8)) for a, b in zip(ref, pool.kv_buffer)):
        return None
    nbytes = n_pages * P * pool.row_bytes() * L
    return nbytes / wall_median_s(backup, device) / 1e9, nbytes / wall_median_s(load, device) / 1e9


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench hicache``: returns 0, or 1 when a round trip was wrong.

    Rows are printed as they are measured; Ctrl-C raises ``KeyboardInterrupt`` saying how many were.
    With ``--l3`` it runs the L3 store bench (``mlakv bench hicache --l3 mooncake``).
    """
    argv = list(argv or [])
    if wants_l3(argv):
        from . import main as bench_main

        return bench_main(["hicache", *argv])
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    P, L = args.page_size, args.layers
    pages = args.pages or (GPU_PAGES if cuda else CPU_PAGES)
    layouts = HOST_LAYOUTS if args.layouts == "both" else [args.layouts]
    where = torch.cuda.get_device_name() if cuda else CPU_LABEL
    print(f"# HiCache transfers on {where}: bf16 512+64 (1152 B rows), page {P}, {L} layers")
    print("| pages | layout | SMs | bytes | backup GB/s | load GB/s (all layers, per-layer calls) | to-host copy_ GB/s | "
          "to-device copy_ GB/s | backup/ceiling | load/ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    wrong = False
    done = 0
    try:
        for n_pages in pages:
            progress(f"{n_pages} pages: allocating and measuring the copy ceiling")
            pool = MLATokenToKVPool(n_pages * P, P, torch.bfloat16, 512, 64, L, device)
            for b in pool.kv_buffer:
                b.view(torch.uint8).random_(0, 256)
            nbytes = n_pages * P * pool.row_bytes() * L
            d2h, h2d = copy_ceilings_gbs(nbytes, device)
            for layout, sms in [(lay, k) for lay in layouts for k in args.sms]:
                progress(f"{n_pages} pages, {layout}, {sms} SMs")
                got = bench_host_layout(pool, n_pages, layout, device, sms)
                done += 1
                if got is None:
                    wrong = True
                    print(f"| {n_pages} | {layout} | {sms} | WRONG: round trip differs, not timed |", flush=True)
                    continue
                bk, ld = got
                print(f"| {n_pages} | {layout} | {sms} | {nbytes / 2**20:.0f} MiB | {bk:.1f} | {ld:.1f} | {d2h:.1f} | "
                      f"{h2d:.1f} | {bk / d2h:.0%} | {ld / h2d:.0%} |", flush=True)  # fmt: skip
            del pool
            if cuda:
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the {done} row{'s were' if done != 1 else ' was'} measured so far, printed above") from None
    if not cuda:
        print(f"\n{CPU_LABEL}: these are host-memory copies, not PCIe transfers.")
    return 1 if wrong else 0
