"""surgeon scan: outliers planted in tiny models are found where they were planted; the attention-sink score is
the attention eager attention computes; the model comes back untouched; scan.json reads back; the CLI writes
the report and its figures. The real SmolLM2 test needs scripts/install_defaults.sh (tests/real_defaults.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import surgeon.modeling  # noqa: F401  (registers the surgeon_* families)
from surgeon import scan_recorder
from surgeon.cli import main as cli_main
from surgeon.errors import SurgeonError
from surgeon.scan import ScanReport, scan

VOCAB = 96
BOS = 1
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class IdTokenizer:
    """What scan needs of a tokenizer: BOS and a way to print a token."""

    bos_token_id = BOS
    eos_token_id = 2

    def decode(self, ids):
        return f"<{ids[0]}>"


def tiny(family="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, head_dim=16, max_position_embeddings=256)
    kwargs.update(overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs)).eval()


def windows(n=8, length=33, seed=1, batch=4):
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = BOS
    return list(ids.split(batch))


def eager_sink_scores(model, batches):
    """Mean attention probability on key 0 over heads and queries 1.., per layer, from eager attention."""
    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        sums, count = None, 0
        with torch.no_grad():
            for batch in batches:
                attentions = model(batch, output_attentions=True).attentions
                per_layer = torch.stack([a[:, :, 1:, 0].sum(dtype=torch.float64) / a.shape[1]
                                         for a in attentions])
                sums = per_layer if sums is None else sums + per_layer
                count += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        model.set_attn_implementation(original)
    return (sums / count).tolist()


# ----------------------------------------------------------------------------- planted outliers


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_residual_sink_is_found(family):
    """A constant added to embedding column k rides the residual stream through every layer: k is the sink."""
    model = tiny(family)
    k = 41
    with torch.no_grad():
        model.model.embed_tokens.weight[:, k] += 25.0
    report = scan(model, IdTokenizer(), windows(), progress=False)
    assert report.sinks and report.sinks[0].dim == k
    assert report.sinks[0].ratio_to_median > 100
    assert report.sinks[0].scale_pow2 <= report.sinks[0].ratio_to_median < 2 * report.sinks[0].scale_pow2
    assert all(row.top_dims[0].dim == k for row in report.layers)
    assert report.sink_dims == [k]  # nothing else in a random model stands out 8x
    assert len(report.sinks[0].per_layer_mean_abs) == model.config.num_hidden_layers + 1
    norms = report.sinks[0].norm_weights
    assert norms["final"] == pytest.approx(float(model.model.norm.weight.detach()[k]))
    assert norms["input_layernorm"] == pytest.approx(
        [float(layer.input_layernorm.weight.detach()[k]) for layer in model.model.layers])
    assert len(norms["post_attention_layernorm"]) == model.config.num_hidden_layers


def test_planted_massive_activation_on_the_first_token():
    """BOS's embedding carries 5000 in dim 29: a token-specific massive activation at position 0 only, which the
    residual-sink statistic (first token excluded) must not mistake for a sink."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[BOS, 29] = 5000.0
    batches = windows(n=6, batch=4)
    report = scan(model, IdTokenizer(), batches, progress=False)
    assert report.peak["dim"] == 29 and report.peak["position"] == 0 and report.peak["token"] == f"<{BOS}>"
    assert report.peak["value"] == pytest.approx(5000.0, rel=0.01)
    firsts = [m for m in report.massive if m.dim == 29 and m.position == 0]
    assert {m.point for m in firsts} == set(range(model.config.num_hidden_layers + 1))
    assert all(m.count == 6 and m.token_id == BOS and m.ratio_to_median > 1000 for m in firsts)
    assert 29 not in report.sink_dims
    assert all(row.max_dim == 29 and row.max_position == 0 for row in report.layers)


def test_mid_sequence_massive_activation_names_its_token():
    model = tiny("llama")
    token = 77
    with torch.no_grad():
        model.model.embed_tokens.weight[token, 5] = -3000.0
    batches = windows()
    batches[1][2, 10] = token
    report = scan(model, IdTokenizer(), batches, progress=False)
    hits = [m for m in report.massive if m.dim == 5 and m.token_id == token]
    assert hits and all(m.value < -2000 and m.token == f"<{token}>" for m in hits)


# ----------------------------------------------------------------------------- attention sinks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["flash-lse", "logits"])
def test_attention_sink_score_matches_eager_attention(family, path, monkeypatch):
    """Both ways of computing it (the CPU flash kernel's logsumexp; explicit logits after SDPA) agree with the
    probabilities eager attention returns — with a sliding window for mistral, so the mask path is exercised."""
    if path == "logits":
        monkeypatch.setattr(scan_recorder, "_FLASH_CPU", None)
    overrides = {"sliding_window": 8} if family == "mistral" else {}
    model = tiny(family, **overrides)
    batches = windows()
    report = scan(model, IdTokenizer(), batches, progress=False)
    expected = eager_sink_scores(model, batches)
    got = [row.attention_sink for row in report.layers[1:]]
    assert got == pytest.approx(expected, abs=1e-5)
    assert report.layers[0].attention_sink is None


def test_scan_leaves_the_model_as_it_was():
    model = tiny("qwen3")
    batches = windows()
    with torch.no_grad():
        before = model(batches[0]).logits
    implementation = model.config._attn_implementation
    scan(model, IdTokenizer(), batches, progress=False)
    assert model.config._attn_implementation == implementation
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(batches[0]).logits, before)


def test_scan_forward_is_the_plain_forward(monkeypatch):
    """The scan's attention returns what SDPA returns: the statistics describe the model as users run it."""
    model = tiny("llama")
    batch = windows()[0]
    with torch.no_grad():
        plain = model(batch).logits
    seen = {}
    recorder = scan_recorder.Recorder(model, IdTokenizer(), massive_abs=100.0, massive_ratio=1000.0, top_k=4,
                                      sample_tokens=4, sample_dims=4)
    recorder.input_ids = batch
    with scan_recorder.scan_attention_enabled(model, recorder) as enabled, torch.no_grad():
        seen["enabled"] = enabled
        scanned = model(batch).logits
    assert seen["enabled"]
    torch.testing.assert_close(scanned, plain, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- report


def test_report_is_bounded_and_reads_back(tmp_path):
    """Memory and output do not grow with the number of tokens; scan.json round-trips."""
    model = tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] += 20.0
    small = scan(model, IdTokenizer(), iter(windows(n=4)), progress=False)
    large = scan(model, IdTokenizer(), (b for b in windows(n=40, seed=2)), progress=False)
    assert large.tokens == 10 * small.tokens
    size_small = len(json.dumps(small.to_dict()))
    size_large = len(json.dumps(large.to_dict()))
    assert size_large < 1.2 * size_small

    path = large.save(tmp_path / "scan.json")
    loaded = ScanReport.load(path)
    assert loaded.to_dict() == json.loads(path.read_text())
    assert loaded.sinks[0].dim == 3 and loaded.layers[1].top_dims[0].dim == 3
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    assert {"dim", "mean_abs", "ratio_to_median", "scale_pow2", "per_layer_mean_abs", "norm_weights"} <= set(
        data["sinks"][0])
    assert len(data["residual_mean_abs"]) == 4 and len(data["residual_mean_abs"][0]) == 64


def test_unreadable_report_is_one_line(tmp_path):
    (tmp_path / "scan.json").write_text('{"schema_version": 99}')
    with pytest.raises(SurgeonError, match="schema 99"):
        ScanReport.load(tmp_path / "scan.json")
    with pytest.raises(SurgeonError, match="run `surgeon scan`"):
        ScanReport.load(tmp_path / "missing.json")


def test_converted_surgeon_model_is_scanned_with_its_pre_affine(tmp_path):
    """A surgeon_llama checkpoint (GatedNorm + PreAffine) loads through AutoModelForCausalLM and its residual
    readers' λ1 are reported at the sink dimension."""
    from surgeon.modeling import CLASSES

    config_cls, model_cls = CLASSES["llama"]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, surgeon={
                            "gated_norm": {"rank": 4, "targets": ["model.layers.*.input_layernorm"]},
                            "pre_affine": {"targets": ["model.layers.*.post_attention_layernorm", "model.norm"]}})
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 7] += 30.0
        model.model.norm.pre_affine[7] = 0.25
    model.save_pretrained(tmp_path / "converted")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()  # no remote code needed
    assert loaded.config.model_type == "surgeon_llama"
    report = scan(loaded, IdTokenizer(), windows(), progress=False)
    assert report.sinks[0].dim == 7
    pre = report.sinks[0].norm_weights["pre_affine"]
    assert pre["final"] == pytest.approx(0.25)
    assert pre["post_attention_layernorm"] == [1.0, 1.0]
    assert "input_layernorm" not in pre
    assert all(row.attention_sink is not None for row in report.layers[1:])


# ----------------------------------------------------------------------------- CLI


def test_scan_command_writes_report_and_figures(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 33 + VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    model = tiny("qwen2")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 12] += 25.0
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("".join(chr(33 + (i * 7) % 90) for i in range(3000)) + "\n")

    out = tmp_path / "report"
    code = cli_main(["scan", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--tokens", "256",
                     "--seq-len", "32", "--batch-size", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert sorted(p.name for p in out.iterdir()) == ["max_abs.png", "residual_heatmap.png", "scan.json",
                                                     "token_heatmap.png"]
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    report = ScanReport.load(out / "scan.json")
    assert report.windows == 8 and report.seq_len == 33 and report.bos
    assert report.sink_dims == [12]
    assert "residual sinks" in captured.out and "12" in captured.out


def test_scan_command_argument_errors(tmp_path, capsys):
    code = cli_main(["scan", "default", "--data", "default", "--tokens", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("surgeon: error: --tokens must be at least 1") and "\n" not in err


# ------------------------------------------------------------ the real default (required in CI, else if installed)


def test_real_smollm2_sink_dimension_507():
    """docs/experiments.md: SmolLM2's residual stream peaks at ~24.9k in dimension 507 on the first token."""
    from real_defaults import require_defaults
    from surgeon.sources import iter_token_windows, load_model, resolve_model, resolve_text

    require_defaults()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, tokenizer = load_model(resolve_model("default"))
    batches = iter_token_windows(resolve_text("default"), tokenizer, 128, max_tokens=256, batch_size=2)
    report = scan(model, tokenizer, batches, progress=False)
    assert report.peak["dim"] == 507 and report.peak["position"] == 0
    assert 15_000 < report.peak["value"] < 40_000
    assert 507 in report.sink_dims
    assert any(m.dim == 507 and m.position == 0 and m.value > 10_000 for m in report.massive)
    late = [row.attention_sink for row in report.layers[-10:]]
    assert min(late) > 0.2  # later layers park much of their attention on the first token
