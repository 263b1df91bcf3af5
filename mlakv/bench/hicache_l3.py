"""HiCache L3 on Mooncake Store (``mlakv bench hicache --l3 mooncake``): what mlakv's layer costs.

Two clients (two "nodes") of one real ``mooncake_master`` on loopback: node A stores a batch of host
pages, node B loads them. Each batch is moved twice, round-robin: by mlakv's
``MooncakeStorage.batch_set_from`` / ``batch_get_into`` (keys, checksum trailer written and verified,
pieces from the host pool's buffer meta) and by the raw ``batch_put_from`` / ``batch_get_into`` of
the same page bytes from the same registered buffers. The table gives pages/s and GB/s of both and
mlakv's overhead: the median over rounds of (mlakv time / raw time of the same round) - 1, so that
load from other jobs, which moves whole rounds, cancels, and in brackets the fastest mlakv round over
the fastest raw round (each the least disturbed); with the XXH3 checksum of the batch timed
alone, on one thread (the checksum's share).

Pages are 64 tokens x 61 layers (DeepSeek-V3's layer count) of bf16 512 + 64 rows (1152 B) and of
the FP8 ``ds_mla`` 656-byte row. Medians over ``--reps`` rounds; the store is emptied between rounds.
On a CPU machine the host pools are pageable and the transport is TCP over loopback.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Optional

import torch

from mlakv.argtypes import positive_int
from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.testing.mooncake_master import MooncakeMaster, MooncakeUnavailable
from mlakv.mem_cache.storage.mooncake import MooncakeStorage, default_checksum_threads

from .timing import progress

ROWS = {"bf16 1152B": (torch.bfloat16, None), "fp8 ds_mla 656B": (torch.float8_e4m3fn, "ds_mla")}
GPU_MACHINE_PAGES = [64, 256, 1024]
CPU_PAGES = [64, 128, 256]  # 1024 pages of 4.3 MiB need ~18 GiB (two host pools + two segments); 23 GiB here


def _csv(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mlakv bench hicache --l3 mooncake", description=__doc__.split("\n\n")[0])
    ap.add_argument("--l3", choices=["mooncake"], required=True, help="the L3 store to time")
    ap.add_argument("--pages", type=_csv, default=None,
                    help=f"comma list of batch sizes in pages (default: CUDA machine {GPU_MACHINE_PAGES}, CPU {CPU_PAGES})")
    ap.add_argument("--layers", type=positive_int, default=61, help="layers per page (default 61)")
    ap.add_argument("--page-size", type=positive_int, default=64, help="tokens per page (default 64)")
    ap.add_argument("--reps", type=positive_int, default=9, help="timed rounds per batch size (default 9)")
    ap.add_argument("--checksum-threads", type=positive_int, default=None,
                    help="MooncakeStorage checksum_threads (default: its own, default_checksum_threads())")
    return ap


def _host(dtype, fmt, n_pages: int, P: int, L: int) -> MLATokenToKVPoolHost:
    dev = MLATokenToKVPool(P, P, dtype, 512, 64, L, "cpu", kv_cache_format=fmt)
    host = MLATokenToKVPoolHost(dev, host_size=max(n_pages, 1) * P, layout="page_first_direct")
    host.kv_buffer.view(-1).view(torch.uint8).random_(0, 256)
    return host


def bench_one(m: MooncakeMaster, dtype, fmt, n_pages: int, P: int, L: int, reps: int,
              checksum_threads: Optional[int] = None) -> dict:
    """Medians (s) of raw put/get, mlakv set/get and the checksum alone for one batch of ``n_pages``,
    the medians of the per-round ratios ``set_ratio`` (set / raw put) and ``get_ratio``, and the
    ratios of the fastest rounds ``set_best`` / ``get_best`` (the rounds least disturbed by other jobs)."""
    src, dst = _host(dtype, fmt, n_pages, P, L), _host(dtype, fmt, n_pages, P, L)
    seg = int(n_pages * (src.page_bytes + 4096) * 1.5) + (64 << 20)
    kw = dict(global_segment_bytes=seg, model_id="bench", checksum_threads=checksum_threads)
    a = MooncakeStorage(src, m.master_addr, m.metadata_url, **kw)
    b = MooncakeStorage(dst, m.master_addr, m.metadata_url, **kw)
    try:
        import xxhash  # present: MooncakeStorage required it

        slots = torch.arange(n_pages) * P
        ptr_src, sizes = src.get_page_buffer_meta(torch.arange(n_pages * P))
        ptr_dst, _ = dst.get_page_buffer_meta(torch.arange(n_pages * P))
        keys = [f"page{i}" for i in range(n_pages)]
        raw_keys = [f"raw/{k}" for k in keys]
        ra, rb = a.raw_client, b.raw_client
        t = {k: [] for k in ("raw_put", "raw_get", "set", "get", "crc")}
        ok = True
        for rep in range(reps + 1):  # round 0 warms up (connections, page faults)
            ra.remove_all(True)
            s0 = time.perf_counter()
            codes = ra.batch_put_from(raw_keys, ptr_src, sizes)
            s1 = time.perf_counter()
            got = rb.batch_get_into(raw_keys, ptr_dst, sizes)
            s2 = time.perf_counter()
            ok &= all(c == 0 for c in codes) and all(g == sizes[0] for g in got)
            ra.remove_all(True)
            dst.kv_buffer.zero_()
            s3 = time.perf_counter()
            a.batch_set_from(keys, slots)
            s4 = time.perf_counter()
            ok &= b.batch_get_into(keys, slots) == n_pages
            s5 = time.perf_counter()
            for p in range(n_pages):
                xxhash.xxh3_64_intdigest(src.page_view(p * P).numpy())
            s6 = time.perf_counter()
            ok &= torch.equal(src.kv_buffer.view(-1).view(torch.uint8), dst.kv_buffer.view(-1).view(torch.uint8))
            if rep:
                for k, v in zip(t, (s1 - s0, s2 - s1, s4 - s3, s5 - s4, s6 - s5)):
                    t[k].append(v)
        ra.remove_all(True)
        out = {k: statistics.median(v) for k, v in t.items()}
        out["set_ratio"] = statistics.median(s / r for s, r in zip(t["set"], t["raw_put"]))
        out["get_ratio"] = statistics.median(g / r for g, r in zip(t["get"], t["raw_get"]))
        out["set_best"], out["get_best"] = min(t["set"]) / min(t["raw_put"]), min(t["get"]) / min(t["raw_get"])
        out["ok"], out["bytes"] = ok, n_pages * src.page_bytes
        return out
    finally:
        a.close()
        b.close()


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench hicache --l3 mooncake``: returns 0, 1 if a round trip was wrong, 2 without Mooncake."""
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    pages = args.pages or (GPU_MACHINE_PAGES if cuda else CPU_PAGES)
    P, L = args.page_size, args.layers
    try:
        master = MooncakeMaster().start()
    except MooncakeUnavailable as e:
        print(f"mlakv bench hicache --l3 mooncake: {e}", file=sys.stderr)
        return 2
    wrong = False
    try:
        pinned = _host(torch.bfloat16, None, 1, P, 1).pinned
        print(f"# HiCache L3 on Mooncake Store (TCP over loopback, two clients of one master; host pools "
              f"{'pinned' if pinned else 'pageable'}), page {P} tokens x {L} layers, medians of {args.reps}, "
              f"checksum threads {args.checksum_threads or default_checksum_threads()}")
        print("| row | pages | batch MiB | raw put GB/s | mlakv set GB/s | set overhead (best) | raw get GB/s | "
              "mlakv get GB/s | get overhead (best) | mlakv get pages/s | XXH3 alone GB/s (1 thread) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, (dtype, fmt) in ROWS.items():
            for n in pages:
                progress(f"{label}, {n} pages")
                r = bench_one(master, dtype, fmt, n, P, L, args.reps, args.checksum_threads)
                gb = r["bytes"] / 1e9
                wrong |= not r["ok"]
                print(f"| {label} | {n} | {r['bytes'] / 2**20:.0f} | {gb / r['raw_put']:.2f} | {gb / r['set']:.2f} | "
                      f"{r['set_ratio'] - 1:+.0%} ({r['set_best'] - 1:+.0%}) | {gb / r['raw_get']:.2f} | {gb / r['get']:.2f} | "
                      f"{r['get_ratio'] - 1:+.0%} ({r['get_best'] - 1:+.0%}) | {n / r['get']:,.0f} | {gb / r['crc']:.2f} |"
                      + ("" if r["ok"] else " WRONG: round trip differs |"))
    finally:
        master.stop()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
