"""vLLM face benchmark: each of vLLM's MLA cache ops on mlakv (``mlakv.compat.vllm``), against copy bandwidth.

Why: issue 26 asks each op to reach >= 85 % of its bytes at copy bandwidth at 65536 tokens (and, where
vLLM's ``cache_kernels.cu`` can be built from a fetched copy, to be at or below vLLM's own kernel).
Per n (GPU; DeepSeek widths: kv_lora_rank 512, rope 64, block_size 64; slots a random permutation of
twice n), each op is timed as the median CUDA-graph replay over 8 rotating input sets
(:mod:`mlakv.bench.timing`; ``swap_blocks`` reads its CPU block mapping on the host, so it is timed
eagerly with CUDA events). Bytes are read + written:

==========================  ===================================  ======================
op                          what moves per token                 bytes
==========================  ===================================  ======================
concat auto (bf16)          576 bf16 in, 576 bf16 out            2304
concat fp8                  576 bf16 in, 576 e4m3 out            1728
concat fp8_ds_mla           576 bf16 in, 656-byte entry out      1808
gather auto (bf16)          576 bf16 in and out                  2304
gather fp8 -> bf16          576 e4m3 in, 576 bf16 out            1728
cp_gather_cache (bf16)      576 bf16 in and out                  2304
upconvert ds_mla -> bf16    656-byte entry in, 576 bf16 out      1808
swap_blocks (GPU -> GPU)    one 64-slot bf16 block per 64 tokens 2304
==========================  ===================================  ======================

Before timing, every op's GPU result is compared byte for byte with the same call on the CPU (the
torch paths, the reference): a mismatch is reported ``WRONG`` and the op is not timed. vLLM's own
kernels are not built here (its ``cache_kernels.cu`` needs vLLM's whole ``csrc`` build); the report
says so.

Run: ``python -m mlakv.bench.vllm_ops [--sizes 1,64,1024,16384,65536] [--ops concat,gather] [--out DIR]``
(writes ``vllm_ops.json`` and ``vllm_ops.md`` there). ``MLAKV_DISABLE_JIT=1`` times the Triton paths
only (no nvcc builds on a fresh machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional

import torch

from mlakv.argtypes import out_dir
from mlakv.compat import vllm as V

from . import timing

__all__ = ["DEFAULT_SIZES", "OPS", "run", "main"]

DEFAULT_SIZES = [1, 64, 1024, 16384, 65536]
R, P, BS = 512, 64, 64
OPS = {  # name -> bytes per token (read + written)
    "concat auto": 2304,
    "concat fp8": 1728,
    "concat fp8_ds_mla": 1808,
    "gather auto": 2304,
    "gather fp8": 1728,
    "cp_gather_cache": 2304,
    "upconvert ds_mla": 1808,
    "swap_blocks": 2304,
}


def _case(n: int, device: str, gen: torch.Generator) -> dict:
    """One input set: sources, three caches (bf16, e4m3, ds_mla), slots, a 4-request block table."""
    nb = -(-2 * n // BS) + 1
    kv_c = torch.randn(n, R, generator=gen).to(torch.bfloat16)
    k_pe = torch.randn(n, P, generator=gen).to(torch.bfloat16)
    slot = torch.randperm(nb * BS, generator=gen)[:n]
    lens = [n // 4] * 3 + [n - 3 * (n // 4)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    table = torch.stack([torch.randperm(nb, generator=gen) for _ in range(4)]).to(torch.int32)
    d = dict(
        kv_c=kv_c, k_pe=k_pe, slot=slot, cu=cu, table=table, ws=cu[:4].clone(),
        auto=torch.randn(nb, BS, R + P, generator=gen).to(torch.bfloat16),
        fp8=torch.randint(0, 256, (nb, BS, R + P), dtype=torch.uint8, generator=gen) & 0x77,  # finite e4m3
        ds=torch.zeros(nb, BS, 656, dtype=torch.uint8),
        scale=torch.tensor([0.05]), out=torch.zeros(n, R + P, dtype=torch.bfloat16),
        swap_dst=torch.zeros(max(1, n // BS) + 1, BS, R + P, dtype=torch.bfloat16),
        mapping=torch.stack([torch.randperm(nb, generator=gen)[: max(1, n // BS)], torch.arange(max(1, n // BS))], 1),
    )  # fmt: skip
    V.concat_and_cache_mla(torch.randn(nb * BS, R, generator=gen).to(torch.bfloat16),
                           torch.randn(nb * BS, P, generator=gen).to(torch.bfloat16), d["ds"],
                           torch.arange(nb * BS), "fp8_ds_mla", d["scale"])  # fmt: skip
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "mapping" else v) for k, v in d.items()}


def _ops() -> dict[str, tuple[Callable[[dict], None], str]]:
    """name -> (call on an input set, the tensor it writes)."""
    one = lambda d: d["scale"]  # noqa: E731
    return {
        "concat auto": (lambda d: V.concat_and_cache_mla(d["kv_c"], d["k_pe"], d["auto"], d["slot"], "auto", one(d)), "auto"),
        "concat fp8": (lambda d: V.concat_and_cache_mla(d["kv_c"], d["k_pe"], d["fp8"], d["slot"], "fp8", one(d)), "fp8"),
        "concat fp8_ds_mla": (
            lambda d: V.concat_and_cache_mla(d["kv_c"], d["k_pe"], d["ds"], d["slot"], "fp8_ds_mla", one(d)), "ds"),
        "gather auto": (lambda d: V.gather_and_maybe_dequant_cache(
            d["auto"], d["out"], d["table"], d["cu"], d["cu"], d["out"].shape[0], "auto", one(d)), "out"),
        "gather fp8": (lambda d: V.gather_and_maybe_dequant_cache(
            d["fp8"], d["out"], d["table"], d["cu"], d["cu"], d["out"].shape[0], "fp8", one(d)), "out"),
        "cp_gather_cache": (lambda d: V.cp_gather_cache(d["auto"], d["out"], d["table"], d["cu"], 4), "out"),
        "upconvert ds_mla": (lambda d: V.cp_gather_and_upconvert_fp8_kv_cache(d["ds"], d["out"], d["table"], d["ws"], 4), "out"),
        "swap_blocks": (lambda d: V.swap_blocks(d["auto"], d["swap_dst"], d["auto"].stride(0) * 2, d["mapping"]), "swap_dst"),
    }  # fmt: skip


def _agrees(fn: Callable[[dict], None], written: str, gpu: dict, cpu: dict) -> bool:
    """The op on the GPU and on the CPU (its torch path) write the same bytes."""
    g = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in gpu.items()}
    c = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cpu.items()}
    fn(g)
    fn(c)
    torch.cuda.synchronize()
    return torch.equal(g[written].cpu().view(torch.uint8), c[written].view(torch.uint8))


def run(sizes: list[int], only: Optional[list[str]] = None) -> dict:
    """Time every op (or those whose name contains one of ``only``) at every size; returns the
    report (also what ``vllm_ops.json`` holds)."""
    bw = timing.copy_bandwidth_gbs()
    report: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bw, "vllm_kernels": "not built", "rows": []}
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        cpu_sets = [_case(n, "cpu", gen) for _ in range(timing.INPUT_SETS)]
        sets = [{k: (v.to("cuda") if isinstance(v, torch.Tensor) and k != "mapping" else v) for k, v in s.items()}
                for s in cpu_sets]  # fmt: skip
        for name, (fn, written) in _ops().items():
            if only and not any(o in name for o in only):
                continue
            timing.progress(f"vllm_ops: n={n} {name}")
            row = {"n": n, "op": name, "bytes": OPS[name] * n}
            if not _agrees(fn, written, sets[0], cpu_sets[0]):
                row["status"] = "WRONG"
            else:
                if name == "swap_blocks":
                    us = timing.event_median_us(lambda: fn(sets[0]))
                    row["bytes"] = OPS[name] * BS * sets[0]["mapping"].shape[0]
                else:
                    us = timing.graph_median_us(timing.rotating(fn, [(s,) for s in sets]), calls=len(sets))
                row.update(status="ok", us=us, gbs=row["bytes"] / (us * 1e-6) / 1e9)
                row["pct_copy_bw"] = 100.0 * row["gbs"] / bw
            report["rows"].append(row)
    return report


def format_table(report: dict) -> str:
    lines = [
        f"device: {report['device']}; copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s (read + write); "
        f"vLLM's kernels: {report['vllm_kernels']}",
        "",
        "| op | n | µs | GB/s | % copy bw |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['n']} | {r['status']} | | |")
        else:
            lines.append(f"| {r['op']} | {r['n']} | {r['us']:.2f} | {r['gbs']:.0f} | {r['pct_copy_bw']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="vLLM's MLA cache ops on mlakv vs copy bandwidth")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="token counts (default %(default)s)")
    ap.add_argument("--ops", default="", help="only ops whose name contains one of these (comma list), e.g. concat")
    ap.add_argument("--out", type=out_dir, default=None, help="directory for vllm_ops.json / vllm_ops.md")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("vllm_ops: needs a CUDA GPU")
        return 1
    report = run([int(x) for x in args.sizes.split(",") if x], [o for o in args.ops.split(",") if o])
    table = format_table(report)
    print(table, end="")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vllm_ops.json").write_text(json.dumps(report, indent=1))
        (args.out / "vllm_ops.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
