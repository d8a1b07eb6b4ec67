"""benchmarks/recipe_sweep: one base recipe plus a grid reproduces, exactly, the 22 recipes the 2026-11-22 and
2026-12-02 sweeps ran (one YAML each before the grid replaced them); every variant passes surgeon's recipe loader;
the sweep's winner is the shipped smollm2-cpu; every run in benchmarks/results/recipe_sweep.csv is a variant."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import yaml

from surgeon.train.objectives import ObjectiveConfig
from surgeon.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("recipe_sweep", ROOT / "benchmarks" / "recipe_sweep" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)

# sha256 (first 16 hex digits) of json.dumps(yaml.safe_load(old NAME.yaml), sort_keys=True), taken from the files
# the grid replaced: the grid must give back these dicts, key for key and type for type (5.0e-5 stays a float).
REPLACED = {
    "conv_lm": "34d271334d781684",
    "had_src_qat25": "2ff1af45db61e5d9",
    "mixqat": "56382c279b1a2838",
    "mixqat25": "2298f247f99c7a24",
    "mixqat_lr": "78410e8f66d8b22b",
    "mixqat_lr2": "3ef8d2ea64a60c95",
    "mixqat_lr4": "530159b97885cbd1",
    "mixqat_p": "570dcad1592229c4",
    "plain": "65fc8b3ee9a04030",
    "plain80": "274dff11743f1bdd",
    "plain_lr": "ef5f1144d7e1c68a",
    "plain_lr2": "34d271334d781684",
    "plain_lr4": "02b5aa174687100c",
    "sm_lm": "34d271334d781684",
    "sm_mixqat125_lr2": "720a58fe43490901",
    "sm_mixqat25_lr2": "d0d3d4eb7ec811e4",
    "sm_mixqat_lr2": "3ef8d2ea64a60c95",
    "sm_qd": "a8e4c695c89d51d1",
    "sm_src80_qat25": "e1835befc85669cd",
    "sm_src80_qat375": "fc3dc22061e42294",
    "sm_src_qat25": "2ff1af45db61e5d9",
    "sm_src_qat50": "d7dede1d989c97e2",
}


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def test_the_grid_gives_back_every_replaced_recipe_through_the_file_the_trainer_reads(tmp_path):
    grid = sweep.load_grid()
    assert set(grid) == set(REPLACED)
    paths = sweep.write_recipes(list(grid), grid, tmp_path)  # each also loaded by surgeon's recipe loader
    for name, path in paths.items():
        assert _digest(yaml.safe_load(path.read_text())) == REPLACED[name], name


def test_materialize_replaces_keys_and_merges_objectives():
    base = {"lr": 2e-4, "steps": 40, "objectives": {"lm": 1.0, "qat": "nvfp4"}}
    out = sweep.materialize({"model": "smooth", "set": {"lr": 5e-5, "objectives": {"qat": "int4"}}}, base)
    assert out == {"lr": 5e-5, "steps": 40, "objectives": {"lm": 1.0, "qat": "int4"}}
    assert base["objectives"] == {"lm": 1.0, "qat": "nvfp4"}  # the base is not edited in place
    assert sweep.materialize({"model": "source"}, base) == base


def test_the_sweeps_winner_is_the_shipped_recipe(tmp_path):
    grid = sweep.load_grid()
    path = sweep.write_recipes(["had_src_qat25"], grid, tmp_path)["had_src_qat25"]
    won, shipped = load_recipe(path).to_dict(), load_recipe("smollm2-cpu").to_dict()
    won_objectives, shipped_objectives = won.pop("objectives"), shipped.pop("objectives")
    assert won == shipped
    assert asdict(ObjectiveConfig(**won_objectives)) == asdict(ObjectiveConfig(**shipped_objectives))
    assert grid["had_src_qat25"]["model"] == "hadamard"  # the model the pipeline converts


def test_every_run_in_the_results_is_a_variant_of_the_grid():
    grid = sweep.load_grid()
    with open(ROOT / "benchmarks" / "results" / "recipe_sweep.csv", newline="") as f:
        recipes = {row["recipe"].split()[0] for row in csv.DictReader(f)}
    assert recipes and recipes <= set(grid), recipes - set(grid)
