"""surgeon train MODEL_DIR --data TEXT --out RUN_DIR [--recipe R.yaml] [--deepspeed configs/zeroN.json] [--resume]:
continued pretraining with DeepSpeed (DESIGN §7), one process or many (`deepspeed` launcher or torchrun; gloo on CPU).
Held-out loss, residual max |h| per layer and the sink dimensions' magnitude are logged with the loss to
RUN_DIR/metrics.jsonl; checkpoints go to RUN_DIR/checkpoints; --resume continues the run exactly."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    # the deepspeed launcher's --local_rank is taken by the top-level parser (cli.py)
    p.add_argument("model", help="model directory (a converted one), .gguf file, hub id, or 'default'")
    p.add_argument("--data", default="default", help="text file, folder, JSONL, or 'default' (Shakespeare)")
    p.add_argument("--out", type=Path, required=True, help="run directory (metrics, checkpoints, curves)")
    p.add_argument("--recipe", type=Path, help="recipe YAML, or a shipped one by name (smollm2-cpu, plain); on "
                   "--resume the run's own recipe unless given")
    p.add_argument("--deepspeed", type=Path, help="DeepSpeed config JSON, or a shipped one by name (zero0 … zero3); "
                   "stage 0 if omitted")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--steps", type=int, help="override the recipe's number of optimizer steps")
    p.add_argument("--stop-after", type=int, help="end this session after N steps (checkpointed); continue later "
                   "with --resume")
    p.add_argument("--scan", type=Path, help="scan.json whose sink dimensions are watched (default: the model's "
                   "absorbed sinks, else the top dimensions of the first measurement)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-remote-code", action="store_true", help="(dangerous) run a checkpoint's own code")


def run(args) -> int:
    from ..train.loop import train

    result = train(args.model, args.data, args.out, recipe=args.recipe, deepspeed_config=args.deepspeed,
                   resume=args.resume, steps=args.steps, stop_after=args.stop_after, scan=args.scan,
                   show_progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{result.run_dir}: step {result.step}")
    return 0
