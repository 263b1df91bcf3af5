"""FP8 KV-cache benchmark: the fused quantizing write and the dequantizing gather, side by side.

Why: issue 12's performance goals compare the fused write with what an engine would do without it.
Per n_loc (GPU, bf16 sources, 512 + 64) it times, as the median CUDA-graph replay of 8 layers'
calls divided by 8 (``triton.testing.do_bench_cudagraph``):

* ds_mla: ``fused`` (the dispatcher: JIT on SM90+), ``fused-triton``, ``plain-u8-656`` (the plain
  byte write of already-quantized 528 + 128-byte rows, same output bytes) and ``quant-then-write``
  (the quantize kernel into a temporary ``[n_loc, 656]``, then the byte write: two launches);
* per_tensor: ``fused``, ``fused-triton``, ``plain-u8-576`` (byte write of the same 576 output
  bytes) and ``plain-bf16`` (the bf16 cache's write, 1152 bytes);
* gather: ``dequant-ds_mla`` and ``dequant-per_tensor`` to bf16 vs ``plain-gather-bf16`` (the
  plain row gather of a bf16 cache), with the achieved bandwidth (bytes read + written) as a
  fraction of the device-to-device copy bandwidth.

Every provider is checked bit-exactly against the torch reference (run on the CPU) before it is
timed. Ratios are printed beside the times.
Run: ``python -m mlakv bench fp8 [--sizes 1,128,4096,65536] [--out bench-out]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from mlakv.mem_cache import (
    dequantize_mla_rows,
    fp8_row_bytes,
    get_mla_kv_buffer_dequant,
    quantize_mla_rows,
    set_mla_kv_buffer_quant,
    set_mla_kv_buffer_triton,
)
from mlakv.ops.fp8 import fp8_write_path, scale_tensor

from .options import fp8_parser as build_parser
from .timing import INPUT_SETS, copy_bandwidth_gbs, graph_median_us, rotating

__all__ = ["run_fp8_bench", "main"]

NOPE, ROPE = 512, 64
LAYERS = INPUT_SETS  # input sets (layers) per timed graph
K_SCALE = 0.0625


def _graph_us(fn: Callable[[dict], object], layers: list[dict]) -> float:
    """CUDA-graph median per call of ``fn``, once per layer's inputs in each replay."""
    return graph_median_us(rotating(fn, [(d,) for d in layers]), calls=len(layers))


def _layers(n: int, device: str = "cuda") -> list[dict]:
    out = []
    num_slots = n + 64
    for _ in range(LAYERS):
        d = dict(
            nope=torch.randn(n, NOPE, device=device).to(torch.bfloat16),
            rope=torch.randn(n, ROPE, device=device).to(torch.bfloat16),
            loc=torch.randperm(num_slots, device=device)[:n],
            kv656=torch.randint(0, 256, (num_slots, 1, 656), dtype=torch.uint8, device=device),
            kv576=torch.randint(0, 256, (num_slots, 1, 576), dtype=torch.uint8, device=device),
            kvbf16=torch.randn(num_slots, 1, 576, device=device).to(torch.bfloat16),
            tmp656=torch.empty(n, 656, dtype=torch.uint8, device=device),
            iota=torch.arange(n, device=device),
        )
        # the expected rows: the reference on the CPU (the spec), moved to the device
        nope_c, rope_c = d["nope"].cpu(), d["rope"].cpu()
        d["q656"] = quantize_mla_rows(nope_c, rope_c, "ds_mla").to(device)
        d["q576"] = quantize_mla_rows(nope_c, rope_c, "per_tensor", K_SCALE).view(torch.uint8).to(device)
        out.append(d)
    return out


def _write_providers(scale: torch.Tensor) -> dict[str, dict[str, Callable[[dict], None]]]:
    from mlakv.kernels.triton.fp8 import launch_quant_write

    def quant_then_write(d):
        set_mla_kv_buffer_quant(d["tmp656"], d["iota"], d["nope"], d["rope"], "ds_mla")  # quantize kernel
        set_mla_kv_buffer_triton(d["kv656"], d["loc"], d["tmp656"][:, :528], d["tmp656"][:, 528:])

    return {
        "ds_mla": {
            "fused": lambda d: set_mla_kv_buffer_quant(d["kv656"], d["loc"], d["nope"], d["rope"], "ds_mla"),
            "fused-triton": lambda d: launch_quant_write(d["kv656"], d["loc"], d["nope"], d["rope"], "ds_mla", None),
            "plain-u8-656": lambda d: set_mla_kv_buffer_triton(d["kv656"], d["loc"], d["q656"][:, :528], d["q656"][:, 528:]),
            "quant-then-write": quant_then_write,
        },
        "per_tensor": {
            "fused": lambda d: set_mla_kv_buffer_quant(d["kv576"], d["loc"], d["nope"], d["rope"], "per_tensor", scale),
            "fused-triton": lambda d: launch_quant_write(d["kv576"], d["loc"], d["nope"], d["rope"], "per_tensor", scale),
            "plain-u8-576": lambda d: set_mla_kv_buffer_triton(d["kv576"], d["loc"], d["q576"][:, :512], d["q576"][:, 512:]),
            "plain-bf16": lambda d: set_mla_kv_buffer_triton(d["kvbf16"], d["loc"], d["nope"], d["rope"]),
        },
    }


def _check_write(fmt: str, name: str, fn: Callable[[dict], None], d: dict) -> Optional[str]:
    key = "kv656" if fmt == "ds_mla" else "kv576"
    if name == "plain-bf16":
        return None  # a different cache dtype: checked by the plain write's own tests
    kv = d[key]
    expected = kv.clone()
    rows = d["q656"] if fmt == "ds_mla" else d["q576"]
    expected[d["loc"], 0] = rows
    fn(d)
    torch.cuda.synchronize()
    return None if torch.equal(kv, expected) else "WRONG"


def run_fp8_bench(sizes: list[int], into: Optional[dict] = None) -> dict:
    """Time every provider at each n_loc; return ``{"device", "copy_gbs", "write": [...], "gather": [...]}`` (GPU only).

    The rows go into ``into`` (a new dict by default) as they are measured, so a caller that is
    interrupted keeps the rows done so far.
    """
    res = {} if into is None else into
    res.update(device=torch.cuda.get_device_name(), copy_gbs=None, write=[], gather=[])
    scale = scale_tensor(K_SCALE, torch.device("cuda"))
    res["copy_gbs"] = copy_gbs = copy_bandwidth_gbs()
    write_rows, gather_rows = res["write"], res["gather"]
    for n in sizes:
        layers = _layers(n)
        for fmt, providers in _write_providers(scale).items():
            kv0 = layers[0]["kv656" if fmt == "ds_mla" else "kv576"]
            row = {"fmt": fmt, "n_loc": n, "path": fp8_write_path(kv0, layers[0]["nope"], layers[0]["rope"], fmt)}
            for name, fn in providers.items():
                bad = _check_write(fmt, name, fn, layers[0])
                row[name] = bad or _graph_us(fn, layers)
            write_rows.append(row)
        g = {"n_loc": n}
        for fmt in ("ds_mla", "per_tensor"):
            kvk = "kv656" if fmt == "ds_mla" else "kv576"
            k = scale if fmt == "per_tensor" else None
            d0 = layers[0]
            got = get_mla_kv_buffer_dequant(d0[kvk], d0["loc"], fmt, NOPE, ROPE, k)
            rows_c = d0[kvk][d0["loc"]].cpu()
            ref = dequantize_mla_rows(rows_c, fmt, NOPE, ROPE, None if k is None else k.cpu())  # on the CPU
            ok = all(torch.equal(a.cpu().view(torch.int16), b.view(torch.int16)) for a, b in zip(got, ref))
            us = _graph_us(lambda d, kvk=kvk, fmt=fmt, k=k: get_mla_kv_buffer_dequant(d[kvk], d["loc"], fmt, NOPE, ROPE, k), layers)
            moved = n * (fp8_row_bytes(fmt, NOPE, ROPE) + 2 * (NOPE + ROPE))
            g[f"dequant-{fmt}"] = us if ok else "WRONG"
            g[f"dequant-{fmt}-of-copy-bw"] = moved / (us * 1e-6) / 1e9 / copy_gbs
        from mlakv.kernels.triton.row_write import launch_get_kv_rows

        us = _graph_us(lambda d: launch_get_kv_rows(d["kvbf16"], d["loc"], NOPE, ROPE), layers)
        g["plain-gather-bf16"] = us
        g["plain-gather-bf16-of-copy-bw"] = n * 4 * (NOPE + ROPE) / (us * 1e-6) / 1e9 / copy_gbs
        gather_rows.append(g)
        del layers
        torch.cuda.empty_cache()
    return res


def _cell(v) -> str:
    return v if isinstance(v, str) else f"{v:.2f}"


def format_tables(res: dict) -> str:
    """Markdown tables with the ratios the goals name."""
    out = [f"device: {res['device']}; copy bandwidth {res['copy_gbs']:.0f} GB/s (read + write); times: us per call, "
           "median CUDA-graph replay"]  # fmt: skip
    out += ["", "| n_loc | ds_mla path | fused | fused-triton | plain-u8-656 | quant-then-write | fused / plain | "
            "quant-then-write / fused |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ratio = lambda a, b: f"{a / b:.2f}x" if not isinstance(a, str) and not isinstance(b, str) else "-"  # noqa: E731
    for r in (r for r in res["write"] if r["fmt"] == "ds_mla"):
        out.append(
            f"| {r['n_loc']} | {r['path']} | {_cell(r['fused'])} | {_cell(r['fused-triton'])} | {_cell(r['plain-u8-656'])} | "
            f"{_cell(r['quant-then-write'])} | {ratio(r['fused'], r['plain-u8-656'])} | {ratio(r['quant-then-write'], r['fused'])} |"
        )
    out += ["", "| n_loc | per_tensor fused | fused-triton | plain-u8-576 | plain-bf16 | fused / plain-u8-576 | fused / plain-bf16 |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in res["write"] if r["fmt"] == "per_tensor"):
        out.append(
            f"| {r['n_loc']} | {_cell(r['fused'])} | {_cell(r['fused-triton'])} | {_cell(r['plain-u8-576'])} | "
            f"{_cell(r['plain-bf16'])} | {ratio(r['fused'], r['plain-u8-576'])} | {ratio(r['fused'], r['plain-bf16'])} |"
        )
    out += ["", "| n_loc | dequant ds_mla us | of copy bw | dequant per_tensor us | of copy bw | plain gather bf16 us | of copy bw |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for g in res["gather"]:
        out.append(
            f"| {g['n_loc']} | {_cell(g['dequant-ds_mla'])} | {g['dequant-ds_mla-of-copy-bw']:.0%} | "
            f"{_cell(g['dequant-per_tensor'])} | {g['dequant-per_tensor-of-copy-bw']:.0%} | "
            f"{_cell(g['plain-gather-bf16'])} | {g['plain-gather-bf16-of-copy-bw']:.0%} |"
        )
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    """``mlakv bench fp8``: returns 0 (also without a GPU: nothing to measure), 2 on a usage error.

    Ctrl-C writes fp8.json and fp8.md with the rows measured so far, then raises ``KeyboardInterrupt``.
    """
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8 bench: no CUDA GPU here; the fused kernels' timings need one (nothing measured)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {}
    try:
        run_fp8_bench(args.sizes, into=res)
    except KeyboardInterrupt:
        if res.get("copy_gbs") is not None:
            res["interrupted"] = True
            (out / "fp8.json").write_text(json.dumps(res, indent=1))
            (out / "fp8.md").write_text("INTERRUPTED (Ctrl-C): the rows measured before it\n\n" + format_tables(res) + "\n")
        raise KeyboardInterrupt(f"{len(res.get('write', []))} write rows and {len(res.get('gather', []))} gather rows "
                                f"measured so far are in {out}/fp8.json and fp8.md") from None  # fmt: skip
    text = format_tables(res)
    print(text)
    (out / "fp8.json").write_text(json.dumps(res, indent=1))
    (out / "fp8.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
