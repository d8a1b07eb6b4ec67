"""Passes chosen by measurement: keep an optional pass (smooth at an α, hadamard on some linear inputs) only where it
lowers the W4A4 error of the format(s) the user targets, on the model at hand.

Why: a pass tuned on one model can hurt another. On SmolLM2 smooth (α 0.8) + hadamard take INT4 W4A4 perplexity
from 6,757 to 116, but on Qwen2.5-0.5B the same passes make NVFP4 — the paper's format — worse than the source's
(issue 16). Every optional pass preserves the function, so fp32 is no criterion; the quantized model is.

How, greedily, one pass at a time in convert's order (smooth must come before hadamard):
  1. the source and the base (the passes that are not optional: pre-affine, absorb-sinks, ...) are measured — the
     source only as the reference a user compares against, the base as the current choice;
  2. each smooth α is tried on top of the base;
  3. hadamard by forward selection over its groups: every group together and each alone on top of the winner so
     far; unless "all" won, each remaining group is added to the kept ones in turn while an addition still lowers
     the error (a group that hurts one format need not take the others' gain with it);
  4. when hadamard was kept, smooth again at each α not kept before, beneath the kept rotation (smooth and
     hadamard interact: an α that hurt alone can help once the rotation spreads the scaled channels).
A candidate is really converted (surgeon.convert, the same passes and calibration the final conversion uses),
loaded, and its fake-quantized output (surgeon.quant) measured in every target format on windows of the
calibration text that the smooth calibration did not read — never on the evaluation text — as its KL divergence
from the fp32 model (every candidate on the same windows, so their differences are paired). A candidate is kept
only if it is lower than the current choice in *every* target format (so with `both`, no format may get worse);
among several, the lowest geometric mean wins. The table of every measurement is printed and returned.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SurgeonError

TARGETS = {"nvfp4": ("nvfp4",), "int4": ("int4",), "both": ("nvfp4", "int4")}
SMOOTH_ALPHAS = (0.5, 0.65, 0.8)
MEASURE_WINDOWS = 8  # windows of seq_len tokens per candidate, the same for every candidate; at 4 the KL
# differences between hadamard groups on Qwen2.5-0.5B (~5%) were as large as their change on other text


def target_formats(target: str) -> tuple[str, ...]:
    try:
        return TARGETS[target]
    except KeyError:
        raise SurgeonError(f"unknown --format {target!r}: use one of {', '.join(TARGETS)}") from None


@dataclass
class Trial:
    stage: str  # "source", "base", "smooth", "hadamard", "smooth again"
    label: str  # e.g. "smooth α 0.65", "hadamard mlp_out"
    passes: list  # the whole pass list converted for this measurement
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # format -> {"kl", "perplexity"}
    verdict: str = ""  # "source", "base", "kept", "dropped" (a better one was kept), "worse", "replaced"

    @property
    def error(self) -> dict[str, float]:
        """What the choice is made on: per format, the quantized model's KL from the fp32 model."""
        return {f: v["kl"] for f, v in self.figures.items()}

    def score(self) -> float:
        """Geometric mean of the target formats' errors (decides between candidates that all lower it)."""
        return math.exp(sum(math.log(max(e, 1e-30)) for e in self.error.values()) / len(self.error))


@dataclass
class Choice:
    formats: tuple[str, ...]
    passes: list  # the optional passes kept, in order
    trials: list[Trial]
    tokens: int  # measured tokens per candidate
    overlaps_calibration: bool = False  # the text was too short to measure past what smooth calibrated on

    def labels(self) -> list[str]:
        """The passes kept, as the table names them."""
        return [pass_label(p) for p in self.passes]

    def as_dict(self) -> dict:
        return {"formats": list(self.formats), "tokens": self.tokens, "kept": self.labels(),
                "overlaps_calibration": self.overlaps_calibration,
                "trials": [{"stage": t.stage, "label": t.label, "figures": t.figures, "verdict": t.verdict}
                           for t in self.trials]}


def lowers(candidate: dict[str, float], current: dict[str, float]) -> bool:
    """Whether the `candidate`'s error is lower than the `current` one's in every target format (the rule a kept
    pass has to pass)."""
    return all(candidate[f] < current[f] for f in current)


def smooth_options(calibration, *, seq_len: int, alphas, smooth_tokens: int | None = None) -> list[tuple[str, object]]:
    """[(label, Smooth pass), ...] at each α, calibrated on `calibration`."""
    from .transforms import Smooth

    kwargs = {} if smooth_tokens is None else {"tokens": smooth_tokens}
    return [(f"smooth α {a:g}", Smooth(data=calibration, alpha=a, seq_len=seq_len, **kwargs)) for a in alphas]


def pass_label(p) -> str:
    return f"smooth α {p.alpha:g}" if p.name == "smooth" else hadamard_label(p.groups)


def hadamard_label(groups) -> str:
    from .transforms.hadamard import GROUPS

    return "hadamard all" if tuple(groups) == GROUPS else "hadamard " + " + ".join(groups)


def choose(source: Path, base: list, calibration: list[Path], *, target: str = "both", seq_len: int = 256,
           batch_size: int = 4, alphas=SMOOTH_ALPHAS, hadamard: bool = True, smooth_tokens: int | None = None,
           windows: int = MEASURE_WINDOWS, work_dir: Path | None = None, show: bool = True) -> Choice:
    """Measure the source and `base`, then each stage's candidates on top of the choice so far (see the module
    docstring), and return the optional passes kept with every measurement. `calibration`: the text smooth
    calibrates on and the candidates are measured on (after the tokens smooth reads)."""
    from .sources import iter_token_windows, load_model
    from .transforms import Hadamard, Smooth
    from .transforms.hadamard import GROUPS

    formats = target_formats(target)
    skip = smooth_tokens if smooth_tokens is not None else Smooth.tokens  # measure on text smooth did not read
    temp = Path(tempfile.mkdtemp(prefix="surgeon-choose-", dir=work_dir))
    try:
        _, tokenizer = load_model(source)
        try:
            ids = list(iter_token_windows(calibration, tokenizer, seq_len, seq_len * windows, batch_size,
                                          skip_tokens=skip))
        except SurgeonError:  # a text shorter than smooth's calibration: measure on what there is
            skip = 0
            ids = list(iter_token_windows(calibration, tokenizer, seq_len, seq_len * windows, batch_size))
        tokens = sum(int(b[:, 1:].numel()) for b in ids)
        trials: list[Trial] = []
        reference: list = []

        def measure(stage: str, label: str, passes: list) -> Trial:
            trial = Trial(stage, label, list(passes))
            trial.figures = _measure(source, passes, ids, formats, temp / f"candidate-{len(trials)}", label, show,
                                     reference)
            trials.append(trial)
            return trial

        if base:
            measure("source", "the source, unconverted", []).verdict = "source"
        current = measure("base", "base: " + (" + ".join(p.name for p in base) or "the source"), base)
        current.verdict = "base"

        def pick(tried: list[Trial]) -> Trial | None:
            """Keep the lowest of the candidates that lower every format's error; mark the rest."""
            nonlocal current
            better = [t for t in tried if lowers(t.error, current.error)]
            for t in tried:
                t.verdict = "dropped" if t in better else "worse"
            if not better:
                return None
            current = min(better, key=Trial.score)
            current.verdict = "kept"
            return current

        smooth = None  # the kept smooth pass
        smooths = smooth_options(calibration, seq_len=seq_len, alphas=alphas, smooth_tokens=smooth_tokens)
        if smooths:
            kept = pick([measure("smooth", label, [*base, p]) for label, p in smooths])
            smooth = kept.passes[-1] if kept else None
        rotated: tuple[str, ...] = ()  # the kept hadamard groups
        if hadamard:
            below = [*base, *([smooth] if smooth else [])]
            options = [GROUPS] + [(g,) for g in GROUPS]
            while options:
                kept = pick([measure("hadamard", hadamard_label(o), [*below, Hadamard(groups=o)]) for o in options])
                if kept is None:
                    break
                rotated = kept.passes[-1].groups
                options = [tuple(h for h in GROUPS if h in rotated or h == g) for g in GROUPS if g not in rotated]
                if len(options) == 1:  # adding the last group is "all", measured in the first round
                    break
        if rotated and smooths:
            again = [(label, p) for label, p in smooths if smooth is None or p.alpha != smooth.alpha]
            kept = pick([measure("smooth again", f"{label} beneath {hadamard_label(rotated)}",
                                 [*base, p, Hadamard(groups=rotated)]) for label, p in again])
            if kept:
                for t in trials:  # the smooth kept alone, if any, is replaced by the one beneath the rotation
                    if t.stage == "smooth" and t.verdict == "kept":
                        t.verdict = "replaced"
                smooth = kept.passes[-2]
        chosen = [*([smooth] if smooth else []), *([Hadamard(groups=rotated)] if rotated else [])]
        choice = Choice(formats, chosen, trials, tokens, overlaps_calibration=skip == 0 and bool(alphas))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    if show:
        from .progress import console

        console.print(table(choice))
    return choice


def _measure(source: Path, passes: list, ids, formats, out: Path, label: str, show: bool,
             reference: list) -> dict[str, dict[str, float]]:
    """Per format, the KL divergence of `source` converted with `passes` (the source itself when there are none),
    fake-quantized, from the fp32 model's next-token distribution (nats per token), and its perplexity.
    `reference`: the fp32 log-probabilities per batch, filled by the first call (every pass keeps the function, so
    one reference serves every candidate)."""
    from .convert import convert
    from .progress import console, progress_bar
    from .quant import fake_quantized
    from .sources import load_model

    if show:
        console.print(f"[bold]choose[/] {label}")
    model_dir = source
    if passes:
        convert(source, out, passes, show_progress=show)
        model_dir = out
    model, _ = load_model(model_dir)
    figures = {}
    with torch.no_grad(), progress_bar(f"choose: {label}", len(formats) + (not reference), enabled=show) as advance:
        if not reference:
            reference.extend(torch.log_softmax(model(input_ids=b).logits[:, :-1].float(), -1) for b in ids)
            advance(1)
        for fmt in formats:
            kl = nll = 0.0
            count = 0
            with fake_quantized(model, fmt):
                for batch, ref in zip(ids, reference):
                    logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
                    kl += float((ref.exp() * (ref - logp)).sum())
                    nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
                    count += batch[:, 1:].numel()
            figures[fmt] = {"kl": kl / count, "perplexity": math.exp(nll / count)}
            advance(1)
    del model
    if passes:
        shutil.rmtree(out, ignore_errors=True)
    return figures


def table(choice: Choice):
    """The rich table the choice was made from: every candidate, its perplexity per target format, the verdict."""
    from rich.table import Table

    t = Table(title=f"passes chosen by W4A4 error on {choice.tokens:,} calibration tokens: KL from fp32 "
                    f"(nats/token; kept only if lower in {' and '.join(f.upper() for f in choice.formats)}), "
                    "perplexity beside it" + (" — the text is too short to measure past smooth's calibration "
                                              "tokens" if choice.overlaps_calibration else ""))
    t.add_column("stage")
    t.add_column("candidate")
    for f in choice.formats:
        t.add_column(f"{f.upper()} KL", justify="right")
        t.add_column(f"{f.upper()} ppl", justify="right")
    t.add_column("verdict")
    style = {"kept": "[green]kept[/]", "worse": "[red]not lower[/]", "dropped": "lower, not the lowest",
             "base": "the choice to beat", "source": "for comparison", "replaced": "kept, then replaced"}
    for trial in choice.trials:
        t.add_row(trial.stage, trial.label, *_cells(trial, choice.formats), style[trial.verdict])
    return t


def markdown(choice: Choice) -> list[str]:
    """The same table as report.md lines."""
    head = ("| stage | candidate | " + " | ".join(f"{f.upper()} W4A4 KL | {f.upper()} ppl" for f in choice.formats)
            + " | verdict |")
    lines = [head, "|---|---|" + "---:|---:|" * len(choice.formats) + "---|"]
    words = {"kept": "**kept**", "worse": "not lower", "dropped": "lower, not the lowest", "base": "the choice to beat",
             "source": "for comparison", "replaced": "kept, then replaced"}
    for t in choice.trials:
        lines.append(f"| {t.stage} | {t.label} | " + " | ".join(_cells(t, choice.formats)) + f" | {words[t.verdict]} |")
    return lines


def _cells(trial: Trial, formats) -> list[str]:
    return [cell for f in formats for cell in (f"{trial.figures[f]['kl']:.4g}", f"{trial.figures[f]['perplexity']:,.2f}")]
