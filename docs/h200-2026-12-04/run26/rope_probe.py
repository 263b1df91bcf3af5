"""Probe: the fused RoPE write split by part (cache format x query kind), JIT vs Triton, CUDA-graph
time per call (graph of 64 x 8 rotating sets), at 1024 query rows (n=64 H=16; n=8 H=128)."""
import sys
import torch
from mlakv.bench.rope_write import make_set, rope_table
from mlakv.bench.timing import graph_length_us
from mlakv.spec.calls import RopeWriteCall
from mlakv.kernels.cuda.rope_write import rope_write_cuda
from mlakv.kernels.triton.rope_write import launch_rope_write

cs = rope_table()
shapes = [(64, 16), (8, 128)]
print("| n | H | cache | query | jit us | triton us | triton / jit |")
print("|---|---|---|---|---|---|---|")
for n, h in shapes:
    s8 = [make_set(n, h, "fp8", cs, seed=i) for i in range(8)]
    s16 = [make_set(n, h, "bf16", cs, seed=i) for i in range(8)]
    for cache in ("bf16", "per_tensor"):
        for q in ("none", "bf16", "e4m3"):
            calls = []
            for a, b in zip(s8, s16):
                kv, fmt, ks = (b["kv"], None, None) if cache == "bf16" else (a["kv"], "per_tensor", a["k_scale"])
                if q == "none":
                    qn = qp = qo = qs = None
                elif q == "bf16":
                    qn, qp, qo, qs = b["q_nope"], b["q_pe"], b["q_out"], None
                else:
                    qn, qp, qo, qs = a["q_nope"], a["q_pe"], a["q_out"], a["q_scale"]
                src = b if cache == "bf16" else a
                calls.append(RopeWriteCall(kv, src["loc"], src["k_nope"], src["k_pe"], src["positions"], cs, False, fmt, ks,
                                           qn, qp, qo, qs))
            def jit():
                for c in calls:
                    assert rope_write_cuda(c)
            def tri():
                for c in calls:
                    launch_rope_write(c)
            tj = graph_length_us(jit, 8, 64)
            tt = graph_length_us(tri, 8, 64)
            print(f"| {n} | {h} | {cache} | {q} | {tj:.2f} | {tt:.2f} | {tt / tj:.2f} |", flush=True)
