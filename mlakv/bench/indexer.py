"""DSA indexer K cache benchmark: the quantizing store (and the page-table gather), providers side by side.

Why: issue 24's goals compare mlakv's indexer store with sglang's (``FusedStoreCacheIndexerKernel<bf16_t,
int64_t, 64, true>::run`` from ``deepseek_v4/store.cuh``, built from the peer's source in
``.peers/sglang`` as sglang builds it) at n in {1, 8, 64, 512, 4096, 65536}, and ask for >= 80 % of
the copy bandwidth at 65536 keys. Per n (GPU, bf16 keys ``[n, 128]``, int64 slots, a random
permutation of the pages' slots) it times, as the median CUDA-graph replay over 8 rotating input
sets (:mod:`mlakv.bench.timing`):

* ``mlakv``: the public op (:func:`mlakv.ops.indexer.set_index_k_buffer`; the dispatcher picks the JIT
  kernel on SM90+); ``mlakv-jit`` and ``mlakv-triton``: each kernel called directly; ``sglang``: the peer.
* with ``--sweep``: the JIT store at every launch shape (keys per half-warp 1/2/4 x warps per CTA 4/8 x
  the PDL trigger at entry or after the wait).
* with ``--triton-sweep``: the Triton store (``triton wW kK``) at every launch shape of
  :data:`mlakv.spec.tuning.INDEXER_TRITON_SWEEP` (W warps, K keys per program); the report gives per
  n the fastest of them against the JIT store and the table's launch (``mlakv-triton``), and the
  ``INDEXER_TRITON_STEPS`` rows those fastest shapes make.
* the gather (``get_index_k_buffer``, JIT and Triton) of 4 requests of ``n / 4`` tokens.

Before any timing, every store provider writes the same keys into a copy of the same poisoned pages
and the pages must be byte-equal to the plain-torch reference (run on the CPU): a provider that
differs is reported ``WRONG`` and not timed. Bandwidth counts bytes read + written (store: 256 + 132
per key; gather: 132 + 132 per token) against the device-to-device copy bandwidth.

Run: ``python -m mlakv bench indexer [--sizes 1,8,64,512,4096,65536] [--sweep] [--triton-sweep]
[--out bench-out]``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

from mlakv.ops.indexer import get_index_k_buffer, index_k_path, set_index_k_buffer
from mlakv.ops.indexer_reference import INDEX_PAGE_BYTES, store_index_k_reference
from mlakv.spec.calls import IndexStoreCall
from mlakv.spec.tuning import INDEXER_TRITON_SWEEP

from . import timing
from .options import INDEXER_SIZES, indexer_parser
from .report import cell, launch_grid, pct, provider_table, ratio, run_on_gpu, table_steps

__all__ = ["DEFAULT_SIZES", "build_sglang_indexer_store", "run_indexer_bench", "format_tables", "main"]

DEFAULT_SIZES = INDEXER_SIZES
STORE_BYTES_PER_KEY = 256 + 132  # bf16 key read + e4m3 key and fp32 scale written
GATHER_BYTES_PER_TOKEN = 132 + 132

_SGLANG_WRAPPER = """\
#include "deepseek_v4/store.cuh"

namespace sglang {
TVM_FFI_DLL_EXPORT_TYPED_FUNC(store_indexer, (sglang::FusedStoreCacheIndexerKernel<bf16_t, int64_t, 64, true>::run));
}  // namespace sglang
"""


def build_sglang_indexer_store(device_capability: Optional[tuple[int, int]] = None) -> Any:
    """sglang's indexer store built from the peer's source (``store_indexer(input [n, 128] bf16, cache
    [num_pages, 8448] uint8, indices [n] int64)``); raises ``JitUnavailable`` with the reason."""
    from .sglang_peer import build_sglang_source

    return build_sglang_source("sglang_indexer_store_bf16_i64_p64_pdl", _SGLANG_WRAPPER, device_capability)


def _input_sets(n: int, count: int, device: str = "cuda") -> list[dict]:
    pages = -(-n // 64) + 1
    sets = []
    for _ in range(count):
        sets.append(
            dict(
                keys=(torch.randn(n, 128, device=device) * torch.rand(n, 1, device=device) * 10).to(torch.bfloat16),
                loc=torch.randperm(pages * 64, device=device)[:n],
                pages=torch.randint(0, 256, (pages, INDEX_PAGE_BYTES), dtype=torch.uint8, device=device),
            )
        )
    return sets


def _call(d: dict) -> IndexStoreCall:
    """The kernels' call for set ``d`` (no row selection, sglang's fp32 scale)."""
    return IndexStoreCall(d["pages"], d["loc"], d["keys"])


def _store_providers(sweep: bool, triton_sweep: bool = False) -> dict[str, Callable[[dict], None]]:
    from mlakv.kernels.cuda.indexer import indexer_jit_store
    from mlakv.kernels.triton.indexer import launch_store_index_k

    out: dict[str, Callable[[dict], None]] = {
        "mlakv": lambda d: set_index_k_buffer(d["pages"], d["loc"], d["keys"]),
        "mlakv-jit": lambda d: indexer_jit_store(_call(d)),
        "mlakv-triton": lambda d: launch_store_index_k(_call(d)),
    }
    try:
        mod = build_sglang_indexer_store()
        out["sglang"] = lambda d: mod.store_indexer(d["keys"], d["pages"], d["loc"])
    except Exception as e:  # noqa: BLE001 - an absent peer is reported, the rest still runs
        timing.progress(f"indexer bench: sglang's store not built ({e})")
    for kw in launch_grid(steps=(1, 2, 4), num_warps=(4, 8), early_trigger=(True, False)) if sweep else ():
        name = f"jit s{kw['steps']} w{kw['num_warps']} {'entry' if kw['early_trigger'] else 'wait'}"
        out[name] = lambda d, kw=kw: indexer_jit_store(_call(d), **kw)
    for warps, keys in INDEXER_TRITON_SWEEP if triton_sweep else ():
        kw = dict(num_warps=warps, rows_per_program=keys)
        out[f"triton w{warps} k{keys}"] = lambda d, kw=kw: launch_store_index_k(_call(d), **kw)
    return out


def _check_store(fn: Callable[[dict], None], d: dict, want: torch.Tensor) -> bool:
    """Run ``fn`` on a copy of the set's poisoned pages; True when the bytes equal the reference's."""
    trial = dict(d, pages=d["pages"].clone())
    fn(trial)
    torch.cuda.synchronize()
    return torch.equal(trial["pages"].cpu(), want)


def run_indexer_bench(sizes: list[int], sweep: bool = False, triton_sweep: bool = False,
                      into: Optional[dict] = None) -> dict:  # fmt: skip
    """Time every provider at each n; ``{"device", "copy_gbs", "store": [...], "gather": [...]}`` (GPU only).
    The rows go into ``into`` (returned) as each is measured, so an interrupted run keeps them."""
    copy_gbs = timing.copy_bandwidth_gbs()
    providers = _store_providers(sweep, triton_sweep)
    store_rows: list[dict] = []
    gather_rows: list[dict] = []
    res = {} if into is None else into
    res.update(device=torch.cuda.get_device_name(), copy_gbs=copy_gbs, store=store_rows, gather=gather_rows)
    for n in sizes:
        timing.progress(f"indexer bench: n={n}")
        sets = _input_sets(n, timing.INPUT_SETS)
        d0 = sets[0]
        want = d0["pages"].cpu().clone()
        store_index_k_reference(IndexStoreCall(want, d0["loc"].cpu(), d0["keys"].cpu()))  # the spec, on the CPU
        row: dict[str, Any] = {"n": n, "path": index_k_path(d0["pages"])}
        for name, fn in providers.items():
            if not _check_store(fn, d0, want):
                row[name] = "WRONG"
                continue
            us = timing.graph_median_us(timing.rotating(fn, [(d,) for d in sets]), calls=len(sets))
            row[name] = us
            row[f"{name} of copy bw"] = n * STORE_BYTES_PER_KEY / (us * 1e-6) / 1e9 / copy_gbs
        store_rows.append(row)
        # the gather: 4 requests of ~n/4 tokens through random page tables over the set's pages
        g: dict[str, Any] = {"n": n}
        batch = 4 if n >= 4 else 1
        lens = torch.full((batch,), n // batch, dtype=torch.int64, device="cuda")
        lens[0] += n - int(lens.sum())
        width = -(-int(lens.max()) // 64)
        tables = [torch.randint(0, d["pages"].shape[0], (batch, width), device="cuda") for d in sets]
        total, max_len = int(lens.sum()), int(lens.max())
        from mlakv.kernels.triton.indexer import launch_gather_index_k
        from mlakv.ops.indexer_reference import gather_index_k_reference

        want_k, want_s = gather_index_k_reference(d0["pages"].cpu(), tables[0].cpu(), lens.cpu())
        gathers = {
            "mlakv": lambda d, t: get_index_k_buffer(d["pages"], t, lens, total_tokens=total, max_seq_len=max_len),
            "mlakv-triton": lambda d, t: launch_gather_index_k(d["pages"], t, lens, total, max_len),
        }
        for name, fn in gathers.items():
            k, s = fn(d0, tables[0])
            torch.cuda.synchronize()
            ok = torch.equal(k.cpu().view(torch.uint8), want_k.view(torch.uint8)) and torch.equal(
                s.cpu().view(torch.int32), want_s.view(torch.int32)
            )
            if not ok:
                g[name] = "WRONG"
                continue
            us = timing.graph_median_us(timing.rotating(fn, list(zip(sets, tables))), calls=len(sets))
            g[name] = us
            g[f"{name} of copy bw"] = n * GATHER_BYTES_PER_TOKEN / (us * 1e-6) / 1e9 / copy_gbs
        gather_rows.append(g)
        del sets
        torch.cuda.empty_cache()
    return res


def _triton_shape(name: str) -> tuple[int, int]:
    """A sweep provider's launch shape: ``triton w4 k16`` -> (num_warps 4, keys per program 16)."""
    w, k = name.split()[1:]
    return int(w[1:]), int(k[1:])



def _fastest_triton(rows: list[dict]) -> list[str]:
    """Per n, the fastest Triton launch shape of a ``--triton-sweep`` against the JIT store's time
    (``mlakv-jit``) and the table's launch (``mlakv-triton``), then the ``INDEXER_TRITON_STEPS`` rows
    those shapes make; nothing without a sweep. A size given twice counts its fastest time."""
    best: dict[int, tuple[float, str, dict]] = {}
    for r in rows:
        times = {k: v for k, v in r.items() if k.startswith("triton w") and not k.endswith("copy bw")
                 and isinstance(v, float)}  # fmt: skip
        if times:
            name = min(times, key=times.get)
            if r["n"] not in best or times[name] < best[r["n"]][0]:
                best[r["n"]] = (times[name], name, r)
    out = []
    for n in sorted(best):
        us, name, r = best[n]
        vs = [f"{ratio(us, r[k])} {k}'s {cell(r[k])}" for k in ("mlakv-jit", "mlakv-triton")
              if isinstance(r.get(k), float)]  # fmt: skip
        out.append(f"- n={n}: {name}: {us:.2f} µs" + (f" ({'; '.join(vs)})" if vs else ""))
    if not out:
        return []
    steps = tuple(table_steps([(n, _triton_shape(best[n][1])) for n in sorted(best)]))
    return ["", "Fastest Triton launch shape (`--triton-sweep`):", "", *out, "",
            f"INDEXER_TRITON_STEPS = {steps!r}"]  # fmt: skip


def format_tables(res: dict) -> str:
    """Markdown tables: times (µs per call), the share of copy bandwidth, and sglang / mlakv; with a
    ``--triton-sweep``, the fastest Triton launch shape per n and the table rows they make."""
    names = [k for k in res["store"][0] if k not in ("n", "path") and not k.endswith("of copy bw")]
    out = [
        f"device: {res['device']}; copy bandwidth {res['copy_gbs']:.0f} GB/s (read + write); "
        "times: µs per call, median CUDA-graph replay over 8 rotating input sets",
        "",
        *provider_table(res["store"], names, {"sglang / mlakv": ("sglang", "mlakv")}),
        *_fastest_triton(res["store"]),
    ]
    out += ["", "| n | gather mlakv µs | of copy bw | gather triton µs | of copy bw |", "|---|---|---|---|---|"]
    for g in res["gather"]:
        out.append(
            f"| {g['n']} | {cell(g.get('mlakv', '-'))} | {pct(g.get('mlakv of copy bw'))} | "
            f"{cell(g.get('mlakv-triton', '-'))} | {pct(g.get('mlakv-triton of copy bw'))} |"
        )
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    # the command line is mlakv.bench.options.indexer_parser's: a bad --sizes is a usage error (exit 2), on any machine
    args = indexer_parser(__doc__.splitlines()[0]).parse_args(argv)
    run = lambda res: run_indexer_bench(list(args.sizes), sweep=args.sweep, triton_sweep=args.triton_sweep, into=res)  # noqa: E731
    return run_on_gpu("indexer bench", args.out, "indexer", run, format_tables)


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    sys.exit(run_module("mlakv.bench.indexer", main))
