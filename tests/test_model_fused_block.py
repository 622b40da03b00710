"""The memory-saving block Functions (lfvila_model/fused_block.py) against the plain nn modules: the same outputs
and gradients (float64), less kept for the backward (counted with saved-tensor hooks), the fallbacks, and the
stage-1 model's backward order that lets the video tower free its activations first."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfvila_model import build_model
from lfvila_model.fused_block import mlp, norm_linear, norm_mlp
from lfvila_model.video_encoder import PatchMerging, SwinBlock3D

from tests.helpers import make_inputs, preset_config
from tests.test_model_block import official_block


def _modules(C, hidden, out, *, affine=True, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ln = nn.LayerNorm(C, elementwise_affine=affine).to(dtype)
    fc1 = nn.Linear(C, hidden, bias=bias).to(dtype)
    fc2 = nn.Linear(hidden, out, bias=bias).to(dtype)
    with torch.no_grad():
        for p in [*ln.parameters(), *fc1.parameters(), *fc2.parameters()]:
            p.normal_(0.0, 0.7)  # non-trivial LayerNorm affine and biases: every term of the gradient shows
    return ln, fc1, fc2


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("affine,bias", [(True, True), (False, False), (True, False)])
def test_norm_mlp_equals_plain_modules_fp64(affine, bias):
    ln, fc1, fc2 = _modules(24, 96, 20, affine=affine, bias=bias)
    x = torch.randn(2, 3, 4, 5, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, 5, 20, dtype=torch.float64)  # a random upstream gradient
    params = [x, *ln.parameters(), *fc1.parameters(), *fc2.parameters()]
    want = fc2(F.gelu(fc1(ln(x))))
    got = norm_mlp(x, ln, fc1, fc2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, r in zip(_grads((got * w).sum(), params), _grads((want * w).sum(), params)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


@pytest.mark.parametrize("affine,bias", [(True, True), (False, False)])
def test_norm_linear_equals_plain_modules_fp64(affine, bias):
    ln, fc, _ = _modules(16, 48, 1, affine=affine, bias=bias, seed=1)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 48, dtype=torch.float64)
    params = [x, *ln.parameters(), *fc.parameters()]
    want = fc(ln(x))
    got = norm_linear(x, ln, fc)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, r in zip(_grads((got * w).sum(), params), _grads((want * w).sum(), params)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


def test_gradcheck():
    # gradcheck perturbs its inputs in place, so the modules' own parameters can be passed as inputs
    ln, fc1, fc2 = _modules(6, 10, 5, seed=2)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    mlp_params = [*ln.parameters(), *fc1.parameters(), *fc2.parameters()]
    assert torch.autograd.gradcheck(lambda x, *p: norm_mlp(x, ln, fc1, fc2), (x, *mlp_params))
    assert torch.autograd.gradcheck(lambda x, *p: norm_linear(x, ln, fc1), (x, *ln.parameters(), *fc1.parameters()))


def _saved_activation_elements(fn, params):
    """Elements of the non-parameter tensors autograd keeps for the backward of `fn()` (each storage once)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_norm_mlp_keeps_input_stats_and_pre_activation_only():
    N, C, hidden = 64, 32, 128
    ln, fc1, fc2 = _modules(C, hidden, C, dtype=torch.float32)
    x = torch.randn(N, C, requires_grad=True)
    params = [*ln.parameters(), *fc1.parameters(), *fc2.parameters()]
    fused = _saved_activation_elements(lambda: norm_mlp(x, ln, fc1, fc2), params)
    plain = _saved_activation_elements(lambda: fc2(F.gelu(fc1(ln(x)))), params)
    assert fused == N * C + 2 * N + N * hidden  # x, mean and rstd, fc1's output
    assert plain == 2 * N * C + 2 * N + 2 * N * hidden  # + the normalised x and the GELU output


_HELD_CHILD = r"""
import gc, json, os, sys
import torch
import torch.nn.functional as F
from torch import nn
from lfvila_model.fused_block import norm_mlp

def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

N, C, hidden = 131072, 128, 512
ln, fc1, fc2 = nn.LayerNorm(C), nn.Linear(C, hidden), nn.Linear(hidden, C)
fn = {"fused": lambda x: norm_mlp(x, ln, fc1, fc2), "plain": lambda x: fc2(F.gelu(fc1(ln(x))))}[sys.argv[1]]
fn(torch.randn(256, C, requires_grad=True)).sum().backward()  # first calls: thread pool, kernel set-up
x = torch.randn(N, C, requires_grad=True)
gc.collect()
before = rss_bytes()
out = fn(x)
print(json.dumps((rss_bytes() - before) / 2**20))
"""


def _held_mib(variant: str) -> float:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _HELD_CHILD, variant], capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1])


def test_norm_mlp_forward_holds_less_resident_memory():
    # Linux only, as the project's machines and CI: the current resident set comes from /proc/self/statm (the
    # portable getrusage gives the peak, which the forward's freed temporaries would set).
    # What the forward leaves alive, however it is kept (saved tensors or anything else): the resident set after
    # the forward minus before, each variant in a fresh process (a process that has run other tests can serve new
    # tensors from memory it already holds). Every tensor here is >= 64 MiB, which glibc mmaps and returns to the
    # system when freed, so the difference is what is still held. Fused: fc1's output h (256 MiB) + the output
    # (64 MiB); plain: + the normalised x (64 MiB) and the GELU output (256 MiB). The margins allow for tens of MiB
    # of allocator and thread state; keeping the GELU output in any form would add 256 MiB to the fused side.
    held = {v: _held_mib(v) for v in ("fused", "plain")}
    assert held["fused"] < 256 + 64 + 64, held
    assert held["plain"] > held["fused"] + 224, held


def test_block_keeps_ten_floats_per_token_and_channel():
    # the whole block: x, qkv (3C), the attention output, the mid-block residual, fc1's output (4C) = 10 C per token,
    # against 16 C with the plain modules (+ the LayerNorm statistics and the attention's logsumexp, both per token)
    C, heads, grid = 32, 2, (2, 6, 10)
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(1, *grid, C, requires_grad=True)
    kept = {}
    for fused in (True, False):
        blk = SwinBlock3D(C, heads, (2, 3, 5), True, 4.0, True, 0.0, 0.0, "reference", "pad", fused=fused)
        blk.attn.backend = "cpp" if fused else "reference"
        params = list(blk.parameters())
        kept[fused] = _saved_activation_elements(lambda: blk(x), params)
    assert 10 * n * C <= kept[True] <= 10 * n * C + 8 * n * heads
    assert kept[False] >= 16 * n * C


def test_autocast_bf16_matches_plain_modules():
    ln, fc1, fc2 = _modules(32, 128, 32, dtype=torch.float32, seed=3)
    x = torch.randn(4, 10, 32, requires_grad=True)
    params = [x, *ln.parameters(), *fc1.parameters(), *fc2.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fc2(F.gelu(fc1(ln(x))))
        got = norm_mlp(x, ln, fc1, fc2)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same ops in the same dtypes
    w = torch.randn(4, 10, 32)
    for g, r, p in zip(_grads((got.float() * w).sum(), params), _grads((want.float() * w).sum(), params), params):
        assert g.dtype == p.dtype
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


def test_shape_errors_name_the_arguments():
    ln, fc1, fc2 = _modules(8, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x's last axis \(9\).*fc1.in_features \(8\)"):
        norm_mlp(torch.randn(2, 9), ln, fc1, fc2)
    with pytest.raises(ValueError, match="fc2.in_features=8 must equal fc1.out_features=16"):
        norm_mlp(torch.randn(2, 8), ln, fc1, nn.Linear(8, 8))


@pytest.mark.parametrize("grid,window,shifted", [((4, 6, 10), (2, 3, 5), True), ((3, 7, 11), (4, 3, 5), True)])
def test_fused_block_gradients_equal_the_official_block_fp64(grid, window, shifted):
    # the second grid is ragged: the official zero padding of the normalised tokens takes the plain LayerNorm there
    torch.manual_seed(0)
    blk = SwinBlock3D(64, 2, window, shifted, 4.0, True, 0.0, 0.0, "reference", "pad", fused=True).double()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_(0, 1.0)
        for ln in (blk.norm1, blk.norm2):
            ln.weight.normal_(1.0, 0.3)
            ln.bias.normal_(0.0, 0.3)
    x = torch.randn(2, *grid, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, *grid, 64, dtype=torch.float64)
    params = [x, *blk.parameters()]
    got = _grads((blk(x) * w).sum(), params)
    want = _grads((official_block(blk, x) * w).sum(), params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


def test_mlp_dropout_in_training_takes_the_plain_modules(monkeypatch):
    import lfvila_model.video_encoder as ve

    calls = []
    monkeypatch.setattr(ve, "norm_mlp", lambda *a: calls.append(1) or norm_mlp(*a))
    blk = SwinBlock3D(32, 1, (2, 3, 5), False, 4.0, True, 0.1, 0.0, "reference", "pad", fused=True)
    x = torch.randn(1, 2, 3, 5, 32)
    blk.train()(x)
    assert calls == []  # dropout inside the MLP: the plain modules
    blk.eval()(x)
    assert calls == [1]  # eval: dropout is the identity, the fused Function runs
    with torch.no_grad():
        blk(x)
    assert calls == [1]  # no autograd: nothing to save, the plain modules


def test_patch_merging_fused_equals_plain_fp64():
    torch.manual_seed(4)
    pm = PatchMerging(8, fused=True).double()
    with torch.no_grad():
        pm.norm.weight.normal_(1.0, 0.3)
        pm.norm.bias.normal_(0.0, 0.3)
    x = torch.randn(1, 2, 5, 7, 8, dtype=torch.float64, requires_grad=True)  # odd H, W: the zero pad
    params = [x, *pm.parameters()]
    got = pm(x)
    pm.fused = False
    want = pm(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn_like(got)
    for g, r in zip(_grads((got * w).sum(), params), _grads((want * w).sum(), params)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)


def test_stage1_model_fused_and_plain_blocks_agree_fp64():
    cfgs = {f: preset_config(video={"fused_blocks": f}, text={"fused_ffn": f}) for f in (True, False)}
    grads, losses = {}, {}
    for fused, cfg in cfgs.items():
        torch.manual_seed(0)
        model = build_model(cfg).double().train()
        video, ids, mask = make_inputs(cfg, seed=5)
        torch.manual_seed(1)  # the same stochastic-depth and text dropout draws on both sides
        out = model(video.double(), ids, mask, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        losses[fused] = out["loss"].detach()
        grads[fused] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=1e-10)
    assert set(grads[True]) == set(grads[False])
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=0, atol=1e-9, msg=n)


def _sentence_paragraph_param(cfg, name: str) -> bool:
    """The text tower's embeddings and its sentence + paragraph layers (not the cross-modal ones, which run after
    the video tower in the QA models and so come before it in the backward)."""
    if name.startswith("text_encoder.bert.embeddings."):
        return True
    prefix = "text_encoder.bert.encoder.layer."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".")[0]) < cfg.text.num_sentence_layers + cfg.text.num_paragraph_layers
    return False


def _qa_inputs(cfg, model_type):
    video, ids, mask = make_inputs(cfg, seed=6)
    if model_type == "qa_multichoice":
        K = cfg.num_choices
        ids, mask = ids[:, None].repeat(1, K, 1, 1), mask[:, None].repeat(1, K, 1, 1)
        return (video, ids, mask), {"labels": torch.tensor([1, 0])}
    if model_type == "qa_classification":
        return (video, ids, mask), {"labels": torch.tensor([0, 1])}
    if model_type == "pretrain":
        return (video, ids, mask), {"generator": torch.Generator().manual_seed(0)}
    return (video, ids, mask), {}


@pytest.mark.parametrize("model_type,changes", [("pretrain", {}), ("retrieval", {}),
                                                ("qa_multichoice", {"num_sentences": 3}),
                                                ("qa_classification", {"num_labels": 3, "num_sentences": 2})])
def test_backward_runs_the_video_tower_before_the_text_tower(model_type, changes):
    # The sentence and paragraph encoders run first in the forward, so autograd (later-built nodes first) reaches
    # every video-encoder parameter before any of theirs: the video activations are freed before those text
    # gradients exist.
    cfg = preset_config(model_type=model_type, **changes)
    model = build_model(cfg).train()
    order = []
    for name, p in model.named_parameters():
        if name.startswith("video_encoder.") or _sentence_paragraph_param(cfg, name):
            p.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name.split(".")[0]))
    args, kwargs = _qa_inputs(cfg, model_type)
    model(*args, **kwargs)["loss"].backward()
    first_text = order.index("text_encoder")
    assert order[:first_text].count("video_encoder") == sum(
        1 for n, p in model.named_parameters() if n.startswith("video_encoder.") and p.grad is not None)
    assert "video_encoder" not in order[first_text:]


def test_stage1_model_under_bf16_autocast_fused_and_plain_blocks_agree():
    # mixed precision as the training loop runs it (autocast around the forward, backward outside)
    results = {}
    for fused in (True, False):
        cfg = preset_config(video={"fused_blocks": fused, "attention_backend": "auto"}, text={"fused_ffn": fused})
        torch.manual_seed(0)
        model = build_model(cfg).train()
        video, ids, mask = make_inputs(cfg, seed=7)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(video, ids, mask, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        results[fused] = (out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for n, g in results[True][1].items():
        assert g.dtype == torch.float32, n
        torch.testing.assert_close(g, results[False][1][n], rtol=1e-2, atol=1e-4, msg=n)


def test_non_contiguous_input():
    # a channels-first tensor permuted to channels-last: the Functions take a copy and return gradients in x's shape
    ln, fc1, fc2 = _modules(8, 32, 8, seed=5)
    base = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    x = base.permute(0, 2, 3, 1)
    assert not x.is_contiguous()
    params = [base, *ln.parameters(), *fc1.parameters(), *fc2.parameters()]
    got, want = norm_mlp(x, ln, fc1, fc2), fc2(F.gelu(fc1(ln(x))))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, r in zip(_grads(got.sum(), params), _grads(want.sum(), params)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)
    got = norm_linear(x, ln, fc1)
    torch.testing.assert_close(_grads(got.sum(), [base])[0], _grads(fc1(ln(x)).sum(), [base])[0], rtol=0, atol=1e-11)


def test_mlp_without_norm_equals_plain_modules_fp64():
    _, fc1, fc2 = _modules(12, 40, 12, seed=8)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 12, dtype=torch.float64)
    params = [x, *fc1.parameters(), *fc2.parameters()]
    got, want = mlp(x, fc1, fc2), fc2(F.gelu(fc1(x)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for g, r in zip(_grads((got * w).sum(), params), _grads((want * w).sum(), params)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)
    assert torch.autograd.gradcheck(lambda x, *p: mlp(x, fc1, fc2), (x, *fc1.parameters(), *fc2.parameters()))
    with pytest.raises(ValueError, match=r"x's last axis \(11\) must equal fc1.in_features \(12\)"):
        mlp(torch.randn(2, 11), fc1, fc2)


def test_bert_layer_fused_ffn_equals_the_plain_layer_fp64():
    from transformers.models.bert.modeling_bert import BertLayer

    from lfvila_model.config import TextEncoderConfig
    from lfvila_model.text_encoder import BertLayerFused

    bert_cfg = TextEncoderConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                 attn_implementation="eager").to_bert_config(1)
    torch.manual_seed(9)
    plain = BertLayer(bert_cfg, layer_idx=0).double().eval()  # eval: dropout off, so both see the same numbers
    fused = BertLayerFused(bert_cfg, layer_idx=0).double().eval()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, 32, dtype=torch.float64)
    outs, grads = [], []
    for layer in (fused, plain):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        outs.append(out)
        grads.append(_grads((out * w).sum(), [x, *layer.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    for g, r in zip(*grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-11)
    saved = [_saved_activation_elements(lambda layer=layer: layer(x), list(layer.parameters()))
             for layer in (fused, plain)]
    assert saved[1] - saved[0] == 2 * 7 * 64  # the GELU output (tokens x intermediate) is no longer kept
