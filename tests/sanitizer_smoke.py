"""A small run of every JIT kernel variant and the Triton row kernel, for compute-sanitizer.

Not collected by pytest (no ``test_`` prefix). On the GPU machine:

    compute-sanitizer --tool memcheck  python tests/sanitizer_smoke.py
    compute-sanitizer --tool racecheck python tests/sanitizer_smoke.py

It also checks every result bit-exactly, so a sanitizer run is a correctness run too.
"""

from __future__ import annotations

import sys

import torch

from mlakv import jit_kernel
from mlakv.mem_cache import set_mla_kv_buffer_torch
from mlakv.mem_cache.triton_kernels import launch_set_kv_rows


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    cases = 0
    for dtype, nd, rd in [(torch.bfloat16, 512, 64), (torch.uint8, 528, 128)]:
        for n in (1, 37, 300):
            num_slots = n + 50
            if dtype == torch.uint8:
                nope = torch.randint(0, 256, (n, nd), dtype=dtype, device="cuda")
                rope = torch.randint(0, 256, (n, rd), dtype=dtype, device="cuda")
            else:
                nope = torch.randn(n, nd, device="cuda").to(dtype)
                rope = torch.randn(n, rd, device="cuda").to(dtype)
            loc = torch.randperm(num_slots, device="cuda")[:n]
            loc[::5] = -1  # padding rows
            base = torch.empty((num_slots, 1, nd + rd), dtype=dtype, device="cuda")
            base.view(torch.uint8).random_(0, 256)
            expected = base.clone()
            set_mla_kv_buffer_torch(expected, loc, nope, rope)
            runs = {"triton": lambda kv: launch_set_kv_rows(kv, loc, nope, rope)}
            for tma in (True, False):
                for warps in (1, 4, 8):
                    for items in (1, 2, 4):
                        runs[f"jit tma={tma} w{warps} i{items}"] = (
                            lambda kv, t=tma, w=warps, i=items: jit_kernel.set_mla_kv_buffer(
                                kv, loc, nope, rope, w, items_per_warp=i, use_tma=t
                            )
                        )
            for name, run in runs.items():
                kv = base.clone()
                run(kv)
                torch.cuda.synchronize()
                cases += 1
                if not torch.equal(kv.view(torch.uint8), expected.view(torch.uint8)):
                    failures += 1
                    print(f"MISMATCH {dtype} n={n} {name}")
    # The gather with out-of-range and negative slots must not touch memory outside the buffer.
    from mlakv.mem_cache.triton_kernels import launch_get_kv_rows

    kv = torch.randn(64, 1, 576, device="cuda").to(torch.bfloat16)
    bad = torch.tensor([3, 64, -1, 10**9, 63], device="cuda")
    nope, rope = launch_get_kv_rows(kv, bad, 512, 64)
    torch.cuda.synchronize()
    cases += 1
    if not (torch.equal(nope[0], kv[3, 0, :512]) and torch.equal(rope[4], kv[63, 0, 512:]) and not nope[1:4].any()):
        failures += 1
        print("MISMATCH gather with invalid slots")
    # HiCache page transfers (transfer_kernels.py): row units (page 1) and page units (page 16), every
    # host layout, a persistent grid of 1 and 8 programs; backup, poison, per-layer load, compare.
    from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost

    for page in (1, 16):
        pool = MLATokenToKVPool(64 * 16, page, torch.bfloat16, 512, 64, 2, "cuda")
        n_pages = 5
        dev = (torch.tensor([3, 1, 7, 2, 9])[:, None] * page + torch.arange(page)).flatten()
        for layout in ("layer_first", "page_first", "page_first_direct"):
            for sms in (1, 8):
                host = MLATokenToKVPoolHost(pool, host_size=64 * 16, layout=layout, transfer_sms=sms)
                hs = host.alloc(n_pages * page).flip(0) if page == 1 else host.alloc(n_pages * page)
                for b in pool.kv_buffer:
                    b.view(torch.uint8).random_(0, 256)
                want = [b[dev.cuda()].clone() for b in pool.kv_buffer]
                host.backup_from_device_all_layer(pool, hs, dev)
                host.synchronize()
                for b in pool.kv_buffer:
                    b.view(torch.uint8).random_(0, 256)
                for layer in range(2):
                    host.load_to_device_per_layer(pool, hs, dev, layer)
                host.synchronize()
                cases += 1
                if not all(torch.equal(w.view(torch.uint8), b[dev.cuda()].view(torch.uint8)) for w, b in zip(want, pool.kv_buffer)):
                    failures += 1
                    print(f"MISMATCH hicache transfer page={page} {layout} sms={sms}")
    print(f"sanitizer smoke: {cases - failures}/{cases} variant runs bit-exact")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
