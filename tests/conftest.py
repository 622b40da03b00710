import os
import sys

# tests import their helper modules (htwa_dense, ...) by name
sys.path.insert(0, os.path.dirname(__file__))

# CI runs every property test on the same examples (no flaky reruns); locally hypothesis explores afresh.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
