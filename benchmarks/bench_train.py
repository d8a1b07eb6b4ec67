#!/usr/bin/env python
"""Training throughput: `surgeon train` against Hugging Face Trainer + DeepSpeed, same model, data and config.

Issue target: surgeon's tokens/s ≥ 1.0× the HF Trainer's. Both sides train the same model directory (loaded by
surgeon.sources.load_model, fp32) on the same packed windows (surgeon.train.data.WindowStream: seq_len tokens with
BOS in front, the recipe's held-out split and seeded order), with the same DeepSpeed config (the --deepspeed file
as surgeon.train.engine.finish_ds_config completes it: micro-batch, accumulation 1, gradient clipping, fp32 on a
CPU), the same optimizer (torch AdamW, same lr, betas, eps, weight decay 0), warmup + cosine schedule, the same
number of torch threads, and the same process group (gloo, one process, set up by
surgeon.train.engine.init_distributed).

    surgeon   surgeon.train.loop.train with a recipe of LM loss only, no W4A4 eval, eval_every/save_every beyond
              the run, eval_windows 1. A step's time is the loop's own (metrics.jsonl tokens_per_s): fetching the
              micro-batch from the window stream, forward, loss, the finiteness all-reduce, backward, DeepSpeed
              step. The measurements at step 0 and at the end, and the final checkpoint, fall outside every timed
              step; the final checkpoint is skipped altogether (DeepSpeedEngine.save_checkpoint is a no-op in the
              benchmark process: nothing to gain from writing weights and Adam moments), unless --save.
    hf        transformers.Trainer (DeepSpeed through accelerate) on a Dataset holding the very windows surgeon
              trains on, in the same order (sequential sampler), labels = input_ids; no eval, no saving, the loss
              logged every step (after on_step_end, as surgeon logs its own), report_to=[]. A step is timed by a
              TrainerCallback from on_step_begin to on_step_end (forward, loss, backward, DeepSpeed step, grad
              norm, schedule): the batch is fetched before on_step_begin, so the HF figure leaves out the data
              loading that the surgeon figure holds (the end-to-end HF step is printed too). use_cpu=True (as an
              HF user on a CPU writes it; --no-hf-use-cpu to compare) still runs DeepSpeed, but accelerate then sets
              torch's threads to the core count unless OMP_NUM_THREADS is set: the children get
              OMP_NUM_THREADS=--threads, and each side's thread count during its steps is printed.

Each side runs in its own subprocess (DeepSpeed, accelerate and torch.distributed keep process-global state),
--repeat times, the order alternating (surgeon first on odd repeats, HF first on even ones) so a drifting machine
load hits both alike. The first --warmup steps of every run are untimed; the figure is the median step time over
all timed steps of all runs of a side, tokens/s = batch × window / that (window = seq_len + BOS). Keep
--warmup ≥ 1: surgeon's first step also fills the window stream's shuffle buffer (the HF side reads its windows
before training). As a check that both sides train the same thing, the first step's loss of each is printed (same
weights, same first batch: they agree; later ones drift, the two warmups differ). Appended to
benchmarks/results/bench_train.csv.

    python benchmarks/bench_train.py                                    # SmolLM2 + Shakespeare, ZeRO 0
    python benchmarks/bench_train.py --model DIR --data FILE --deepspeed zero2 --steps 10 --warmup 2 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_csv import append_rows  # benchmarks/, the script's own folder

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.csv"
SIDES = ("surgeon", "hf")


# ----------------------------------------------------------------------------- both sides


def bench_recipe(args):
    from surgeon.train.recipe import make_recipe

    total = args.warmup + args.steps
    # LM loss only, no W4A4 eval, one held-out window (the measurement at step 0 and at the end is untimed anyway,
    # but it costs wall time on a real model), no eval or save inside the run
    return make_recipe({"objectives": {"lm": 1.0}, "quant_eval": []}, source="bench_train", seq_len=args.seq_len,
                       batch_size=args.batch_size, grad_accum=1, steps=total, lr=args.lr, eval_windows=1,
                       eval_every=total + 1, save_every=total + 1)


def set_threads(n):
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- surgeon side


def run_surgeon(args, workdir: Path) -> dict:
    threads = set_threads(args.threads)
    from surgeon.train.loop import train

    if not args.save:  # the final checkpoint is outside every timed step: skip writing it
        from deepspeed.runtime.engine import DeepSpeedEngine

        DeepSpeedEngine.save_checkpoint = lambda self, *a, **k: True
    recipe = bench_recipe(args)
    t0 = time.perf_counter()
    run = train(args.model, args.data, workdir / "run", recipe=recipe, deepspeed_config=args.deepspeed,
                show_progress=False)
    wall = time.perf_counter() - t0
    import torch

    per_step = [r for r in run.records if "tokens_per_s" in r]  # steps 1 … total (step 0 holds only the eval)
    tokens_per_step = per_step[0]["tokens"] // per_step[0]["step"]
    seconds = [tokens_per_step / r["tokens_per_s"] for r in per_step]
    losses = [r.get("lm") for r in per_step]
    return {"side": "surgeon", "step_s": seconds[args.warmup:], "warmup_s": seconds[:args.warmup],
            "tokens_per_step": tokens_per_step, "losses": losses, "wall_s": wall, "threads": threads,
            "threads_after": torch.get_num_threads(), "world": torch.distributed.get_world_size(),
            "engine": "surgeon.train.loop"}


# ----------------------------------------------------------------------------- HF side


def run_hf(args, workdir: Path) -> dict:
    threads = set_threads(args.threads)
    from surgeon.sources import load_model, resolve_text
    from surgeon.train import engine as ds
    from surgeon.train.data import WindowStream

    rank, world = ds.init_distributed()  # DS_ACCELERATOR=cpu, RANK/WORLD_SIZE/MASTER_*, gloo: as surgeon train
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    recipe = bench_recipe(args)
    total = recipe.steps
    model, tokenizer = load_model(args.model)
    model.train()
    paths = resolve_text(args.data)
    stream = WindowStream(paths, tokenizer, recipe.seq_len, heldout_every=recipe.heldout_every, seed=recipe.seed,
                          shuffle_windows=recipe.shuffle_windows)
    batches = stream.batches(0, recipe.batch_size, rank, world)  # the micro-batches surgeon's steps 1 … total take
    windows = [w for _ in range(total) for w in next(batches)]

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            return {"input_ids": windows[i], "labels": windows[i]}

    class InOrder(Trainer):  # surgeon's order (the windows are already shuffled by WindowStream)
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.full_s, self.threads = [], [], None
            self._begin = self._end = None

        def on_train_begin(self, *a, **k):
            self._end = time.perf_counter()

        def on_step_begin(self, *a, **k):
            self._begin = time.perf_counter()
            self.threads = torch.get_num_threads()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.step_s.append(now - self._begin)
            self.full_s.append(now - self._end)  # end to end: also the batch fetch and HF's per-step bookkeeping
            self._end = now

    ds_config = ds.finish_ds_config(ds.load_ds_config(args.deepspeed), recipe, world)
    training_args = TrainingArguments(
        output_dir=str(workdir / "hf"), deepspeed=ds_config, use_cpu=args.hf_use_cpu,
        per_device_train_batch_size=recipe.batch_size, gradient_accumulation_steps=recipe.grad_accum,
        max_steps=total, learning_rate=recipe.lr, weight_decay=recipe.weight_decay, adam_beta1=recipe.betas[0],
        adam_beta2=recipe.betas[1], adam_epsilon=recipe.eps, max_grad_norm=recipe.grad_clip, optim="adamw_torch",
        lr_scheduler_type="cosine", warmup_steps=recipe.warmup_steps, eval_strategy="no", save_strategy="no",
        logging_strategy="steps", logging_steps=1, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        seed=recipe.seed, bf16=False, fp16=False)
    timer = StepTimer()
    trainer = InOrder(model=model, args=training_args, train_dataset=Windows(), callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    import deepspeed

    wrapped = trainer.model_wrapped
    on_deepspeed = bool(getattr(trainer, "is_deepspeed_enabled", False)) and isinstance(wrapped,
                                                                                      deepspeed.DeepSpeedEngine)
    stage = wrapped.zero_optimization_stage() if isinstance(wrapped, deepspeed.DeepSpeedEngine) else None
    return {"side": "hf", "step_s": timer.step_s[args.warmup:], "warmup_s": timer.step_s[:args.warmup],
            "full_s": timer.full_s[args.warmup:], "tokens_per_step": world * recipe.batch_size * windows[0].numel(),
            "wall_s": wall, "threads": threads, "threads_after": timer.threads, "world": world,
            "engine": type(wrapped).__name__, "deepspeed": on_deepspeed, "zero_stage": stage,
            "distributed_type": str(trainer.accelerator.distributed_type), "device": str(training_args.device),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


# ----------------------------------------------------------------------------- driver


def child(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench_train_{args.side}_"))
    try:
        result = (run_surgeon if args.side == "surgeon" else run_hf)(args, workdir)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.result).write_text(json.dumps(result))
    return 0


def child_argv(args, side, result):
    argv = [sys.executable, str(Path(__file__).resolve()), "--model", str(args.model), "--data", str(args.data),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--deepspeed", str(args.deepspeed), "--lr", str(args.lr),
            "--threads", str(args.threads), "--side", side, "--result", str(result)]
    if args.save:
        argv.append("--save")
    argv.append("--hf-use-cpu" if args.hf_use_cpu else "--no-hf-use-cpu")
    return argv


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model directory, or 'default' (SmolLM2)")
    parser.add_argument("--data", default="default", help="text spec as surgeon train takes it ('default': "
                        "Shakespeare)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every run (≥ 1: "
                        "surgeon's first step fills the shuffle buffer)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--deepspeed", default="zero0", help="shipped config name (zero0 … zero3) or JSON path")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--repeat", type=int, default=1, help="runs per side, the order alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads on both sides (default 1: steadier timings on a shared machine)")
    parser.add_argument("--save", action="store_true", help="let surgeon write its final checkpoint (untimed)")
    parser.add_argument("--hf-use-cpu", action=argparse.BooleanOptionalAction, default=True,
                        help="TrainingArguments(use_cpu=...) on the HF side (default: on; either way accelerate "
                        "runs DeepSpeed on the CPU accelerator)")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--steps and --repeat must be ≥ 1, --warmup ≥ 0")
    if args.side:
        return child(args)

    from rich.console import Console
    from rich.table import Table

    from surgeon.sources import resolve_model, resolve_text
    from surgeon.train.engine import load_ds_config

    console = Console(width=None if sys.stdout.isatty() else 120)
    model_dir = resolve_model(args.model)  # 'default' → the cached SmolLM2 directory, resolved once here
    resolve_text(args.data)
    stage = (load_ds_config(args.deepspeed).get("zero_optimization") or {}).get("stage", 0)
    label = "SmolLM2 (default)" if args.model == "default" else model_dir.name
    # the children run in a scratch directory: hand them absolute paths
    args.model = str(Path(model_dir).resolve())
    for key in ("data", "deepspeed"):
        if Path(getattr(args, key)).exists():
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    console.print(f"{label}: batch {args.batch_size} × {args.seq_len}+1 tokens, ZeRO {stage} ({args.deepspeed}), "
                  f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeat} run(s) per side, "
                  f"{args.threads} thread(s), {os.cpu_count()} cores")

    # accelerate sets torch's threads to the physical core count on a CPU unless OMP_NUM_THREADS is set: pin it
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    runs = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for r in range(args.repeat):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                result = Path(tmp) / f"{side}{r}.json"
                with console.status(f"run {r + 1}/{args.repeat}: {side}"):
                    proc = subprocess.run(child_argv(args, side, result), cwd=tmp, env=env, capture_output=True,
                                          text=True)
                if proc.returncode != 0 or not result.is_file():
                    console.print(f"[red]{side} run {r + 1} failed (exit {proc.returncode})[/red]")
                    console.print(proc.stderr[-4000:] or proc.stdout[-4000:])
                    return 1
                out = json.loads(result.read_text())
                runs[side].append(out)
                extra = ""
                if out["threads_after"] != args.threads:
                    console.print(f"[yellow]warning: {side} ran its steps on {out['threads_after']} threads, not "
                                  f"{args.threads}[/yellow]")
                if side == "hf":
                    extra = (f"  engine {out['engine']} (DeepSpeed {'on' if out['deepspeed'] else 'OFF'}, "
                             f"ZeRO {out['zero_stage']}, {out['distributed_type']}, {out['device']})")
                    if not out["deepspeed"]:
                        console.print("[yellow]warning: the HF Trainer did not run on DeepSpeed[/yellow]")
                console.print(f"  run {r + 1} {side:7s} steps " + " ".join(f"{s:.3f}" for s in out["step_s"])
                              + f" s (warm-up {' '.join(f'{s:.3f}' for s in out['warmup_s'])}), "
                              f"{out['threads_after']} thread(s), wall {out['wall_s']:.1f} s{extra}")

    tokens = {side: runs[side][0]["tokens_per_step"] for side in SIDES}
    if tokens["surgeon"] != tokens["hf"]:
        console.print(f"[red]tokens per step differ: {tokens}[/red]")
        return 1
    # same weights, same first batch: the first step's loss must agree (later ones drift apart: the two warmup
    # schedules differ, HF's starts at lr 0)
    first = {side: runs[side][0]["losses"][0] for side in SIDES}
    same = abs(first["surgeon"] - first["hf"]) <= 1e-3 * abs(first["hf"]) + 1e-4
    console.print(f"first-step loss: surgeon {first['surgeon']:.5f}, HF {first['hf']:.5f}"
                  f"{'' if same else '  [red]DIFFER: not the same model or data?[/red]'}")
    step = {side: statistics.median([s for run in runs[side] for s in run["step_s"]]) for side in SIDES}
    best = {side: min(s for run in runs[side] for s in run["step_s"]) for side in SIDES}
    tok_s = {side: tokens[side] / step[side] for side in SIDES}
    ratio = tok_s["surgeon"] / tok_s["hf"]
    hf_full = statistics.median([s for run in runs["hf"] for s in run["full_s"]])

    table = Table(title=f"training throughput, ZeRO {stage}, {tokens['hf']} tokens/step "
                        f"({args.steps} timed steps × {args.repeat} run(s) per side)")
    for col in ("side", "median step s", "min step s", "tokens/s"):
        table.add_column(col, justify="left" if col == "side" else "right")
    table.add_row("surgeon train", f"{step['surgeon']:.4f}", f"{best['surgeon']:.4f}", f"{tok_s['surgeon']:,.0f}")
    table.add_row("HF Trainer + DeepSpeed", f"{step['hf']:.4f}", f"{best['hf']:.4f}", f"{tok_s['hf']:,.0f}")
    console.print(table)
    console.print(f"HF step end to end (with batch fetch and per-step bookkeeping): {hf_full:.3f} s median "
                  f"({tokens['hf'] / hf_full:,.0f} tok/s)")
    console.print(f"ratio surgeon/HF tokens/s: {ratio:.3f}× (target ≥ 1.0×) "
                  f"{'OK' if ratio >= 1.0 else 'BELOW TARGET'}")

    if not args.no_csv:
        append_rows(RESULTS, ["date", "cores", "threads", "model", "seq_len", "batch", "stage", "steps", "warmup",
                              "repeat", "surgeon_step_s", "hf_step_s", "surgeon_tok_s", "hf_tok_s", "ratio"],
                    [[time.strftime("%Y-%m-%d %H:%M"), os.cpu_count(), args.threads, label, args.seq_len,
                      args.batch_size, stage, args.steps, args.warmup, args.repeat, f"{step['surgeon']:.4f}",
                      f"{step['hf']:.4f}", f"{tok_s['surgeon']:.1f}", f"{tok_s['hf']:.1f}", f"{ratio:.3f}"]])
        console.print(f"appended to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
