"""Probe: CUDA-graph time of the FP8 gathers/writes and the RoPE write per PDL setting (JIT vs Triton)."""
import sys, torch
import mlakv.kernels.triton.fp8 as tfp8
import mlakv.kernels.triton.rope_write as trope
from mlakv.bench.fp8_bench import _layers, _jit_gather, _triton_gather, _jit_write, _triton_write, K_SCALE
from mlakv.bench.timing import rotating, graph_median_us
from mlakv.bench.rope_write import make_sets, providers_for, rope_table

def nopdl(mod, fn):
    def run(*a):
        old = mod.pdl_supported
        mod.pdl_supported = lambda i: False
        try:
            return fn(*a)
        finally:
            mod.pdl_supported = old
    return run

def time_all(fns, sets, label):
    res = {k: [] for k in fns}
    for order in (list(fns), list(fns)[::-1]):
        for k in order:
            res[k].append(graph_median_us(rotating(fns[k], [(d,) for d in sets]), calls=len(sets)))
    for k, v in res.items():
        print(f"| {label} | {k} | {v[0]:.2f} | {v[1]:.2f} |", flush=True)

scale = torch.tensor([K_SCALE], device="cuda")
print("| point | variant | pass 1 µs | pass 2 µs |\n|---|---|---|---|")
for n in (512, 1024, 2048):
    layers = _layers(n)
    for fmt in ("ds_mla", "per_tensor"):
        fns = {"jit": _jit_gather(fmt, scale), "jit early": _jit_gather(fmt, scale, early_trigger=True),
               "jit late": _jit_gather(fmt, scale, early_trigger=False), "triton": _triton_gather(fmt, scale),
               "triton early": _triton_gather(fmt, scale, early_trigger=True),
               "triton late": _triton_gather(fmt, scale, early_trigger=False),
               "triton no pdl": nopdl(tfp8, _triton_gather(fmt, scale)),
               "triton w4 r2": _triton_gather(fmt, scale, num_warps=4, rows_per_program=2),
               "triton w2 r1": _triton_gather(fmt, scale, num_warps=2, rows_per_program=1)}
        time_all(fns, layers, f"{n} gather {fmt}")
    fns = {"jit": _jit_write("ds_mla", scale), "jit early": _jit_write("ds_mla", scale, early_trigger=True),
           "jit late": _jit_write("ds_mla", scale, early_trigger=False), "triton": _triton_write("ds_mla", scale),
           "triton early": _triton_write("ds_mla", scale, early_trigger=True),
           "triton late": _triton_write("ds_mla", scale, early_trigger=False),
           "triton no pdl": nopdl(tfp8, _triton_write("ds_mla", scale))}
    time_all(fns, layers, f"{n} write ds_mla")
    del layers
cs = rope_table()
for variant, n, h in (("fp8", 64, 16), ("fp8", 8, 128), ("bf16", 64, 16), ("fp8", 512, 16)):
    sets = make_sets(n, h, variant, cs)
    p, _, _ = providers_for(variant, False, ["jit", "jit-early", "jit-late", "fused-triton"])
    p["triton no pdl"] = nopdl(trope, p["fused-triton"])
    time_all(p, sets, f"rope {variant} n={n} H={h}")
