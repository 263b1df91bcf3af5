"""ncu in graph mode: a graph of 8 fused RoPE writes (fp8: per_tensor rows, e4m3 query; n=64, H=16),
JIT then Triton, each graph replayed once inside NVTX range 'prof'."""
import torch
from mlakv.bench.rope_write import make_set, rope_table
from mlakv.spec.calls import RopeWriteCall
from mlakv.kernels.cuda.rope_write import rope_write_cuda
from mlakv.kernels.triton.rope_write import launch_rope_write

cs = rope_table()
sets = [make_set(64, 16, "fp8", cs, seed=i) for i in range(8)]
calls = [RopeWriteCall(d["kv"], d["loc"], d["k_nope"], d["k_pe"], d["positions"], cs, False, "per_tensor", d["k_scale"],
                       d["q_nope"], d["q_pe"], d["q_out"], d["q_scale"]) for d in sets]
for name, fn in (("jit", rope_write_cuda), ("triton", launch_rope_write)):
    for c in calls:
        fn(c)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            fn(c)
    g.replay(); torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    g.replay()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_pop()
    print("profiled graph", name, flush=True)
