"""The training loop of `surgeon train` (DESIGN §7): steps, measurement, checkpoints, resume, logging.

    train(model_dir, data, run_dir, recipe=..., deepspeed_config=..., resume=...)

One step = grad_accum micro-batches per process, each inside `Objectives.step_context(step, steps)`:
forward, `Objectives.loss`, a finiteness check agreed by every rank, backward, `engine.step()` (DeepSpeed
applies the update, gradient clipping and the schedule at the accumulation boundary).

Measurement (`surgeon.train.measure.measure`) on the held-out windows at step 0, every eval_every steps and at
the end (with the recipe's quant_eval W4A4 perplexities at the first and the last), with the sink dimensions of the model's `surgeon.absorb_sinks` block, else of `--scan scan.json`, else
the top dimensions of the first measurement (recorded in run.json and in every checkpoint, so a resumed run
watches the same ones).

RUN_DIR holds
    run.json          recipe, DeepSpeed config, world size, model and data, the model's sha256 and surgeon block
    metrics.jsonl     one record per step: step, tokens, lr, loss terms, tokens/s; `eval` on measuring steps
    checkpoints/      DeepSpeed checkpoints `step<N>` (+ `latest`), the newest keep_checkpoints kept; each carries
                      the step and the data position
    *.png             curves drawn at the end (loss, residual peak, sink magnitudes, max |h| per layer)

Exact resume: the data position is a count of windows (surgeon.train.data), optimizer and schedule states come from
the checkpoint, and the RNG is reseeded from (seed, step, rank) at every step, so nothing random depends on how
many steps this process has run. An interrupted run resumed with --resume takes the same next steps as one never
interrupted. A non-finite loss stops the run before its backward: nothing of that step is applied or saved.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import SurgeonError
from ..sources import load_model, resolve_model, resolve_text
from . import engine as ds
from .coordinates import check_supported as check_coordinates
from .coordinates import source_maps
from .data import WindowStream
from .objectives import ObjectiveConfig, Objectives
from .recipe import Recipe, load_recipe
from .rundir import CHECKPOINTS, METRICS, RUN_JSON


@dataclass
class Run:
    """What a finished (or stopped) train() call leaves: where, how far, and the logged records of this call."""
    run_dir: Path
    step: int
    records: list[dict] = field(default_factory=list)


def _sink_dims_of(model_dir: Path, scan: str | os.PathLike | None) -> list[int] | None:
    if scan is not None:
        from ..scan import ScanReport

        path = Path(scan)
        if not path.is_file():
            raise SurgeonError(f"scan report {path} not found: pass a scan.json written by `surgeon scan`")
        try:
            return ScanReport.load(path).sink_dims()
        except (KeyError, TypeError, ValueError) as exc:
            raise SurgeonError(f"{path} is not a scan.json written by `surgeon scan` ({exc})") from None
    block = json.loads((model_dir / "config.json").read_text()).get("surgeon") or {}
    sinks = (block.get("absorb_sinks") or {}).get("sinks") or []
    return [int(s["dim"]) for s in sinks] or None


def _model_record(model_dir: Path) -> dict:
    from ..io.digest import checkpoint_digest, file_sha256

    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    digests = {p.name: file_sha256(p) for p in files}
    config = json.loads((model_dir / "config.json").read_text())
    return {"path": str(model_dir.resolve()), "sha256": checkpoint_digest(digests), "files": digests,
            "model_type": config.get("model_type"), "surgeon": config.get("surgeon")}


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / CHECKPOINTS / "latest").is_file():
            raise SurgeonError(f"nothing to resume in {run_dir}: it has no {CHECKPOINTS}/latest (start it without "
                               f"--resume)")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise SurgeonError(f"run directory {run_dir} already exists: pass --resume to continue it, or choose a new "
                           f"--out")


def _all_finite(value: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0])
    torch.distributed.all_reduce(flag)
    return flag.item() == 0


def _mean_over_ranks(values: dict[str, float], world: int) -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


def _seed_step(seed: int, step: int, rank: int) -> None:
    import random

    value = (seed * 1_000_003 + step) * 1_009 + rank
    torch.manual_seed(value)
    random.seed(value)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after `step` (logged after the checkpoint a resume starts from), and a partial one."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a record cut off by a killed process (SIGKILL mid-write): logged again on resume
            continue
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _prune(checkpoints: Path, keep: int) -> None:
    tags = sorted((p for p in checkpoints.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                  key=lambda p: int(p.name[4:]))
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _summary(terms: dict, metrics: dict | None) -> str:
    text = f"loss {terms.get('total', float('nan')):.4f}"
    if metrics:
        text += f"  eval {metrics['loss']:.4f}  peak |h| {metrics['residual_peak']:.4g}"
    return text


def train(model: str | os.PathLike, data: str | os.PathLike | list, run_dir: str | os.PathLike, *,
          recipe: Recipe | str | os.PathLike | None = None, deepspeed_config: str | os.PathLike | None = None,
          resume: bool = False, steps: int | None = None, stop_after: int | None = None,
          scan: str | os.PathLike | None = None, show_progress: bool = True,
          trust_remote_code: bool = False) -> Run:
    """Continue pretraining `model` on `data` (a text spec as `surgeon.sources.resolve_text` takes, or a list of
    them), writing RUN_DIR (see the module docstring).

    `steps` overrides the recipe's run length; `stop_after` ends this call after that many steps (checkpointed),
    as an interruption would — continue with `resume=True`. Everything the user passes is checked before anything
    is written. Returns the run directory, the step reached and this call's metrics records.
    """
    run_dir = Path(run_dir)
    # -- check everything before writing anything
    if recipe is None and resume and (run_dir / RUN_JSON).is_file():  # resume with the run's own recipe
        from .recipe import make_recipe

        stored = json.loads((run_dir / RUN_JSON).read_text())["recipe"]
        recipe = make_recipe(stored, source=f"{run_dir / RUN_JSON}", steps=steps)
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, steps=steps)
    elif steps is not None:
        from dataclasses import replace

        recipe = replace(recipe, steps=steps)
    if stop_after is not None and stop_after < 1:
        raise SurgeonError(f"stop_after must be at least 1, got {stop_after}")
    ds_config = ds.load_ds_config(deepspeed_config)
    check_coordinates(recipe.optimizer_coordinates, ds.zero_stage(ds_config), ds.accelerator_is_gpu())
    paths = resolve_text(data)
    model_dir = resolve_model(model, trust_remote_code=trust_remote_code)
    sink_dims = _sink_dims_of(model_dir, scan)
    maps = source_maps(model_dir) if recipe.optimizer_coordinates == "source" else None
    _check_run_dir(run_dir, resume)
    objective_cfg = ObjectiveConfig(**recipe.objectives)

    rank, world = ds.init_distributed()
    lead = rank == 0
    net, tokenizer = load_model(model_dir, trust_remote_code=trust_remote_code)
    net.train()
    if recipe.gradient_checkpointing:
        net.gradient_checkpointing_enable()  # backward runs inside step_context, as QAT then needs
    teacher = None
    if objective_cfg.distill > 0:
        teacher, _ = load_model(model_dir, trust_remote_code=trust_remote_code)
    objectives = Objectives(objective_cfg, net, teacher=teacher)

    stream = WindowStream(paths, tokenizer, recipe.seq_len, heldout_every=recipe.heldout_every, seed=recipe.seed,
                          shuffle_windows=recipe.shuffle_windows)
    heldout = stream.heldout(recipe.eval_windows, recipe.batch_size)
    engine, _, _ = ds.initialize(net, recipe, ds_config, world, maps)

    checkpoints = run_dir / CHECKPOINTS
    metrics_path = run_dir / METRICS
    start_step, position = 0, 0
    if resume:
        loaded, client = engine.load_checkpoint(str(checkpoints))
        if loaded is None or not client:
            raise SurgeonError(f"could not load the latest checkpoint of {checkpoints}")
        start_step, position = int(client["step"]), int(client["position"])
        sink_dims = client.get("sink_dims", sink_dims)
        if lead:
            _truncate_metrics(metrics_path, start_step)
            record = json.loads((run_dir / RUN_JSON).read_text())
            record.setdefault("resumed", []).append({
                "step": start_step, "recipe": recipe.to_dict(), "world_size": world,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            (run_dir / RUN_JSON).write_text(json.dumps(record, indent=2) + "\n")
    elif lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"model": _model_record(model_dir), "data": [str(p) for p in paths], "recipe": recipe.to_dict(),
                  "objectives": objective_cfg.to_dict(), "deepspeed": ds.finish_ds_config(ds_config, recipe, world),
                  "world_size": world, "sink_dims": sink_dims, "sink_dims_from":
                  "scan" if scan else "model config" if sink_dims else "first measurement",
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (run_dir / RUN_JSON).write_text(json.dumps(record, indent=2) + "\n")
    torch.distributed.barrier()
    if start_step >= recipe.steps:
        return Run(run_dir, start_step)

    windows_per_step = world * recipe.batch_size * recipe.grad_accum
    tokens_per_window = heldout[0].shape[1]
    batches = stream.batches(position, recipe.batch_size, rank, world)
    end = recipe.steps if stop_after is None else min(recipe.steps, start_step + stop_after)
    records: list[dict] = []
    last_saved = start_step if resume else None

    def evaluate(step, quant=False):
        nonlocal sink_dims
        from .measure import measure

        metrics = measure(engine.module, heldout, sink_dims=sink_dims)
        # the before/after W4A4 figures, first and last measurement only; ZeRO-3 holds each rank's shard of the
        # weights, which fake quantization cannot rewrite in place: `surgeon eval` the export instead
        if quant and recipe.quant_eval and engine.zero_optimization_stage() < 3:
            from ..evaluate import perplexity
            from ..quant import fake_quantized

            was_training = engine.module.training
            engine.module.eval()
            metrics["quant_ppl"] = {}
            for fmt in recipe.quant_eval:  # the unquantized perplexity is measure()'s: not computed again
                with fake_quantized(engine.module, fmt):
                    metrics["quant_ppl"][fmt] = perplexity(engine.module, heldout)[0]
            engine.module.train(was_training)
        if sink_dims is None:
            sink_dims = metrics["top_dims"]
            if lead:
                record = json.loads((run_dir / RUN_JSON).read_text())
                record["sink_dims"] = sink_dims
                (run_dir / RUN_JSON).write_text(json.dumps(record, indent=2) + "\n")
        return metrics

    def last_good(hint="lower the learning rate or grad_clip in the recipe and resume with --resume"):
        where = (f"the last good checkpoint is {checkpoints / f'step{last_saved}'}" if last_saved is not None
                 else "no checkpoint was written yet")
        return f"{where}: {hint}"

    def save(step, position):
        nonlocal last_saved
        if engine.zero_optimization_stage() < 3:  # DeepSpeed reports no gradient norm at stage 0: look at the weights
            bad = torch.tensor([float(any(not torch.isfinite(p).all() for p in engine.module.parameters()))])
            torch.distributed.all_reduce(bad)
            if bad.item():
                raise SurgeonError(f"the weights became non-finite at step {step}; the run stopped without saving "
                                   f"them and {last_good()}")
        engine.save_checkpoint(str(checkpoints), tag=f"step{step}",
                               client_state={"step": step, "position": position, "sink_dims": sink_dims})
        torch.distributed.barrier()
        if lead:
            _prune(checkpoints, recipe.keep_checkpoints)
        last_saved = step

    from ..progress import training_progress

    with training_progress(recipe.steps, start_step, enabled=show_progress and lead) as show:
        metrics = evaluate(start_step, quant=True) if start_step == 0 else None
        if metrics is not None and lead:
            entry = {"step": 0, "tokens": 0, "eval": metrics}
            records.append(entry)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        step, last_eval = start_step, metrics
        try:
            for step in range(start_step, end):
                tic = time.perf_counter()
                _seed_step(recipe.seed, step, rank)
                sums: dict[str, float] = {}
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)} \
                    if hasattr(engine.optimizer, "param_groups") else {}
                for micro in range(recipe.grad_accum):
                    batch = next(batches)
                    with objectives.step_context(step, recipe.steps, micro=micro,
                                                 micro_per_step=recipe.grad_accum):
                        outputs = engine(input_ids=batch)
                        loss, terms = objectives.loss(batch, outputs)
                        if not _all_finite(loss.detach()):
                            raise SurgeonError(f"the loss became {loss.item()} at step {step + 1}; the run stopped "
                                               f"before applying it and {last_good()}")
                        engine.backward(loss)
                    engine.step()
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0.0) + value / recipe.grad_accum
                terms = _mean_over_ranks(sums, world)
                done = step + 1
                position += windows_per_step
                seconds = time.perf_counter() - tic
                entry = {"step": done, "tokens": position * tokens_per_window, "lr": lrs, **terms,
                         "tokens_per_s": windows_per_step * tokens_per_window / seconds}
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    entry["grad_norm"] = float(norm)
                    if not math.isfinite(float(norm)):  # applied already, but never saved
                        raise SurgeonError(f"the gradient norm became {float(norm)} at step {done}; the run stopped "
                                           f"without saving it and {last_good()}")
                metrics = None
                if done % recipe.eval_every == 0 or done == recipe.steps:
                    metrics = evaluate(done, quant=done == recipe.steps)
                    entry["eval"] = metrics
                if lead:
                    records.append(entry)
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(entry) + "\n")
                if done % recipe.save_every == 0 or done == end:
                    save(done, position)
                last_eval = metrics or last_eval
                show(done, _summary(terms, last_eval))
        except KeyboardInterrupt:
            raise SurgeonError(f"interrupted during step {step + 1}; "
                               f"{last_good('continue with --resume')}") from None
    if lead:
        from .curves import draw_curves

        draw_curves(metrics_path, run_dir)
    torch.distributed.barrier()
    return Run(run_dir, end, records)
