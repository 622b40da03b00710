"""No module of the packages encodes images by hand: figures go through matplotlib (lfvila_model.eval.figure).

A hand-written PNG writer shows itself by its chunk names and signature (IHDR, IDAT, the \\x89PNG bytes) or by
the zlib CRC it must compute over every chunk; none of them may appear under lfvila_kernels/ or lfvila_model/.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("lfvila_kernels", "lfvila_model")
# the PNG chunk names, the signature written as an escape or as bytes, and the chunk CRC
MARKERS = re.compile(rb"IHDR|IDAT|IEND|\\x89PNG|\x89PNG|zlib\.crc32|crc32\(")


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".pyi", ".cpp", ".h", ".cu", ".c"):
                yield path


def test_the_scan_sees_the_packages():
    files = [p.relative_to(ROOT).as_posix() for p in _sources()]
    assert "lfvila_model/eval/figure.py" in files and "lfvila_kernels/__init__.py" in files


@pytest.mark.parametrize("path", list(_sources()), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_hand_encoded_images(path):
    hits = sorted({m.group().decode("latin-1") for m in MARKERS.finditer(path.read_bytes())})
    assert not hits, f"{path.relative_to(ROOT)} looks like it encodes images by hand ({', '.join(hits)}); " \
                     "draw figures with matplotlib (see lfvila_model/eval/figure.py)"


def test_the_figure_module_uses_matplotlib():
    text = (ROOT / "lfvila_model" / "eval" / "figure.py").read_text()
    assert "from matplotlib.figure import Figure" in text and "FigureCanvasAgg" in text
    assert not re.search(r"^\s*import (zlib|struct)\b", text, re.M)
    assert not re.search(r"^\s*(import|from) matplotlib(\.pyplot| import pyplot)", text, re.M)  # no pyplot state
