#!/usr/bin/env bash
# The experiment behind configs/recipes/smollm2-cpu.yaml (2026-11-22): 40 steps of each recipe here, one at a
# time, then one line of held-out figures per run (fp32 ppl, residual peak, linear-input max/RMS, W4A4 ppl at
# the start and at the end). plain* train the source, sm_* the converted model with the smooth pass (α 0.8, the
# pipeline's default), the others the converted model without it.
# Results of 2026-11-22: benchmarks/results/recipe_sweep.csv.
#   bash benchmarks/recipe_sweep/sweep.sh OUT [recipe ...]
# Needs the defaults (scripts/install_defaults.sh); about 8 minutes a recipe on 2 idle cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
recipes=("${@:-plain plain_lr plain_lr2 plain_lr4 conv_lm mixqat mixqat_p mixqat25 mixqat_lr mixqat_lr2 mixqat_lr4
            sm_lm sm_mixqat_lr2 sm_mixqat25_lr2 sm_mixqat125_lr2 sm_qd}")
texts=$(python -c "from surgeon.sources import default_text_dir; print(default_text_dir())")
mkdir -p "$out/train_text"
ls "$texts"/*_gut.txt | sort | tail -n +3 | while read -r f; do ln -sf "$f" "$out/train_text/"; done  # plays 3..: 1-2 are eval
[ -d "$out/base" ] || surgeon pipeline --no-train --no-smooth --out "$out/base"
[ -d "$out/base-smooth" ] || surgeon pipeline --no-train --out "$out/base-smooth"
for name in ${recipes[@]}; do
  case "$name" in
    plain*) model=default ;;
    sm_*) model="$out/base-smooth/model-converted" ;;
    *) model="$out/base/model-converted" ;;
  esac
  rm -rf "$out/runs/$name"
  surgeon train "$model" --data "$out/train_text" --recipe "$here/$name.yaml" --out "$out/runs/$name" --no-progress
  rm -rf "$out/runs/$name/checkpoints"
  python - "$out/runs/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
evals = [r["eval"] for r in records if "eval" in r]
speed = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
def figures(e):
    return (f"ppl {e['ppl']:.2f} peak {e['residual_peak']:,.0f} max/RMS {e['linear_input_max_rms']:.2f} "
            + " ".join(f"{k} {v:,.1f}" for k, v in e.get("quant_ppl", {}).items()))
print(f"{sys.argv[2]}: {speed[len(speed) // 2]:.0f} tok/s | start {figures(evals[0])} | end {figures(evals[-1])}")
PY
done | tee -a "$out/summary.txt"
