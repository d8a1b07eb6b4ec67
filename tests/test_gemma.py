"""Gemma 2 and Gemma 3 (text), described by data (surgeon/architectures/gemma2.json, gemma3_text.json).

What sets them apart (DESIGN §4): every norm computes x·(1 + w) and stores w, so an identity insertion and every
rescaling act on λ = 1 + w (GatedNorm's doubling stores 2w + 1); sandwich norms — only the pre-norms read the
residual stream, the post-attention / post-feed-forward norms write it; a GeGLU MLP (gelu_pytorch_tanh), which
the GLU pass anneals from; embeddings scaled by √d; Gemma 3's per-head q/k norms and local/global layers.

Invariant, on tiny random models of both families, tied and untied (one sliding-window layer, a window shorter
than the input): every pass alone and the main job's chain preserve the logits (bit for bit where the formula is
exact in floats, else within 1e-5 relative: λ − 1 is stored, so λ/s is rounded once); the parameters are those
the formulas give; the chain loads without surgeon; GLU at α = 1 is the stock family with a sigmoid MLP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import HIDE_SURGEON, input_ids, logits, make_tiny, write_words
from transformers import AutoConfig, AutoModelForCausalLM

from surgeon.convert import convert
from surgeon.io import Checkpoint
from surgeon.scan import ScanReport
from surgeon.transforms import GLU, AbsorbSinks, GatedAttention, GatedNorm, Hadamard, PreAffine, Smooth

FAMILIES = ("gemma2", "gemma3_text")
# one local (sliding-window) layer and one global one; a window shorter than the 16-token input, so it matters
OVERRIDES = {"gemma2": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
             "gemma3_text": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"])}
SINK, FACTOR = 5, 16.0
READERS = ("input_layernorm", "pre_feedforward_layernorm")
WRITERS = ("post_attention_layernorm", "post_feedforward_layernorm")


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * a.abs().max().item()


def tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.tensors}


def build(path, family, tied):
    """A tiny model with a residual sink at SINK: the embedding column and both post-norms' λ[SINK] (the residual
    writers) multiplied by FACTOR — on λ = 1 + w, as the family computes it — found by name, not by the data."""
    make_tiny(path, family, tied, config_overrides=OVERRIDES[family])
    (shard,) = path.glob("*.safetensors")
    state = load_file(shard)
    for name, t in state.items():
        if "norm" in name:  # λ = 1 + w in [0.5, 1.5], as make_tiny's other families have it
            t.sub_(1.0)
    state["model.embed_tokens.weight"][:, SINK] *= FACTOR
    for name, t in state.items():
        if name.endswith(tuple(f"{w}.weight" for w in WRITERS)):
            t[SINK] = (1 + t[SINK]) * FACTOR - 1
    save_file(state, shard, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {(f, tied): build(root / f"{f}-{'tied' if tied else 'untied'}", f, tied)
            for f in FAMILIES for tied in (False, True)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_words(tmp_path_factory.mktemp("text") / "words.txt", 200)


PASSES = {
    "gated-norm": lambda corpus: [GatedNorm(rank=4)],
    "pre-affine": lambda corpus: [PreAffine()],
    "absorb-sinks": lambda corpus: [AbsorbSinks(sinks=[SINK], scale=FACTOR)],
    "smooth": lambda corpus: [Smooth(data=corpus, tokens=512, seq_len=32)],
    "hadamard": lambda corpus: [Hadamard()],
    "glu": lambda corpus: [GLU()],
    "gated-attention": lambda corpus: [GatedAttention()],
    "chain": lambda corpus: [GatedNorm(rank=4), GatedAttention(), PreAffine(), AbsorbSinks(sinks=[SINK], scale=FACTOR),
                             Smooth(data=corpus, tokens=512, seq_len=32), Hadamard(), GLU()],
}
EXACT = {"pre-affine", "glu"}  # the others rescale λ = 1 + w and store λ − 1: one rounding


CASES = [(f, tied) for f in FAMILIES for tied in (False, True)]


@pytest.mark.parametrize("name", sorted(PASSES))
@pytest.mark.parametrize("family,tied", CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def test_every_pass_preserves_the_function(sources, corpus, tmp_path, family, tied, name):
    src, out = sources[(family, tied)], tmp_path / "out"
    report = convert(src, out, PASSES[name](corpus), verify=True, show_progress=False)
    assert report.family == family and report.verify["ok"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == (family if name == "smooth" else f"surgeon_{family}")  # smooth: weights only
    if name != "smooth":
        assert config["surgeon"]["norm_offset"] == 1.0
    before, after = logits(src), logits(out)
    assert torch.equal(before, after) if name in EXACT else close(before, after), (before - after).abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_act_on_one_plus_w(sources, tmp_path, family):
    """GatedNorm doubles λ = 1 + w (stores 2w + 1) on the pre-norms and the final norm only; absorb-sinks divides
    the post-norms' λ[k] (the writers) and the embedding column by s and puts s into the readers' λ1."""
    src = sources[(family, False)]
    before = tensors(src)
    gated, absorbed = tmp_path / "gated", tmp_path / "absorbed"
    convert(src, gated, [GatedNorm(rank=4)], show_progress=False)
    convert(src, absorbed, [AbsorbSinks(sinks=[SINK], scale=FACTOR)], show_progress=False)
    g, a = tensors(gated), tensors(absorbed)
    readers = [f"model.layers.{i}.{n}" for i in range(2) for n in READERS] + ["model.norm"]
    writers = [f"model.layers.{i}.{n}" for i in range(2) for n in WRITERS]
    for norm in readers:
        w = before[f"{norm}.weight"]
        torch.testing.assert_close(g[f"{norm}.weight"], 2 * w + 1, rtol=0, atol=1e-6)
        assert torch.equal(g[f"{norm}.gate_up.weight"], torch.zeros(48, 4))
        expected = torch.ones(48)
        expected[SINK] = FACTOR
        assert torch.equal(a[f"{norm}.pre_affine"], expected)
    for norm in writers:
        assert torch.equal(g[f"{norm}.weight"], before[f"{norm}.weight"]) and f"{norm}.gate_up.weight" not in g
        lam, lam_after = 1 + before[f"{norm}.weight"], 1 + a[f"{norm}.weight"]
        torch.testing.assert_close(lam_after[SINK], lam[SINK] / FACTOR, rtol=1e-6, atol=0)
        others = torch.arange(48) != SINK
        assert torch.equal(a[f"{norm}.weight"][others], before[f"{norm}.weight"][others])
    if family == "gemma3_text":  # the q/k norms read neither the stream nor a gate
        q = "model.layers.0.self_attn.q_norm.weight"
        assert torch.equal(g[q], before[q]) and torch.equal(a[q], before[q])
    embed = "model.embed_tokens.weight"
    assert torch.equal(a[embed][:, SINK], before[embed][:, SINK] / FACTOR)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_scan_finds_the_sink_and_reads_lambda(sources, corpus, tmp_path, family):
    """The scan reports the sink and each reader's effective λ = 1 + w (what the model scales by), not w (scan.json
    rounds to 5 significant digits)."""
    from surgeon.cli import main

    src = sources[(family, False)]
    assert main(["scan", str(src), "--data", str(corpus), "--tokens", "256", "--seq-len", "32",
                 "--out", str(tmp_path / "scan")]) == 0
    report = ScanReport.load(tmp_path / "scan" / "scan.json")
    assert report.sink_dims[:1] == [SINK]
    at_sink = report.sinks[0].norm_weights
    w = tensors(src)
    assert at_sink["final"] == pytest.approx(1 + float(w["model.norm.weight"][SINK]), rel=1e-4)
    assert at_sink["input_layernorm"][0] == pytest.approx(
        1 + float(w["model.layers.0.input_layernorm.weight"][SINK]), rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chain_loads_without_surgeon(sources, corpus, tmp_path, family):
    src, out = sources[(family, True)], tmp_path / "chain"
    convert(src, out, PASSES["chain"](corpus), verify=True, show_progress=False)
    expected = logits(src)
    torch.save(input_ids(), tmp_path / "ids.pt")
    script = HIDE_SURGEON + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__name__.startswith("SurgeonGemma"), type(model).__name__
        with torch.no_grad():
            torch.save(model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert close(expected, torch.load(tmp_path / "out.pt"))


@pytest.mark.parametrize("family", FAMILIES)
def test_glu_anneals_from_the_geglu_activation(sources, tmp_path, family):
    """α = 0 keeps gelu_pytorch_tanh exactly; α = 1 is the stock family with hidden_activation "sigmoid"."""
    src = sources[(family, False)]
    half, full = tmp_path / "half", tmp_path / "full"
    convert(src, half, [GLU()], show_progress=False)
    block = json.loads((half / "config.json").read_text())["surgeon"]["glu"]
    assert block["from"] == "gelu_pytorch_tanh" and block["activation_key"] == "hidden_activation"
    with pytest.warns(UserWarning, match="changes the function"):
        convert(src, full, [GLU(alpha=1.0)], show_progress=False)
    config = json.loads((full / "config.json").read_text())
    assert config["model_type"] == family and config["hidden_activation"] == "sigmoid" and "auto_map" not in config
    stock_config = AutoConfig.from_pretrained(src)
    stock_config.hidden_activation = "sigmoid"
    stock = AutoModelForCausalLM.from_pretrained(src, config=stock_config).eval()
    with torch.no_grad():
        expected = stock(input_ids=input_ids()).logits
    assert torch.equal(logits(full), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_smooth_keeps_a_dead_channel(sources, corpus, tmp_path, family):
    """A norm channel with λ = 1 + w = 0 (w = −1 stored; Gemma-3-270M's layer 0 has one): λ/s stays 0, so its
    readers' columns take s as elsewhere rather than 0/0 — smoothing is still exact to one rounding."""
    import shutil

    src = tmp_path / "dead"
    shutil.copytree(sources[(family, False)], src)
    (shard,) = src.glob("*.safetensors")
    state = load_file(shard)
    state["model.layers.0.pre_feedforward_layernorm.weight"][7] = -1.0
    save_file(state, shard, metadata={"format": "pt"})
    out = tmp_path / "smoothed"
    report = convert(src, out, PASSES["smooth"](corpus), verify=True, show_progress=False)
    assert report.verify["ok"]
    assert torch.equal(tensors(out)["model.layers.0.pre_feedforward_layernorm.weight"][7], torch.tensor(-1.0))
    assert close(logits(src), logits(out))
