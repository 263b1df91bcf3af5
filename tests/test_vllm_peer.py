"""vLLM's own cache kernels as a benchmark peer, and the vLLM face benchmark's CPU-testable parts.

Spec:
* the fetcher keeps ``csrc/cache_kernels.cu`` and exactly the headers it reaches through
  ``#include "..."`` (relative to the including file, then ``csrc``), replacing what a previous fetch
  left, and names the includes it cannot resolve;
* the loader finds the fetched source (``MLAKV_VLLM_SRC`` first), says why when it is absent or
  incomplete, binds the ops the source defines (a body, not a declaration), declares each with a
  parameter list that agrees with its schema, and builds with vLLM's flags (torch's half
  conversions switched back on, one arch-specific target, the stable-ABI target version);
* with nvcc and the fetched source, the binding and vLLM's unchanged ``cache_kernels.cu`` compile
  with those flags, and every op the binding declares is defined in the kernels' object under the
  same (mangled) name — what the extension's link needs;
* the bench: every op's call is valid for the face and writes its destinations, each calls the vLLM
  function it names with an argument count vLLM's schema accepts, providers are selected (vLLM
  dropped with the reason when it cannot be built), mismatches are described by bytes and rows, and
  the report tabulates both providers, their ratio and the issue's goals.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import require_jit_toolchain, requires_sm90, write_tar_gz
from mlakv.bench import vllm_ops as B
from mlakv.bench import vllm_peer as P
from mlakv.compat import fetch_vllm_tests as F
from mlakv.compat import vllm as V
from mlakv.kernels.cuda.loader import JitUnavailable

# ---- a fake vLLM csrc tree -------------------------------------------------------------------------

_CSRC = {
    "cache_kernels.cu": (
        '#include "torch_utils.h"\n#include "quant/fp8/utils.cuh"\n#include <torch/csrc/stable/tensor.h>\n'
        '#if defined(ENABLE_X)\n  #include "only_if_x.h"\n#endif\n#include "missing.h"\n'
        "void cp_gather_cache(int a) {}\n"
    ),
    "torch_utils.h": '#pragma once\n#include "core/utils.hpp"\n',
    "core/utils.hpp": '#pragma once\n#include "../torch_utils.h"\n',  # a cycle, through a relative path
    "quant/fp8/utils.cuh": '#include "vec.cuh"\n#include "core/utils.hpp"\n',  # one beside it, one from csrc
    "quant/fp8/vec.cuh": "// leaf\n",
    "only_if_x.h": "// conditional\n",
    "unrelated.cuh": "// not included by anything\n",
    "other_kernels.cu": '#include "unrelated.cuh"\n',
}
_CLOSURE = ["cache_kernels.cu", "torch_utils.h", "quant/fp8/utils.cuh", "only_if_x.h", "core/utils.hpp",
            "quant/fp8/vec.cuh"]  # fmt: skip

_TESTS = '''import pytest


def test_mla_one():
    assert True
'''
_COMPRESSOR = '''import pytest


@pytest.mark.parametrize("x", [1])
def test_indexer_quant_cache_roundtrip(x):
    assert x == 1
'''


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _sdist(tmp_path: Path, csrc: dict[str, str], version: str = "9.9.9") -> Path:
    top = f"vllm-{version}"
    files = {f"{top}/tests/kernels/attention/test_cache.py": _TESTS,
             f"{top}/tests/kernels/test_compressor_kv_cache.py": _COMPRESSOR, f"{top}/setup.py": ""}  # fmt: skip
    files.update({f"{top}/csrc/{k}": v for k, v in csrc.items()})
    path = tmp_path / f"{top}.tar.gz"
    write_tar_gz(path, files)
    return path


def _files_under(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}


# ---- the fetcher ----------------------------------------------------------------------------------


def test_include_closure_follows_quoted_includes_relative_then_from_csrc(tmp_path):
    csrc = _write_tree(tmp_path / "csrc", _CSRC)
    files, unresolved = F.include_closure(csrc)
    assert files[0] == "cache_kernels.cu"
    assert sorted(files) == sorted(_CLOSURE)
    assert unresolved == ["cache_kernels.cu: missing.h"]


def test_fetch_keeps_the_kernel_source_and_exactly_its_include_closure(tmp_path, capsys):
    dest = F.fetch("9.9.9", tmp_path / "peer", sdist=_sdist(tmp_path, _CSRC))
    assert _files_under(dest / "csrc") == set(_CLOSURE)
    for rel in _CLOSURE:
        assert (dest / "csrc" / rel).read_text() == _CSRC[rel]  # unchanged
    assert (dest / "tests/kernels/attention/test_cache.py").read_text() == _TESTS
    assert "missing.h" in capsys.readouterr().err  # the unresolved include is named


def test_a_second_fetch_replaces_the_kernel_sources(tmp_path):
    dest = tmp_path / "peer"
    F.fetch("9.9.9", dest, sdist=_sdist(tmp_path, _CSRC))
    lean = {"cache_kernels.cu": '#include "torch_utils.h"\n', "torch_utils.h": "// no includes\n"}
    (tmp_path / "v2").mkdir()
    F.fetch("9.9.8", dest, sdist=_sdist(tmp_path / "v2", lean, "9.9.8"))
    assert _files_under(dest / "csrc") == {"cache_kernels.cu", "torch_utils.h"}


# ---- finding the source -------------------------------------------------------------------------


@pytest.fixture
def only_env_peer(monkeypatch, tmp_path):
    """The loader looks only at ``MLAKV_VLLM_SRC`` (set to ``tmp_path / 'peer'``)."""
    peer = tmp_path / "peer"
    monkeypatch.setenv("MLAKV_VLLM_SRC", str(peer))
    monkeypatch.setattr(P, "candidate_dirs", lambda: [peer])
    return peer


def test_mlakv_vllm_src_is_looked_at_first(monkeypatch, tmp_path):
    monkeypatch.setenv("MLAKV_VLLM_SRC", str(tmp_path / "x"))
    dirs = P.candidate_dirs()
    assert dirs[0] == tmp_path / "x" and dirs[1] == Path.cwd() / ".peers" / "vllm"


def test_an_absent_source_is_named_with_the_fetch_command(only_env_peer):
    assert P.peer_dir() is None
    reason = P.peer_absent_reason()
    assert str(only_env_peer) in reason and "fetch_vllm_tests" in reason


def test_an_incomplete_source_names_the_missing_header(only_env_peer):
    _write_tree(only_env_peer / "csrc", {k: v for k, v in _CSRC.items() if k != "quant/fp8/vec.cuh"})
    reason = P.peer_absent_reason()
    assert reason is not None and "vec.cuh" in reason


def test_a_complete_source_is_found(only_env_peer):
    _write_tree(only_env_peer / "csrc", {k: v.replace('#include "missing.h"\n', "") for k, v in _CSRC.items()})
    assert P.peer_dir() == only_env_peer and P.peer_absent_reason() is None


def test_loading_without_the_source_raises_jit_unavailable_with_the_reason(only_env_peer, monkeypatch):
    monkeypatch.setenv("TVM_FFI_CUDA_ARCH_LIST", "9.0a")
    with pytest.raises(JitUnavailable, match="fetch_vllm_tests"):
        P.load_vllm_peer(build_dir=only_env_peer.parent / "build")


# ---- the binding ----------------------------------------------------------------------------------


def test_defined_ops_counts_bodies_not_declarations():
    src = (
        "void swap_blocks(torch::stable::Tensor& src,\n    int64_t n);  // a declaration\n"
        "void cp_gather_cache(const T& a, // comment (with parens)\n    int64_t b) /* c */ {\n}\n"
        "  void indexer_k_quant_and_cache(int a) {}\n"  # not at file scope's start of line
        "void concat_and_cache_mla_grouped(int a) {}\n"  # another op's name as a prefix
    )
    assert P.defined_ops(src) == ["cp_gather_cache"]


_CXX_OF = {"Tensor": "Tensor&", "Tensor!": "Tensor&", "Tensor?": "std::optional", "int": "int64_t",
           "str": "std::string", "bool": "bool"}  # fmt: skip


@pytest.mark.parametrize("name", sorted(P.PEER_OPS))
def test_each_declaration_agrees_with_its_schema(name):
    op = P.PEER_OPS[name]
    params = [p.strip() for p in re.split(r",(?![^<]*>)", op.params)]
    args = [a.strip() for a in op.schema[1 : op.schema.rindex(") ->")].split(",")]
    assert len(params) == len(args)
    for param, arg in zip(params, args):
        want = _CXX_OF[arg.split()[0]]
        assert want.split("&")[0] in param and (not want.endswith("&") or "&" in param), (param, arg)


def test_binding_declares_and_registers_the_ops_it_is_given():
    text = P.binding_source(["cp_gather_cache", "swap_blocks"])
    for name in ("cp_gather_cache", "swap_blocks"):
        assert f"void {name}({P.PEER_OPS[name].params});" in text
        assert f'm.def("{name}{P.PEER_OPS[name].schema}");' in text
        assert f'm.impl("{name}", TORCH_BOX(&{name}));' in text
    assert "concat_and_cache_mla" not in text
    assert f"STABLE_TORCH_LIBRARY({P.NAMESPACE}, m)" in text and f"STABLE_TORCH_LIBRARY_IMPL({P.NAMESPACE}, CUDA, m)" in text
    with pytest.raises(ValueError, match="reshape_and_cache"):
        P.binding_source(["reshape_and_cache"])


@pytest.mark.parametrize("where", ["include", "targets/x86_64-linux/include", None])
def test_the_cublas_stand_in_is_written_only_when_the_toolkit_lacks_the_header(tmp_path, where):
    if where is not None:
        _write_tree(tmp_path, {f"{where}/cublas_v2.h": "// real\n"})
    stubs = P.stub_headers(tmp_path)
    assert (stubs == {}) == (where is not None)
    if where is None:
        assert "cublasHandle_t" in stubs["cublas_v2.h"]


@pytest.mark.parametrize("arch,flag", [("9.0a", "compute_90a,code=sm_90a"), ("10.0a;9.0a", "compute_100a,code=sm_100a"),
                                       ("8.9", "compute_89,code=sm_89")])  # fmt: skip
def test_one_gencode_target_per_build(arch, flag):
    assert P.gencode_flag(arch) == f"-gencode=arch={flag}"


def test_a_bad_arch_is_refused():
    with pytest.raises(ValueError, match="arch"):
        P.gencode_flag("sm90")


def test_nvcc_flags_undo_torchs_half_restrictions_and_target_the_stable_abi():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    flags = P.nvcc_flags("9.0a")
    for d in [f for f in COMMON_NVCC_FLAGS if f.startswith("-D__CUDA_NO_")]:
        assert "-U" + d[2:] in flags, d
    assert {"-DENABLE_FP8", "-DUSE_CUDA", "-std=c++20", f"-DTORCH_TARGET_VERSION={P.TORCH_TARGET_VERSION}"} <= set(flags)
    assert sum(f.startswith("-gencode") for f in flags) == 1
    assert not any("fast_math" in f or "fast-math" in f for f in flags)


def test_prepare_build_binds_the_defined_ops_and_keeps_an_unchanged_binding(only_env_peer, tmp_path):
    _write_tree(only_env_peer / "csrc", {"cache_kernels.cu": "void swap_blocks(int a) {}\nvoid cp_gather_cache(int b) {}\n"})
    plan = P.prepare_build(tmp_path / "build")
    assert plan.ops == ("cp_gather_cache", "swap_blocks")
    assert plan.kernels == only_env_peer / "csrc" / "cache_kernels.cu"
    assert plan.include_dirs[0] == only_env_peer / "csrc"
    stamp = plan.binding.stat().st_mtime_ns
    os.utime(plan.binding, ns=(stamp - 10**9, stamp - 10**9))
    P.prepare_build(tmp_path / "build")
    assert plan.binding.stat().st_mtime_ns == stamp - 10**9  # same text: not rewritten (the build stays cached)


def test_a_source_without_the_ops_is_refused(only_env_peer, tmp_path):
    _write_tree(only_env_peer / "csrc", {"cache_kernels.cu": "void something_else() {}\n"})
    with pytest.raises(JitUnavailable, match="defines none of"):
        P.prepare_build(tmp_path / "build")


# ---- the real source compiles (nvcc; the fetched peer) -----------------------------------------------


@pytest.mark.jit_build
def test_vllms_cache_kernels_and_the_binding_compile_and_agree_on_every_symbol(tmp_path):
    require_jit_toolchain()
    if P.peer_absent_reason() is not None:
        pytest.skip(P.peer_absent_reason())
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    binding, kernels = P.compile_objects(tmp_path, arch="9.0a")

    def symbols(obj: Path, kind: str) -> set[str]:
        out = subprocess.run(["nm", kind, str(obj)], capture_output=True, text=True, check=True).stdout
        return {line.split()[-1] for line in out.splitlines() if line.strip()}

    plan_ops = P.defined_ops((P.peer_dir() / F.KERNEL_SOURCE).read_text())
    assert set(plan_ops) == set(P.PEER_OPS)  # vLLM 0.33.0 defines all seven
    needed = {s for s in symbols(binding, "--undefined-only") if any(op in s for op in plan_ops)}
    assert len(needed) == len(plan_ops)
    missing = needed - symbols(kernels, "--defined-only")
    assert not missing, f"the binding declares what cache_kernels.cu does not define: {missing}"


# ---- the bench --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_case():
    return B.make_case(8, "cpu", torch.Generator().manual_seed(5))


@pytest.mark.parametrize("op", list(B.OPS))
def test_each_bench_call_is_valid_for_the_face_and_writes_every_destination_row(small_case, op):
    fn, written = B.calls(V)[op]
    after = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in small_case.items()}
    fn(after)
    for w in written:
        before, now = small_case[w].view(torch.uint8), after[w].view(torch.uint8)
        if op == "swap_blocks":  # only the mapped blocks
            rows = small_case["mapping"][:, 1]
            before, now = before[rows], now[rows]
        elif w == "idx_cache":  # a page of 64 keys of 128 bytes, then their scales: each slot's key bytes
            slot = small_case["slot"]
            page, at = slot // 64, (slot % 64)[:, None] * 128 + torch.arange(128)
            before, now = before.flatten(1)[page[:, None], at], now.flatten(1)[page[:, None], at]
        elif w in ("auto", "fp8", "ds"):  # a cache of one entry per slot: the written slots
            before, now = before.flatten(0, 1)[small_case["slot"]], now.flatten(0, 1)[small_case["slot"]]
        changed = (before.reshape(before.shape[0], -1) != now.reshape(now.shape[0], -1)).any(1)
        assert bool(changed.all()), f"{op}: {w} rows left as they were: {(~changed).nonzero().flatten().tolist()}"
    assert B.check_provider(fn, written, small_case, after) is None


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


@pytest.mark.parametrize("op", list(B.OPS))
def test_each_bench_call_names_its_vllm_function_with_an_argument_count_the_schema_accepts(small_case, op):
    rec = _Recorder()
    B.calls(rec)[op][0](small_case)
    ((name, args),) = rec.calls
    assert name == B.OP_FUNCTIONS[op]
    schema_args = P.PEER_OPS[name].schema[1 : P.PEER_OPS[name].schema.rindex(") ->")].split(",")
    required = sum("=" not in a for a in schema_args)
    assert required <= len(args) <= len(schema_args)


@pytest.mark.parametrize(
    "requested,error,providers,note",
    [
        (["mlakv", "vllm"], None, ["mlakv", "vllm"], "built"),
        (["mlakv", "vllm"], "no nvcc", ["mlakv"], "not built: no nvcc"),
        (["vllm", "mlakv"], None, ["vllm", "mlakv"], "built"),
        (["mlakv"], "no nvcc", ["mlakv"], "not requested"),
        (["vllm"], "absent", [], "not built: absent"),
    ],
)
def test_providers_are_selected_and_vllm_dropped_with_the_reason(requested, error, providers, note):
    assert B.select_providers(requested, error) == (providers, note)


@pytest.mark.parametrize("bad", [[], ["sglang"], ["mlakv", "mlakv"]])
def test_unknown_or_repeated_providers_are_refused(bad):
    with pytest.raises(ValueError, match="providers"):
        B.select_providers(bad, None)


def test_mismatch_summary_names_bytes_rows_and_the_first_difference():
    want = torch.randn(4, 8).to(torch.bfloat16)
    assert B.mismatch_summary(want.clone(), want) is None
    got = want.clone()
    got.view(torch.uint8)[2, 5] ^= 1
    got.view(torch.uint8)[3, 0] ^= 1
    msg = B.mismatch_summary(got, want)
    assert msg.startswith("2 of 64 bytes differ in 2 of 4 rows; first at row 2, byte 5")
    assert "shape" in B.mismatch_summary(want[:2], want)


def test_check_provider_reports_a_wrong_write_and_a_raising_call(small_case):
    fn, written = B.calls(V)["cp_gather_cache"]
    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in small_case.items()}
    fn(ref)

    def off_by_one(d):
        fn(d)
        d["out"].view(torch.uint8)[1, 3] += 1

    assert B.check_provider(off_by_one, written, small_case, ref).startswith("out: 1 of ")

    def refuses(d):
        raise RuntimeError("kv_cache.size(2) must be 656 bytes\nmore")

    assert B.check_provider(refuses, written, small_case, ref) == "raised RuntimeError: kv_cache.size(2) must be 656 bytes"


def _report(providers, vllm_rows=True):
    rows = []
    for n, (m_us, v_us) in {1: (2.0, 3.0), 65536: (100.0, 90.0)}.items():
        r = {"n": n, "op": "concat auto", "bytes": 2304 * n,
             "mlakv": {"status": "ok", "us": m_us, "gbs": 2304 * n / m_us / 1e3, "pct_copy_bw": 90.0 if n > 1 else 1.0}}  # fmt: skip
        if "vllm" in providers:
            r["vllm"] = {"status": "ok", "us": v_us, "gbs": 2304 * n / v_us / 1e3, "pct_copy_bw": 95.0}
            r["vllm_over_mlakv"] = v_us / m_us
        rows.append(r)
    if "vllm" in providers:
        rows.append({"n": 64, "op": "gather fp8", "bytes": 1728 * 64,
                     "mlakv": {"status": "ok", "us": 2.0, "gbs": 55.0, "pct_copy_bw": 1.3},
                     "vllm": {"status": "WRONG", "mismatch": "out: 3 of 9 bytes differ"}})  # fmt: skip
    note = "built from .peers/vllm" if "vllm" in providers else "not built: nvcc not found"
    return {"device": "H200", "copy_bandwidth_gbs": 4200.0, "providers": providers, "vllm_kernels": note, "rows": rows}


def test_the_table_puts_both_providers_their_ratio_and_the_goals_side_by_side():
    report = _report(["mlakv", "vllm"])
    report["summary"] = B.summarize(report)
    assert report["summary"]["concat auto"] == {"mlakv_at_or_below_vllm": False, "ns_compared": [1, 65536],
                                                "slower_at": [65536], "pct_copy_bw_at_65536": 90.0,
                                                "meets_85pct": True}  # fmt: skip
    assert report["summary"]["gather fp8"]["mlakv_at_or_below_vllm"] is None
    text = B.format_table(report)
    assert "| op | n | mlakv µs | vLLM µs | vLLM / mlakv | mlakv % copy bw | vLLM % copy bw |" in text
    assert "| concat auto | 1 | 2.00 | 3.00 | 1.50 | 1.0 | 95.0 |" in text
    assert "| concat auto | 65536 | 100.00 | 90.00 | 0.90 | 90.0 | 95.0 |" in text
    assert "| gather fp8 | 64 | 2.00 | WRONG |  | 1.3 | WRONG |" in text
    assert "- vllm gather fp8 n=64: out: 3 of 9 bytes differ" in text
    assert "| concat auto | no (slower at n = 65536) | 90.0 |" in text
    assert "vLLM's kernels: built from .peers/vllm" in text


def test_a_report_without_vllm_says_why_and_has_no_ratio_column():
    text = B.format_table(_report(["mlakv"]))
    assert "vLLM's kernels: not built: nvcc not found" in text
    assert "vLLM / mlakv" not in text and "| concat auto | 1 | 2.00 | 1.0 |" in text
    assert "| concat auto | not compared | 90.0 |" in text


def test_the_bench_refuses_unknown_providers_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--providers", "mlakv,trt"])
    assert e.value.code == 2 and "--providers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_the_bench_needs_a_gpu(capsys):
    assert B.main(["--sizes", "1"]) == 1 and "needs a CUDA GPU" in capsys.readouterr().out


def _fake_peer():
    """vLLM's ops as the face's, but one writes a wrong byte and one is missing (an older vLLM)."""
    import types

    def cp_gather_cache(src_cache, dst, *rest):
        V.cp_gather_cache(src_cache, dst, *rest)
        dst.view(torch.uint8)[0, 0] ^= 0x40

    names = {n for n in P.PEER_OPS if n not in ("swap_blocks", "cp_gather_cache")}
    return types.SimpleNamespace(cp_gather_cache=cp_gather_cache, **{n: getattr(V, n) for n in names})


@pytest.fixture
def fixed_clock(monkeypatch):
    from mlakv.bench import timing

    monkeypatch.setattr(timing, "copy_bandwidth_gbs", lambda: 4000.0)
    monkeypatch.setattr(timing, "graph_median_us", lambda body, calls=1: 2.0)
    monkeypatch.setattr(timing, "event_median_us", lambda fn: 4.0)


def test_a_run_checks_then_times_both_providers_and_marks_wrong_and_absent_ops(fixed_clock):
    report = B.run([8], ["cp_gather", "swap", "indexer gather"], ["mlakv", "vllm"], device="cpu", load_peer=_fake_peer)
    rows = {r["op"]: r for r in report["rows"]}
    assert list(rows) == ["cp_gather_cache", "swap_blocks", "indexer gather"]
    assert report["providers"] == ["mlakv", "vllm"] and report["vllm_kernels"].startswith("built (vLLM's source, unchanged")
    assert all(r["mlakv"]["status"] == "ok" for r in rows.values())
    assert rows["cp_gather_cache"]["vllm"]["status"] == "WRONG"
    assert rows["cp_gather_cache"]["vllm"]["mismatch"].startswith("out: 1 of ")
    assert rows["swap_blocks"]["vllm"] == {"status": "absent"}
    assert rows["indexer gather"]["vllm_over_mlakv"] == 1.0 and rows["indexer gather"]["vllm"]["us"] == 2.0
    assert rows["swap_blocks"]["mlakv"]["us"] == 4.0  # eager, CUDA events
    assert report["summary"]["indexer gather"]["mlakv_at_or_below_vllm"] is True
    assert "WRONG" in B.format_table(report)


def test_each_op_is_checked_on_fresh_inputs_after_earlier_ops_timed_writes_into_the_sets(monkeypatch):
    """Timing runs the writes into the input sets; a later gather is still checked against inputs as
    the reference saw them (every op of the mlakv face equals its own CPU path)."""
    from mlakv.bench import timing

    def run_body(body, calls=1):
        body()  # what timing does: the writes land in the sets
        return 2.0

    monkeypatch.setattr(timing, "copy_bandwidth_gbs", lambda: 4000.0)
    monkeypatch.setattr(timing, "graph_median_us", run_body)
    monkeypatch.setattr(timing, "event_median_us", lambda fn: (fn(), 4.0)[1])
    report = B.run([64], ["concat auto", "gather auto", "cp_gather", "swap"], ["mlakv"], device="cpu")
    assert [r["mlakv"]["status"] for r in report["rows"]] == ["ok"] * 4, [r["mlakv"] for r in report["rows"]]


def test_a_sweep_times_each_byte_gather_at_every_launch_shape_and_restores_the_table(fixed_clock):
    from mlakv.spec import tuning

    launch = tuning.paged_gather_launch
    report = B.run([8], ["cp_gather", "indexer store"], ["mlakv"], device="cpu", sweep=True)
    rows = {r["op"]: r for r in report["rows"]}
    shapes = [f"r{r}w{w}" for r, w in tuning.PAGED_GATHER_SWEEP]
    assert rows["cp_gather_cache"]["sweep"] == {k: 2.0 for k in shapes}
    assert "sweep" not in rows["indexer store"]  # not a byte gather
    assert tuning.paged_gather_launch is launch
    text = B.format_table(report)
    assert "| op | n | " + " | ".join(shapes) + " | fastest |" in text
    assert "| cp_gather_cache | 8 | " + " | ".join(["2.00"] * len(shapes)) + f" | {shapes[0]} |" in text


def test_a_forced_gather_launch_is_what_the_launch_table_says_inside_and_undone_after():
    from mlakv.spec import tuning

    before = tuning.paged_gather_launch(65536, 1152)
    with B.forced_gather_launch(16, 8):
        assert tuning.paged_gather_launch(1, 132) == tuning.paged_gather_launch(65536, 1152) == (16, 8)
    assert tuning.paged_gather_launch(65536, 1152) == before


def test_a_run_whose_peer_cannot_be_built_times_mlakv_alone_and_says_why(fixed_clock):
    def no_peer():
        raise JitUnavailable("nvcc not found")

    saved = []
    report = B.run([8, 3], ["indexer store"], ["mlakv", "vllm"], device="cpu", load_peer=no_peer,
                   checkpoint=lambda r: saved.append(len(r["rows"])))  # fmt: skip
    assert report["providers"] == ["mlakv"] and report["vllm_kernels"] == "not built: nvcc not found"
    assert [r["n"] for r in report["rows"]] == [8, 3] and saved == [1, 2]  # the report saved after each size
    assert all(r["mlakv"]["status"] == "ok" and "vllm" not in r for r in report["rows"])


# ---- the saved torch headers (the fallback build) -------------------------------------------------


def test_saved_torch_headers_are_the_closure_of_the_sources_torch_includes(only_env_peer):
    _write_tree(only_env_peer / "csrc", {"cache_kernels.cu": "#include <torch/headeronly/util/Exception.h>\n"})
    dest = P.save_torch_headers()
    saved = _files_under(dest)
    assert (dest / "TORCH_VERSION").read_text().strip() == torch.__version__
    # the sources' own include, the binding's (stable library), and what those include in turn
    assert {"torch/headeronly/util/Exception.h", "torch/csrc/stable/library.h"} <= saved
    assert "torch/csrc/inductor/aoti_torch/c/shim.h" in saved
    assert not any(f.startswith(("c10/", "ATen/")) for f in saved)


@pytest.mark.jit_build
def test_the_saved_headers_alone_resolve_every_torch_include_of_the_build(tmp_path):
    """Preprocessing with the saved copy and without torch's include directory: nothing is missing,
    so a fallback build never mixes two torch versions' headers."""
    require_jit_toolchain()
    if P.peer_absent_reason() is not None:
        pytest.skip(P.peer_absent_reason())
    peer = tmp_path / "peer"
    shutil.copytree(P.peer_dir() / "csrc", peer / "csrc")
    saved = P.save_torch_headers(peer)
    plan = P.prepare_build(tmp_path / "build", peer, "9.0a")
    incs = [f"-I{saved}"] + [f"-I{d}" for d in plan.include_dirs]
    from mlakv.kernels.cuda.loader import find_cuda_home

    nvcc = str(Path(find_cuda_home()) / "bin" / "nvcc")
    for cmd in ([nvcc, "-M", *plan.nvcc_flags, *incs, str(plan.kernels)],
                ["c++", "-fsyntax-only", *plan.cxx_flags, *incs, str(plan.binding)]):  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        if "-M" in cmd:
            torch_dir = str(Path(torch.__file__).parent)
            assert torch_dir not in done.stdout and str(saved) in done.stdout


# ---- on an SM90+ GPU: vLLM's own kernels against the reference ---------------------------------------


@pytest.fixture(scope="module")
def peer_ops():
    if P.peer_absent_reason() is not None:
        pytest.skip(P.peer_absent_reason())
    return P.load_vllm_peer()  # a failed build fails the tests, with the compiler's lines


@requires_sm90
@pytest.mark.parametrize("provider", ["mlakv", "vllm"])
@pytest.mark.parametrize("op", list(B.OPS))
def test_on_the_gpu_each_provider_writes_the_references_bytes(peer_ops, provider, op):
    """The bench's check at n = 200 (4 requests of 50, blocks of 64): vLLM's kernel (built from its
    unchanged source) and the face, each against the face's CPU path (vLLM 0.33's rules)."""
    cpu = B.make_case(200, "cpu", torch.Generator().manual_seed(11))
    gpu = {k: (v.cuda() if isinstance(v, torch.Tensor) and k != "mapping" else v) for k, v in cpu.items()}
    fn_ref, written = B.calls(V)[op]
    ref = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cpu.items()}
    fn_ref(ref)
    api = V if provider == "mlakv" else peer_ops
    assert B.check_provider(B.calls(api)[op][0], written, gpu, ref) is None
