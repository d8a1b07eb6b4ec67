"""`surgeon export RUN_DIR OUT`: a finished (or stopped) training run → a consolidated Hugging Face model directory.

    export(run_dir, out, dtype=None, shard_size="5GB", step=None, force=False, figures=None) -> ExportReport

RUN_DIR is what `surgeon train` writes (surgeon/train/loop.py): run.json names the model directory trained (and its
sha256), checkpoints/<tag> holds the DeepSpeed checkpoint (tag: `latest`, or step<N>). The weights are the full fp32
state of any ZeRO stage, read weights-only by surgeon/io/ds_checkpoint.py, cast to the export dtype (default: the
model directory's) and streamed into shards exactly as `surgeon convert` writes them. The tensor names and shapes
must be the model directory's (a tied LM head is not written), else nothing is written.

The config is the model directory's with the export dtype and a `surgeon.training` entry (recipe, objectives,
steps, tokens, world size, run dir, checkpoint tag). A model converted with `glu` whose schedule reached α = 1
and that carries no other surgeon module is written as its stock family (hidden_act "sigmoid", no auto_map, no
modeling file), through the same code path convert uses for `--glu-alpha 1`; at α < 1 the surgeon config keeps
the trained α. Tokenizer, generation config, the modeling file and smooth's factors (smooth_factors.safetensors)
come from the model directory. The manifest (surgeon_manifest.json) and the model card (README.md) record
provenance and the before/after figures of RUN_DIR/metrics.jsonl (first measurement vs the last one up to the
exported step), plus any `figures` given; the figures and the card are surgeon/model_card.py's.
The output is built in a temporary sibling and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .convert import DEFAULT_SHARD_SIZE
from .dtypes import parse_dtype
from .errors import SurgeonError, one_line
from .io import Checkpoint, TensorSpec, check_destination, final_path, parse_size, staged_directory, write_sharded
from .io.atomic import OWNER_FILE
from .io.digest import SourceHasher
from .io.ds_checkpoint import checkpoint_layout, load_checkpoint
from .io.validate import check_tensors
from .io.hf_dir import MANIFEST, copy_modeling_files, copy_side_files, modeling_files, set_model_type
from .model_card import eval_figures, export_card, normalize_figures
from .modeling import GLU_ACTIVATION
from .progress import progress_bar
from .train.rundir import CHECKPOINTS, RUN_JSON, read_metrics
from .transforms.smooth import FACTORS_FILE


@dataclass
class ExportReport:
    run_dir: Path
    output: Path
    model_dir: Path
    tag: str
    step: int
    tokens: int | None
    zero_stage: int
    world_size: int | None
    dtype: str
    family: str
    model_type: str
    stock: bool
    glu_alpha: float | None
    tensors: int
    parameters: int
    bytes_written: int
    source_sha256: str | None
    model_sha256: str | None
    transforms: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    before: dict | None = None
    after: dict | None = None
    figures: dict | None = None


# ----------------------------------------------------------------------------- the run directory


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SurgeonError(f"{path} is not readable JSON ({one_line(err)}); {what}") from None
    if not isinstance(value, dict):
        raise SurgeonError(f"{path} is not a JSON object; {what}")
    return value


def _checkpoint_tag(run_dir: Path, step: int | None) -> str:
    checkpoints = run_dir / CHECKPOINTS
    if not checkpoints.is_dir():
        raise SurgeonError(f"{run_dir} has no {CHECKPOINTS}/ directory: give a RUN_DIR written by `surgeon train` "
                           "that saved at least one checkpoint")
    available = sorted((p.name for p in checkpoints.glob("step*") if p.is_dir() and p.name[4:].isdigit()),
                       key=lambda n: int(n[4:]))
    if step is not None:
        tag = f"step{int(step)}"
        if tag not in available:
            raise SurgeonError(f"{run_dir} has no checkpoint of step {step}; it has "
                               f"{', '.join(available) or 'none'}")
        return tag
    latest = checkpoints / "latest"
    if not latest.is_file():
        raise SurgeonError(f"{checkpoints} has no `latest` file: pass --step N (available: "
                           f"{', '.join(available) or 'none'})")
    tag = latest.read_text().strip()
    if not (checkpoints / tag).is_dir():
        raise SurgeonError(f"{checkpoints}/latest names {tag!r}, which is missing; pass --step N (available: "
                           f"{', '.join(available) or 'none'})")
    return tag


# ----------------------------------------------------------------------------- config, GLU


def _recipe_of(run: dict) -> dict:
    resumed = run.get("resumed") or []
    return (resumed[-1].get("recipe") if resumed else None) or run.get("recipe") or {}


def _trained_glu_alpha(config: dict, objectives: dict, step: int) -> float | None:
    """α of the annealed GLU after `step` optimizer steps: the trainer sets glu_alpha(i) for step index i (0-based)
    and leaves it there, so the weights of step N were trained, and are measured, at glu_alpha(N − 1)."""
    glu = (config.get("surgeon") or {}).get("glu")
    if not glu:
        return None
    if config.get(glu.get("activation_key", "hidden_act")) == GLU_ACTIVATION:
        return 1.0
    schedule = objectives.get("glu_alpha_steps")
    if not schedule or step < 1:
        return float(glu.get("alpha", 0.0))
    from .train.objectives import glu_alpha

    return float(glu_alpha(step - 1, tuple(schedule)))


# ----------------------------------------------------------------------------- export


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
           shard_size: str | int = DEFAULT_SHARD_SIZE, step: int | None = None, force: bool = False,
           figures: Mapping | None = None, show_progress: bool = True) -> ExportReport:
    """Write the weights of RUN_DIR's checkpoint (`latest`, or step<N>) as a model directory at `out`."""
    run_dir, out = Path(run_dir), Path(out)
    # -- check everything before reading weights
    if not run_dir.is_dir():
        raise SurgeonError(f"run directory {run_dir} not found: give a RUN_DIR written by `surgeon train`")
    if not (run_dir / RUN_JSON).is_file():
        raise SurgeonError(f"{run_dir} has no {RUN_JSON}: give a RUN_DIR written by `surgeon train`")
    run = _read_json(run_dir / RUN_JSON, "the run directory is damaged")
    tag = _checkpoint_tag(run_dir, step)
    model_path = (run.get("model") or {}).get("path")
    if not model_path:
        raise SurgeonError(f"{run_dir / RUN_JSON} names no model directory (model.path)")
    model_dir = Path(model_path)
    if not model_dir.is_dir():
        raise SurgeonError(f"the run's model directory {model_dir} (run.json model.path) is gone; the export needs "
                           "its config and tokenizer: restore it there")
    ckpt = Checkpoint(model_dir)
    check_tensors(ckpt)  # the names and shapes the trained weights are compared with must be the config's own
    out_dtype = parse_dtype(dtype)
    limit = parse_size(shard_size)
    figures = normalize_figures(figures)
    check_destination(out, force=force, sources=(run_dir, model_dir))
    weight_files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    hasher = SourceHasher(weight_files)  # the digest run.json recorded (surgeon.train.loop._model_record)
    hasher.start()

    config = json.loads(json.dumps(ckpt.config))
    block = config.setdefault("surgeon", {})
    from .architectures import base_model_type

    family = base_model_type(config)
    if out_dtype is None:
        floats = Counter(i.dtype for i in ckpt.tensors.values() if i.dtype.is_floating_point)
        out_dtype = floats.most_common(1)[0][0] if floats else \
            parse_dtype(config.get("dtype") or config.get("torch_dtype") or "fp32")

    # -- the weights
    state, stage, client = load_checkpoint(run_dir / CHECKPOINTS, tag)
    trained_steps = int(client.get("step") if client.get("step") is not None else tag[4:])
    if set(state) - {"lm_head.weight"} != set(ckpt.tensors) - {"lm_head.weight"}:
        state = checkpoint_layout(model_dir, state)  # e.g. MoE: fused experts in the model, one per expert on disk
    tied = bool(config.get("tie_word_embeddings", False))
    if tied and "lm_head.weight" not in ckpt.tensors:
        state.pop("lm_head.weight", None)
    missing = [n for n in ckpt.tensors if n not in state]
    unexpected = [n for n in state if n not in ckpt.tensors]
    if missing or unexpected:
        def names(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = ([f"missing {len(missing)}: {names(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)}: {names(unexpected)}"] if unexpected else [])
        raise SurgeonError(f"the checkpoint {tag} does not hold the tensors of {model_dir} ({'; '.join(parts)}); "
                           "was the run trained from this model directory? nothing was written")
    shapes = [(n, tuple(state[n].shape), ckpt.tensors[n].shape) for n in ckpt.tensors
              if tuple(state[n].shape) != ckpt.tensors[n].shape]
    if shapes:
        n, got, want = shapes[0]
        raise SurgeonError(f"tensor {n} is {got} in checkpoint {tag} but {want} in {model_dir} "
                           f"({len(shapes)} shape mismatch(es)); nothing was written")
    specs = [TensorSpec(n, out_dtype if i.dtype.is_floating_point else i.dtype, i.shape)
             for n, i in ckpt.tensors.items()]

    def produce(spec: TensorSpec) -> torch.Tensor:
        tensor = state.pop(spec.name).contiguous()  # realizes a lazy ZeRO tensor; popped: memory stays bounded
        return tensor.to(spec.dtype)

    # -- provenance
    recipe = _recipe_of(run)
    from .train.objectives import ObjectiveConfig

    try:
        objectives = ObjectiveConfig(**(recipe.get("objectives") or {})).to_dict()
    except SurgeonError:
        objectives = run.get("objectives") or {}
    records = read_metrics(run_dir)
    tokens = next((r.get("tokens") for r in records if r.get("step") == trained_steps and "tokens" in r), None)
    evals = [r for r in records if isinstance(r.get("eval"), dict) and r.get("step", 0) <= trained_steps]
    before = eval_figures(evals[0]) if evals else None
    after = eval_figures(evals[-1]) if len(evals) > 1 else None
    resumed = run.get("resumed") or []
    world = resumed[-1].get("world_size") if resumed else run.get("world_size")
    training = {"recipe": recipe, "objectives": objectives, "steps": trained_steps, "tokens": tokens,
                "world_size": world, "run_dir": str(final_path(run_dir.resolve())), "checkpoint": tag,
                "zero_stage": stage, "model": str(final_path(model_dir.resolve())),
                "model_sha256": (run.get("model") or {}).get("sha256"),
                "data": run.get("data")}

    alpha = _trained_glu_alpha(config, objectives, trained_steps)
    if alpha is not None:
        glu = block["glu"]
        glu["alpha"] = alpha
        training["glu_alpha"] = alpha
        if alpha == 1.0:  # what transforms/glu.py does at α = 1: the MLPs run the stock GLU activation
            config[glu.get("activation_key", "hidden_act")] = GLU_ACTIVATION
    set_model_type(config, family)  # stock family when nothing of ours is needed any more (convert's own rule)
    stock = "auto_map" not in config
    dtype_name = str(out_dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    block["training"] = training

    try:
        digest, _ = hasher.result()
    except OSError as err:
        raise SurgeonError(f"reading {model_dir} for its sha256 failed: {err}") from None
    recorded = (run.get("model") or {}).get("sha256")
    if recorded and digest != recorded:
        raise SurgeonError(f"the weights in {model_dir} changed since the run started (sha256 {digest[:12]}…, "
                           f"run.json {recorded[:12]}…); its config and tokenizer may no longer match the run: "
                           "restore the model directory the run was trained from")

    # -- write
    old_modeling = modeling_files(ckpt.config)
    total = sum(s.nbytes for s in specs)
    report = ExportReport(
        run_dir=run_dir, output=out, model_dir=model_dir, tag=tag, step=trained_steps, tokens=tokens,
        zero_stage=stage, world_size=world, dtype=dtype_name, family=family, model_type=config["model_type"],
        stock=stock, glu_alpha=alpha, tensors=len(specs), parameters=sum(s.nbytes // s.dtype.itemsize for s in specs),
        bytes_written=total, source_sha256=block.get("source_sha256"), model_sha256=digest,
        transforms=list(block.get("transforms", [])), before=before, after=after, figures=figures)
    with staged_directory(out, force=force, sources=(run_dir, model_dir)) as tmp:
        with progress_bar(f"writing {out.name}", total, enabled=show_progress, unit="bytes") as advance:
            shards = write_sharded(tmp, specs, produce, limit, on_tensor=lambda s: advance(s.nbytes))
        report.shards = [p.name for p in shards]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_side_files(ckpt, tmp, skip=("README.md", MANIFEST, *old_modeling))
        if (model_dir / FACTORS_FILE).is_file():  # trained weights stay in the coordinates the factors describe
            shutil.copy2(model_dir / FACTORS_FILE, tmp / FACTORS_FILE)
        if not stock:
            copy_modeling_files(config, tmp, model_dir)
        write_export_manifest(tmp, report, config)
        report.files = sorted(p.name for p in tmp.iterdir() if p.name != OWNER_FILE)
    return report


def write_export_manifest(out: Path, report: ExportReport, config: dict) -> None:
    """surgeon_manifest.json (the same file `convert` writes, with the training and the figures) and README.md."""
    block = config["surgeon"]
    training = block["training"]
    history = block.get("history") or [{}]
    manifest = {
        "surgeon_version": __version__,
        "kind": "export",
        "source": history[0].get("source"),
        "source_sha256": report.source_sha256,
        "family": report.family,
        "model_type": report.model_type,
        "stock": report.stock,
        "transforms": report.transforms,
        "surgeon": block,
        "model": {"path": str(final_path(report.model_dir)), "sha256": report.model_sha256},
        "training": training,
        "checkpoint": {"run_dir": str(final_path(report.run_dir)), "tag": report.tag, "step": report.step,
                       "zero_stage": report.zero_stage},
        "dtype": report.dtype,
        "parameters": report.parameters,
        "tensors": report.tensors,
        "shards": report.shards,
        "figures": {"before": report.before, "after": report.after, "extra": report.figures},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (out / "README.md").write_text(export_card(report, config))
