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

Before it starts it prints its estimated duration (from the bytes it will move); Mooncake's own log
is kept at warning level (``MC_LOG_LEVEL``) and a new client's expected "metadata not found" lookup
is left out, unless ``--verbose``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Iterator, Optional

import torch

from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.testing.mooncake_master import MooncakeMaster, MooncakeUnavailable
from mlakv.mem_cache.storage.mooncake import MooncakeStorage, default_checksum_threads

from .options import L3_CPU_PAGES, L3_GPU_MACHINE_PAGES
from .options import hicache_l3_parser as build_parser
from .timing import progress

ROWS = {"bf16 1152B": (torch.bfloat16, None), "fp8 ds_mla 656B": (torch.float8_e4m3fn, "ds_mla")}
ROW_BYTES = {"bf16 1152B": 1152, "fp8 ds_mla 656B": 656}
GPU_MACHINE_PAGES, CPU_PAGES = L3_GPU_MACHINE_PAGES, L3_CPU_PAGES

# Seconds per GB of batch per round (a round moves the batch raw and through mlakv, both ways, hashes
# it and compares it), measured on idle machines: ~5 on a 2-core CPU machine (the default run took
# 129-213 s), ~3 on a 16-core GPU host. Setting a batch up (two host pools filled, two clients
# mounting their segments) costs about SETUP_ROUNDS rounds more; the master a few seconds.
S_PER_GB = (3.0, 6.0)
SETUP_ROUNDS = 2
STARTUP_S = 5.0
PER_BATCH_S = 1.0  # two clients started and closed, two host pools allocated

COLUMNS = (
    "Columns: raw = Mooncake's own batch_put_from / batch_get_into of the page bytes; mlakv = "
    "MooncakeStorage.batch_set_from / batch_get_into of the same pages (keys, checksum written and verified); "
    "overhead = median over rounds of (mlakv time / raw time of the same round) - 1, and in brackets "
    "(fastest mlakv round / fastest raw round) - 1; XXH3 alone = the checksum of the batch on one thread."
)

# What a new client logs while it looks up its own segment before registering it (an error-level
# 404 and a warning on every successful start): left out unless --verbose.
EXPECTED_CLIENT_LOG = ("http=404 body: metadata not found", "Failed to retrieve segment descriptor",
                       "Logging before InitGoogleLogging()")  # fmt: skip


def _work_gb(n_pages: int, row_bytes: int, page_size: int, layers: int, reps: int) -> float:
    """One batch's work in GB-rounds: its bytes times (timed rounds + warm-up round + set-up)."""
    return n_pages * page_size * layers * row_bytes * (reps + 1 + SETUP_ROUNDS) / 1e9


def _batch_s(work_gb: float, s_per_gb: float) -> float:
    return PER_BATCH_S + work_gb * s_per_gb


def estimate_s(pages: list[int], page_size: int, layers: int, reps: int) -> tuple[float, float]:
    """(low, high) estimate in seconds of a run over ``pages`` for both rows, on an idle machine."""
    work = [_work_gb(n, rb, page_size, layers, reps) for n in pages for rb in ROW_BYTES.values()]
    return tuple(STARTUP_S + sum(_batch_s(w, k) for w in work) for k in S_PER_GB)  # type: ignore[return-value]


def _minutes(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"


def _span(lo: float, hi: float) -> str:
    a, b = _minutes(lo), _minutes(hi)
    return f"about {a}" if a == b else f"{a} to {b}"


@contextlib.contextmanager
def native_log_filtered(drop: tuple[str, ...], enabled: bool = True) -> Iterator[None]:
    """Route file descriptor 2 (where Mooncake's C++ logs go) to a temporary file for the block, then
    write its lines back to stderr, leaving out those containing any of ``drop``."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines() if not any(d in ln for d in drop)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def _host(dtype, fmt, n_pages: int, P: int, L: int) -> MLATokenToKVPoolHost:
    dev = MLATokenToKVPool(P, P, dtype, 512, 64, L, "cpu", kv_cache_format=fmt)
    host = MLATokenToKVPoolHost(dev, host_size=max(n_pages, 1) * P, layout="page_first_direct")
    host.kv_buffer.view(-1).view(torch.uint8).random_(0, 256)
    return host


def bench_one(m: MooncakeMaster, dtype, fmt, n_pages: int, P: int, L: int, reps: int,
              checksum_threads: Optional[int] = None, verbose: bool = False) -> dict:
    """Medians (s) of raw put/get, mlakv set/get and the checksum alone for one batch of ``n_pages``,
    the medians of the per-round ratios ``set_ratio`` (set / raw put) and ``get_ratio``, and the
    ratios of the fastest rounds ``set_best`` / ``get_best`` (the rounds least disturbed by other jobs)."""
    src, dst = _host(dtype, fmt, n_pages, P, L), _host(dtype, fmt, n_pages, P, L)
    seg = int(n_pages * (src.page_bytes + 4096) * 1.5) + (64 << 20)
    kw = dict(global_segment_bytes=seg, model_id="bench", checksum_threads=checksum_threads)
    with native_log_filtered(EXPECTED_CLIENT_LOG, enabled=not verbose):
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
    """``mlakv bench hicache --l3 mooncake``: returns 0, 1 if a round trip was wrong, 2 without Mooncake.

    Rows are printed as they are measured; Ctrl-C stops the master and raises ``KeyboardInterrupt``
    saying how many rows were.
    """
    args = build_parser().parse_args(argv)
    cuda = torch.cuda.is_available()
    pages = args.pages or (GPU_MACHINE_PAGES if cuda else CPU_PAGES)
    P, L = args.page_size, args.layers
    lo, hi = estimate_s(pages, P, L, args.reps)
    progress(f"mlakv bench hicache --l3 mooncake: {len(ROWS) * len(pages)} batches ({', '.join(ROWS)} x pages "
             f"{','.join(map(str, pages))}), {args.reps} round{'s' if args.reps > 1 else ''} each: estimated {_span(lo, hi)} on an idle machine")
    old_level = os.environ.get("MC_LOG_LEVEL")
    if not args.verbose and old_level is None:
        os.environ["MC_LOG_LEVEL"] = "WARNING"  # Mooncake's clients (and the master) read it when they start
    try:
        return _run(args, pages, P, L, cuda)
    finally:
        if old_level is None:
            os.environ.pop("MC_LOG_LEVEL", None)


def _run(args, pages: list[int], P: int, L: int, cuda: bool) -> int:
    try:
        master = MooncakeMaster().start()
    except MooncakeUnavailable as e:
        print(f"mlakv bench hicache --l3 mooncake: {e}", file=sys.stderr)
        return 2
    wrong = False
    done = 0
    t0 = time.perf_counter()
    try:
        pinned = _host(torch.bfloat16, None, 1, P, 1).pinned
        print(f"# HiCache L3 on Mooncake Store (TCP over loopback, two clients of one master; host pools "
              f"{'pinned' if pinned else 'pageable'}), page {P} tokens x {L} layers, medians of {args.reps}, "
              f"checksum threads {args.checksum_threads or default_checksum_threads()}")
        print(f"\n{COLUMNS}\n")
        print("| row | pages | batch MiB | raw put GB/s | mlakv set GB/s | set overhead (best) | raw get GB/s | "
              "mlakv get GB/s | get overhead (best) | mlakv get pages/s | XXH3 alone GB/s (1 thread) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        # each batch's idle-machine estimate; the batches done so far say how much slower this machine runs
        idle = {(label, n): _batch_s(_work_gb(n, ROW_BYTES[label], P, L, args.reps), sum(S_PER_GB) / 2)
                for label in ROWS for n in pages}  # fmt: skip
        idle_done, t_batches = 0.0, 0.0
        for label, (dtype, fmt) in ROWS.items():
            for n in pages:
                left = ""
                if idle_done:
                    rest = sum(idle.values()) - idle_done
                    left = f"; about {_minutes(rest * t_batches / idle_done)} left at this machine's pace"
                progress(f"{label}, {n} pages (batch {done + 1}/{len(idle)}{left})")
                t_batch = time.perf_counter()
                r = bench_one(master, dtype, fmt, n, P, L, args.reps, args.checksum_threads, args.verbose)
                gb = r["bytes"] / 1e9
                wrong |= not r["ok"]
                done += 1
                idle_done += idle[(label, n)]
                t_batches += time.perf_counter() - t_batch
                print(f"| {label} | {n} | {r['bytes'] / 2**20:.0f} | {gb / r['raw_put']:.2f} | {gb / r['set']:.2f} | "
                      f"{r['set_ratio'] - 1:+.0%} ({r['set_best'] - 1:+.0%}) | {gb / r['raw_get']:.2f} | {gb / r['get']:.2f} | "
                      f"{r['get_ratio'] - 1:+.0%} ({r['get_best'] - 1:+.0%}) | {n / r['get']:,.0f} | {gb / r['crc']:.2f} |"
                      + ("" if r["ok"] else " WRONG: round trip differs |"), flush=True)  # fmt: skip
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"the {done} row{'s were' if done != 1 else ' was'} measured so far, printed above") from None
    finally:
        master.stop()
    progress(f"done in {time.perf_counter() - t0:.0f} s")
    return 1 if wrong else 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.hicache_l3", main))
