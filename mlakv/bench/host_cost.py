"""Eager host cost of a row write, step by step: what each layer of the call stack adds.

``mlakv bench`` reports the end-to-end eager cost of ``pool.set_kv_buffer`` on a GPU. This splits
it along the hot path: pool -> dispatcher (``set_mla_kv_buffer_triton``) -> the bound ``write``
closure (:func:`mlakv.kernels.cuda.row_write.bind_launch_shapes`) -> the tvm-ffi module
function (argument marshalling, the launcher's checks, the launch). Each step is timed twice:

* ``python``: the module function replaced by a no-op stub taking the same 11 arguments, so the
  column is the Python work alone. It runs anywhere: on a CPU the pool's route is set to the stub
  writer, and the dispatcher sees the buffer as a CUDA tensor through a small Tensor subclass (its
  attribute reads cost ~0.1 us more than a plain tensor's here, so that row reads slightly high);
* ``real`` (GPU only): the real kernel launch on the current stream.

The ``tvm-ffi call`` row is the module's ``check_set_mla_kv_buffer`` export (the same marshalling
and checks, no launch); it builds for sm_90a on any machine with nvcc. All rows: ``n_loc = 1``,
median over rounds of ``--calls`` eager calls, the steps interleaved round-robin, no sync inside a
batch.

    python -m mlakv.bench.host_cost [--calls 2000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from mlakv.kernels.cuda.row_write import row_write_function, bind_launch_shapes
from mlakv.spec.tuning import TUNING, tuning_for
from mlakv.mem_cache import MLATokenToKVPool, set_mla_kv_buffer_triton
from mlakv.ops import dispatch as kv_write

from .timing import interleaved_us

__all__ = ["main", "step_costs"]

# name -> (pool dtype, nope_dim, rope_dim): the two layouts `mlakv bench` times (u8 = an fp8 pool's bytes)
LAYOUTS = {"bf16": (torch.bfloat16, 512, 64), "u8": (torch.float8_e4m3fn, 528, 128)}


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says ``is_cuda``: lets the dispatcher's hot path run on a CPU machine."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def _stub(kv, loc, nope, rope, num_warps, items, use_tma, early, skip, dcp_world, dcp_rank) -> bool:
    """Stands in for the module function: same arguments, no work."""
    return True


def _noop7(kv, loc, nope, rope, skip, dcp_world, dcp_rank) -> bool:
    return True


def _check_fn(nope_bytes: int, rope_bytes: int) -> Optional[Callable]:
    """The module's ``check_set_mla_kv_buffer`` (built for sm_90a), or None without tvm-ffi/nvcc."""
    from mlakv.jit_kernel import JitUnavailable, build_set_mla_kv_buffer_module, find_cuda_home

    if not find_cuda_home():
        return None
    old = os.environ.get("TVM_FFI_CUDA_ARCH_LIST")
    os.environ.setdefault("TVM_FFI_CUDA_ARCH_LIST", "9.0a")
    try:
        return build_set_mla_kv_buffer_module(nope_bytes, rope_bytes, use_pdl=True, device_capability=(9, 0)).check_set_mla_kv_buffer
    except (JitUnavailable, ImportError):
        return None
    finally:
        if old is None:
            os.environ.pop("TVM_FFI_CUDA_ARCH_LIST", None)


def step_costs(layout: str, calls: int = 2000, rounds: int = 9) -> list[tuple[str, float, Optional[float]]]:
    """``[(step, python µs, real µs or None)]`` for one layout at ``n_loc = 1`` (see the module docstring)."""
    dtype, nd, rd = LAYOUTS[layout]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    es = torch.empty((), dtype=dtype).element_size()
    loc = torch.arange(1, 2, device=device)
    nope = torch.randint(0, 256, (1, nd * es), dtype=torch.uint8, device=device).view(dtype)
    rope = torch.randint(0, 256, (1, rd * es), dtype=torch.uint8, device=device).view(dtype)
    full = torch.randint(0, 256, (1, 1, (nd + rd) * es), dtype=torch.uint8, device=device).view(dtype)
    tune = tuning_for(device) if cuda else TUNING["hopper"]
    stub_write = bind_launch_shapes(_stub, tune)
    w, i, t, e = tune.launch(1)
    layer = SimpleNamespace(layer_id=0)  # what sglang passes: its attention layer, with .layer_id

    # python column: stub module function everywhere
    pool = MLATokenToKVPool(4096, 1, dtype, nd, rd, 1, device, check_bounds=False)
    pool._route.jit = (stub_write, 0)
    kv = pool._dtype_views[0]
    kv_disp = kv if cuda else kv.as_subclass(_CudaLooking)
    key = (kv_disp.get_device(), dtype, nd, rd)
    saved = kv_write._JIT_ROUTES.get(key)
    kv_write._JIT_ROUTES[key] = (stub_write, 0)
    try:
        py = interleaved_us(
            {
                "python call floor (a no-op taking write's 7 args)": lambda: _noop7(kv, loc, nope, rope, 0, 1, 0),
                "module function (11 args)": lambda: _stub(kv, loc, nope, rope, w, i, t, e, 0, 1, 0),
                "write closure (bound launch shapes)": lambda: stub_write(kv, loc, nope, rope, 0, 1, 0),
                "dispatcher set_mla_kv_buffer_triton": lambda: set_mla_kv_buffer_triton(kv_disp, loc, nope, rope),
                "pool.set_kv_buffer (split: k_nope, k_rope)": lambda: pool.set_kv_buffer(0, loc, nope, rope),
                "pool.set_kv_buffer (split, sglang's layer object)": lambda: pool.set_kv_buffer(layer, loc, nope, rope),
                "pool.set_kv_buffer (full row, cache_v=None)": lambda: pool.set_kv_buffer(0, loc, full, None),
            },
            calls, rounds, sync,
        )  # fmt: skip
    finally:
        if saved is None:
            kv_write._JIT_ROUTES.pop(key, None)
        else:
            kv_write._JIT_ROUTES[key] = saved

    real: dict[str, float] = {}
    check = _check_fn(nd * es, rd * es)
    if check is not None:
        c_kv, c_loc, c_nope, c_rope = (x.cpu() for x in (kv, loc, nope, rope))
        py["tvm-ffi call (check_set_mla_kv_buffer, CPU tensors, no launch)"] = interleaved_us(
            {"ffi": lambda: check(c_kv, c_loc, c_nope, c_rope, 1, 0)}, calls, rounds, lambda: None
        )["ffi"]
    if cuda:
        from mlakv import jit_kernel

        pool = MLATokenToKVPool(4096, 1, dtype, nd, rd, 1, device, check_bounds=False)
        kv = pool._dtype_views[0]
        pool.set_kv_buffer(0, loc, nope, rope)  # learns the route (builds the module on first use)
        route = kv_write.jit_route(kv, nd, rd)
        if pool._route.jit[0] is None:
            print(f"# {layout}: the pool has no JIT route on this GPU (its writes take the checked path)")
        steps = {}
        if route[0] is not None:
            fn = row_write_function(device.index, nd * es, rd * es)
            write = route[0]
            steps["module function (11 args)"] = lambda: fn(kv, loc, nope, rope, w, i, t, e, 0, 1, 0)
            steps["write closure (bound launch shapes)"] = lambda: write(kv, loc, nope, rope, 0, 1, 0)
        steps["dispatcher set_mla_kv_buffer_triton"] = lambda: set_mla_kv_buffer_triton(kv, loc, nope, rope)
        steps["pool.set_kv_buffer (split: k_nope, k_rope)"] = lambda: pool.set_kv_buffer(0, loc, nope, rope)
        steps["pool.set_kv_buffer (split, sglang's layer object)"] = lambda: pool.set_kv_buffer(layer, loc, nope, rope)
        steps["pool.set_kv_buffer (full row, cache_v=None)"] = lambda: pool.set_kv_buffer(0, loc, full, None)
        if route[0] is not None:
            steps["jit_kernel.set_mla_kv_buffer (checked entry)"] = lambda: jit_kernel.set_mla_kv_buffer(kv, loc, nope, rope)
        real = interleaved_us(steps, calls, rounds, sync)
    names = list(py) + [k for k in real if k not in py]
    return [(k, py.get(k, float("nan")), real.get(k)) for k in names]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="eager calls per batch (default 2000)")
    ap.add_argument("--rounds", type=int, default=9, help="batches per step; the median is reported (default 9)")
    ap.add_argument("--layouts", default="bf16,u8", help="comma-separated: bf16 (512+64), u8 (fp8 pool, 528+128)")
    args = ap.parse_args(argv)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (python column only; no launch)"
    print(f"# eager host cost per call, n_loc=1, median of {args.rounds} x {args.calls} calls ({where})\n")
    print("| layout | step | python µs (stub module fn) | real µs |")
    print("|---|---|---:|---:|")
    for layout in args.layouts.split(","):
        for step, py_us, real_us in step_costs(layout, args.calls, args.rounds):
            real = "-" if real_us is None else f"{real_us:.2f}"
            print(f"| {layout} | {step} | {py_us:.2f} | {real} |")
    return 0


if __name__ == "__main__":
    from mlakv._interrupt import run_module

    raise SystemExit(run_module("mlakv.bench.host_cost", main))
