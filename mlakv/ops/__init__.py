"""mlakv.ops: the operations a pool performs, each validated by the rule book and routed once.

``dispatch`` decides the path of the row write (torch on CPU, CUDA on SM90+, Triton elsewhere),
``reference`` is the plain-torch path (the CPU path and every test's oracle), ``fp8`` the quantizing
write and dequantizing gather, ``indexer`` (with ``indexer_reference``) the DSA indexer K cache,
``move`` the row move, ``custom_ops`` the ``torch.ops.mlakv.*`` registrations used under
``torch.compile``.
"""
