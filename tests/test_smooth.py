"""The smooth pass (transforms/smooth.py): SmoothQuant folded into the weights with power-of-two scales.

Invariant: logits identical (torch.equal) on every dense family, alone and after gated-norm (with a gate that is
no longer the identity); every rewritten tensor is the source's scaled per channel by one power of two, the
writer divided and its readers multiplied by the same s; the readers' inputs lose their planted outlier."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, MOE_FAMILIES, input_ids, logits, make_tiny, write_words
from transformers import AutoModelForCausalLM

from surgeon.cli import main
from surgeon.convert import convert
from surgeon.errors import SurgeonError
from surgeon.io import Checkpoint
from surgeon.transforms import GatedNorm, Smooth
from surgeon.io.smooth_factors import FACTORS_FILE, load_factors

OUTLIER, FACTOR = 7, 64.0


def tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.tensors}


def plant_channel_outlier(path):
    """Every pre-attention and pre-MLP norm weight × FACTOR at channel OUTLIER: a per-channel outlier in the norm
    outputs across all tokens, what SmoothQuant exists to move."""
    (shard,) = path.glob("*.safetensors")
    state = load_file(shard)
    for name, t in state.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            t[OUTLIER] *= FACTOR
    save_file(state, shard, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_words(tmp_path_factory.mktemp("text") / "words.txt", 200)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth-sources")
    return {f: plant_channel_outlier(make_tiny(root / f, f)) for f in FAMILIES}


@torch.no_grad()
def outlier_over_median(path, module: str) -> float:
    """max |x_OUTLIER| over the median channel's max |x|, for the input of `module`."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    seen = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(input_ids=input_ids())
    handle.remove()
    amax = seen[0].float().abs().flatten(0, -2).amax(0)
    return float(amax[OUTLIER] / amax.median())


def channel_scales(before: torch.Tensor, after: torch.Tensor, axis: int) -> torch.Tensor:
    """The per-channel factor after/before along `axis`, asserted to be one exact power of two per channel."""
    moved = after.movedim(axis, 0).reshape(after.shape[axis], -1)
    orig = before.movedim(axis, 0).reshape(before.shape[axis], -1)
    ratio = moved[:, :1] / orig[:, :1]
    assert torch.equal(moved, orig * ratio), "not one factor per channel"
    assert torch.equal(torch.exp2(torch.log2(ratio).round()), ratio), "not a power of two"
    return ratio.flatten()


@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserved_and_weights_scaled_exactly(sources, corpus, tmp_path, family):
    src, out = sources[family], tmp_path / "out"
    convert(src, out, [Smooth(data=corpus, tokens=512, seq_len=32)], show_progress=False)
    assert torch.equal(logits(src), logits(out))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family  # weights only: a stock model
    assert config["surgeon"]["smooth"]["points"] == 3 * 2
    before, after = tensors(src), tensors(out)
    for i in range(2):
        p = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj",))):
            s = 1 / channel_scales(before[p + norm + ".weight"], after[p + norm + ".weight"], 0)
            assert s[OUTLIER] > 1 and s[OUTLIER] == s.max()  # the planted channel is divided most
            for r in readers:
                assert torch.equal(channel_scales(before[p + r + ".weight"], after[p + r + ".weight"], 1), s)
        # up_proj reads the pre-MLP norm (columns × s) and writes down_proj's input (rows / s_down)
        s_down = channel_scales(after[p + "mlp.up_proj.weight"] / s, before[p + "mlp.up_proj.weight"], 0)
        assert torch.equal(after[p + "mlp.up_proj.weight"], before[p + "mlp.up_proj.weight"] * s / s_down[:, None])
        assert torch.equal(channel_scales(before[p + "mlp.down_proj.weight"], after[p + "mlp.down_proj.weight"], 1),
                           s_down)
        untouched = [n for n in before if "o_proj" in n or "embed" in n or n == "model.norm.weight"]
        assert all(torch.equal(before[n], after[n]) for n in untouched)
    # the recorded factors are exactly what was applied, to every tensor smooth rewrote and to no other
    factors = load_factors(out, {n: t.shape for n, t in before.items()})
    assert set(factors) == {n for n in before if not torch.equal(before[n], after[n])}
    assert all(torch.equal(after[n], before[n] * m) for n, m in factors.items())
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.gate_proj"):
        # α = ½ takes about half the outlier's log-magnitude into the weights: 64× → about 8×
        assert outlier_over_median(out, module) < outlier_over_median(src, module) / 4


def test_after_a_trained_gate(sources, corpus, tmp_path):
    """A GatedNorm whose gate is not the identity any more: gate_down's columns must be scaled with the readers."""
    gated = tmp_path / "gated"
    convert(sources["llama"], gated, [GatedNorm(rank=4)], show_progress=False)
    (shard,) = gated.glob("*.safetensors")
    state = load_file(shard)
    g = torch.Generator().manual_seed(0)
    for name, t in state.items():
        if name.endswith("gate_up.weight"):
            t.copy_(torch.randn(t.shape, generator=g))
    save_file(state, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    convert(gated, out, [Smooth(data=corpus, tokens=512, seq_len=32)], verify=True, show_progress=False)
    assert torch.equal(logits(gated), logits(out))
    before, after = tensors(gated), tensors(out)
    name = "model.layers.0.input_layernorm."
    s = 1 / channel_scales(before[name + "weight"], after[name + "weight"], 0)
    assert torch.equal(channel_scales(before[name + "gate_down.weight"], after[name + "gate_down.weight"], 1), s)
    assert json.loads((out / "config.json").read_text())["surgeon"]["transforms"] == ["gated-norm", "smooth"]


def test_cli_with_gated_norm_and_verify(sources, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(sources["qwen2"]), str(out), "-t", "gated-norm", "-t", "smooth", "--data",
                 str(corpus), "--smooth-alpha", "0.6", "--smooth-tokens", "256", "--verify"]) == 0
    block = json.loads((out / "config.json").read_text())["surgeon"]["smooth"]
    assert block["alpha"] == 0.6 and block["calibration_tokens"] == 256
    assert torch.allclose(logits(sources["qwen2"]), logits(out), rtol=0, atol=1e-5)
    assert "smoothed (SmoothQuant folded in), α | 0.6: 6 points" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["smooth"]["points"] == 6


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_refused(corpus, tmp_path, family):
    src = make_tiny(tmp_path / "src", family)
    with pytest.raises(SurgeonError, match=f"smooth does not support {family}"):
        convert(src, tmp_path / "out", [Smooth(data=corpus)], show_progress=False)
    assert not (tmp_path / "out").exists()


def test_errors(sources, corpus, tmp_path):
    with pytest.raises(SurgeonError, match="needs calibration text"):
        Smooth()
    with pytest.raises(SurgeonError, match="alpha must be in"):
        Smooth(data=corpus, alpha=1.5)
    with pytest.raises(SurgeonError, match="smooth is given twice"):
        convert(sources["llama"], tmp_path / "twice", [Smooth(data=corpus), Smooth(data=corpus)], show_progress=False)
    assert not (tmp_path / "twice").exists()


def test_smoothing_again_recalibrates_and_composes_the_factors(sources, corpus, tmp_path):
    """A smoothed checkpoint smoothed again (as after training): same logits, and the recorded factors are the
    product of both rounds', so they still lead back exactly to the source weights."""
    src, once, twice = sources["qwen3"], tmp_path / "once", tmp_path / "twice"
    convert(src, once, [Smooth(data=corpus, tokens=256, seq_len=32)], show_progress=False)
    convert(once, twice, [Smooth(data=corpus, alpha=0.9, tokens=256, seq_len=32)], verify=True, show_progress=False)
    assert torch.equal(logits(src), logits(twice))
    block = json.loads((twice / "config.json").read_text())["surgeon"]
    assert block["smooth"]["rounds"] == 2 and block["smooth"]["alpha"] == 0.9
    before, middle, after = tensors(src), tensors(once), tensors(twice)
    assert any(not torch.equal(middle[n], after[n]) for n in after)  # α 0.9 moved more than α 0.5 had
    factors = load_factors(twice, {n: t.shape for n, t in before.items()})
    assert all(torch.equal(after[n], before[n] * factors.get(n, 1)) for n in before)
    # without its factors file, a smoothed checkpoint's new round writes none (they would not lead to the source)
    (once / FACTORS_FILE).unlink()
    convert(once, tmp_path / "orphan", [Smooth(data=corpus, tokens=256, seq_len=32)], show_progress=False)
    assert not (tmp_path / "orphan" / FACTORS_FILE).exists()


def test_the_passes_read_nothing_themselves(sources, corpus, tmp_path, monkeypatch):
    """Calibration is the caller's (surgeon.calibrate): handed what they declared they need, absorb-sinks (a scan),
    smooth (activation statistics, and a smoothed source's factors) and hadamard (the factors) rewrite the plan with
    every loader made to fail, and the result is the checkpoint convert() writes."""
    import surgeon.calibrate
    import surgeon.io.smooth_factors
    import surgeon.scan
    import surgeon.sources
    from surgeon.calibrate import Calibrator
    from surgeon.plan import Plan
    from surgeon.transforms import AbsorbSinks, Hadamard

    once = tmp_path / "once"  # smoothed: the next round needs its factors file
    convert(sources["llama"], once, [Smooth(data=corpus, tokens=256, seq_len=32)], show_progress=False)
    model, tokenizer = surgeon.sources.load_model(once)
    windows = [torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))]
    report = surgeon.scan.scan(model, tokenizer, windows, progress=False)
    report.sinks = [surgeon.scan.SinkDim(dim=OUTLIER, mean_abs=4.0, median_mean_abs=1.0, ratio_to_median=4.0,
                                         scale_pow2=4, max_abs=4.0, first_token_mean_abs=4.0, per_layer_mean_abs=[],
                                         norm_weights={})]  # the pass absorbs what the scan says, planted here
    report.save(tmp_path / "scan.json")

    def refused(*args, **kwargs):
        raise AssertionError("a pass read the source itself")

    loaders = [(surgeon.sources, "load_model"), (surgeon.sources, "resolve_text"),
               (surgeon.sources, "iter_token_windows"), (surgeon.scan, "scan"), (surgeon.scan.ScanReport, "load"),
               (surgeon.io.smooth_factors, "read_factor_entries"), (surgeon.calibrate.Calibrator, "calibrate")]
    for passes in ([AbsorbSinks(scan=tmp_path / "scan.json"),
                    Smooth(data=corpus, alpha=0.9, tokens=256, seq_len=32)], [Hadamard()]):
        plan, calibrator = Plan(Checkpoint(once)), Calibrator(once)
        for transform in passes:
            calibration = calibrator.calibrate(transform.needs(plan))
            with monkeypatch.context() as patched:
                for module, name in loaders:
                    patched.setattr(module, name, refused)
                transform.apply(plan, calibration)
                planned = {spec.name: plan.produce(spec) for spec in plan.specs()}
        out = tmp_path / "-".join(p.name for p in passes)
        convert(once, out, passes, show_progress=False)
        written = tensors(out)
        assert planned.keys() == written.keys() and all(torch.equal(planned[n], written[n]) for n in written)
        assert plan.side_tensors.keys() == {FACTORS_FILE}  # the smoothed source's factors came along, as handed
