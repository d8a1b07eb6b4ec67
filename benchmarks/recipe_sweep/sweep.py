#!/usr/bin/env python
"""The recipe experiment behind configs/recipes/smollm2-cpu.yaml: one base recipe plus a grid of variants.

Each variant of grid.yaml is base.yaml with its `set` keys replaced (`objectives` merged key by key), written to
OUT/recipes/NAME.yaml and checked by surgeon's recipe loader before anything trains. One at a time, each trains
its model with `surgeon train` (40 steps; the 80-step variants twice that) on the default text minus the two
evaluation plays, then prints one line of held-out figures (fp32 ppl, residual peak, linear-input max/RMS, W4A4
ppl at the start and at the end), appended to OUT/summary.txt. The models (grid.yaml's `model`): the default
source, and the pipeline's training-free conversion without smooth and hadamard, with smooth (α 0.8, the
pipeline's default), and with smooth and hadamard. A variant of the smooth model is also exported, smoothed again
(recalibrated on the training text) and its W4A4 perplexity measured on the same held-out windows ("resmoothed").
Figures of 2026-11-22 and 2026-12-02: benchmarks/results/recipe_sweep.csv, read in docs/experiments.md.

    python benchmarks/recipe_sweep/sweep.py OUT [variant ...]      # all variants when none is named
    python benchmarks/recipe_sweep/sweep.py OUT --dry-run          # write and check the recipes, train nothing

Needs the defaults (scripts/install_defaults.sh); about 8 minutes a variant on 2 idle cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
BASE = HERE / "base.yaml"
GRID = HERE / "grid.yaml"
# grid.yaml's `model` → the pipeline flags of its training-free conversion (None: the unconverted default)
# the fixed passes (--no-choose: the sweep's models are what it names, not what the chooser would keep)
MODELS = {"source": None, "converted": ["--no-choose", "--no-smooth", "--no-hadamard"],
          "smooth": ["--no-choose", "--no-hadamard"], "hadamard": ["--no-choose"]}
RESMOOTH_MODEL = "smooth"
RESMOOTH_ALPHA = 0.8  # the smooth model's own α, so the recalibration changes only the activations it sees


def load_grid(path: Path = GRID) -> dict[str, dict]:
    """grid.yaml, checked: every variant names a known model and sets nothing but recipe keys (the loader checks
    those when the recipe is written)."""
    grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, variant in grid.items():
        unknown = set(variant) - {"model", "set"}
        if unknown or variant.get("model") not in MODELS:
            raise SystemExit(f"{path}: variant {name!r} needs `model` (one of {', '.join(MODELS)}) and at most "
                             f"`set`; got {sorted(variant)}")
    return grid


def materialize(variant: dict, base: dict) -> dict:
    """The variant's recipe settings: base with the variant's keys replaced, `objectives` merged key by key."""
    settings = copy.deepcopy(base)
    for key, value in (variant.get("set") or {}).items():
        if key == "objectives":
            settings["objectives"] = {**settings.get("objectives", {}), **value}
        else:
            settings[key] = value
    return settings


def write_recipes(names: list[str], grid: dict[str, dict], out: Path) -> dict[str, Path]:
    """OUT/recipes/NAME.yaml for each variant, each loaded back through surgeon's recipe loader (a bad key or
    value stops the sweep here, before any training)."""
    from surgeon.train.recipe import load_recipe

    base = yaml.safe_load(BASE.read_text(encoding="utf-8"))
    paths = {}
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    for name in names:
        path = out / "recipes" / f"{name}.yaml"
        path.write_text(f"# {name}: {BASE.name} + grid.yaml's overrides (benchmarks/recipe_sweep/sweep.py)\n"
                        + yaml.safe_dump(materialize(grid[name], base), sort_keys=False), encoding="utf-8")
        load_recipe(path)
        paths[name] = path
    return paths


def _surgeon(*args, quiet: bool = False) -> None:
    subprocess.run(["surgeon", *map(str, args)], check=True, stdout=subprocess.DEVNULL if quiet else None)


def prepare(out: Path, models: set[str]) -> tuple[Path, dict[str, str]]:
    """The training text (every default play but the first two, which the pipeline evaluates on) and the model
    each grid `model` names, converted once into OUT/base-*."""
    from surgeon.sources import resolve_text

    text = out / "train_text"
    text.mkdir(parents=True, exist_ok=True)
    for play in resolve_text("default")[2:]:
        link = text / Path(play).name
        if not link.exists():
            link.symlink_to(play)
    paths = {}
    for model in sorted(models):
        flags = MODELS[model]
        if flags is None:
            paths[model] = "default"
            continue
        base = out / f"base-{model}"
        if not base.is_dir():
            _surgeon("pipeline", "--no-train", *flags, "--out", base)
        paths[model] = str(base / "model-converted")
    return text, paths


def _figures(e: dict) -> str:
    return (f"ppl {e['ppl']:.2f} peak {e['residual_peak']:,.0f} max/RMS {e['linear_input_max_rms']:.2f} "
            + " ".join(f"{k} {v:,.1f}" for k, v in e.get("quant_ppl", {}).items()))


def summary_line(run: Path, name: str) -> str:
    """One line of the run's held-out measurements: the median speed, the first and the last evaluation."""
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    evals = [r["eval"] for r in records if "eval" in r]
    speed = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    return f"{name}: {speed[len(speed) // 2]:.0f} tok/s | start {_figures(evals[0])} | end {_figures(evals[-1])}"


def resmoothed_figures(run: Path, resmoothed: Path, text: Path) -> str:
    """W4A4 perplexity of the recalibrated model on the training's own held-out windows."""
    import torch

    from surgeon.evaluate import perplexity
    from surgeon.quant import fake_quantized
    from surgeon.sources import load_model, resolve_text
    from surgeon.train.data import WindowStream

    recipe = json.loads((run / "run.json").read_text())["recipe"]
    model, tok = load_model(resmoothed)
    held = WindowStream(resolve_text(text), tok, recipe["seq_len"], heldout_every=recipe["heldout_every"],
                        seed=recipe["seed"], shuffle_windows=recipe["shuffle_windows"]).heldout(
                            recipe["eval_windows"], recipe["batch_size"])
    quant = {}
    with torch.no_grad():
        for fmt in ("nvfp4", "int4"):
            with fake_quantized(model.eval(), fmt):
                quant[fmt] = perplexity(model, held)[0]
    return "resmoothed " + " ".join(f"{k} {v:,.1f}" for k, v in quant.items())


def run_variant(name: str, model_kind: str, model: str, recipe: Path, text: Path, out: Path) -> str:
    run = out / "runs" / name
    # export refuses a destination inside the run, so the two models of the resmoothed figures sit beside it
    trained, resmoothed = out / "runs" / f".{name}-trained", out / "runs" / f".{name}-resmoothed"
    for path in (run, trained, resmoothed):
        shutil.rmtree(path, ignore_errors=True)
    _surgeon("train", model, "--data", text, "--recipe", recipe, "--out", run, "--no-progress")
    line = summary_line(run, name)
    if model_kind == RESMOOTH_MODEL:
        _surgeon("export", run, trained, quiet=True)
        _surgeon("convert", trained, resmoothed, "-t", "smooth", "--data", text, "--smooth-alpha", RESMOOTH_ALPHA,
                 quiet=True)
        line += " | " + resmoothed_figures(run, resmoothed, text)
    for spent in (run / "checkpoints", trained, resmoothed):  # the figures are in metrics.jsonl and the line
        shutil.rmtree(spent, ignore_errors=True)
    return line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("variants", nargs="*", help="grid.yaml names (default: all, in grid order)")
    ap.add_argument("--dry-run", action="store_true", help="write and check OUT/recipes/*.yaml, train nothing")
    args = ap.parse_args(argv)
    grid = load_grid()
    names = args.variants or list(grid)
    missing = [n for n in names if n not in grid]
    if missing:
        ap.error(f"not in {GRID.name}: {', '.join(missing)}; variants: {', '.join(grid)}")
    out = args.out.resolve()
    recipes = write_recipes(names, grid, out)
    if args.dry_run:
        print("\n".join(str(recipes[n]) for n in names))
        return 0
    text, models = prepare(out, {grid[n]["model"] for n in names})
    with open(out / "summary.txt", "a") as summary:
        for name in names:
            kind = grid[name]["model"]
            line = run_variant(name, kind, models[kind], recipes[name], text, out)
            print(line, flush=True)
            summary.write(line + "\n")
            summary.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
