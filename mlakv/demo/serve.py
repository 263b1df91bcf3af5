"""``python -m mlakv demo``: the small MLA model served through the pool, prefill then decode.

Prints prefill and decode throughput, the KV-write share of step time (with the dispatcher's path,
with a plain two-``index_put_`` write, and against no write at all), and whether the model over the
pool matched the same model over a plain dict-of-tensors cache. The three write variants are timed
round-robin (prefill and decode alike), so drift hits them alike. On a CPU no share is printed:
there the model's matmuls dominate and their noise exceeds the write.

Each step is one function (reference check, prefill timing, decode timing, report); the parser is
:func:`mlakv.demo.options.build_parser` (torch-free, so ``--help`` is instant), so an option is added
there and used where its step is.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from mlakv.mem_cache import MLATokenToKVPool
from mlakv.mem_cache.memory_pool import host_available_bytes
from mlakv.demo.engine import DecodeGraphRunner, Engine, Request
from mlakv.demo.model import DictKVCache, MLAConfig, PoolKVCache, QuantizedPoolKVCache, fused_step_available
from mlakv.mem_cache.allocator import TokenSlotAllocator
from mlakv.ops.v4 import V4_LAYOUTS
from mlakv.demo.model import MLAModel, PrefillSegment, default_dtype, make_model
from mlakv.demo.options import build_parser


class _VariantCache(PoolKVCache):
    """The pool cache with a replaceable row write (for the write-share measurement only)."""

    def __init__(self, pool: MLATokenToKVPool, write_fn: Optional[Callable], fused: bool = False) -> None:
        super().__init__(pool, fused=fused)
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
# The fused cache step (RoPE, the row write and the absorbed query, one launch per layer), timed beside
# the variants above where the pool takes it; they rotate with torch kernels before their write.
FUSED_LABEL = "fused step (RoPE + write + query)"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def progress(msg: str) -> None:
    """A progress line on stderr (the report goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def round_robin_medians(
    fns: dict[str, Callable[[], None]], device, reps: int, warmup: int = 1, what: str = "timing"
) -> dict[str, float]:
    """Median wall time (s) of each callable, timed in turn ``reps`` times each after ``warmup`` rounds.

    A round that ends more than ~2 s after the last progress line prints one (``what``, round i/n).
    """
    samples: dict[str, list[float]] = {label: [] for label in fns}
    last = time.perf_counter()
    for rep in range(warmup + reps):
        if time.perf_counter() - last > 2.0:
            progress(f"  {what}: round {rep + 1}/{warmup + reps}")
            last = time.perf_counter()
        for label, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if rep >= warmup:
                samples[label].append(time.perf_counter() - t0)
    return {label: statistics.median(v) for label, v in samples.items()}


def reference_check(cfg: MLAConfig, device, dtype, fused: bool = False) -> bool:
    """A short interleaved workload over the pool and over the dict cache: same tokens, close
    logits, and bit-identical cached rows. ``fused``: the pool cache takes the fused cache step where
    the pool allows it."""
    model = make_model(cfg, device, dtype)
    pool = MLATokenToKVPool(1024, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)
    ref = DictKVCache(cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (17, 40, 9)]
    outs = []
    for cache in (PoolKVCache(pool, fused=fused), ref):
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


def time_prefill(model, caches: dict, prompts: list[list[int]], device, gpu: bool) -> dict[str, float]:
    """Median prefill time (s) per variant: the model's forward over the whole batch.

    Inputs are built once, outside the timing. On a GPU each variant's forward is captured in a
    CUDA graph and the replay is timed, so the host's Python (a per-request loop here) does not
    drown the device time. Variants are timed round-robin.
    """
    n_prompts, plen = len(prompts), len(prompts[0])
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    pos = torch.arange(plen, device=device).repeat(n_prompts)
    loc = torch.arange(1, 1 + n_prompts * plen, device=device)
    segs = [PrefillSegment(i * plen, plen, loc[i * plen : (i + 1) * plen]) for i in range(n_prompts)]
    fns = {}
    for label, cache in caches.items():
        fn = (lambda c=cache: model.prefill(c, ids, pos, loc, segs))
        if gpu:
            progress(f"prefill: capturing the {label!r} forward in a CUDA graph")
            fn()  # warm-up outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        fns[label] = fn
    reps = 10 if gpu else 3  # CPU: a prefill takes seconds there, and the shares are not meaningful anyway
    progress(f"prefill: timing {len(fns)} variants round-robin, {reps} rounds")
    return round_robin_medians(fns, device, reps=reps, what="prefill")


def time_decode(model, caches: dict, prompts: list[list[int]], dbatch: int, steps: int, ctx: int, pool, device, gpu: bool):
    """Per variant: (decode step s — graph replay on GPU, engine step on CPU; engine-loop step s).

    ``dbatch`` requests with 64-token contexts per variant; every variant's engine steps in turn,
    one step each per round, and (GPU) the graph replays are timed round-robin too.
    """
    engines, runners = {}, {}
    for label, cache in caches.items():
        eng = Engine(model, cache, TokenSlotAllocator(pool.num_slots, 1), device)
        eng.prefill([Request(p[:64], steps + 2) for p in (prompts * dbatch)[:dbatch]])
        runner = DecodeGraphRunner(model, cache, [dbatch], max_ctx=ctx, device=device)
        if gpu:
            progress(f"decode: capturing the {label!r} step in a CUDA graph")
            runner.capture()
        eng.graph_runner, eng.padded_runner = (runner if gpu else None), runner
        engines[label], runners[label] = eng, runner
    progress(f"decode: {steps} engine steps per variant, round-robin")
    loop = round_robin_medians({label: (lambda e=e: e.decode_step(use_graph=gpu)) for label, e in engines.items()},
                               device, reps=max(1, steps - 1), what="decode (engine loop)")
    if gpu:
        step = round_robin_medians({label: r.graphs[dbatch].replay for label, r in runners.items()}, device, reps=50,
                                   what="decode (graph replay)")
    else:
        step = loop
    return {label: (step[label], loop[label]) for label in caches}


def report(t_prefill: dict, t_decode: dict, n_tokens: int, dbatch: int, gpu: bool) -> None:
    """Print the table: throughput per variant and, on a GPU, the KV-write share of each step.

    On a CPU no share is printed: the model's CPU matmuls dominate a step and their noise exceeds
    the write, so the difference between variants says nothing about the write.
    """
    none_p, (none_d, _) = t_prefill["no KV write"], t_decode["no KV write"]
    g = " (graph)" if gpu else ""
    print()
    head = f"| KV write | prefill ms{g} | prefill tok/s | decode step us{g} | decode tok/s (engine loop) |"
    print(head + (" KV-write share of prefill | of decode step |" if gpu else ""))
    print("|---|---|---|---|---|" + ("---|---|" if gpu else ""))
    for label in t_prefill:
        tp, (ts, tl) = t_prefill[label], t_decode[label]
        cells = f"| {label} | {tp * 1e3:.2f} | {n_tokens / tp:,.0f} | {ts * 1e6:.1f} | {dbatch / tl:,.0f} |"
        if gpu:
            share_p = (tp - none_p) / tp if label != "no KV write" else 0.0
            share_d = (ts - none_d) / ts if label != "no KV write" else 0.0
            cells += f" {share_p:.1%} | {share_d:.1%} |"
        print(cells)
    print()
    if gpu:
        print("Shares are (time with the write - time without) / time with it; differences under ~1% are within noise.")
    else:
        print("CPU run: no KV-write shares — the model's CPU matmuls dominate each step and their noise exceeds the "
              "write; run on a GPU for the write's share.")


def fp8_logit_drift(cfg: MLAConfig, model, device, dtype, fmt: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """Run ``prompts`` (eager) on the plain cache and on an FP8 cache of format ``fmt``; compare the
    logits of every generated token while both runs have produced the same tokens so far.

    per_tensor's ``k_scale`` is calibrated as engines do it: the plain run's largest cached |value| / 448.
    Returns ``max_abs``, ``mean_abs`` (logit differences), ``top1`` (argmax agreement) and ``compared``.
    """
    size = sum(len(p) + new_tokens for p in prompts) + 64
    runs, pools = [], []
    for kind in ("plain", fmt):
        if kind == "plain":
            pool = MLATokenToKVPool(size, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)
            cache = PoolKVCache(pool)
        else:
            k_scale = None
            if fmt == "per_tensor":
                amax = max(float(b.float().abs().max()) for b in pools[0].kv_buffer)
                k_scale = max(amax / 448.0, 1e-12)
            pool = MLATokenToKVPool(size, 1, torch.float8_e4m3fn, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                                    cfg.n_layers, device, kv_cache_format=fmt, k_scale=k_scale)  # fmt: skip
            cache = QuantizedPoolKVCache(pool, dtype)
        pools.append(pool)
        eng = Engine(model, cache, TokenSlotAllocator(pool.num_slots, 1), device)
        reqs = [Request(p, new_tokens) for p in prompts]
        eng.prefill(reqs)
        while eng.running:
            eng.decode_step(use_graph=False)
        runs.append(reqs)
    diffs, agree = [], []
    for a, b in zip(*runs):
        for t, (la, lb) in enumerate(zip(a.logits, b.logits)):
            if a.output[:t] != b.output[:t]:
                break  # the runs have fed different tokens since: their logits are not comparable
            diffs.append((la.float() - lb.float()).abs().flatten())
            agree.append(int(la.argmax()) == int(lb.argmax()))
    d = torch.cat(diffs)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "top1": sum(agree) / len(agree), "compared": len(agree)}


#: The DeepSeek-V4 family's paged formats (:data:`mlakv.ops.v4.V4_LAYOUTS`): tokens of 448 + 64 values.
V4_FORMATS = tuple(V4_LAYOUTS)
V4_NOPE, V4_ROPE = 448, 64
#: The least share of decode steps whose greedy token must equal the plain cache's (issue 23's goal).
MIN_AGREEMENT = 0.95


def v4_greedy_agreement(cfg: MLAConfig, device, dtype, fmt: str, prompts: list[list[int]], new_tokens: int,
                        page_size: int = 64) -> dict:  # fmt: skip
    """The model at the V4 family's widths (``cfg`` with ``kv_lora_rank`` 448, rope 64) run end to end
    on a plain cache of ``dtype`` and on a pool of V4-family format ``fmt`` (pages of ``page_size``
    tokens; the tokens quantized in the pool's write, dequantized by its gather), prefill then eager
    greedy decode of ``new_tokens`` per prompt, the two engines in lockstep.

    After every step the quantized run is fed the plain run's token (teacher forcing), so each decode
    step compares the two caches on the same inputs, and one early difference does not make every later
    step differ. Returns ``agreement`` (the share of decode steps whose greedy token equals the plain
    run's), ``steps`` (decode steps compared), ``first_agreement`` (the prefill's first tokens),
    ``max_abs`` / ``mean_abs`` (the decode steps' logit differences, fp32) and ``format``.
    """
    if fmt not in V4_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(V4_FORMATS)}, got {fmt!r}")
    vcfg = dataclasses.replace(cfg, kv_lora_rank=V4_NOPE, qk_rope_head_dim=V4_ROPE)
    model = make_model(vcfg, device, dtype)
    size = sum(len(p) + new_tokens for p in prompts) + page_size
    plain = MLATokenToKVPool(size, 1, dtype, V4_NOPE, V4_ROPE, vcfg.n_layers, device)
    pool_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    v4 = MLATokenToKVPool(size, page_size, pool_dtype, V4_NOPE, V4_ROPE, vcfg.n_layers, device, kv_cache_format=fmt)
    runs = []
    for cache, pool in ((PoolKVCache(plain), plain), (QuantizedPoolKVCache(v4, dtype), v4)):
        eng = Engine(model, cache, TokenSlotAllocator(pool.num_slots, 1), device)
        runs.append((eng, [Request(list(p), new_tokens) for p in prompts]))
    (ref_eng, ref_reqs), (q_eng, q_reqs) = runs
    seen = [0] * len(prompts)
    agree: list[bool] = []
    diffs: list[torch.Tensor] = []

    def compare_and_force(record: list[bool], keep_diffs: bool) -> None:
        for i, (a, b) in enumerate(zip(ref_reqs, q_reqs)):
            for t in range(seen[i], len(a.output)):
                record.append(a.output[t] == b.output[t])
                if keep_diffs:
                    diffs.append((a.logits[t].float() - b.logits[t].float()).abs().flatten())
                b.output[t] = a.output[t]  # the next step feeds both runs the plain run's token
            seen[i] = len(a.output)

    first: list[bool] = []
    ref_eng.prefill(ref_reqs)
    q_eng.prefill(q_reqs)
    compare_and_force(first, keep_diffs=False)
    while ref_eng.running:
        ref_eng.decode_step(use_graph=False)
        q_eng.decode_step(use_graph=False)
        compare_and_force(agree, keep_diffs=True)
    d = torch.cat(diffs) if diffs else torch.zeros(1)
    return {
        "format": fmt, "agreement": sum(agree) / max(1, len(agree)), "steps": len(agree),
        "first_agreement": sum(first) / max(1, len(first)), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
    }  # fmt: skip


def print_v4_agreement(res: dict, dtype, min_agreement: float) -> bool:
    """Print the V4-family run's line (tokens equal, logit error, the verdict); True if ``agreement >= min_agreement``."""
    ok = res["agreement"] >= min_agreement
    equal = round(res["agreement"] * res["steps"])
    print(f"V4-family KV cache ({res['format']}: 448 + 64 values per token, quantized in the write, dequantized in "
          f"the gather) vs the {dtype} cache, both fed the {dtype} run's tokens: greedy token equal at {equal}/"
          f"{res['steps']} decode steps ({res['agreement']:.1%}; the prefill's first token {res['first_agreement']:.0%}), "
          f"logits max abs diff {res['max_abs']:.4f}, mean abs diff {res['mean_abs']:.5f}: "
          f"{'PASSED' if ok else 'FAILED'} (needs >= {min_agreement:.0%})")  # fmt: skip
    return ok


def demo_memory_bytes(cfg: MLAConfig, n_prompts: int, plen: int, dbatch: int, steps: int, elem: int,
                      gpu: bool) -> dict[str, int]:
    """An upper estimate of what the demo allocates, by part (bytes), computed from the sizes alone
    (nothing is built): ``model`` (its parameters, counted on the meta device), ``pool`` (every layer's
    rows), ``prefill`` (the batch's activations: hidden states, per-head queries, logits; on a GPU once
    per captured variant), ``attention`` (one prompt's scores and probabilities at a time) and
    ``host_lists`` (the prompts as Python lists, on the host in every case)."""
    with torch.device("meta"):
        one = sum(p.numel() for p in MLAModel(dataclasses.replace(cfg, n_layers=1)).parameters())
        two = sum(p.numel() for p in MLAModel(dataclasses.replace(cfg, n_layers=2)).parameters())
    per_layer = two - one
    n_tok = n_prompts * plen
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    pool_size = max(n_tok, dbatch * (64 + steps + 8)) + 64
    per_token = (8 * cfg.hidden + 3 * cfg.n_heads * row + cfg.vocab_size) * elem + 3 * 8
    return {
        "model": (one - per_layer + per_layer * cfg.n_layers) * elem,
        "pool": cfg.n_layers * (pool_size + 1) * row * elem,
        "prefill": n_tok * per_token * (len(VARIANTS) if gpu else 1),
        "attention": cfg.n_heads * plen * plen * (2 * elem + 1) + 2 * plen * row * elem,
        "host_lists": n_tok * 40,
    }


def check_demo_memory(parts: dict[str, int], gpu: bool, device: torch.device) -> Optional[str]:
    """None if the estimate fits what the device and the host can still give (the host: the least of
    ``MemAvailable``, the cgroup limit and ``ulimit -v``), else the one-line reason."""
    dev_need = sum(v for k, v in parts.items() if k != "host_lists")
    host_need = parts["host_lists"] + (0 if gpu else dev_need)
    host_free = host_available_bytes()
    dev_free = torch.cuda.mem_get_info(device)[0] if gpu else host_free
    gib = 2**30
    what = ", ".join(f"{k} {v / gib:.1f}" for k, v in parts.items() if k != "host_lists")
    if gpu and dev_free is not None and dev_need > dev_free:
        return (f"needs about {dev_need / gib:.1f} GiB of GPU memory ({what} GiB) but {dev_free / gib:.1f} GiB is free")
    if host_free is not None and host_need > host_free:
        return (f"needs about {host_need / gib:.1f} GiB of host memory (prompt lists {parts['host_lists'] / gib:.1f}"
                f"{'' if gpu else ', ' + what} GiB) but {host_free / gib:.1f} GiB is available (MemAvailable, cgroup "
                "limit, ulimit -v)")
    return None


def _out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv demo``: returns 0, 1 if the reference check failed, a V4-family cache's greedy tokens agreed
    with the plain cache's at fewer than ``--min-agreement`` of the decode steps, or memory ran out, 2 on a usage
    error (sizes too large for this machine are one, found before anything is built)."""
    try:
        return _run(argv)
    except BaseException as e:  # noqa: BLE001 - only out-of-memory is turned into one line
        if not _out_of_memory(e):
            raise
        print(f"mlakv demo: out of memory ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
              "lower --prompts, --prompt-len, --decode-batch or --layers", file=sys.stderr)
        return 1


def _run(argv: Optional[list[str]]) -> int:
    args = build_parser().parse_args(argv)
    if args.l3 == "mooncake":
        from .l3 import main as l3_main

        opts = ["--layers", str(args.layers)] + (["--prompts", str(args.prompts)] if args.prompts else [])
        return l3_main(opts + (["--decode-steps", str(args.decode_steps)] if args.decode_steps else []))
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = default_dtype(device)
    cfg = MLAConfig(vocab_size=4096, hidden=512, n_heads=8, n_layers=args.layers)
    n_prompts = args.prompts or (16 if gpu else 4)
    plen = args.prompt_len or (1024 if gpu else 64)
    dbatch = args.decode_batch or (32 if gpu else 8)
    steps = args.decode_steps or (32 if gpu else 8)
    parts = demo_memory_bytes(cfg, n_prompts, plen, dbatch, steps, torch.empty((), dtype=dtype).element_size(), gpu)
    too_big = check_demo_memory(parts, gpu, device)
    if too_big:  # before the model, the pool or the prompts exist
        print(f"mlakv demo: {n_prompts} prompts x {plen} tokens, decode batch {dbatch}, {cfg.n_layers} layers "
              f"{too_big}; lower --prompts, --prompt-len, --decode-batch or --layers", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"mlakv demo on {name}: {cfg.n_layers}-layer MLA model (kv_lora_rank {cfg.kv_lora_rank} + rope "
          f"{cfg.qk_rope_head_dim}, {dtype}), prefill {n_prompts} x {plen} tokens, decode batch {dbatch}"
          f"{' under CUDA graphs' if gpu else ' (eager)'}")

    progress("reference check: the model over the pool vs over a dict-of-tensors cache (first use compiles kernels)")
    ok = reference_check(MLAConfig(vocab_size=512, hidden=128, n_heads=2, n_layers=2), device, dtype, args.fused)
    print(f"reference check (pool vs dict-of-tensors cache: tokens, logits, cached rows): {'PASSED' if ok else 'FAILED'}")

    model = make_model(cfg, device, dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (plen,), generator=g).tolist() for _ in range(n_prompts)]
    ctx = 64 + steps + 8
    pool_size = max(n_prompts * plen, dbatch * ctx) + 64
    pool = MLATokenToKVPool(pool_size, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)
    caches = {label: _VariantCache(pool, fn) for label, fn in VARIANTS.items()}
    if args.fused and fused_step_available(pool):
        caches = {FUSED_LABEL: _VariantCache(pool, _write_auto, fused=True), **caches}
    elif args.fused:
        print(f"fused cache step: not available for a {dtype} pool (it takes bf16/fp16 rows); timing the separate kernels only")

    t_prefill = time_prefill(model, caches, prompts, device, gpu)
    t_decode = time_decode(model, caches, prompts, dbatch, steps, ctx, pool, device, gpu)
    report(t_prefill, t_decode, n_prompts * plen, dbatch, gpu)
    agreement_ok = True
    if args.kv_cache_format in V4_FORMATS:
        progress(f"V4-family cache: the model (kv_lora_rank 448 + rope 64) on a {args.kv_cache_format} pool vs the "
                 f"plain {dtype} cache")  # fmt: skip
        res = v4_greedy_agreement(cfg, device, dtype, args.kv_cache_format, prompts[:4], args.agreement_tokens)
        agreement_ok = print_v4_agreement(res, dtype, args.min_agreement)
    elif args.kv_cache_format:
        progress(f"fp8 cache: the model on a {args.kv_cache_format} cache vs the plain {dtype} cache")
        drift = fp8_logit_drift(cfg, model, device, dtype, args.kv_cache_format, prompts[:4], 16)
        print(f"FP8 KV cache ({args.kv_cache_format}, quantized in the write, dequantized in the gather) vs the "
              f"{dtype} cache, over {drift['compared']} generated tokens of {min(4, len(prompts))} prompts: "
              f"logits max abs diff {drift['max_abs']:.4f}, mean abs diff {drift['mean_abs']:.5f}, "
              f"top-1 agreement {drift['top1']:.1%}")  # fmt: skip
    progress(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0 if ok and agreement_ok else 1
