"""Decode context parallelism on real ranks: the checks and timings of issue 17 (two GPUs, NCCL),
and the one-GPU ``W = 1`` vs ``W = 2`` write timing of issue 16.

Multi-rank run (``W`` ranks, one GPU each with NCCL, or CPU processes with gloo)::

    torchrun --nproc-per-node 2 -m mlakv.bench.dcp_two_gpu --out OUT    # or self-spawning:
    python -m mlakv.bench.dcp_two_gpu --world 2 --out OUT

1. rows: every rank's ``MLATokenToKVPool(dcp_world_size=W, dcp_rank=r)`` takes the same batches of
   logical ``loc`` (with padding and the reserved slot); the ranks' buffers, all-gathered and
   interleaved, must equal bit for bit a ``W = 1`` pool on rank 0's device after the same writes
   (unwritten rows included: every pool starts from the same random bytes);
2. decode: the demo model decodes a few hundred steps with DCP = W (attention per rank, LSE merge
   over the process group; the decode step replayed from a CUDA graph on GPUs) and with DCP = 1 on
   rank 0: same tokens, logits within dtype tolerance;
3. timings: each rank's write time at ``W`` against a ``W = 1`` pool's on the same device (same
   batch), and the decode step time with DCP = W against DCP = 1.

One-GPU run (``--single``): one process plays each rank of ``W = 2`` in turn against ``W = 1``.

Results go to ``OUT/dcp_two_gpu.{md,json}`` (``OUT/dcp_single_gpu.{md,json}`` for ``--single``).
``--tiny`` shrinks everything for a CPU smoke run (what the tests do).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mlakv.mem_cache import MLATokenToKVPool, kv_write_path
from mlakv.demo.engine import DecodeGraphRunner, Engine, Request
from mlakv.demo.model import MLAConfig, PoolKVCache
from mlakv.mem_cache.allocator import TokenSlotAllocator
from mlakv.demo.dcp import DCPPoolKVCache
from mlakv.distributed.dcp import (
    DCPGroup,
    init_dcp_group,
    interleave_rank_rows,
    make_dcp_pool,
    run_ranks,
)
from mlakv.argtypes import out_dir
from mlakv.demo.model import default_dtype, make_model

from .timing import graph_median_us, sync, wall_median_s

__all__ = ["Sizes", "main"]


@dataclass(frozen=True)
class Sizes:
    """Everything a run's size depends on."""

    row_logical_slots: int  # logical slots of the row-check pools
    row_batches: tuple[int, ...]  # n_loc of each row-check batch
    write_sizes: tuple[int, ...]  # n_loc of the write timings
    write_logical_slots: int
    write_layers: int  # layers written per timed call group (spreads the rows beyond L2)
    model: MLAConfig
    decode_batch: int
    prompt_len: int
    decode_steps: int
    reps: int

    @staticmethod
    def full() -> "Sizes":
        return Sizes(
            row_logical_slots=1 << 16, row_batches=(1, 7, 512, 16384, 4099),
            write_sizes=(1024, 4096, 16384, 65536, 131072), write_logical_slots=1 << 18, write_layers=4,
            model=MLAConfig(vocab_size=4096, hidden=512, n_heads=8, n_layers=4),
            decode_batch=32, prompt_len=64, decode_steps=300, reps=50,
        )

    @staticmethod
    def tiny() -> "Sizes":
        return Sizes(
            row_logical_slots=256, row_batches=(1, 7, 64, 33), write_sizes=(64, 256), write_logical_slots=1024,
            write_layers=2,
            model=MLAConfig(vocab_size=128, hidden=64, n_heads=2, kv_lora_rank=64, qk_rope_head_dim=16,
                            qk_nope_head_dim=16, v_head_dim=16, n_layers=2),
            decode_batch=4, prompt_len=12, decode_steps=6, reps=3,
        )


ROW_DTYPE = torch.bfloat16
KV_DIMS = (512, 64)  # the row check and write timings use DeepSeek's widths at every size


# ---- timing ---------------------------------------------------------------------------------
def _write_time_us(fn: Callable[[], None], calls: int, device: torch.device, reps: int) -> float:
    """Median time of one of the ``calls`` writes ``fn`` makes: CUDA-graph replay on GPUs (host
    cost excluded, as in ``mlakv bench``), host wall time on CPU."""
    if device.type == "cuda":
        return graph_median_us(fn, calls, rep=max(20, reps))
    return wall_median_s(fn, device, reps) * 1e6 / calls


def _median_wall_us(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    return wall_median_s(fn, device, reps) * 1e6


# ---- 1. rows ----------------------------------------------------------------------------------
def _row_batches(sizes: Sizes, logical: int, device: torch.device):
    """The same batches on every rank: distinct random logical slots, ~10% padding, slot 0 once."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for i, n in enumerate(sizes.row_batches):
        loc = torch.randperm(logical, generator=g)[:n]
        loc[torch.rand(n, generator=g) < 0.1] = -1
        if i == 1:
            loc[0] = 0  # the reserved slot: skipped everywhere
        nope = torch.randn(n, KV_DIMS[0], generator=g).to(ROW_DTYPE)
        rope = torch.randn(n, KV_DIMS[1], generator=g).to(ROW_DTYPE)
        out.append((loc.to(torch.int32 if i % 2 else torch.int64).to(device), nope.to(device), rope.to(device)))
    return out


def check_rows(group: DCPGroup, device: torch.device, sizes: Sizes) -> dict:
    """Item 1. Returns (on every rank) whether the union equals the ``W = 1`` pool, and the write
    paths the dispatcher took."""
    w, r, logical = group.world_size, group.rank, sizes.row_logical_slots
    layers = 2
    g = torch.Generator().manual_seed(99)
    width = (KV_DIMS[0] + KV_DIMS[1]) * 2
    initial = torch.randint(0, 256, (layers, logical, width), dtype=torch.uint8, generator=g)
    batches = _row_batches(sizes, logical, device)
    pool = MLATokenToKVPool(logical - 1, 1, ROW_DTYPE, *KV_DIMS, layers, device, dcp_world_size=w, dcp_rank=r)
    for layer in range(layers):
        pool.kv_buffer[layer][:, 0].view(torch.uint8).copy_(initial[layer, r::w].to(device))
        for loc, nope, rope in batches:
            pool.set_kv_buffer(layer, loc, nope, rope)
    paths = sorted({kv_write_path(pool.get_key_buffer(0), loc, nope, rope) for loc, nope, rope in batches})
    exact = True
    for layer in range(layers):
        mine = pool.kv_buffer[layer][:, 0].view(torch.uint8).contiguous()
        parts = [torch.empty_like(mine) for _ in range(w)]
        dist.all_gather(parts, mine, group=group.group)
        if r == 0:
            single = MLATokenToKVPool(logical - 1, 1, ROW_DTYPE, *KV_DIMS, 1, device)
            single.kv_buffer[0][:, 0].view(torch.uint8).copy_(initial[layer].to(device))
            for loc, nope, rope in batches:
                single.set_kv_buffer(0, loc, nope, rope)
            exact &= torch.equal(interleave_rank_rows(parts), single.kv_buffer[0][:, 0].view(torch.uint8))
            del single
    flag = torch.tensor([1 if exact else 0], device=device)
    dist.broadcast(flag, 0, group=group.group)
    return dict(rows_bit_exact=bool(flag.item()), row_write_paths=paths)


# ---- 2. decode ----------------------------------------------------------------------------------
def _decode_run(model, cache, logical_slots: int, sizes: Sizes, device: torch.device, gpu: bool):
    """Prefill ``decode_batch`` prompts, then ``decode_steps`` greedy steps (graph replay when it
    captures). Returns (requests, whether graphs were used, the runner, the capture error if any)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, sizes.model.vocab_size, (sizes.prompt_len,), generator=g).tolist()
               for _ in range(sizes.decode_batch)]
    max_ctx = sizes.prompt_len + sizes.decode_steps + 8
    runner = DecodeGraphRunner(model, cache, [sizes.decode_batch], max_ctx=max_ctx, device=device)
    eng = Engine(model, cache, TokenSlotAllocator(logical_slots, 1), device, padded_runner=runner)
    reqs = [Request(p, sizes.decode_steps + 1) for p in prompts]
    eng.prefill(reqs)
    err = None
    if gpu:
        try:
            runner.capture()
            eng.graph_runner = runner
        except Exception as e:  # noqa: BLE001 - reported, the run goes on eagerly
            err = f"{type(e).__name__}: {e}"
    use_graph = eng.graph_runner is not None
    while eng.running:
        eng.decode_step(use_graph=use_graph)
    sync(device)
    return reqs, use_graph, runner, err


def compare_decodes(got: list[Request], ref: list[Request], tol: float) -> dict:
    """Tokens and logits of two greedy runs of the same requests. Logits are compared up to each
    request's first differing token (after it the inputs differ); a first difference is reported
    with the reference's top-2 logit margin there (a margin below the logit error is a near-tie,
    which rounding alone can flip)."""
    max_abs, close, first = 0.0, True, None
    for i, (a, b) in enumerate(zip(got, ref)):
        n = next((k for k, (x, y) in enumerate(zip(a.output, b.output)) if x != y), len(b.output))
        for x, y in zip(a.logits[: n + 1], b.logits[: n + 1]):
            max_abs = max(max_abs, float((x - y).abs().max()))
            close &= torch.allclose(x, y, rtol=tol, atol=tol)
        if n < len(b.output) and first is None:
            top2 = b.logits[n].topk(2).values
            first = dict(request=i, step=n, ref_top2_margin=float(top2[0] - top2[1]),
                         logit_diff_there=float((a.logits[n] - b.logits[n]).abs().max()))
    return dict(tokens_equal=first is None and all(len(a.output) == len(b.output) for a, b in zip(got, ref)),
                first_divergence=first, logits_max_abs_diff=max_abs, logits_within_tol=close, logits_tol=tol)


def _step_time_us(runner: DecodeGraphRunner, bs: int, use_graph: bool, device, reps: int) -> float:
    if use_graph:
        return _median_wall_us(runner.graphs[bs].replay, device, reps)
    s = runner.static[bs]
    return _median_wall_us(
        lambda: runner.model.decode(runner.cache, s["ids"], s["pos"], s["loc"], s["table"], s["lengths"]), device, reps
    )


def check_decode(group: DCPGroup, device: torch.device, sizes: Sizes) -> dict:
    """Items 2 and 3b: DCP = W against DCP = 1 (rank 0), tokens, logits, step times."""
    gpu = device.type == "cuda"
    dtype = default_dtype(device)
    cfg = sizes.model
    logical = sizes.decode_batch * (sizes.prompt_len + sizes.decode_steps + 8) + 64
    logical = -(-logical // group.world_size) * group.world_size
    model = make_model(cfg, device, dtype)
    out: dict = {}
    ref = None
    if group.rank == 0:  # DCP = 1: no collectives, the other ranks wait at the barrier
        pool1 = MLATokenToKVPool(logical - 1, 1, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device)
        ref, g1, runner1, err1 = _decode_run(model, PoolKVCache(pool1), pool1.num_logical_slots, sizes, device, gpu)
        out["dcp1_step_us"] = _step_time_us(runner1, sizes.decode_batch, g1, device, sizes.reps)
        out["dcp1_graph"], out["dcp1_capture_error"] = g1, err1
        del runner1, pool1
    dist.barrier(group=group.group)
    pool = make_dcp_pool(logical, dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.n_layers, device, group)
    cache = DCPPoolKVCache(pool, group)
    reqs, gw, runner, errw = _decode_run(model, cache, cache.logical_slots, sizes, device, gpu)
    step_us = _step_time_us(runner, sizes.decode_batch, gw, device, sizes.reps)  # all ranks replay together
    out.update(dcpw_graph=gw, dcpw_capture_error=errw, dcpw_step_us=step_us)
    if group.rank == 0:
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        out.update(compare_decodes(reqs, ref, tol), model_dtype=str(dtype), decode_tokens_per_request=len(ref[0].output))
    return out


# ---- 3a. write timings ------------------------------------------------------------------------
def _timing_pool(sizes: Sizes, device, w: int, r: int) -> MLATokenToKVPool:
    return MLATokenToKVPool(
        sizes.write_logical_slots - 1, 1, ROW_DTYPE, *KV_DIMS, sizes.write_layers, device, dcp_world_size=w, dcp_rank=r
    )


def _write_inputs(sizes: Sizes, n: int, device):
    g = torch.Generator().manual_seed(n)
    loc = (1 + torch.randperm(sizes.write_logical_slots - 1, generator=g)[:n]).to(device)
    nope = torch.randn(n, KV_DIMS[0], generator=g).to(ROW_DTYPE).to(device)
    rope = torch.randn(n, KV_DIMS[1], generator=g).to(ROW_DTYPE).to(device)
    return loc, nope, rope


def time_write(pool: MLATokenToKVPool, loc, nope, rope, sizes: Sizes) -> float:
    """us per ``set_kv_buffer`` of one layer (all ``write_layers`` written per timed call group)."""

    def body():
        for layer in range(pool.layer_num):
            pool.set_kv_buffer(layer, loc, nope, rope)

    return _write_time_us(body, pool.layer_num, pool.device, sizes.reps)


def write_timings(sizes: Sizes, device, ranks: list[tuple[int, int]]) -> list[dict]:
    """For each size: the ``W = 1`` write time and each ``(W, rank)``'s, same batch, same device."""
    single = _timing_pool(sizes, device, 1, 0)
    pools = {wr: _timing_pool(sizes, device, *wr) for wr in ranks}
    rows = []
    for n in sizes.write_sizes:
        loc, nope, rope = _write_inputs(sizes, n, device)
        row = dict(n_loc=n, path=kv_write_path(single.get_key_buffer(0), loc, nope, rope),
                   w1_us=time_write(single, loc, nope, rope, sizes))
        for (w, r), pool in pools.items():
            row[f"w{w}_rank{r}_us"] = time_write(pool, loc, nope, rope, sizes)
        rows.append(row)
    return rows


# ---- the rank program -----------------------------------------------------------------------------
def _warm_up_writes(group: DCPGroup, device: torch.device, sizes: Sizes) -> None:
    """Rank 0 makes the first large writes alone, so a JIT module is built (and cached on disk)
    once, not by every rank at the same time into the same build directory."""
    if group.rank == 0:
        pool = _timing_pool(sizes, device, 1, 0)
        for n in sizes.write_sizes:
            pool.set_kv_buffer(0, *_write_inputs(sizes, n, device))
        sync(device)
        del pool
    dist.barrier(group=group.group)


def _rank_program(group: DCPGroup, device: torch.device, sizes: Sizes, out_dir: Optional[str], argv: list[str]) -> dict:
    res = dict(world_size=group.world_size, rank=group.rank)
    _warm_up_writes(group, device, sizes)
    res.update(check_rows(group, device, sizes))
    res.update(check_decode(group, device, sizes))
    res["writes"] = write_timings(sizes, device, [(group.world_size, group.rank)])
    gathered: list = [None] * group.world_size
    dist.all_gather_object(gathered, res, group=group.group)
    if group.rank == 0 and out_dir is not None:
        _write_report(gathered, device, sizes, Path(out_dir), argv)
    return gathered[0]


def _command(argv: list[str]) -> str:
    if "LOCAL_WORLD_SIZE" in os.environ:  # started by torchrun
        return f"torchrun --nproc-per-node {os.environ['LOCAL_WORLD_SIZE']} -m mlakv.bench.dcp_two_gpu " + " ".join(argv)
    return "python -m mlakv.bench.dcp_two_gpu " + " ".join(argv)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _write_report(per_rank: list[dict], device, sizes: Sizes, out: Path, argv: list[str]) -> None:
    r0, w = per_rank[0], per_rank[0]["world_size"]
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=_device_name(device), backend=dist.get_backend(), torch=torch.__version__,
        command=_command(argv),
    )
    summary = dict(
        meta, world_size=w, rows_bit_exact=r0["rows_bit_exact"], row_write_paths=r0["row_write_paths"],
        tokens_equal=r0["tokens_equal"], first_divergence=r0["first_divergence"], logits_within_tol=r0["logits_within_tol"],
        logits_max_abs_diff=r0["logits_max_abs_diff"], decode_steps=sizes.decode_steps,
        decode_batch=sizes.decode_batch, dcp1_step_us=r0["dcp1_step_us"],
        dcpw_step_us=[p["dcpw_step_us"] for p in per_rank], graphs=dict(dcp1=r0["dcp1_graph"], dcpw=r0["dcpw_graph"]),
        capture_errors=dict(dcp1=r0["dcp1_capture_error"], dcpw=r0["dcpw_capture_error"]),
        writes={p["rank"]: p["writes"] for p in per_rank},
    )
    (out / "dcp_two_gpu.json").write_text(json.dumps(summary, indent=2))
    unit = "graph median" if device.type == "cuda" else "CPU wall median"
    lines = [
        f"# DCP across {w} ranks ({meta['device']}, {meta['backend']}, {meta['date']})",
        "",
        f"command: `{meta['command']}`",
        "",
        f"1. rows: union of the {w} ranks' buffers == W=1 pool bit-exactly: **{r0['rows_bit_exact']}** "
        f"(write paths: {', '.join(r0['row_write_paths'])})",
        f"2. decode, {sizes.decode_batch} requests x {r0['decode_tokens_per_request']} tokens, {r0['model_dtype']}: "
        f"same tokens as DCP=1: **{r0['tokens_equal']}**; logits max |diff| {r0['logits_max_abs_diff']:.3g} "
        f"(within {r0['logits_tol']}: {r0['logits_within_tol']}); CUDA graphs: DCP=1 {r0['dcp1_graph']}, "
        f"DCP={w} {r0['dcpw_graph']}" + (f" (capture failed: {r0['dcpw_capture_error']})" if r0["dcpw_capture_error"] else "")
        + (f"; first divergence: {r0['first_divergence']}" if r0["first_divergence"] else ""),
        "",
        f"| decode step ({unit}) | us |",
        "|---|---|",
        f"| DCP=1 | {r0['dcp1_step_us']:.1f} |",
    ]
    lines += [f"| DCP={w}, rank {p['rank']} | {p['dcpw_step_us']:.1f} |" for p in per_rank]
    lines += ["", f"| n_loc | path | W=1 us ({unit}) | " + " | ".join(f"W={w} rank {p['rank']} us | ratio" for p in per_rank) + " |",
              "|---|---|---|" + "---|---|" * len(per_rank)]
    for i, row in enumerate(r0["writes"]):
        cells = []
        for p in per_rank:
            pr = p["writes"][i]
            t = pr[f"w{w}_rank{p['rank']}_us"]
            cells.append(f"{t:.2f} | {t / pr['w1_us']:.2f}x")
        lines.append(f"| {row['n_loc']} | {row['path']} | {row['w1_us']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "ratio = the rank's write time / the W=1 write time of the same batch on the same GPU "
              "(issue 16 target at >= 16384 rows with W=2: <= 0.55x)."]
    (out / "dcp_two_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---- the one-GPU write comparison (issue 16 section 5) --------------------------------------------------
def single_device(device: torch.device, sizes: Sizes, out: Path, argv: list[str]) -> dict:
    """One process plays each rank of ``W = 2`` in turn; writes ``dcp_single_gpu.{md,json}``."""
    rows = write_timings(sizes, device, [(2, 0), (2, 1)])
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    res = dict(date=date, device=_device_name(device), torch=torch.__version__,
               command=_command(argv), writes=rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dcp_single_gpu.json").write_text(json.dumps(res, indent=2))
    unit = "graph median" if device.type == "cuda" else "CPU wall median"
    lines = [f"# KV write, W=1 vs each rank of W=2 ({res['device']}, {date})", "", f"command: `{res['command']}`", "",
             f"| n_loc | path | W=1 us ({unit}) | W=2 rank 0 us | ratio | W=2 rank 1 us | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n_loc']} | {r['path']} | {r['w1_us']:.2f} | {r['w2_rank0_us']:.2f} | "
                     f"{r['w2_rank0_us'] / r['w1_us']:.2f}x | {r['w2_rank1_us']:.2f} | {r['w2_rank1_us'] / r['w1_us']:.2f}x |")
    lines += ["", "A rank of W=2 stores the rows with loc % 2 == rank (about half); issue 16 target: <= 0.55x at >= 16384 rows."]
    (out / "dcp_single_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m mlakv.bench.dcp_two_gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=out_dir, default=Path("bench-out/dcp"), help="where the .md and .json go (checked writable first)")
    ap.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun (default 2)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps (default 300; tiny 6)")
    ap.add_argument("--single", action="store_true", help="one process, one device: W=1 vs each rank of W=2 write timing")
    ap.add_argument("--timeout", type=float, default=540.0, help="seconds before collectives fail / spawned ranks are killed")
    args = ap.parse_args(argv)
    sizes = Sizes.tiny() if args.tiny else Sizes.full()
    if args.steps is not None:
        sizes = dataclasses.replace(sizes, decode_steps=args.steps)
    if args.single:
        single_device(torch.device(args.device), sizes, args.out, argv)
        return 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun: this process is one rank
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = init_dcp_group(device, timeout_s=args.timeout)
        res = _rank_program(group, device, sizes, str(args.out), argv)
        dist.destroy_process_group()
    else:
        if args.device == "cuda" and torch.cuda.device_count() < args.world:
            print(f"--world {args.world} needs {args.world} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
            return 2
        res = run_ranks(_rank_program, args.world, sizes, str(args.out), argv,
                        device_type=args.device, timeout_s=args.timeout)[0]
    ok = res["rows_bit_exact"] and res["tokens_equal"] and res["logits_within_tol"]
    return 0 if ok else 1


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.dcp_two_gpu", main))
