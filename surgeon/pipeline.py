"""The main job, stage by stage: scan the source → choose the optional passes by measurement (smooth at an α,
hadamard on some linear inputs: kept only where they lower the target format's W4A4 error on the training text,
surgeon/choose.py) → convert (PreAffine, the scanned residual sinks absorbed into it, the chosen passes —
SmoothQuant scales folded into the weights, the linear inputs Hadamard-rotated —, GatedNorm with --gated-norm;
verified) → scan the result → continued
pretraining with the tuned recipe → export → scan and evaluate the export → a markdown report with the tables
and plots, source, converted and trained side by side (perplexity, NVFP4 and INT4 W4A4).

Every stage is a library call that also runs alone from the CLI (scan, convert, train, export, eval); this
module only sequences them and writes the report. The run directory is staged and renamed into place at the end,
like every output of surgeon.

Text: the first `eval_files` files (sorted) are evaluation text only, training reads the rest, so the reported
perplexities are on text the training never saw. With too few files to split, training and evaluation share the
text and the report says so.

The defaults (PipelineConfig's, what `surgeon pipeline` runs without options) are the shipped
configs/pipeline.yaml: the tuned values sit there beside the measurement that chose them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .convert import convert
from .errors import SurgeonError
from .evaluate import ModelEval, evaluate_model
from .io import staged_directory
from .progress import console, progress_bar
from .quant import smoothquant_scales
from .scan import ScanReport, scan
from .sources import iter_token_windows, load_model, resolve_model, resolve_text
from .transforms import TRANSFORMS, AbsorbSinks, GatedAttention, GatedNorm, Hadamard, PreAffine, Smooth

EVAL_FORMATS = ("nvfp4", "int4")
DEFAULTS_FILE = "pipeline.yaml"  # in surgeon.configs
DIRS = {"converted": "model-converted", "trained": "model-trained", "control-converted": "model-control-converted",
        "control": "model-control"}


def load_defaults() -> dict:
    """The shipped defaults of PipelineConfig (configs/pipeline.yaml), one key per field."""
    from importlib.resources import files

    import yaml

    return yaml.safe_load((files("surgeon.configs") / DEFAULTS_FILE).read_text())


DEFAULTS = load_defaults()


@dataclass
class PipelineConfig:
    """What the main job runs; each field's default and why it is that is in configs/pipeline.yaml."""

    model: str = DEFAULTS["model"]
    data: str = DEFAULTS["data"]
    gated_norm: bool = DEFAULTS["gated_norm"]  # GatedNorm after each residual-reading norm
    rank: int = DEFAULTS["rank"]
    gated_attention: bool = DEFAULTS["gated_attention"]  # a sigmoid gate on every attention output
    smooth_alpha: float | None = DEFAULTS["smooth_alpha"]  # α of the smooth pass (on the training text); None: no pass
    hadamard: bool = DEFAULTS["hadamard"]  # rotate every dense linear's input online (after smooth)
    choose: bool = DEFAULTS["choose"]  # smooth/hadamard kept only where they lower the W4A4 error (surgeon/choose.py)
    format: str = DEFAULTS["format"]  # the chooser's target: nvfp4, int4, both (one conversion), each (one per format)
    smooth_alphas: tuple = tuple(DEFAULTS["smooth_alphas"])  # smooth's α candidates when choosing
    scan_tokens: int = DEFAULTS["scan_tokens"]
    seq_len: int = DEFAULTS["seq_len"]
    eval_windows: int = DEFAULTS["eval_windows"]
    eval_skip_tokens: int = DEFAULTS["eval_skip_tokens"]
    batch_size: int = DEFAULTS["batch_size"]
    eval_files: int = DEFAULTS["eval_files"]  # the first N text files are evaluation text only
    recipe: str = DEFAULTS["recipe"]  # a recipe YAML or a shipped recipe's name
    train_steps: int | None = DEFAULTS["train_steps"]  # None: the recipe's
    train: bool = DEFAULTS["train"]  # False: stop after the training-free conversion
    control: bool = DEFAULTS["control"]  # also train the passes minus the norm modules, same recipe (model-control/)
    deploy: str | None = DEFAULTS["deploy"]  # compressed-tensors scheme of the deployed-<model>/ checkpoints; "auto":
    # each model's target formats' W4A4 scheme (AUTO_SCHEMES); None: none
    deploy_tokens: int = DEFAULTS["deploy_tokens"]  # their calibration tokens, from the training text


@dataclass
class Conversion:
    """One converted model of the main job and what came of it: the conversion for every target format, or (with
    --format each, where the formats' chosen passes differ) for one."""

    formats: tuple[str, ...]  # the target formats its optional passes were chosen for
    suffix: str = ""  # "" or "-nvfp4", "-int4": the tail of its labels and directories
    choice: object | None = None  # surgeon.choose.Choice it was converted with (None: the fixed passes)
    report: object | None = None  # surgeon.convert's ConvertReport
    training: dict | None = None  # steps, tokens, tokens/s, recipe
    control: dict | None = None  # the control's passes, verification and training summary

    def label(self, stage: str) -> str:
        """A model's or run directory's name: converted-int4."""
        return stage + self.suffix

    def stage(self, stage: str) -> str:
        """A stage's name in the report's timings: train (int4)."""
        return f"{stage} ({self.suffix[1:]})" if self.suffix else stage

    @property
    def verify(self) -> dict:
        return self.report.verify

    @cached_property
    def surgeon(self) -> dict:
        """The converted config's surgeon block (what each pass recorded), read once."""
        return json.loads((self.report.output / "config.json").read_text()).get("surgeon", {})


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    scans: dict[str, ScanReport] = field(default_factory=dict)
    evals: dict[str, ModelEval] = field(default_factory=dict)
    text: dict = field(default_factory=dict)  # eval / train files, overlap
    conversions: list[Conversion] = field(default_factory=list)
    choices: dict = field(default_factory=dict)  # target -> surgeon.choose.Choice: what the chooser measured and kept
    deployed: dict = field(default_factory=dict)  # label -> {scheme: the compressed-tensors checkpoint written}
    undeployable: dict = field(default_factory=dict)  # scheme -> why "auto" wrote no checkpoint in it

    # the first (with one target, the only) conversion's
    @property
    def verify(self) -> dict | None:
        return self.conversions[0].verify if self.conversions else None

    @property
    def training(self) -> dict | None:
        return self.conversions[0].training if self.conversions else None

    @property
    def control(self) -> dict | None:
        return self.conversions[0].control if self.conversions else None

    @property
    def choice(self):
        return self.conversions[0].choice if self.conversions else None


AUTO_SCHEMES = {"nvfp4": "nvfp4", "int4": "w4a4"}  # deploy "auto": a target format's compressed-tensors scheme
TARGETS = ("nvfp4", "int4", "both", "each")


def target_formats(cfg: PipelineConfig) -> tuple[str, ...]:
    from .choose import target_formats as formats

    if cfg.format not in TARGETS:
        raise SurgeonError(f"unknown --format {cfg.format!r}: use one of {', '.join(TARGETS)}")
    return formats("both" if cfg.format == "each" else cfg.format)


def deploy_schemes(cfg: PipelineConfig, formats) -> tuple[str, ...]:
    """The schemes a model targeting `formats` is deployed in: `deploy`'s, or with "auto" its formats'."""
    if not cfg.deploy:
        return ()
    if cfg.deploy == "auto":
        return tuple(AUTO_SCHEMES[f] for f in formats)
    return (cfg.deploy,)


def split_text(paths: list[Path], eval_files: int) -> tuple[list[Path], list[Path], bool]:
    """(evaluation files, training files, whether they overlap)."""
    if 0 < eval_files < len(paths):
        return paths[:eval_files], paths[eval_files:], False
    return paths, paths, True


def conversion_passes(cfg: PipelineConfig, sinks_scan: Path | None, train_paths: list[Path], *,
                      control: bool = False, optional: list | None = None) -> list:
    """The main job's passes in order: GatedNorm (with `gated_norm`), gated attention (with `gated_attention`),
    PreAffine, absorb-sinks (when the scan found sinks, unless the chooser decides it: absorb_is_chosen), then the
    optional passes: `optional` (what the chooser kept), else smooth and hadamard as the config fixes them.
    `control`: the same without the passes that insert or work through the paper's modules (each pass's
    `module_pass`), so the control differs from the main run by the modules alone."""
    passes = [GatedNorm(rank=cfg.rank)] if cfg.gated_norm else []
    if cfg.gated_attention:
        passes.append(GatedAttention())
    passes.append(PreAffine())
    if sinks_scan is not None and not absorb_is_chosen(cfg, optional):
        passes.append(AbsorbSinks(scan=sinks_scan))
    if optional is not None:
        passes += optional
    else:
        if cfg.smooth_alpha is not None:  # calibrated on the training text: the evaluation text stays unseen
            passes.append(Smooth(data=train_paths, alpha=cfg.smooth_alpha, seq_len=cfg.seq_len))
        if cfg.hadamard:
            passes.append(Hadamard())
    return [p for p in passes if not (control and p.module_pass)]


def absorb_is_chosen(cfg: PipelineConfig, optional: list | None) -> bool:
    """Whether absorb-sinks is one of the chooser's candidates rather than a fixed pass: only for a training-free
    conversion. Absorbing leaves the linear inputs alone and rescales the residual writers' rows, which costs W4A4
    at step 0 (SmolLM2: NVFP4 KL 0.554 against 0.505) and nothing measurable after training (NVFP4 within ±1% of
    the control, README "What the norm modules buy"), while it keeps the trained model's residual peak ~12× lower
    — a gain the step-0 measurement cannot see. Untrained, its W4A4 effect is all it has."""
    return optional is not None and not cfg.train


def choose_conversions(cfg: PipelineConfig, source: Path, sinks_scan: Path | None, train_paths: list[Path],
                       work_dir: Path) -> tuple[dict, list[Conversion]]:
    """The chooser on the main job's base passes: absorb-sinks (when the scan found sinks and absorb_is_chosen),
    smooth at each of `smooth_alphas` (unless smooth is off) and hadamard (unless off), measured on the training
    text — the evaluation text stays unseen. ({target: Choice}, the conversions): with `each` one search per
    format, and one conversion per format unless both searches kept the same passes."""
    from .choose import choose_each

    targets = ("nvfp4", "int4") if cfg.format == "each" else (cfg.format,)
    chosen = absorb_is_chosen(cfg, [])
    choices = choose_each(source, conversion_passes(cfg, sinks_scan, train_paths, optional=[]), train_paths,
                          targets=targets, absorb=AbsorbSinks(scan=sinks_scan) if sinks_scan and chosen else None,
                          seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                          alphas=cfg.smooth_alphas if cfg.smooth_alpha is not None else (), hadamard=cfg.hadamard,
                          work_dir=work_dir)
    kept = {t: c.labels() for t, c in choices.items()}
    if len(targets) == 1 or kept["nvfp4"] == kept["int4"]:
        return choices, [Conversion(target_formats(cfg), choice=choices[targets[0]])]
    return choices, [Conversion((t,), suffix=f"-{t}", choice=c) for t, c in choices.items()]


def _scan_and_eval(label: str, model_dir: Path, paths: list[Path], cfg: PipelineConfig, out: Path,
                   result: PipelineResult, train_paths: list[Path] | None = None, schemes=()) -> None:
    from . import plots

    t = time.perf_counter()
    model, tokenizer = load_model(model_dir)
    windows = iter_token_windows(paths, tokenizer, cfg.seq_len, cfg.scan_tokens, cfg.batch_size)
    report = scan(model, tokenizer, windows, model_name=label, model_path=str(model_dir))
    scan_dir = out / f"scan-{label}"
    scan_dir.mkdir()
    report.save(scan_dir / "scan.json")
    plots.write_all(report, scan_dir)
    result.scans[label] = report
    result.stages[f"scan {label}"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_windows = list(iter_token_windows(paths, tokenizer, cfg.seq_len, cfg.seq_len * cfg.eval_windows,
                                           cfg.batch_size, skip_tokens=cfg.eval_skip_tokens))
    smooth = None
    if cfg.eval_skip_tokens >= cfg.seq_len:  # SmoothQuant calibrates on the tokens before the evaluation windows
        calibration = iter_token_windows(paths, tokenizer, cfg.seq_len, cfg.eval_skip_tokens, cfg.batch_size)
        smooth = smoothquant_scales(model, calibration)
    console.print(f"[bold]eval[/] {label}: fp32, {', '.join(f.upper() for f in EVAL_FORMATS)} W4A4"
                  f"{' (plain and after SmoothQuant)' if smooth is not None else ''} on "
                  f"{cfg.eval_windows} × {cfg.seq_len} tokens")
    with progress_bar(f"eval {label}", 1 + len(EVAL_FORMATS) * (1 + (smooth is not None))) as advance:
        result.evals[label] = evaluate_model(model, eval_windows, EVAL_FORMATS, name=label, smooth=smooth,
                                             advance=advance)
    result.stages[f"eval {label}"] = time.perf_counter() - t
    schemes = [s for s in schemes if _deployable(model, s, cfg, result)]
    for scheme in schemes:
        _deploy(label, model_dir, model, eval_windows, train_paths or paths, cfg, out, result, scheme,
                tail=f"-{scheme}" if len(schemes) > 1 else "")


def _deployable(model, scheme: str, cfg: PipelineConfig, result: PipelineResult) -> bool:
    """Whether `model`'s linear widths fit `scheme`'s blocks. A scheme asked for by name must fit (its error says
    so); one that "auto" picked and that does not fit is left out, said on the console and in the report."""
    from .deploy import quantizable_linears, scheme_of

    if scheme in result.undeployable:
        return False
    try:
        quantizable_linears(model, scheme_of(scheme))
    except SurgeonError as e:
        if cfg.deploy != "auto":
            raise
        result.undeployable[scheme] = str(e)
        console.print(f"[yellow]deploy: no {scheme} checkpoints[/] — {e}")
        return False
    return True


def _deploy(label: str, model_dir: Path, model, eval_windows: list, train_paths: list[Path], cfg: PipelineConfig,
            out: Path, result: PipelineResult, scheme: str, tail: str = "") -> None:
    """`model_dir` written as a compressed-tensors checkpoint in `scheme` (deployed-<label><tail>/, calibrated on
    the training text) and evaluated as its format computes it, on the evaluation windows; for NVFP4 beside the
    fake-quant estimate with the checkpoint's calibrated input scales (the dynamic per-token one is the NVFP4
    column)."""
    from .deploy import load_compressed, quantize, scheme_of
    from .evaluate import perplexity
    from .quant import fake_quantized

    t = time.perf_counter()
    spec = scheme_of(scheme)
    console.print(f"[bold]deploy[/] {label}: {spec.name} compressed-tensors checkpoint, evaluated as it runs")
    target = out / f"deployed-{label}{tail}"
    report = quantize(model_dir, target, spec.name, text=train_paths, tokens=cfg.deploy_tokens, seq_len=cfg.seq_len,
                      batch_size=cfg.batch_size)
    figures = result.evals[label].perplexity
    if spec.name == "nvfp4":
        amax = json.loads((target / "surgeon_quantize.json").read_text())["input_amax"]
        with fake_quantized(model, "nvfp4", inputs=amax):
            figures["nvfp4-static"] = perplexity(model, eval_windows)[0]
    deployed, _ = load_compressed(target)
    figures[f"deployed-{spec.name}"] = perplexity(deployed, eval_windows)[0]
    del deployed
    result.deployed.setdefault(label, {})[spec.name] = {
        "dir": target.name, "scheme": spec.name, "bytes": report.bytes_written, "bytes_source": report.bytes_source,
        "calibration_tokens": report.calibration_tokens, "seconds": report.seconds}
    result.stages[f"deploy {label} {spec.name}"] = time.perf_counter() - t


def run(cfg: PipelineConfig, out: str | Path, *, force: bool = False) -> PipelineResult:
    from .train.recipe import load_recipe

    if cfg.control and not cfg.train:
        raise SurgeonError("--control trains a control beside the main run: drop --no-train")
    formats = target_formats(cfg)  # a bad --format: before any work
    out = Path(out)
    torch.manual_seed(0)
    paths = resolve_text(cfg.data)
    eval_paths, train_paths, overlap = split_text(paths, cfg.eval_files)
    source = resolve_model(cfg.model)
    recipe = load_recipe(cfg.recipe, steps=cfg.train_steps) if cfg.train else None  # bad recipe: before any work
    if cfg.deploy and cfg.deploy != "auto":
        from .deploy import scheme_of

        scheme_of(cfg.deploy)  # a bad scheme: before any work
    stages = (5 + cfg.control) if cfg.train else 3
    with staged_directory(out, force=force, sources=(source,)) as tmp:
        result = PipelineResult(out=out, text={"eval": [p.name for p in eval_paths],
                                               "train": [p.name for p in train_paths], "overlap": overlap})
        console.rule(f"[bold]1/{stages} source[/] {cfg.model}")
        _scan_and_eval("source", source, eval_paths, cfg, tmp, result, train_paths, deploy_schemes(cfg, formats))

        t = time.perf_counter()
        sinks_scan = tmp / "scan-source" / "scan.json" if result.scans["source"].sinks else None
        if cfg.choose:
            console.rule(f"[bold]2/{stages} choose[/] {'absorb-sinks, ' if absorb_is_chosen(cfg, []) else ''}"
                         "smooth and hadamard by "
                         f"{'each format' if cfg.format == 'each' else cfg.format}'s W4A4 error on the training text")
            result.choices, result.conversions = choose_conversions(cfg, source, sinks_scan, train_paths, tmp)
            (tmp / "choice.json").write_text(json.dumps({t: c.as_dict() for t, c in result.choices.items()},
                                                        indent=2) + "\n")
            result.stages["choose"] = time.perf_counter() - t
        else:  # the fixed passes: one conversion, whatever the target (`each` is then `both`)
            result.conversions = [Conversion(formats)]
        for conversion in result.conversions:
            _convert_and_train(cfg, conversion, source, sinks_scan, train_paths, eval_paths, recipe, tmp, result,
                               stages)
        write_report(tmp, cfg, result)
    console.print(f"[green]report:[/] {out / 'report.md'}")
    return result


def _convert_and_train(cfg: PipelineConfig, conversion: Conversion, source: Path, sinks_scan: Path | None,
                       train_paths: list[Path], eval_paths: list[Path], recipe, tmp: Path, result: PipelineResult,
                       stages: int) -> None:
    """One conversion's stages: convert and verify, scan and evaluate, train, export, scan and evaluate the
    trained model, the control; labelled with the conversion's suffix."""
    t = time.perf_counter()
    optional = conversion.choice.passes if conversion.choice is not None else None
    passes = conversion_passes(cfg, sinks_scan, train_paths, optional=optional)
    what = f" for {' and '.join(f.upper() for f in conversion.formats)}" if conversion.suffix else ""
    schemes = deploy_schemes(cfg, conversion.formats)
    console.rule(f"[bold]2/{stages} convert{what}[/] {' + '.join(p.name for p in passes)}, verified")
    converted = tmp / (DIRS["converted"] + conversion.suffix)
    conversion.report = convert(source, converted, passes, verify=True)
    result.stages[conversion.stage("convert + verify")] = time.perf_counter() - t

    console.rule(f"[bold]3/{stages} converted{what}[/]")
    _scan_and_eval(conversion.label("converted"), converted, eval_paths, cfg, tmp, result, train_paths, schemes)

    if cfg.train:
        from .export import export
        from .train.loop import train

        console.rule(f"[bold]4/{stages} train{what}[/] {cfg.recipe}, {recipe.steps} steps on {len(train_paths)} "
                     f"file{'s' * (len(train_paths) != 1)}")
        t = time.perf_counter()
        run_dir = tmp / conversion.label("train")
        trained = train(converted, train_paths, run_dir, recipe=recipe)
        result.stages[conversion.stage("train")] = time.perf_counter() - t
        conversion.training = _training_summary(run_dir, trained.step, result.stages[conversion.stage("train")])

        console.rule(f"[bold]5/{stages} export[/] and the trained model{what}")
        t = time.perf_counter()
        export(run_dir, tmp / (DIRS["trained"] + conversion.suffix))
        shutil.rmtree(run_dir / "checkpoints")  # exported; the optimizer states are 3× the model
        result.stages[conversion.stage("export")] = time.perf_counter() - t
        _scan_and_eval(conversion.label("trained"), tmp / (DIRS["trained"] + conversion.suffix), eval_paths, cfg,
                       tmp, result, train_paths, schemes)
    if cfg.control:
        _control(cfg, conversion, source, sinks_scan, train_paths, eval_paths, recipe, tmp, result, f"6/{stages}",
                 optional)


def _control(cfg: PipelineConfig, conversion: Conversion, source: Path, sinks_scan: Path | None,
             train_paths: list[Path], eval_paths: list[Path], recipe, tmp: Path, result: PipelineResult, stage: str,
             optional: list | None = None) -> None:
    """The same run without the norm modules: the conversion's other passes (the optional ones the chooser kept for
    it) on the source, the same recipe, budget and text, exported to model-control/ and evaluated beside the
    trained model."""
    from .export import export
    from .train.loop import train

    passes = conversion_passes(cfg, sinks_scan, train_paths, control=True, optional=optional)
    console.rule(f"[bold]{stage} control[/] {' + '.join(p.name for p in passes) or 'no pass'} (no norm modules), "
                 f"the same recipe and {recipe.steps} steps")
    t = time.perf_counter()
    model, verify = source, None
    if passes:  # with every other pass off, the control is the source itself, trained
        model = tmp / (DIRS["control-converted"] + conversion.suffix)
        verify = convert(source, model, passes, verify=True).verify
    run_dir = tmp / conversion.label("train-control")
    tic = time.perf_counter()
    trained = train(model, train_paths, run_dir, recipe=recipe)
    seconds = time.perf_counter() - tic  # the training alone, as the main run's figure
    export(run_dir, tmp / (DIRS["control"] + conversion.suffix))
    shutil.rmtree(run_dir / "checkpoints")
    result.stages[conversion.stage("control: convert + train + export")] = time.perf_counter() - t
    conversion.control = {"transforms": [p.name for p in passes], "verify": verify,
                          "training": _training_summary(run_dir, trained.step, seconds)}
    _scan_and_eval(conversion.label("control"), tmp / (DIRS["control"] + conversion.suffix), eval_paths, cfg, tmp,
                   result, train_paths, deploy_schemes(cfg, conversion.formats))


def _training_summary(run_dir: Path, steps: int, seconds: float) -> dict:
    from .train.rundir import RUN_JSON, read_metrics

    records = read_metrics(run_dir)
    speeds = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    evals = [r for r in records if "eval" in r]
    run = json.loads((run_dir / RUN_JSON).read_text())
    return {"steps": steps, "tokens": max((r.get("tokens", 0) for r in records), default=0),
            "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None, "seconds": seconds,
            "recipe": run["recipe"], "objectives": run["objectives"],
            "heldout_first": evals[0]["eval"] if evals else None, "heldout_last": evals[-1]["eval"] if evals else None}


def _applied(surgeon: dict) -> list:
    """The pass classes a converted config's surgeon block records, in the order they ran."""
    return [TRANSFORMS[name] for name in dict.fromkeys(surgeon.get("transforms", [])) if name in TRANSFORMS]


def _format_label(fmt: str) -> str:
    if fmt.startswith("deployed-"):
        return f"deployed {fmt.removeprefix('deployed-').upper()}"
    if fmt.endswith("-static"):
        return f"{fmt.removesuffix('-static').upper()} W4A4 static"
    return fmt.removesuffix("+sq").upper() + " W4A4" + (" +SQ" if fmt.endswith("+sq") else "")


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def _objectives_text(objectives: dict) -> str:
    parts = [f"LM ×{objectives['lm']:g}"] if objectives.get("lm") else []
    if objectives.get("distill"):
        parts.append(f"self-distillation ×{objectives['distill']:g}")
    if objectives.get("pressure"):
        parts.append(f"outlier pressure ×{objectives['pressure']:g} on {', '.join(objectives['pressure_on'])} "
                     f"(max/RMS above {objectives['pressure_threshold']:g})")
    if objectives.get("qat"):
        share = objectives.get("qat_fraction", 1.0)
        on = []
        if objectives.get("qat_lm"):
            on.append(f"LM ×{objectives['qat_lm']:g}")
        if objectives.get("qat_distill"):
            on.append(f"KL to its own full-precision prediction ×{objectives['qat_distill']:g}")
        formats = [objectives["qat"]] if isinstance(objectives["qat"], str) else objectives["qat"]
        parts.append(f"{' and '.join(f.upper() for f in formats)} W4A4 in the forward (straight-through"
                     + (", in turn)" if len(formats) > 1 else ")")
                     + (f" on {share:.0%} of the micro-batches" if share < 1 else "")
                     + (f", whose loss is {' + '.join(on) if on else 'nothing'}"
                        if objectives.get("qat_lm") is not None or objectives.get("qat_distill") else "")
                     + ("; the gates and λ1 learn from the quantized micro-batches only"
                        if objectives.get("new_learn_from") == "quantized" else ""))
    return ", ".join(parts)


def _conversion_text(conversion: Conversion) -> str:
    """What the conversion ran, its parameters and its verification, in a sentence."""
    report, surgeon = conversion.report, conversion.surgeon
    what = (f"For {' and '.join(f.upper() for f in conversion.formats)} (`{DIRS['converted'] + conversion.suffix}/`): "
            if conversion.suffix else "")
    return (what + f"converted with {', '.join(report.transforms)} ("
            + "; ".join(filter(None, (p.describe(surgeon[p.key], text="training") for p in _applied(surgeon))))
            + f"): +{report.params_after - report.params_before:,} parameters; verified max |Δlogit| "
              f"{conversion.verify['max_abs_diff']:.3g} over {conversion.verify['tokens']} tokens.")


def write_report(out: Path, cfg: PipelineConfig, result: PipelineResult) -> None:
    labels = list(result.scans)
    scans = [result.scans[label] for label in labels]
    text = result.text
    first = result.conversions[0].report
    lines = [
        f"# surgeon main job: {cfg.model}", "",
        f"Model `{cfg.model}` ({first.family}, {first.params_before:,} parameters), text `{cfg.data}`.", "",
    ]
    if len(result.conversions) > 1:
        lines += ["The passes the chooser kept for NVFP4 and for INT4 differ, so there is a conversion per format "
                  "(`--format each`), each evaluated in both.", ""]
    for conversion in result.conversions:
        lines += [_conversion_text(conversion), ""]
        tr = conversion.training
        if tr:
            surgeon = conversion.surgeon
            lines += [f"Trained {tr['steps']} steps ({tr['tokens']:,} tokens, median {tr['tokens_per_s_median']:.0f} "
                      f"tokens/s, {tr['seconds'] / 60:.1f} min) with recipe `{cfg.recipe}`: "
                      f"{_objectives_text(tr['objectives'])}; lr {tr['recipe']['lr']:g} (pretrained), "
                      f"{tr['recipe']['lr_new']:g} (gates, PreAffine)"
                      + (f", {tr['recipe'].get('lr_attention_gate') or tr['recipe']['lr_new']:g} (attention gates)"
                         if "gated_attention" in surgeon else "")
                      + ("; AdamW stepping the source's weights, unsmoothed and unrotated (optimizer_coordinates: "
                         "source)" if tr["recipe"].get("optimizer_coordinates") == "source" else "")
                      + f". Exported to `{DIRS['trained'] + conversion.suffix}/`.", ""]
        if conversion.control:
            tr = conversion.control["training"]
            lines += [f"Control: the source converted with {' + '.join(conversion.control['transforms']) or 'no pass'}"
                      f", trained the same {tr['steps']} steps ({tr['tokens']:,} tokens, {tr['seconds'] / 60:.1f} min) "
                      f"with the same recipe; exported to `{DIRS['control'] + conversion.suffix}/`.", ""]
    if text.get("overlap"):
        lines += ["**Note:** the text has too few files to hold some out, so evaluation windows come from the "
                  "training text.", ""]
    elif text:
        lines += [f"Evaluation text: {', '.join(text['eval'])} (never trained on); training text: the other "
                  f"{len(text['train'])} files.", ""]
    head = "| | " + " | ".join(labels) + " |"
    rule = "|---|" + "---:|" * len(labels)
    lines += ["## Outliers", "", f"Scan: {scans[0].tokens:,} tokens in windows of {cfg.seq_len} (+BOS).", "",
              head, rule]
    rows = [
        ("residual peak max \\|h\\|", lambda r: _fmt(r.peak["value"])),
        ("peak dimension / position", lambda r: f"{r.peak['dim']} / {r.peak['position']}"),
        ("sink dimensions (mean \\|h\\| ÷ median)",
         lambda r: ", ".join(f"{s.dim} ({s.ratio_to_median:.0f}×)" for s in r.sinks[:4]) or "none"),
        ("attention on first token (mean over layers)", lambda r: f"{_attention(r):.2f}"),
        ("first-token massive activation (largest mean \\|h\\| at position 0)", _first_token_peak),
    ]
    if any(r.gates for r in scans):
        rows.append(("GatedNorm gates: mean \\|g − ½\\|, corr(g, \\|y\\|) (mean over norms)", _gate_figures))
    if any(r.attention_gates for r in scans):
        rows.append(("attention gates: mean \\|g − ½\\|, g min … max (means over layers)",
                     _attention_gate_figures))
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(r) for r in scans) + " |")
    values = {}
    for conversion in result.conversions:
        if not (conversion.training and conversion.training.get("heldout_last")):
            continue
        # the training measures the converted model (step 0) and the trained one; the source has the converted
        # model's linear inputs only when no pass changed them (smooth and hadamard do)
        figure = "{0[linear_input_max_rms]:.1f} ({0[linear_input_max_rms_worst]:.1f})".format
        heldout = conversion.training["heldout_first"]
        changed = any(p.changes_linear_inputs for p in _applied(conversion.surgeon))
        if not changed:
            values["source"] = figure(heldout)
        values[conversion.label("converted")] = figure(heldout)
        values[conversion.label("trained")] = figure(conversion.training["heldout_last"])
        if conversion.control and conversion.control["training"].get("heldout_last"):
            values[conversion.label("control")] = figure(conversion.control["training"]["heldout_last"])
    if values:
        lines.append("| linear-input max/RMS, mean (worst) — training's held-out | "
                     + " | ".join(values.get(label, "–") for label in labels) + " |")
    if result.choices:
        from .choose import SIGNIFICANCE, markdown

        lines += ["", "## Passes chosen by measurement", ""]
        for target, choice in result.choices.items():
            users = [c for c in result.conversions if c.choice is choice]
            if len(result.choices) > 1:
                lines += [f"### For {' and '.join(f.upper() for f in choice.formats)}", ""]
            lines += [f"Each optional pass was converted and measured on {choice.tokens:,} tokens of the training "
                      f"text (not the evaluation text): the KL divergence of the fake-quantized model's next-token "
                      f"distribution from the fp32 model's, in {' and '.join(f.upper() for f in choice.shown)} W4A4; "
                      f"a pass is kept only where that is lower in "
                      f"{' and '.join(f.upper() for f in choice.formats)}, window by window by more than "
                      f"{SIGNIFICANCE:g} standard errors. Kept: " + (", ".join(choice.labels()) or "none")
                      + (f" (`{DIRS['converted'] + users[0].suffix}/`)" if users and users[0].suffix else "")
                      + ".", "", *markdown(choice), ""]
        lines.pop()  # the blank after the last table: the next section starts with one
    columns = list(dict.fromkeys(f for ev in result.evals.values() for f in ev.perplexity if f != "none"))
    smoothed = any(f.endswith("+sq") for f in columns)
    lines += ["", "## Perplexity and W4A4", "",
              f"{cfg.eval_windows} windows × {cfg.seq_len} tokens from token {cfg.eval_skip_tokens}; every linear "
              "layer's weights and inputs fake-quantized (LM head and gate projections excluded); in brackets the "
              "ratio to the model's own fp32 perplexity."
              + (f" \"+SQ\": after a SmoothQuant pre-pass (α = 0.5) calibrated on the first {cfg.eval_skip_tokens} "
                 "tokens, the same for every model." if smoothed else ""), "",
              "| model | fp32 | " + " | ".join(_format_label(f) for f in columns) + " |",
              "|---|---:|" + "---:|" * len(columns)]
    for label, ev in result.evals.items():
        lines.append(f"| {label} | {ev.perplexity['none']:.2f} | "
                     + " | ".join(f"{ev.perplexity[f]:,.1f} (×{ev.ratio(f):.2f})" if f in ev.perplexity else "–"
                                  for f in columns) + " |")
    if result.deployed:
        lines += ["", *_deployed_section(result)]
    for scheme, why in result.undeployable.items():
        lines += ["", f"No `{scheme}` checkpoints (deploy auto): {why}."]
    src = result.evals["source"].perplexity
    for conversion in result.conversions:
        if conversion.label("trained") not in result.evals:
            continue
        out_ev = result.evals[conversion.label("trained")].perplexity
        lines += ["", f"{conversion.label('trained').capitalize()} ÷ source perplexity: " + ", ".join(
            f"{'fp32' if f == 'none' else _format_label(f)} {out_ev[f] / src[f]:.2f}×"
            for f in ("none", *columns) if f in out_ev and f in src) + "."]
        if conversion.label("control") in result.evals:
            lines += _control_section(result, conversion, columns)
    for conversion in result.conversions:
        surgeon = conversion.surgeon
        lines += ["", (f"The {conversion.label('converted')} model" if conversion.suffix else "The converted model")
                  + " computes the same function as the source: "
                  + "".join(p.explain(surgeon) for p in _applied(surgeon))]  # each pass says why it keeps the function
    lines[-1] += ("What is left of the outliers in the linear inputs is what the continued pretraining has to train "
                  "away.")
    lines += ["", "## Plots", ""]
    for label in labels:
        for png in sorted((out / f"scan-{label}").glob("*.png")):
            lines.append(f"![{label} {png.stem}](scan-{label}/{png.name})")
    for conversion in result.conversions:
        for run_dir, what in (("train", "training"), ("train-control", "control training")):
            run_dir = conversion.label(run_dir)
            for png in sorted((out / run_dir).glob("*.png")) if (out / run_dir).is_dir() else ():
                lines.append(f"![{what}{conversion.suffix} {png.stem}]({run_dir}/{png.name})")
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result.stages.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({
        "config": asdict(cfg), "stages": result.stages, "text": result.text,
        "conversions": [{"label": c.label("converted"), "formats": list(c.formats), "verify": c.verify,
                         "transforms": c.report.transforms, "training": c.training, "control": c.control,
                         "kept": c.choice.labels() if c.choice is not None else None} for c in result.conversions],
        "verify": result.verify, "training": result.training, "control": result.control,  # the first conversion's
        "perplexity": {k: v.perplexity for k, v in result.evals.items()},
        "peak": {k: v.peak for k, v in result.scans.items()},
        "choice": {t: c.as_dict() for t, c in result.choices.items()} or None,
        "deployed": result.deployed, "undeployable": result.undeployable,
    }, indent=2) + "\n")


def _deployed_section(result: PipelineResult) -> list[str]:
    """What the deployed checkpoints compute beside the fake-quant estimates, and the difference, per model and
    scheme."""
    written = [(label, scheme, d) for label, by in result.deployed.items() for scheme, d in by.items()]
    tokens = written[0][2]["calibration_tokens"]
    schemes = list(dict.fromkeys(scheme for _, scheme, _ in written))
    lines = [f"\"deployed <scheme>\": each model written as a compressed-tensors checkpoint in "
             f"{' and '.join(f'`{s}`' for s in schemes)} (`deployed-<model>/`, surgeon quantize: NVFP4's input global "
             f"scales calibrated on {tokens:,} tokens of the training text) and evaluated as that format computes it."]
    for scheme in schemes:
        key = f"deployed-{scheme}"
        parts = []
        for label, s, d in written:
            if s != scheme:
                continue
            ppl = result.evals[label].perplexity
            part = (f"{label} ×{ppl[key] / ppl['none']:.3f} ({d['bytes'] / 1e6:,.0f} MB of weights, the model's "
                    f"{d['bytes_source'] / 1e6:,.0f} MB)")
            if "nvfp4-static" in ppl and scheme == "nvfp4":
                part += (f": {100 * (ppl[key] / ppl['nvfp4-static'] - 1):+.2f}% from the static-scale estimate, "
                         f"{100 * (ppl[key] / ppl['nvfp4'] - 1):+.2f}% from the per-token one")
            parts.append(part)
        lines.append(f"Deployed {scheme.upper()} ratio to fp32: " + "; ".join(parts) + ".")
    return lines


def _control_section(result: PipelineResult, conversion: Conversion, columns: list[str]) -> list[str]:
    """What the norm modules bought: the trained model beside the control (the same passes without the modules,
    the same recipe, budget and text), with the ratio; below 1 the modules helped."""
    trained_label, control_label = conversion.label("trained"), conversion.label("control")
    trained, control = result.evals[trained_label].perplexity, result.evals[control_label].perplexity
    passes = conversion.control["transforms"]
    columns = [f for f in columns if f in trained and f in control]
    which = f" ({conversion.suffix[1:].upper()})" if conversion.suffix else ""
    lines = ["", f"## What the norm modules bought{which}", "",
             f"The control is the source converted with {' + '.join(passes) if passes else 'no pass'} (the main "
             f"run's passes without the norm modules), trained with the same recipe, budget and text, and exported "
             f"to `{DIRS['control'] + conversion.suffix}/`.", "",
             "| | fp32 | " + " | ".join(_format_label(f) for f in columns) + " | residual peak |",
             "|---|---:|" + "---:|" * (len(columns) + 1)]
    peaks = {k: result.scans[k].peak["value"] for k in (trained_label, control_label)}
    for label, key, ppl in (("trained (norm modules)", trained_label, trained),
                            ("control (without)", control_label, control)):
        lines.append(f"| {label} | {ppl['none']:.2f} | " + " | ".join(f"{ppl[f]:,.1f}" for f in columns)
                     + f" | {_fmt(peaks[key])} |")
    lines.append("| trained ÷ control | " + " | ".join(f"{trained[f] / control[f]:.3f}" for f in ("none", *columns))
                 + f" | {peaks[trained_label] / peaks[control_label]:.3f} |")
    return lines


def _first_token_peak(report: ScanReport) -> str:
    rows = report.first_token_mean_abs[1:]  # the decoder layers' outputs (point 0 is the embedding)
    return _fmt(max(max(row) for row in rows)) if rows else "–"


def _attention_gate_figures(report: ScanReport) -> str:
    mean = (report.attention_gates or {}).get("mean")
    return f"{mean['mean_abs_dev']:.4f}, {mean['g_min']:.2f} … {mean['g_max']:.2f}" if mean else "–"


def _gate_figures(report: ScanReport) -> str:
    """How far the gates moved from ½ and whether they suppress large |y| (negative correlation); – without gates."""
    mean = (report.gates or {}).get("mean")
    if not mean:
        return "–"
    corr = mean["corr_abs_y"]
    return f"{mean['mean_abs_dev']:.4f}, {'–' if corr is None else f'{corr:+.2f}'}"


def _attention(report: ScanReport) -> float:
    values = [layer.attention_sink for layer in report.layers if layer.attention_sink is not None]
    return sum(values) / len(values) if values else float("nan")
