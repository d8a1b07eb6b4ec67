"""surgeon.gates on tiny converted models (GatedNorm + PreAffine): at identity init every gate reads ½ (no
movement, no spread, no correlation); a planted gate's statistics equal a direct full-tensor computation over
several batches; an outlier-suppressing gate correlates negatively with |y|; measure(), scan (scan.json included),
the scan plots and the training curves carry the statistics for gated models and nothing for plain ones."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from tiny import input_ids, make_tiny
from torch import nn

from surgeon.convert import convert
from surgeon.gates import STATS, gated_norms, record_gates
from surgeon.modeling.modeling_surgeon import gated_norm_reference
from surgeon.sources import load_model
from surgeon.transforms import GatedNorm, PreAffine

RESIDUAL_NORMS = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                  "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
PLANTED = "model.layers.1.post_attention_layernorm"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    src = make_tiny(root / "src", "llama")
    convert(src, root / "gated", [GatedNorm(rank=4), PreAffine()], show_progress=False)
    return {"src": src, "gated": root / "gated"}


def batches(n=2):
    return [input_ids(2, 16, seed=10 + i) for i in range(n)]


def forward_all(model, ids_list):
    with torch.no_grad():
        return [model(input_ids=ids).logits for ids in ids_list]


def test_identity_init_gates_sit_at_one_half_and_the_output_is_unchanged(paths):
    model, _ = load_model(paths["gated"])
    plain = forward_all(model, batches())
    with record_gates(model) as gates:
        hooked = forward_all(model, batches())
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    assert not any(m._forward_hooks for _, m in gated_norms(model))  # removed on exit
    result = gates.results()
    assert list(result["norms"]) == RESIDUAL_NORMS
    for row in result["norms"].values():
        assert row["mean_abs_dev"] == 0.0 and row["spread_channels"] == 0.0 and row["spread_tokens"] == 0.0
        assert row["corr_abs_y"] is None  # g is constant: no correlation is defined
        assert row["g_min"] == row["g_max"] == 0.5 and row["tokens"] == 2 * 2 * 16
    assert result["mean"] == {"mean_abs_dev": 0.0, "spread_channels": 0.0, "spread_tokens": 0.0,
                              "corr_abs_y": None, "g_min": 0.5, "g_max": 0.5}
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_planted_gate_statistics_match_a_direct_computation(paths):
    model, _ = load_model(paths["gated"])
    norm = model.get_submodule(PLANTED)
    d, r = norm.gate_up.weight.shape
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.gate_down.weight.copy_(torch.randn(r, d, generator=generator) / d ** 0.5)
        norm.gate_up.weight.copy_(2.0 * torch.randn(d, r, generator=generator))
        norm.pre_affine.copy_(torch.rand(d, generator=generator) * 1.5 + 0.5)  # y is N(λ1 ⊙ x)
    inputs = []
    handle = norm.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    try:
        with record_gates(model) as gates:
            forward_all(model, batches(3))
    finally:
        handle.remove()
    result = gates.results()

    # the same statistics, straight from the definitions, in float64 over every token of the three batches
    x = torch.cat([t.reshape(-1, d) for t in inputs]).double() * norm.pre_affine.double()
    y = norm.weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    g = torch.sigmoid(F.silu(y @ norm.gate_down.weight.double().T) @ norm.gate_up.weight.double().T)
    expected = {
        "mean_abs_dev": (g - 0.5).abs().mean().item(),
        "spread_channels": g.std(dim=1, correction=0).mean().item(),
        "spread_tokens": g.std(dim=0, correction=0).mean().item(),
        "corr_abs_y": torch.corrcoef(torch.stack([g.flatten(), y.abs().flatten()]))[0, 1].item(),
        "g_min": g.min().item(), "g_max": g.max().item()}
    row = result["norms"][PLANTED]
    assert row["tokens"] == x.shape[0] == 3 * 2 * 16
    assert expected["spread_channels"] > 0.05 and expected["spread_tokens"] > 0.05  # the plant moved the gate
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    others = [v for name, v in result["norms"].items() if name != PLANTED]
    assert all(v["mean_abs_dev"] == 0.0 for v in others)
    assert result["mean"]["mean_abs_dev"] == pytest.approx(row["mean_abs_dev"] / len(RESIDUAL_NORMS))
    assert result["mean"]["corr_abs_y"] == row["corr_abs_y"]  # the only norm where it is defined


def test_outlier_suppressing_gate_correlates_negatively_with_abs_y(paths):
    """Effectively rank 1: W_down reads channel k, W_up[k] is large negative, so g_k = σ(−c·silu(y_k)); the
    embedding's channel k is planted positive and large, so the largest |y| get the smallest gates."""
    model, _ = load_model(paths["gated"])
    name, k, c = "model.layers.0.input_layernorm", 5, 8.0
    norm = model.get_submodule(name)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, k] = torch.rand(model.config.vocab_size,
                                                           generator=torch.Generator().manual_seed(4)) * 0.2 + 0.05
        norm.gate_down.weight.zero_()
        norm.gate_down.weight[0, k] = 1.0
        norm.gate_up.weight.zero_()
        norm.gate_up.weight[k, 0] = -c
    with record_gates(model) as gates:
        forward_all(model, batches())
    row = gates.results()["norms"][name]
    assert row["corr_abs_y"] < -0.3
    assert row["g_min"] < 0.1 and row["g_max"] == 0.5  # only channel k is gated down


def test_gates_found_by_attributes_through_a_wrapper():
    """A norm class that is not surgeon's (as with remote code) and a DeepSpeed-like `.module` wrapper."""

    class SurgeonRMSNorm(nn.Module):  # the remote-code copy: same attributes, another class object
        def __init__(self, d, rank):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.variance_epsilon, self.pre_affine, self.gate_rank = 1e-6, None, rank
            self.gate_down = nn.Linear(d, rank, bias=False)
            self.gate_up = nn.Linear(rank, d, bias=False)

        def forward(self, x):
            return gated_norm_reference(x, self.weight, self.gate_down.weight, self.gate_up.weight,
                                        self.variance_epsilon)

    class Engine(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = nn.Sequential(SurgeonRMSNorm(8, 2), nn.LayerNorm(8))
    with record_gates(Engine(inner)) as gates:
        inner(torch.randn(3, 8))
    assert list(gates.results()["norms"]) == ["0"] and gates.results()["norms"]["0"]["tokens"] == 3
    with record_gates(nn.Linear(4, 4)) as none:
        pass
    assert none.results() is None


def test_measure_reports_gates_only_for_gated_models(paths):
    from surgeon.train.measure import measure

    gated, _ = load_model(paths["gated"])
    metrics = measure(gated, batches())
    assert list(metrics["gates"]["norms"]) == RESIDUAL_NORMS and set(metrics["gates"]["mean"]) == set(STATS)
    assert json.loads(json.dumps(metrics)) == metrics
    assert not any(m._forward_hooks for _, m in gated_norms(gated))
    plain, _ = load_model(paths["src"])
    assert "gates" not in measure(plain, batches())


def test_scan_saves_and_reloads_gate_stats(paths, tmp_path):
    from rich.console import Console

    from surgeon import plots
    from surgeon.scan import ScanReport, print_report, scan

    model, tokenizer = load_model(paths["gated"])
    with torch.no_grad():
        model.get_submodule(PLANTED).gate_up.weight.normal_(0, 1.0)
    report = scan(model, tokenizer, batches(), progress=False)
    assert list(report.gates["norms"]) == RESIDUAL_NORMS
    assert report.gates["norms"][PLANTED]["mean_abs_dev"] > 0 and report.gates["norms"][PLANTED]["tokens"] == 64
    path = report.save(tmp_path / "scan.json")
    loaded = ScanReport.load(path)
    assert loaded.gates == report.gates and loaded.to_dict() == json.loads(path.read_text())

    out = io.StringIO()
    print_report(loaded, Console(file=out, width=160))
    assert "gates" in out.getvalue() and "layers.1.post_attention_layernorm" in out.getvalue()
    written = plots.write_all(loaded, tmp_path)
    assert tmp_path / "gates.png" in written and (tmp_path / "gates.png").stat().st_size > 1000

    # a scan.json written before gate telemetry, and a model without gates
    data = json.loads(path.read_text())
    del data["gates"]
    path.write_text(json.dumps(data))
    assert ScanReport.load(path).gates is None
    plain, tokenizer = load_model(paths["src"])
    plain_report = scan(plain, tokenizer, batches(), progress=False)
    assert plain_report.gates is None and ScanReport.load(plain_report.save(tmp_path / "plain.json")).gates is None
    out = io.StringIO()
    print_report(plain_report, Console(file=out, width=160))
    assert "gates:" not in out.getvalue()
    (tmp_path / "plain").mkdir()
    assert not any(p.name == "gates.png" for p in plots.write_all(plain_report, tmp_path / "plain"))


def test_curves_draw_gates_png_when_the_records_have_gate_stats(paths, tmp_path):
    from surgeon.train.curves import draw_curves
    from surgeon.train.measure import measure

    model, _ = load_model(paths["gated"])
    records = [{"step": 0, "tokens": 0, "eval": measure(model, batches())}]
    with torch.no_grad():
        for _, norm in gated_norms(model):
            norm.gate_up.weight.normal_(0, 0.5)
    for step in (1, 2):
        records.append({"step": step, "tokens": 64 * step, "total": 4.0 - step, "lm": 4.0 - step})
    records.append({"step": 2, "tokens": 128, "eval": measure(model, batches())})
    assert records[0]["eval"]["gates"]["mean"]["corr_abs_y"] is None  # drawn as a gap, not a failure
    (tmp_path / "gated").mkdir()
    (tmp_path / "gated" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = draw_curves(tmp_path / "gated" / "metrics.jsonl", tmp_path / "gated")
    assert tmp_path / "gated" / "gates.png" in written
    assert (tmp_path / "gated" / "gates.png").stat().st_size > 1000

    for r in records:
        r.get("eval", {}).pop("gates", None)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = draw_curves(tmp_path / "plain" / "metrics.jsonl", tmp_path / "plain")
    assert written and not (tmp_path / "plain" / "gates.png").exists()
