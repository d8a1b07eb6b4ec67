"""The export's figures and model card: the run's before/after measurements (metrics.jsonl) as table rows, the
caller's extra `figures`, and the README.md an exported model directory carries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from . import __version__
from .errors import SurgeonError, one_line
from .io import final_path

if TYPE_CHECKING:
    from .export import ExportReport

FIGURE_KEYS = (("ppl", "perplexity"), ("loss", "held-out loss"), ("residual_peak", "residual peak, max abs h"),
               ("linear_input_max_rms", "linear input max/RMS"),
               ("linear_input_max_rms_worst", "linear input max/RMS, worst layer"))


def eval_figures(record: dict | None) -> dict | None:
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


def figure_rows(before: dict | None, after: dict | None) -> list[tuple[str, object, object]]:
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


def normalize_figures(figures: Mapping | None) -> dict | None:
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


def fmt(value) -> str:
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


def export_card(report: ExportReport, config: dict) -> str:
    """README.md of an exported model directory: provenance, training, figures, and how to load it; `config` is the
    written config (its surgeon block holds the training)."""
    block = config["surgeon"]
    training = block["training"]
    history = block.get("history") or [{}]
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
        f"| tokens | {fmt(report.tokens)} |",
        f"| world size | {fmt(report.world_size)} |",
        f"| learning rate (pretrained / new) | {fmt(recipe.get('lr'))} / {fmt(recipe.get('lr_new'))} |",
        f"| batch × accumulation × seq_len | {fmt(recipe.get('batch_size'))} × {fmt(recipe.get('grad_accum'))} × "
        f"{fmt(recipe.get('seq_len'))} |",
        f"| objectives | {', '.join(f'{k}={v}' for k, v in objectives.items()) or '—'} |",
    ]
    if report.glu_alpha is not None:
        lines.append(f"| SwiGLU → GLU, trained α | {report.glu_alpha:g} |")
    lines += [f"| dtype | {report.dtype} |", f"| parameters | {report.parameters:,} |"]
    rows = figure_rows(report.before, report.after)
    if rows:
        b_step = (report.before or {}).get("step")
        a_step = (report.after or {}).get("step")
        lines += ["", "## Before and after training", "",
                  f"Held-out measurement of the run (metrics.jsonl): step {fmt(b_step)} vs step {fmt(a_step)}.", "",
                  f"| | before (step {fmt(b_step)}) | after (step {fmt(a_step)}) |", "|---|---:|---:|"]
        lines += [f"| {fmt(label)} | {fmt(b)} | {fmt(a)} |" for label, b, a in rows]
    if report.figures:
        columns = list(dict.fromkeys(k for row in report.figures.values() for k in row))
        lines += ["", "## Further figures", "", "| | " + " | ".join(map(fmt, columns)) + " |",
                  "|---|" + "---:|" * len(columns)]
        lines += [f"| {fmt(label)} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |"
                  for label, row in report.figures.items()]
    if report.stock:
        lines += ["", f"A stock `{config['model_type']}` model: load with "
                  "`AutoModelForCausalLM.from_pretrained(path)`.", ""]
    else:
        lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`, or without "
                  "remote code after `import surgeon.modeling`.", ""]
    return "\n".join(lines)
