"""In-tree PEP 517 build backend for lfvila.

lfvila's extension must be compiled against the very torch it will run with. Under pip's build isolation the
build runs in a throwaway environment that holds only the `build-system.requires` packages; asking for torch
there would download a second torch (a multi-GB CUDA build by default) whose ABI may not match the installed
one. Instead this backend wraps setuptools and appends the *target* environment's site-packages to `sys.path`
(after the isolated ones, so the isolated setuptools still wins), which makes the installed torch importable
by `setup.py`. `pip install --no-build-isolation .` needs none of this and works the same way.
"""

import os
import sys
import sysconfig


def _add_target_site_packages() -> None:
    # pip runs this hook with the target interpreter (sys.prefix is the target environment); its isolation only
    # removes that environment's site-packages from sys.path. Put them back at the end.
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths()[key]
        if path not in sys.path and os.path.isdir(path):
            sys.path.append(path)


_add_target_site_packages()

try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised only without torch
    sys.stderr.write(
        "lfvila: torch is not installed in this environment; install torch first "
        "(for example `pip install torch`), then `pip install .` again.\n"
    )
    raise SystemExit(1)

from setuptools import build_meta as _setuptools_backend  # noqa: E402

get_requires_for_build_wheel = _setuptools_backend.get_requires_for_build_wheel
get_requires_for_build_sdist = _setuptools_backend.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = _setuptools_backend.prepare_metadata_for_build_wheel
build_wheel = _setuptools_backend.build_wheel
build_sdist = _setuptools_backend.build_sdist
get_requires_for_build_editable = getattr(_setuptools_backend, "get_requires_for_build_editable", None)
prepare_metadata_for_build_editable = getattr(_setuptools_backend, "prepare_metadata_for_build_editable", None)
build_editable = getattr(_setuptools_backend, "build_editable", None)
