#!/usr/bin/env bash
# The experiment behind configs/recipes/smollm2-cpu.yaml (2026-11-22): 40 steps of each recipe here (plain80 and
# sm_src80_*: 80), one at a time, then one line of held-out figures per run (fp32 ppl, residual peak, linear-input
# max/RMS, W4A4 ppl at the start and at the end). plain* train the source, sm_* the converted model with the smooth
# pass (α 0.8, the pipeline's default), the others the converted model without it; sm_src* train it in the
# source's coordinates (optimizer_coordinates: source); had_* train the converted model with smooth and the
# hadamard pass (the pipeline's default since 2026-12-02), in the source's coordinates. For sm_* runs the trained
# model is also smoothed again (recalibrated on the training text) and its W4A4 perplexity measured on the same
# held-out windows ("resmoothed"). Results of 2026-11-22 and 2026-12-02: benchmarks/results/recipe_sweep.csv.
#   bash benchmarks/recipe_sweep/sweep.sh OUT [recipe ...]
# Needs the defaults (scripts/install_defaults.sh); about 8 minutes a recipe on 2 idle cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
recipes=("${@:-plain plain_lr plain_lr2 plain_lr4 conv_lm mixqat mixqat_p mixqat25 mixqat_lr mixqat_lr2 mixqat_lr4
            sm_lm sm_mixqat_lr2 sm_mixqat25_lr2 sm_mixqat125_lr2 sm_qd sm_src_qat25 sm_src_qat50
            plain80 sm_src80_qat25 sm_src80_qat375 had_src_qat25}")
texts=$(python -c "from surgeon.sources import default_text_dir; print(default_text_dir())")
mkdir -p "$out/train_text"
ls "$texts"/*_gut.txt | sort | tail -n +3 | while read -r f; do ln -sf "$f" "$out/train_text/"; done  # plays 3..: 1-2 are eval
[ -d "$out/base" ] || surgeon pipeline --no-train --no-smooth --no-hadamard --out "$out/base"
[ -d "$out/base-smooth" ] || surgeon pipeline --no-train --no-hadamard --out "$out/base-smooth"
[ -d "$out/base-hadamard" ] || surgeon pipeline --no-train --out "$out/base-hadamard"
for name in ${recipes[@]}; do
  case "$name" in
    plain*) model=default ;;
    sm_*) model="$out/base-smooth/model-converted" ;;
    had_*) model="$out/base-hadamard/model-converted" ;;
    *) model="$out/base/model-converted" ;;
  esac
  rm -rf "$out/runs/$name"
  run="$out/runs/$name"
  surgeon train "$model" --data "$out/train_text" --recipe "$here/$name.yaml" --out "$run" --no-progress
  resmoothed=""
  if [[ "$name" == sm_* ]]; then
    rm -rf "$run/trained" "$run/resmoothed"
    surgeon export "$run" "$run/trained" > /dev/null
    surgeon convert "$run/trained" "$run/resmoothed" -t smooth --data "$out/train_text" --smooth-alpha 0.8 > /dev/null
    resmoothed="$run/resmoothed"
  fi
  rm -rf "$run/checkpoints" "$run/trained"
  python - "$run" "$name" "$out/train_text" "$resmoothed" <<'PY'
import json, sys
from pathlib import Path
run, name, text, resmoothed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
records = [json.loads(line) for line in open(run / "metrics.jsonl")]
evals = [r["eval"] for r in records if "eval" in r]
speed = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
def figures(e):
    return (f"ppl {e['ppl']:.2f} peak {e['residual_peak']:,.0f} max/RMS {e['linear_input_max_rms']:.2f} "
            + " ".join(f"{k} {v:,.1f}" for k, v in e.get("quant_ppl", {}).items()))
line = f"{name}: {speed[len(speed) // 2]:.0f} tok/s | start {figures(evals[0])} | end {figures(evals[-1])}"
if resmoothed:  # the training's held-out windows, W4A4 after recalibrating smooth on the trained model
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
    with torch.no_grad():
        quant = {}
        for fmt in ("nvfp4", "int4"):
            with fake_quantized(model.eval(), fmt):
                quant[fmt] = perplexity(model, held)[0]
    line += " | resmoothed " + " ".join(f"{k} {v:,.1f}" for k, v in quant.items())
print(line)
PY
  rm -rf "$run/resmoothed"
done | tee -a "$out/summary.txt"
