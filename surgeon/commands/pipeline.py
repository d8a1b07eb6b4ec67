"""surgeon pipeline [--model default] [--data default] --out DIR: the main job — scan the source, choose smooth and
hadamard (and, with --no-train, absorb-sinks) by the W4A4 error they leave in each --format (a conversion per
format where the choices differ), convert (PreAffine + absorb-sinks + the chosen passes, GatedNorm with
--gated-norm, gated attention with --gated-attention; verified), scan the result, train it with the tuned recipe,
export it, deploy it as compressed-tensors checkpoints, evaluate source, converted and trained side by side (fp32,
NVFP4 and INT4 W4A4, deployed), write report.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p) -> None:
    from ..pipeline import PipelineConfig

    d = PipelineConfig()
    p.add_argument("--model", default=d.model, help="model directory, .gguf, hub id, or 'default' (SmolLM2-135M)")
    p.add_argument("--data", default=d.data, help="text file, folder, JSONL, or 'default' (Shakespeare)")
    p.add_argument("--out", type=Path, required=True, help="run directory (must not exist unless --force)")
    p.add_argument("--gated-norm", action=argparse.BooleanOptionalAction, default=d.gated_norm,
                   help="insert GatedNorm after every residual-reading norm (default: off; measured against the "
                        "control, see README)")
    p.add_argument("--rank", type=int, default=d.rank, help="GatedNorm rank (%(default)s)")
    p.add_argument("--gated-attention", action=argparse.BooleanOptionalAction, default=d.gated_attention,
                   help="gate every attention output (identity-initialized; default: off, see README)")
    p.add_argument("--smooth-alpha", type=float, default=d.smooth_alpha,
                   help="α of the smooth pass with --no-choose (SmoothQuant folded into the weights; %(default)s)")
    p.add_argument("--no-smooth", action="store_true", help="convert without the smooth pass")
    p.add_argument("--no-hadamard", action="store_true", help="convert without the hadamard pass (online rotations)")
    p.add_argument("--choose", action=argparse.BooleanOptionalAction, default=d.choose,
                   help="keep smooth (at one of --smooth-alphas) and hadamard (every group or one) only where they "
                        "lower the --format W4A4 error, measured on the training text (default: on); --no-choose: "
                        "smooth at --smooth-alpha and hadamard everywhere, unmeasured")
    p.add_argument("--format", choices=["nvfp4", "int4", "both", "each"], default=d.format,
                   help="W4A4 format(s) the chosen passes must lower: each — a search per format, and a conversion "
                        "per format where their kept passes differ; both — one conversion that lowers both; nvfp4 "
                        "or int4 alone (%(default)s)")
    p.add_argument("--smooth-alphas", type=_alphas, default=d.smooth_alphas,
                   help="smooth's α candidates for the chooser, comma-separated (default: "
                        f"{','.join(f'{a:g}' for a in d.smooth_alphas)})")
    p.add_argument("--scan-tokens", type=int, default=d.scan_tokens, help="calibration tokens (%(default)s)")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="evaluation windows (%(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (%(default)s)")
    p.add_argument("--eval-files", type=int, default=d.eval_files,
                   help="the first N text files are evaluation text only; training reads the rest (%(default)s)")
    p.add_argument("--recipe", default=d.recipe, help="training recipe: a YAML file or a shipped name (%(default)s)")
    p.add_argument("--train-steps", type=int, help="override the recipe's number of steps")
    p.add_argument("--no-train", action="store_true", help="stop after the training-free conversion")
    p.add_argument("--control", action="store_true",
                   help="also convert the source with the same passes minus the norm modules (gated-norm, "
                        "gated-attention, pre-affine, absorb-sinks), train it with the same recipe and budget, "
                        "export it to model-control/ and "
                        "report it beside the trained model: what the modules bought")
    p.add_argument("--deploy", default=d.deploy,
                   help="write each model as a compressed-tensors checkpoint in this scheme (nvfp4, nvfp4a16, w4a4, "
                        "w4a16) and evaluate it as it runs; auto: in the W4A4 scheme of each format it targets "
                        "(nvfp4, w4a4) (%(default)s)")
    p.add_argument("--no-deploy", action="store_true", help="no compressed-tensors checkpoints")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")


def _alphas(text: str) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not alphas or not all(0 <= a <= 1 for a in alphas):
        raise argparse.ArgumentTypeError(f"smooth α candidates must lie in [0, 1], got {text!r}")
    return alphas


def run(args) -> int:
    from ..pipeline import PipelineConfig
    from ..pipeline import run as run_pipeline

    cfg = PipelineConfig(model=args.model, data=args.data, gated_norm=args.gated_norm, rank=args.rank,
                         gated_attention=args.gated_attention, scan_tokens=args.scan_tokens,
                         eval_windows=args.eval_windows, seq_len=args.seq_len, eval_files=args.eval_files,
                         recipe=args.recipe, train_steps=args.train_steps, train=not args.no_train, control=args.control,
                         smooth_alpha=None if args.no_smooth else args.smooth_alpha, hadamard=not args.no_hadamard,
                         choose=args.choose, format=args.format, smooth_alphas=args.smooth_alphas,
                         deploy=None if args.no_deploy else args.deploy)
    run_pipeline(cfg, args.out, force=args.force)
    return 0
