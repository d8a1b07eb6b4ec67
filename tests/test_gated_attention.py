"""gated-attention (transforms/gated_attention.py): an identity-initialized sigmoid gate on every attention output.

Invariant: logits equal the source's on every family (dense and MoE, tied and untied, both granularities); added
exactly `<attention>.output_gate.weight` = 0 of shape (H·d_h or H, d) per layer, o_proj's weight doubled, everything
else bit-identical; round trip and a load with only torch + transformers; stacked with every other pass, also on a
gate that is no longer the identity (smooth scales its columns, hadamard rotates its input); refused twice and out
of order; trained in the new-parameter group."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert import LOAD_WITHOUT_SURGEON, assert_close_logits, tensors
from tiny import ALL_FAMILIES, input_ids, logits, make_tiny, write_words

from surgeon.convert import convert
from surgeon.errors import SurgeonError
from surgeon.transforms import GLU, AbsorbSinks, GatedAttention, GatedNorm, Hadamard, PreAffine, Smooth

FAMILIES = ALL_FAMILIES + ("smollm3",)
LAYERS, HEADS, HEAD_DIM, HIDDEN = 2, 4, 12, 48  # tiny.tiny_config
ATTENTION = [f"model.layers.{i}.self_attn" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("ga-src")
    return {(f, tied): make_tiny(root / f"{f}-{tied}", f, tied) for f in FAMILIES for tied in (False, True)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_words(tmp_path_factory.mktemp("text") / "words.txt", 200)


def randomize_gates(path, seed=0, scale=1.0):
    """A gate that training has moved: every output_gate weight random."""
    (shard,) = path.glob("*.safetensors")
    state = load_file(shard)
    g = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        if name.endswith("output_gate.weight"):
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    save_file(state, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("granularity", ["elementwise", "head"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_function_and_parameters(sources, tmp_path, family, tied, granularity):
    src, out = sources[(family, tied)], tmp_path / "out"
    report = convert(src, out, [GatedAttention(granularity=granularity)], verify=True, show_progress=False)
    assert report.transforms == ["gated-attention"]
    assert_close_logits(logits(src), logits(out), rel=0)  # ×½ then ×2: exact

    before, after = tensors(src), tensors(out)
    width = HEADS if granularity == "head" else HEADS * HEAD_DIM
    added = {f"{a}.output_gate.weight" for a in ATTENTION}
    assert set(after) - set(before) == added and set(before) <= set(after)
    for name in added:
        assert after[name].shape == (width, HIDDEN) and not after[name].any()
    for name, t in before.items():
        expected = 2 * t if name.endswith("self_attn.o_proj.weight") else t
        assert torch.equal(after[name], expected), name
    assert report.params_after - report.params_before == LAYERS * width * HIDDEN
    block = json.loads((out / "config.json").read_text())["surgeon"]["gated_attention"]
    assert block == {"targets": ["model.layers.*.self_attn"], "output": ["model.layers.*.self_attn.o_proj"],
                     "granularity": granularity, "heads": HEADS}


def test_the_gate_is_what_the_formula_says(sources, tmp_path):
    """A head gate equals the elementwise gate whose rows repeat it over the head's channels; a closed gate
    (σ → 0) silences the attention: the logits are those of the source with o_proj zeroed."""
    import surgeon.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM

    src = sources[("llama", False)]
    head, element = tmp_path / "head", tmp_path / "element"
    convert(src, head, [GatedAttention(granularity="head")], show_progress=False)
    convert(src, element, [GatedAttention()], show_progress=False)
    randomize_gates(head)
    h_state, e_state = load_file(next(head.glob("*.safetensors"))), load_file(next(element.glob("*.safetensors")))
    for name in e_state:
        if name.endswith("output_gate.weight"):
            e_state[name] = h_state[name].repeat_interleave(HEAD_DIM, dim=0)
    save_file(e_state, next(element.glob("*.safetensors")), metadata={"format": "pt"})
    assert_close_logits(logits(head), logits(element), rel=1e-6)
    assert not torch.allclose(logits(head), logits(src), atol=1e-4)  # the moved gate changes the function

    closed = AutoModelForCausalLM.from_pretrained(element).eval()
    silent = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        for a in ATTENTION:  # σ(−10⁴) = 0: o_proj reads zeros, as if its weight were zero
            silent.get_submodule(a).o_proj.weight.zero_()
            closed.get_submodule(a).output_gate.register_forward_hook(lambda m, i, o: torch.full_like(o, -1e4))
        ids = input_ids()
        assert_close_logits(silent(input_ids=ids).logits, closed(input_ids=ids).logits, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_and_load_without_surgeon(sources, tmp_path, family):
    import surgeon.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM

    src, out = sources[(family, False)], tmp_path / "out"
    convert(src, out, [GatedAttention()], show_progress=False)
    randomize_gates(out, scale=0.1)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "again")
    a, b = model.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ids = input_ids()
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SURGEON.format(ids=ids.tolist()), str(out),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    assert_close_logits(logits(out, ids), torch.load(tmp_path / "logits.pt", weights_only=True))


def test_stacked_with_every_pass(sources, corpus, tmp_path):
    src, out = sources[("llama", False)], tmp_path / "out"
    passes = [GatedNorm(rank=4), GatedAttention(), PreAffine(), AbsorbSinks(sinks=[3], scale=4),
              Smooth(data=corpus, tokens=512, seq_len=32), Hadamard(), GLU()]
    report = convert(src, out, passes, verify=True, show_progress=False)
    assert report.transforms == [p.name for p in passes]
    assert_close_logits(logits(src), logits(out))
    groups = json.loads((out / "config.json").read_text())["surgeon"]["hadamard"]["groups"]
    assert "model.layers.*.self_attn.output_gate" in groups["attention_in"]["linears"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_stacked_with_every_pass_a_moe_family_takes(sources, tmp_path, family):
    src, out = sources[(family, True)], tmp_path / "out"
    passes = [GatedNorm(rank=4), GatedAttention(granularity="head"), PreAffine(), AbsorbSinks(sinks=[3], scale=4),
              GLU()]
    assert convert(src, out, passes, verify=True, show_progress=False).transforms == [p.name for p in passes]
    assert_close_logits(logits(src), logits(out))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_moved_gate_survives_smooth_and_hadamard(sources, corpus, tmp_path, family):
    """Once training has moved W_g, smooth must scale its columns with q/k/v's and hadamard rotate its input."""
    gated = tmp_path / "gated"
    convert(sources[(family, False)], gated, [GatedAttention()], show_progress=False)
    randomize_gates(gated)
    out = tmp_path / "out"
    convert(gated, out, [Smooth(data=corpus, tokens=512, seq_len=32), Hadamard()], verify=True, show_progress=False)
    assert_close_logits(logits(gated), logits(out))
    before, after = tensors(gated), tensors(out)
    name = "model.layers.0.self_attn.output_gate.weight"
    assert not torch.allclose(before[name], after[name])  # scaled and rotated, not left behind


def test_refusals(sources, tmp_path):
    src = sources[("qwen2", True)]
    gated = tmp_path / "gated"
    convert(src, gated, [GatedAttention()], show_progress=False)
    with pytest.raises(SurgeonError, match="already has gated attention"):
        convert(gated, tmp_path / "twice", [GatedAttention()], show_progress=False)
    with pytest.raises(SurgeonError, match="gated-attention.*before hadamard|hadamard.*gated-attention"):
        convert(src, tmp_path / "order", [Hadamard(), GatedAttention()], show_progress=False)
    with pytest.raises(SurgeonError, match="unknown gated-attention granularity 'token'"):
        GatedAttention(granularity="token")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "order").exists()


def test_cli_and_inspect(sources, tmp_path, capsys):
    from surgeon.cli import main

    out = tmp_path / "out"
    assert main(["convert", str(sources[("mistral", False)]), str(out), "-t", "gated-attention",
                 "--ga-granularity", "head", "--verify"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gated_attention"] == {"granularity": "head", "heads": HEADS, "gates": LAYERS}
    assert "gated-attention" in report["transforms"]


def test_trained_in_a_parameter_group_of_their_own(sources, tmp_path):
    """The gates are new parameters (e.g. for `new_learn_from`), in their own optimizer group: lr_attention_gate,
    or lr_new when the recipe leaves it unset."""
    import surgeon.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM

    from surgeon.train.engine import is_new_parameter, parameter_groups
    from surgeon.train.recipe import make_recipe

    out = tmp_path / "out"
    convert(sources[("llama", False)], out, [GatedAttention(), PreAffine()], show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    names = {id(p): n for n, p in model.named_parameters()}
    gates = sorted(f"{a}.output_gate.weight" for a in ATTENTION)
    assert all(is_new_parameter(n) for n in gates)
    for settings, lr in (({"lr_new": 1e-3}, 1e-3), ({"lr_new": 1e-3, "lr_attention_gate": 5e-3}, 5e-3)):
        groups = {g["name"]: g for g in parameter_groups(model, make_recipe(settings))}
        assert set(groups) == {"pretrained", "new", "attention_gates"}
        assert sorted(names[id(p)] for p in groups["attention_gates"]["params"]) == gates
        assert groups["attention_gates"]["lr"] == lr and groups["new"]["lr"] == 1e-3
        assert all("pre_affine" in names[id(p)] for p in groups["new"]["params"])


def test_gate_telemetry_on_a_planted_gate(sources, tmp_path):
    """surgeon.gates on planted W_g: the statistics a direct float64 computation of σ(x·W_gᵀ) gives."""
    import surgeon.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM

    from surgeon.gates import record_gates

    out = tmp_path / "out"
    convert(sources[("llama", False)], out, [GatedAttention()], show_progress=False)
    randomize_gates(out, scale=0.5)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = {}
    for a in ATTENTION:
        model.get_submodule(a).register_forward_pre_hook(
            lambda m, args, kwargs, a=a: inputs.setdefault(a, []).append(kwargs["hidden_states"].double()),
            with_kwargs=True)
    with torch.no_grad(), record_gates(model) as gates:
        for seed in (1, 2):
            model(input_ids=input_ids(seed=seed))
    assert gates.results() is None  # no GatedNorm
    got = gates.attention_results()
    assert set(got["gates"]) == {f"{a}.output_gate" for a in ATTENTION}
    for a in ATTENTION:
        x = torch.cat([t.reshape(-1, HIDDEN) for t in inputs[a]])
        g = torch.sigmoid(x @ model.get_submodule(a).output_gate.weight.double().T)
        row = got["gates"][f"{a}.output_gate"]
        assert row["tokens"] == x.shape[0]
        assert row["mean_abs_dev"] == pytest.approx(float((g - 0.5).abs().mean()), rel=1e-5)
        assert row["spread_tokens"] == pytest.approx(float(g.std(0, correction=0).mean()), rel=1e-5)
        assert row["spread_channels"] == pytest.approx(float(g.std(1, correction=0).mean()), rel=1e-5)
        assert (row["g_min"], row["g_max"]) == (pytest.approx(float(g.min()), rel=1e-5),
                                                 pytest.approx(float(g.max()), rel=1e-5))
        assert row["corr_abs_y"] is None
    assert got["mean"]["mean_abs_dev"] > 0.05


def test_heldout_measurement_tracks_the_first_token_attention_and_the_gates(sources, tmp_path):
    """surgeon.train.measure: per layer, the attention mass on key 0 (as eager attention's probabilities give it),
    and the attention gates' statistics."""
    import surgeon.modeling  # noqa: F401
    from transformers import AutoModelForCausalLM

    from surgeon.train.measure import measure

    out = tmp_path / "out"
    convert(sources[("qwen2", False)], out, [GatedAttention()], show_progress=False)
    randomize_gates(out, scale=0.3)
    model = AutoModelForCausalLM.from_pretrained(out)
    batches = [input_ids(seed=s) for s in (1, 2)]
    metrics = measure(model, batches)
    eager = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = [eager(input_ids=b, output_attentions=True).attentions for b in batches]
    expected = [float(torch.cat([p[i][:, :, 1:, 0].reshape(-1) for p in probs]).double().mean())
                for i in range(LAYERS)]
    assert metrics["first_token_attention"] == pytest.approx(expected, rel=1e-4)
    assert metrics["first_token_attention_mean"] == pytest.approx(sum(expected) / LAYERS, rel=1e-4)
    assert set(metrics["attention_gates"]["gates"]) == {f"{a}.output_gate" for a in ATTENTION}
    assert model.config._attn_implementation == "sdpa"  # restored
