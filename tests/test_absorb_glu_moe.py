"""absorb-sinks, glu and the MoE families.

absorb-sinks: logits identical (torch.equal, fp32 and bf16) on all seven families, tied and untied, alone and
stacked on gated-norm; at a planted sink every residual-stream point's dimension k is the source's divided by s_k
exactly and every other dimension is unchanged; tied heads are untied to the original embedding; PreAffine is
inserted or reused; nothing is absorbed twice; bad requests fail in one line with nothing written.
glu: α = 0 is the identity (every MLP activation annealed), α = 1 is a stock GLU model that loads without remote
code and equals the source computed with sigmoid; --verify measures it without failing.
MoE: per-expert and fused checkpoints both convert and load (with surgeon, and as remote code without it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file
from tiny import ALL_FAMILIES, HIDE_SURGEON, MOE_FAMILIES, input_ids, logits, make_tiny, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from surgeon.cli import main
from surgeon.convert import convert
from surgeon.errors import SurgeonError
from surgeon.io import Checkpoint
from surgeon.modeling import AnnealedGLUActivation, set_glu_alpha
from surgeon.transforms import GLU, AbsorbSinks, GatedNorm, PreAffine

READERS = ["model.layers.*.input_layernorm", "model.layers.*.post_attention_layernorm", "model.norm"]
READER_NORMS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
READER_NORMS.append("model.norm")
SINK, SCALE = 5, 64


def tensors(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.tensors}


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= rel * a.abs().max().item()


def load(path, dtype=torch.float32, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()


@torch.no_grad()
def residual_points(model, ids) -> list[torch.Tensor]:
    """The residual stream at every point: the embedding output and each decoder layer's output."""
    points, handles = [], []

    def record(_module, _inputs, out):
        points.append((out[0] if isinstance(out, tuple) else out).float().clone())

    handles.append(model.model.embed_tokens.register_forward_hook(record))
    handles += [layer.register_forward_hook(record) for layer in model.model.layers]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return points


def plant_sink(path, family, tied=False, k=SINK, factor=SCALE, dtype=torch.float32):
    """A model with a real residual sink: every writer of dimension k (embedding column, o_proj and down_proj rows,
    fused experts) multiplied by `factor` in memory, found by module name, independently of the architecture data."""
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.model.embed_tokens.weight[:, k] *= factor  # tied: the head is this scaled embedding
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p[k] *= factor
            elif name.endswith("experts.down_proj"):  # fused (experts, hidden, intermediate)
                p[:, k] *= factor
    model.to(dtype).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {(f, tied): make_tiny(root / f"{f}-{'tied' if tied else 'untied'}", f, tied)
            for f in ALL_FAMILIES for tied in (False, True)}


@pytest.fixture(scope="module")
def source_logits(sources):
    return {key: logits(path) for key, path in sources.items()}


# ----------------------------------------------------------------------------- every transform, every family

PASSES = {
    "gated-norm": lambda: [GatedNorm(rank=4)],
    "pre-affine": lambda: [PreAffine()],
    "absorb-sinks": lambda: [AbsorbSinks(sinks=[SINK, 11], scale=SCALE)],
    "glu": lambda: [GLU()],
    "gated+absorb": lambda: [GatedNorm(rank=4), AbsorbSinks(sinks=[SINK], scale=8)],
}
EXACT = {"pre-affine", "absorb-sinks", "glu"}


@pytest.mark.parametrize("name", sorted(PASSES))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_function_preserved(sources, source_logits, tmp_path, family, tied, name):
    out = tmp_path / "out"
    convert(sources[(family, tied)], out, PASSES[name](), show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"surgeon_{family}"
    after = logits(out)
    if name in EXACT:
        assert torch.equal(source_logits[(family, tied)], after)
    else:
        assert close(source_logits[(family, tied)], after)
    if "absorb" in name:
        assert config["tie_word_embeddings"] is False


# ----------------------------------------------------------------------------- absorb-sinks


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_absorb_divides_the_planted_sink_exactly(tmp_path, family):
    tied = family in ("llama", "qwen2_moe")
    src = plant_sink(tmp_path / "src", family, tied)
    ids = input_ids()
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out = tmp_path / f"out-{tag}"
        convert(src, out, [AbsorbSinks(sinks=[SINK], scale=SCALE)], dtype=tag, show_progress=False)
        source, absorbed = load(src, dtype), load(out, dtype)
        assert torch.equal(source(input_ids=ids).logits, absorbed(input_ids=ids).logits), tag
        before, after = residual_points(source, ids), residual_points(absorbed, ids)
        assert len(before) == 3  # embedding + 2 layers
        others = torch.arange(48) != SINK
        for h, g in zip(before, after):
            assert torch.equal(g[..., SINK], h[..., SINK] / SCALE)
            assert torch.equal(g[..., others], h[..., others])
        peak_before = max(h.abs().max().item() for h in before)
        peak_after = max(h.abs().max().item() for h in after)
        assert peak_before == max(h[..., SINK].abs().max().item() for h in before)  # the planted sink is the peak
        assert peak_after < peak_before / 4


def test_absorb_rewrites_exactly_what_the_formula_says(tmp_path):
    src = make_tiny(tmp_path / "src", "qwen2_moe", tied=True)
    out = tmp_path / "out"
    report = convert(src, out, [AbsorbSinks(sinks=[3, 40], scale={3: 16, 40: 4})], show_progress=False)
    before, after = tensors(src), tensors(out)
    scales = {3: 16, 40: 4}
    # tied → untied: the head is the original embedding
    assert "lm_head.weight" not in before and torch.equal(after["lm_head.weight"], before["model.embed_tokens.weight"])
    writers = {"model.embed_tokens.weight": -1}
    writers |= {n: 0 for n in before if n.endswith(("o_proj.weight", "down_proj.weight"))}
    assert len(writers) == 1 + 2 + 2 * 4 + 2  # embedding, o_proj, 4 experts and a shared expert per layer
    for name, t in before.items():
        if name in writers:
            expected = t.clone()
            for k, s in scales.items():
                expected.select(writers[name], k).div_(s)
            assert torch.equal(after[name], expected), name
        else:
            assert torch.equal(after[name], t), name
    for norm in READER_NORMS:
        expected = torch.ones(48)
        expected[3], expected[40] = 16, 4
        assert torch.equal(after[f"{norm}.pre_affine"], expected)
    assert set(after) - set(before) == {"lm_head.weight"} | {f"{n}.pre_affine" for n in READER_NORMS}
    assert report.tensors_rewritten == len(writers)
    config = json.loads((out / "config.json").read_text())
    block = config["surgeon"]
    assert config["tie_word_embeddings"] is False
    assert block["transforms"] == ["absorb-sinks"]
    assert [(s["dim"], s["scale"]) for s in block["absorb_sinks"]["sinks"]] == [(3, 16), (40, 4)]
    assert block["absorb_sinks"]["untied_lm_head"] is True and block["absorb_sinks"]["targets"] == READERS
    assert block["pre_affine"]["targets"] == READERS
    assert "3 (÷16), 40 (÷4)" in (out / "README.md").read_text()


def test_absorb_reuses_pre_affine_and_stacks(sources, source_logits, tmp_path):
    src = sources[("llama", False)]
    one = tmp_path / "one"  # pre-affine on the final norm only, then absorb: one λ1 per norm, targets extended
    convert(src, one, [PreAffine(roles=("final",)), AbsorbSinks(sinks=[7], scale=32)], show_progress=False)
    after = tensors(one)
    assert sum(n.endswith("pre_affine") for n in after) == len(READER_NORMS)
    assert all(after[f"{n}.pre_affine"][7] == 32 for n in READER_NORMS)
    block = json.loads((one / "config.json").read_text())["surgeon"]
    assert block["pre_affine"]["targets"] == ["model.norm", *READERS[:2]]
    assert torch.equal(source_logits[("llama", False)], logits(one))
    two = tmp_path / "two"  # a second pass absorbs a new dimension into the same λ1
    convert(one, two, [AbsorbSinks(sinks=[9], scale=4)], show_progress=False)
    after = tensors(two)
    assert after["model.norm.pre_affine"][7] == 32 and after["model.norm.pre_affine"][9] == 4
    block = json.loads((two / "config.json").read_text())["surgeon"]
    assert [s["dim"] for s in block["absorb_sinks"]["sinks"]] == [7, 9]
    assert torch.equal(source_logits[("llama", False)], logits(two))
    with pytest.raises(SurgeonError, match="sink dimension 7 was already absorbed"):
        convert(two, tmp_path / "three", [AbsorbSinks(sinks=[7], scale=2)], show_progress=False)
    assert not (tmp_path / "three").exists()


def test_absorb_auto_from_a_scan(tmp_path):
    from surgeon.scan import ScanReport, scan
    from surgeon.sources import load_model

    src = plant_sink(tmp_path / "src", "llama", k=SINK, factor=64)
    windows = [torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model, tokenizer = load_model(src)
    scan(model, tokenizer, windows, progress=False).save(tmp_path / "scan.json")
    report = ScanReport.load(tmp_path / "scan.json")
    assert report.sinks and report.sinks[0].dim == SINK
    expected = {s.dim: s.scale_pow2 for s in report.sinks}

    out = tmp_path / "out"
    convert(src, out, [AbsorbSinks(scan=tmp_path / "scan.json")], show_progress=False)
    block = json.loads((out / "config.json").read_text())["surgeon"]["absorb_sinks"]
    assert {s["dim"]: s["scale"] for s in block["sinks"]} == expected
    assert expected[SINK] >= 16
    # the scan by file name and sha256: a published config carries no path of the converter's file system
    digest = hashlib.sha256((tmp_path / "scan.json").read_bytes()).hexdigest()
    assert {json.dumps(s["from"]) for s in block["sinks"]} == {json.dumps({"scan": {"file": "scan.json",
                                                                                   "sha256": digest}})}
    assert str(tmp_path) not in (out / "config.json").read_text()  # nor does the history name the source's path
    assert torch.equal(logits(src), logits(out))
    model, tokenizer = load_model(out)
    again = scan(model, tokenizer, windows, progress=False)
    assert SINK not in again.sink_dims  # the sink is gone from the residual stream
    assert again.peak["value"] < report.peak["value"] / 4

    quiet = int(torch.tensor(report.residual_mean_abs[1:]).mean(0).argmin())  # no sink: refused with --scale auto
    with pytest.raises(SurgeonError, match=f"dimension {quiet} is not a residual sink in the scan"):
        convert(src, tmp_path / "no", [AbsorbSinks(sinks=[quiet], scan=tmp_path / "scan.json")], show_progress=False)

    text = tmp_path / "text.txt"  # --data: the transform scans the source itself
    text.write_text("".join(chr(33 + (i * 7) % 90) for i in range(3000)))
    assert main(["convert", str(src), str(tmp_path / "cli"), "-t", "absorb-sinks", "--data", str(text),
                 "--scan-tokens", "256", "--verify"]) == 0
    block = json.loads((tmp_path / "cli" / "config.json").read_text())["surgeon"]["absorb_sinks"]
    assert SINK in [s["dim"] for s in block["sinks"]]
    assert block["sinks"][0]["from"] == {"scan of": [{"file": "text.txt",
                                                      "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}]}
    assert str(tmp_path) not in (tmp_path / "cli" / "config.json").read_text()


def test_absorb_scale_rounding(sources, tmp_path):
    with pytest.warns(UserWarning, match="scale 100 of dimension 5 is not a power of two; using 128"):
        convert(sources[("qwen3", False)], tmp_path / "out", [AbsorbSinks(sinks=[5], scale=100)],
                show_progress=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["surgeon"]["absorb_sinks"]["sinks"][0][
        "scale"] == 128


@pytest.mark.parametrize("kwargs, match", [
    (dict(sinks=[48], scale=4), "sink dimension 48 is out of range: the hidden size is 48"),
    (dict(sinks=[-1], scale=4), "sink dimension -1 is out of range"),
    (dict(sinks="5,5", scale=4), "sink dimension 5 is listed twice"),
    (dict(sinks="five", scale=4), "--sinks takes `auto` or comma-separated"),
    (dict(sinks=[5], scale=0), "--scale must be `auto` or a positive power of two"),
    (dict(sinks=[5], scale=-8), "--scale must be `auto` or a positive power of two"),
    (dict(sinks=[5], scale="big"), "--scale must be `auto` or a positive power of two"),
    (dict(sinks=[5], scale=1), "rounds to 1, which absorbs nothing"),
    (dict(sinks=[5]), "needs a scan of the source to find the sinks and their scales"),
    (dict(), "needs a scan of the source to find the sinks and their scales"),
])
def test_absorb_errors(sources, tmp_path, kwargs, match):
    with pytest.raises(SurgeonError, match=match):
        convert(sources[("llama", True)], tmp_path / "out", [AbsorbSinks(**kwargs)], show_progress=False)
    assert not (tmp_path / "out").exists()


def test_absorb_refuses_a_scale_that_is_not_exact(sources, tmp_path):
    """fp16 weights of ~0.02 divided by 2^10 fall into fp16's subnormals and lose bits: refused, nothing written."""
    with pytest.raises(SurgeonError, match="by 1/1024 is not exact in float16"):
        convert(sources[("qwen2", False)], tmp_path / "out", [AbsorbSinks(sinks=[5], scale=1024)], dtype="fp16",
                show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_absorb_refused_where_writers_are_not_described(sources, tmp_path, monkeypatch):
    import dataclasses

    import surgeon.plan
    from surgeon.architectures import for_config

    monkeypatch.setattr(surgeon.plan, "for_config",
                        lambda config: dataclasses.replace(for_config(config), residual_writers=()))
    with pytest.raises(SurgeonError, match="architecture data describes no residual writers"):
        convert(sources[("mistral", False)], tmp_path / "out", [AbsorbSinks(sinks=[1], scale=2)],
                show_progress=False)
    assert not (tmp_path / "out").exists()


def test_absorb_refused_when_a_writer_is_missing(tmp_path, monkeypatch):
    import surgeon.convert

    src = make_tiny(tmp_path / "src", "mixtral")
    renamed = {k.replace(".w2.", ".w9."): v for k, v in tensors(src).items()}  # a layout the data does not know
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    # the checkpoint validation refuses it first, naming the tensor config.json expects ...
    with pytest.raises(SurgeonError, match="has no tensor 'model.layers.0.mlp.experts.down_proj'"):
        convert(src, tmp_path / "out", [AbsorbSinks(sinks=[1], scale=2)], show_progress=False)
    # ... and absorb-sinks refuses on its own where the validation lets a layout through
    monkeypatch.setattr(surgeon.convert, "check_tensors", lambda ckpt: None)
    with pytest.raises(SurgeonError, match="no residual writer 'model.layers.\\*.mlp.experts.down_proj' in layer 0"):
        convert(src, tmp_path / "out", [AbsorbSinks(sinks=[1], scale=2)], show_progress=False)
    assert not (tmp_path / "out").exists()


def test_absorb_cli_errors_are_one_line(sources, tmp_path, capsys):
    src = str(sources[("llama", False)])
    for argv, match in [
        (["--sinks", "999", "--scale", "64"], "sink dimension 999 is out of range"),
        (["--sinks", "3", "--scale", "-2"], "--scale must be"),
        (["--sinks", "3"], "needs --scan scan.json or --data TEXT"),
    ]:
        assert main(["convert", src, str(tmp_path / "out"), "-t", "absorb-sinks", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("surgeon: error: ") and match in err[0], err
        assert not (tmp_path / "out").exists()
    assert main(["convert", src, str(tmp_path / "out"), "-t", "absorb-sinks", "-t", "pre-affine", "--sinks", "3",
                 "--scale", "4"]) == 2
    assert "put pre-affine before absorb-sinks" in capsys.readouterr().err


def test_the_order_is_checked_for_python_callers_too(sources, tmp_path):
    """The rule is the pass's (`after`), checked by convert(): the same refusal without the CLI, nothing written."""
    with pytest.raises(SurgeonError, match="put pre-affine before absorb-sinks: absorb-sinks inserts PreAffine"):
        convert(sources[("llama", False)], tmp_path / "out", [AbsorbSinks(sinks=[3], scale=4), PreAffine()],
                show_progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- glu


def annealed(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AnnealedGLUActivation)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_glu_anneals_every_mlp_activation(sources, tmp_path, family):
    out = tmp_path / "out"
    convert(sources[(family, False)], out, [GLU()], show_progress=False)
    model = load(out)
    acts = {n: m.act_fn for n, m in model.named_modules() if isinstance(getattr(m, "act_fn", None), torch.nn.Module)}
    assert acts and all(isinstance(a, AnnealedGLUActivation) for a in acts.values()), acts
    per_layer = {"qwen2_moe": 2}.get(family, 1)  # experts + shared expert
    assert len(acts) == 2 * per_layer
    assert all(float(a.alpha) == 0.0 for a in acts.values())
    assert not any(k.endswith("alpha") for k in tensors(out))  # α is config, not a tensor
    assert json.loads((out / "config.json").read_text())["surgeon"]["glu"]["alpha"] == 0.0


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_glu_alpha_one_is_a_stock_model(sources, tmp_path, family):
    src, out = sources[(family, True)], tmp_path / "out"
    with pytest.warns(UserWarning, match="glu at α = 1 changes the function"):
        report = convert(src, out, [GLU(alpha=1)], verify=True, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["hidden_act"] == "sigmoid" and "auto_map" not in config
    assert not (out / "modeling_surgeon.py").exists()
    assert report.verify["expected_to_differ"] and report.verify["max_abs_diff"] > 0
    sigmoid = load(src, hidden_act="sigmoid")
    ids = input_ids()
    assert torch.equal(sigmoid(input_ids=ids).logits, load(out)(input_ids=ids).logits)
    assert not annealed(load(out))


def test_glu_is_trained_to_one(sources, tmp_path):
    """α = 0.5 at conversion; set_glu_alpha drives it to 1: the model then is the sigmoid model, and says so."""
    src, out = sources[("qwen2_moe", False)], tmp_path / "out"
    with pytest.warns(UserWarning, match="α = 0.5 changes the function"):
        convert(src, out, [GLU(alpha=0.5)], show_progress=False)
    model = load(out)
    assert {float(model.get_submodule(n).alpha) for n in annealed(model)} == {0.5}
    assert set_glu_alpha(model, 1.0) == 4
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, load(src, hidden_act="sigmoid")(input_ids=ids).logits)
    model.save_pretrained(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "config.json").read_text())["surgeon"]["glu"]["alpha"] == 1.0
    reloaded = load(tmp_path / "trained")
    assert {float(reloaded.get_submodule(n).alpha) for n in annealed(reloaded)} == {1.0}


def test_glu_stacked_on_gated_norm_keeps_surgeon_modeling(sources, tmp_path):
    src, out = sources[("mixtral", False)], tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, out, [GatedNorm(rank=4), GLU(alpha=1)], show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "surgeon_mixtral" and config["hidden_act"] == "sigmoid"
    with torch.no_grad():
        sigmoid = load(src, hidden_act="sigmoid")(input_ids=input_ids()).logits
    assert close(sigmoid, logits(out))
    assert not annealed(load(out))  # the base family already runs sigmoid


def test_glu_refusals(sources, tmp_path):
    src = sources[("qwen3", False)]
    once = tmp_path / "once"
    convert(src, once, [GLU()], show_progress=False)
    with pytest.raises(SurgeonError, match="already has glu"):
        convert(once, tmp_path / "twice", [GLU()], show_progress=False)
    stock = tmp_path / "stock"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(src, stock, [GLU(alpha=1)], show_progress=False)
    with pytest.raises(SurgeonError, match="already has glu"):
        convert(stock, tmp_path / "again", [GLU()], show_progress=False)
    for bad in (2, -0.1, "x"):
        with pytest.raises(SurgeonError, match="--glu-alpha must lie in"):
            GLU(alpha=bad)
    assert not (tmp_path / "twice").exists() and not (tmp_path / "again").exists()


def test_glu_cli_warns_and_measures(sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(sources[("llama", False)]), str(out), "-t", "glu", "--glu-alpha", "1",
                 "--verify"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().startswith("surgeon: warning: glu at α = 1 changes the function")
    assert "differs, as expected" in captured.out
    assert json.loads((out / "surgeon_manifest.json").read_text())["verify"]["expected_to_differ"] is True


# ----------------------------------------------------------------------------- MoE layouts and loading


def fused_checkpoint(path, family):
    """The layout transformers holds in memory (fused experts, Mixtral's block_sparse_moe renamed to mlp)."""
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    path.mkdir()
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    tiny_tokenizer().save_pretrained(path)
    return path, model


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_expert_checkpoints(tmp_path, family):
    src, model = fused_checkpoint(tmp_path / "src", family)
    assert any(n.endswith("experts.down_proj") for n in tensors(src))
    ids = input_ids()
    with torch.no_grad():
        reference = model.eval()(input_ids=ids).logits
    assert torch.equal(logits(src, ids), reference)  # the fused layout loads as stored
    out = tmp_path / "out"
    convert(src, out, [AbsorbSinks(sinks=[SINK], scale=SCALE), GLU()], show_progress=False)
    assert torch.equal(logits(out, ids), reference)
    fused = tensors(out)["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(fused[:, SINK], model.model.layers[0].mlp.experts.down_proj[:, SINK].detach() / SCALE)


def test_qwen2_moe_dense_layers(tmp_path):
    """mlp_only_layers: layer 1 carries a dense MLP, the residual writer alternative of the experts."""
    src = make_tiny(tmp_path / "src", "qwen2_moe", config_overrides={"mlp_only_layers": [1]})
    assert "model.layers.1.mlp.down_proj.weight" in tensors(src)
    out = tmp_path / "out"
    convert(src, out, [AbsorbSinks(sinks=[SINK], scale=SCALE), GLU()], show_progress=False)
    assert torch.equal(logits(src), logits(out))
    assert len(annealed(load(out))) == 2 + 1  # experts + shared expert in layer 0, the dense MLP in layer 1


def test_qwen3_moe_qk_norms(sources, source_logits, tmp_path):
    out = tmp_path / "out"
    roles = ("residual", "q_norm", "k_norm")
    convert(sources[("qwen3_moe", False)], out, [GatedNorm(rank=4, roles=roles), PreAffine(roles=roles)],
            show_progress=False)
    assert close(source_logits[("qwen3_moe", False)], logits(out))
    after = tensors(out)
    for i in range(2):
        for norm in ("q_norm", "k_norm"):
            assert after[f"model.layers.{i}.self_attn.{norm}.gate_down.weight"].shape == (4, 12)
            assert torch.equal(after[f"model.layers.{i}.self_attn.{norm}.pre_affine"], torch.ones(12))


def test_surgeon_moe_round_trip(sources, tmp_path):
    out = tmp_path / "out"
    convert(sources[("mixtral", False)], out, [GatedNorm(rank=4), GLU()], show_progress=False)
    model = load(out)
    assert type(model).__name__ == "SurgeonMixtralForCausalLM"
    model.save_pretrained(tmp_path / "again")
    saved = tensors(tmp_path / "again")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in saved  # saved back per expert
    again = load(tmp_path / "again")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LOAD_WITHOUT_SURGEON = HIDE_SURGEON + textwrap.dedent("""
    import json
    import torch
    from transformers import AutoModelForCausalLM
    ids = torch.tensor({ids})
    out = {{}}
    for path, remote in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote).eval()
        with torch.no_grad():
            out[path] = model(input_ids=ids).logits
        print(path, type(model).__module__)
    torch.save(out, sys.argv[2])
    assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
""")


def test_load_without_surgeon(sources, source_logits, tmp_path):
    """Converted MoE models load as remote code (per-expert checkpoints fused by our registered mapping);
    GLU at α = 1 loads as a stock model with no remote code at all."""
    jobs, expected = [], {}
    for family in MOE_FAMILIES:
        out = tmp_path / f"surgeon-{family}"
        convert(sources[(family, True)], out, [GatedNorm(rank=4), AbsorbSinks(sinks=[SINK], scale=SCALE), GLU()],
                show_progress=False)
        jobs.append((str(out), True))
        expected[str(out)] = source_logits[(family, True)]
    for family in ("llama", "qwen3_moe"):
        out = tmp_path / f"stock-{family}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(sources[(family, False)], out, [GLU(alpha=1)], show_progress=False)
        jobs.append((str(out), False))
        with torch.no_grad():
            expected[str(out)] = load(sources[(family, False)], hidden_act="sigmoid")(input_ids=input_ids()).logits
    script = LOAD_WITHOUT_SURGEON.format(ids=input_ids().tolist())
    result = subprocess.run([sys.executable, "-c", script, json.dumps(jobs), str(tmp_path / "logits.pt")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    modules = dict(line.rsplit(" ", 1) for line in result.stdout.strip().splitlines())
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    for path, remote_code in jobs:
        if remote_code:
            assert "transformers_modules" in modules[path]
            assert close(expected[path], remote[path])
        else:
            assert modules[path].startswith("transformers.models.")
            assert torch.equal(expected[path], remote[path])


def test_activation_modules_name_real_activations():
    from surgeon.architectures import for_config, tensor_regex

    for family in ALL_FAMILIES:
        config = tiny_config(family, **({"mlp_only_layers": [1]} if family.endswith("_moe") else {}))
        arch = for_config(config.to_dict())
        model = AutoModelForCausalLM.from_config(config)
        with_act = {n for n, m in model.named_modules() if isinstance(getattr(m, "act_fn", None), torch.nn.Module)}
        regexes = [tensor_regex(p) for p in arch.activation_modules]
        assert with_act == {n for n in with_act if any(r.match(n) for r in regexes)}, family
        assert all(any(r.match(n) for n in with_act) for r in regexes), family
        assert arch.mlp["activation"] == "hidden_act"
