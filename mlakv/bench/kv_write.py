"""Row-write benchmark: every provider side by side, with a roofline and the host cost.

Method (GPU): for each (layout, n_loc), 8 layers' inputs (sources, loc and a kv buffer each) are
written one after another inside one CUDA graph; ``do_bench_cudagraph`` gives the median replay
time, divided by 8 for the per-call time. Each provider is checked bit-exactly against the torch
reference before it is timed; a wrong provider is reported, never timed. For n_loc >= 1024 a cold
median (L2 flushed between calls, ``do_bench``) is taken too. The same run measures the
device-to-device copy bandwidth (bytes read + written) and the graph time of a one-element
kernel, the two floors the rows are read against.

On a machine with no GPU it times the CPU (torch) path over a small sweep and says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

import mlakv
from mlakv.mem_cache import MLATokenToKVPool, kv_write_path, set_mla_kv_buffer_torch, set_mla_kv_buffer_triton

LAYOUTS = {
    "bf16": (torch.bfloat16, 512, 64),
    "fp16": (torch.float16, 512, 64),
    "u8": (torch.uint8, 528, 128),
}
DEFAULT_SIZES = [1, 8, 32, 128, 512, 768, 1024, 2048, 4096, 8192, 16384, 65536]
QUICK_SIZES = [1, 128, 1024, 16384, 65536]
CPU_SIZES = [1, 32, 1024, 8192]
PROVIDERS = ["auto", "jit", "triton", "legacy", "torch"]
LAYERS = 8


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- providers ---------------------------------------------------------------------------------
def _provider_fn(name: str, jit_kw: Optional[dict] = None) -> Callable:
    if name == "auto":
        return set_mla_kv_buffer_triton
    if name == "torch":
        return set_mla_kv_buffer_torch_index_put
    if name == "triton":
        from mlakv.mem_cache.triton_kernels import launch_set_kv_rows

        return launch_set_kv_rows
    if name == "legacy":
        from benchmarks.legacy_kernel import legacy_set_mla_kv_buffer

        return legacy_set_mla_kv_buffer
    if name.startswith("jit"):
        from mlakv import jit_kernel

        kw = dict(jit_kw or {})

        def run(kv, loc, nope, rope):
            jit_kernel.set_mla_kv_buffer(kv, loc, nope, rope, **kw)

        return run
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def set_mla_kv_buffer_torch_index_put(kv, loc, nope, rope) -> None:
    """The ``torch`` provider: two ``index_put_`` calls (no padding support, as engines did)."""
    kv2 = kv.view(kv.shape[0], -1)
    d = nope.shape[-1]
    kv2[:, :d].index_put_((loc,), nope)
    kv2[:, d : d + rope.shape[-1]].index_put_((loc,), rope)


def _provider_available(name: str, layout) -> Optional[str]:
    """None if usable, else why not."""
    if not torch.cuda.is_available():
        return None if name in ("auto", "torch") else "needs a GPU"
    if name.startswith("jit"):
        from mlakv import jit_kernel

        dtype, nd, rd = layout
        es = torch.empty((), dtype=dtype).element_size()
        if not jit_kernel.can_use_set_mla_kv_buffer(nd * es, rd * es):
            return "JIT kernel unavailable here (see log)"
    return None


# ---- inputs ----------------------------------------------------------------------------------
@dataclass
class LayerInputs:
    kv: torch.Tensor
    loc: torch.Tensor
    nope: torch.Tensor
    rope: torch.Tensor


def _make_layers(layout, n_loc: int, loc_dtype, device, layers: int) -> list[LayerInputs]:
    dtype, nd, rd = layout
    out = []
    num_slots = n_loc + 64
    for _ in range(layers):
        if dtype == torch.uint8:
            nope = torch.randint(0, 256, (n_loc, nd), dtype=dtype, device=device)
            rope = torch.randint(0, 256, (n_loc, rd), dtype=dtype, device=device)
        else:
            nope = torch.randn(n_loc, nd, device=device).to(dtype)
            rope = torch.randn(n_loc, rd, device=device).to(dtype)
        kv = torch.empty((num_slots, 1, nd + rd), dtype=dtype, device=device)
        kv.view(torch.uint8).random_(0, 256)
        loc = torch.randperm(num_slots, device=device)[:n_loc].to(loc_dtype)
        out.append(LayerInputs(kv, loc, nope, rope))
    return out


def _check(fn: Callable, inp: LayerInputs) -> Optional[str]:
    """Bit-exact check against the torch reference on a fresh poisoned copy; None if correct."""
    expected = inp.kv.clone()
    set_mla_kv_buffer_torch(expected, inp.loc, inp.nope, inp.rope)
    got = inp.kv.clone()
    fn(got, inp.loc, inp.nope, inp.rope)
    if got.is_cuda:
        torch.cuda.synchronize()
    a, b = got.view(torch.uint8), expected.view(torch.uint8)
    if torch.equal(a, b):
        return None
    bad = (a != b).reshape(a.shape[0], -1).any(dim=1).sum().item()
    return f"WRONG: {bad} rows differ from the reference"


# ---- timing ----------------------------------------------------------------------------------
def _graph_time_per_call_us(fn: Callable, layers: list[LayerInputs]) -> float:
    import triton.testing as tt

    def body():
        for inp in layers:
            fn(inp.kv, inp.loc, inp.nope, inp.rope)

    body()  # warm up (compiles, loads modules) outside the capture
    torch.cuda.synchronize()
    ms = tt.do_bench_cudagraph(body, rep=40, return_mode="median")
    return ms * 1e3 / len(layers)


def _cold_time_us(fn: Callable, inp: LayerInputs) -> float:
    import triton.testing as tt

    ms = tt.do_bench(lambda: fn(inp.kv, inp.loc, inp.nope, inp.rope), warmup=5, rep=20, return_mode="median")
    return ms * 1e3


def _host_cost_us(call: Callable, n: int = 2000) -> float:
    """Median over 5 rounds of the host time per eager call (no graph, no sync inside a round)."""
    for _ in range(50):
        call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return statistics.median(rounds)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import triton.testing as tt

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    ms = tt.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def tiny_kernel_graph_us() -> float:
    """Graph time per call of a one-element kernel, 8 per graph like the rows."""
    import triton.testing as tt

    xs = [torch.zeros(1, device="cuda") for _ in range(LAYERS)]

    def body():
        for x in xs:
            x.add_(1)

    body()
    return tt.do_bench_cudagraph(body, rep=100, return_mode="median") * 1e3 / LAYERS


# ---- the sweep -------------------------------------------------------------------------------
@dataclass
class Row:
    layout: str
    n_loc: int
    loc_dtype: str
    path: str
    times_us: dict = field(default_factory=dict)  # provider -> graph median per call
    cold_us: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)  # provider -> why not timed

    def bytes_moved(self) -> int:
        dtype, nd, rd = LAYOUTS[self.layout]
        es = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_loc * (nd + rd) * es


def run_sweep(layouts, sizes, providers, loc_dtypes, cold: bool, jit_variants: Optional[dict] = None) -> list[Row]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows: list[Row] = []
    variants = {p: None for p in providers}
    variants.update(jit_variants or {})
    for lname in layouts:
        layout = LAYOUTS[lname]
        for loc_dtype in loc_dtypes:
            for n in sizes:
                layers = _make_layers(layout, n, loc_dtype, device, LAYERS if cuda else 1)
                i0 = layers[0]
                row = Row(lname, n, str(loc_dtype).split(".")[-1], kv_write_path(i0.kv, i0.loc, i0.nope, i0.rope))
                timed_fns = {}
                for p, kw in variants.items():
                    base = "jit" if p.startswith("jit") else p
                    why = _provider_available(base, layout)
                    if why:
                        row.errors[p] = why
                        continue
                    fn = _provider_fn(base, kw)
                    try:
                        err = _check(fn, i0)
                    except Exception as e:  # noqa: BLE001 - reported, not timed
                        err = f"ERROR: {type(e).__name__}: {e}"
                    if err:
                        row.errors[p] = err
                    else:
                        timed_fns[p] = fn
                if cuda:
                    # Two passes, forward then reverse order, and the mean of the two medians:
                    # at ~1 us per call, the position in the sequence alone moved medians by ~0.3 us.
                    order = list(timed_fns)
                    first = {p: _graph_time_per_call_us(timed_fns[p], layers) for p in order}
                    second = {p: _graph_time_per_call_us(timed_fns[p], layers) for p in reversed(order)}
                    row.times_us = {p: (first[p] + second[p]) / 2 for p in order}
                    if cold and n >= 1024:
                        row.cold_us = {p: _cold_time_us(timed_fns[p], i0) for p in order}
                else:
                    row.times_us = {p: _host_cost_us(lambda f=f: f(i0.kv, i0.loc, i0.nope, i0.rope), n=20) for p, f in timed_fns.items()}
                _progress(f"  {lname} {row.loc_dtype} n_loc={n}: " + ", ".join(f"{k}={v:.2f}us" for k, v in row.times_us.items()))
                rows.append(row)
                del layers
                if cuda:
                    torch.cuda.empty_cache()
    return rows


def host_costs() -> dict:
    """Eager host cost per call (µs) of the dispatcher and of ``pool.set_kv_buffer`` at small n_loc."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for lname in ("bf16", "u8"):
        dtype, nd, rd = LAYOUTS[lname]
        pool_dtype = torch.float8_e4m3fn if dtype == torch.uint8 else dtype
        pool = MLATokenToKVPool(4096, 1, pool_dtype, nd, rd, 1, device)
        loc = torch.arange(1, 2, device=device)
        es = torch.empty((), dtype=pool_dtype).element_size()
        nope = torch.randint(0, 256, (1, nd * es), dtype=torch.uint8, device=device).view(pool_dtype)
        rope = torch.randint(0, 256, (1, rd * es), dtype=torch.uint8, device=device).view(pool_dtype)
        out[f"pool.set_kv_buffer[{lname}, n_loc=1]"] = _host_cost_us(lambda: pool.set_kv_buffer(0, loc, nope, rope))
        kv = pool.kv_buffer[0]
        n8, r8 = nope.view(kv.dtype), rope.view(kv.dtype)
        out[f"set_mla_kv_buffer_triton[{lname}, n_loc=1] -> {kv_write_path(kv, loc, n8, r8)}"] = _host_cost_us(
            lambda: set_mla_kv_buffer_triton(kv, loc, n8, r8)
        )
        if torch.cuda.is_available():
            from mlakv import jit_kernel
            from mlakv.mem_cache.triton_kernels import launch_set_kv_rows

            out[f"triton row kernel launch alone[{lname}, n_loc=1]"] = _host_cost_us(lambda: launch_set_kv_rows(kv, loc, n8, r8))
            out[f"jit_kernel.set_mla_kv_buffer (checked entry)[{lname}, n_loc=1]"] = _host_cost_us(
                lambda: jit_kernel.set_mla_kv_buffer(kv, loc, n8, r8)
            )
    return out


# ---- report ----------------------------------------------------------------------------------
def format_table(rows: list[Row], providers: list[str], copy_gbs: Optional[float], tiny_us: Optional[float]) -> str:
    unit = "us/call (graph median)" if torch.cuda.is_available() else "us/call (CPU, host wall time)"
    head = ["layout", "loc", "n_loc", "path"] + [f"{p}" for p in providers] + ["best", "auto/best", "auto GB/s"]
    if copy_gbs:
        head += ["%copy", "x legacy"]
    if tiny_us:
        head += ["auto/1-elem"]
    lines = [f"times in {unit}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.layout, r.loc_dtype, str(r.n_loc), r.path]
        for p in providers:
            if p in r.times_us:
                cells.append(f"{r.times_us[p]:.2f}")
            else:
                cells.append("wrong" if r.errors.get(p, "").startswith(("WRONG", "ERROR")) else "-")
        timed = r.times_us
        best = min(timed, key=timed.get) if timed else None
        auto = timed.get("auto")
        cells.append(best or "-")
        cells.append(f"{auto / timed[best]:.2f}" if auto and best else "-")
        gbs = r.bytes_moved() / (auto * 1e-6) / 1e9 if auto else None
        cells.append(f"{gbs:.0f}" if gbs else "-")
        if copy_gbs:
            cells.append(f"{100 * gbs / copy_gbs:.0f}%" if gbs else "-")
            leg = timed.get("legacy")
            cells.append(f"{leg / auto:.1f}" if leg and auto else "-")
        if tiny_us:
            cells.append(f"{auto / tiny_us:.2f}" if auto else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[Row], providers: list[str], copy_gbs: Optional[float], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install mlakv[plot])"
    layouts = sorted({r.layout for r in rows}, key=list(LAYOUTS).index)
    fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), squeeze=False)
    for ax, lname in zip(axes[0], layouts):
        lrows = [r for r in rows if r.layout == lname and r.loc_dtype == "int64"] or [r for r in rows if r.layout == lname]
        xs = [r.n_loc for r in lrows]
        for p in providers:
            pts = [(r.n_loc, r.times_us[p]) for r in lrows if p in r.times_us]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=p)
        if copy_gbs and torch.cuda.is_available():
            floor = [r.bytes_moved() / (copy_gbs * 1e9) * 1e6 for r in lrows]
            ax.plot(xs, floor, "k--", lw=1, label="copy-bandwidth floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("n_loc (rows per call)")
        ax.set_ylabel("µs per call")
        ax.set_title(f"{lname} {LAYOUTS[lname][1]}+{LAYOUTS[lname][2]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlakv bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default=None, help=f"comma list of {list(LAYOUTS)} (default: all)")
    ap.add_argument("--sizes", default=None, help="comma list of n_loc values")
    ap.add_argument("--providers", default=None, help=f"comma list of {PROVIDERS} (default: all)")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, no int32 spot check")
    ap.add_argument("--no-cold", action="store_true", help="skip the L2-flushed medians")
    ap.add_argument("--tune", action="store_true", help="also time JIT variants (warps x items x TMA/direct)")
    ap.add_argument("--out", default="bench-out", help="directory for results.json and the plot")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    layouts = args.layouts.split(",") if args.layouts else list(LAYOUTS)
    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    elif not cuda:
        sizes = CPU_SIZES
    else:
        sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    if cuda:
        dev = torch.cuda.get_device_name()
        _progress(f"mlakv {mlakv.__version__} bench on {dev}: measuring copy bandwidth and 1-element kernel floor")
        copy_gbs, tiny_us = copy_bandwidth_gbs(), tiny_kernel_graph_us()
    else:
        dev = f"CPU ({platform.processor() or platform.machine()})"
        print("No CUDA GPU: timing the CPU (torch) path only. GPU numbers need a GPU; none are shown here.")
        providers = [p for p in providers if p in ("auto", "torch")]
        copy_gbs = tiny_us = None

    jit_variants = {}
    if args.tune and cuda:
        grid = [(False, w, i) for w in (1, 2, 4, 8, 16) for i in (1, 2)] + [(True, w, 1) for w in (2, 4, 8)]
        for tma, warps, items in grid:
            jit_variants[f"jit-{'tma' if tma else 'st'}-w{warps}-i{items}"] = dict(
                num_warps=warps, items_per_warp=items, use_tma=tma
            )

    rows = run_sweep(layouts, sizes, providers, [torch.int64], cold=cuda and not args.no_cold, jit_variants=jit_variants)
    if not args.quick and cuda and "bf16" in layouts:
        _progress("int32 loc spot check")
        rows += run_sweep(["bf16"], [128, 16384], providers, [torch.int32], cold=False)
    hosts = host_costs()
    shown = providers + sorted(jit_variants)

    lines = [f"# mlakv bench — {dev} — {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    if cuda:
        lines.append(f"copy bandwidth (read+write): {copy_gbs:.0f} GB/s; one-element kernel in a graph: {tiny_us:.2f} us")
    lines.append(format_table(rows, shown, copy_gbs, tiny_us))
    cold_rows = [r for r in rows if r.cold_us]
    if cold_rows:
        lines.append("\ncold (L2 flushed, eager, median) us/call")
        lines.append("| layout | n_loc | " + " | ".join(providers) + " |")
        lines.append("|" + "---|" * (2 + len(providers)))
        for r in cold_rows:
            lines.append(f"| {r.layout} | {r.n_loc} | " + " | ".join(f"{r.cold_us[p]:.2f}" if p in r.cold_us else "-" for p in providers) + " |")
    lines.append("\neager host cost per call (median of 5 rounds, no sync), us")
    for k, v in hosts.items():
        lines.append(f"- {k}: {v:.2f}")
    wrong = [(r.layout, r.n_loc, p, e) for r in rows for p, e in r.errors.items() if e.startswith(("WRONG", "ERROR"))]
    if wrong:
        lines.append("\nproviders reported wrong (not timed):")
        lines += [f"- {l} n_loc={n} {p}: {e}" for l, n, p, e in wrong]
    report = "\n".join(lines)
    print(report)
    note = plot(rows, providers, copy_gbs, out / "kv_write_bench.png")
    if note:
        print(note)
    (out / "results.json").write_text(
        json.dumps(
            dict(
                device=dev, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), copy_gbs=copy_gbs,
                one_element_kernel_us=tiny_us, rows=[asdict(r) for r in rows], host_cost_us=hosts,
            ),
            indent=1,
        )
    )
    (out / "report.md").write_text(report + "\n")
    _progress(f"done in {time.time() - t_start:.0f} s; wrote {out}/results.json, report.md, kv_write_bench.png")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
