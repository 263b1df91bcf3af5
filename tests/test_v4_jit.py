"""The V4-family JIT store's CUDA source builds for sm_90a without a GPU, and its launcher's own checks
agree with the rule book (:mod:`mlakv.spec.rules`) on one table of calls.

The launcher (``check_v4_store`` in ``csrc/v4_store.cuh``) must not trust its caller, so it repeats
every memory-safety rule; the parity test runs it on CPU tensors next to ``rules.v4_store_ok`` /
``explain_v4_store`` and asserts they accept and refuse the same calls (with the same exception type),
and that its alignment answer is ``rules.v4_jit_layout_reason``'s. Where nvcc or tvm-ffi is missing
the tests skip, unless ``MLAKV_REQUIRE_JIT_BUILD=1`` makes that a failure.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import sm90a_build_env
from mlakv.kernels.cuda.loader import JitUnavailable
from mlakv.ops import v4_reference as R
from mlakv.spec import rules


@pytest.fixture(scope="module")
def modules():
    from mlakv.kernels.cuda.v4_store import build_v4_store_module

    def build(enc):
        try:
            return enc, build_v4_store_module(enc, device_capability=(9, 0))
        except JitUnavailable as e:
            return enc, e

    with sm90a_build_env(), ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as ex:
        return dict(ex.map(build, (0, 1, 2)))


@pytest.mark.jit_build
@pytest.mark.parametrize("encoding", [0, 1, 2], ids=["v4", "v41", "v41_fp4"])
def test_module_builds_and_loads(modules, encoding):
    mod = modules[encoding]
    assert not isinstance(mod, Exception), f"build failed: {mod}"
    assert callable(mod.v4_store) and callable(mod.check_v4_store)


def test_unknown_encoding_does_not_build():
    from mlakv.kernels.cuda.v4_store import build_v4_store_module

    with pytest.raises(JitUnavailable, match="unknown"):
        build_v4_store_module(7, device_capability=(9, 0))


# ---- the launcher's checks against the rule book ---------------------------------------------------

LAYOUT_CODE = {"v4": 0, "v41": 1, "v41_fp4": 2, "v41_new": 3, "v41_fp4_new": 4}
V41_PB = R.v4_geometry("v41").page_bytes(4)  # 2560: 4 * 528 padded to 512
ENC = {"v4": 0, "v41": 1, "v41_fp4": 2, "v41_new": 1, "v41_fp4_new": 2}


def _aligned(shape, dtype, offset_elems=0):
    """A tensor whose data starts ``offset_elems`` elements past a 64-byte boundary."""
    n = 1
    for d in shape:
        n *= d
    es = torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(n * es + 128, dtype=torch.uint8)
    start = (-raw.data_ptr()) % 64 + offset_elems * es
    return raw[start : start + n * es].view(dtype).view(shape)


def _case(layout="v41", page_size=4, num_pages=3, n=5, **over):
    g = R.v4_geometry(layout)
    c = dict(
        pages=_aligned((num_pages, g.page_bytes(page_size)), torch.uint8),
        loc=torch.arange(n),
        kv=_aligned((n, 512), torch.bfloat16),
        freqs=None,
        positions=None,
        table=None,
        layout=layout,
        page_size=page_size,
        dcp=(1, 0),
    )
    c.update(over)
    return c


CASES = {
    "ok": _case(),
    "ok-v4-page1": _case("v4", page_size=1),
    "ok-fp4-new": _case("v41_fp4_new", page_size=16),
    "ok-fp16-3d": _case(kv=_aligned((5, 1, 512), torch.float16)),
    "ok-int32-loc-strided": _case(loc=torch.arange(10, dtype=torch.int32)[::2]),
    "ok-freqs": _case(freqs=_aligned((5, 64), torch.float32)),
    "ok-table": _case(positions=torch.arange(5), table=_aligned((9, 64), torch.float32)),
    "ok-dcp": _case(dcp=(4, 3)),
    "ok-n0": _case(n=0),
    "misaligned-pages": _case(pages=_aligned((3, V41_PB), torch.uint8, 8)),
    "misaligned-kv": _case(kv=_aligned((5, 512), torch.bfloat16, 4)),
    "misaligned-kv-stride": _case(kv=_aligned((5, 516), torch.bfloat16)[:, :512]),
    "misaligned-freqs": _case(freqs=_aligned((5, 66), torch.float32)[:, :64]),
    "pages-wrong-bytes": _case(pages=_aligned((3, V41_PB + 16), torch.uint8)),
    "pages-not-uint8": _case(pages=_aligned((3, V41_PB), torch.uint8).view(torch.int8)),
    "pages-3d": _case(pages=_aligned((3, 1, V41_PB), torch.uint8)),
    "pages-overlap": _case(pages=_aligned((V41_PB + 16,), torch.uint8).as_strided((3, V41_PB), (16, 1))),
    "loc-2d": _case(loc=torch.arange(5).view(5, 1)),
    "loc-float": _case(loc=torch.arange(5).float()),
    "kv-fp32": _case(kv=_aligned((5, 512), torch.float32)),
    "kv-width": _case(kv=_aligned((5, 576), torch.bfloat16)),
    "kv-rows": _case(kv=_aligned((6, 512), torch.bfloat16)),
    "kv-last-strided": _case(kv=_aligned((5, 1024), torch.bfloat16)[:, ::2]),
    "kv-3d-mid": _case(kv=_aligned((5, 2, 512), torch.bfloat16)),
    "freqs-width": _case(freqs=_aligned((5, 32), torch.float32)),
    "freqs-rows": _case(freqs=_aligned((4, 64), torch.float32)),
    "freqs-dtype": _case(freqs=_aligned((5, 64), torch.bfloat16)),
    "table-width": _case(positions=torch.arange(5), table=_aligned((9, 32), torch.float32)),
    "positions-float": _case(positions=torch.arange(5).float(), table=_aligned((9, 64), torch.float32)),
    "positions-rows": _case(positions=torch.arange(4), table=_aligned((9, 64), torch.float32)),
    "dcp-rank": _case(dcp=(2, 2)),
}


def _python(c):
    """The rule book's verdict: ``("ok", aligned)`` or the exception type."""
    g = R.v4_geometry(c["layout"])
    pb = g.page_bytes(c["page_size"])
    try:
        if not rules.v4_store_ok(c["pages"], c["loc"], c["kv"], pb, c["freqs"], c["positions"], c["table"]):
            rules.explain_v4_store(c["pages"], c["loc"], c["kv"], pb, c["freqs"], c["positions"], c["table"])
        rules.check_dcp(*c["dcp"])
    except (TypeError, ValueError) as e:
        return type(e)
    return "ok", rules.v4_jit_layout_reason(c["pages"], c["kv"], c["freqs"], c["table"]) is None


def _cpp(mod, c):
    rope = 1 if c["freqs"] is not None else 2 if c["positions"] is not None else 0
    dummy = c["kv"]
    try:
        aligned = mod.check_v4_store(
            c["pages"], c["loc"], c["kv"], c["freqs"] if c["freqs"] is not None else dummy,
            c["positions"] if c["positions"] is not None else dummy, c["table"] if c["table"] is not None else dummy,
            LAYOUT_CODE[c["layout"]], c["page_size"], rope, *c["dcp"],
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        return type(e)
    except RuntimeError as e:  # tvm-ffi maps the launcher's TypeError/ValueError onto these
        return {"TypeError": TypeError, "ValueError": ValueError}.get(type(e).__name__, RuntimeError)
    return "ok", bool(aligned)


@pytest.mark.jit_build
@pytest.mark.parametrize("name", list(CASES))
def test_launcher_checks_match_the_rule_book(modules, name):
    c = CASES[name]
    mod = modules[ENC[c["layout"]]]
    if isinstance(mod, Exception):
        pytest.fail(f"build failed: {mod}")
    py, cpp = _python(c), _cpp(mod, c)
    assert py == cpp, f"{name}: rule book says {py}, launcher says {cpp}"
    assert isinstance(py, tuple) == name.startswith(("ok", "misaligned")), f"{name}: the table expectation, got {py}"
    if isinstance(py, tuple):
        assert py[1] == (not name.startswith("misaligned")), f"{name}: alignment verdict {py[1]}"


@pytest.mark.jit_build
@pytest.mark.parametrize("page_size", [1, 2, 64, 256])
@pytest.mark.parametrize("layout", list(LAYOUT_CODE))
def test_launcher_page_bytes_match_the_format(modules, layout, page_size):
    """The launcher's page size for each layout is the format table's (it refuses any other)."""
    mod = modules[ENC[layout]]
    if isinstance(mod, Exception):
        pytest.fail(f"build failed: {mod}")
    pb = R.v4_geometry(layout).page_bytes(page_size)
    for width, ok in ((pb, True), (pb + 16, False), (pb - 16, False)):
        c = _case(layout, page_size=page_size, pages=_aligned((2, width), torch.uint8))
        assert isinstance(_cpp(mod, c), tuple) == ok, (layout, page_size, width)
