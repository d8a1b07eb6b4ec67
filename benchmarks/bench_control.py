#!/usr/bin/env python
"""What the norm modules buy as the budget grows: `surgeon pipeline --control` at several training budgets.

For each budget (--steps, e.g. 40,160,640) and seed, one pipeline run with --control and --gated-norm (unless
--no-gated-norm): the norm modules' model (gated-norm + pre-affine + absorb-sinks + smooth + hadamard) and its control (the same passes without the norm
modules) trained with the same recipe, budget and text. Both are evaluated on the pipeline's evaluation text
(the first --eval-files files) and on text held apart from everything (the next --held-files files: no
training, no smooth calibration, no recipe tuning ever read them). Rows are appended to
benchmarks/results/control_ablation.csv: fp32, NVFP4 and INT4 W4A4 perplexity (fake-quantized as `surgeon eval`),
their ratios to fp32, the trained ÷ control ratios, the residual peak and the gates' mean |g − ½|.

    python benchmarks/bench_control.py --steps 40                     # ~30 min on 2 CPU cores
    python benchmarks/bench_control.py --steps 40,160,640 --seeds 0,1  # the trend with budget (hours on a CPU)

Model directories are deleted after each run (the reports and results.json stay under --work).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import RESULTS_DIR, append_rows  # noqa: E402

HEADER = ["date", "steps", "seed", "recipe", "gated_norm", "model", "text", "tokens", "fp32", "nvfp4", "int4", "nvfp4_x",
          "int4_x", "fp32_vs_control", "nvfp4_vs_control", "int4_vs_control", "residual_peak", "gate_dev", "minutes"]


def split_folders(paths: list[Path], work: Path, eval_files: int, held_files: int) -> tuple[Path, Path]:
    """(pipeline text folder: evaluation files then training files, held-apart folder), as symlinks."""
    if len(paths) < eval_files + held_files + 1:
        raise SystemExit(f"bench_control: {len(paths)} text files; need more than {eval_files + held_files}")
    data, held = work / "text-pipeline", work / "text-held"
    for folder, chosen in ((data, paths[:eval_files] + paths[eval_files + held_files:]),
                           (held, paths[eval_files:eval_files + held_files])):
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(chosen):  # numbered so the folder's sorted order is the chosen order
            link = folder / f"{i:03d}-{p.name}"
            if not link.exists():
                link.symlink_to(p.resolve())
    return data, held


def evaluate(model_dir: Path, text: Path, windows: int, seq_len: int) -> dict:
    from surgeon.evaluate import evaluate_model
    from surgeon.sources import iter_token_windows, load_model, resolve_text

    model, tokenizer = load_model(model_dir)
    batches = list(iter_token_windows(resolve_text(text), tokenizer, seq_len, seq_len * windows, 4,
                                      skip_tokens=1000))
    result = evaluate_model(model, batches, ("nvfp4", "int4"), name=model_dir.name)
    return {"tokens": result.tokens, **result.perplexity}


def gate_dev(scan_json: Path) -> float | str:
    gates = json.loads(scan_json.read_text()).get("gates") or {}
    value = (gates.get("mean") or {}).get("mean_abs_dev")
    return round(value, 5) if value is not None else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="40", help="comma-separated training budgets (%(default)s)")
    ap.add_argument("--seeds", default="0", help="comma-separated recipe seeds (data order; %(default)s)")
    ap.add_argument("--recipe", default="smollm2-cpu", help="the pipeline's recipe (%(default)s)")
    ap.add_argument("--gated-norm", action=argparse.BooleanOptionalAction, default=True,
                    help="the modules' model has GatedNorm (default) or only PreAffine + absorb-sinks")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="default")
    ap.add_argument("--eval-files", type=int, default=2)
    ap.add_argument("--held-files", type=int, default=2)
    ap.add_argument("--held-windows", type=int, default=16, help="windows of 256 tokens of held-apart text")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_control"))
    ap.add_argument("--csv", type=Path, default=RESULTS_DIR / "control_ablation.csv")
    args = ap.parse_args(argv)

    from surgeon.pipeline import DIRS, PipelineConfig, run
    from surgeon.sources import resolve_text
    from surgeon.train.recipe import load_recipe

    args.work.mkdir(parents=True, exist_ok=True)
    data, held = split_folders(resolve_text(args.data), args.work, args.eval_files, args.held_files)
    base = load_recipe(args.recipe).to_dict()
    for steps in [int(s) for s in args.steps.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            out = args.work / f"steps{steps}-seed{seed}"
            recipe = args.work / f"recipe-steps{steps}-seed{seed}.yaml"
            recipe.write_text(yaml.safe_dump({**base, "steps": steps, "seed": seed,
                                              "save_every": steps, "eval_every": max(steps // 4, 1)}))
            tic = time.perf_counter()
            result = run(PipelineConfig(model=args.model, data=str(data), recipe=str(recipe), control=True, format="both",  # one conversion
                                        gated_norm=args.gated_norm, eval_files=args.eval_files), out)
            minutes = (time.perf_counter() - tic) / 60
            figures = {label: {"eval": {"tokens": result.evals[label].tokens, **result.evals[label].perplexity},
                               "held": evaluate(out / DIRS[label], held, args.held_windows, 256)}
                       for label in ("trained", "control")}
            rows = []
            for text in ("eval", "held"):
                control = figures["control"][text]
                for label in ("trained", "control"):
                    ppl = figures[label][text]
                    rows.append({
                        "date": time.strftime("%Y-%m-%d"), "steps": steps, "seed": seed, "recipe": args.recipe,
                        "gated_norm": args.gated_norm, "model": label, "text": text, "tokens": ppl["tokens"],
                        **{f: round(ppl[k], 3) for f, k in (("fp32", "none"), ("nvfp4", "nvfp4"), ("int4", "int4"))},
                        "nvfp4_x": round(ppl["nvfp4"] / ppl["none"], 4), "int4_x": round(ppl["int4"] / ppl["none"], 4),
                        **{f"{f}_vs_control": round(ppl[k] / control[k], 4)
                           for f, k in (("fp32", "none"), ("nvfp4", "nvfp4"), ("int4", "int4"))},
                        "residual_peak": round(result.scans[label].peak["value"], 1),
                        "gate_dev": gate_dev(out / f"scan-{label}" / "scan.json"), "minutes": round(minutes, 1)})
                    print(" ".join(f"{k}={rows[-1][k]}" for k in ("steps", "seed", "model", "text", "fp32", "nvfp4",
                                                                   "int4", "nvfp4_vs_control", "int4_vs_control")))
            append_rows(args.csv, HEADER, rows)
            for label in DIRS.values():  # the figures are kept; 4 model directories are not
                shutil.rmtree(out / label, ignore_errors=True)
    print(f"rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
