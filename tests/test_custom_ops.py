"""The pool under torch.compile: its kernels are torch custom ops, so a compiled MLA layer has no graph break.

Spec: ``torch.compile(fullgraph=True)`` of a layer whose forward calls ``pool.set_kv_buffer`` (both
argument forms), ``pool.get_key_buffer``, ``pool.get_mla_kv_buffer`` and ``pool.move_kv_cache``
compiles (a graph break would raise) and leaves the pool and the outputs bit-identical to eager.
Each op alone matches its reference; its fake implementation gives the right shapes and refuses a
bad call while tracing. CPU: the torch path; GPU: the JIT/Triton paths, also replayed in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, bits, random_loc, random_rows, reference_write, requires_cuda
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.ops import custom_ops  # noqa: F401  (registers torch.ops.mlakv.*)
from mlakv.ops.move import move_kv_cache_torch

NOPE, ROPE = 64, 16  # small widths keep the CPU compile fast; the ops do not depend on them


def _pool(dtype=torch.bfloat16, layers=2, size=64, rope=ROPE) -> MLATokenToKVPool:
    pool = MLATokenToKVPool(
        size=size, page_size=1, dtype=dtype, kv_lora_rank=NOPE, qk_rope_head_dim=rope, layer_num=layers, device=DEVICE
    )
    g = torch.Generator().manual_seed(1)
    for b in pool.kv_buffer:  # poison: random finite values (the layer attends over them), never zeros
        b.copy_(torch.randn(b.shape, generator=g).to(dtype))
    return pool


class TinyMLALayer(torch.nn.Module):
    """A latent-attention layer cut to what touches the cache: project, write the row, attend over the cache."""

    def __init__(self, pool: MLATokenToKVPool, layer_id: int, hidden: int = 32, full_row: bool = False) -> None:
        super().__init__()
        self.pool, self.layer_id, self.full_row = pool, layer_id, full_row
        self.kv_proj = torch.nn.Linear(hidden, pool.kv_cache_dim, bias=False, dtype=pool.dtype)
        self.q_proj = torch.nn.Linear(hidden, pool.kv_cache_dim, bias=False, dtype=pool.dtype)

    def forward(self, x: torch.Tensor, loc: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        kv = self.kv_proj(x)  # [n, nope + rope]
        r = self.pool.kv_lora_rank
        if self.full_row:
            self.pool.set_kv_buffer(self.layer_id, loc, kv.unsqueeze(1), kv[:, None, :r])  # sglang's form
        else:
            self.pool.set_kv_buffer(self.layer_id, loc, kv[:, :r], kv[:, r:])
        cache = self.pool.get_key_buffer(self.layer_id)[ctx, 0]  # [n_ctx, nope + rope]
        nope, rope = self.pool.get_mla_kv_buffer(self.layer_id, loc)
        attn = (self.q_proj(x) @ cache.T).float().softmax(-1).to(x.dtype) @ cache[:, :r]
        return attn, nope, rope, cache  # what the pool returned comes out too, to be compared bit for bit


def _run(layer, x, loc, ctx):
    with torch.no_grad():
        out = layer(x, loc, ctx)
    return out, [bits(b).clone() for b in layer.pool.kv_buffer]


def _assert_same(comp, eager) -> None:
    """The pool's outputs (gathered rows, cache rows) and buffers bit for bit; the attention math
    (fused differently by inductor) to rounding."""
    (c_out, c_bufs), (e_out, e_bufs) = comp, eager
    for a, b in zip(c_out[1:], e_out[1:]):
        assert torch.equal(bits(a), bits(b))
    torch.testing.assert_close(c_out[0], e_out[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(c_bufs, e_bufs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("full_row", [False, True], ids=["split", "full_row"])
def test_compiled_layer_matches_eager_bit_exactly(full_row):
    torch.manual_seed(0)
    pools = [_pool(), _pool()]
    layers = [TinyMLALayer(p, 1, full_row=full_row).to(DEVICE) for p in pools]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(8, 32).to(torch.bfloat16).to(DEVICE)
    loc = random_loc(8, 63, torch.int64) + 1
    ctx = torch.arange(1, 40, device=DEVICE)
    eager = _run(layers[0], x, loc, ctx)
    compiled = torch.compile(layers[1], fullgraph=True, backend="inductor")  # a graph break raises
    _assert_same(_run(compiled, x, loc, ctx), eager)


def test_compiled_move_kv_cache_matches_eager():
    pools = [_pool(layers=3), _pool(layers=3)]
    tgt = torch.tensor([5, 6, 7, 20], device=DEVICE)
    src = torch.tensor([6, 7, 8, 3], device=DEVICE)  # overlapping: reads the pre-move rows
    pools[0].move_kv_cache(tgt, src)
    torch.compile(lambda t, s: pools[1].move_kv_cache(t, s), fullgraph=True)(tgt, src)
    for a, b in zip(pools[0].kv_buffer, pools[1].kv_buffer):
        assert torch.equal(bits(a), bits(b))


def test_set_op_matches_reference():
    kv = _pool().kv_buffer[0]
    loc = random_loc(10, 64, torch.int32)
    loc[::3] = -1
    nope, rope = random_rows(10, NOPE, torch.bfloat16), random_rows(10, ROPE, torch.bfloat16)
    expected = reference_write(kv, loc, nope, rope)
    torch.ops.mlakv.set_mla_kv_buffer(kv, loc, nope, rope)
    assert torch.equal(bits(kv.cpu()), expected)


def test_gather_op_matches_indexing():
    kv = _pool().kv_buffer[0]
    loc = random_loc(10, 64, torch.int64)
    nope, rope = torch.ops.mlakv.get_mla_kv_buffer(kv, loc, NOPE, ROPE)
    assert torch.equal(bits(nope), bits(kv[loc, 0, :NOPE])) and torch.equal(bits(rope), bits(kv[loc, 0, NOPE:]))


def test_move_op_matches_reference():
    pool = _pool(layers=2)
    expected = [b.clone() for b in pool.kv_buffer]
    tgt, src = torch.tensor([1, 2, 3], device=DEVICE), torch.tensor([2, 3, 9], device=DEVICE)
    move_kv_cache_torch(expected, tgt, src)
    torch.ops.mlakv.move_kv_cache(pool.kv_buffer, tgt, src)
    for a, b in zip(pool.kv_buffer, expected):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("page", [1, 4])
def test_copy_rows_op_matches_indexing(page):
    row_bytes = 48
    src = torch.randint(0, 256, (16, row_bytes), dtype=torch.uint8)
    dst = torch.randint(0, 256, (4, 8, row_bytes), dtype=torch.uint8)  # paged: [pages, 8 tokens, row]
    dst_before = dst.clone()
    s_idx, d_idx = torch.tensor([3, 0, 15]), torch.tensor([8, 9, 31]) if page == 1 else torch.tensor([4, 5, 6])
    layout_dst = [8, 8 * row_bytes, row_bytes] if page == 1 else [4, 8 * row_bytes, row_bytes]
    torch.ops.mlakv.copy_rows(src, dst, s_idx, d_idx, row_bytes, [1, row_bytes, row_bytes], layout_dst)
    flat_before = dst_before.view(-1, row_bytes)
    expected = flat_before.clone()
    for s, d in zip(s_idx.tolist(), d_idx.tolist()):
        p, t = divmod(d, layout_dst[0])
        expected[p * 8 + t] = src[s]
    assert torch.equal(dst.view(-1, row_bytes), expected)


def test_fake_impls_give_shapes_and_refuse_bad_calls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        kv = torch.empty(64, 1, NOPE + ROPE, dtype=torch.bfloat16)
        loc = torch.empty(5, dtype=torch.int64)
        nope, rope = torch.ops.mlakv.get_mla_kv_buffer(kv, loc, NOPE, ROPE)
        assert nope.shape == (5, NOPE) and rope.shape == (5, ROPE) and nope.dtype == torch.bfloat16
        torch.ops.mlakv.set_mla_kv_buffer(kv, loc, torch.empty(5, NOPE, dtype=torch.bfloat16),
                                          torch.empty(5, ROPE, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="cache_k_nope: dim 0"):
            torch.ops.mlakv.set_mla_kv_buffer(kv, loc, torch.empty(4, NOPE, dtype=torch.bfloat16),
                                              torch.empty(5, ROPE, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="src_loc has 4"):
            torch.ops.mlakv.move_kv_cache([kv], loc, torch.empty(4, dtype=torch.int64))


def test_ops_pass_torch_library_opcheck():
    kv = _pool().kv_buffer[0]
    loc = random_loc(6, 64, torch.int64)
    nope, rope = random_rows(6, NOPE, torch.bfloat16), random_rows(6, ROPE, torch.bfloat16)
    torch.library.opcheck(torch.ops.mlakv.set_mla_kv_buffer, (kv, loc, nope, rope))
    torch.library.opcheck(torch.ops.mlakv.get_mla_kv_buffer, (kv, loc, NOPE, ROPE))
    torch.library.opcheck(torch.ops.mlakv.move_kv_cache, ([kv.clone()], loc[:3].clone(), loc[3:].clone()))


@requires_cuda
def test_compiled_layer_in_cuda_graph_matches_eager():
    """H100: the compiled layer (JIT path, 512 + 64), captured in a CUDA graph and replayed, == eager."""
    pools = [
        MLATokenToKVPool(size=256, page_size=1, dtype=torch.bfloat16, kv_lora_rank=512, qk_rope_head_dim=64,
                         layer_num=2, device="cuda")
        for _ in range(2)
    ]
    for b in pools[0].kv_buffer:
        b.copy_(torch.randn(b.shape, device="cuda").to(b.dtype))
    torch.manual_seed(0)
    layers = [TinyMLALayer(p, 1).cuda() for p in pools]
    layers[1].load_state_dict(layers[0].state_dict())
    for b0, b1 in zip(pools[0].kv_buffer, pools[1].kv_buffer):
        b1.copy_(b0)
    x = torch.randn(64, 32, device="cuda").to(torch.bfloat16)
    loc = torch.randperm(255, device="cuda")[:64] + 1
    loc[::7] = -1
    ctx = torch.arange(1, 200, device="cuda")
    eager = _run(layers[0], x, loc, ctx)
    compiled = torch.compile(layers[1], fullgraph=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up: compile, build the JIT module, autotune
        for _ in range(2):
            compiled(x, loc, ctx)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):  # nothing in the compiled layer may sync
        static_out = compiled(x, loc, ctx)
    # Un-write the rows of the layer the graph writes (layer 1 only: zeroing layer 0 too would leave rows
    # no replay writes, as the first GPU run did), so only the replay can put them back into the real buffer.
    kept = loc[loc >= 0]
    written = pools[1].kv_buffer[1]
    written[kept] = 0
    assert not torch.equal(bits(written), eager[1][1])
    graph.replay()
    torch.cuda.synchronize()
    out, bufs = tuple(t.clone() for t in static_out), [bits(b).clone() for b in pools[1].kv_buffer]
    _assert_same((out, bufs), eager)


def test_custom_op_cost_bench_runs(capsys):
    """``python -m mlakv.bench.custom_op_cost`` prints its table (direct, via op, the empty-op floor) for n_loc 0 and 1."""
    from mlakv.bench import custom_op_cost

    assert custom_op_cost.main(["--calls", "20", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")]
    assert len(rows) == 2 and all(len(r.split("|")) == 8 for r in rows)
