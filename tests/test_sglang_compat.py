"""mlakv called the way sglang 0.5.23 calls its ``MLATokenToKVPool`` / ``MLATokenToKVPoolHost``.

Each test is one sglang call with sglang's argument shapes, checked against what sglang means by it
(a plain-torch statement of the result, on poisoned buffers). ``docs/sglang.md`` maps every call.
CPU runs the torch paths (and the move kernel under the Triton interpreter); a GPU runs the kernels.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, HAS_TRITON, bits, random_rows
from mlakv.mem_cache import MLATokenToKVPool, MLATokenToKVPoolHost
from mlakv.mem_cache import memory_pool as memory_pool_module
from mlakv.ops.move import move_kv_cache_torch

R, P = 512, 64  # kv_lora_rank, qk_rope_head_dim (DeepSeek-V3)


def _pool(dtype=torch.bfloat16, layer_num=3, size=60, page_size=4, rope=P) -> MLATokenToKVPool:
    # sglang: MLATokenToKVPool(size, page_size, dtype, kv_lora_rank, qk_rope_head_dim, layer_num, device, ...)
    pool = MLATokenToKVPool(size, page_size, dtype, R, rope, layer_num, DEVICE, start_layer=0)
    for b in pool.kv_buffer:  # poisoned: random bytes, never zeros
        b.view(torch.uint8).copy_(torch.randint(0, 256, b.view(torch.uint8).shape, dtype=torch.uint8))
    return pool


def _snapshot(pool: MLATokenToKVPool) -> list[torch.Tensor]:
    return [bits(b).cpu().clone() for b in pool.kv_buffer]


def _loc(*slots: int, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(slots, dtype=dtype, device=DEVICE)


# ---- set_kv_buffer(layer, loc, cache_k, cache_v) ----------------------------------------------


@pytest.mark.parametrize("three_d", [True, False], ids=["n_1_576", "n_576"])
@pytest.mark.parametrize("cache_v", ["latent", "none"])
def test_set_kv_buffer_full_row(three_d, cache_v):
    """sglang's MLA backends pass the whole row as cache_k (and the latent part, or None, as cache_v)."""
    pool = _pool()
    loc = _loc(5, 9, 33)
    k = random_rows(3, R + P, torch.bfloat16)
    k = k.unsqueeze(1) if three_d else k
    v = k[..., :R] if cache_v == "latent" else None
    expected = _snapshot(pool)
    for i, slot in enumerate(loc.tolist()):
        expected[1][slot, 0] = bits(k.reshape(3, -1)[i]).cpu()
    pool.set_kv_buffer(1, loc, k, v)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), expected))


def test_full_row_goes_to_the_dispatcher_as_two_views_without_a_copy(monkeypatch):
    pool = _pool()
    seen = {}
    from mlakv.ops import dispatch

    monkeypatch.setattr(dispatch, "write_rows", lambda kv, loc, n, r, *a, **kw: seen.update(n=n, r=r))
    k = random_rows(4, R + P, torch.bfloat16).unsqueeze(1)
    pool.set_kv_buffer(0, _loc(1, 2, 3, 4), k, None)
    es = k.element_size()
    assert seen["n"].data_ptr() == k.data_ptr() and seen["r"].data_ptr() == k.data_ptr() + R * es
    assert seen["n"].shape[-1] == R and seen["r"].shape[-1] == P


def test_split_form_still_works():
    pool = _pool()
    nope, rope = random_rows(2, R, torch.bfloat16), random_rows(2, P, torch.bfloat16)
    pool.set_kv_buffer(2, _loc(7, 8), nope, rope)
    got = pool.get_key_buffer(2)[7:9, 0]
    assert torch.equal(bits(got[:, :R]), bits(nope)) and torch.equal(bits(got[:, R:]), bits(rope))


@pytest.mark.parametrize("k_width,v_width", [(R + P + 1, None), (R, None), (R, P + 1), (P, P)])
def test_set_kv_buffer_neither_form_is_refused_naming_both(k_width, v_width):
    pool = _pool()
    k = random_rows(2, k_width, torch.bfloat16)
    v = None if v_width is None else random_rows(2, v_width, torch.bfloat16)
    before = _snapshot(pool)
    with pytest.raises(ValueError, match=r"kv_lora_rank \+ qk_rope_head_dim = 576.*kv_lora_rank=512"):
        pool.set_kv_buffer(0, _loc(1, 2), k, v)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), before))


def test_rope_less_pool_takes_the_full_row():
    pool = _pool(rope=0)
    k = random_rows(2, R, torch.bfloat16).unsqueeze(1)
    pool.set_kv_buffer(0, _loc(3, 4), k, None)
    assert torch.equal(bits(pool.get_key_buffer(0)[3:5]), bits(k))


def test_padding_to_reserved_slot_zero_is_skipped():
    """sglang pads CUDA-graph batches by sending the padding rows to slot 0; the pool skips them."""
    pool = _pool()
    before = _snapshot(pool)
    k = random_rows(3, R + P, torch.bfloat16).unsqueeze(1)
    pool.set_kv_buffer(0, _loc(0, 6, 0), k, None)
    after = _snapshot(pool)
    assert torch.equal(after[0][0], before[0][0])  # the reserved slot is untouched
    assert torch.equal(after[0][6, 0], bits(k[1, 0]).cpu())


def test_get_key_and_value_buffer_shapes():
    pool = _pool()
    assert pool.get_key_buffer(0).shape == (pool.num_slots, 1, R + P)
    assert pool.get_value_buffer(0).shape == (pool.num_slots, 1, R)
    assert pool.get_value_buffer(0).data_ptr() == pool.get_key_buffer(0).data_ptr()


def test_set_mla_kv_buffer_alias_and_gather_with_dst_dtype():
    pool = _pool()
    nope, rope = random_rows(3, R, torch.bfloat16), random_rows(3, P, torch.bfloat16)
    loc = _loc(11, 12, 13, dtype=torch.int32)
    pool.set_mla_kv_buffer(0, loc, nope, rope)  # sglang's split-form name
    got_nope, got_rope = pool.get_mla_kv_buffer(0, loc, torch.float32)
    assert got_nope.dtype == torch.float32 and torch.equal(got_nope, nope.float()) and torch.equal(got_rope, rope.float())


def test_buffer_infos_for_transfer_engines():
    """mlakv's item is one token slot (sglang's is one page: docs/sglang.md says so)."""
    pool = _pool(layer_num=3)
    ptrs, lens, items = pool.get_contiguous_buf_infos()
    row = (R + P) * 2
    assert ptrs == [b.data_ptr() for b in pool.kv_buffer]
    assert lens == [pool.num_slots * row] * 3 and items == [row] * 3
    assert pool.get_kv_size_bytes() == 3 * pool.num_slots * row


# ---- move_kv_cache(tgt_loc, src_loc) -----------------------------------------------------------

MOVES = {
    "disjoint": ([10, 11, 12], [20, 21, 22]),
    "chain_overlap": ([5, 6, 7], [6, 7, 8]),  # old 6 -> 5, old 7 -> 6, old 8 -> 7
    "reverse_overlap": ([6, 7, 8], [5, 6, 7]),
    "swap": ([3, 4], [4, 3]),
    "self": ([9], [9]),
    "empty": ([], []),
    "long_chain": (list(range(2, 42)), list(range(3, 43))),  # more rows than one kernel step (16)
    "permutation": (list(range(10, 50)), [10 + (7 * k) % 40 for k in range(40)]),  # targets = sources, shuffled
}


def _expected_move(pool, tgt, src):
    expected = [b.detach().cpu().clone() for b in pool.kv_buffer]
    move_kv_cache_torch(expected, tgt.cpu(), src.cpu())
    return [bits(b) for b in expected]


@pytest.mark.parametrize("case", list(MOVES))
@pytest.mark.parametrize("loc_dtype", [torch.int32, torch.int64])
def test_move_kv_cache_reads_the_pre_move_state(case, loc_dtype):
    pool = _pool()
    tgt, src = (torch.tensor(v, dtype=loc_dtype, device=DEVICE) for v in MOVES[case])
    expected = _expected_move(pool, tgt, src)
    pool.move_kv_cache(tgt, src)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), expected))


def test_move_kv_cache_loc_strided_and_expanded():
    pool = _pool()
    tgt = torch.tensor([30, -7, 31, -7, 32], device=DEVICE)[::2]  # stride 2
    src = torch.tensor([12], device=DEVICE).expand(3)  # stride 0: one row copied to three slots
    expected = _expected_move(pool, tgt.contiguous(), src.contiguous())
    pool.move_kv_cache(tgt, src)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), expected))


@pytest.mark.parametrize("bad", ["tgt", "src", "negative"])
def test_move_kv_cache_out_of_range_raises_before_writing(bad):
    pool = _pool()
    n = pool.num_slots
    tgt, src = _loc(1, 2), _loc(3, 4)
    if bad == "tgt":
        tgt = _loc(1, n)
    elif bad == "src":
        src = _loc(n + 5, 4)
    else:
        src = _loc(-1, 4)
    pool.check_bounds = True  # the GPU checks on request; the CPU always does
    before = _snapshot(pool)
    with pytest.raises(IndexError, match=f"{'tgt' if bad == 'tgt' else 'src'}_loc\\[0\\]|{'tgt' if bad == 'tgt' else 'src'}_loc\\[1\\]"):
        pool.move_kv_cache(tgt, src)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), before))


@pytest.mark.parametrize("bad,err", [("len", ValueError), ("dtype", TypeError), ("list", TypeError), ("2d", ValueError)])
def test_move_kv_cache_bad_arguments_are_named(bad, err):
    pool = _pool()
    tgt, src = _loc(1, 2), _loc(3, 4)
    if bad == "len":
        src = _loc(3)
    elif bad == "dtype":
        src = src.float()
    elif bad == "list":
        src = [3, 4]
    else:
        tgt = tgt[None]
    with pytest.raises(err, match="tgt_loc|src_loc"):
        pool.move_kv_cache(tgt, src)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("case", ["disjoint", "chain_overlap", "swap", "long_chain", "permutation"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
def test_move_kernel_all_layers_in_one_table(case, dtype):
    """The Triton kernel itself (under the interpreter on CPU): staged mode for any sets, direct for disjoint."""
    from mlakv.kernels.triton.move import launch_move_kv_rows

    pool = _pool(dtype=dtype, layer_num=2, size=60)
    tgt, src = (torch.tensor(v, device=DEVICE) for v in MOVES[case])
    expected = _expected_move(pool, tgt, src)
    launch_move_kv_rows(pool.kv_buffer, tgt, src, disjoint=case == "disjoint")
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), expected))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_move_kernel_skips_out_of_range_pairs_unchecked():
    from mlakv.kernels.triton.move import launch_move_kv_rows

    pool = _pool(layer_num=2, size=28)
    n = pool.num_slots
    tgt, src = _loc(1, n, 2, -3), _loc(5, 6, n + 100, 7)
    expected = _expected_move(pool, _loc(1), _loc(5))
    launch_move_kv_rows(pool.kv_buffer, tgt, src)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), expected))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU (none present)")
@pytest.mark.parametrize("disjoint", [False, True])
def test_move_kv_cache_replays_in_a_cuda_graph(disjoint):
    """Speculative decoding moves rows inside its captured step: the move must not sync or copy from the host."""
    pool = _pool(layer_num=4)
    tgt = torch.tensor([5, 6, 7], device=DEVICE)
    src = torch.tensor([20, 21, 22] if disjoint else [6, 7, 8], device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernel, builds the layer table
        pool.move_kv_cache(tgt, src, disjoint=disjoint)
    torch.cuda.current_stream().wait_stream(side)
    for b in pool.kv_buffer:
        b.view(torch.uint8).random_(0, 256)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pool.move_kv_cache(tgt, src, disjoint=disjoint)
    expected = _expected_move(pool, tgt, src)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), expected))


# ---- get_cpu_copy / load_cpu_copy (request offload) ---------------------------------------------


@pytest.mark.parametrize("chunk_size", [8192, 2])
def test_cpu_copy_round_trip(chunk_size):
    pool = _pool()
    idx = _loc(4, 9, 17, 30, 31)
    saved = pool.get_cpu_copy(idx, chunk_size=chunk_size)
    assert len(saved) == pool.layer_num and all(c.device.type == "cpu" for layer in saved for c in layer)
    assert sum(c.shape[0] for c in saved[0]) == 5 and max(c.shape[0] for c in saved[0]) <= chunk_size
    before = _snapshot(pool)
    for b in pool.kv_buffer:  # the rows are overwritten while the request is offloaded
        b[idx] = 0
    pool.load_cpu_copy(saved, idx)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), before))


def test_load_cpu_copy_refuses_a_mismatched_copy():
    pool = _pool()
    saved = pool.get_cpu_copy(_loc(1, 2, 3))
    with pytest.raises(ValueError, match="holds 3 rows but indices has 2"):
        pool.load_cpu_copy(saved, _loc(1, 2))
    with pytest.raises(ValueError, match="layers"):
        pool.load_cpu_copy(saved[:1], _loc(1, 2, 3))


def test_get_cpu_copy_refuses_out_of_range_indices():
    pool = _pool()
    with pytest.raises(IndexError, match="indices"):
        pool.get_cpu_copy(_loc(1, pool.num_slots))


# ---- host pool (HiCache L2) with sglang's meanings ----------------------------------------------


@pytest.mark.parametrize("layout", ["layer_first", "page_first", "page_first_direct"])
@pytest.mark.parametrize("io_backend", ["kernel", "direct"])
def test_host_backup_and_load_with_sglang_arguments(layout, io_backend):
    pool = _pool(layer_num=2, size=60, page_size=4)
    host = MLATokenToKVPoolHost(pool, host_to_device_ratio=2.0, layout=layout, pin_memory=False)
    h = host.alloc(8)  # sglang: a token count, a multiple of page_size; returns token slots
    assert h.shape == (8,) and h.dtype == torch.int64
    d = torch.arange(8, 16, device=DEVICE)
    rows = [bits(b[8:16]).cpu().clone() for b in pool.kv_buffer]
    host.backup_from_device_all_layer(pool, h, d, io_backend)
    host.synchronize() if DEVICE == "cuda" else None
    for b in pool.kv_buffer:
        b[8:16] = 0
    for layer in range(2):
        host.load_to_device_per_layer(pool, h, d, layer, io_backend)
    if DEVICE == "cuda":
        host.synchronize()
    assert all(torch.equal(bits(b[8:16]).cpu(), r) for b, r in zip(pool.kv_buffer, rows))
    assert host.free(h) == 8  # sglang: free returns the number of slots freed


def test_host_flat_data_pages_round_trip():
    pool = _pool(layer_num=2, size=60, page_size=4)
    host = MLATokenToKVPoolHost(pool, host_to_device_ratio=1.0, layout="page_first", pin_memory=False)
    h = host.alloc(8)
    page = host.get_dummy_flat_data_page()
    page.view(torch.uint8).random_(1, 256)
    host.set_from_flat_data_page(int(h[4]), page)
    assert torch.equal(bits(host.get_data_page(int(h[4]), flat=True)), bits(page))
    ptrs, sizes = host.get_page_buffer_meta(h)
    assert len(ptrs) == 2 and sizes == [host.page_bytes] * 2


def test_docs_sglang_example_runs():
    """docs/sglang.md's example runs as written (on the CPU)."""
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "sglang.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(code) == 1
    exec(compile(code[0], "docs/sglang.md", "exec"), {})
