"""Perplexity, unquantized and with fake-quantized W4A4 (surgeon/quant.py), for several models side by side.

Perplexity = exp(mean next-token NLL over every predicted token of the evaluation windows). Windows are the
same for every model and format (same tokenizer assumed: a converted model keeps its source's), so the ratios
to each model's own unquantized perplexity compare like with like.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .quant import FORMATS, fake_quantized


@dataclass
class ModelEval:
    model: str
    tokens: int
    perplexity: dict[str, float] = field(default_factory=dict)  # format -> ppl
    layers_quantized: dict[str, int] = field(default_factory=dict)

    def ratio(self, fmt: str) -> float | None:
        """To the model's own unquantized perplexity; None for a deployed checkpoint, which has none (its weights
        are already 4-bit)."""
        if "none" not in self.perplexity:
            return None
        return self.perplexity[fmt] / self.perplexity["none"]


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor]) -> tuple[float, int]:
    """exp of the mean NLL of every next-token prediction in `windows` (batches of token ids)."""
    total_nll, total_tokens = 0.0, 0
    for ids in windows:
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens), total_tokens


def evaluate_model(model, windows: list[torch.Tensor], formats: tuple[str, ...] = FORMATS, *, name: str = "",
                   skip: tuple[str, ...] | None = None, smooth: dict[str, torch.Tensor] | None = None,
                   advance=lambda n=1: None) -> ModelEval:
    """Perplexity unquantized and in each format; with `smooth` (surgeon.quant.smoothquant_scales) every quantized
    format is evaluated a second time after the SmoothQuant pre-pass, as "<format>+sq"."""
    result = ModelEval(model=name, tokens=0)
    kwargs = {} if skip is None else {"skip": skip}
    runs = [(fmt, None) for fmt in dict.fromkeys(("none", *formats))]
    if smooth is not None:
        runs += [(f"{fmt}+sq", fmt) for fmt in dict.fromkeys(formats) if fmt != "none"]
    for key, fmt in runs:
        with fake_quantized(model, fmt or key, smooth=smooth if fmt else None, **kwargs) as n:
            ppl, tokens = perplexity(model, windows)
        result.perplexity[key] = ppl
        result.layers_quantized[key] = n
        result.tokens = tokens
        advance(1)
    return result


def evaluate_deployed(model, windows: list[torch.Tensor], scheme: str, *, name: str = "",
                      advance=lambda n=1: None) -> ModelEval:
    """Perplexity of a loaded compressed-tensors checkpoint (surgeon.deploy.load_compressed) as its format computes
    it, under the key "deployed <scheme>"."""
    result = ModelEval(model=name, tokens=0)
    ppl, result.tokens = perplexity(model, windows)
    result.perplexity[f"deployed {scheme}"] = ppl
    result.layers_quantized[f"deployed {scheme}"] = sum(
        1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
    advance(1)
    return result


def save(results: list[ModelEval], path: Path) -> Path:
    data = [{**asdict(r), "ratio": {f: r.ratio(f) for f in r.perplexity if r.ratio(f) is not None}} for r in results]
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(results: list[ModelEval], title: str = "perplexity (ratio to the model's own unquantized)"):
    from rich.table import Table

    formats = list(dict.fromkeys(f for r in results for f in r.perplexity))
    t = Table(title=title)
    t.add_column("model")
    for fmt in formats:
        label = fmt.removesuffix("+sq").upper() + " W4A4" + (" +SmoothQuant" if fmt.endswith("+sq") else "")
        t.add_column("fp" if fmt == "none" else fmt if fmt.startswith("deployed") else label, justify="right")
    for r in results:
        t.add_row(r.model, *[_cell(r, f) for f in formats])
    return t


def _cell(r: ModelEval, fmt: str) -> str:
    if fmt not in r.perplexity:
        return "—"
    if fmt == "none":
        return f"{r.perplexity['none']:.2f}"
    ratio = r.ratio(fmt)
    return f"{r.perplexity[fmt]:,.1f}" + ("" if ratio is None else f" (×{ratio:.2f})")
