"""encode_videos / encode_paragraphs, `lfvila embed` and `lfvila search` on tiny real video files."""

import contextlib
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lfvila_model.cli import main
from lfvila_model.data import annotations as ann
from lfvila_model.data.datasets import RetrievalDataset
from lfvila_model.data.text import ParagraphTokenizer
from lfvila_model.data.video import count_frames, decode_frames, downstream_indices, eval_transform
from lfvila_model.eval.embed import (encode_video_files, list_videos, read_index, resolve_precision,
                                     split_sentences, tokenize_paragraphs)
from lfvila_model.eval.run import encode_retrieval
from tests.helpers import CORRUPT, SENTENCES, VIDEOS, embed_model, make_videos

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(VIDEOS)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return str(make_videos(tmp_path_factory.mktemp("videos")))


@pytest.fixture(scope="module", params=["pretrain", "retrieval"])
def model(request):
    return embed_model(request.param)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    embed_model("pretrain").save_pretrained(d)
    return d


def _run(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


# -- text -----------------------------------------------------------------------------------------------------------


def test_split_sentences():
    assert split_sentences("A man opens a door. He walks in!\nThe end") == ["A man opens a door.", "He walks in!",
                                                                           "The end"]
    assert split_sentences('He says "hi!" Then  he sits?  ') == ['He says "hi!"', "Then  he sits?"]
    assert split_sentences("no punctuation at all") == ["no punctuation at all"]
    assert split_sentences("3.5 kg. Done") == ["3.5 kg.", "Done"]  # no white space after the first '.'
    assert split_sentences(" \n ") == []


def test_tokenize_paragraphs_forms(model):
    cfg = model.config
    ids, mask = tokenize_paragraphs(["One. Two.", ["One.", "Two."]], cfg)
    assert ids.shape == mask.shape == (2, cfg.num_sentences, cfg.max_sentence_len)
    assert torch.equal(ids[0], ids[1]) and torch.equal(mask[0], mask[1])
    one, _ = tokenize_paragraphs("One. Two.", cfg)  # a bare string is one paragraph
    assert torch.equal(one[0], ids[0])
    with pytest.raises(ValueError, match="no text"):
        tokenize_paragraphs([" "], cfg)
    with pytest.raises(TypeError, match=r"paragraphs\[0\]"):
        tokenize_paragraphs([3], cfg)


# -- the model API --------------------------------------------------------------------------------------------------


def test_encode_videos_paths_normalised_float32(model, videos):
    paths = [os.path.join(videos, n) for n in NAMES]
    f = model.encode_videos(paths, batch_size=3)
    assert f.dtype == torch.float32 and f.device.type == "cpu"
    assert f.shape == (len(paths), model.embedding_dim)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(len(paths)))
    assert model.training  # the mode is restored


def test_paths_and_tensors_agree(model, videos):
    """A tensor sampled as the evaluation samples (indices over the whole video, eval transform) gives the same
    features as the path; the batch size does not matter."""
    cfg = model.config.video
    clips = []
    for n in NAMES:
        path = os.path.join(videos, n)
        idx = downstream_indices(count_frames(path), cfg.num_frames, False)
        clips.append(eval_transform(decode_frames(path, idx), cfg.input_size))
    t = model.encode_videos(torch.stack(clips), batch_size=2)
    p = model.encode_videos([os.path.join(videos, n) for n in NAMES], batch_size=4, num_workers=1)
    torch.testing.assert_close(t, p, rtol=1e-5, atol=1e-6)


def test_score_matrix_equals_the_evaluation(model, videos):
    """encode_paragraphs(p) @ encode_videos(v).T is the retrieval evaluation's t2v score matrix."""
    top = [n for n in NAMES if "/" not in n]
    records = [ann.RetrievalRecord(n[:-4], tuple(SENTENCES[n])) for n in top]
    tok = ParagraphTokenizer(num_sentences=model.config.num_sentences, max_length=model.config.max_sentence_len)
    ds = RetrievalDataset(records, videos, tok, num_frames=model.config.video.num_frames,
                          size=tuple(model.config.video.input_size), train=False)
    v_eval, p_eval, skipped = encode_retrieval(model, ds, batch_size=2)
    assert not skipped
    v = model.encode_videos([os.path.join(videos, n) for n in top], batch_size=3)
    p = model.encode_paragraphs([SENTENCES[n] for n in top])
    torch.testing.assert_close(p @ v.T, p_eval @ v_eval.T, rtol=1e-5, atol=1e-5)
    # the same paragraphs as strings split into the same sentences
    torch.testing.assert_close(model.encode_paragraphs([" ".join(SENTENCES[n]) for n in top]), p)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(len(top)))
    assert p.dtype == torch.float32 and p.shape == (len(top), model.embedding_dim)


def test_encode_videos_refuses_bad_input(model, videos):
    with pytest.raises(ValueError, match=CORRUPT):
        model.encode_videos([os.path.join(videos, "a.mp4"), os.path.join(videos, CORRUPT)])
    with pytest.raises(ValueError, match="num_frames and input_size"):
        model.encode_videos(torch.zeros(1, 3, 2, 24, 40))
    with pytest.raises(ValueError, match="batch_size"):
        model.encode_videos(torch.zeros(1, 3, 4, 24, 40), batch_size=0)


def test_unreadable_files_are_skipped_with_their_reason(model, videos):
    root, ids, paths = list_videos(videos)
    assert ids == sorted([*NAMES, CORRUPT]) and root == os.path.abspath(videos)
    f, kept, skipped = encode_video_files(model, paths, ids, batch_size=2)
    assert kept == NAMES and f.shape == (len(NAMES), model.embedding_dim)
    assert list(skipped) == [CORRUPT] and "cannot open" in skipped[CORRUPT]
    torch.testing.assert_close(f, model.encode_videos([os.path.join(videos, n) for n in NAMES]))


def test_precision_is_fp32_on_the_cpu():
    cpu = torch.device("cpu")
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "fp16", "bf16")] == ["fp32"] * 4
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


# -- lfvila embed / search ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(tmp_path_factory, videos, checkpoint):
    prefix = str(tmp_path_factory.mktemp("index") / "my")
    out = _run(["embed", "--checkpoint", checkpoint, "--videos", videos, "--out", prefix, "--batch-size", "3",
                "--workers", "1", "--no-progress"])
    assert f"{len(NAMES)} videos" in out and f"skipped {CORRUPT}" in out
    return prefix


def test_embed_writes_the_index(index, videos, checkpoint):
    with open(index + ".json") as f:
        doc = json.load(f)
    assert doc["ids"] == NAMES  # relative to --videos, '/'-separated, row order
    assert list(doc["skipped"]) == [CORRUPT] and doc["skipped"][CORRUPT]
    assert doc["checkpoint"] == os.path.abspath(checkpoint) and doc["preset"] is None
    model = embed_model("pretrain")
    assert doc["num_frames"] == model.config.video.num_frames
    assert doc["input_size"] == list(model.config.video.input_size)
    assert doc["model_type"] == "pretrain" and doc["precision"] == "fp32"
    assert doc["videos_root"] == os.path.abspath(videos)
    feats = load_file(index + ".safetensors")["features"]
    assert feats.dtype == torch.float32 and feats.shape == (len(NAMES), model.embedding_dim) == (len(NAMES), doc["dim"])
    torch.testing.assert_close(feats, model.encode_videos([os.path.join(videos, n) for n in NAMES]))
    idx = read_index(index + ".json")
    assert idx.ids == NAMES and idx.skipped == doc["skipped"] and torch.equal(idx.features, feats)


def test_embed_files_ids_relative_to_their_folder(tmp_path, videos):
    prefix = str(tmp_path / "files")
    files = [os.path.join(videos, "sub", "d.mp4"), os.path.join(videos, "b.mp4")]
    _run(["embed", "--preset", "lfvila-demo", "--videos", *files, "--out", prefix, "--workers", "0",
          "--no-progress"])
    idx = read_index(prefix)
    assert idx.ids == ["b.mp4", "sub/d.mp4"] and idx.meta["preset"] == "lfvila-demo"
    assert idx.meta["checkpoint"] is None and idx.meta["num_frames"] == 8 and idx.skipped == {}


def test_embed_from_a_run_directory_takes_its_latest_checkpoint(tmp_path, videos):
    """As `lfvila evaluate --checkpoint RUN_DIR`: the newest complete checkpoints/step-N of the run."""
    for step, seed in ((1, 5), (2, 0)):
        ck = tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
        embed_model("retrieval", seed=seed).save_pretrained(str(ck))
        (ck / "trainer_state.pt").write_bytes(b"")
    prefix = str(tmp_path / "run_index")
    _run(["embed", "--checkpoint", str(tmp_path / "run"), "--videos", os.path.join(videos, "a.mp4"), "--out",
          prefix, "--workers", "0", "--no-progress"])
    idx = read_index(prefix)
    assert idx.meta["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step-00000002")
    torch.testing.assert_close(idx.features, embed_model("retrieval").encode_videos(os.path.join(videos, "a.mp4")))


def test_search_json_order_and_scores(index, videos):
    q = "A red square moves left. It stops."
    res = json.loads(_run(["search", "--index", index, "--json", q]))
    assert [r["id"] for r in res] and sorted(r["id"] for r in res) == NAMES
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True)
    model = embed_model("pretrain")
    expect = model.encode_paragraphs([q]) @ model.encode_videos([os.path.join(videos, n) for n in NAMES]).T
    for r in res:
        assert r["score"] == pytest.approx(float(expect[0, NAMES.index(r["id"])]), abs=1e-5)
    top2 = json.loads(_run(["search", "--index", index, "--json", "--top-k", "2", q]))
    assert top2 == res[:2]
    text = _run(["search", "--index", index, q])
    assert text.splitlines()[0].split()[-1] == res[0]["id"]


@pytest.mark.parametrize("cmd,words", [("embed", ["--checkpoint", "--preset", "--videos", "--out", "--workers",
                                                  "--precision", "skipped"]),
                                       ("search", ["--index", "--top-k", "--json", "paragraph"]),
                                       ("serve", ["--index", "--videos", "--host", "127.0.0.1", "--port",
                                                  "/api/search"])])
def test_help(cmd, words, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out, w
    with pytest.raises(SystemExit):
        main(["--help"])
    assert cmd in capsys.readouterr().out


def test_encode_mixin_refuses_a_model_without_its_feature_functions():
    from lfvila_model.models import _EncodeMixin

    with pytest.raises(TypeError, match="_paragraph_features"):
        type("VideoOnly", (_EncodeMixin,), {"_video_features": lambda self, video: video})
