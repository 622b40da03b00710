"""The package metadata lives in pyproject.toml's [project] table; setup.py only builds the extension."""

import os
import subprocess
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_project_metadata():
    p = _pyproject()["project"]
    assert p["name"] == "lfvila" and p["version"] and p["description"] and p["readme"] == "README.md"
    assert p["requires-python"] == ">=3.10"
    assert p["dependencies"] == ["torch>=2.4", "numpy"]  # loose: exact pins are the Makefile's
    extras = p["optional-dependencies"]
    assert set(extras) >= {"test", "triton", "video", "model"}
    assert "matplotlib" in extras["model"] and "transformers" in extras["model"] and "pyyaml" in extras["model"]
    assert extras["video"] == ["av"] and extras["triton"] == ["triton"]
    assert p["scripts"] == {"lfvila": "lfvila_model.cli:main"}
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["lfvila_kernels", "lfvila_kernels.*", "lfvila_model", "lfvila_model.*"]
    build = _pyproject()["build-system"]
    assert build["build-backend"] == "lfvila_build" and build["backend-path"] == ["_build"]


def test_setup_py_holds_only_the_extension_build():
    text = open(os.path.join(ROOT, "setup.py")).read()
    call = text[text.index("\nsetup(") :]
    assert "ext_modules=" in call and "cmdclass=" in call
    for meta in ("name=", "version=", "install_requires", "extras_require", "entry_points", "packages="):
        assert meta not in call, meta


def test_missing_model_extra_says_which_extra_to_install():
    # a child with transformers hidden, as after a bare `pip install lfvila`
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import lfvila_model\nexcept ImportError as e:\n    print(e)\nelse:\n    print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT}, check=True).stdout
    assert "pip install 'lfvila[model]'" in out and "transformers" in out
