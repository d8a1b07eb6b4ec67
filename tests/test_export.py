"""surgeon export (RUN_DIR → HF model directory) after real DeepSpeed runs on a tiny converted model (hidden 48,
2 layers, tied embeddings, 3 steps): the exported weights are exactly the live engine's at the end of training for
ZeRO 0-3; the export loads with torch + transformers only and gives the trained model's logits; GLU trained to α = 1
exports a stock model; the model card and manifest carry provenance and before/after figures; bad input is a one-line
error and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import HIDE_SURGEON, input_ids, make_tiny, write_words

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPE = """\
seq_len: 32
batch_size: 2
steps: 3
lr: 3.0e-3
lr_new: 1.0e-2
warmup_steps: 1
heldout_every: 10
eval_windows: 2
eval_every: 3
save_every: 1
keep_checkpoints: 3
shuffle_windows: 16
quant_eval: [int4]
objectives: {lm: 1.0}
"""
STAGES = (0, 1, 2, 3)


pytestmark = pytest.mark.usefixtures("restore_environment")  # training in-process sets RANK, MASTER_PORT…


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from surgeon.convert import convert
    from surgeon.transforms import GLU, GatedNorm, PreAffine

    root = tmp_path_factory.mktemp("export")
    make_tiny(root / "src", "llama", tied=True)
    convert(root / "src", root / "model", [GatedNorm(rank=4), PreAffine()], show_progress=False)
    convert(root / "src", root / "glu", [GLU(alpha=0.0)], show_progress=False)
    write_words(root / "text.txt", 200)
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "recipe-glu.yaml").write_text(RECIPE.replace("{lm: 1.0}", "{lm: 1.0, glu_alpha_steps: [0, 2]}"))
    return root


def _train_capturing(model, text, run_dir, recipe, ds_config=None):
    """Train in this process and return the DeepSpeed engine it trained (captured at initialize)."""
    from surgeon.train import engine as ds
    from surgeon.train.loop import train

    captured = {}
    initialize = ds.initialize

    def capture(*args, **kwargs):
        captured["engine"] = result = initialize(*args, **kwargs)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds, "initialize", capture)
        run = train(model, text, run_dir, recipe=recipe, deepspeed_config=ds_config, show_progress=False)
    assert run.step == 3
    return captured["engine"][0]


def _live_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's module as it is after training, gathered whole under ZeRO-3."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else None
    if gather is not None:
        gather.__enter__()
    try:
        return {n: p.detach().clone().float() for n, p in engine.module.named_parameters()}
    finally:
        if gather is not None:
            gather.__exit__(None, None, None)


@torch.no_grad()
def _live_logits(engine, ids):
    was = engine.module.training
    engine.module.eval()
    out = engine.module(input_ids=ids).logits.float().clone()
    engine.module.train(was)
    return out


@pytest.fixture(scope="module")
def runs(setup):
    """stage → (run dir, live parameters at the end, live logits of input_ids()) of a 3-step run."""
    out = {}
    for stage in STAGES:
        run_dir = setup / f"run-zero{stage}"
        engine = _train_capturing(setup / "model", setup / "text.txt", run_dir, setup / "recipe.yaml",
                                  CONFIGS / f"zero{stage}.json")
        out[stage] = (run_dir, _live_state(engine), _live_logits(engine, input_ids()) if stage == 0 else None)
        del engine
    return out


@pytest.fixture(scope="module")
def glu_run(setup):
    engine = _train_capturing(setup / "glu", setup / "text.txt", setup / "run-glu", setup / "recipe-glu.yaml")
    return setup / "run-glu", _live_logits(engine, input_ids())


def _exported(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / shard))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def _export(run_dir, out, **kwargs):
    from surgeon.export import export

    return export(run_dir, out, show_progress=False, **kwargs)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("stage", STAGES)
def test_export_is_exactly_the_live_engine_weights(setup, runs, tmp_path, stage):
    from surgeon.io import Checkpoint

    run_dir, live, _ = runs[stage]
    report = _export(run_dir, tmp_path / "out", shard_size="100KB")  # 200 KB of fp32: more than one shard
    assert report.zero_stage == stage and report.tag == "step3" and report.step == 3 and report.dtype == "float32"
    assert len(report.shards) > 1
    exported = _exported(tmp_path / "out")
    model = Checkpoint(setup / "model")
    # the model directory's names and shapes: the tied head is not written
    assert set(exported) == set(model.tensors) and "lm_head.weight" not in exported
    assert {n: tuple(t.shape) for n, t in exported.items()} == {n: i.shape for n, i in model.tensors.items()}
    assert set(exported) == set(live)
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, live[name]), name
    # training moved the weights: the comparison above is not the model directory against itself
    moved = [n for n in exported if not torch.equal(exported[n], model.get(n).float())]
    assert len(moved) > len(exported) // 2


def test_moe_experts_are_written_in_the_model_directorys_layout(setup, tmp_path):
    """transformers fuses per-expert tensors into one parameter when loading and splits them when saving: the export
    must write the model directory's per-expert names (Mixtral's legacy block_sparse_moe.experts.N.w1 here)."""
    from transformers import AutoModelForCausalLM

    from surgeon.convert import convert
    from surgeon.io import Checkpoint
    from surgeon.transforms import GatedNorm

    make_tiny(tmp_path / "src", "mixtral")
    convert(tmp_path / "src", tmp_path / "model", [GatedNorm(rank=4)], show_progress=False)
    engine = _train_capturing(tmp_path / "model", setup / "text.txt", tmp_path / "run", setup / "recipe.yaml",
                              CONFIGS / "zero2.json")
    live = _live_state(engine)
    _export(tmp_path / "run", tmp_path / "out")
    exported = _exported(tmp_path / "out")
    model = Checkpoint(tmp_path / "model")
    assert any(".experts.0.w1." in n for n in model.tensors)
    assert {n: tuple(t.shape) for n, t in exported.items()} == {n: i.shape for n, i in model.tensors.items()}
    loaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    assert set(loaded) == set(live)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, live[name]), name


def test_an_earlier_step_and_bf16(setup, runs, tmp_path):
    run_dir, live, _ = runs[2]
    report = _export(run_dir, tmp_path / "bf16", dtype="bf16")
    exported = _exported(tmp_path / "bf16")
    assert report.dtype == "bfloat16" and all(t.dtype == torch.bfloat16 for t in exported.values())
    assert all(torch.equal(t, live[n].to(torch.bfloat16)) for n, t in exported.items())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    early = _export(run_dir, tmp_path / "step1", step=1)
    assert early.tag == "step1" and early.step == 1
    first = _exported(tmp_path / "step1")
    assert any(not torch.equal(first[n], live[n]) for n in first)  # a different checkpoint, not the latest again
    assert json.loads((tmp_path / "step1" / "config.json").read_text())["surgeon"]["training"]["steps"] == 1


# ----------------------------------------------------------------------------- loading without surgeon

LOAD = HIDE_SURGEON + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[3] == "remote").eval()
    ids = torch.tensor({ids})
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[2])
    assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
    print(type(model).__module__, model.config.model_type)
""")


def _logits_without_surgeon(out: Path, tmp_path: Path, remote: bool) -> tuple[torch.Tensor, str]:
    script = LOAD.format(ids=input_ids().tolist())
    result = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "logits.pt"),
                             "remote" if remote else "stock"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt", weights_only=True), result.stdout


def test_export_loads_with_only_torch_and_transformers(setup, runs, tmp_path):
    run_dir, _, live_logits = runs[0]
    _export(run_dir, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "modeling_surgeon.py", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "surgeon_manifest.json"} <= names
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "surgeon_llama" and "auto_map" in config and config["tie_word_embeddings"]
    remote, stdout = _logits_without_surgeon(tmp_path / "out", tmp_path, remote=True)
    assert "transformers_modules" in stdout  # the class came from the export's own modeling file
    torch.testing.assert_close(remote.float(), live_logits, rtol=1e-5, atol=1e-5)


def test_glu_trained_to_alpha_one_exports_a_stock_model(setup, glu_run, tmp_path):
    run_dir, live_logits = glu_run
    report = _export(run_dir, tmp_path / "out")
    assert report.stock and report.glu_alpha == 1.0 and report.model_type == "llama"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_act"] == "sigmoid" and "auto_map" not in config
    assert config["surgeon"]["glu"]["alpha"] == 1.0 and config["surgeon"]["training"]["glu_alpha"] == 1.0
    assert not list((tmp_path / "out").glob("*.py"))
    stock, stdout = _logits_without_surgeon(tmp_path / "out", tmp_path, remote=False)
    assert "transformers.models.llama" in stdout
    torch.testing.assert_close(stock.float(), live_logits, rtol=1e-5, atol=1e-5)
    # step 2 was trained at α = glu_alpha(1) = ½: still the annealed activation, with the trained α recorded
    half = _export(run_dir, tmp_path / "half", step=2)
    config = json.loads((tmp_path / "half" / "config.json").read_text())
    assert not half.stock and half.glu_alpha == 0.5 and config["surgeon"]["glu"]["alpha"] == 0.5
    assert config["model_type"] == "surgeon_llama" and "auto_map" in config and config["hidden_act"] == "silu"
    assert (tmp_path / "half" / "modeling_surgeon.py").is_file()


# ----------------------------------------------------------------------------- provenance


def test_model_card_and_manifest_say_what_was_done(setup, runs, tmp_path):
    run_dir, _, _ = runs[0]
    figures = {"Shakespeare ppl": {"source": 55.9, "export": 41.2}, "int4 ratio": [160.0, 3.1]}
    report = _export(run_dir, tmp_path / "out", figures=figures)
    model_config = json.loads((setup / "model" / "config.json").read_text())
    source_sha = model_config["surgeon"]["source_sha256"]
    run = json.loads((run_dir / "run.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    first, last = evals[0]["eval"], evals[-1]["eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 3 and "int4" in last["quant_ppl"]

    manifest = json.loads((tmp_path / "out" / "surgeon_manifest.json").read_text())
    assert manifest["source_sha256"] == source_sha == report.source_sha256
    assert manifest["model"]["sha256"] == run["model"]["sha256"]
    assert manifest["transforms"] == ["gated-norm", "pre-affine"]
    training = manifest["training"]
    assert training["steps"] == 3 and training["tokens"] == records[3]["tokens"] > 0
    assert training["recipe"]["steps"] == 3 and training["world_size"] == 1 and training["checkpoint"] == "step3"
    assert manifest["figures"]["before"]["ppl"] == first["ppl"] and manifest["figures"]["after"]["ppl"] == last["ppl"]
    assert manifest["figures"]["after"]["quant_ppl"]["int4"] == last["quant_ppl"]["int4"]
    assert manifest["figures"]["after"]["sink_abs"] == last["sink_abs"]
    assert manifest["figures"]["extra"]["int4 ratio"] == {"before": 160.0, "after": 3.1}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["surgeon"]["training"] == training

    card = (tmp_path / "out" / "README.md").read_text()
    assert source_sha in card and "gated-norm, pre-affine" in card and "| steps | 3 |" in card
    for value in (first["ppl"], last["ppl"], first["residual_peak"], last["residual_peak"],
                  first["linear_input_max_rms"], last["linear_input_max_rms"], last["quant_ppl"]["int4"]):
        assert f"{value:.4g}" in card
    for dim in last["sink_abs"]:
        assert f"sink dim {dim}" in card
    assert "W4A4 int4 perplexity" in card and "| Shakespeare ppl | 55.9 | 41.2 |" in card
    tables, rows = [], []
    for line in card.splitlines() + [""]:  # every row of a table has as many cells as its header
        if line.startswith("|"):
            rows.append(len(re.findall(r"(?<!\\)\|", line)))
        elif rows:
            tables.append(rows)
            rows = []
    assert len(tables) == 3 and all(len(set(t)) == 1 for t in tables), tables


def test_figures_are_optional_and_missing_quant_figures_are_fine(setup, runs, tmp_path):
    run_dir, _, _ = runs[3]  # ZeRO-3: the trainer skips the W4A4 figures
    _export(run_dir, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "perplexity" in card and "W4A4" not in card and "Further figures" not in card
    assert json.loads((tmp_path / "out" / "surgeon_manifest.json").read_text())["figures"]["extra"] is None


# ----------------------------------------------------------------------------- bad input


def _cli(args, capsys) -> str:
    from surgeon.cli import main

    assert main(["export", *map(str, args), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surgeon: error: ") and "\n" not in err, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(setup, runs, tmp_path, capsys):
    run_dir, _, _ = runs[2]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no run.json" in _cli([empty, tmp_path / "o1"], capsys)
    no_ckpt = tmp_path / "no-ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "run.json").write_text((run_dir / "run.json").read_text())
    assert "no checkpoints/" in _cli([no_ckpt, tmp_path / "o2"], capsys)
    assert "no checkpoint of step 7; it has step1, step2, step3" in _cli([run_dir, tmp_path / "o3", "--step", "7"],
                                                                          capsys)
    (tmp_path / "exists").mkdir()
    assert "--force" in _cli([run_dir, tmp_path / "exists"], capsys)
    assert "inside the source" in _cli([run_dir, run_dir / "export"], capsys)
    assert "inside the source" in _cli([run_dir, setup / "model" / "export"], capsys)
    # a run whose checkpoint does not hold the model directory's tensors (run.json pointing at the unconverted source)
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    run = json.loads((run_dir / "run.json").read_text())
    run["model"]["path"] = str(setup / "src")
    (other / "run.json").write_text(json.dumps(run))
    (other / "checkpoints" / "step3").symlink_to(run_dir / "checkpoints" / "step3")
    (other / "checkpoints" / "latest").write_text("step3")
    err = _cli([other, tmp_path / "o4"], capsys)
    assert "does not hold the tensors" in err and "unexpected" in err and "gate_down" in err
    # the model directory is not the one the run recorded (its sha256 differs)
    run = json.loads((run_dir / "run.json").read_text())
    run["model"]["sha256"] = "0" * 64
    (other / "run.json").write_text(json.dumps(run))
    assert "changed since the run started" in _cli([other, tmp_path / "o5"], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists", "no-ckpt", "other"]
    assert not list((tmp_path / "exists").iterdir())
    # --force replaces an existing export
    _export(run_dir, tmp_path / "exists", force=True)
    assert (tmp_path / "exists" / "config.json").is_file()


def test_a_failure_while_writing_leaves_no_output(setup, runs, tmp_path, monkeypatch):
    from surgeon import export as export_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_export_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        _export(runs[1][0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary sibling


def test_checkpoints_are_read_weights_only(setup, runs, tmp_path, monkeypatch):
    """Without the allow-listed DeepSpeed classes the ZeRO checkpoint does not load: torch used its weights-only
    unpickler although DeepSpeed asked for weights_only=False."""
    from surgeon.errors import SurgeonError
    from surgeon.io import ds_checkpoint

    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    monkeypatch.setattr(ds_checkpoint, "SAFE_DEEPSPEED_GLOBALS", ())
    with pytest.raises(SurgeonError, match="refusing to unpickle"):
        _export(runs[2][0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before  # the switch is put back


class _Planted:
    """Unpickling this creates a file: what an arbitrary unpickle of a hostile checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_hostile_checkpoint_is_refused_without_running_its_pickle(setup, runs, tmp_path):
    """DeepSpeed's own torch.load(weights_only=False) would run this; the export's forced weights-only load refuses."""
    import shutil

    from surgeon.errors import SurgeonError

    run_dir = runs[2][0]
    hostile = tmp_path / "hostile"
    (hostile / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "run.json", hostile / "run.json")
    shutil.copytree(run_dir / "checkpoints" / "step3", hostile / "checkpoints" / "step3")
    (hostile / "checkpoints" / "latest").write_text("step3")
    optim = hostile / "checkpoints" / "step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)  # our own file, written by the run above
    marker = tmp_path / "pwned"
    state["optimizer_state_dict"]["planted"] = _Planted(str(marker))
    torch.save(state, optim)
    with pytest.raises(SurgeonError, match="refusing to unpickle"):
        _export(hostile, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_modeling_files_prefer_the_model_directorys_copy(tmp_path):
    """The auto_map's files are copied once each, the model directory's own copy first (the code it was trained
    with), surgeon's otherwise; a file found in neither is an error, not a model directory without its code."""
    from surgeon.errors import SurgeonError
    from surgeon.io.hf_dir import copy_modeling_files, modeling_files
    from surgeon.modeling import MODELING_FILE

    stem = MODELING_FILE.stem
    config = {"auto_map": {"AutoConfig": f"{stem}.C", "AutoModelForCausalLM": f"{stem}.M", "Other": ["x", "y"]}}
    assert modeling_files(config) == [MODELING_FILE.name]
    model_dir, out = tmp_path / "model", tmp_path / "out"
    model_dir.mkdir()
    out.mkdir()
    copy_modeling_files(config, out, model_dir)
    assert (out / MODELING_FILE.name).read_bytes() == MODELING_FILE.read_bytes()
    (model_dir / MODELING_FILE.name).write_text("# the trained code\n")
    copy_modeling_files(config, out, model_dir)
    assert (out / MODELING_FILE.name).read_text() == "# the trained code\n"
    with pytest.raises(SurgeonError, match="neither in"):
        copy_modeling_files({"auto_map": {"AutoConfig": "modeling_elsewhere.C"}}, out, model_dir)
    assert not (out / "modeling_elsewhere.py").exists()
