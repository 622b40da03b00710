# The test suite as a package, so its shared modules import by their full name (`tests.helpers`,
# `tests.htwa_dense`) with the repository root on sys.path (root conftest.py), never through a sys.path insert.
