"""The Triton V4-family store at every launch shape: several tokens per program, bit-exact.

The store handles ``T`` tokens per program as one ``[T, 512]`` block (``rows_per_program``), so the
edges are a program's: a call whose ``n`` is not a multiple of ``T`` (the last program's extra rows
re-read the last token and store nothing), a program whose tokens land on different pages (and on
the first and last row of a page), a program mixing kept tokens with padding, the reserved slot,
other DCP ranks' slots and slots past the pages, and a program where only one token holds a NaN or
an infinity (the NaN/inf rewrite is a program-wide branch: it must change that token's special tiles
only). The fp4 layouts read the tokens as 4-byte (even, odd) words when ``kv`` allows it and as
16-bit values otherwise: both are checked. Every destination is poisoned first and compared with the
reference (:mod:`mlakv.ops.v4_reference`) on the CPU.

On CPU the kernels run under the Triton interpreter (few tokens); on a GPU every shape of the launch
table and of the bench's sweep runs at a few thousand tokens, where the compiled paths differ (the
hardware e4m3 conversion, packed half compares for fp4 on sm_90). A CPU test also compiles the
hardware-conversion kernels for sm_90 at every launch shape and looks for the e4m3 pack that ptxas
12.8/12.9 miscompiles (see :mod:`mlakv.kernels.triton.fp8`).
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_pages_equal, compile_in_subprocess, DEVICE, e4m3_pair_repacks, HAS_CUDA, stale_e4m3_merges
from mlakv.ops import v4_reference as R
from mlakv.spec.calls import V4StoreCall
from mlakv.spec.tuning import V4_TRITON_STEPS, V4_TRITON_SWEEP, v4_triton_launch
from test_v4_store import expected_after, poisoned_pages, random_loc, rope_inputs, tokens

pytest.importorskip("triton", reason="triton is not installed")

LAYOUTS = list(R.V4_LAYOUTS)
PAGE_SIZE = 64 if HAS_CUDA else 4
#: launch shapes (num_warps, tokens per program): every one of the table and the sweep on a GPU; on
#: CPU (the interpreter ignores warps) one per tokens-per-program count
SHAPES = sorted({(w, t) for steps in V4_TRITON_STEPS.values() for _, w, t, _ in steps} | set(V4_TRITON_SWEEP))
if not HAS_CUDA:
    SHAPES = sorted({t: (w, t) for w, t in SHAPES if t <= 8}.values())


def _store(pages, loc, kv, layout, page_size, shape, **kw):
    from mlakv.kernels.triton.v4_store import ENCODINGS, launch_v4_store

    warps, per_program = shape
    g = R.v4_geometry(layout)
    skip = kw.pop("reserved_skip_index", None)
    call = V4StoreCall(pages, loc, kv, kw.get("freqs_cis"), kw.get("positions"), kw.get("cos_sin_cache"),
                       -1 if skip is None else skip, kw.get("dcp_world_size", 1), kw.get("dcp_rank", 0))  # fmt: skip
    launch_v4_store(call, encoding=ENCODINGS[g.encoding], **g.kernel_geometry(page_size), num_warps=warps,
                    rows_per_program=per_program)  # fmt: skip
    if HAS_CUDA:
        torch.cuda.synchronize()


def store_and_check(layout, pages, loc, kv, shape, page_size=PAGE_SIZE, **kw):
    expected = expected_after(pages, loc, kv, layout, page_size, **kw)
    _store(pages, loc, kv, layout, page_size, shape, **kw)
    assert_pages_equal(pages, expected)


def _n_for(per_program: int) -> int:
    """A token count that is not a multiple of the tokens per program (GPU: thousands of tokens)."""
    return 4100 + per_program // 2 if HAS_CUDA else 2 * per_program + 1


def _ids(shape) -> str:
    return f"w{shape[0]}t{shape[1]}"


# ---- the launch table ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [0, 1, 2])
def test_launch_table_covers_every_n_with_power_of_two_blocks(encoding):
    steps = V4_TRITON_STEPS[encoding]
    assert steps[-1][0] is None
    bounds = [s[0] for s in steps[:-1]]
    assert bounds == sorted(bounds)
    for n in (1, 64, 65, 1024, 1025, 1 << 20):
        warps, per_program, _ = v4_triton_launch(n, encoding)
        assert (warps, per_program) in {(w, t) for _, w, t, _ in steps}
    for warps, per_program in {(w, t) for _, w, t, _ in steps} | set(V4_TRITON_SWEEP):
        assert warps in (1, 2, 4, 8) and per_program & (per_program - 1) == 0
        assert per_program * 512 // (32 * warps) >= 16, "a thread holds at least one 16-byte load of a token"


def test_tokens_per_program_must_be_a_power_of_two():
    pages = poisoned_pages(2, "v41", PAGE_SIZE)
    with pytest.raises(ValueError, match="power of two"):
        _store(pages, random_loc(3, 2 * PAGE_SIZE), tokens("random", 3, torch.bfloat16), "v41", PAGE_SIZE, (1, 3))


# ---- several tokens per program ------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_partial_last_program_and_page_boundaries(layout, shape):
    """n not a multiple of the tokens per program; consecutive tokens cross pages (first and last rows)."""
    n = _n_for(shape[1])
    num_pages = n // PAGE_SIZE + 3
    pages = poisoned_pages(num_pages, layout, PAGE_SIZE)
    start = PAGE_SIZE - 2  # the first program's tokens: the last rows of page 0, then page 1
    loc = torch.arange(start, start + n, device=DEVICE)
    store_and_check(layout, pages, loc, tokens("random", n, torch.bfloat16, shape[1]), shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["v4", "v41", "v41_fp4"])
def test_random_slots_both_dtypes(layout, shape, dtype):
    n = _n_for(shape[1])
    num_pages = n // PAGE_SIZE + 2
    pages = poisoned_pages(num_pages, layout, PAGE_SIZE)
    store_and_check(layout, pages, random_loc(n, num_pages * PAGE_SIZE, seed=n), tokens("random", n, dtype, 3), shape)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["v4", "v41_new", "v41_fp4"])
def test_programs_mixing_kept_and_skipped_tokens(layout, shape):
    """Padding, the reserved slot and slots past the pages next to kept tokens in one program."""
    n = _n_for(shape[1])
    wide = poisoned_pages(n // PAGE_SIZE + 3, layout, PAGE_SIZE)
    pages = wide[:-1]  # a view: the last page lies just past it
    after = wide[-1].clone()
    num_slots = pages.shape[0] * PAGE_SIZE
    loc = random_loc(n, num_slots - 1, seed=5) + 1  # slot 0 is the reserved one, never drawn
    loc[1::3] = -1
    loc[2::5] = 0
    loc[4::7] = num_slots + 3  # unchecked: skipped
    store_and_check(layout, pages, loc, tokens("random", n, torch.bfloat16, 6), shape, reserved_skip_index=0)
    assert torch.equal(wide[-1], after)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["v41", "v41_fp4_new"])
def test_dcp_owner_rule_inside_a_program(layout, shape, rank):
    n = _n_for(shape[1])
    pages = poisoned_pages(n // PAGE_SIZE + 2, layout, PAGE_SIZE)
    loc = random_loc(n, 2 * pages.shape[0] * PAGE_SIZE, seed=7)
    store_and_check(layout, pages, loc, tokens("random", n, torch.bfloat16, 7), shape, dcp_world_size=2, dcp_rank=rank)


@pytest.mark.parametrize("case", ["nan", "inf", "mixed"])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[1] > 1], ids=_ids)
@pytest.mark.parametrize("layout", ["v4", "v41", "v41_fp4"])
def test_one_special_token_among_finite_ones(layout, shape, case):
    """Only one token of a program holds NaN / inf: the program-wide rewrite keeps the others' bytes."""
    n = _n_for(shape[1])
    pages = poisoned_pages(n // PAGE_SIZE + 2, layout, PAGE_SIZE)
    kv = tokens("random", n, torch.bfloat16, 8)
    special = tokens(case, n, torch.bfloat16, 9)
    kv[1::7] = special[1::7]  # one token in seven, so most programs hold one or two
    store_and_check(layout, pages, random_loc(n, pages.shape[0] * PAGE_SIZE, seed=8), kv, shape)


@pytest.mark.parametrize("mode", ["freqs_cis", "positions"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("layout", ["v4", "v41", "v41_fp4_new"])
def test_rope_inside_a_program(layout, shape, mode):
    n = _n_for(shape[1])
    pages = poisoned_pages(n // PAGE_SIZE + 2, layout, PAGE_SIZE)
    rope = rope_inputs(n, mode, 10)
    if mode == "positions":
        rope["positions"][2::5] = 97  # outside the table: that token is skipped
    kv = tokens("mixed", n, torch.float16, 11)
    kv[::2] = tokens("random", n, torch.float16, 12)[::2]
    store_and_check(layout, pages, random_loc(n, pages.shape[0] * PAGE_SIZE, seed=10), kv, shape, **rope)


@pytest.mark.parametrize("layout", ["v41_fp4", "v41_fp4_new", "v41"])
def test_tokens_not_four_byte_aligned(layout):
    """A 2-byte offset (and an odd row stride): the fp4 store reads 16-bit values, not words."""
    n = _n_for(4)
    base = tokens("random", n, torch.bfloat16, 13)
    wide = torch.zeros(n, 515, dtype=torch.bfloat16, device=DEVICE)
    wide[:, 1:513] = base
    kv = wide[:, 1:513]  # data_ptr % 4 == 2, row stride 515
    assert kv.data_ptr() % 4 == 2 and kv.stride(0) % 2 == 1
    pages = poisoned_pages(n // PAGE_SIZE + 2, layout, PAGE_SIZE)
    store_and_check(layout, pages, random_loc(n, pages.shape[0] * PAGE_SIZE, seed=13), kv, (1, 4))


# ---- compiled for sm_90: the hardware e4m3 conversion is never packed the way ptxas miscompiles ----

_SASS_SCRIPT = r"""
import json, sys
from mlakv.kernels.triton import v4_store as m
from mlakv.testing.sm90 import compile_sm90, sass_of

ptrs = dict(pages_ptr="*u8", loc_ptr="*i64", kv_ptr="*i16", cs_ptr="*fp32", pos_ptr="*i64")
ints = dict(page_stride=33792, num_slots=65600, loc_stride=1, kv_stride=512, cs_stride=64, pos_stride=1,
            max_pos=4096, skip_index=-1, dcp_world=1, dcp_rank=0, n=65536)
out = []
for warps, consts in json.loads(sys.argv[1]):
    k = compile_sm90(m._v4_store_kernel, ptrs, ints, consts, int_type="i64", num_warps=warps, enable_fp_fusion=False)
    out.append([warps, consts, k.asm["ptx"], sass_of(k)])
print(json.dumps(out))
"""


def _sass_cases() -> list:
    geometry = {0: dict(DATA_STRIDE=576, SCALE_BASE=64 * 576, SCALE_STRIDE=8),
                1: dict(DATA_STRIDE=512, SCALE_BASE=64 * 512, SCALE_STRIDE=16)}  # fmt: skip
    shapes = sorted({(w, t) for steps in V4_TRITON_STEPS.values() for _, w, t, _ in steps} | set(V4_TRITON_SWEEP))
    cases = []
    for enc in (0, 1):
        for i, (warps, per_program) in enumerate(shapes):
            rope = (0, 1, 2)[i % 3] if enc == 1 else 0  # the RoPE tail's conversions too, at some shapes
            consts = dict(ENC=enc, PAGE_SIZE=64, IS_BF16=True, ROPE=rope, TOKENS=per_program, NATIVE=True, PACKED=True,
                          PAIRS=True, DCP=False, USE_PDL=True, EARLY_TRIGGER=True, **geometry[enc])  # fmt: skip
            cases.append([warps, consts])
    return cases


def test_hardware_e4m3_bytes_are_not_repacked_for_ptxas():
    """The sm_90 store with the hardware e4m3 conversion, at every launch shape of the table and the
    sweep: no e4m3 pair packed with a value computed from itself (the PTX ptxas 12.8/12.9 miscompiles),
    and where Triton ships nvdisasm, no conversion in the machine code merging a shift made before it."""

    pytest.importorskip("triton.backends.nvidia", reason="triton's CUDA backend is not installed")

    cases = _sass_cases()
    compiled = compile_in_subprocess(_SASS_SCRIPT, cases)
    assert len(compiled) == len(cases)
    bad = []
    for warps, consts, ptx, sass in compiled:
        where = f"enc={consts['ENC']} warps={warps} tokens={consts['TOKENS']} rope={consts['ROPE']}"
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, where
        bad += [f"{where}: PTX {r}" for r in e4m3_pair_repacks(ptx)]
        bad += [f"{where}: SASS {r}" for r in stale_e4m3_merges(sass or "")]
    assert not bad, bad
