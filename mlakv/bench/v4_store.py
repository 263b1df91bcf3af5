"""DeepSeek-V4 family paged-cache store benchmark: mlakv's store against sglang's, side by side.

Why: issue 23's goals compare mlakv's store with sglang 0.5.23's (``FusedStoreCacheFlashMLAKernel<bf16_t,
int64_t, 64, KVLayout, true>::run`` / ``::run_rope`` from ``deepseek_v4/store.cuh``, built from the peer's
source in ``.peers/sglang`` as sglang builds it) at n in {1, 8, 64, 512, 1024, 4096, 16384, 65536}, and
ask for >= 85 % of the copy bandwidth at 65536 tokens and an in-kernel RoPE costing <= 5 % at >= 4096.
Per layout and n (GPU, bf16 tokens ``[n, 512]``, int64 slots: a random permutation of the pages'
slots, page size 64) it times, as the median CUDA-graph replay over 8 rotating input sets
(:mod:`mlakv.bench.timing`):

* ``mlakv``: the public op (:func:`mlakv.ops.v4.set_v4_kv_buffer`; the dispatcher picks the JIT kernel
  on SM90+); ``mlakv-jit`` and ``mlakv-triton``: each kernel called directly; ``sglang``: the peer;
* with ``--rope``: ``mlakv+rope`` / ``mlakv-triton+rope`` / ``sglang+rope`` (``freqs_cis [n, 64]``) and
  ``mlakv+pos`` (``positions`` into a 4096-row ``cos_sin_cache``, which stays in L2);
* with ``--sweep``: the JIT store at every launch shape (warps per CTA 2/4/8 x tokens per warp 1/2 x
  the PDL trigger at entry or after the wait).
* with ``--triton-sweep``: the Triton store (``triton wW tT``) at every launch shape of
  :data:`mlakv.spec.tuning.V4_TRITON_SWEEP` (W warps, T tokens per program; with ``--rope`` also
  with ``freqs_cis``), and per n the fastest of them against the JIT store (issue 27's 1.15x).

Before any timing every provider stores the same tokens into a copy of the same poisoned pages and
the pages are compared with the plain-torch reference (run on the CPU): an mlakv provider that
differs is reported ``WRONG`` and not timed; sglang's is timed and the number of tokens whose bytes
differ is reported (its in-kernel RoPE may contract products into FMAs, which the reference does not).
Bandwidth counts bytes read + written per token (1024 read + 8 for the slot, + 256 for ``freqs_cis``;
583 / 528 / 288 written) against the device-to-device copy bandwidth.

Run: ``python -m mlakv bench v4 [--layouts v4,v41,v41_fp4] [--sizes ...] [--rope] [--sweep] [--triton-sweep]
[--out bench-out]``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

from mlakv.ops import v4_reference as ref
from mlakv.ops.v4 import set_v4_kv_buffer, v4_store_path
from mlakv.spec.calls import V4StoreCall
from mlakv.spec.tuning import V4_TRITON_SWEEP

from . import timing
from .options import v4_parser
from .report import cell, launch_grid, provider_table, ratio, run_on_gpu

__all__ = ["PAGE_SIZE", "build_sglang_v4_store", "bytes_per_token", "run_v4_bench", "format_tables", "main"]

PAGE_SIZE = 64
TABLE_ROWS = 4096
_CPP_LAYOUT = {"v4": "V4", "v41": "V41", "v41_fp4": "V41_FP4", "v41_new": "V41_NEW", "v41_fp4_new": "V41_FP4_NEW"}

_SGLANG_WRAPPER = """\
#include "deepseek_v4/store.cuh"

namespace sglang {{
using StoreKernel = FusedStoreCacheFlashMLAKernel<bf16_t, int64_t, {page}, {layout}, true>;
TVM_FFI_DLL_EXPORT_TYPED_FUNC(store, StoreKernel::run);
{rope}}}  // namespace sglang
"""
_SGLANG_ROPE = "TVM_FFI_DLL_EXPORT_TYPED_FUNC(store_rope, StoreKernel::run_rope);\n"


def build_sglang_v4_store(layout: str, device_capability: Optional[tuple[int, int]] = None) -> Any:
    """sglang's store of ``layout`` (page size 64, bf16, int64 indices, PDL) built from the peer's source:
    ``store(input [n, 512] bf16, cache [num_pages, page_bytes] uint8, indices [n] int64)`` and, but for
    ``v4``, ``store_rope(input, cache, indices, freqs_cis [n, 64] fp32)``; raises ``JitUnavailable``."""
    from .sglang_peer import build_sglang_source

    src = _SGLANG_WRAPPER.format(page=PAGE_SIZE, layout=_CPP_LAYOUT[layout], rope="" if layout == "v4" else _SGLANG_ROPE)
    return build_sglang_source(f"sglang_v4_store_{layout}_p{PAGE_SIZE}_pdl", src, device_capability)


def bytes_per_token(layout: str, rope: bool = False) -> int:
    """Bytes a store moves per token: 1024 read (+256 freqs_cis) + 8 (the slot), and the bytes written."""
    g = ref.v4_geometry(layout)
    return 1024 + 8 + (256 if rope else 0) + g.value_bytes + g.scales


def _input_sets(n: int, count: int, layout: str, device: str = "cuda") -> list[dict]:
    pages = -(-n // PAGE_SIZE) + 1
    pb = ref.v4_geometry(layout).page_bytes(PAGE_SIZE)
    sets = []
    for _ in range(count):
        theta = torch.rand(n, 32, device=device) * 6.3
        table = torch.rand(TABLE_ROWS, 32, device=device) * 6.3
        sets.append(
            dict(
                kv=(torch.randn(n, 512, device=device) * torch.exp2(torch.randint(-8, 8, (n, 1), device=device).float())).to(torch.bfloat16),
                loc=torch.randperm(pages * PAGE_SIZE, device=device)[:n],
                pages=torch.randint(0, 256, (pages, pb), dtype=torch.uint8, device=device),
                freqs=torch.stack((torch.cos(theta), torch.sin(theta)), -1).reshape(n, 64).contiguous(),
                positions=torch.randint(0, TABLE_ROWS, (n,), device=device),
                table=torch.cat((torch.cos(table), torch.sin(table)), 1).contiguous(),
            )
        )
    return sets


def _call(d: dict, **rope) -> V4StoreCall:
    """The kernels' call for set ``d`` (no row selection; ``rope``: ``freqs_cis=...``)."""
    return V4StoreCall(d["pages"], d["loc"], d["kv"], **rope)


def _providers(
    layout: str, names: list[str], rope: bool, sweep: bool, triton_sweep: bool = False
) -> dict[str, tuple[Callable[[dict], None], str]]:
    """``name -> (store(d), rope kind)``; the rope kind says which reference the provider is checked against."""
    from mlakv.kernels.cuda.v4_store import v4_jit_store
    from mlakv.kernels.triton.v4_store import ENCODINGS, launch_v4_store

    g = ref.v4_geometry(layout)
    geo = g.kernel_geometry(PAGE_SIZE)
    enc = ENCODINGS[g.encoding]
    out: dict[str, tuple[Callable[[dict], None], str]] = {}
    if "mlakv" in names:
        out["mlakv"] = (lambda d: set_v4_kv_buffer(d["pages"], d["loc"], d["kv"], layout, PAGE_SIZE), "none")
    if "mlakv-jit" in names:
        out["mlakv-jit"] = (lambda d: v4_jit_store(_call(d), layout, PAGE_SIZE), "none")
    if "mlakv-triton" in names:
        out["mlakv-triton"] = (lambda d: launch_v4_store(_call(d), encoding=enc, **geo), "none")
    mod = None
    if "sglang" in names:
        try:
            mod = build_sglang_v4_store(layout)
            out["sglang"] = (lambda d: mod.store(d["kv"], d["pages"], d["loc"]), "none")
        except Exception as e:  # noqa: BLE001 - an absent peer is reported, the rest still runs
            timing.progress(f"v4 bench: sglang's {layout} store not built ({e})")
    if rope:
        if "mlakv" in names:
            out["mlakv+rope"] = (
                lambda d: set_v4_kv_buffer(d["pages"], d["loc"], d["kv"], layout, PAGE_SIZE, freqs_cis=d["freqs"]), "freqs"
            )
            out["mlakv+pos"] = (
                lambda d: set_v4_kv_buffer(
                    d["pages"], d["loc"], d["kv"], layout, PAGE_SIZE, positions=d["positions"], cos_sin_cache=d["table"]
                ),
                "table",
            )
        if "mlakv-triton" in names:
            out["mlakv-triton+rope"] = (
                lambda d: launch_v4_store(_call(d, freqs_cis=d["freqs"]), encoding=enc, **geo), "freqs"
            )
        if mod is not None and layout != "v4":
            out["sglang+rope"] = (lambda d: mod.store_rope(d["kv"], d["pages"], d["loc"], d["freqs"]), "freqs")
    for kw in launch_grid(num_warps=(2, 4, 8), items=(1, 2), early_trigger=(True, False)) if sweep else ():
        name = f"jit w{kw['num_warps']} t{kw['items']} {'entry' if kw['early_trigger'] else 'wait'}"
        out[name] = (lambda d, kw=kw: v4_jit_store(_call(d), layout, PAGE_SIZE, **kw), "none")
        if rope:  # the in-kernel RoPE (freqs_cis) at the same launch shape
            out[name + " +rope"] = (
                lambda d, kw=kw: v4_jit_store(_call(d, freqs_cis=d["freqs"]), layout, PAGE_SIZE, **kw), "freqs"
            )
    for warps, tokens in V4_TRITON_SWEEP if triton_sweep else ():
        name = f"triton w{warps} t{tokens}"
        kw = dict(num_warps=warps, rows_per_program=tokens)
        out[name] = (lambda d, kw=kw: launch_v4_store(_call(d), encoding=enc, **geo, **kw), "none")
        if rope:
            out[name + " +rope"] = (
                lambda d, kw=kw: launch_v4_store(_call(d, freqs_cis=d["freqs"]), encoding=enc, **geo, **kw), "freqs"
            )
    return out


def _reference(d: dict, layout: str, kind: str) -> torch.Tensor:
    want = d["pages"].cpu().clone()
    cos = sin = None
    if kind == "freqs":
        cos, sin = ref.rope_cos_sin(d["loc"].shape[0], freqs_cis=d["freqs"].cpu())
    elif kind == "table":
        cos, sin = ref.rope_cos_sin(d["loc"].shape[0], positions=d["positions"].cpu(), cos_sin_cache=d["table"].cpu())
    ref.set_v4_kv_buffer_torch(want, d["loc"].cpu(), d["kv"].cpu(), layout, PAGE_SIZE, cos=cos, sin=sin)
    return want


def _tokens_differing(fn: Callable[[dict], None], d: dict, want: torch.Tensor, layout: str) -> int:
    """Run ``fn`` on a copy of the set's poisoned pages; the number of tokens whose bytes (values or
    scales) differ from the reference's, or -1 when bytes outside every token's differ."""
    trial = dict(d, pages=d["pages"].clone())
    fn(trial)
    torch.cuda.synchronize()
    got = trial["pages"].cpu()
    if torch.equal(got, want):
        return 0
    g = ref.v4_geometry(layout)
    bad = 0
    touched = torch.zeros_like(got, dtype=torch.bool)
    for slot in d["loc"].cpu().tolist():
        p, r = divmod(slot, PAGE_SIZE)
        a, b = g.data_offset(r, PAGE_SIZE), g.scale_offset(r, PAGE_SIZE)
        touched[p, a : a + g.value_bytes] = True
        touched[p, b : b + g.scales] = True
        if not (torch.equal(got[p, a : a + g.value_bytes], want[p, a : a + g.value_bytes])
                and torch.equal(got[p, b : b + g.scales], want[p, b : b + g.scales])):  # fmt: skip
            bad += 1
    return -1 if not torch.equal(got[~touched], want[~touched]) else bad


def run_v4_bench(
    layouts: list[str], sizes: list[int], providers: list[str], rope: bool = False, sweep: bool = False,
    triton_sweep: bool = False, into: Optional[dict] = None,
) -> dict:
    """Time every provider at each layout and n; ``{"device", "copy_gbs", "rows": [...]}`` (GPU only).
    The rows go into ``into`` (returned) as each is measured, so an interrupted run keeps them."""
    copy_gbs = timing.copy_bandwidth_gbs()
    rows: list[dict] = []
    res = {} if into is None else into
    res.update(device=torch.cuda.get_device_name(), copy_gbs=copy_gbs, rows=rows)
    for layout in layouts:
        provs = _providers(layout, providers, rope, sweep, triton_sweep)
        for n in sizes:
            timing.progress(f"v4 bench: {layout} n={n}")
            sets = _input_sets(n, timing.INPUT_SETS, layout)
            d0 = sets[0]
            wants = {kind: _reference(d0, layout, kind) for kind in {k for _, k in provs.values()}}
            row: dict[str, Any] = {"layout": layout, "n": n, "path": v4_store_path(d0["pages"], layout)}
            for name, (fn, kind) in provs.items():
                differ = _tokens_differing(fn, d0, wants[kind], layout)
                if differ and name.startswith(("mlakv", "jit", "triton")):
                    row[name] = "WRONG"
                    continue
                if differ:
                    row[f"{name} check"] = "bytes outside the tokens changed" if differ < 0 else f"{differ} of {n} tokens differ"
                us = timing.graph_median_us(timing.rotating(fn, [(d,) for d in sets]), calls=len(sets))
                row[name] = us
                moved = n * bytes_per_token(layout, rope=kind == "freqs")
                row[f"{name} of copy bw"] = moved / (us * 1e-6) / 1e9 / copy_gbs
            rows.append(row)
            del sets
            torch.cuda.empty_cache()
    return res


_RATIOS = {
    "sglang / mlakv": ("sglang", "mlakv"),
    "rope / store": ("mlakv+rope", "mlakv"),
    "pos / store": ("mlakv+pos", "mlakv"),
    "triton / jit": ("mlakv-triton", "mlakv-jit"),
    "triton+rope / rope": ("mlakv-triton+rope", "mlakv+rope"),
}


def _fastest_triton(rows: list[dict]) -> list[str]:
    """Per n, the fastest Triton launch shape of a ``--triton-sweep`` (without, then with RoPE) against
    the JIT store's time (``mlakv-jit``, ``mlakv+rope``); nothing without a sweep."""
    out = []
    for r in rows:
        for rope, jit in ((False, "mlakv-jit"), (True, "mlakv+rope")):
            times = {k: v for k, v in r.items() if k.startswith("triton w") and not k.endswith("copy bw")
                     and k.endswith("+rope") == rope and isinstance(v, float)}  # fmt: skip
            if times:
                best = min(times, key=times.get)
                vs = f" ({ratio(times[best], r[jit])} {jit}'s {cell(r[jit])})" if isinstance(r.get(jit), float) else ""
                out.append(f"- n={r['n']}: {best}: {times[best]:.2f} µs{vs}")
    return ["", "Fastest Triton launch shape (`--triton-sweep`):", "", *out] if out else []


def format_tables(res: dict) -> str:
    """Markdown: per layout, times (µs per call) of every provider, mlakv's share of copy bandwidth,
    sglang / mlakv, and (with RoPE) mlakv+rope / mlakv and mlakv+pos / mlakv."""
    out = [
        f"device: {res['device']}; copy bandwidth {res['copy_gbs']:.0f} GB/s (read + write); "
        "times: µs per call, median CUDA-graph replay over 8 rotating input sets; page size 64, bf16 tokens",
    ]
    for layout in dict.fromkeys(r["layout"] for r in res["rows"]):
        rows = [r for r in res["rows"] if r["layout"] == layout]
        names = [k for k in rows[0] if k not in ("layout", "n", "path") and not k.endswith(("of copy bw", "check"))]
        out += [
            "",
            f"### {layout} ({bytes_per_token(layout)} B moved per token)",
            "",
            *provider_table(rows, names, _RATIOS),
        ]
        out += _fastest_triton(rows)
        notes = [f"{layout} n={r['n']}: {k[:-6]}: {v}" for r in rows for k, v in r.items() if k.endswith(" check")]
        if notes:
            out += ["", "Checks: " + "; ".join(notes)]
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    # the command line is mlakv.bench.options.v4_parser's: a bad --sizes is a usage error (exit 2), on any machine
    args = v4_parser(__doc__.splitlines()[0]).parse_args(argv)
    run = lambda res: run_v4_bench(  # noqa: E731
        list(args.layouts), list(args.sizes), list(args.providers), rope=args.rope, sweep=args.sweep,
        triton_sweep=args.triton_sweep, into=res,
    )
    return run_on_gpu("v4 bench", args.out, "v4", run, format_tables)


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.v4_store", main))
