"""`lfvila shard` (`lfvila_model.data.shards`): the lfvila-shards v1 format written with webdataset and read back
here independently (webdataset and plain tarfile): clip bytes and texts round-trip, index counts, shard
boundaries, skipped samples, reruns. The clip files are random bytes of assorted sizes (the writer never decodes
them) plus one real mp4 made with PyAV."""

import hashlib
import io
import json
import os
import tarfile

import av
import numpy as np
import pytest
import webdataset as wds

from lfvila_model.cli import main
from lfvila_model.data import shards as S
from lfvila_model.data.annotations import clip_video_path, write_jsonl


def make_mp4(path, frames=6, size=(32, 24)):
    c = av.open(str(path), mode="w")
    s = c.add_stream("libx264", rate=3)
    s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
    s.options = {"preset": "ultrafast", "threads": "1"}
    rng = np.random.default_rng(0)
    for _ in range(frames):
        img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.fixture
def clip_set(tmp_path):
    """7 samples of 2-5 clips over 3 videos, written as pretrain.jsonl + clip files. Returns (jsonl, root, samples,
    bytes by clip id); sample 0's first clip is a real mp4."""
    rng = np.random.default_rng(1)
    root = tmp_path / "clips"
    samples, data = [], {}
    for i in range(7):
        vid = f"vid{i % 3}"
        first = 10 * i
        clips = []
        for n in range(first, first + 2 + i % 4):
            cid = f"{vid}.{n}.mp4"
            path = clip_video_path(str(root), cid)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if i == 0 and n == first:
                make_mp4(path)
            else:  # sizes around the 512-byte tar blocks
                with open(path, "wb") as f:
                    f.write(rng.integers(0, 256, int(rng.choice([1, 511, 512, 513, 3000])), dtype=np.uint8).tobytes())
            with open(path, "rb") as f:
                data[cid] = f.read()
            clips.append({"clip_id": cid, "text": f"sentence {n} of {vid}, with ünïcode"})
        samples.append(clips)
    jsonl = tmp_path / "pretrain.jsonl"
    write_jsonl(jsonl, samples)
    return str(jsonl), str(root), samples, data


def read_all_with_webdataset(out):
    index = S.read_index(out)
    got = []
    for shard in index["shards"]:
        rows = list(wds.WebDataset(os.path.join(out, shard["name"]), shardshuffle=False, empty_check=False))
        assert len(rows) == shard["samples"]
        got.extend(rows)
    return index, got


def test_round_trip_index_and_shard_boundaries(tmp_path, clip_set):
    jsonl, root, samples, data = clip_set
    out = str(tmp_path / "shards")
    index = S.write_shards(jsonl, root, out, samples_per_shard=3, progress=False)
    assert index["total"] == 7 and index["skipped"] == 0
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [
        ("shard-000000.tar", 3), ("shard-000001.tar", 3), ("shard-000002.tar", 1)]
    assert sorted(os.listdir(out)) == ["index.json", "report.json", "shard-000000.tar", "shard-000001.tar",
                                       "shard-000002.tar"]
    with open(os.path.join(out, "index.json")) as f:
        on_disk = json.load(f)
    assert on_disk["format"] == S.FORMAT_NAME == "lfvila-shards" and on_disk["version"] == S.FORMAT_VERSION == 1
    assert on_disk["total"] == 7 and on_disk["samples_per_shard"] == 3
    for s in on_disk["shards"]:
        assert s["bytes"] == os.path.getsize(os.path.join(out, s["name"]))
    assert tmp_path.as_posix() not in json.dumps(on_disk)  # no absolute path in the index

    index, got = read_all_with_webdataset(out)
    assert [r["__key__"] for r in got] == [f"s{n:09d}" for n in range(7)]
    for row, clips in zip(got, samples):
        doc = json.loads(row["json"])
        assert doc == {"video_id": clips[0]["clip_id"].split(".")[0], "clips": [c["clip_id"] for c in clips],
                       "texts": [c["text"] for c in clips]}
        assert sorted(k for k in row if not k.startswith("__")) == [f"clip{m:03d}.mp4" for m in
                                                                     range(len(clips))] + ["json"]
        for m, c in enumerate(clips):
            assert row[S.clip_member(m)] == data[c["clip_id"]]
    # the real mp4 decodes from the shard's bytes
    with av.open(io.BytesIO(got[0]["clip000.mp4"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6

    # plain tar: member names and order, sample by sample, key first
    with tarfile.open(os.path.join(out, "shard-000001.tar")) as t:
        names = t.getnames()
        assert all(m.mtime == 0 and m.isfile() for m in t.getmembers())
    assert names[0].startswith("s000000003.") and names[-1].startswith("s000000005.")
    assert "s000000003.json" in names and "s000000003.clip000.mp4" in names


def test_samples_per_shard_edges_and_a_rerun_replaces_the_set(tmp_path, clip_set):
    jsonl, root, _, _ = clip_set
    out = str(tmp_path / "s")
    assert [s["samples"] for s in S.write_shards(jsonl, root, out, samples_per_shard=1, progress=False)["shards"]] \
        == [1] * 7
    digests = {n: hashlib.sha1(open(os.path.join(out, n), "rb").read()).hexdigest() for n in os.listdir(out)
               if n.endswith(".tar")}
    index = S.write_shards(jsonl, root, out, samples_per_shard=7, progress=False)
    assert [s["samples"] for s in index["shards"]] == [7]
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["shard-000000.tar"]  # stale shards gone
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temporary file left
    assert [s["samples"] for s in S.write_shards(jsonl, root, out, samples_per_shard=1000,
                                                 progress=False)["shards"]] == [7]
    # the same input gives byte-identical shards
    S.write_shards(jsonl, root, out, samples_per_shard=1, progress=False)
    assert {n: hashlib.sha1(open(os.path.join(out, n), "rb").read()).hexdigest() for n in os.listdir(out)
            if n.endswith(".tar")} == digests


def test_a_missing_clip_skips_its_sample_and_is_counted(tmp_path, clip_set):
    jsonl, root, samples, data = clip_set
    os.remove(clip_video_path(root, samples[2][1]["clip_id"]))
    open(clip_video_path(root, samples[5][0]["clip_id"]), "wb").close()  # an empty file
    out = str(tmp_path / "s")
    index = S.write_shards(jsonl, root, out, samples_per_shard=2, progress=False)
    assert index["total"] == 5 and index["skipped"] == 2
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]
    with open(os.path.join(out, "report.json")) as f:
        rep = json.load(f)
    assert [(s["line"], s["clips"]) for s in rep["skipped"]] == [(3, [samples[2][1]["clip_id"]]),
                                                                 (6, [samples[5][0]["clip_id"]])]
    _, got = read_all_with_webdataset(out)
    # keyed by their line in the jsonl (the reader's sample number, PretrainDataset's index): the skipped leave gaps
    assert [r["__key__"] for r in got] == [f"s{n:09d}" for n in (0, 1, 3, 4, 6)]
    assert [json.loads(r["json"])["clips"][0] for r in got] == [samples[i][0]["clip_id"] for i in (0, 1, 3, 4, 6)]


def test_index_reader_and_read_back_check(tmp_path, clip_set):
    jsonl, root, _, _ = clip_set
    out = tmp_path / "s"
    S.write_shards(jsonl, root, out, samples_per_shard=4, progress=False)
    assert S.read_index(out / "index.json")["dir"] == str(out)
    assert S.shard_name(3) == "shard-000003.tar" and S.SHARD_NAME_RE.match("shard-000003.tar").group(1) == "000003"
    assert S.sample_key(12) == "s000000012" and S.CLIP_MEMBER_RE.match(S.clip_member(7)).group(1) == "007"
    with pytest.raises(ValueError, match="clip number"):
        S.clip_member(1000)
    good = json.loads((out / "index.json").read_text())
    for change, msg in [({"format": "other"}, "not a lfvila-shards index"), ({"version": 2}, "format version 2"),
                        ({"total": 99}, "total 99 is not the sum"), ({"shards": [{"name": "x.tar"}]}, "'shards'")]:
        (tmp_path / "bad.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=msg):
            S.read_index(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="shard index not found"):
        S.read_index(tmp_path)
    # a shard that does not read back as written is an error, not a silent bad set
    shard = str(out / "shard-000000.tar")
    rows = list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    expected = [(r["__key__"], {k: hashlib.sha1(v).hexdigest() for k, v in r.items() if not k.startswith("__")})
                for r in rows]
    S._verify_shard(shard, expected)
    with pytest.raises(RuntimeError, match="reads back 4 samples, 5 were written"):
        S._verify_shard(shard, expected + expected[:1])
    expected[1][1]["clip000.mp4"] = "0" * 40
    with pytest.raises(RuntimeError, match=r"sample s000000001 reads back wrong .*clip000.mp4"):
        S._verify_shard(shard, expected)


def test_cli_help_errors_and_run(tmp_path, clip_set, capsys):
    jsonl, root, _, _ = clip_set
    with pytest.raises(SystemExit) as e:
        main(["shard", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--annotations", "--videos", "--out", "--samples-per-shard"):
        assert opt in text
    common = ["shard", "--annotations", jsonl, "--videos", root, "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit) as e:
        main(common + ["--samples-per-shard", "0"])
    assert e.value.code == 2 and "argument --samples-per-shard: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["shard", "--annotations", jsonl, "--videos", str(tmp_path / "none"), "--out", str(tmp_path / "s")])
    assert "lfvila shard: error: video_root" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["shard", "--annotations", str(tmp_path / "none.jsonl"), "--videos", root, "--out", str(tmp_path / "s")])
    assert "annotation file not found" in str(e.value.code)
    assert main(common + ["--samples-per-shard", "5", "--no-progress"]) == 0
    assert "7 samples in 2 shards" in capsys.readouterr().out
