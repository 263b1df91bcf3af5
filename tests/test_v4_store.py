"""The DeepSeek-V4 family's store and gather, checked bit-exactly on every path against the reference.

Paths: ``triton`` (the Triton launchers called directly; under the interpreter on CPU, so the token
counts stay small there), ``jit`` (the CUDA kernel's direct entry; SM90+ only) and ``dispatch``
(:func:`mlakv.ops.v4.set_v4_kv_buffer`: torch on CPU, JIT or Triton on CUDA). Every destination is
poisoned (random bytes) first, so a byte written where it should not be, or not written, shows; the
expected pages are the reference (:mod:`mlakv.ops.v4_reference`) applied to a CPU copy.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_pages_equal, compile_in_subprocess, DEVICE, HAS_CUDA, IS_SM90
from mlakv.ops import v4_reference as R
from mlakv.spec.calls import V4StoreCall
from test_v4_formats import make_tokens

LAYOUTS = list(R.V4_LAYOUTS)
DTYPES = [torch.bfloat16, torch.float16]
PAGE_SIZE = 64 if HAS_CUDA else 4
N_TOKENS = [1, 7, 300, 4100] if HAS_CUDA else [1, 5]


# ---- the paths ---------------------------------------------------------------------------------


def _gate(path: str) -> None:
    if path == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    if path == "jit" and not IS_SM90:
        pytest.skip("the JIT kernel needs an SM90+ GPU (none present)")


def _run_triton(kv_pages, loc, kv, layout, page_size, *, freqs_cis=None, positions=None, cos_sin_cache=None,
                reserved_skip_index=None, dcp_world_size=1, dcp_rank=0):  # fmt: skip
    from mlakv.kernels.triton.v4_store import ENCODINGS, launch_v4_store

    if loc.shape[0] == 0:
        return
    g = R.v4_geometry(layout)
    call = _call(kv_pages, loc, kv, freqs_cis, positions, cos_sin_cache, reserved_skip_index, dcp_world_size, dcp_rank)
    launch_v4_store(call, encoding=ENCODINGS[g.encoding], **g.kernel_geometry(page_size))


def _call(kv_pages, loc, kv, freqs_cis=None, positions=None, cos_sin_cache=None, reserved_skip_index=None,
          dcp_world_size=1, dcp_rank=0):  # fmt: skip
    skip = -1 if reserved_skip_index is None else reserved_skip_index
    return V4StoreCall(kv_pages, loc, kv, freqs_cis, positions, cos_sin_cache, skip, dcp_world_size, dcp_rank)


def _run_jit(kv_pages, loc, kv, layout, page_size, **kw):
    """The JIT kernel itself (bounds unchecked: out-of-range slots and positions are skipped); it must
    serve the call (a module for this device, 16-byte aligned operands)."""
    from mlakv.kernels.cuda.v4_store import v4_jit_store, v4_store_module

    mod = v4_store_module(kv_pages.device, layout)
    assert not isinstance(mod, str), f"the JIT V4-family store cannot be used here: {mod}"
    assert v4_jit_store(_call(kv_pages, loc, kv, **kw), layout, page_size), "the JIT store refused the call"


def _run_dispatch(kv_pages, loc, kv, layout, page_size, **kw):
    from mlakv.ops.v4 import set_v4_kv_buffer

    set_v4_kv_buffer(kv_pages, loc, kv, layout, page_size, **kw)


RUNNERS = {"triton": _run_triton, "jit": _run_jit, "dispatch": _run_dispatch}
PATHS = ["triton", "jit", "dispatch"]


def _gather_triton(kv_pages, loc, layout, page_size):
    from mlakv.kernels.triton.v4_store import ENCODINGS, launch_v4_gather

    g = R.v4_geometry(layout)
    return launch_v4_gather(kv_pages, loc, encoding=ENCODINGS[g.encoding], **g.kernel_geometry(page_size))


def _gather_dispatch(kv_pages, loc, layout, page_size):
    from mlakv.ops.v4 import get_v4_kv_buffer

    return get_v4_kv_buffer(kv_pages, loc, layout, page_size)


GATHERS = {"triton": _gather_triton, "dispatch": _gather_dispatch}


# ---- helpers -----------------------------------------------------------------------------------


def poisoned_pages(num_pages: int, layout: str, page_size: int, extra: int = 0) -> torch.Tensor:
    g = R.v4_geometry(layout)
    return torch.randint(0, 256, (num_pages, g.page_bytes(page_size) + extra), dtype=torch.uint8, device=DEVICE)


def expected_after(pages, loc, kv, layout, page_size, **kw) -> torch.Tensor:
    """The reference's pages (on the CPU) after the same store."""
    out = pages.detach().cpu().clone()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    cos = sin = None
    if cpu.get("freqs_cis") is not None or cpu.get("positions") is not None:
        n = loc.shape[0]
        pos = cpu.get("positions")
        if pos is not None:  # a position outside the table: that token is skipped
            bad = (pos < 0) | (pos >= cpu["cos_sin_cache"].shape[0])
            loc = torch.where(bad.to(loc.device), -1, loc)
            pos = torch.where(bad, 0, pos)
        cos, sin = R.rope_cos_sin(n, freqs_cis=cpu.get("freqs_cis"), positions=pos, cos_sin_cache=cpu.get("cos_sin_cache"))
    R.set_v4_kv_buffer_torch(
        out, loc.cpu(), kv.cpu(), layout, page_size, cos=cos, sin=sin,
        reserved_skip_index=cpu.get("reserved_skip_index"), dcp_world_size=cpu.get("dcp_world_size", 1),
        dcp_rank=cpu.get("dcp_rank", 0),
    )  # fmt: skip
    return out


def store_and_check(path, layout, pages, loc, kv, page_size, **kw):
    _gate(path)
    expected = expected_after(pages, loc, kv, layout, page_size, **kw)
    RUNNERS[path](pages, loc, kv, layout, page_size, **kw)
    if HAS_CUDA:
        torch.cuda.synchronize()
    assert_pages_equal(pages, expected)


def random_loc(n: int, num_slots: int, dtype=torch.int64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_slots, generator=g)[:n].to(dtype).to(DEVICE)


def tokens(case: str, n: int, dtype, seed: int = 0) -> torch.Tensor:
    return make_tokens(case, n, dtype, seed=seed).to(DEVICE)


def rope_inputs(n: int, mode: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if mode == "freqs_cis":
        theta = torch.rand(n, 32, generator=g) * 6.3
        f = torch.stack((torch.cos(theta), torch.sin(theta)), dim=-1).reshape(n, 64)
        return {"freqs_cis": f.to(DEVICE)}
    table = torch.rand(97, 32, generator=g) * 6.3
    cache = torch.cat((torch.cos(table), torch.sin(table)), dim=1)
    return {"positions": torch.randint(0, 97, (n,), generator=g).to(DEVICE), "cos_sin_cache": cache.to(DEVICE)}


# ---- the store -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", N_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_store_is_bit_exact(path, layout, dtype, n):
    num_pages = n // PAGE_SIZE + 3
    pages = poisoned_pages(num_pages, layout, PAGE_SIZE)
    store_and_check(path, layout, pages, random_loc(n, num_pages * PAGE_SIZE, seed=n), tokens("random", n, dtype, n), PAGE_SIZE)


@pytest.mark.parametrize("case", ["zeros", "one_huge", "subnormal", "inf", "nan", "mixed"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_store_special_values(path, layout, case):
    n = 4
    pages = poisoned_pages(2, layout, PAGE_SIZE)
    for dtype in DTYPES:
        store_and_check(path, layout, pages, random_loc(n, 2 * PAGE_SIZE, seed=1), tokens(case, n, dtype, 2), PAGE_SIZE)


@pytest.mark.parametrize("mode", ["freqs_cis", "positions"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_store_rotates_the_rope_tail(path, layout, dtype, mode):
    n = 5 if not HAS_CUDA else 1000
    num_pages = n // PAGE_SIZE + 2
    pages = poisoned_pages(num_pages, layout, PAGE_SIZE)
    kv = tokens("random", n, dtype, 7)
    store_and_check(path, layout, pages, random_loc(n, num_pages * PAGE_SIZE, seed=3), kv, PAGE_SIZE, **rope_inputs(n, mode, 4))


@pytest.mark.parametrize("layout", ["v41", "v41_fp4_new"])
@pytest.mark.parametrize("path", PATHS)
def test_store_rope_inputs_are_read_at_their_strides(path, layout):
    """freqs_cis with a row stride past its width; positions strided, offset and expanded; an offset
    view of cos_sin_cache: each read at its stride (the reference reads the same views)."""
    n = 6
    pages = poisoned_pages(2, layout, PAGE_SIZE)
    wide = torch.cat([rope_inputs(n, "freqs_cis", 21)["freqs_cis"]] * 2, dim=1)  # [n, 128]
    store_and_check(path, layout, pages, random_loc(n, 2 * PAGE_SIZE, seed=22), tokens("random", n, torch.bfloat16, 23),
                    PAGE_SIZE, freqs_cis=wide[:, 64:])  # fmt: skip
    table = rope_inputs(1, "positions", 24)["cos_sin_cache"]
    views = {
        "strided": torch.randint(0, 90, (2 * n,), device=DEVICE)[::2],
        "offset": torch.randint(0, 90, (n + 3,), device=DEVICE)[3:],
        "expanded": torch.tensor([41], device=DEVICE).expand(n),
    }
    for i, positions in enumerate(views.values()):
        store_and_check(path, layout, pages, random_loc(n, 2 * PAGE_SIZE, seed=25 + i),
                        tokens("random", n, torch.bfloat16, 30 + i), PAGE_SIZE, positions=positions,
                        cos_sin_cache=table[5:])  # fmt: skip


@pytest.mark.parametrize("layout", ["v4", "v41_fp4"])
@pytest.mark.parametrize("path", PATHS)
def test_store_rope_with_non_finite_tail(path, layout):
    """NaN and infinities in the rotated tail (and in the angles) round to the canonical NaN / inf."""
    n = 4
    kv = tokens("mixed", n, torch.bfloat16, 5)
    rope = rope_inputs(n, "freqs_cis", 6)
    rope["freqs_cis"][1, 3] = float("inf")
    rope["freqs_cis"][2, 8] = float("nan")
    pages = poisoned_pages(2, layout, PAGE_SIZE)
    store_and_check(path, layout, pages, random_loc(n, 2 * PAGE_SIZE, seed=5), kv, PAGE_SIZE, **rope)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
def test_store_skips_padding_and_the_reserved_slot(path, layout):
    pages = poisoned_pages(3, layout, PAGE_SIZE)
    loc = torch.tensor([PAGE_SIZE + 1, -1, 0, 2 * PAGE_SIZE - 1, -100, 3], device=DEVICE)
    store_and_check(path, layout, pages, loc, tokens("random", 6, torch.bfloat16, 8), PAGE_SIZE, reserved_skip_index=0)


@pytest.mark.parametrize("layout", ["v4", "v41", "v41_fp4_new"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rank", [0, 2])
def test_store_dcp_owner_rule(path, layout, rank):
    """World 3: rank r keeps ``loc % 3 == r`` at slot ``loc // 3``."""
    pages = poisoned_pages(2, layout, PAGE_SIZE)
    loc = random_loc(8, 6 * PAGE_SIZE, seed=9)
    store_and_check(path, layout, pages, loc, tokens("random", 8, torch.bfloat16, 9), PAGE_SIZE, dcp_world_size=3, dcp_rank=rank)


@pytest.mark.parametrize("layout", ["v4", "v41_fp4"])
@pytest.mark.parametrize("path", ["triton", "jit"])
def test_unchecked_store_skips_slots_past_the_pages(path, layout):
    """Unchecked, a slot past the last page is skipped: nothing outside ``kv_pages`` changes."""
    wide = poisoned_pages(3, layout, PAGE_SIZE)
    pages = wide[:2]  # a view: the third page lies just past it
    before = wide[2].clone()
    loc = torch.tensor([1, 2 * PAGE_SIZE, 3 * PAGE_SIZE - 1, 5, 1 << 40], device=DEVICE)
    store_and_check(path, layout, pages, loc, tokens("random", 5, torch.bfloat16, 10), PAGE_SIZE)
    assert torch.equal(wide[2], before)


@pytest.mark.parametrize("layout", ["v41", "v41_fp4"])
@pytest.mark.parametrize("path", ["triton", "jit"])
def test_unchecked_store_skips_positions_outside_the_table(path, layout):
    """A position outside ``cos_sin_cache`` (unchecked) skips its token: no read past the table."""
    n = 4
    rope = rope_inputs(n, "positions", 18)
    rope["positions"][1] = 97
    rope["positions"][3] = -1
    pages = poisoned_pages(2, layout, PAGE_SIZE)
    store_and_check(path, layout, pages, random_loc(n, 2 * PAGE_SIZE, seed=18), tokens("random", n, torch.bfloat16, 18), PAGE_SIZE, **rope)


@pytest.mark.parametrize("layout", ["v4", "v41", "v41_fp4_new"])
@pytest.mark.parametrize("path", PATHS)
def test_store_honours_strided_offset_and_expanded_views(path, layout):
    g = R.v4_geometry(layout)
    wide = poisoned_pages(3, layout, PAGE_SIZE, extra=32)
    pages = wide[:, : g.page_bytes(PAGE_SIZE)]  # page stride past its width
    base = tokens("random", 6, torch.float16, 11)
    kv = torch.cat((base, base), dim=1)[:, :512]  # row stride 1024
    loc = torch.tensor([-7, 9, -7, PAGE_SIZE + 2, -7, 1, -7, 2 * PAGE_SIZE + 3, -7, 0, -7, 3, -7], device=DEVICE)[1::2]
    tail = wide[:, g.page_bytes(PAGE_SIZE) :].clone()
    store_and_check(path, layout, pages, loc, kv, PAGE_SIZE)
    assert torch.equal(wide[:, g.page_bytes(PAGE_SIZE) :], tail)
    # an offset view of loc and an expanded (stride 0) one
    loc2 = torch.tensor([5, 6, 7, 2 * PAGE_SIZE + 1], device=DEVICE)[2:]
    store_and_check(path, layout, pages, loc2, tokens("random", 2, torch.bfloat16, 12), PAGE_SIZE)
    loc3 = torch.tensor([PAGE_SIZE + 7], device=DEVICE).expand(1)
    store_and_check(path, layout, pages, loc3, tokens("random", 1, torch.bfloat16, 13), PAGE_SIZE)


@pytest.mark.parametrize("path", PATHS)
def test_store_takes_int32_loc(path):
    pages = poisoned_pages(2, "v41", PAGE_SIZE)
    store_and_check(path, "v41", pages, random_loc(5, 2 * PAGE_SIZE, torch.int32, 14), tokens("random", 5, torch.bfloat16, 14), PAGE_SIZE)


@pytest.mark.parametrize("page_size", [1, 2, 16])
@pytest.mark.parametrize("layout", ["v4", "v41_new", "v41_fp4"])
@pytest.mark.parametrize("path", PATHS)
def test_store_other_page_sizes(path, layout, page_size):
    pages = poisoned_pages(5, layout, page_size)
    store_and_check(path, layout, pages, random_loc(4, 5 * page_size, seed=15), tokens("random", 4, torch.bfloat16, 15), page_size)


# ---- the gather ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["triton", "dispatch"])
def test_gather_is_bit_exact(path, layout):
    _gate(path)
    n = 6
    pages = poisoned_pages(2, layout, PAGE_SIZE)
    kv = torch.cat((tokens("random", 3, torch.bfloat16, 16), tokens("mixed", 3, torch.bfloat16, 17)))
    slots = random_loc(n, 2 * PAGE_SIZE, seed=16)
    cpu = pages.cpu()
    R.set_v4_kv_buffer_torch(cpu, slots.cpu(), kv.cpu(), layout, PAGE_SIZE)
    pages.copy_(cpu)
    loc = torch.cat((slots, torch.tensor([-1], device=DEVICE)))
    got = GATHERS[path](pages, loc, layout, PAGE_SIZE)
    want = R.get_v4_kv_buffer_torch(pages.cpu(), loc.cpu(), layout, PAGE_SIZE)
    assert got.dtype == torch.bfloat16 and got.shape == (n + 1, 512)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("path", ["triton"])
def test_unchecked_gather_gives_zero_rows_past_the_pages(path):
    _gate(path)
    pages = poisoned_pages(1, "v41", PAGE_SIZE)
    got = GATHERS[path](pages, torch.tensor([PAGE_SIZE, -3, 1 << 40], device=DEVICE), "v41", PAGE_SIZE)
    assert torch.equal(got.cpu().float(), torch.zeros(3, 512))


# ---- compiled for sm_90 (no GPU needed): no operation whose compiled meaning differs from the interpreter's ----

_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mlakv.kernels.triton import v4_store as m

out = []
for name, ptrs, const in json.loads(sys.argv[1]):
    k = getattr(m, name)
    sig = {a: "constexpr" if a in const else ptrs.get(a, "i64") for a in k.arg_names}
    src = ASTSource(k, sig, constexprs={(k.arg_names.index(a),): v for a, v in const.items()})
    opts = {"enable_fp_fusion": False, "num_warps": 4}  # as the launchers build them
    out.append([name, const, triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]])
print(json.dumps(out))
"""

_STORE_PTRS = dict(pages_ptr="*u8", loc_ptr="*i64", kv_ptr="*i16", cs_ptr="*fp32", pos_ptr="*i32")
_GEOMETRY = dict(PAGE_SIZE=64, DATA_STRIDE=576, SCALE_BASE=64 * 576, SCALE_STRIDE=8)
# every encoding with both input dtypes (fp16 and bf16 are both read as int16 bits) and each RoPE source,
# on the portable path (integer bit arithmetic: pre-sm_89 GPUs, the same as the interpreter) and on the
# Hopper path (the hardware e4m3 conversion, packed half compares for fp4, the pairs as words)
_PTX_CASES = [
    ["_v4_store_kernel", _STORE_PTRS, dict(ENC=enc, IS_BF16=bf16, ROPE=rope, TOKENS=tokens, NATIVE=hw, PACKED=hw,
                                           PAIRS=pairs, DCP=dcp, USE_PDL=True, EARLY_TRIGGER=True, **_GEOMETRY)]
    for enc, bf16, rope, tokens, pairs, dcp in ((0, True, 1, 2, True, False), (0, False, 2, 4, True, True),
                                               (1, True, 0, 4, True, False), (1, False, 1, 2, True, False),
                                               (2, True, 2, 2, True, False), (2, False, 0, 4, False, True))
    for hw in (False, True)
] + [
    ["_v4_gather_kernel", dict(pages_ptr="*u8", loc_ptr="*i64", out_ptr="*i16"), dict(ENC=enc, **_GEOMETRY)]
    for enc in (0, 1, 2)
]  # fmt: skip

# Float operations whose result on the GPU differs from the interpreter's (numpy) for some input:
#   max/min  PTX returns the non-NaN operand, numpy the NaN;
#   neg/abs  on a NaN may give any NaN (and a negation written 0 - x gives +0 for +0);
#   cvt.f32.f16  the hardware widening may return a canonical NaN (a negative NaN's sign lost);
#   .ftz     flushes fp32 denormals (bf16 subnormals are fp32 denormals) to zero.
_FORBIDDEN_PTX = r"\b(?:max|min|neg|abs|copysign)(?:\.[a-zA-Z]+)*\.(?:f16|f16x2|bf16|bf16x2|f32)\b|\bcvt(?:\.\w+)*\.f32\.f16\b|\.ftz\b|\bfma\."


def test_triton_kernels_compile_for_sm90_without_interpreter_dependent_float_ops():
    """The interpreter (CPU CI) and the compiled kernels must agree bit for bit, so the compiled code
    holds none of the float operations whose GPU semantics differ from numpy's (signs and NaN are
    bit arithmetic, 16-bit inputs are widened by their bits, nothing flushes denormals, no FMA)."""
    import re

    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")
    compiled = compile_in_subprocess(_COMPILE_SCRIPT, _PTX_CASES)
    assert len(compiled) == len(_PTX_CASES)
    for name, const, ptx in compiled:
        bad = sorted(set(re.findall(_FORBIDDEN_PTX, ptx)))
        assert not bad, f"{name} {const}: {bad}"
        assert ".f64" not in ptx and "div.full" not in ptx and "div.approx" not in ptx, f"{name} {const}"
        assert ("griddepcontrol" in ptx) == bool(const.get("USE_PDL")), f"{name} {const}"
        if name == "_v4_store_kernel":  # the Hopper path uses the hardware; the portable one never does
            hw = const["NATIVE"]
            assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == (hw and const["ENC"] != 2), f"{name} {const}"
            assert ("set.ge.u32." in ptx) == (hw and const["ENC"] == 2), f"{name} {const}"
