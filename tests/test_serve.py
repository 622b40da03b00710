"""`lfvila serve`: the search page's server on 127.0.0.1 (ephemeral port, in a thread), queried over loopback."""

import contextlib
import http.client
import io
import json
import os
import threading
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from lfvila_model.cli import main
from lfvila_model.eval.embed import embed_videos
from lfvila_model.serve import PathRefused, make_server, resolve_video
from tests.helpers import CORRUPT, VIDEOS, embed_model, make_videos

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 20  # seconds, every request


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """videos/ (the test videos, a corrupt file, a symlink to a video outside the folder, a JSON file that is not
    a video) beside outside/ (a secret and the symlink's target); the index of videos/."""
    base = tmp_path_factory.mktemp("site")
    videos = make_videos(str(base / "videos"))
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    with open(os.path.join(videos, "a.mp4"), "rb") as f:
        (outside / "elsewhere.mp4").write_bytes(f.read())
    os.symlink(outside / "elsewhere.mp4", os.path.join(videos, "link.mp4"))
    (base / "videos" / "notes.json").write_text("{}")
    ckpt = str(base / "ckpt")
    embed_model("retrieval").save_pretrained(ckpt)
    prefix = str(base / "index")
    doc = embed_videos(videos, prefix, checkpoint=ckpt, num_workers=0, progress=False)
    assert "link.mp4" in doc["ids"] and CORRUPT in doc["skipped"]
    return {"videos": videos, "index": prefix, "base": str(base), "ids": doc["ids"]}


@pytest.fixture(scope="module")
def server(site):
    srv = make_server(site["index"], site["videos"], port=0)  # default host: 127.0.0.1
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    th.join(TIMEOUT)
    assert not th.is_alive()


def _url(server, path):
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _get(server, path, headers=None):
    """(status, headers, body) of GET path, sent byte for byte (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def test_binds_loopback(server):
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0


def test_page(server):
    with urllib.request.urlopen(_url(server, "/"), timeout=TIMEOUT) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        page = r.read().decode()
    for part in ("<textarea", "/api/search", "createElement('video')", "/poster/", "/video/", "score"):
        assert part in page
    with urllib.request.urlopen(_url(server, "/api/info"), timeout=TIMEOUT) as r:
        info = json.load(r)
    assert info["videos"] == len(VIDEOS) + 1 and info["skipped"] == 1  # + the symlink; the corrupt file


def test_api_search_equals_search_json(server, site):
    q = "A red square moves left. It stops."
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", "--index", site["index"], "--json", "--top-k", "3", q]) == 0
    url = _url(server, "/api/search?" + urllib.parse.urlencode({"q": q, "k": 3}))
    with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        body = r.read().decode()
    assert body == out.getvalue().strip()
    res = json.loads(body)
    assert len(res) == 3 and all(set(x) == {"id", "score"} for x in res)
    with urllib.request.urlopen(_url(server, "/api/search?q=" + urllib.parse.quote(q)), timeout=TIMEOUT) as r:
        assert len(json.load(r)) == len(site["ids"])  # k defaults to 10


@pytest.mark.parametrize("query", ["", "?q=", "?q=%20", "?q=x&k=0", "?q=x&k=two"])
def test_api_search_bad_requests(server, query):
    status, _, body = _get(server, "/api/search" + query)
    assert status == 400 and json.loads(body)["error"]


def test_poster(server, site):
    status, headers, body = _get(server, "/poster/sub/d.mp4")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    img = Image.open(io.BytesIO(body))
    assert img.format == "JPEG" and img.size == (64, 48)


def test_video_byte_ranges(server, site):
    with open(os.path.join(site["videos"], "b.mp4"), "rb") as f:
        data = f.read()
    status, headers, body = _get(server, "/video/b.mp4")
    assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "video/mp4"
    status, headers, body = _get(server, "/video/b.mp4", {"Range": "bytes=100-199"})
    assert status == 206 and body == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    status, _, body = _get(server, "/video/b.mp4", {"Range": "bytes=-50"})
    assert status == 206 and body == data[-50:]
    status, _, body = _get(server, "/video/b.mp4", {"Range": f"bytes={len(data) - 10}-"})
    assert status == 206 and body == data[-10:]
    status, headers, _ = _get(server, "/video/b.mp4", {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    # urllib.request, as a browser's player would ask
    req = urllib.request.Request(_url(server, "/video/sub/d.mp4"), headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        assert r.status == 206 and len(r.read()) == 10


ESCAPES = [
    "/video/../outside/secret.txt",
    "/video/%2e%2e/outside/secret.txt",
    "/video/%2E%2E%2Foutside%2Fsecret.txt",
    "/video/%252e%252e/outside/secret.txt",  # double-encoded
    "/video/%25252e%25252e%25252foutside%25252fsecret.txt",  # triple-encoded
    "/video/..%5coutside%5csecret.txt",  # backslashes
    "/video/sub/../../outside/secret.txt",
    "/video//etc/passwd",
    "/video/%2Fetc%2Fpasswd",
    "/video/link.mp4",  # an indexed symlink to a file outside the folder
    "/poster/link.mp4",
    "/poster/../outside/elsewhere.mp4",
    "/poster/%2e%2e%2foutside%2felsewhere.mp4",
    "/video/notes.json",  # inside, but not an indexed video
    f"/video/{CORRUPT}",  # skipped by embed: not indexed
    "/video/",
    "/video/.",
    "/video/%00a.mp4",
    "/../outside/secret.txt",
]


@pytest.mark.parametrize("path", ESCAPES)
def test_paths_outside_or_not_indexed_are_refused(server, path):
    status, _, body = _get(server, path)
    assert status in (403, 404), (path, status)
    assert b"secret" not in body


def test_escape_statuses(server):
    assert _get(server, "/video/%2e%2e/outside/secret.txt")[0] == 403
    assert _get(server, "/video/link.mp4")[0] == 403
    assert _get(server, "/video/%252e%252e/outside/secret.txt")[0] == 404


def test_resolve_video(site):
    root = os.path.realpath(site["videos"])
    allowed = set(site["ids"])
    assert resolve_video(root, "sub/d.mp4", allowed) == os.path.join(root, "sub", "d.mp4")
    for rel, status in [("../outside/secret.txt", 403), ("/etc/passwd", 403), (os.path.join(root, "a.mp4"), 403),
                        ("a\\..\\b", 403), ("link.mp4", 403), ("notes.json", 404), ("missing.mp4", 404)]:
        with pytest.raises(PathRefused) as e:
            resolve_video(root, rel, allowed)
        assert e.value.status == status, rel


def test_head_sends_headers_only(server, site):
    size = os.path.getsize(os.path.join(site["videos"], "a.mp4"))
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=TIMEOUT)
    try:
        conn.request("HEAD", "/video/a.mp4")
        r = conn.getresponse()
        assert r.status == 200 and int(r.headers["Content-Length"]) == size and r.read() == b""
    finally:
        conn.close()
