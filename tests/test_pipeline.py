"""The main job end to end on a tiny model with a planted residual sink: every stage runs, the sink is found and
absorbed, the function is kept, and the run directory holds the report."""

from __future__ import annotations

import json

import pytest
from tiny import make_tiny

from surgeon.cli import main
from surgeon.commands.inspect import describe
from surgeon.errors import SurgeonError
from surgeon.pipeline import PipelineConfig, conversion_passes, run, split_text

pytestmark = pytest.mark.usefixtures("restore_environment")  # the pipeline trains in-process

RECIPE = """
seq_len: 32
batch_size: 2
steps: 3
lr: 1.0e-3
lr_new: 1.0e-2
warmup_steps: 1
heldout_every: 4
eval_windows: 2
eval_every: 3
save_every: 3
objectives: {lm: 1.0, qat: int4, qat_fraction: 0.5}
optimizer_coordinates: source
"""
TEXT = ("Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
        "lour'd upon our house in the deep bosom of the ocean buried. ") * 40


def test_pipeline_runs_end_to_end(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny(tmp_path / "src", "llama", tied=True)
    weights = load_file(src / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 7] += 40.0  # a residual sink in dimension 7
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "text.txt").write_text(TEXT)

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    cfg = PipelineConfig(model=str(src), data=str(tmp_path / "text.txt"), gated_norm=True, rank=4, scan_tokens=256, seq_len=32,
                         eval_windows=2, eval_skip_tokens=32, batch_size=2, recipe=str(tmp_path / "recipe.yaml"),
                         choose=False, deploy_tokens=256)  # the fixed passes; the chooser's run is the control test's
    result = run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    converted, trained = out / "model-converted", out / "model-trained"
    assert (out / "report.md").is_file() and (converted / "config.json").is_file()
    assert result.scans["source"].sink_dims == [7]
    assert result.scans["converted"].peak["value"] < result.scans["source"].peak["value"] / 8
    assert result.verify["ok"] and result.verify["max_rel_diff"] < 1e-5  # exact but for hadamard's float rounding
    assert result.evals["converted"].perplexity["none"] == pytest.approx(result.evals["source"].perplexity["none"],
                                                                         rel=1e-4)
    block = json.loads((converted / "config.json").read_text())["surgeon"]
    assert block["transforms"] == ["gated-norm", "pre-affine", "absorb-sinks", "smooth", "hadamard"]
    assert set(block["hadamard"]["groups"]) == {"attention_in", "attention_out", "mlp_in", "mlp_out"}
    assert block["smooth"]["alpha"] == 0.8
    assert [s["dim"] for s in block["absorb_sinks"]["sinks"]] == [7]
    info = describe(converted)
    assert [e["dim"] for e in info["absorbed_sinks"]] == [7] and info["gate_rank"] == 4
    assert not info["tied_embeddings"] and info["has_lm_head"]  # absorb-sinks untied the LM head

    # trained with the recipe, exported, evaluated: a different function from the converted one
    assert result.training["steps"] == 3 and result.training["tokens"] == 3 * 2 * 33
    training = json.loads((trained / "config.json").read_text())["surgeon"]["training"]
    assert training["steps"] == 3
    # provenance names where the run and the converted model end up, not the staging directory they were in
    assert training["run_dir"] == str((out / "train").resolve()) and training["model"] == str(converted.resolve())
    assert "surgeon-tmp" not in (trained / "README.md").read_text() + (trained / "surgeon_manifest.json").read_text()
    assert result.evals["trained"].perplexity["none"] != result.evals["converted"].perplexity["none"]
    assert (out / "train" / "metrics.jsonl").is_file() and not (out / "train" / "checkpoints").exists()
    assert result.text["overlap"]  # one file: nothing to hold out, and the report says so

    report = (out / "report.md").read_text()
    assert "| | source | converted | trained |" in report and "evaluation windows come from the training" in report
    assert "| residual peak max" in report and "INT4 W4A4" in report and "dim 7 ÷" in report
    assert "| GatedNorm gates" in report
    assert "smoothed with α 0.8" in report and "The smooth pass then divides" in report
    assert "| linear-input max/RMS, mean (worst) — training's held-out | – |" in report  # smooth changed them
    assert "INT4 W4A4 +SQ" in report and set(result.evals["trained"].perplexity) == {
        "none", "nvfp4", "int4", "nvfp4+sq", "int4+sq", "nvfp4-static", "deployed-nvfp4"}
    # each model written as a compressed-tensors NVFP4 checkpoint, which computes the static-scale estimate
    for label in ("source", "converted", "trained"):
        ppl = result.evals[label].perplexity
        assert json.loads((out / f"deployed-{label}" / "config.json").read_text())["quantization_config"]["format"] \
            == "nvfp4-pack-quantized"
        assert ppl["deployed-nvfp4"] == pytest.approx(ppl["nvfp4-static"], rel=1e-4)
    assert "| deployed NVFP4 |" in report and "from the static-scale estimate" in report
    assert "NVFP4 W4A4 static" in report and results_deployed(out) == ["converted", "source", "trained"]
    # deploy auto also picks INT4's w4a4, whose blocks of 32 the tiny model's width 48 does not fill: left out, said
    assert "No `w4a4` checkpoints (deploy auto): model.layers.0.self_attn.q_proj reads 48 features" in report
    assert list(json.loads((out / "results.json").read_text())["undeployable"]) == ["w4a4"]
    assert "AdamW stepping the source's weights, unsmoothed and unrotated (optimizer_coordinates: source)" in report
    assert "Hadamard-rotated" in report and "The hadamard pass multiplies" in report
    assert "Trained ÷ source perplexity" in report and "![training loss](train/loss.png)" in report
    for label in ("source", "converted", "trained"):
        assert (out / f"scan-{label}" / "scan.json").is_file()
        assert (out / f"scan-{label}" / "residual_heatmap.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert results["perplexity"]["source"]["int4"] > 0 and results["training"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "run", "src", "text.txt"]  # no staging

    # the CLI refuses to overwrite the run, in one line
    assert main(["pipeline", "--model", str(src), "--data", str(tmp_path / "text.txt"), "--out", str(out)]) == 2


def results_deployed(out) -> list[str]:
    return sorted(json.loads((out / "results.json").read_text())["deployed"])


def test_control_shares_every_pass_and_the_recipe_but_the_module_passes(tmp_path):
    """--control: the same source, passes minus gated-norm / pre-affine / absorb-sinks, the same recipe, budget and
    text (asserted from the two converted configs and the two run.json files); exported, evaluated, reported."""
    from safetensors.torch import load_file, save_file

    from surgeon.transforms import TRANSFORMS

    src = make_tiny(tmp_path / "src", "qwen2")
    weights = load_file(src / "model.safetensors")
    weights["model.embed_tokens.weight"][:, 5] += 40.0  # a sink, so the main run absorbs it
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    for i in range(3):
        (tmp_path / "text").mkdir(exist_ok=True)
        (tmp_path / "text" / f"{i}.txt").write_text(TEXT)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    cfg = PipelineConfig(model=str(src), data=str(tmp_path / "text"), gated_norm=True, rank=4, gated_attention=True,
                         scan_tokens=256, seq_len=32, eval_windows=2, eval_skip_tokens=32, batch_size=2, eval_files=1,
                         recipe=str(tmp_path / "recipe.yaml"), control=True, choose=False, deploy_tokens=128)
    result = run(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert results_deployed(out) == ["control", "converted", "source", "trained"]  # the control deployed too
    assert "control ×" in (out / "report.md").read_text().split("Deployed NVFP4 ratio to fp32:")[1]
    main_block = json.loads((out / "model-converted" / "config.json").read_text())["surgeon"]
    control_block = json.loads((out / "model-control-converted" / "config.json").read_text())["surgeon"]
    assert main_block["transforms"] == ["gated-norm", "gated-attention", "pre-affine", "absorb-sinks", "smooth",
                                        "hadamard"]
    assert control_block["transforms"] == [t for t in main_block["transforms"] if not TRANSFORMS[t].module_pass] \
        == ["smooth", "hadamard"]
    gate = "model.layers.*.self_attn.output_gate"  # the attention gate, rotated with q/k/v where it exists
    main_rotated = json.loads(json.dumps(main_block["hadamard"]).replace(f', "{gate}"', ""))
    assert gate in main_block["hadamard"]["groups"]["attention_in"]["linears"] and gate not in str(main_rotated)
    for key, main_settings in (("smooth", main_block["smooth"]), ("hadamard", main_rotated)):  # the shared passes
        assert {k: v for k, v in control_block[key].items() if k not in ("log2_scale_range", "calibration_tokens")} \
            == {k: v for k, v in main_settings.items() if k not in ("log2_scale_range", "calibration_tokens")}
    assert not {"gated_norm", "gated_attention", "pre_affine", "absorb_sinks"} & set(control_block)
    runs = [json.loads((out / d / "run.json").read_text()) for d in ("train", "train-control")]
    assert runs[0]["recipe"] == runs[1]["recipe"] and runs[0]["objectives"] == runs[1]["objectives"]
    assert runs[0]["data"] == runs[1]["data"] == [str(tmp_path / "text" / f"{i}.txt") for i in (1, 2)]
    assert result.control["training"]["steps"] == result.training["steps"] == 3
    assert result.control["training"]["tokens"] == result.training["tokens"]
    assert result.control["verify"]["ok"]
    control_config = json.loads((out / "model-control" / "config.json").read_text())
    assert control_config["surgeon"]["training"]["steps"] == 3 and "gated_norm" not in control_config["surgeon"]
    assert not (out / "train-control" / "checkpoints").exists()

    report = (out / "report.md").read_text()
    assert "| | source | converted | trained | control |" in report
    assert "## What the norm modules bought" in report and "| trained ÷ control |" in report
    gates = next(line for line in report.splitlines() if line.startswith("| GatedNorm gates"))
    assert gates.split(" | ")[1:3] == ["–", "0.0000, –"] and gates.endswith("| – |")  # source, converted (½), control
    assert result.scans["trained"].gates["mean"]["mean_abs_dev"] > 0  # trained gates moved off ½
    attention = next(line for line in report.splitlines() if line.startswith("| attention gates"))
    assert attention.split(" | ")[1:3] == ["–", "0.0000, 0.50 … 0.50"] and attention.endswith("| – |")
    assert result.scans["trained"].attention_gates["mean"]["mean_abs_dev"] > 0
    assert "| first-token massive activation" in report
    assert "converted with smooth + hadamard" in report and "![control training loss](train-control/loss.png)" in report
    assert (out / "scan-control" / "scan.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert set(results["perplexity"]) == {"source", "converted", "trained", "control"}
    assert results["control"]["transforms"] == ["smooth", "hadamard"]


def test_control_needs_training(tmp_path):
    with pytest.raises(SurgeonError, match="--control trains a control"):
        run(PipelineConfig(model="no-such-model", control=True, train=False), tmp_path / "run")
    assert main(["pipeline", "--out", str(tmp_path / "run"), "--control", "--no-train"]) == 2
    assert not (tmp_path / "run").exists()


def test_text_split_holds_the_first_files_out(tmp_path):
    paths = [tmp_path / f"{i}.txt" for i in range(4)]
    assert split_text(paths, 2) == (paths[:2], paths[2:], False)
    assert split_text(paths[:2], 2) == (paths[:2], paths[:2], True)  # too few to split
    assert split_text(paths, 0) == (paths, paths, True)


def test_a_bad_recipe_fails_before_any_work(tmp_path):
    src = make_tiny(tmp_path / "src", "llama")
    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["pipeline", "--model", str(src), "--data", str(tmp_path / "text.txt"), "--out",
                 str(tmp_path / "run"), "--recipe", "no-such-recipe"]) == 2
    assert not (tmp_path / "run").exists()


def test_final_path_names_the_destination_of_staged_directories():
    from pathlib import Path

    from surgeon.io import final_path

    staged = Path("/r/.smollm2.hpx086hb.surgeon-tmp/.model-trained.x1y2.surgeon-tmp/config.json")
    assert final_path(staged) == Path("/r/smollm2/model-trained/config.json")
    assert final_path(Path("/r/.hidden/a.b.c/x")) == Path("/r/.hidden/a.b.c/x")  # not a staging name


def test_smooth_and_hadamard_flags_reach_the_config(monkeypatch, tmp_path):
    import surgeon.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run", lambda cfg, out, force=False: seen.append(cfg))
    base = ["pipeline", "--out", str(tmp_path / "run")]
    assert main(base) == 0 and main([*base, "--smooth-alpha", "0.6"]) == 0 and main([*base, "--no-smooth"]) == 0
    assert [cfg.smooth_alpha for cfg in seen] == [0.8, 0.6, None]
    assert main([*base, "--no-hadamard"]) == 0 and [cfg.hadamard for cfg in seen] == [True] * 3 + [False]
    assert main([*base, "--gated-norm", "--rank", "8"]) == 0 and (seen[-1].gated_norm, seen[-1].rank) == (True, 8)
    assert [cfg.gated_norm for cfg in seen[:-1]] == [PipelineConfig().gated_norm] * 4
    assert main([*base, "--gated-attention"]) == 0 and seen[-1].gated_attention
    assert not any(cfg.gated_attention for cfg in seen[:-1])


def test_the_default_passes(tmp_path):
    """Without --gated-norm the main job converts with pre-affine (+ absorb-sinks when the scan found sinks), smooth
    and hadamard; with it, GatedNorm comes first. The control drops the module passes either way."""
    from surgeon.pipeline import conversion_passes

    for gated in (False, True):
        cfg = PipelineConfig(gated_norm=gated, gated_attention=gated)
        names = [p.name for p in conversion_passes(cfg, tmp_path / "scan.json", [tmp_path / "t.txt"])]
        assert names == ["gated-norm", "gated-attention"] * gated + ["pre-affine", "absorb-sinks", "smooth",
                                                                      "hadamard"]
        assert [p.name for p in conversion_passes(cfg, None, [tmp_path / "t.txt"], control=True)] == ["smooth",
                                                                                                 "hadamard"]


def test_the_chooser_gets_absorb_sinks_as_a_candidate_and_deploy_auto_follows_the_target(tmp_path):
    """Training-free, the chooser decides absorb-sinks (not in its base, in the conversion only if kept); a run that
    trains keeps it fixed; deploy "auto" writes each model in its target formats' W4A4 schemes; a bad --format
    fails before any work."""
    from surgeon.pipeline import absorb_is_chosen, deploy_schemes
    from surgeon.transforms import AbsorbSinks

    cfg = PipelineConfig()
    assert cfg.format == "each" and cfg.deploy == "auto" and cfg.train
    scan, text = tmp_path / "scan.json", [tmp_path / "t.txt"]
    assert [p.name for p in conversion_passes(cfg, scan, text, optional=[])] == ["pre-affine", "absorb-sinks"]
    untrained = PipelineConfig(train=False)
    assert absorb_is_chosen(untrained, []) and not absorb_is_chosen(cfg, []) and not absorb_is_chosen(untrained, None)
    assert [p.name for p in conversion_passes(untrained, scan, text, optional=[])] == ["pre-affine"]
    kept = [AbsorbSinks(scan=scan)]
    assert [p.name for p in conversion_passes(untrained, scan, text, optional=kept)] == ["pre-affine", "absorb-sinks"]
    assert [p.name for p in conversion_passes(untrained, scan, text)][:2] == ["pre-affine", "absorb-sinks"]  # fixed
    assert deploy_schemes(cfg, ("nvfp4", "int4")) == ("nvfp4", "w4a4")
    assert deploy_schemes(cfg, ("int4",)) == ("w4a4",)
    assert deploy_schemes(PipelineConfig(deploy="nvfp4a16"), ("int4",)) == ("nvfp4a16",)
    assert deploy_schemes(PipelineConfig(deploy=None), ("nvfp4",)) == ()
    with pytest.raises(SurgeonError, match="unknown --format 'fp8': use one of nvfp4, int4, both, each"):
        run(PipelineConfig(format="fp8"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_defaults_are_the_shipped_yaml():
    """PipelineConfig's defaults are configs/pipeline.yaml's (package data of surgeon.configs), one key per field;
    the tuned values are the measured ones (docs/experiments.md)."""
    import dataclasses
    from importlib.resources import files

    import yaml

    shipped = yaml.safe_load((files("surgeon.configs") / "pipeline.yaml").read_text())
    defaults = {f.name: f.default for f in dataclasses.fields(PipelineConfig)}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == shipped  # yaml has lists
    assert (shipped["smooth_alpha"], shipped["hadamard"], shipped["gated_norm"]) == (0.8, True, False)
    assert shipped["gated_attention"] is False
    assert shipped["scan_tokens"] == 4096 and shipped["recipe"] == "smollm2-cpu"


def test_each_pass_describes_itself_in_the_report():
    """write_report's prose comes from the passes: a clause each from their config blocks, in the order they ran."""
    from surgeon.transforms import AbsorbSinks, GatedNorm, Hadamard, Smooth

    assert GatedNorm.describe({"rank": 4, "targets": []}) == "rank 4"
    assert AbsorbSinks.describe({"sinks": [{"dim": 7, "scale": 2048}], "untied_lm_head": True}) == \
        "absorbed dim 7 ÷2048 and the LM head untied from the embedding"
    assert AbsorbSinks.describe({"sinks": []}) == ""
    assert Smooth.describe({"alpha": 0.8, "calibration_tokens": 8192, "log2_scale_range": [-11, 4]},
                           text="training") == "smoothed with α 0.8 on 8,192 training tokens, scales 2^-11…2^4"
    assert Hadamard.describe({"groups": {"mlp_out": {"block": 32}}}) == \
        "inputs of mlp_out (blocks of 32) Hadamard-rotated"
    surgeon = {"gated_norm": {}, "absorb_sinks": {}, "smooth": {}}
    assert GatedNorm.explain(surgeon) == "the gates are identity-initialized, and "
    assert "GatedNorm's down projection" in Smooth.explain(surgeon)
    assert "Activation quantization sees the same values" in AbsorbSinks.explain({"absorb_sinks": {}})
    from surgeon.transforms import PreAffine

    assert PreAffine.explain({}).startswith("PreAffine starts at λ = 1") and PreAffine.explain(surgeon) == ""
    assert "Activation quantization" not in AbsorbSinks.explain(surgeon)
