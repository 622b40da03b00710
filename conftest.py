# Puts the repository root on sys.path (pytest inserts the folder of a root conftest.py) so tests and benchmarks
# import the in-tree packages (with the extension built in place by `pip install -e .` or `python setup.py
# build_ext --inplace`), or the installed ones, and their own shared modules by full name (`tests.helpers`,
# `benchmarks.workloads`).

import os

# Triton reads TRITON_INTERPRET when it is first imported, and torch._dynamo (pulled in by torch.library.custom_op,
# i.e. by `import lfvila_kernels`) imports triton. On a machine without a GPU the Triton tests need the
# interpreter, so choose it here, before any test module is collected; an explicit setting is respected.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
