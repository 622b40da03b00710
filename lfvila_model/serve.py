"""`lfvila serve`: a local search page over an index written by `lfvila embed` (standard library HTTP server).

Routes (GET and HEAD):

    /                          the page: a text box; results ranked by score, each with its poster frame and a player
    /api/search?q=TEXT&k=K     the ranking as JSON, the same as `lfvila search --json` (k: default 10)
    /api/info                  the index: number of videos, skipped files, checkpoint / preset, frames, input size
    /video/ID                  the video file ID (a path relative to --videos, as in the index), with HTTP range
                               requests (206 Partial Content) so that the browser's player can seek
    /poster/ID                 a JPEG of the video's middle frame

Only indexed videos are served, and only from inside the videos folder: an ID is percent-decoded once, then
refused with 403 if it is absolute, holds a `..` segment, a backslash or a NUL, or if its real path (symlinks
resolved) lies outside the folder; anything else that is not an indexed ID is 404. So `..`, `%2e%2e`, double
encodings (`%252e%252e` decodes once to the literal name `%2e%2e`: no such ID), absolute paths and symlinks
pointing out of the folder all fail. The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import io
import json
import logging
import mimetypes
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["SearchApp", "make_server", "serve", "resolve_video", "PathRefused"]

log = logging.getLogger("lfvila.serve")

CHUNK = 1 << 16
MAX_POSTERS = 512  # posters kept in memory


class PathRefused(Exception):
    """A request path that is not served: ``status`` is 403 (it escapes the folder) or 404 (no such video)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def resolve_video(root: str, rel: str, allowed: Optional[set] = None) -> str:
    """The real path of the video ``rel`` (already percent-decoded once) inside the real folder ``root``.

    Raises :class:`PathRefused`: 403 for an absolute path, a ``..`` segment, a backslash or NUL, or a real path
    (symlinks resolved) outside ``root``; 404 when ``rel`` is not in ``allowed`` (the indexed ids) or is not a
    file.
    """
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/") or os.path.isabs(rel):
        raise PathRefused(403, "not a relative path")
    if any(part == ".." for part in rel.split("/")):
        raise PathRefused(403, "'..' is not allowed")
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root or real == root:
        raise PathRefused(403, "outside the videos folder")
    if allowed is not None and rel not in allowed:
        raise PathRefused(404, "not an indexed video")
    if not os.path.isfile(real):
        raise PathRefused(404, "no such file")
    return real


def _parse_range(header: str, size: int) -> Optional[tuple[int, int]]:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive ``(start, end)``; None when unsatisfiable.
    Several ranges are not supported: the first one is served."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*(?:,.*)?", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
        n = int(m.group(2))
        if n == 0:
            return None
        start, end = max(size - n, 0), size - 1
    if start >= size or start > end:
        return None
    return start, end


def _poster_jpeg(path: str) -> bytes:
    """A JPEG of the middle frame of ``path`` (decoded with PyAV, encoded with PIL)."""
    from PIL import Image

    from .data.video import count_frames, decode_frames

    frame = decode_frames(path, [count_frames(path) // 2])[0]
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class SearchApp:
    """What the handler serves: a :class:`~lfvila_model.eval.search.Searcher` and the videos folder."""

    def __init__(self, searcher, videos: str | os.PathLike):
        self.searcher = searcher
        self.root = os.path.realpath(os.fspath(videos))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"videos folder not found: {videos}")
        self.allowed = set(searcher.index.ids)
        self._posters: dict[str, bytes] = {}
        self._lock = threading.Lock()
        missing = sum(not os.path.isfile(os.path.join(self.root, i)) for i in searcher.index.ids)
        if missing:
            log.warning("%d of %d indexed videos are not under %s (is --videos the folder given to embed?)",
                        missing, len(self.allowed), self.root)

    def poster(self, real: str) -> bytes:
        with self._lock:
            hit = self._posters.get(real)
        if hit is None:
            hit = _poster_jpeg(real)
            with self._lock:
                if len(self._posters) >= MAX_POSTERS:
                    self._posters.pop(next(iter(self._posters)))
                self._posters[real] = hit
        return hit

    def info(self) -> dict:
        m = self.searcher.index.meta
        return {"videos": len(self.allowed), "skipped": len(m.get("skipped") or {}),
                "checkpoint": m.get("checkpoint"), "preset": m.get("preset"), "num_frames": m.get("num_frames"),
                "input_size": m.get("input_size")}


class _Handler(BaseHTTPRequestHandler):
    server_version = "lfvila-serve"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> SearchApp:
        return self.server.app

    def log_message(self, fmt, *args):  # the default writes every request to stderr
        log.info("%s - %s", self.address_string(), fmt % args)

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # -- responses ------------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, ctype: str, head: bool, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, head: bool) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", head)

    def _error(self, status: int, message: str, head: bool) -> None:
        self._json(status, {"error": message, "status": status}, head)

    # -- routing --------------------------------------------------------------------------------------------------

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        path = url.path
        try:
            if path in ("/", "/index.html"):
                self._send(200, PAGE.encode(), "text/html; charset=utf-8", head,
                           {"Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                                       "style-src 'self' 'unsafe-inline'"})
            elif path == "/api/search":
                self._search(url.query, head)
            elif path == "/api/info":
                self._json(200, self.app.info(), head)
            elif path.startswith("/video/"):
                self._video(resolve_video(self.app.root, unquote(path[len("/video/"):]), self.app.allowed), head)
            elif path.startswith("/poster/"):
                real = resolve_video(self.app.root, unquote(path[len("/poster/"):]), self.app.allowed)
                try:
                    body = self.app.poster(real)
                except Exception as e:  # noqa: BLE001 (an undecodable video has no poster; the page goes on)
                    raise PathRefused(404, f"no poster ({type(e).__name__})") from None
                self._send(200, body, "image/jpeg", head, {"Cache-Control": "max-age=3600"})
            else:
                self._error(404, "not found", head)
        except PathRefused as e:
            self._error(e.status, e.reason, head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser moved on (a seek cancels the running range request)

    def _search(self, query: str, head: bool) -> None:
        from .eval.search import results_json

        qs = parse_qs(query)
        q = (qs.get("q") or [""])[0].strip()
        if not q:
            return self._error(400, "q (the paragraph to search for) is required", head)
        k_text = (qs.get("k") or ["10"])[0]
        if not k_text.isdigit() or int(k_text) < 1:
            return self._error(400, f"k must be a positive integer, got {k_text!r}", head)
        try:
            results = self.app.searcher.search(q, top_k=int(k_text))
        except ValueError as e:
            return self._error(400, str(e), head)
        self._send(200, results_json(results).encode(), "application/json", head)

    def _video(self, real: str, head: bool) -> None:
        size = os.path.getsize(real)
        ctype = mimetypes.guess_type(real)[0] or "application/octet-stream"
        start, end, status = 0, size - 1, 200
        header = self.headers.get("Range")
        if header:
            r = _parse_range(header, size)
            if r is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            (start, end), status = r, 206
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        with open(real, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, app: SearchApp):
        self.app = app
        super().__init__(address, _Handler)


def make_server(index, videos: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
                searcher=None, device: str = "cpu") -> ThreadingHTTPServer:
    """The search page's server, bound but not yet serving (call ``serve_forever()``; ``port=0`` picks a free
    port: ``server.server_address[1]``). ``index``: an index prefix; ``searcher``: an already loaded
    :class:`~lfvila_model.eval.search.Searcher` (else one is loaded from the index)."""
    if searcher is None:
        from .eval.search import Searcher

        searcher = Searcher(index, device=device)
    return _Server((host, int(port)), SearchApp(searcher, videos))


def serve(index, videos: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """`lfvila serve`: serves until interrupted (Ctrl-C)."""
    server = make_server(index, videos, host, port, device=device)
    h, p = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can search and watch the videos")
    print(f"search page: http://{'127.0.0.1' if h == '0.0.0.0' else h}:{p}/  ({len(server.app.allowed)} videos; "
          f"Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>LF-VILA search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
form{display:flex;gap:.5em;margin-bottom:.5em}
textarea{flex:1;font:inherit;padding:.4em}
button,input{font:inherit}
#info{color:#666;font-size:.9em;margin-bottom:1em}
ol{list-style:none;padding:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(20em,1fr));gap:1em}
li{border:1px solid #ddd;border-radius:6px;padding:.5em}
video{width:100%;background:#000;border-radius:4px}
.meta{display:flex;justify-content:space-between;gap:.5em;font-size:.9em;word-break:break-all}
.score{font-variant-numeric:tabular-nums;color:#06c;white-space:nowrap}
</style></head>
<body>
<h1>LF-VILA search</h1>
<form id="f">
  <textarea id="q" rows="3"
    placeholder="Describe the video in a few sentences, e.g. A man opens a door. He walks in."></textarea>
  <div><label>top <input id="k" type="number" min="1" value="10" style="width:4em"></label><br>
  <button type="submit">Search</button></div>
</form>
<div id="info"></div>
<ol id="results"></ol>
<script>
const enc = id => id.split('/').map(encodeURIComponent).join('/');
fetch('/api/info').then(r => r.json()).then(i => {
  document.getElementById('info').textContent = i.videos + ' videos indexed (' + i.skipped + ' skipped), model ' +
    (i.checkpoint || i.preset) + ', ' + i.num_frames + ' frames at ' + i.input_size.join('x');
});
document.getElementById('f').addEventListener('submit', async ev => {
  ev.preventDefault();
  const q = document.getElementById('q').value, k = document.getElementById('k').value || 10;
  const ol = document.getElementById('results');
  ol.textContent = 'searching...';
  const r = await fetch('/api/search?q=' + encodeURIComponent(q) + '&k=' + encodeURIComponent(k));
  const res = await r.json();
  ol.textContent = '';
  if (!r.ok) { ol.textContent = res.error; return; }
  res.forEach((hit, n) => {
    const li = document.createElement('li');
    const v = document.createElement('video');
    v.controls = true; v.preload = 'none';
    v.poster = '/poster/' + enc(hit.id); v.src = '/video/' + enc(hit.id);
    const meta = document.createElement('div'); meta.className = 'meta';
    const name = document.createElement('span'); name.textContent = (n + 1) + '. ' + hit.id;
    const score = document.createElement('span'); score.className = 'score'; score.textContent = hit.score.toFixed(4);
    meta.append(name, score); li.append(v, meta); ol.append(li);
  });
});
</script>
</body></html>
"""
