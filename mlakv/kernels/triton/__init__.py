"""Triton kernels (the GPU path where the CUDA kernels do not apply): ``row_write`` (row write and
gather), ``fp8`` (quantizing write, dequantizing gather), ``transfer`` (HiCache page copies),
``move`` (row moves across layers), ``indexer`` (the DSA indexer K cache's store and gather); shared
helpers in ``common``."""
