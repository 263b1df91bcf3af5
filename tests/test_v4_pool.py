"""MLATokenToKVPool with a DeepSeek-V4 family ``kv_cache_format``: page-granular layer buffers, the
quantizing ``set_kv_buffer`` (with the pool's row selection: padding, the reserved slot, DCP), the
in-write RoPE, the dequantizing gather, and the sizes transfer engines read.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from mlakv import MLATokenToKVPool
from mlakv.ops import v4_reference as R
from test_v4_formats import make_tokens

LAYOUTS = list(R.V4_LAYOUTS)


def make_pool(layout="v41", size=60, page_size=4, layer_num=2, **kw):
    return MLATokenToKVPool(size, page_size, torch.bfloat16, 448, 64, layer_num, DEVICE, kv_cache_format=layout, **kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_buffers_are_whole_pages(layout):
    pool = make_pool(layout, size=60, page_size=4)
    g = R.v4_geometry(layout)
    assert pool.num_slots == 64 and len(pool.kv_buffer) == 2
    for buf in pool.kv_buffer:
        assert buf.shape == (16, g.page_bytes(4)) and buf.dtype == torch.uint8 and buf.is_contiguous()
    assert pool.get_key_buffer(0) is pool.kv_buffer[0]
    ptrs, lens, items = pool.get_contiguous_buf_infos()
    assert ptrs == [b.data_ptr() for b in pool.kv_buffer]
    assert lens == [16 * g.page_bytes(4)] * 2 and items == [g.page_bytes(4)] * 2
    assert pool.get_kv_size_bytes() == 2 * 16 * g.page_bytes(4)
    assert pool.row_bytes() == g.token_bytes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_set_kv_buffer_stores_the_reference_bytes(layout):
    pool = make_pool(layout)
    for b in pool.kv_buffer:
        b.copy_(torch.randint(0, 256, b.shape, dtype=torch.uint8))
    before = pool.kv_buffer[1].cpu().clone()
    loc = torch.tensor([5, 0, -1, 17, 63, 2])  # 0: the reserved slot, -1: padding
    kv = make_tokens("random", 6, torch.bfloat16, seed=1)
    pool.set_kv_buffer(1, loc.to(DEVICE), kv.to(DEVICE))
    expected = before.clone()
    R.set_v4_kv_buffer_torch(expected, loc, kv, layout, 4, reserved_skip_index=0)
    assert torch.equal(pool.kv_buffer[1].cpu(), expected)
    nope, rope = pool.get_mla_kv_buffer(1, torch.tensor([5, 17, 63], device=DEVICE))
    want = R.get_v4_kv_buffer_torch(expected, torch.tensor([5, 17, 63]), layout, 4)
    assert nope.shape == (3, 448) and rope.shape == (3, 64) and nope.dtype == torch.bfloat16
    assert torch.equal(torch.cat((nope, rope), 1).cpu().view(torch.int16), want.view(torch.int16))


def test_split_form_equals_the_full_row():
    a, b = make_pool("v41_fp4"), make_pool("v41_fp4")
    kv = make_tokens("random", 3, torch.bfloat16, seed=2).to(DEVICE)
    loc = torch.tensor([1, 9, 30], device=DEVICE)
    a.set_kv_buffer(0, loc, kv)
    b.set_kv_buffer(0, loc, kv[:, :448].contiguous(), kv[:, 448:].contiguous())
    assert torch.equal(a.kv_buffer[0], b.kv_buffer[0])


@pytest.mark.parametrize("mode", ["freqs_cis", "positions"])
def test_in_write_rope(mode):
    pool = make_pool("v41")
    n = 4
    kv = make_tokens("random", n, torch.bfloat16, seed=3)
    theta = torch.rand(n, 32) * 6.3
    loc = torch.tensor([3, 4, 22, 40])
    if mode == "freqs_cis":
        f = torch.stack((torch.cos(theta), torch.sin(theta)), -1).reshape(n, 64)
        pool.set_kv_buffer(0, loc.to(DEVICE), kv.to(DEVICE), freqs_cis=f.to(DEVICE))
    else:
        table = torch.cat((torch.cos(theta), torch.sin(theta)), 1)  # row p = token p's angles
        pool.set_kv_buffer(
            0, loc.to(DEVICE), kv.to(DEVICE), positions=torch.arange(n, device=DEVICE), cos_sin_cache=table.to(DEVICE)
        )
    expected = torch.zeros_like(pool.kv_buffer[0].cpu())
    R.set_v4_kv_buffer_torch(expected, loc, kv, "v41", 4, cos=torch.cos(theta), sin=torch.sin(theta))
    assert torch.equal(pool.kv_buffer[0].cpu(), expected)


def test_dcp_pool_keeps_its_ranks_slots():
    pool = make_pool("v4", size=60, dcp_world_size=2, dcp_rank=1)
    assert pool.num_slots == 32 and pool.kv_buffer[0].shape[0] == 8
    loc = torch.tensor([3, 4, 9, 61])
    kv = make_tokens("random", 4, torch.bfloat16, seed=4)
    pool.set_kv_buffer(0, loc.to(DEVICE), kv.to(DEVICE))
    expected = torch.zeros_like(pool.kv_buffer[0].cpu())
    R.set_v4_kv_buffer_torch(expected, loc, kv, "v4", 4, reserved_skip_index=0, dcp_world_size=2, dcp_rank=1)
    assert torch.equal(pool.kv_buffer[0].cpu(), expected)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(dtype=torch.float32), TypeError, "bfloat16 or float16"),
        (dict(kv_lora_rank=512), ValueError, "448 \\+ 64"),
        (dict(page_size=3), ValueError, "page_size"),
        (dict(k_scale=1.0), ValueError, "k_scale"),
    ],
)
def test_pool_refuses_bad_settings(kw, exc, match):
    args = dict(size=60, page_size=4, dtype=torch.bfloat16, kv_lora_rank=448, qk_rope_head_dim=64, layer_num=1)
    args.update(kw)
    k_scale = args.pop("k_scale", None)
    with pytest.raises(exc, match=match):
        MLATokenToKVPool(**args, device=DEVICE, kv_cache_format="v41", k_scale=k_scale)


def test_row_operations_refuse_pages():
    pool = make_pool("v41")
    idx = torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="pages"):
        pool.move_kv_cache(idx, idx + 2)
    with pytest.raises(ValueError, match="pages"):
        pool.get_cpu_copy(idx)


def test_rope_arguments_refused_by_a_row_pool():
    pool = MLATokenToKVPool(8, 1, torch.bfloat16, 512, 64, 1, DEVICE)
    with pytest.raises(ValueError, match="V4-family"):
        pool.set_kv_buffer(0, torch.tensor([1], device=DEVICE), torch.zeros(1, 576, dtype=torch.bfloat16, device=DEVICE),
                           freqs_cis=torch.zeros(1, 64, device=DEVICE))  # fmt: skip
