"""The backends of the ops, one module per family (each with its `can_run_*` predicate(s) and entry points):

- `cpp`: the compiled extension `lfvila_kernels._C` (C++ CPU kernels, and the CUDA kernels where built).
- `triton`: the Triton kernels of `lfvila_kernels/triton/` (CUDA, or the CPU under TRITON_INTERPRET=1).
- `chunked`: the row-panel GEMM InfoNCE ("chunked").
- `torch_attention`: HTWA through stock PyTorch attention ("sdpa", "flex").
- `reference`: the oracle (lfvila_kernels/reference.py) as a backend.

The submodules are imported where used (the public op modules `lfvila_kernels.htwa` / `.losses` dispatch to
them through `lfvila_kernels._dispatch`); importing this package loads none of them.
"""
