#!/usr/bin/env bash
# Gated attention against the same main job without it (issue 15), on SmolLM2 at the main job's budget: the default
# pipeline, the same with --gated-attention, and that with the gates' own lr 15× higher; then each trained model
# beside the first on its evaluation plays and on the Brown corpus (held apart from everything), with the
# first-token attention, the first-token massive activation and the gates' movement.
# Rows go to benchmarks/results/gated_attention.csv. About 20 min a run on 2 idle CPU cores: run them one at a time
# (two at once on 2 cores take more than twice as long).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:?usage: run.sh WORK_DIR}"
mkdir -p "$work"
cd "$work"  # never the repository root
[ -d main ] || surgeon pipeline --out main  # not "default": a folder of that name would be read as `--data default`
[ -d ga ] || surgeon pipeline --gated-attention --out ga
[ -d ga-lr ] || surgeon pipeline --gated-attention --recipe "$here/ga_gate_lr_3e-3.yaml" --out ga-lr
[ -d brown ] || python "$here/../brown_text.py" brown
python "$here/../compare_runs.py" main ga ga-lr --held brown --csv gated_attention.csv \
  --label "main job (smollm2-cpu)" --label "+ gated-attention (smollm2-cpu)" \
  --label "+ gated-attention, lr_attention_gate 3e-3"
