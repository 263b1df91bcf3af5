"""mlakv.kernels: the GPU kernels, by backend — ``cuda`` (JIT-built through apache-tvm-ffi, SM90+) and
``triton`` (every other GPU). Each kernel family is one file with its launcher beside it; which
backend serves a call is decided in :mod:`mlakv.ops.dispatch`, never here."""
