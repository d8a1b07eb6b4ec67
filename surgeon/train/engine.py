"""The DeepSpeed side of training: process group, DeepSpeed config, optimizer groups, learning-rate schedule.

Optimizer: torch AdamW (DeepSpeed's own Adam compiles a C++ op first; with `optimizer_coordinates: source`, its steps
on smoothed weights taken in the source's coordinates, surgeon.train.coordinates), three parameter groups —
    new         names containing gate_down, gate_up or pre_affine (GatedNorm and PreAffine parameters):
                lr_new, weight_decay_new
    attention_gates  names containing output_gate (gated attention's gates): lr_attention_gate (lr_new when
                unset), weight_decay_new
    pretrained  everything else: lr, weight_decay; its lr is 0 for the first freeze_base_steps steps
Schedule (per group, a LambdaLR factor of the group's peak lr):
    step < start + warmup: (step − start + 1) / warmup     start = freeze_base_steps for pretrained, 0 for new
    after:                 min_ratio + (1 − min_ratio) · ½(1 + cos(π · progress)), progress over the rest of the run
"Frozen" is lr 0, not requires_grad=False: ZeRO partitions what is trainable when it starts, so the set of trainable
parameters must not change during a run; AdamW with lr 0 leaves the weights exactly as they are (weight decay is
scaled by lr too), and its moments are ready when the lr comes up.

DeepSpeed config: a JSON file (configs/zero{0,1,2,3}.json) or stage 0 by default. The batch keys are set from the
recipe (train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size) and gradient_clipping from
grad_clip; bf16 is switched on where an accelerator is (GPU) and off on CPU, where everything runs in fp32.
"""

from __future__ import annotations

import json
import math
import os
import socket

import torch

from ..errors import SurgeonError
from .recipe import Recipe

NEW_PARAMETER_MARKS = ("gate_down", "gate_up", "pre_affine", "output_gate")
ATTENTION_GATE_MARK = "output_gate"  # gated attention's gates: a group of their own (lr_attention_gate)
DEFAULT_CONFIG = {"zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def is_new_parameter(name: str) -> bool:
    return any(mark in name for mark in NEW_PARAMETER_MARKS)


def zero_stage(config: dict):
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none)."""
    return (config.get("zero_optimization") or {}).get("stage", 0)


def load_ds_config(path: str | os.PathLike | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT_CONFIG))
    from surgeon.configs import locate

    path = locate("deepspeed", path, "DeepSpeed config")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"DeepSpeed config {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise SurgeonError(f"DeepSpeed config {path} must be a JSON object")
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise SurgeonError(f"DeepSpeed config {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    return config


def accelerator_is_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def finish_ds_config(config: dict, recipe: Recipe, world: int) -> dict:
    """The config with the recipe's batch, accumulation and clipping, and the precision this machine gets."""
    config = json.loads(json.dumps(config))
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise SurgeonError(f"DeepSpeed config: remove the {key!r} section; surgeon builds the optimizer and "
                               f"schedule from the recipe")
    config["train_micro_batch_size_per_gpu"] = recipe.batch_size
    config["gradient_accumulation_steps"] = recipe.grad_accum
    config["train_batch_size"] = recipe.batch_size * recipe.grad_accum * world
    config["gradient_clipping"] = recipe.grad_clip
    config["zero_allow_untested_optimizer"] = True  # torch AdamW under ZeRO 1-3
    config.setdefault("steps_per_print", 1 << 30)
    gpu = accelerator_is_gpu()
    config["bf16"] = {**config.get("bf16", {}), "enabled": gpu and torch.cuda.is_bf16_supported()}
    config["fp16"] = {**config.get("fp16", {}), "enabled": False}
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under a launcher (torchrun, deepspeed) the environment names the group; a plain
    `python`/`surgeon` process becomes a group of one. gloo on CPU, nccl on GPU."""
    if not torch.cuda.is_available():  # before DeepSpeed is imported: it probes for accelerators otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:  # one process: without these DeepSpeed goes looking for MPI
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if accelerator_is_gpu() else "gloo", verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    new, attention, base = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (attention if ATTENTION_GATE_MARK in name else new if is_new_parameter(name) else base).append(p)
    groups = []
    if base:
        groups.append({"params": base, "lr": recipe.lr, "weight_decay": recipe.weight_decay, "name": "pretrained"})
    if new:
        groups.append({"params": new, "lr": recipe.lr_new, "weight_decay": recipe.weight_decay_new, "name": "new"})
    if attention:
        lr = recipe.lr_new if recipe.lr_attention_gate is None else recipe.lr_attention_gate
        groups.append({"params": attention, "lr": lr, "weight_decay": recipe.weight_decay_new,
                       "name": "attention_gates"})
    return groups


def lr_factor(step: int, *, steps: int, warmup: int, min_ratio: float, start: int = 0) -> float:
    """The schedule's factor of the peak lr for the update made at `step` (0-based)."""
    if step < start:
        return 0.0
    step -= start
    span = max(1, steps - start)
    warmup = min(warmup, span)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, span - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, recipe: Recipe, maps: dict | None = None):
    """AdamW and its schedule; with `maps` ({parameter name: ToSource}), the steps of those parameters are taken in
    their source's coordinates (surgeon.train.coordinates)."""
    groups = parameter_groups(model, recipe)
    if not groups:
        raise SurgeonError("the model has no trainable parameters")
    settings = dict(lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
    if maps:
        from .coordinates import RescaledAdamW

        by_name = dict(model.named_parameters())
        absent = [n for n in maps if n not in by_name]
        if absent:
            raise SurgeonError(f"the smooth factors or hadamard rotations name {absent[0]!r}, which is not a "
                               "parameter of the model")
        optimizer = RescaledAdamW(groups, maps={by_name[n]: m for n, m in maps.items()}, **settings)
    else:
        optimizer = torch.optim.AdamW(groups, **settings)
    factors = []
    for group in groups:
        start = recipe.freeze_base_steps if group["name"] == "pretrained" else 0
        factors.append(_Factor(recipe.steps, recipe.warmup_steps, recipe.min_lr_ratio, start))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return optimizer, scheduler


class _Factor:
    """A picklable schedule factor (LambdaLR saves callable objects' __dict__ in its state)."""

    def __init__(self, steps, warmup, min_ratio, start):
        self.steps, self.warmup, self.min_ratio, self.start = steps, warmup, min_ratio, start

    def __call__(self, step: int) -> float:
        return lr_factor(step, steps=self.steps, warmup=self.warmup, min_ratio=self.min_ratio, start=self.start)


def initialize(model: torch.nn.Module, recipe: Recipe, ds_config: dict, world: int, maps: dict | None = None):
    """(engine, optimizer, scheduler) of a DeepSpeed engine around `model`."""
    import deepspeed

    optimizer, scheduler = build_optimizer(model, recipe, maps)
    config = finish_ds_config(ds_config, recipe, world)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=config, dist_init_required=False)
    return engine, optimizer, scheduler
