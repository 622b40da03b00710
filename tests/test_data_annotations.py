"""Annotation readers (spec 5) on small files written here, including malformed lines."""

import json

import pytest

from lfvila_model.data import annotations as ann


def _write(path, lines):
    path.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return path


def test_pretrain_jsonl_reads_clips_in_order(tmp_path):
    rows = [[{"clip_id": "vidA.0.mp4", "text": "first"}, {"clip_id": "vidA.1.mp4", "text": "second"}],
            [{"clip_id": "vidB.7.mp4", "text": "only"}]]
    p = _write(tmp_path / "p.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])  # blank line skipped
    got = ann.read_pretrain_jsonl(p)
    assert got == [ann.PretrainSample((ann.ClipText("vidA.0.mp4", "first"), ann.ClipText("vidA.1.mp4", "second"))),
                   ann.PretrainSample((ann.ClipText("vidB.7.mp4", "only"),))]


@pytest.mark.parametrize("bad, needle", [
    ('[{"clip_id": "a.0.mp4", "text": "x"}', "invalid JSON"),
    ('[{"clip_id": "a.0.mp4"}]', "missing key 'text'"),
    ('{"clip_id": "a.0.mp4", "text": "x"}', "must be a list"),
    ('[]', "at least one clip"),
    ('[{"clip_id": 5, "text": "x"}]', "'clip_id' must be a string"),
])
def test_pretrain_jsonl_malformed_line_names_file_and_line(tmp_path, bad, needle):
    good = json.dumps([{"clip_id": "a.0.mp4", "text": "x"}])
    p = _write(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(ann.AnnotationError) as ei:
        ann.read_pretrain_jsonl(p)
    assert f"{p}:3" in str(ei.value) and needle in str(ei.value)


def test_lmdb_value_is_a_python_literal_never_executed(tmp_path):
    v = "[{'clip_id': 'x.2.mp4', 'text': 'hi there'}, {'clip_id': 'x.3.mp4', 'text': 'bye'}]"
    s = ann.parse_pretrain_value(v.encode("utf-8"), "db[0]")
    assert [c.clip_id for c in s.clips] == ["x.2.mp4", "x.3.mp4"] and s.clips[1].text == "bye"
    marker = tmp_path / "pwned"
    with pytest.raises(ann.AnnotationError, match=r"db\[1\]: not a Python literal"):
        ann.parse_pretrain_value(f"__import__('pathlib').Path({str(marker)!r}).touch()", "db[1]")
    assert not marker.exists()
    with pytest.raises(TypeError, match="bytes or str"):
        ann.parse_pretrain_value(3)


def test_lmdb_reader_without_lmdb_says_how_to_get_it(tmp_path):
    try:
        import lmdb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install lmdb"):
            ann.read_pretrain_lmdb(tmp_path)
    else:  # with lmdb installed: a real round trip
        env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
        with env.begin(write=True) as txn:
            txn.put(b"0", repr([{"clip_id": "q.0.mp4", "text": "t"}]).encode())
        env.close()
        assert ann.read_pretrain_lmdb(tmp_path / "db")[0].clips[0].clip_id == "q.0.mp4"


def test_paths_follow_spec():
    assert ann.clip_video_path("/r", "abc.12.mp4") == "/r/abc/abc.12.mp4"
    assert ann.clip_video_path("/r", "abc") == "/r/abc/abc"
    assert ann.retrieval_video_path("/r", "v_1") == "/r/v_1.mp4"


def test_retrieval_text_list_or_string(tmp_path):
    p = _write(tmp_path / "r.jsonl", [json.dumps({"clip_id": "v1", "text": ["a.", "b."]}),
                                      json.dumps({"clip_id": "v2", "text": "one sentence"})])
    assert ann.read_retrieval_jsonl(p) == [ann.RetrievalRecord("v1", ("a.", "b.")),
                                           ann.RetrievalRecord("v2", ("one sentence",))]
    for bad in ({"clip_id": "v", "text": 5}, {"clip_id": "v", "text": []}, {"clip_id": "v", "text": ["a", 1]},
                {"text": "x"}):
        q = _write(tmp_path / "rb.jsonl", [json.dumps(bad)])
        with pytest.raises(ann.AnnotationError, match=f"{q}:1"):
            ann.read_retrieval_jsonl(q)


def test_how2qa(tmp_path):
    rec = {"clip_id": "h1", "span": [1.5, 4], "text_q": "what?", "text_a": ["a", "b", "c", "d"],
           "text_s": [{"text": "hello", "start": 0, "end": 1.25}], "answer_idx": 2}
    p = _write(tmp_path / "h.jsonl", [json.dumps(rec)])
    (r,) = ann.read_how2qa_jsonl(p)
    assert r == ann.How2QARecord("h1", (1.5, 4.0), "what?", ("a", "b", "c", "d"),
                                 (ann.Subtitle("hello", 0.0, 1.25),), 2)
    for key, val, needle in (("answer_idx", 4, "in \\[0, 4\\)"), ("span", [1], "span"),
                             ("text_s", [{"text": "x", "start": "0", "end": 1}], "start must be a number")):
        q = _write(tmp_path / "hb.jsonl", [json.dumps(rec), json.dumps({**rec, key: val})])
        with pytest.raises(ann.AnnotationError, match=f"{q}:2.*{needle}"):
            ann.read_how2qa_jsonl(q)


def test_violin(tmp_path):
    rec = {"clip_id": "v1", "text_q": "he smiles", "text_s": [{"text": "hi", "start": 2, "end": 3}], "answer": 1}
    p = _write(tmp_path / "v.jsonl", [json.dumps(rec)])
    assert ann.read_violin_jsonl(p) == [ann.ViolinRecord("v1", "he smiles", (ann.Subtitle("hi", 2.0, 3.0),), 1)]
    q = _write(tmp_path / "vb.jsonl", [json.dumps({**rec, "answer": 2})])
    with pytest.raises(ann.AnnotationError, match=f"{q}:1.*0 or 1"):
        ann.read_violin_jsonl(q)
    q = _write(tmp_path / "vb2.jsonl", [json.dumps({**rec, "answer": True})])
    with pytest.raises(ann.AnnotationError, match="must be an integer"):
        ann.read_violin_jsonl(q)


def test_activitynet_qa_and_classification(tmp_path):
    p = _write(tmp_path / "a.jsonl", [json.dumps({"video_name": "v_x", "question": "is it?", "answer": 17})])
    assert ann.read_activitynet_qa_jsonl(p) == [ann.ActivityNetQARecord("v_x", "is it?", 17)]
    q = _write(tmp_path / "ab.jsonl", [json.dumps({"video_name": "v_x", "question": "q", "answer": -1})])
    with pytest.raises(ann.AnnotationError, match=f"{q}:1.*>= 0"):
        ann.read_activitynet_qa_jsonl(q)
    c = _write(tmp_path / "c.jsonl", [json.dumps({"video_id": "c1", "recipe_type": 3}),
                                      json.dumps({"video_id": "c2", "recipe_type": 4.0})])
    assert ann.read_classification_jsonl(c) == [ann.ClassificationRecord("c1", 3), ann.ClassificationRecord("c2", 4)]
    d = _write(tmp_path / "d.jsonl", [json.dumps({"video_id": "c1", "label": 1})])
    assert ann.read_classification_jsonl(d, label_key="label")[0].label == 1
    with pytest.raises(ann.AnnotationError, match=f"{d}:1: missing key 'recipe_type'"):
        ann.read_classification_jsonl(d)


def test_missing_file_and_bad_path_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        ann.read_retrieval_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(TypeError, match="path must be"):
        ann.read_retrieval_jsonl(42)


def test_write_jsonl_round_trip(tmp_path):
    rows = [[{"clip_id": "z.0.mp4", "text": "ünïcode"}]]
    ann.write_jsonl(tmp_path / "w.jsonl", rows)
    assert (tmp_path / "w.jsonl").read_text(encoding="utf-8") == json.dumps(rows[0], ensure_ascii=False) + "\n"
    assert ann.read_pretrain_jsonl(tmp_path / "w.jsonl")[0].clips[0].text == "ünïcode"
