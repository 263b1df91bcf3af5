"""mlakv.jit_kernel: the public face of the JIT CUDA row write (names callers know), over
:mod:`mlakv.kernels.cuda`.

Importing this package needs neither tvm-ffi nor nvcc; they are looked for when a module is
first built, and their absence only makes :func:`can_use_set_mla_kv_buffer` return False.
"""

from mlakv.kernels.cuda.loader import JitUnavailable, cuda_arch_list, find_cuda_home, load_cuda_module
from mlakv.kernels.cuda.row_write import (
    build_set_mla_kv_buffer_module,
    can_use_set_mla_kv_buffer,
    jit_accepts_layout,
    jit_writer,
    set_mla_kv_buffer,
    set_mla_kv_buffer_unchecked,
)
from mlakv.spec.tuning import TUNING, LaunchStep, LaunchTuning, gpu_family, tuning_for

__all__ = [
    "JitUnavailable",
    "LaunchStep",
    "LaunchTuning",
    "TUNING",
    "build_set_mla_kv_buffer_module",
    "can_use_set_mla_kv_buffer",
    "cuda_arch_list",
    "find_cuda_home",
    "gpu_family",
    "jit_accepts_layout",
    "jit_writer",
    "load_cuda_module",
    "set_mla_kv_buffer",
    "set_mla_kv_buffer_unchecked",
    "tuning_for",
]
