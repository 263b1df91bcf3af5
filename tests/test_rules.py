"""The rule book and the CUDA launcher agree: a table of layouts is accepted, refused or sent to the
fallback path alike by :mod:`mlakv.spec.rules` and by the compiled launcher's own checks.

The launcher's checks run on CPU tensors through the module's ``check_set_mla_kv_buffer`` export
(compiled for sm_90a with nvcc; no GPU needed). Each row breaks at most one rule.
"""

from __future__ import annotations


import pytest
import torch

from conftest import sm90a_build_env
from mlakv import _env
from mlakv.spec import rules

BF16 = torch.bfloat16
NOPE, ROPE = 512, 64  # bf16 elements: the (1024, 128)-byte module; rope-less rows use (1024, 0)


def _t(n, d, dtype=BF16):
    return torch.randn(n, d).to(dtype) if dtype.is_floating_point and dtype.itemsize > 1 else torch.randint(0, 100, (n, d)).to(dtype)


def _case(n=8, slots=32, kv=None, loc=None, nope=None, rope=None, dcp=(1, 0)):
    kv = torch.zeros(slots, NOPE + ROPE, dtype=BF16) if kv is None else kv
    loc = torch.randperm(slots)[:n] if loc is None else loc
    nope = _t(n, NOPE) if nope is None else nope
    rope = _t(n, ROPE) if rope is None else rope
    return kv, loc, nope, rope, dcp


def _wide(n, extra_front=0):
    w = _t(n, extra_front + NOPE + ROPE + 64)
    return w[:, extra_front : extra_front + NOPE], w[:, extra_front + NOPE : extra_front + NOPE + ROPE]


def _table():
    n = 8
    nope_s, rope_s = _wide(n)
    nope_m, rope_m = _wide(n, extra_front=1)  # 2-byte offset: misaligned for the kernel's vectors
    big_loc = torch.tensor([1, 40, 2, 41, 3, 42, 4, 43, 5, 44, 6, 45, 7, 46, 8, 47])
    return {
        "plain": _case(),
        "3d": (lambda c: (c[0].unsqueeze(1), c[1], c[2].unsqueeze(1), c[3].unsqueeze(1), c[4]))(_case()),
        "kv-wider-than-row": _case(kv=torch.zeros(32, NOPE + ROPE + 64, dtype=BF16)),
        "kv-column-slice": _case(kv=torch.zeros(32, 640, dtype=BF16)[:, :576]),
        "kv-row-view": _case(kv=torch.zeros(64, 576, dtype=BF16)[:32]),
        "strided-sources": _case(nope=nope_s, rope=rope_s),
        "expanded-sources": _case(nope=_t(1, NOPE).expand(n, NOPE), rope=_t(1, ROPE).expand(n, ROPE)),
        "loc-int32": _case(loc=torch.randperm(32)[:n].int()),
        "loc-strided": _case(loc=big_loc[::2]),
        "loc-expanded": _case(loc=torch.tensor([5]).expand(n)),
        "loc-offset": _case(loc=torch.arange(40)[32 - n : 32]),
        "loc-empty": _case(n=0),
        "dcp-2-1": _case(dcp=(2, 1)),
        "misaligned-source": _case(nope=nope_m, rope=rope_m),
        "misaligned-kv-rows": _case(kv=torch.zeros(32, 577, dtype=BF16)[:, :576]),
        "misaligned-kv-base": _case(kv=torch.zeros(33 * 576 + 1, dtype=BF16)[1:].view(33, 576)[:32]),
        "loc-float": _case(loc=torch.rand(n)),
        "loc-int16": _case(loc=torch.randperm(32)[:n].short()),
        "loc-2d": _case(loc=torch.randperm(32)[:n].view(2, 4)),
        "nope-dtype": _case(nope=_t(n, NOPE).view(torch.int16)),
        "kv-float64": _case(
            kv=torch.zeros(32, 144, dtype=torch.float64), nope=_t(n, 128, torch.float64), rope=_t(n, 16, torch.float64)
        ),
        "kv-int16": _case(kv=torch.zeros(32, 576, dtype=torch.int16), nope=_t(n, NOPE, torch.int16), rope=_t(n, ROPE, torch.int16)),
        "n-loc-mismatch": _case(nope=_t(n + 1, NOPE)),
        "3d-middle-not-1": _case(nope=_t(n, NOPE).view(n, 2, 256)),
        "nope-1d": _case(n=1, nope=_t(1, NOPE).flatten()),
        "kv-4d": _case(kv=torch.zeros(32, 1, 1, 576, dtype=BF16)),
        "kv-last-dim-strided": _case(kv=torch.zeros(576, 32, dtype=BF16).t()),
        "rope-last-dim-strided": _case(rope=_t(ROPE, n).t()),
        "kv-too-narrow": _case(kv=torch.zeros(32, 576, dtype=BF16)[:, :560]),
        "kv-rows-expanded": _case(kv=torch.zeros(1, 576, dtype=BF16).expand(32, 576)),
        "kv-rows-overlap": _case(kv=torch.zeros(32 * 8 + 576, dtype=BF16).as_strided((32, 576), (8, 1))),
        "dcp-rank-too-big": _case(dcp=(2, 2)),
        "dcp-world-0": _case(dcp=(0, 0)),
    }


def _ropeless_table():
    n = 8
    return {
        "ropeless-plain": _case(rope=_t(n, 0), kv=torch.zeros(32, NOPE, dtype=BF16)),
        "ropeless-strided-empty-rope": _case(rope=_t(n, 10)[:, ::2][:, :0], kv=torch.zeros(32, NOPE, dtype=BF16)),
        "ropeless-wider-kv": _case(rope=_t(n, 0)),
        "ropeless-misaligned-nope": _case(nope=_wide(n, extra_front=1)[0], rope=_t(n, 0)),
    }


def _fp32_table():
    """fp32 255 + 1 (the (1020, 4)-byte module): a rope of one element may have any last-dim stride."""
    n = 8
    kv = torch.zeros(32, 256)
    return {
        "fp32-rope-width-1": _case(kv=kv, nope=torch.randn(n, 255), rope=torch.randn(n, 1)),
        "fp32-rope-width-1-strided": _case(kv=kv, nope=torch.randn(n, 255), rope=torch.randn(1, n).t()),
    }


def python_verdict(kv, loc, nope, rope, dcp) -> tuple[str, type | None]:
    """``accept`` / ``fallback`` (valid, but the JIT kernel's alignment does not fit) / ``refuse``."""
    try:
        if not rules.kv_write_ok(kv, loc, nope, rope):
            rules.explain_kv_write(kv, loc, nope, rope)
        rules.check_dcp(*dcp)
    except (TypeError, ValueError) as e:
        return "refuse", type(e)
    return ("fallback" if rules.jit_layout_reason(kv, nope, rope) else "accept"), None


def cpp_verdict(mod, kv, loc, nope, rope, dcp) -> tuple[str, type | None]:
    try:
        ok = mod.check_set_mla_kv_buffer(kv, loc, nope, rope, *dcp)
    except (TypeError, ValueError) as e:
        return "refuse", type(e)
    return ("accept" if ok else "fallback"), None


@pytest.fixture(scope="module")
def modules():
    from mlakv.jit_kernel import JitUnavailable, build_set_mla_kv_buffer_module

    with sm90a_build_env():
        try:
            return {
                rope_bytes: build_set_mla_kv_buffer_module(1024, rope_bytes, use_pdl=True, device_capability=(9, 0))
                for rope_bytes in (128, 0)
            } | {4: build_set_mla_kv_buffer_module(1020, 4, use_pdl=True, device_capability=(9, 0))}
        except JitUnavailable as e:
            pytest.fail(f"the module does not build: {e}")


TABLE = _table()
ROPELESS = _ropeless_table()
FP32 = _fp32_table()
ALL = {**TABLE, **ROPELESS, **FP32}
EXPECTED = {
    **{k: "accept" for k in TABLE},
    "misaligned-source": "fallback",
    "misaligned-kv-rows": "fallback",
    "misaligned-kv-base": "fallback",
    **{
        k: "refuse"
        for k in (
            "loc-float", "loc-int16", "loc-2d", "nope-dtype", "kv-float64", "kv-int16", "n-loc-mismatch",
            "3d-middle-not-1", "nope-1d", "kv-4d", "kv-last-dim-strided", "rope-last-dim-strided",
            "kv-too-narrow", "kv-rows-expanded", "kv-rows-overlap", "dcp-rank-too-big", "dcp-world-0",
        )
    },
    "ropeless-plain": "accept",
    "ropeless-strided-empty-rope": "accept",
    "ropeless-wider-kv": "accept",
    "ropeless-misaligned-nope": "fallback",
    "fp32-rope-width-1": "accept",
    "fp32-rope-width-1-strided": "accept",
}


@pytest.mark.parametrize("name", list(ALL))
def test_rule_book_verdict(name):
    """The Python rule book gives each row its expected verdict (runs without nvcc)."""
    case = ALL[name]
    assert python_verdict(*case)[0] == EXPECTED[name]


@pytest.mark.jit_build
@pytest.mark.parametrize("name", list(ALL))
def test_launcher_agrees_with_rule_book(modules, name):
    """The compiled launcher accepts, refuses (with the same exception type) or falls back alike."""
    case = ALL[name]
    mod = modules[case[3].shape[-1] * case[3].element_size()]
    assert cpp_verdict(mod, *case) == python_verdict(*case)


@pytest.mark.parametrize(
    "value,expected",
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("false", False), ("no", False),
     ("Off", False), ("", False), (None, False)],
)
def test_check_bounds_env_values(value, expected):
    assert _env.parse_flag("MLAKV_CHECK_BOUNDS", value) is expected


@pytest.mark.parametrize("value", ["2", "maybe", "enabled"])
def test_check_bounds_env_rejects_unknown_values(value):
    with pytest.raises(ValueError, match=r"MLAKV_CHECK_BOUNDS="):
        _env.parse_flag("MLAKV_CHECK_BOUNDS", value)


def test_rules_module_is_a_leaf():
    """The rule book imports nothing of mlakv (it is imported by both mem_cache and jit_kernel)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(rules))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("mlakv"), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("mlakv") for a in node.names)
