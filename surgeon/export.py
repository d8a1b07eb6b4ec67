"""`surgeon export RUN_DIR OUT`: a finished (or stopped) training run → a consolidated Hugging Face model directory.

    export(run_dir, out, dtype=None, shard_size="5GB", step=None, force=False, figures=None) -> ExportReport

RUN_DIR is what `surgeon train` writes (surgeon/train/loop.py): run.json names the model directory trained (and its
sha256), checkpoints/<tag> holds the DeepSpeed checkpoint (tag: `latest`, or step<N>). The weights are the full fp32
state of any ZeRO stage — stage 0: the model-states file's `module`; stages 1–3: the fp32 master weights, gathered
by DeepSpeed's own zero_to_fp32 — cast to the export dtype (default: the model directory's) and streamed into
shards exactly as `surgeon convert` writes them. The tensor names and shapes must be the model directory's (a tied
LM head is not written), else nothing is written.

Nothing is ever unpickled beyond tensors: DeepSpeed calls torch.load(weights_only=False) internally, so while it
reads, TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 makes torch use its weights-only unpickler anyway, with only the few plain
DeepSpeed classes its checkpoints pickle (SAFE_DEEPSPEED_GLOBALS) allowed on top of tensors and containers.

The config is the model directory's with the export dtype and a `surgeon.training` entry (recipe, objectives,
steps, tokens, world size, run dir, checkpoint tag). A model converted with `glu` whose schedule reached α = 1
and that carries no other surgeon module is written as its stock family (hidden_act "sigmoid", no auto_map, no
modeling file), through the same code path convert uses for `--glu-alpha 1`; at α < 1 the surgeon config keeps
the trained α. Tokenizer, generation config, the modeling file and smooth's factors (smooth_factors.safetensors)
come from the model directory. The manifest (surgeon_manifest.json) and the model card (README.md) record
provenance and the before/after figures of RUN_DIR/metrics.jsonl (first measurement vs the last one up to the
exported step), plus any `figures` given.
The output is built in a temporary sibling and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .convert import DEFAULT_SHARD_SIZE, MANIFEST, copy_side_files, set_model_type
from .dtypes import parse_dtype
from .errors import SurgeonError, one_line
from .io import Checkpoint, TensorSpec, check_destination, final_path, parse_size, staged_directory, write_sharded
from .io.digest import SourceHasher
from .modeling import GLU_ACTIVATION, MODELING_FILE
from .progress import progress_bar
from .train.rundir import CHECKPOINTS, RUN_JSON, read_metrics
from .transforms.smooth import FACTORS_FILE

WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
# (module, name) of the classes DeepSpeed pickles into its checkpoints, found by loading stage 0-3 checkpoints with
# the weights-only unpickler: the loss scaler (its plain attributes), the ZeRO stage enum and the tensor-fragment
# address named tuple of the optimizer states. Nothing with code runs on unpickling them.
SAFE_DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
FIGURE_KEYS = (("ppl", "perplexity"), ("loss", "held-out loss"), ("residual_peak", "residual peak, max abs h"),
               ("linear_input_max_rms", "linear input max/RMS"),
               ("linear_input_max_rms_worst", "linear input max/RMS, worst layer"))


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


# ----------------------------------------------------------------------------- reading DeepSpeed checkpoints


def _safe_deepspeed_globals() -> list:
    import importlib

    found = []
    for module, name in SAFE_DEEPSPEED_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: a checkpoint that pickles it then fails to load, safely
    return found


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside runs the weights-only unpickler, even one that passes weights_only=False (as
    DeepSpeed's do), with only SAFE_DEEPSPEED_GLOBALS allowed beyond tensors and plain containers."""
    saved = {k: os.environ.get(k) for k in (WEIGHTS_ONLY_ENV, NO_WEIGHTS_ONLY_ENV)}
    os.environ[WEIGHTS_ONLY_ENV] = "1"
    os.environ.pop(NO_WEIGHTS_ONLY_ENV, None)  # torch refuses the two together
    try:
        with torch.serialization.safe_globals(_safe_deepspeed_globals()):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _import_deepspeed():
    if not torch.cuda.is_available():  # as surgeon.train.engine: before DeepSpeed probes for accelerators
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    return zero_to_fp32


def _load_error(path: Path, err: BaseException) -> SurgeonError:
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err).lower() \
            or "GLOBAL" in str(err):
        return SurgeonError(f"{path} pickles an object outside the allowed tensors and DeepSpeed classes "
                            f"({one_line(err, 200)}); refusing to unpickle it")
    return SurgeonError(f"reading the DeepSpeed checkpoint {path} failed ({one_line(err, 200)}); it is incomplete "
                        "or not a DeepSpeed checkpoint")


def load_checkpoint(checkpoints: Path, tag: str) -> tuple[dict, int, dict]:
    """(full state dict, ZeRO stage, client state) of DeepSpeed checkpoint `checkpoints/tag`, read weights-only.

    The state dict's values are fp32 tensors or DeepSpeed's lazy gathered tensors (`.contiguous()` realizes one):
    ZeRO 1–3 are consolidated by deepspeed.utils.zero_to_fp32 in lazy mode (the optimizer files memory-mapped, one
    tensor materialized at a time)."""
    folder = checkpoints / tag
    states = sorted(folder.glob("*model_states.pt"))
    if not states:
        raise SurgeonError(f"{folder} holds no DeepSpeed model states (*model_states.pt); the checkpoint is "
                           "incomplete")
    optim = sorted(folder.glob("*optim_states.pt"))
    zero_to_fp32 = _import_deepspeed() if optim else None
    with weights_only_loads():
        try:
            model_states = torch.load(states[0], map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:
            raise _load_error(states[0], err) from None
        client = {k: model_states.get(k) for k in ("step", "position", "sink_dims", "global_steps")}
        stage = int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
        if not optim:
            module = model_states.get("module")
            if not isinstance(module, Mapping) or not module:
                raise SurgeonError(f"{states[0]} holds no module weights (ZeRO stage {stage} without optimizer "
                                   "states); the checkpoint is incomplete")
            if stage:
                raise SurgeonError(f"{folder} is a ZeRO-{stage} checkpoint without its *optim_states.pt files, "
                                   "which hold the fp32 weights; copy the whole checkpoint directory")
            return dict(module), 0, client
        del model_states
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag,
                                                                              lazy_mode=True)
        except Exception as err:
            raise _load_error(folder, err) from None
    return dict(state), stage, client


def checkpoint_layout(model_dir: Path, state: dict) -> dict:
    """The state dict in the layout of the model directory's files: transformers 5 loads some checkpoints through a
    conversion (MoE experts stored one tensor per expert are fused into one parameter) and `save_pretrained` reverts
    it; the same revert is applied here, on a model skeleton built on the meta device. It needs every tensor at
    once (the whole model in memory), so it runs only when the names differ. Pure reshaping: values are unchanged."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.core_model_loading import revert_weight_conversion

        from .modeling import register

        register()
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        return dict(revert_weight_conversion(skeleton, {k: v.contiguous() for k, v in state.items()}))
    except (ImportError, ValueError, KeyError, RuntimeError, OSError):
        return state  # the name check that follows reports what differs


# ----------------------------------------------------------------------------- config, GLU, figures


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


def _eval_figures(record: dict | None) -> dict | None:
    if not record:
        return None
    m = record["eval"]
    out = {"step": record["step"], "tokens": record.get("tokens")}
    for key, _ in FIGURE_KEYS:
        if key in m:
            out[key] = m[key]
    if m.get("sink_abs"):
        out["sink_abs"] = dict(m["sink_abs"])
    if m.get("quant_ppl"):
        out["quant_ppl"] = dict(m["quant_ppl"])
    return out


def _figure_rows(before: dict | None, after: dict | None) -> list[tuple[str, object, object]]:
    if not before and not after:
        return []
    b, a = before or {}, after or {}
    rows = [(label, b.get(key), a.get(key)) for key, label in FIGURE_KEYS if key in b or key in a]
    bq, aq = b.get("quant_ppl") or {}, a.get("quant_ppl") or {}
    for fmt in dict.fromkeys([*bq, *aq]):
        rows.append((f"W4A4 {fmt} perplexity", bq.get(fmt), aq.get(fmt)))
        ratios = [q.get(fmt) / m["ppl"] if q.get(fmt) is not None and m.get("ppl") else None
                  for q, m in ((bq, b), (aq, a))]
        rows.append((f"W4A4 {fmt} / unquantized perplexity", *ratios))
    bs, as_ = b.get("sink_abs") or {}, a.get("sink_abs") or {}
    rows += [(f"sink dim {dim}, mean abs h", bs.get(dim), as_.get(dim)) for dim in dict.fromkeys([*bs, *as_])]
    return rows


def _normalize_figures(figures: Mapping | None) -> dict | None:
    """label → {column: value} (a sequence of two values is (before, after)), JSON-safe."""
    if figures is None:
        return None
    if not isinstance(figures, Mapping):
        raise SurgeonError(f"figures must map a label to its values, got {type(figures).__name__}")
    out = {}
    for label, values in figures.items():
        if isinstance(values, Mapping):
            row = dict(values)
        elif isinstance(values, Sequence) and not isinstance(values, str):
            values = list(values)
            row = dict(zip(("before", "after"), values)) if len(values) == 2 else \
                {f"value {i + 1}": v for i, v in enumerate(values)}
        else:
            row = {"value": values}
        out[str(label)] = {str(k): (v.item() if isinstance(v, torch.Tensor) else v) for k, v in row.items()}
    try:
        json.dumps(out)
    except (TypeError, ValueError) as err:
        raise SurgeonError(f"figures must be JSON values (numbers, strings): {one_line(err)}") from None
    return out


def _fmt(value) -> str:
    """A table cell: numbers to 4 significant digits, `|` escaped (Markdown tables split on it)."""
    return _cell(value).replace("|", "\\|")


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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
    out_dtype = parse_dtype(dtype)
    limit = parse_size(shard_size)
    figures = _normalize_figures(figures)
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
    before = _eval_figures(evals[0]) if evals else None
    after = _eval_figures(evals[-1]) if len(evals) > 1 else None
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
    old_modeling = [f"{v.split('.')[0]}.py" for v in (ckpt.config.get("auto_map") or {}).values()
                    if isinstance(v, str) and "." in v]
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
            for name in dict.fromkeys(f"{v.split('.')[0]}.py" for v in config["auto_map"].values()):
                src = model_dir / name if (model_dir / name).is_file() else MODELING_FILE.with_name(name)
                if not src.is_file():
                    raise SurgeonError(f"the modeling file {name} named by auto_map is neither in {model_dir} nor "
                                       "in surgeon; nothing was written")
                shutil.copy2(src, tmp / name)
        write_export_manifest(tmp, report, config)
        report.files = sorted(p.name for p in tmp.iterdir())
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

    recipe = training.get("recipe") or {}
    try:
        from .train.objectives import ObjectiveConfig

        defaults = ObjectiveConfig().to_dict()
    except SurgeonError:
        defaults = {}
    objectives = {k: v for k, v in (training.get("objectives") or {}).items()
                  if k in ("lm", "distill", "pressure") and v or k not in defaults or v != defaults[k]}
    lines = [
        "---", "library_name: transformers", "tags: [surgeon, gated-norm, pre-affine, continued-pretraining]", "---",
        "", f"# {report.output.name}", "",
        f"Exported by surgeon {__version__} from the training run `{final_path(report.run_dir)}` "
        f"(checkpoint `{report.tag}`, ZeRO stage {report.zero_stage}).", "",
        "| | |", "|---|---|",
        f"| source checkpoint | `{history[0].get('source', '—')}` |",
        f"| source sha256 | `{report.source_sha256 or '—'}` |",
        f"| family | {report.family} |",
        f"| transforms | {', '.join(report.transforms) or '—'} |",
        f"| trained model dir | `{final_path(report.model_dir)}` (sha256 `{report.model_sha256}`) |",
        f"| steps | {report.step:,} |",
        f"| tokens | {_fmt(report.tokens)} |",
        f"| world size | {_fmt(report.world_size)} |",
        f"| learning rate (pretrained / new) | {_fmt(recipe.get('lr'))} / {_fmt(recipe.get('lr_new'))} |",
        f"| batch × accumulation × seq_len | {_fmt(recipe.get('batch_size'))} × {_fmt(recipe.get('grad_accum'))} × "
        f"{_fmt(recipe.get('seq_len'))} |",
        f"| objectives | {', '.join(f'{k}={v}' for k, v in objectives.items()) or '—'} |",
    ]
    if report.glu_alpha is not None:
        lines.append(f"| SwiGLU → GLU, trained α | {report.glu_alpha:g} |")
    lines += [f"| dtype | {report.dtype} |", f"| parameters | {report.parameters:,} |"]
    rows = _figure_rows(report.before, report.after)
    if rows:
        b_step = (report.before or {}).get("step")
        a_step = (report.after or {}).get("step")
        lines += ["", "## Before and after training", "",
                  f"Held-out measurement of the run (metrics.jsonl): step {_fmt(b_step)} vs step {_fmt(a_step)}.", "",
                  f"| | before (step {_fmt(b_step)}) | after (step {_fmt(a_step)}) |", "|---|---:|---:|"]
        lines += [f"| {_fmt(label)} | {_fmt(b)} | {_fmt(a)} |" for label, b, a in rows]
    if report.figures:
        columns = list(dict.fromkeys(k for row in report.figures.values() for k in row))
        lines += ["", "## Further figures", "", "| | " + " | ".join(map(_fmt, columns)) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {_fmt(label)} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |"
                  for label, row in report.figures.items()]
    if report.stock:
        lines += ["", f"A stock `{config['model_type']}` model: load with "
                  "`AutoModelForCausalLM.from_pretrained(path)`.", ""]
    else:
        lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`, or without "
                  "remote code after `import surgeon`.", ""]
    (out / "README.md").write_text("\n".join(lines))
