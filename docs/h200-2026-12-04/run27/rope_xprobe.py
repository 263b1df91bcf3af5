"""Probe: variants of the Triton RoPE write's query program (rope_x.py, XV codes), CUDA-graph time
per call (64 x 8 rotating sets), against the JIT and the committed Triton kernel. rope_x.py, beside
this script when it ran: mlakv/kernels/triton/rope_write.py at 57d9d1e with rope_x.diff applied.
XV: 0 as committed; 1 rope of a bf16 query stored as one int32 per pair; 2 heads a constant (16);
3 table row not from the position (timing only); 4 no rope stores (timing only); 5 no nope stores (timing only)."""
import sys
import torch

from mlakv.bench.rope_write import make_set, rope_table
from mlakv.bench.timing import graph_length_us
from mlakv.spec.calls import RopeWriteCall
from mlakv.kernels.cuda.rope_write import rope_write_cuda
from mlakv.kernels.triton.rope_write import launch_rope_write

import rope_x

dev = "cuda" if torch.cuda.is_available() else "cpu"
cs = rope_table(device=dev)
shapes = [(64, 16), (8, 128)] if dev == "cuda" else [(3, 16)]
print("| variant | n | H | provider | us | / jit |")
print("|---|---|---|---|---|---|")
for variant in ("bf16", "fp8"):
    fmt = None if variant == "bf16" else "per_tensor"
    for n, h in shapes:
        sets = [make_set(n, h, variant, cs, device=dev, seed=i) for i in range(8)]
        calls = [RopeWriteCall(d["kv"], d["loc"], d["k_nope"], d["k_pe"], d["positions"], cs, False, fmt, d["k_scale"],
                               d["q_nope"], d["q_pe"], d["q_out"], d["q_scale"]) for d in sets]
        provs = {"jit": lambda c: rope_write_cuda(c), "triton": lambda c: launch_rope_write(c)}
        xvs = [0, 1, 2, 3, 4, 5] if variant == "bf16" else [0, 2, 3]
        for xv in xvs:
            if xv == 2 and h != 16:
                continue
            provs[f"x{xv}"] = lambda c, xv=xv: rope_x.launch_rope_write(c, xv=xv)
        # check x0..x2 write the committed kernel's bytes
        ref = calls[0]
        pre_q, pre_kv = ref.q_out.clone(), ref.kv_buffer.clone()
        launch_rope_write(ref)
        want_q, want_kv = ref.q_out.clone(), ref.kv_buffer.clone()
        for name in [k for k in provs if k in ("x0", "x1", "x2")]:
            ref.q_out.copy_(pre_q); ref.kv_buffer.copy_(pre_kv)
            provs[name](ref)
            ok = torch.equal(ref.q_out.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(
                ref.kv_buffer.view(torch.uint8), want_kv.view(torch.uint8))
            print(f"check {variant} {n} {h} {name}: {'same bytes' if ok else 'DIFFERENT'}", flush=True)
        if dev != "cuda":
            continue
        tj = None
        for name, f in provs.items():
            def body(f=f):
                for c in calls:
                    f(c)
            t = graph_length_us(body, 8, 64)
            tj = tj or t
            print(f"| {variant} | {n} | {h} | {name} | {t:.2f} | {t / tj:.2f} |", flush=True)
