"""Engine-shaped faces over mlakv's kernels: the call sets other serving engines already use.

``mlakv.compat.vllm`` speaks vLLM's MLA cache ops (``vllm/_custom_ops.py`` names, argument order,
shapes, ``kv_cache_dtype`` strings and semantics) as thin adapters over :mod:`mlakv.ops`; it
registers ``torch.ops.mlakv_vllm.*`` when imported. ``mlakv.compat.fetch_vllm_tests`` fetches
vLLM's own kernel tests and writes the module shim that runs them against it (docs/vllm.md).
Nothing is imported here, so importing the package registers nothing.
"""
