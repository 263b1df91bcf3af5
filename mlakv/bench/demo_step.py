"""The demo model's decode step with the fused cache step vs the separate kernels (``mlakv bench demo-step``).

Why: issue 25's serving goal is the time of a whole decode step (every layer of the demo's MLA model:
projections, the cache step, attention over the gathered rows, the MLP, the LM head) when each layer's
cache step is one launch (:meth:`MLATokenToKVPool.set_kv_buffer_rope`: RoPE on ``k_pe`` and ``q_pe``,
the row write in the pool's format, the absorbed query ``[q_lat | q_pe]``) against the same step with
the separate kernels an engine runs without it: RoPE (the model's torch rotation of ``k_pe`` and
``q_pe``), then the pool's write (``set_kv_buffer``), then the query concat (``torch.cat``). Everything
else in the step is the same code, so the difference is what fusing saves per step.

Per cache format (``bf16`` rows, ``per_tensor`` and ``ds_mla`` FP8 rows) and decode batch size, each
variant runs on its own pool whose context rows (``--context`` per request) hold the same random
values; one eager step of each is checked first: the two variants' logits and the pools' bytes must be
equal (the fused step is bit-identical to rotating and then writing), else the row says ``DIFF``. Then
on a GPU each variant's step is captured in a CUDA graph and its median replay taken
(:func:`mlakv.bench.timing.graph_median_us`), the variants alternating for ``--rounds`` rounds (the
median of the rounds is reported). On a CPU the step runs eagerly (synchronized wall-clock medians,
:func:`mlakv.bench.timing.wall_median_s`) with small defaults: those numbers only show the bench runs.

Writes ``demo_step.json`` and ``demo_step.md`` under ``--out`` after every row (a run stopped part way
keeps what it measured), and prints the table at the end.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Callable, Optional

import torch

from mlakv.demo.model import KVCache, MLAConfig, PoolKVCache, QuantizedPoolKVCache, fused_step_available, make_model
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.ops.rope_write_reference import rope_rotate_torch

from .options import DEMO_STEP_BATCHES as GPU_BATCHES
from .options import DEMO_STEP_CPU_BATCHES as CPU_BATCHES
from .options import DEMO_STEP_FORMATS as FORMATS
from .options import demo_step_parser as build_parser
from .report import write_results
from .timing import graph_median_us, progress, wall_median_s

__all__ = ["FORMATS", "VARIANTS", "SeparateStepCache", "build_parser", "make_step", "run", "format_report", "main"]

#: format name -> (pool dtype, kv_cache_format)
POOL_OF = {
    "bf16": (torch.bfloat16, None),
    "per_tensor": (torch.float8_e4m3fn, "per_tensor"),
    "ds_mla": (torch.float8_e4m3fn, "ds_mla"),
}
VARIANTS = ("fused", "separate")
K_SCALE = 8.0 / 448.0  # per_tensor's scale: the model's latent rows (RMSNorm'd) stay well inside +-8


class SeparateStepCache(KVCache):
    """A pool cache whose cache step is the separate kernels: the model hands it the unrotated
    ``k_pe``/``q_pe`` (as it hands the fused cache), and it rotates both with torch, writes the row
    through the wrapped cache's :meth:`write` (the pool's ``set_kv_buffer``), then concatenates the
    absorbed query ``[q_lat | rotated q_pe]`` into one tensor, the layout an attention kernel takes."""

    fused = True  # the model calls write_rope with the values before RoPE

    def __init__(self, inner: PoolKVCache) -> None:
        self.inner = inner

    def write_rope(self, layer: int, loc, k_nope, k_pe, positions, cos_sin_cache, q_lat, q_pe):
        """RoPE, then the row write, then the query concat; returns ``(q_lat, rotated q_pe)`` views of the query."""
        k_rope = rope_rotate_torch(k_pe, positions, cos_sin_cache, True)
        q_pe = rope_rotate_torch(q_pe, positions, cos_sin_cache, True)
        self.inner.write(layer, loc, k_nope, k_rope)
        q_out = torch.cat([q_lat, q_pe], dim=-1)
        r = q_lat.shape[-1]
        return q_out[..., :r], q_out[..., r:]

    def write(self, layer: int, loc, k_nope, k_rope) -> None:
        self.inner.write(layer, loc, k_nope, k_rope)

    def gather(self, layer: int, slots: torch.Tensor):
        return self.inner.gather(layer, slots)


def _pool(cfg: MLAConfig, fmt: str, num_slots: int, device) -> MLATokenToKVPool:
    dtype, kv_format = POOL_OF[fmt]
    return MLATokenToKVPool(
        num_slots, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device,
        kv_cache_format=kv_format, k_scale=K_SCALE if kv_format == "per_tensor" else None,
    )  # fmt: skip


def _cache(pool: MLATokenToKVPool, model_dtype: torch.dtype, fused: bool) -> PoolKVCache:
    if pool.kv_cache_format is None:
        return PoolKVCache(pool, fused=fused)
    return QuantizedPoolKVCache(pool, model_dtype, fused=fused)


def make_step(model, fmt: str, batch: int, context: int, device, seed: int = 0):
    """The inputs of one decode step of ``batch`` requests with ``context`` tokens each (the last one
    new) and, per variant, a pool (context rows filled with the same random values) and a cache.

    Returns ``(inputs, pools, caches)``: ``inputs`` the keyword arguments of ``model.decode`` minus the
    cache (``input_ids``, ``positions``, ``loc [B]``, ``slot_table [B, context]``, ``lengths``);
    ``pools`` / ``caches`` keyed by :data:`VARIANTS`. ``ValueError`` when the pool does not take the fused step.
    """
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    table = (1 + torch.arange(batch * context).view(batch, context)).to(device)  # slot 0 is the pool's dummy
    inputs = dict(
        input_ids=torch.randint(0, cfg.vocab_size, (batch,), generator=g).to(device),
        positions=torch.full((batch,), context - 1, dtype=torch.int64, device=device),
        loc=table[:, -1].contiguous(),
        slot_table=table,
        lengths=torch.full((batch,), context, dtype=torch.int64, device=device),
    )
    ctx = table[:, :-1].reshape(-1)
    nope = torch.randn(ctx.numel(), cfg.kv_lora_rank, generator=g).to(device=device, dtype=torch.bfloat16)
    rope = torch.randn(ctx.numel(), cfg.qk_rope_head_dim, generator=g).to(device=device, dtype=torch.bfloat16)
    pools, caches = {}, {}
    for variant in VARIANTS:
        pool = _pool(cfg, fmt, batch * context + 64, device)
        if not fused_step_available(pool):
            raise ValueError(f"a {fmt} pool does not take the fused cache step")
        for layer in range(cfg.n_layers):
            if ctx.numel():
                pool.set_kv_buffer(layer, ctx, nope, rope)
        cache = _cache(pool, dtype, fused=True)
        pools[variant], caches[variant] = pool, (cache if variant == "fused" else SeparateStepCache(cache))
    return inputs, pools, caches


def _same(pools: dict, logits: dict, loc: torch.Tensor) -> bool:
    """The variants' logits and every layer's pool bytes are equal, and the step wrote its rows ``loc``
    (empty before it) in every layer."""
    a, b = (pools[v] for v in VARIANTS)
    same_rows = all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a.kv_buffer, b.kv_buffer))
    written = all(bool(x.view(torch.uint8)[loc].flatten(1).any(dim=1).all()) for x in a.kv_buffer)
    return same_rows and written and torch.equal(logits["fused"], logits["separate"])


def run(formats: list[str], batches: list[int], context: int, layers: int, rounds: int,
        on_row: Optional[Callable[[dict], None]] = None) -> dict:  # fmt: skip
    """Time the demo model's decode step per format, batch size and variant (see the module docstring).

    ``on_row(result so far)`` is called after each row (the command writes its files there, so a run
    stopped part way keeps the rows it measured)."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cfg = MLAConfig(vocab_size=4096, hidden=512, n_heads=8, n_layers=layers)
    model = make_model(cfg, device, torch.bfloat16)
    rows = []
    for fmt in formats:
        for batch in batches:
            progress(f"demo step: {fmt}, decode batch {batch}, {context}-token contexts")
            inputs, pools, caches = make_step(model, fmt, batch, context, device)
            steps: dict[str, Callable[[], object]] = {
                v: (lambda c=caches[v]: model.decode(c, **inputs)) for v in VARIANTS
            }
            logits = {v: fn().clone() for v, fn in steps.items()}
            same = _same(pools, logits, inputs["loc"])
            samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for r in range(rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                for v in order:
                    samples[v].append(graph_median_us(steps[v]) if gpu else wall_median_s(steps[v], device, reps=3) * 1e6)
            t = {v: statistics.median(s) for v, s in samples.items()}
            rows.append({
                "format": fmt, "batch": batch, "fused_us": t["fused"], "separate_us": t["separate"],
                "saved_us": t["separate"] - t["fused"], "saved_per_layer_us": (t["separate"] - t["fused"]) / layers,
                "speedup": t["separate"] / t["fused"], "same": same,
            })  # fmt: skip
            if on_row is not None:
                on_row(_result(gpu, cfg, layers, context, rounds, rows))
    return _result(gpu, cfg, layers, context, rounds, rows)


def _result(gpu: bool, cfg: MLAConfig, layers: int, context: int, rounds: int, rows: list[dict]) -> dict:
    name = torch.cuda.get_device_name() if gpu else "CPU"
    return {
        "device": name, "clock": "CUDA-graph median replay" if gpu else "eager wall clock (CPU: not a performance number)",
        "layers": layers, "context": context, "rounds": rounds, "torch": torch.__version__,
        "model": {"hidden": cfg.hidden, "heads": cfg.n_heads, "kv_lora_rank": cfg.kv_lora_rank,
                  "rope": cfg.qk_rope_head_dim, "vocab": cfg.vocab_size, "dtype": "bfloat16"},
        "rows": rows,
    }  # fmt: skip


def format_report(res: dict) -> str:
    """The markdown table of :func:`run`'s result, with a heading line saying what was measured."""
    lines = [
        f"Demo model decode step on {res['device']} ({res['clock']}): {res['layers']} layers, hidden "
        f"{res['model']['hidden']}, {res['model']['heads']} heads, {res['model']['kv_lora_rank']} + "
        f"{res['model']['rope']} latent, {res['context']}-token contexts, bf16; median of {res['rounds']} rounds.",
        "",
        "| cache format | decode batch | fused step us | separate kernels us | saved us (per layer) | separate / fused | same logits and rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['format']} | {r['batch']} | {r['fused_us']:.1f} | {r['separate_us']:.1f} | "
            f"{r['saved_us']:.1f} ({r['saved_per_layer_us']:.1f}) | {r['speedup']:.2f}x | {'yes' if r['same'] else 'DIFF'} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench demo-step``: returns 0, or 1 when a format's variants gave different logits or rows."""
    args = build_parser().parse_args(argv)
    gpu = torch.cuda.is_available()
    batches = args.batch_sizes or (list(GPU_BATCHES) if gpu else list(CPU_BATCHES))
    context = args.context or (64 if gpu else 8)
    layers = args.layers or (4 if gpu else 1)
    def keep(partial: dict) -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo_step.json").write_text(json.dumps(partial, indent=1))
        (args.out / "demo_step.md").write_text(format_report(partial) + "\n")

    res = run(args.formats, batches, context, layers, args.rounds, on_row=keep)
    write_results(args.out, "demo_step", res, format_report(res))
    return 0 if all(r["same"] for r in res["rows"]) else 1


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.demo_step", main))
