"""The main job end to end on a tiny model with a planted residual sink: every stage runs, the sink is found and
absorbed, the function is kept, and the run directory holds the report."""

from __future__ import annotations

import json

from tiny import make_tiny

from surgeon.cli import main
from surgeon.commands.inspect import describe
from surgeon.pipeline import PipelineConfig, run

TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. ") * 40


def test_pipeline_runs_end_to_end(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny(tmp_path / "src", "llama", tied=True)
    weights = load_file(src / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 7] += 40.0  # a residual sink in dimension 7
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "text.txt").write_text(TEXT)

    cfg = PipelineConfig(model=str(src), data=str(tmp_path / "text.txt"), rank=4, scan_tokens=256, seq_len=32,
                         eval_windows=2, eval_skip_tokens=0, batch_size=2)
    result = run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert (out / "report.md").is_file() and (out / "model" / "config.json").is_file()
    assert result.scans["source"].sink_dims == [7]
    assert result.scans["converted"].peak["value"] < result.scans["source"].peak["value"] / 8
    assert result.verify["ok"] and result.verify["max_abs_diff"] == 0.0
    assert result.evals["converted"].perplexity["none"] == result.evals["source"].perplexity["none"]
    block = json.loads((out / "model" / "config.json").read_text())["surgeon"]
    assert block["transforms"] == ["gated-norm", "pre-affine", "absorb-sinks"]
    assert [s["dim"] for s in block["absorb_sinks"]["sinks"]] == [7]
    info = describe(out / "model")
    assert [e["dim"] for e in info["absorbed_sinks"]] == [7] and info["gate_rank"] == 4
    assert not info["tied_embeddings"] and info["has_lm_head"]  # absorb-sinks untied the LM head
    report = (out / "report.md").read_text()
    assert "| residual peak max" in report and "INT4 W4A4" in report and "dim 7 ÷" in report
    for label in ("source", "converted"):
        assert (out / f"scan-{label}" / "scan.json").is_file()
        assert (out / f"scan-{label}" / "residual_heatmap.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["perplexity"]["source"]["int4"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "src", "text.txt"]  # no staging left

    # the CLI refuses to overwrite the run, in one line
    assert main(["pipeline", "--model", str(src), "--data", str(tmp_path / "text.txt"), "--out", str(out)]) == 2
