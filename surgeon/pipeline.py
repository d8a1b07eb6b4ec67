"""The main job, stage by stage: scan the source → convert (GatedNorm, PreAffine, and the scanned residual
sinks absorbed into PreAffine; verified) → scan the result → evaluate both
(perplexity, NVFP4 and INT4 W4A4) → a markdown report with the tables and plots.

Every stage is a library call that also runs alone from the CLI (scan, convert, eval); this module only
sequences them and writes the report. The run directory is staged and renamed into place at the end, like
every output of surgeon. Training and export join the flow as they land (issues 6 and 7).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import convert
from .evaluate import ModelEval, evaluate_model
from .io import staged_directory
from .progress import console, progress_bar
from .scan import ScanReport, scan
from .sources import iter_token_windows, load_model, resolve_model, resolve_text
from .transforms import AbsorbSinks, GatedNorm, PreAffine

EVAL_FORMATS = ("nvfp4", "int4")


@dataclass
class PipelineConfig:
    model: str = "default"
    data: str = "default"
    rank: int = 16
    scan_tokens: int = 4096
    seq_len: int = 256
    eval_windows: int = 8
    eval_skip_tokens: int = 1000
    batch_size: int = 4


@dataclass
class PipelineResult:
    out: Path
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    scans: dict[str, ScanReport] = field(default_factory=dict)
    evals: dict[str, ModelEval] = field(default_factory=dict)
    verify: dict | None = None


def _scan_and_eval(label: str, model_dir: Path, paths: list[Path], cfg: PipelineConfig, out: Path,
                   result: PipelineResult) -> None:
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
    console.print(f"[bold]eval[/] {label}: fp32, {', '.join(f.upper() for f in EVAL_FORMATS)} W4A4 on "
                  f"{cfg.eval_windows} × {cfg.seq_len} tokens")
    with progress_bar(f"eval {label}", 1 + len(EVAL_FORMATS)) as advance:
        result.evals[label] = evaluate_model(model, eval_windows, EVAL_FORMATS, name=label, advance=advance)
    result.stages[f"eval {label}"] = time.perf_counter() - t


def run(cfg: PipelineConfig, out: str | Path, *, force: bool = False) -> PipelineResult:
    out = Path(out)
    torch.manual_seed(0)
    paths = resolve_text(cfg.data)
    source = resolve_model(cfg.model)
    with staged_directory(out, force=force, sources=(source,)) as tmp:
        result = PipelineResult(out=out)
        console.rule(f"[bold]1/3 source[/] {cfg.model}")
        _scan_and_eval("source", source, paths, cfg, tmp, result)

        console.rule("[bold]2/3 convert[/] gated-norm + pre-affine + absorb-sinks, verified")
        t = time.perf_counter()
        passes = [GatedNorm(rank=cfg.rank), PreAffine()]
        if result.scans["source"].sinks:
            passes.append(AbsorbSinks(scan=tmp / "scan-source" / "scan.json"))
        report = convert(source, tmp / "model", passes, verify=True)
        result.verify = report.verify
        result.stages["convert + verify"] = time.perf_counter() - t

        console.rule("[bold]3/3 converted[/]")
        _scan_and_eval("converted", tmp / "model", paths, cfg, tmp, result)
        write_report(tmp, cfg, result, report)
    console.print(f"[green]report:[/] {out / 'report.md'}")
    return result


def _absorbed(conversion) -> str:
    block = json.loads((conversion.output / "config.json").read_text()).get("surgeon", {})
    sinks = (block.get("absorb_sinks") or {}).get("sinks") or []
    if not sinks:
        return ""
    untied = " and the LM head untied from the embedding" if block["absorb_sinks"].get("untied_lm_head") else ""
    return "; absorbed " + ", ".join(f"dim {s['dim']} ÷{s['scale']:g}" for s in sinks) + untied


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"


def write_report(out: Path, cfg: PipelineConfig, result: PipelineResult, conversion) -> None:
    src, conv = result.scans["source"], result.scans["converted"]
    lines = [
        f"# surgeon main job: {cfg.model}", "",
        f"Model `{cfg.model}` ({conversion.family}, {conversion.params_before:,} parameters), text `{cfg.data}`. "
        f"Converted with {', '.join(conversion.transforms)} (rank {cfg.rank}{_absorbed(conversion)}): "
        f"+{conversion.params_after - conversion.params_before:,} parameters; verified max |Δlogit| "
        f"{result.verify['max_abs_diff']:.3g} over {result.verify['tokens']} tokens.", "",
        "## Outliers", "",
        f"Scan: {src.tokens:,} tokens in windows of {cfg.seq_len} (+BOS).", "",
        "| | source | converted |", "|---|---:|---:|",
    ]
    rows = [
        ("residual peak max \\|h\\|", lambda r: _fmt(r.peak["value"])),
        ("peak dimension / position", lambda r: f"{r.peak['dim']} / {r.peak['position']}"),
        ("sink dimensions (mean \\|h\\| ÷ median)",
         lambda r: ", ".join(f"{s.dim} ({s.ratio_to_median:.0f}×)" for s in r.sinks[:4]) or "none"),
        ("attention on first token (mean over layers)", lambda r: f"{_attention(r):.2f}"),
    ]
    for label, get in rows:
        lines.append(f"| {label} | {get(src)} | {get(conv)} |")
    lines += ["", "## Perplexity and W4A4", "",
              f"{cfg.eval_windows} windows × {cfg.seq_len} tokens from token {cfg.eval_skip_tokens}; every linear "
              "layer's weights and inputs fake-quantized (LM head and gate projections excluded).", "",
              "| model | fp32 | " + " | ".join(f"{f.upper()} W4A4" for f in EVAL_FORMATS) + " |",
              "|---|---:|" + "---:|" * len(EVAL_FORMATS)]
    for label, ev in result.evals.items():
        lines.append(f"| {label} | {ev.perplexity['none']:.2f} | "
                     + " | ".join(f"{ev.perplexity[f]:,.1f} (×{ev.ratio(f):.2f})" for f in EVAL_FORMATS) + " |")
    lines += ["", "The converted model computes the same function as the source: the gates are identity-initialized, "
              "and each sink dimension is divided by a power of two in every residual writer (embedding, o_proj and "
              "down_proj rows) and multiplied back in every reading norm's PreAffine. The residual stream shrinks "
              "while every norm output, and so every linear layer's input, stays bit-identical: activation "
              "quantization sees the same values. INT4's per-group weight scales shrink with the rescaled rows, so "
              "INT4 is unchanged too; NVFP4's FP8 block scales are relative to one scale per tensor, so the "
              "shrunken rows lose a little precision. The outliers in the linear inputs, which W4A4 suffers from, "
              "are what continued pretraining (issue 6) has to train away.", "", "## Plots", ""]
    for label in ("source", "converted"):
        for png in sorted((out / f"scan-{label}").glob("*.png")):
            lines.append(f"![{label} {png.stem}](scan-{label}/{png.name})")
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result.stages.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({
        "config": cfg.__dict__, "verify": result.verify, "stages": result.stages,
        "perplexity": {k: v.perplexity for k, v in result.evals.items()},
        "peak": {k: v.peak for k, v in result.scans.items()},
    }, indent=2) + "\n")


def _attention(report: ScanReport) -> float:
    values = [layer.attention_sink for layer in report.layers if layer.attention_sink is not None]
    return sum(values) / len(values) if values else float("nan")
