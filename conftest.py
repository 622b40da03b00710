# Puts the repository root on sys.path so tests and benchmarks import the in-tree packages (with the extension
# built in place by `pip install -e .` or `python setup.py build_ext --inplace`), or the installed ones.
