"""A training recipe: one YAML file naming every knob of a continued-pretraining run (DESIGN §7).

    seq_len, batch_size, grad_accum       tokens per window (BOS added), windows per micro-batch per process,
                                          micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)
    steps                                 optimizer steps of the whole run (the schedule's length)
    lr, lr_new                            peak learning rates of the pretrained parameters and of the new ones
                                          (names containing gate_down, gate_up, pre_affine)
    lr_attention_gate                     peak lr of gated attention's gates (output_gate; default: lr_new)
    weight_decay, weight_decay_new, betas, eps
    warmup_steps, min_lr_ratio            linear warmup to the peak, then cosine down to min_lr_ratio × peak
    freeze_base_steps                     the pretrained group's lr is 0 for the first K steps (its warmup follows)
    grad_clip                             global gradient-norm clip (0 = off)
    optimizer_coordinates                 stored (default): AdamW steps the weights as stored; source: on a model
                                          converted with smooth and/or hadamard, its steps are taken on the
                                          unsmoothed, unrotated weights (surgeon.train.coordinates; ZeRO stage 0,
                                          fp32); on a model with neither the two are the same
    gradient_checkpointing                recompute each layer in the backward (less memory, ~⅓ more compute)
    heldout_every, eval_windows           window i of the token stream is held out when i % heldout_every ==
                                          heldout_every − 1; the first eval_windows of those are the eval set
    eval_every, save_every, keep_checkpoints, seed, shuffle_windows
    quant_eval                            W4A4 formats (surgeon.quant: nvfp4, int4) whose held-out perplexity is
                                          measured at the first and the last measurement (the before/after figures)
    objectives                            handed to surgeon.train.objectives.ObjectiveConfig as is

Unknown keys, wrong types and impossible values are one-line SurgeonErrors, raised before anything is written.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

from ..errors import SurgeonError


@dataclass
class Recipe:
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 100
    lr: float = 5e-5
    lr_new: float = 1e-3
    lr_attention_gate: float | None = None  # gated attention's gates; None: lr_new
    weight_decay: float = 0.0
    weight_decay_new: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    freeze_base_steps: int = 0
    grad_clip: float = 1.0
    optimizer_coordinates: str = "stored"
    gradient_checkpointing: bool = False
    heldout_every: int = 50
    eval_windows: int = 8
    eval_every: int = 25
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    shuffle_windows: int = 1024
    quant_eval: tuple[str, ...] = ("nvfp4", "int4")
    objectives: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        out["quant_eval"] = list(self.quant_eval)
        return out


_INTS = {"seq_len": 1, "batch_size": 1, "grad_accum": 1, "steps": 1, "warmup_steps": 0, "freeze_base_steps": 0,
         "heldout_every": 2, "eval_windows": 1, "eval_every": 1, "save_every": 1, "keep_checkpoints": 1,
         "seed": 0, "shuffle_windows": 1}
_FLOATS = ("lr", "lr_new", "lr_attention_gate", "weight_decay", "weight_decay_new", "eps", "min_lr_ratio", "grad_clip")


def make_recipe(settings: dict | None = None, *, source: str = "recipe", **overrides) -> Recipe:
    """A checked Recipe from a mapping (e.g. parsed YAML) plus overrides (None values are ignored)."""
    settings = dict(settings or {})
    settings.update({k: v for k, v in overrides.items() if v is not None})
    names = [f.name for f in fields(Recipe)]
    unknown = [k for k in settings if k not in names]
    if unknown:
        raise SurgeonError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                           f"valid keys: {', '.join(names)}")
    for key, low in _INTS.items():
        if key in settings:
            value = settings[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SurgeonError(f"{source}: {key} must be an integer ≥ {low}, got {value!r}")
    for key in _FLOATS:
        if key in settings and not (key == "lr_attention_gate" and settings[key] is None):
            value = settings[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0:
                raise SurgeonError(f"{source}: {key} must be a finite number ≥ 0, got {value!r}")
            settings[key] = float(value)
    if "gradient_checkpointing" in settings and not isinstance(settings["gradient_checkpointing"], bool):
        raise SurgeonError(f"{source}: gradient_checkpointing must be true or false, got "
                           f"{settings['gradient_checkpointing']!r}")
    if "optimizer_coordinates" in settings:
        from .coordinates import COORDINATES

        if settings["optimizer_coordinates"] not in COORDINATES:
            raise SurgeonError(f"{source}: optimizer_coordinates must be one of {', '.join(COORDINATES)}, got "
                               f"{settings['optimizer_coordinates']!r}")
    if "betas" in settings:
        betas = settings["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
            raise SurgeonError(f"{source}: betas must be two numbers in [0, 1), got {betas!r}")
        settings["betas"] = (float(betas[0]), float(betas[1]))
    if "quant_eval" in settings:
        from ..quant import FORMATS

        formats = settings["quant_eval"] or []
        formats = [formats] if isinstance(formats, str) else formats
        if not isinstance(formats, (list, tuple)) or any(f not in FORMATS for f in formats):
            raise SurgeonError(f"{source}: quant_eval must be a list of {', '.join(FORMATS)}, got "
                               f"{settings['quant_eval']!r}")
        settings["quant_eval"] = tuple(dict.fromkeys(formats))
    if "min_lr_ratio" in settings and settings["min_lr_ratio"] > 1:
        raise SurgeonError(f"{source}: min_lr_ratio must be in [0, 1], got {settings['min_lr_ratio']}")
    objectives = settings.get("objectives") or {}
    if not isinstance(objectives, dict):
        raise SurgeonError(f"{source}: objectives must be a mapping of objective settings, got {objectives!r}")
    settings["objectives"] = objectives
    recipe = Recipe(**settings)
    # the objectives engineer's ObjectiveConfig checks its own keys (one-line errors, before anything runs)
    from .objectives import ObjectiveConfig

    try:
        ObjectiveConfig(**recipe.objectives)
    except SurgeonError as err:
        raise SurgeonError(f"{source}: {err}") from None
    return recipe


def load_recipe(path: str | os.PathLike | None, **overrides) -> Recipe:
    """The recipe in a YAML file (None: the defaults), with overrides applied."""
    if path is None:
        return make_recipe(None, source="recipe", **overrides)
    import yaml

    from surgeon.configs import locate

    path = locate("recipe", path, "recipe")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SurgeonError(f"recipe {path} is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise SurgeonError(f"recipe {path} must be a mapping of settings, got {type(settings).__name__}")
    return make_recipe(settings, source=f"recipe {path}", **overrides)
