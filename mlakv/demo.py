"""``python -m mlakv demo``: the small MLA model served through the pool, prefill then decode.

Prints prefill and decode throughput, the KV-write share of step time (with the dispatcher's path,
with a plain two-``index_put_`` write, and against no write at all), and whether the model over the
pool matched the same model over a plain dict-of-tensors cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from mlakv.mem_cache import MLATokenToKVPool
from mlakv.models import DecodeGraphRunner, DictKVCache, Engine, MLAConfig, PoolKVCache, Request, TokenSlotAllocator
from mlakv.models.mla import PrefillSegment, default_dtype, make_model


class _VariantCache(PoolKVCache):
    """The pool cache with a replaceable row write (for the write-share measurement only)."""

    def __init__(self, pool: MLATokenToKVPool, write_fn: Optional[Callable]) -> None:
        super().__init__(pool)
        self._write_fn = write_fn

    def write(self, layer, loc, k_nope, k_rope):
        if self._write_fn is not None:
            self._write_fn(self.pool, layer, loc, k_nope, k_rope)


def _write_auto(pool, layer, loc, k_nope, k_rope):
    pool.set_kv_buffer(layer, loc, k_nope, k_rope)


def _write_index_put(pool, layer, loc, k_nope, k_rope):
    kv = pool.get_key_buffer(layer)[:, 0]
    r = pool.kv_lora_rank
    kv[:, :r].index_put_((loc,), k_nope)
    kv[:, r : r + pool.qk_rope_head_dim].index_put_((loc,), k_rope)


VARIANTS = {"mlakv dispatcher": _write_auto, "two index_put_": _write_index_put, "no KV write": None}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, reps) -> float:
    fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def reference_check(cfg: MLAConfig, device, dtype) -> bool:
    """A short interleaved workload over the pool and over the dict cache: same tokens, close
    logits, and bit-identical cached rows."""
    model = make_model(cfg, device, dtype)
    pool = MLATokenToKVPool(1024, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)
    ref = DictKVCache(cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (17, 40, 9)]
    outs = []
    for cache in (PoolKVCache(pool), ref):
        eng = Engine(model, cache, TokenSlotAllocator(pool.num_slots, 1), device)
        reqs = [Request(p, 8) for p in prompts]
        eng.prefill(reqs[:2])
        eng.decode_step(use_graph=False)
        eng.prefill(reqs[2:])
        while eng.running:
            eng.decode_step(use_graph=False)
        outs.append(reqs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    same = all(a.output == b.output for a, b in zip(*outs)) and all(
        torch.allclose(x, y, rtol=tol, atol=tol) for a, b in zip(*outs) for x, y in zip(a.logits, b.logits)
    )
    rows_same = all(
        torch.equal(pool.get_key_buffer(layer)[slot, 0].view(torch.uint8), ref.rows[(layer, slot)].view(torch.uint8))
        for (layer, slot) in ref.rows
    )
    return same and rows_same


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlakv demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=None, help="prefill batch size")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--decode-batch", type=int, default=None)
    ap.add_argument("--decode-steps", type=int, default=32)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = default_dtype(device)
    cfg = MLAConfig(vocab_size=4096, hidden=512, n_heads=8, n_layers=args.layers)
    n_prompts = args.prompts or (16 if gpu else 4)
    plen = args.prompt_len or (1024 if gpu else 64)
    dbatch = args.decode_batch or (32 if gpu else 8)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"mlakv demo on {name}: {cfg.n_layers}-layer MLA model (kv_lora_rank {cfg.kv_lora_rank} + rope "
          f"{cfg.qk_rope_head_dim}, {dtype}), prefill {n_prompts} x {plen} tokens, decode batch {dbatch}"
          f"{' under CUDA graphs' if gpu else ' (eager)'}")

    ok = reference_check(MLAConfig(vocab_size=512, hidden=128, n_heads=2, n_layers=2), device, dtype)
    print(f"reference check (pool vs dict-of-tensors cache: tokens, logits, cached rows): {'PASSED' if ok else 'FAILED'}")

    model = make_model(cfg, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (plen,), generator=g).tolist() for _ in range(n_prompts)]
    ctx = 64 + args.decode_steps + 8
    pool_size = max(n_prompts * plen, dbatch * ctx) + 64
    pool = MLATokenToKVPool(pool_size, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)

    caches = {label: _VariantCache(pool, fn) for label, fn in VARIANTS.items()}

    # Prefill: the model's forward over the whole batch (inputs built once, outside the timing). On
    # a GPU each variant's forward is captured in a CUDA graph and the replay is timed, so the host's
    # Python (a per-request loop here) does not drown the device time. Variants are timed
    # round-robin, so drift (clocks, allocator state) hits them all alike.
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.arange(plen, device=device).repeat(n_prompts)
    loc = torch.arange(1, 1 + n_prompts * plen, device=device)
    segs = [PrefillSegment(i * plen, plen, loc[i * plen : (i + 1) * plen]) for i in range(n_prompts)]
    prefill_fns = {}
    for label, cache in caches.items():
        fn = (lambda c=cache: model.prefill(c, ids, pos, loc, segs))
        if gpu:
            fn()  # warm-up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        prefill_fns[label] = fn
    samples: dict[str, list[float]] = {label: [] for label in VARIANTS}
    for rep in range(11):
        for label, fn in prefill_fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if rep:  # the first round warms up
                samples[label].append(time.perf_counter() - t0)
    t_prefill = {label: statistics.median(v) for label, v in samples.items()}
    del prefill_fns

    # Decode: dbatch requests with 64-token contexts; the step is timed by graph replay on GPU.
    rows = []
    for label, cache in caches.items():
        eng = Engine(model, cache, TokenSlotAllocator(pool.num_slots, 1), device)
        reqs = [Request(p[:64], args.decode_steps + 2) for p in (prompts * dbatch)[:dbatch]]
        eng.prefill(reqs)
        runner = DecodeGraphRunner(model, cache, [dbatch], max_ctx=ctx, device=device)
        if gpu:
            runner.capture()
        eng.graph_runner, eng.padded_runner = (runner if gpu else None), runner
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            eng.decode_step(use_graph=gpu)
        _sync(device)
        t_decode_loop = (time.perf_counter() - t0) / args.decode_steps
        if gpu:
            t_step = _median_time(lambda: runner.graphs[dbatch].replay(), device, reps=50)
        else:
            t_step = t_decode_loop
        rows.append((label, t_prefill[label], t_step, t_decode_loop))
        del runner, eng

    base = {r[0]: r for r in rows}
    none = base["no KV write"]
    print()
    print(f"| KV write | prefill ms{' (graph)' if gpu else ''} | prefill tok/s | decode step us{' (graph)' if gpu else ''} | decode tok/s (engine loop) | KV-write share of prefill | of decode step |")
    print("|---|---|---|---|---|---|---|")
    for label, tp, ts, tl in rows:
        share_p = (tp - none[1]) / tp if label != "no KV write" else 0.0
        share_d = (ts - none[2]) / ts if label != "no KV write" else 0.0
        print(f"| {label} | {tp * 1e3:.2f} | {n_prompts * plen / tp:,.0f} | {ts * 1e6:.1f} | {dbatch / tl:,.0f} | "
              f"{share_p:.1%} | {share_d:.1%} |")
    print()
    print("Shares are (time with the write - time without) / time with it; differences under ~1% are within noise.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
