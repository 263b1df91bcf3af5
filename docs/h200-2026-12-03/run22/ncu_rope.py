"""ncu study: the fused RoPE write (JIT vs Triton), e4m3 and bf16 query, at (n, H) points, one call each."""
import torch
from mlakv.bench.rope_write import make_set, providers_for, rope_table
cs = rope_table()
for variant, n, h in (("fp8", 64, 16), ("bf16", 64, 16), ("fp8", 8, 128), ("fp8", 4096, 16)):
    d = make_set(n, h, variant, cs)
    fns, absent, _ = providers_for(variant, False, ["jit", "fused-triton"])
    for _ in range(3):
        for f in fns.values():
            f(d)
    torch.cuda.synchronize()
    for k, f in fns.items():
        torch.cuda.nvtx.range_push("prof")
        f(d)
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print("profiled", variant, n, h, k, flush=True)
