"""A tiny dependency-free figure for retrieval results: a numpy rasteriser, a 3x5 pixel font and a PNG codec.

The report figure has two panels: the histogram of the true item's rank (text-to-video and video-to-text side
by side per bin) and the recall-at-K curve (K = 1..N, percent). Matplotlib is deliberately not a dependency;
this draws bars, polylines, axes and labels straight into a ``uint8 (H, W, 3)`` array and writes it as an
8-bit RGB PNG (zlib + CRC32, filter type 0). :func:`read_png` reads such files back (used by the tests).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Mapping

import numpy as np

__all__ = ["write_png", "read_png", "Canvas", "retrieval_figure"]

_PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Writes ``uint8 (H, W, 3)`` as an RGB PNG (atomically: temporary file then rename)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"img must be a uint8 (H, W, 3) array, got {getattr(img, 'dtype', None)} "
                         f"{getattr(img, 'shape', None)}")
    h, w, _ = img.shape
    # each scanline is prefixed with its filter type byte (0 = none)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()
    data = (_PNG_SIG + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Reads an 8-bit RGB, non-interlaced PNG (all five scanline filters), checking every chunk's CRC.

    Returns ``uint8 (H, W, 3)``. Raises ValueError for anything else or a corrupt file.
    """
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    if data[:8] != _PNG_SIG:
        raise ValueError(f"{path}: not a PNG (bad signature)")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError(f"{path}: truncated chunk header at byte {pos}")
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        crc_bytes = data[pos + 8 + n:pos + 12 + n]
        if len(body) != n or len(crc_bytes) != 4:
            raise ValueError(f"{path}: truncated {kind!r} chunk")
        if struct.unpack(">I", crc_bytes)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ValueError(f"{path}: CRC mismatch in {kind!r} chunk")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if ihdr is None:
        raise ValueError(f"{path}: no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = ihdr
    if (depth, ctype, interlace) != (8, 2, 0):
        raise ValueError(f"{path}: only 8-bit RGB non-interlaced PNGs are supported, got depth {depth}, "
                         f"colour type {ctype}, interlace {interlace}")
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    stride = w * 3
    if raw.size != h * (stride + 1):
        raise ValueError(f"{path}: image data has {raw.size} bytes, expected {h * (stride + 1)}")
    rows = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int32)
    bpp = 3
    for y in range(h):
        ft, line = rows[y, 0], rows[y, 1:].astype(np.int32)
        prev = out[y - 1] if y else np.zeros(stride, np.int32)
        if ft == 0:
            cur = line
        elif ft == 2:
            cur = (line + prev) & 0xFF
        elif ft in (1, 3, 4):
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                a = cur[x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                if ft == 1:
                    pred = a
                elif ft == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[x] = (line[x] + pred) & 0xFF
        else:
            raise ValueError(f"{path}: bad filter type {ft} on row {y}")
        out[y] = cur
    return out.astype(np.uint8).reshape(h, w, 3)


# 3x5 pixel font: each glyph is 5 rows of 3 columns ('#' = ink)
_FONT_SRC = {
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###",
    "3": "###,..#,.##,..#,###", "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###",
    "6": "###,#..,###,#.#,###", "7": "###,..#,.#.,.#.,.#.", "8": "###,#.#,###,#.#,###",
    "9": "###,#.#,###,..#,###", "A": ".#.,#.#,###,#.#,#.#", "B": "##.,#.#,##.,#.#,##.",
    "C": ".##,#..,#..,#..,.##", "D": "##.,#.#,#.#,#.#,##.", "E": "###,#..,##.,#..,###",
    "F": "###,#..,##.,#..,#..", "G": ".##,#..,#.#,#.#,.##", "H": "#.#,#.#,###,#.#,#.#",
    "I": "###,.#.,.#.,.#.,###", "J": "..#,..#,..#,#.#,.#.", "K": "#.#,#.#,##.,#.#,#.#",
    "L": "#..,#..,#..,#..,###", "M": "#.#,###,###,#.#,#.#", "N": "##.,#.#,#.#,#.#,#.#",
    "O": ".#.,#.#,#.#,#.#,.#.", "P": "##.,#.#,##.,#..,#..", "Q": ".#.,#.#,#.#,##.,.##",
    "R": "##.,#.#,##.,#.#,#.#", "S": ".##,#..,.#.,..#,##.", "T": "###,.#.,.#.,.#.,.#.",
    "U": "#.#,#.#,#.#,#.#,###", "V": "#.#,#.#,#.#,#.#,.#.", "W": "#.#,#.#,###,###,#.#",
    "X": "#.#,#.#,.#.,#.#,#.#", "Y": "#.#,#.#,.#.,.#.,.#.", "Z": "###,..#,.#.,#..,###",
    " ": "...,...,...,...,...", "-": "...,...,###,...,...", ".": "...,...,...,...,.#.",
    ":": "...,.#.,...,.#.,...", "/": "..#,..#,.#.,#..,#..", "@": "###,#.#,###,#..,.##",
    "%": "#.#,..#,.#.,#..,#.#", "(": ".#.,#..,#..,#..,.#.", ")": ".#.,..#,..#,..#,.#.",
    "=": "...,###,...,###,...", ">": "#..,.#.,..#,.#.,#..", "<": "..#,.#.,#..,.#.,..#",
}
_FONT = {c: np.array([[ch == "#" for ch in row] for row in g.split(",")], dtype=bool) for c, g in _FONT_SRC.items()}

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GREY = (200, 200, 200)
BLUE = (31, 119, 180)
ORANGE = (255, 127, 14)


class Canvas:
    """A white ``uint8 (H, W, 3)`` image with clipped drawing primitives (pixel coordinates, y down)."""

    def __init__(self, height: int, width: int):
        self.img = np.full((height, width, 3), 255, np.uint8)
        self.h, self.w = height, width

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour) -> None:
        """Fills [x0, x1) x [y0, y1)."""
        x0, x1 = sorted((int(x0), int(x1)))
        y0, y1 = sorted((int(y0), int(y1)))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.w), min(y1, self.h)
        if x0 < x1 and y0 < y1:
            self.img[y0:y1, x0:x1] = colour

    def line(self, x0: float, y0: float, x1: float, y1: float, colour, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.rint(np.linspace(x0, x1, n)).astype(int)
        ys = np.rint(np.linspace(y0, y1, n)).astype(int)
        r0 = -(width // 2)
        for dy in range(r0, r0 + width):
            for dx in range(r0, r0 + width):
                x, y = xs + dx, ys + dy
                ok = (x >= 0) & (x < self.w) & (y >= 0) & (y < self.h)
                self.img[y[ok], x[ok]] = colour

    def text(self, x: int, y: int, s: str, colour=BLACK, scale: int = 2, anchor: str = "left") -> None:
        """Draws ``s`` (upper-cased; unknown characters as blanks) with its top at y."""
        s = s.upper()
        adv = 4 * scale
        if anchor == "center":
            x -= (len(s) * adv - scale) // 2
        elif anchor == "right":
            x -= len(s) * adv - scale
        for i, ch in enumerate(s):
            g = _FONT.get(ch)
            if g is None:
                continue
            for gy, gx in zip(*np.nonzero(g)):
                self.rect(x + i * adv + gx * scale, y + gy * scale, x + i * adv + (gx + 1) * scale,
                          y + (gy + 1) * scale, colour)


def _panel_axes(c: Canvas, x0: int, y0: int, x1: int, y1: int) -> None:
    c.line(x0, y1, x1, y1, BLACK)
    c.line(x0, y0, x0, y1, BLACK)


def retrieval_figure(path: str | os.PathLike, ranks: Mapping[str, np.ndarray], width: int = 720,
                     height: int = 300) -> np.ndarray:
    """Draws the rank histogram and recall curve for each direction in ``ranks`` (``{"t2v": (N,), "v2t": (N,)}``,
    1-based ranks) and writes it as a PNG. Returns the image ``uint8 (height, width, 3)``."""
    if not ranks:
        raise ValueError("ranks must hold at least one direction")
    series = [(k, np.asarray(v, dtype=np.int64)) for k, v in ranks.items()]
    colours = [BLUE, ORANGE, (44, 160, 44), (214, 39, 40)]
    n = max(int(v.max()) for _, v in series)
    n = max(n, max(len(v) for _, v in series))
    c = Canvas(height, width)
    top, bottom = 40, height - 40
    # --- left panel: rank histogram over logarithmic bins (rank 1 gets its own bin; a linear scale would lump
    # ranks 1..10 of a 200-video set into one bar)
    lx0, lx1 = 50, width // 2 - 20
    edges = np.unique(np.floor(np.geomspace(1, n + 1, min(20, n) + 1))) - 0.5
    edges[-1] = n + 0.5
    nb = len(edges) - 1
    hists = [np.histogram(v, bins=edges)[0] for _, v in series]
    hmax = max(int(h.max()) for h in hists) or 1
    c.text((lx0 + lx1) // 2, 10, "RANK HISTOGRAM", anchor="center")
    bw = (lx1 - lx0) / nb
    for b in range(nb):
        for s, h in enumerate(hists):
            sub = bw / len(hists)
            xa = lx0 + b * bw + s * sub + 1
            ya = bottom - (bottom - top) * h[b] / hmax
            c.rect(int(xa), int(ya), int(xa + sub - 1), bottom, colours[s % len(colours)])
    _panel_axes(c, lx0, top, lx1, bottom)
    c.text(lx0 - 4, top - 2, str(hmax), anchor="right", scale=1)
    c.text(lx0 - 4, bottom - 4, "0", anchor="right", scale=1)
    for b in range(nb):  # first rank of each bin, where there is room
        if b == 0 or bw >= 16 or b % max(1, int(16 // bw) + 1) == 0:
            c.text(int(lx0 + b * bw + bw / 2), bottom + 6, str(int(edges[b] + 0.5)), anchor="center", scale=1)
    c.text((lx0 + lx1) // 2, bottom + 18, "RANK (LOG BINS)", anchor="center")
    # --- right panel: recall at K, K = 1..n, percent, K on a log scale (R@1, R@5, R@10 stay readable)
    rx0, rx1 = width // 2 + 40, width - 20
    c.text((rx0 + rx1) // 2, 10, "RECALL@K (%)", anchor="center")

    def kx(k):
        return rx0 + (rx1 - rx0) * np.log(k) / np.log(n) if n > 1 else rx0

    for yv in (25, 50, 75):
        y = bottom - (bottom - top) * yv / 100
        c.line(rx0, y, rx1, y, GREY)
    ks = np.arange(1, n + 1)
    for s, (_, v) in enumerate(series):
        rec = 100.0 * (v[None, :] <= ks[:, None]).mean(axis=1)
        xs = kx(ks)
        ys = bottom - (bottom - top) * rec / 100.0
        if n == 1:
            c.rect(rx0 - 2, int(ys[0]) - 2, rx0 + 3, int(ys[0]) + 3, colours[s % len(colours)])
        for i in range(n - 1):
            c.line(xs[i], ys[i], xs[i + 1], ys[i + 1], colours[s % len(colours)], width=2)
    _panel_axes(c, rx0, top, rx1, bottom)
    c.text(rx0 - 4, top - 2, "100", anchor="right", scale=1)
    c.text(rx0 - 4, bottom - 4, "0", anchor="right", scale=1)
    for k in (1, 5, 10, 50, 100, 500, 1000, 5000, n):
        if k <= n and (k == n or kx(n) - kx(k) > 20):
            x = int(kx(k))
            c.line(x, bottom, x, bottom + 3, BLACK)
            c.text(x, bottom + 6, str(k), anchor="center", scale=1)
    c.text((rx0 + rx1) // 2, bottom + 18, "K (LOG)", anchor="center")
    # legend, bottom right of the recall panel (recall curves are high there, so it stays clear)
    for s, (name, _) in enumerate(series):
        x = rx1 - 70
        y = bottom - 8 - 14 * (len(series) - s)
        c.rect(x, y, x + 10, y + 10, colours[s % len(colours)])
        c.text(x + 14, y, name, scale=2)
    write_png(path, c.img)
    return c.img
