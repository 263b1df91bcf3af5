"""Where the Triton FP8 kernels and the fused RoPE write let the next grid launch: the ``TRIGGER`` places of
:mod:`mlakv.kernels.triton.pdl`, read from their sm_90 PTX (compiled without a GPU).

Spec, per place (``griddepcontrol.launch_dependents`` = the trigger):
* ``entry``: the trigger, then the wait, then the first global load;
* ``wait``: the wait, then the trigger, then the first global load;
* ``end``: the wait before the first global load; no path of the control flow runs a global store
  after the trigger.
Each kernel waits and triggers exactly once. A place that is not one of these is refused by name.
"""

from __future__ import annotations

import pytest
from conftest import compile_in_subprocess

from mlakv.spec.tuning import TRIGGER_PLACES

_SCRIPT = r"""
import json, re, sys
from mlakv.kernels.triton import fp8, rope_write
from mlakv.testing.sm90 import compile_sm90

PT = dict(NOPE=512, NOPE_P2=512, ROPE=64, ROPE_P2=64)
DS = dict(TILES=4, TILES_P2=4, ROPE=64, ROPE_P2=64)
QI = dict(kv_row_stride=576, loc_stride=1, nope_row_stride=512, rope_row_stride=64, num_slots=5000, skip_slot=-1,
          n_loc=1000)
GI = dict(kv_row_stride=576, loc_stride=1, num_slots=5000, n_loc=1000, nope_out_stride=512, rope_out_stride=64)
QP = dict(kv_ptr="*u8", loc_ptr="*i64", nope_ptr="*i16", rope_ptr="*i16")
GP = dict(kv_ptr="*u8", loc_ptr="*i64", nope_out_ptr="*i16", rope_out_ptr="*i16")
KERNELS = {
    "quant_per_tensor": (fp8._quant_per_tensor_kernel, dict(QP, scale_ptr="*fp32"), QI,
                         dict(PT, ROWS=2, SRC_IS_BF16=True, NATIVE=True)),
    "quant_ds_mla": (fp8._quant_ds_mla_kernel, QP, dict(QI, kv_row_stride=656),
                     dict(DS, ROWS=2, SRC_IS_BF16=True, NATIVE=True, ALIGN4=True)),
    "dequant_per_tensor": (fp8._dequant_per_tensor_kernel, dict(GP, scale_ptr="*fp32"), GI,
                           dict(PT, ROWS=2, DST=0, NATIVE=True)),
    "dequant_ds_mla": (fp8._dequant_ds_mla_kernel, GP, dict(GI, kv_row_stride=656),
                       dict(DS, ROWS=2, DST=0, NATIVE=True, ALIGN4=True)),
    "rope_write_e4m3": (rope_write._rope_write_kernel,
                        dict(kv_ptr="*u8", loc_ptr="*i64", pos_ptr="*i64", cs_ptr="*fp32", k_nope_ptr="*i16",
                             k_pe_ptr="*i16", k_scale_ptr="*fp32", q_nope_ptr="*i16", q_pe_ptr="*i16", q_out_ptr="*u8",
                             q_scale_ptr="*fp32"),
                        dict(n=64, kv_stride=576, loc_stride=1, pos_stride=1, cs_stride=64, kn_stride=512,
                             kp_stride=64, qn_s0=8192, qn_s1=512, qp_s0=1024, qp_s1=64, qo_s0=9216, qo_s1=576,
                             num_slots=5000, max_pos=8192, skip_index=-1, dcp_world=1, dcp_rank=0),
                        dict(NOPE=512, NOPE_P2=512, HALF=32, HALF_P2=32, TILES_P2=4, FORMAT=1, SRC=0, NEOX=False,
                             Q_FP8=True, Q_ROWS=1, NATIVE=True, HEADS=16)),
}
def stores_reachable(lines, start):
    # the global stores that some path of the PTX's control flow runs after line `start`: a path goes on
    # to the next line, and also to a branch's label; an unconditional branch or a ret ends it
    label = {l.split(":")[0].strip(): i for i, l in enumerate(lines) if re.match(r"^\$L__BB\w+:", l.strip())}
    seen, todo, hits = set(), [start + 1], set()
    while todo:
        i = todo.pop()
        while i < len(lines) and i not in seen:
            seen.add(i)
            l = lines[i].strip()
            if re.search(r"\bst\.global", l):
                hits.add(i)
            b = re.match(r"^(@!?%p\w+\s+)?bra(\.uni)?\s+(\$L__BB\w+);", l)
            if b:
                todo.append(label[b.group(3)])
                if not b.group(1):
                    break
            if re.match(r"^(@!?%p\w+\s+)?ret;", l) and not l.startswith("@"):
                break
            i += 1
    return sorted(hits)
out = {}
for name in json.loads(sys.argv[1]):
    fn, ptrs, ints, consts = KERNELS[name]
    for trigger in range(3):
        opts = dict(enable_fp_fusion=False) if name.startswith("rope") else {}
        ptx = compile_sm90(fn, ptrs, ints, dict(consts, USE_PDL=True, TRIGGER=trigger), num_warps=2, int_type="i64",
                           **opts).asm["ptx"]
        lines = ptx.splitlines()
        at = lambda pat: [i for i, l in enumerate(lines) if re.search(pat, l)]
        trig = at(r"griddepcontrol\.launch_dependents")
        out[f"{name} {trigger}"] = dict(trigger=trig, wait=at(r"griddepcontrol\.wait"), ld=at(r"\bld\.global"),
                                        st=at(r"\bst\.global"), st_after_trigger=stores_reachable(lines, trig[0]))
print(json.dumps(out))
"""

KINDS = ["quant_per_tensor", "quant_ds_mla", "dequant_per_tensor", "dequant_ds_mla", "rope_write_e4m3"]


@pytest.fixture(scope="module")
def places() -> dict:
    return compile_in_subprocess(_SCRIPT, KINDS)


@pytest.mark.parametrize("place", TRIGGER_PLACES)
@pytest.mark.parametrize("kind", KINDS)
def test_the_trigger_sits_at_its_place(places, kind, place):
    p = places[f"{kind} {TRIGGER_PLACES.index(place)}"]
    assert len(p["trigger"]) == 1 and len(p["wait"]) == 1 and p["ld"] and p["st"]
    trigger, wait, first_load = p["trigger"][0], p["wait"][0], min(p["ld"])
    assert wait < first_load
    if place != "end":  # the control-flow walk finds the stores that do follow an early trigger
        assert p["st_after_trigger"] == p["st"], "the walk from the trigger missed stores"
    if place == "entry":
        assert trigger < wait
    elif place == "wait":
        assert wait < trigger < first_load
    else:  # no path of the control flow runs a store after the trigger (blocks may lie after it in the text)
        assert p["st_after_trigger"] == [], f"stores after the trigger at PTX lines {p['st_after_trigger']}"


def test_the_places_are_entry_wait_end():
    assert TRIGGER_PLACES == ("entry", "wait", "end")


@pytest.mark.parametrize("bad", ["late", "", "Entry", True])
def test_a_place_that_is_not_one_is_refused_by_name(bad):
    from mlakv.kernels.triton.pdl import trigger_code

    with pytest.raises(ValueError, match=r"trigger: expected one of \('entry', 'wait', 'end'\)"):
        trigger_code(bad)


@pytest.mark.parametrize("table", ["FP8_TRITON_STEPS", "ROPE_TRITON_STEPS"])
def test_every_table_row_names_a_place(table):
    from mlakv.spec import tuning

    assert {row[3] for rows in getattr(tuning, table).values() for row in rows} <= set(TRIGGER_PLACES)
