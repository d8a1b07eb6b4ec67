"""surgeon train (DESIGN §7) on a tiny converted model (hidden 48, 2 layers): the loss goes down in one process
and in two (torchrun, gloo, ZeRO-2); an interrupted and resumed run takes exactly the uninterrupted run's steps;
metrics.jsonl carries the outlier figures; a non-finite loss stops the run with the last good checkpoint intact;
bad input is a one-line error with nothing written."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import make_tiny, write_words

RECIPE = """\
seq_len: 32
batch_size: 4
steps: 8
lr: 3.0e-3
lr_new: 1.0e-2
warmup_steps: 2
freeze_base_steps: 2
heldout_every: 10
eval_windows: 8
eval_every: 4
save_every: 2
shuffle_windows: 64
objectives: {lm: 1.0}
"""


pytestmark = pytest.mark.usefixtures("restore_environment")  # training in-process sets RANK, MASTER_PORT…


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from surgeon.convert import convert
    from surgeon.transforms import GatedNorm, PreAffine

    root = tmp_path_factory.mktemp("train")
    make_tiny(root / "src", "llama")
    convert(root / "src", root / "model", [GatedNorm(rank=4), PreAffine()], show_progress=False)
    write_words(root / "text.txt", 400)
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def _train(setup, out, **kwargs):
    from surgeon.train.loop import train

    return train(setup / "model", setup / "text.txt", out, recipe=kwargs.pop("recipe", setup / "recipe.yaml"),
                 show_progress=False, **kwargs)


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(setup):
    out = setup / "run-a"
    _train(setup, out)
    return out


def test_one_process_lowers_the_loss_and_logs_the_outliers(setup, uninterrupted):
    records = _records(uninterrupted)
    steps = [r for r in records if "total" in r]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[-1]["total"] < steps[0]["total"] - 0.3
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert evals[-1]["eval"]["loss"] < evals[0]["eval"]["loss"]
    for r in evals:
        m = r["eval"]
        assert len(m["residual_max"]) == 3 and m["residual_peak"] == max(m["residual_max"])
        assert m["sink_abs"] and m["linear_input_max_rms"] > 0
    # W4A4 perplexity before and after, not in between; not the unquantized model's
    assert [sorted(r["eval"].get("quant_ppl", {})) for r in evals] == [["int4", "nvfp4"], [], ["int4", "nvfp4"]]
    for r in (evals[0], evals[-1]):
        assert all(math.isfinite(q) and q != r["eval"]["ppl"] for q in r["eval"]["quant_ppl"].values())
    # no absorbed sinks, no scan: the first measurement's top dims are watched from then on
    run = json.loads((uninterrupted / "run.json").read_text())
    assert run["sink_dims"] == evals[0]["eval"]["top_dims"]
    assert all(list(map(int, r["eval"]["sink_abs"])) == run["sink_dims"] for r in evals)
    assert len(run["model"]["sha256"]) == 64 and run["model"]["surgeon"]["transforms"]
    assert run["recipe"]["steps"] == 8 and run["world_size"] == 1
    # the base is frozen (lr 0) for two steps, the new parameters train from the start; then warmup + cosine
    lrs = [r["lr"] for r in steps]
    assert [lr["pretrained"] for lr in lrs[:2]] == [0.0, 0.0] and lrs[2]["pretrained"] > 0
    assert lrs[0]["new"] > 0 and lrs[-1]["new"] < max(lr["new"] for lr in lrs)
    assert all((uninterrupted / name).is_file() for name in ("loss.png", "outliers.png", "residual.png"))
    kept = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert kept == ["latest", "step6", "step8"]


def test_resume_reproduces_the_uninterrupted_run(setup, uninterrupted):
    out = setup / "run-b"
    first = _train(setup, out, stop_after=3)  # as if interrupted after step 3 (stop_after checkpoints it)
    assert first.step == 3
    second = _train(setup, out, recipe=None, resume=True)
    assert second.step == 8
    a = {r["step"]: r for r in _records(uninterrupted)}
    b = {r["step"]: r for r in _records(out)}
    assert sorted(a) == sorted(b)  # no step logged twice
    for step in range(1, 9):
        assert b[step]["total"] == a[step]["total"], step
        assert b[step]["lr"] == a[step]["lr"], step
    assert b[8]["eval"]["loss"] == a[8]["eval"]["loss"]
    assert json.loads((out / "run.json").read_text())["resumed"][0]["step"] == 3


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    from surgeon.errors import SurgeonError
    from surgeon.train import loop

    class Poisoned(loop.Objectives):
        def step_context(self, step, total_steps=None, **micro):
            self._step = step
            return super().step_context(step, total_steps, **micro)

        def loss(self, batch, outputs):
            loss, terms = super().loss(batch, outputs)
            return (loss * float("nan"), terms) if self._step >= 4 else (loss, terms)  # step 5 goes bad

    monkeypatch.setattr(loop, "Objectives", Poisoned)
    out = setup / "run-nan"
    with pytest.raises(SurgeonError, match=r"loss became nan at step 5.*step4"):
        _train(setup, out)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step4"
    assert not (out / "checkpoints" / "step5").exists()
    assert [r["step"] for r in _records(out) if "total" in r] == [1, 2, 3, 4]
    monkeypatch.undo()
    assert _train(setup, out, recipe=None, resume=True).step == 8  # the checkpoint it kept is usable


def test_ctrl_c_names_the_checkpoint_to_resume_from(setup, monkeypatch):
    from surgeon.errors import SurgeonError
    from surgeon.train import loop

    seed_step = loop._seed_step

    def interrupt(seed, step, rank):
        if step == 3:
            raise KeyboardInterrupt
        seed_step(seed, step, rank)

    monkeypatch.setattr(loop, "_seed_step", interrupt)
    out = setup / "run-ctrl-c"
    with pytest.raises(SurgeonError, match=r"interrupted during step 4; the last good checkpoint is .*step2: "
                                           r"continue with --resume"):
        _train(setup, out)


def _clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_zero2_lower_the_loss(setup):
    config = Path(__file__).resolve().parent.parent / "configs" / "zero2.json"
    out = setup / "run-2p"
    recipe = setup / "recipe-2p.yaml"
    recipe.write_text(RECIPE.replace("batch_size: 4", "batch_size: 2\ngrad_accum: 2"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "surgeon.cli", "train", str(setup / "model"), "--data", str(setup / "text.txt"), "--out", str(out),
           "--recipe", str(recipe), "--deepspeed", str(config), "--steps", "6", "--no-progress"]
    proc = subprocess.run(cmd, cwd=setup, env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [r for r in _records(out) if "total" in r]
    assert len(steps) == 6 and steps[-1]["total"] < steps[0]["total"] - 0.3
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["deepspeed"]["zero_optimization"]["stage"] == 2
    config = run["deepspeed"]
    assert config["train_batch_size"] == 8 and config["gradient_accumulation_steps"] == 2  # 2 ranks × 2 × 2
    assert not config["bf16"]["enabled"]  # fp32 on CPU


@pytest.mark.parametrize("case", ["missing data", "bad recipe key", "bad objective", "existing run", "no checkpoint"])
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, case):
    from surgeon.cli import main

    out = tmp_path / "run"
    data, recipe = setup / "text.txt", setup / "recipe.yaml"
    extra = []
    if case == "missing data":
        data = tmp_path / "nope.txt"
    elif case == "bad recipe key":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE + "learning_rate: 0.1\n")
    elif case == "bad objective":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(RECIPE.replace("{lm: 1.0}", "{lm: 1.0, pressur: 0.1}"))
    elif case == "existing run":
        out.mkdir()
        (out / "metrics.jsonl").write_text("")
    else:
        extra = ["--resume"]
    before = sorted(tmp_path.rglob("*"))
    assert main(["train", str(setup / "model"), "--data", str(data), "--recipe", str(recipe), "--out", str(out),
                 "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("surgeon: error: ") and "\n" not in err, err
    expected = {"missing data": "not found", "bad recipe key": "'learning_rate'", "bad objective": "'pressur'",
                "existing run": "--resume", "no checkpoint": "nothing to resume"}[case]
    assert expected in err
    assert sorted(tmp_path.rglob("*")) == before


def test_windows_hold_out_shard_and_follow_the_seed(setup):
    from surgeon.sources import load_model
    from surgeon.train.data import WindowStream

    _, tokenizer = load_model(setup / "model")
    stream = WindowStream([setup / "text.txt"], tokenizer, 32, heldout_every=10, seed=3, shuffle_windows=16)
    heldout = {tuple(w.tolist()) for b in stream.heldout(100, 4) for w in b}
    it = stream.train_windows()
    first = [tuple(next(it).tolist()) for _ in range(40)]
    assert not heldout & set(first)
    assert first == [tuple(w.tolist()) for _, w in zip(range(40), stream.train_windows())]  # deterministic
    assert first[5:] == [tuple(w.tolist()) for _, w in zip(range(35), stream.train_windows(start=5))]
    other = WindowStream([setup / "text.txt"], tokenizer, 32, heldout_every=10, seed=4, shuffle_windows=16)
    assert first != [tuple(w.tolist()) for _, w in zip(range(40), other.train_windows())]
    r0, r1 = stream.batches(0, 2, rank=0, world=2), stream.batches(0, 2, rank=1, world=2)
    global_order = [tuple(w.tolist()) for w in torch.cat([next(r0), next(r1), next(r0), next(r1)])]
    assert global_order == first[:8]


def test_the_shipped_recipes_and_deepspeed_configs_load():
    from surgeon.train.engine import finish_ds_config, load_ds_config
    from surgeon.train.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent / "configs"
    recipes = {p.stem: load_recipe(p) for p in sorted((root / "recipes").glob("*.yaml"))}
    assert {"plain", "smollm2-cpu"} <= set(recipes)
    tuned = recipes["smollm2-cpu"]
    assert tuned.objectives["qat"] == "int4" and tuned.objectives["qat_fraction"] == 0.25 and tuned.grad_accum == 2
    assert tuned.optimizer_coordinates == "source"
    for stage in range(4):
        config = finish_ds_config(load_ds_config(root / f"zero{stage}.json"), recipes["plain"], world=2)
        assert config["zero_optimization"]["stage"] == stage and config["train_batch_size"] == 8
        assert load_ds_config(f"zero{stage}") == load_ds_config(root / f"zero{stage}.json")  # by name, installed
    assert all(load_recipe(name) == recipe for name, recipe in recipes.items())


def test_the_schedule_warms_up_decays_and_freezes():
    from surgeon.train.engine import lr_factor

    f = [lr_factor(s, steps=20, warmup=4, min_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))  # 15 of 16 decay steps done
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    frozen = [lr_factor(s, steps=20, warmup=4, min_ratio=0.1, start=5) for s in range(10)]
    assert frozen[:5] == [0.0] * 5 and frozen[5:9] == [0.25, 0.5, 0.75, 1.0]


def test_absorbed_sinks_are_the_dimensions_watched(setup, tmp_path):
    from surgeon.convert import convert
    from surgeon.train.loop import _sink_dims_of
    from surgeon.transforms import AbsorbSinks, GatedNorm

    out = tmp_path / "absorbed"
    convert(setup / "src", out, [GatedNorm(rank=4), AbsorbSinks(sinks=[7, 30], scale=8)], show_progress=False)
    assert _sink_dims_of(out, None) == [7, 30]
    assert _sink_dims_of(setup / "model", None) is None  # no sinks absorbed: the first measurement picks them
