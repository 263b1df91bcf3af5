"""CUDA kernels compiled on first use through apache-tvm-ffi: ``loader`` (the only place that builds),
``row_write`` (the row copy), ``fp8`` (quantizing write, dequantizing gather), ``indexer`` (the DSA
indexer K cache's store and page-table gather); sources in ``csrc/``.

Importing this package needs neither tvm-ffi nor nvcc; they are looked for when a module is first built.
"""
