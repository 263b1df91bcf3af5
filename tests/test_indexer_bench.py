"""`mlakv bench indexer`: the table it prints, the sglang peer it builds, its refusal to time a wrong provider.

The timings themselves need a GPU; here: the report format, the peer's build
for sm_90a without a GPU, and on a GPU the byte-equality check the bench runs before timing.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, requires_sm90, sm90a_build_env

from mlakv.bench import SUBCOMMANDS
from mlakv.bench.indexer import format_tables, main


def _result() -> dict:
    return {
        "device": "NVIDIA H200",
        "copy_gbs": 4200.0,
        "store": [
            {"n": 1, "path": "jit", "mlakv": 1.0, "mlakv of copy bw": 0.0001, "mlakv-jit": 0.9, "sglang": 0.86},
            {"n": 65536, "path": "jit", "mlakv": 7.0, "mlakv of copy bw": 0.86, "mlakv-jit": 7.0, "sglang": 20.9},
            {"n": 8, "path": "jit", "mlakv": "WRONG", "mlakv-jit": 1.0, "sglang": 0.9},
        ],
        "gather": [{"n": 65536, "mlakv": 5.0, "mlakv of copy bw": 0.8, "mlakv-triton": 9.0, "mlakv-triton of copy bw": 0.4}],
    }


def test_table_shows_times_bandwidth_and_the_ratio_to_sglang():
    text = format_tables(_result())
    lines = text.splitlines()
    assert "copy bandwidth 4200 GB/s" in lines[0]
    row = next(ln for ln in lines if ln.startswith("| 65536 | jit"))
    assert "7.00" in row and "20.90" in row and "86%" in row and "2.99x" in row
    wrong = next(ln for ln in lines if ln.startswith("| 8 |"))
    assert "WRONG" in wrong and wrong.endswith("| - |")  # no ratio for a provider that failed its check
    assert any(ln.startswith("| 65536 | 5.00 | 80% | 9.00 | 40% |") for ln in lines)


def test_subcommand_is_registered_and_runs_without_a_gpu(capsys, tmp_path):
    assert "indexer" in SUBCOMMANDS
    if torch.cuda.is_available():
        pytest.skip("on a GPU the bench really runs (the GPU command list has it)")
    assert main(["--sizes", "1", "--out", str(tmp_path)]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.jit_build
def test_sglang_indexer_store_builds_for_sm90a(monkeypatch, tmp_path):
    from mlakv.bench.sglang_peer import peer_absent_reason

    if peer_absent_reason():
        pytest.skip(peer_absent_reason())
    from mlakv.bench.indexer import build_sglang_indexer_store

    with sm90a_build_env():
        mod = build_sglang_indexer_store((9, 0))
    assert callable(mod.store_indexer)


@requires_sm90
@pytest.mark.parametrize("n", [1, 8, 64, 512, 4096, 65536])
def test_sglang_store_writes_the_reference_bytes(n):
    """The claim the bench rests on: sglang's store and mlakv's reference give the same page bytes."""
    from mlakv.bench.indexer import build_sglang_indexer_store
    from mlakv.bench.sglang_peer import peer_absent_reason
    from mlakv.ops.indexer import set_index_k_buffer
    from mlakv.ops.indexer_reference import INDEX_PAGE_BYTES, store_index_k_reference
    from mlakv.spec.calls import IndexStoreCall

    if peer_absent_reason():
        pytest.skip(peer_absent_reason())
    mod = build_sglang_indexer_store()
    pages = torch.randint(0, 256, (n // 64 + 2, INDEX_PAGE_BYTES), dtype=torch.uint8, device=DEVICE)
    keys = (torch.randn(n, 128, device=DEVICE) * torch.rand(n, 1, device=DEVICE) * 50).to(torch.bfloat16)
    if n >= 8:
        keys[1] = 0
        keys[2, 3] = float("nan")
        keys[3, 4] = float("inf")
        keys[4, 5] = 3.3895313892515355e38
    loc = torch.randperm(pages.shape[0] * 64, device=DEVICE)[:n]
    want = pages.cpu().clone()
    store_index_k_reference(IndexStoreCall(want, loc.cpu(), keys.cpu()))
    theirs, ours = pages.clone(), pages.clone()
    mod.store_indexer(keys, theirs, loc)
    set_index_k_buffer(ours, loc, keys)
    torch.cuda.synchronize()
    assert torch.equal(theirs.cpu(), want), "sglang's store differs from the reference"
    assert torch.equal(ours.cpu(), want)
