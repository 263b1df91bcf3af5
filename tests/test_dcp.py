"""Decode context parallelism (DCP): the sharded cache over W ranks equals the single-rank cache,
and the model decoding across ranks (attention per shard, log-sum-exp merge over torch.distributed)
decodes what the single-rank model decodes.

The rank processes are real: ``run_ranks`` spawns W processes joined by gloo (NCCL on a GPU
machine, one GPU per rank, when it has W GPUs), with a deadline. One spawn per W does the rank-side
work of every test below (spawning costs seconds); the checks run here, against references
computed here.
"""

from __future__ import annotations

import functools
import json
import time

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, bits, random_rows
from mlakv.mem_cache import MLATokenToKVPool
from mlakv.demo.engine import DecodeGraphRunner, Engine, Request
from mlakv.demo.model import MLAConfig, PoolKVCache
from mlakv.mem_cache.allocator import TokenSlotAllocator
from mlakv.demo.dcp import DCPPoolKVCache
from mlakv.distributed.dcp import (
    DCPGroup,
    all_gather_merge,
    interleave_rank_rows,
    make_dcp_pool,
    merge_attn_partials,
    run_ranks,
)
from mlakv.demo.model import MLAAttention, default_dtype, make_model

WORLD_SIZES = [2, 4]
RANK_TIMEOUT_S = 120
# the ranks run where the GPUs are, if there are enough of them; otherwise on CPU with gloo
_RANK_DEVICE = "cuda" if HAS_CUDA and torch.cuda.device_count() >= max(WORLD_SIZES) else "cpu"

CFG = MLAConfig(  # small: every rank runs the whole model on 2 shared CPU cores
    vocab_size=128, hidden=64, n_heads=2, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_layers=2
)
MODEL_DTYPE = default_dtype(_RANK_DEVICE)
LOGICAL_SLOTS = 512  # divisible by every W: the W = 1 pool and the rank pools back the same slots
ROW_DTYPES = [torch.bfloat16, torch.float8_e4m3fn]
ROWS_PER_RANK = 48  # physical rows of each rank pool in the row test
ROW_LAYERS = 2
ROW_BATCHES = [(40, torch.int64), (64, torch.int32), (17, torch.int64)]  # (n_loc, loc dtype)


# ---- references -----------------------------------------------------------------------------
def expected_rank_rows(initial: torch.Tensor, batches, world_size: int, rank: int) -> torch.Tensor:
    """The spec, loop by loop: rank ``rank``'s rows after the batches, starting from ``initial``
    (``[num_phys, width]`` integer bits). Logical slot ``loc`` is rank ``loc % W``'s, at row
    ``loc // W``; padding (``loc < 0``), the reserved slot 0 and other ranks' slots are not written."""
    out = initial.clone()
    for loc, nope, rope in batches:
        nb, rb = bits(nope), bits(rope)
        for i, slot in enumerate(loc.tolist()):
            if slot > 0 and slot % world_size == rank:
                out[slot // world_size] = torch.cat([nb[i], rb[i]])
    return out


def _row_case(dtype: torch.dtype, world_size: int, seed: int):
    """Poisoned logical initial contents ``[layers, W * ROWS_PER_RANK, width]`` and the batches
    (random distinct logical slots, a quarter of them padding)."""
    g = torch.Generator().manual_seed(seed)
    logical = world_size * ROWS_PER_RANK
    width = (CFG.kv_lora_rank + CFG.qk_rope_head_dim) * torch.empty((), dtype=dtype).element_size()
    initial = torch.randint(0, 256, (ROW_LAYERS, logical, width), dtype=torch.uint8, generator=g).view(dtype)
    batches = []
    for n, loc_dtype in ROW_BATCHES:
        loc = torch.randperm(logical, generator=g)[:n]
        loc[torch.rand(n, generator=g) < 0.25] = -1
        loc[0] = 0  # the reserved slot: skipped on every rank
        nope = random_rows(n, CFG.kv_lora_rank, dtype, device="cpu", gen=g)
        rope = random_rows(n, CFG.qk_rope_head_dim, dtype, device="cpu", gen=g)
        batches.append((loc.to(loc_dtype), nope, rope))
    return initial, batches


def _pool_rows(pool: MLATokenToKVPool) -> list[torch.Tensor]:
    return [bits(pool.kv_buffer[layer][:, 0].cpu()).clone() for layer in range(pool.layer_num)]


def _write(pool: MLATokenToKVPool, initial: torch.Tensor, batches, device) -> list[torch.Tensor]:
    """Load ``initial`` (this pool's rows), write every batch into every layer, return the rows."""
    for layer in range(pool.layer_num):
        pool.kv_buffer[layer][:, 0].copy_(initial[layer].view(pool.store_dtype).to(device))
        for loc, nope, rope in batches:
            pool.set_kv_buffer(layer, loc.to(device), nope.to(device), rope.to(device))
    return _pool_rows(pool)


def _serve(engine: Engine, prompts: list[list[int]]) -> list[Request]:
    """The workload: interleaved admissions, padded decode batches, finished requests freeing slots."""
    reqs = [Request(p, n) for p, n in zip(prompts, [6, 3, 5, 4])]
    engine.prefill(reqs[:2])
    engine.decode_step(use_graph=False)
    engine.prefill(reqs[2:3])
    for _ in range(3):
        engine.decode_step(use_graph=False)
    engine.prefill(reqs[3:])  # may reuse the slots of the request that finished
    while engine.running:
        engine.decode_step(use_graph=False)
    return reqs


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (13, 30, 1, 22)]


def _engine(cache, logical_slots: int, device) -> Engine:
    model = make_model(CFG, device, MODEL_DTYPE)
    runner = DecodeGraphRunner(model, cache, [4], max_ctx=64, device=device)  # 3-4 requests: padding rows
    return Engine(model, cache, TokenSlotAllocator(logical_slots, 1), device, padded_runner=runner)


# ---- the rank side (runs in the spawned processes) -------------------------------------------
def _rank_work(group: DCPGroup, device: torch.device) -> dict:
    rows = {}
    for dtype in ROW_DTYPES:
        initial, batches = _row_case(dtype, group.world_size, seed=100 + ROW_DTYPES.index(dtype))
        pool = MLATokenToKVPool(  # W * ROWS_PER_RANK logical slots: ROWS_PER_RANK rows here
            group.world_size * ROWS_PER_RANK - 1, 1, dtype, CFG.kv_lora_rank, CFG.qk_rope_head_dim, ROW_LAYERS, device,
            dcp_world_size=group.world_size, dcp_rank=group.rank,
        )
        rows[str(dtype)] = _write(pool, initial[:, group.rank :: group.world_size], batches, device)

    pool = make_dcp_pool(LOGICAL_SLOTS, MODEL_DTYPE, CFG.kv_lora_rank, CFG.qk_rope_head_dim, CFG.n_layers, device, group)
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)  # unwritten rows must never be read
    cache = DCPPoolKVCache(pool, group)
    reqs = _serve(_engine(cache, cache.logical_slots, device), _prompts())
    return dict(rows=rows, outputs=[r.output for r in reqs], logits=[torch.stack(r.logits) for r in reqs])


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def ranks(request):
    """``(W, [rank results])`` of one spawn of W ranks."""
    w = request.param
    return w, run_ranks(_rank_work, w, device_type=_RANK_DEVICE, timeout_s=RANK_TIMEOUT_S)


# ---- the sharded write ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
def test_each_rank_holds_exactly_its_rows(ranks, dtype):
    """Rank r's row p is logical slot p * W + r after the writes; every other row is untouched."""
    w, results = ranks
    initial, batches = _row_case(dtype, w, seed=100 + ROW_DTYPES.index(dtype))
    for rank, res in enumerate(results):
        for layer in range(ROW_LAYERS):
            want = expected_rank_rows(bits(initial[layer, rank::w]), batches, w, rank)
            got = res["rows"][str(dtype)][layer]
            diff = (got != want).any(dim=1).nonzero().flatten()
            assert diff.numel() == 0, f"rank {rank} layer {layer}: rows {diff[:8].tolist()} differ"


@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
def test_union_of_rank_rows_equals_single_rank_cache(ranks, dtype):
    """Interleaving the ranks' buffers gives, bit for bit, the W = 1 pool after the same writes."""
    w, results = ranks
    initial, batches = _row_case(dtype, w, seed=100 + ROW_DTYPES.index(dtype))
    single = MLATokenToKVPool(
        w * ROWS_PER_RANK - 1, 1, dtype, CFG.kv_lora_rank, CFG.qk_rope_head_dim, ROW_LAYERS, DEVICE
    )
    want = _write(single, initial, batches, DEVICE)
    for layer in range(ROW_LAYERS):
        union = interleave_rank_rows([res["rows"][str(dtype)][layer] for res in results])
        assert torch.equal(union, want[layer]), f"layer {layer}: the ranks' rows do not make the single-rank cache"


# ---- the model across ranks -------------------------------------------------------------------
@functools.cache
def _single_rank_run():
    device = _RANK_DEVICE
    pool = MLATokenToKVPool(LOGICAL_SLOTS - 1, 1, MODEL_DTYPE, CFG.kv_lora_rank, CFG.qk_rope_head_dim, CFG.n_layers, device)
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)
    return _serve(_engine(PoolKVCache(pool), pool.num_slots, device), _prompts())


def test_dcp_model_decodes_the_single_rank_tokens(ranks):
    w, results = ranks
    want = [r.output for r in _single_rank_run()]
    for rank, res in enumerate(results):
        assert res["outputs"] == want, f"rank {rank} of {w} decoded other tokens"


def test_dcp_model_logits_match_single_rank_within_dtype_tolerance(ranks):
    _, results = ranks
    want = [torch.stack(r.logits) for r in _single_rank_run()]
    tol = 1e-4 if MODEL_DTYPE == torch.float32 else 3e-2
    for res in results:
        for got, ref in zip(res["logits"], want):
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_every_rank_computes_the_same_logits(ranks):
    """All ranks merge the same gathered partials in the same order: identical bits."""
    _, results = ranks
    for res in results[1:]:
        for a, b in zip(res["logits"], results[0]["logits"]):
            assert torch.equal(bits(a), bits(b))


# ---- the merge, in one process --------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_merged_shard_attention_equals_full_attention(world_size):
    """The model's attention over W shards of the rows (some queries see no row of a shard),
    merged by log-sum-exp, equals its attention over all rows."""
    torch.manual_seed(world_size)
    attn = MLAAttention(CFG, 0).float()
    b, q, t, h, r, p = 2, 3, 11, CFG.n_heads, CFG.kv_lora_rank, CFG.qk_rope_head_dim
    q_lat, q_pe = torch.randn(b, q, h, r), torch.randn(b, q, h, p)
    c_nope, c_pe = torch.randn(b, t, r), torch.randn(b, t, p)
    mask = torch.rand(b, q, t) < 0.6
    mask[..., 0] = True  # every query sees at least one row overall
    owner = torch.randint(0, world_size, (b, t))
    parts = [attn.attend_partial(q_lat, q_pe, c_nope, c_pe, mask & (owner == k)[:, None, :]) for k in range(world_size)]
    merged = merge_attn_partials(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))
    full, _ = attn.attend_partial(q_lat, q_pe, c_nope, c_pe, mask)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)


def test_merge_of_parts_without_rows_is_zero():
    o = torch.randn(3, 5, 8)
    lse = torch.full((3, 5), float("-inf"))
    assert torch.equal(merge_attn_partials(o * 0, lse), torch.zeros(5, 8))


def test_merge_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lse_parts"):
        merge_attn_partials(torch.zeros(2, 4, 8), torch.zeros(2, 5))


def test_merge_over_ranks_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match="process group"):
        all_gather_merge(torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2), DCPGroup(0, 2, None))


def test_cache_refuses_a_pool_of_another_rank():
    pool = MLATokenToKVPool(15, 1, torch.float32, 8, 4, 1, "cpu", dcp_world_size=2, dcp_rank=1)
    with pytest.raises(ValueError, match="rank 1 of 2"):
        DCPPoolKVCache(pool, DCPGroup(0, 2, None))


@pytest.mark.parametrize("world_size,rank", [(2, 0), (2, 1), (4, 3)])
def test_shard_reads_the_rank_rows_and_masks_the_rest(world_size, rank):
    """``shard`` of logical slots: owned entries read row ``slot // W``; the others are masked out."""
    pool = MLATokenToKVPool(
        world_size * 16 - 1, 1, torch.float32, 8, 4, 1, "cpu", dcp_world_size=world_size, dcp_rank=rank
    )
    pool.kv_buffer[0][:, 0].copy_(torch.arange(pool.num_slots, dtype=torch.float32)[:, None])  # row p holds p
    slots = torch.randint(0, world_size * 16, (3, 10))
    mask = torch.rand(3, 2, 10) < 0.7
    c_nope, c_pe, m = DCPPoolKVCache(pool, DCPGroup(rank, world_size, None)).shard(0, slots, mask)
    owned = slots % world_size == rank
    assert torch.equal(m, mask & owned[:, None, :])
    assert torch.equal(c_nope[..., 0][owned], (slots // world_size)[owned].float())
    assert torch.equal(c_pe[..., 0][owned], (slots // world_size)[owned].float())


def test_interleave_puts_rank_rows_at_their_logical_slots():
    w, phys = 3, 4
    bufs = [torch.arange(phys) * w + r for r in range(w)]  # each row holds its logical slot
    assert torch.equal(interleave_rank_rows(bufs), torch.arange(w * phys))


# ---- run_ranks: failures and deadlines -------------------------------------------------------------
def _rank_raises_on_1(group: DCPGroup, device: torch.device) -> None:
    if group.rank == 1:
        raise RuntimeError("rank 1 broke")
    time.sleep(30)  # rank 0 outlives rank 1 (a barrier here could fail first, with gloo's own error)


def _rank_sleeps(group: DCPGroup, device: torch.device) -> None:
    time.sleep(600)


def test_run_ranks_fails_with_the_rank_error():
    with pytest.raises(Exception, match="rank 1 broke"):
        run_ranks(_rank_raises_on_1, 2, timeout_s=RANK_TIMEOUT_S)


def test_run_ranks_kills_ranks_past_the_deadline():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="within 3 s"):
        run_ranks(_rank_sleeps, 2, timeout_s=3)
    assert time.monotonic() - t0 < 60


# ---- the two-GPU check script ----------------------------------------------------------------------
def test_two_gpu_check_runs_at_tiny_size(tmp_path):
    """The issue-17 script's whole flow (rows, decode, timings) on 2 gloo ranks: it reports the rows
    bit-exact and the tokens equal, and writes its table and JSON."""
    from mlakv.bench.dcp_two_gpu import main

    assert main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "dcp_two_gpu.json").read_text())
    assert res["rows_bit_exact"] and res["tokens_equal"]
    assert (tmp_path / "dcp_two_gpu.md").read_text().startswith("#")


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL ranks)")
def test_two_gpu_check_on_two_gpus_at_tiny_size(tmp_path):
    """The same flow on two GPUs over NCCL, decode replayed from CUDA graphs."""
    from mlakv.bench.dcp_two_gpu import main

    assert main(["--tiny", "--device", "cuda", "--world", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "dcp_two_gpu.json").read_text())
    assert res["rows_bit_exact"] and res["tokens_equal"] and res["logits_within_tol"]
    assert res["graphs"]["dcpw"], f"DCP decode did not capture: {res['capture_errors']['dcpw']}"
