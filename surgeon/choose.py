"""Passes chosen by measurement: keep an optional pass (smooth at an α, hadamard on some linear inputs) only where it
lowers the W4A4 error of the format(s) the user targets, on the model at hand.

Why: a pass tuned on one model can hurt another. On SmolLM2 smooth (α 0.8) + hadamard take INT4 W4A4 perplexity
from 6,757 to 116, but on Qwen2.5-0.5B the same passes make NVFP4 — the paper's format — worse than the source's
(issue 16). Every optional pass preserves the function, so fp32 is no criterion; the quantized model is.

How, greedily, one pass at a time in convert's order (absorb before smooth, smooth before hadamard):
  1. the source and the base (the passes that are not optional: pre-affine, gated-norm, ...) are measured — the
     source only as the reference a user compares against, the base as the current choice;
  2. absorb-sinks, when given (the pipeline gives it when the scan found sinks): it leaves the linear inputs alone
     but rescales the rows of the linears that write the residual stream, so their quantization changes too;
  3. each smooth α on top of the choice so far;
  4. hadamard by forward selection over its groups: every group together and each alone on top of the winner so
     far; unless "all" won, each remaining group is added to the kept ones in turn while an addition still lowers
     the error (a group that hurts one format need not take the others' gain with it);
  5. when hadamard was kept, smooth again at each α not kept before, beneath the kept rotation, and the rotation
     without the smooth kept before (smooth and hadamard interact: an α that hurt alone can help once the rotation
     spreads the scaled channels, and on Qwen2.5-0.5B the rotation alone leaves INT4 less error than beneath any α).
A candidate is really converted (surgeon.convert, the same passes and calibration the final conversion uses),
loaded, and its fake-quantized output (surgeon.quant) measured in every target format on windows of the
calibration text that the smooth calibration did not read — never on the evaluation text — as its KL divergence
from the fp32 model (every candidate on the same windows, so their differences are paired). A candidate is kept
only if it is lower than the current choice in *every* target format (so with `both`, no format may get worse),
and lower by more than SIGNIFICANCE standard errors of the per-window differences: a difference the windows do not
agree on is noise, and a pass is not worth keeping for it. Among several, the lowest geometric mean wins.
choose_each runs one search per target format on shared measurements, for a conversion per format. The table of
every measurement is printed and returned.
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
SIGNIFICANCE = 2.0  # a candidate is lower only by more than this many standard errors of its paired per-window
# KL difference: on Qwen2.5-0.5B absorb-sinks' 1% lower NVFP4 error on the training text was 3.6% higher on the
# evaluation text


def target_formats(target: str) -> tuple[str, ...]:
    try:
        return TARGETS[target]
    except KeyError:
        raise SurgeonError(f"unknown --format {target!r}: use one of {', '.join(TARGETS)}") from None


@dataclass
class Trial:
    stage: str  # "source", "base", "absorb-sinks", "smooth", "hadamard", "smooth again"
    label: str  # e.g. "smooth α 0.65", "hadamard mlp_out"
    passes: list  # the whole pass list converted for this measurement
    figures: dict[str, dict] = field(default_factory=dict)  # format -> {"kl", "perplexity", "kl_windows"}
    verdict: str = ""  # "source", "base", "kept", "dropped" (a better one was kept), "worse", "replaced"

    def error(self, formats) -> dict[str, float]:
        """What the choice is made on: per format, the quantized model's KL from the fp32 model."""
        return {f: self.figures[f]["kl"] for f in formats}

    def score(self, formats) -> float:
        """Geometric mean of the `formats`' errors (decides between candidates that all lower it)."""
        errors = self.error(formats).values()
        return math.exp(sum(math.log(max(e, 1e-30)) for e in errors) / len(errors))


@dataclass
class Choice:
    formats: tuple[str, ...]  # the formats decided on
    passes: list  # the optional passes kept, in order
    trials: list[Trial]
    tokens: int  # measured tokens per candidate
    overlaps_calibration: bool = False  # the text was too short to measure past what smooth calibrated on
    shown: tuple[str, ...] = ()  # the formats measured (and tabled): `formats` and, choosing per format, the others

    def __post_init__(self):
        self.shown = self.shown or self.formats

    def labels(self) -> list[str]:
        """The passes kept, as the table names them."""
        return [pass_label(p) for p in self.passes]

    def as_dict(self) -> dict:
        return {"formats": list(self.formats), "tokens": self.tokens, "kept": self.labels(),
                "overlaps_calibration": self.overlaps_calibration, "significance_se": SIGNIFICANCE,
                "trials": [{"stage": t.stage, "label": t.label, "figures": t.figures, "verdict": t.verdict}
                           for t in self.trials]}


def significantly_lower(candidate: list[float], current: list[float]) -> bool:
    """Whether the paired per-window errors of `candidate` are lower than `current`'s by more than SIGNIFICANCE
    standard errors of their mean difference (a plain comparison with one window)."""
    d = [a - b for a, b in zip(candidate, current, strict=True)]
    mean = sum(d) / len(d)
    if len(d) < 2:
        return mean < 0
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return mean < -SIGNIFICANCE * se


def lowers(candidate: dict[str, dict], current: dict[str, dict], formats) -> bool:
    """Whether the `candidate`'s figures show a lower error than the `current` ones' in every one of `formats`
    (significantly, window by window: the rule a kept pass has to pass)."""
    return all(significantly_lower(candidate[f]["kl_windows"], current[f]["kl_windows"]) for f in formats)


def smooth_options(calibration, *, seq_len: int, alphas, smooth_tokens: int | None = None) -> list[tuple[str, object]]:
    """[(label, Smooth pass), ...] at each α, calibrated on `calibration`."""
    from .transforms import Smooth

    kwargs = {} if smooth_tokens is None else {"tokens": smooth_tokens}
    return [(f"smooth α {a:g}", Smooth(data=calibration, alpha=a, seq_len=seq_len, **kwargs)) for a in alphas]


def pass_label(p) -> str:
    if p.name == "smooth":
        return f"smooth α {p.alpha:g}"
    return hadamard_label(p.groups) if p.name == "hadamard" else p.name


def hadamard_label(groups) -> str:
    from .transforms.hadamard import GROUPS

    return "hadamard all" if tuple(groups) == GROUPS else "hadamard " + " + ".join(groups)


class _Bench:
    """Converts and measures each pass list once, in every format shown, on the same calibration windows against
    one fp32 reference; searches for several targets share it (choose_each)."""

    def __init__(self, source: Path, calibration: list[Path], formats, *, seq_len, batch_size, windows,
                 smooth_tokens, temp: Path, show: bool):
        from .sources import iter_token_windows, load_model
        from .transforms import Smooth

        self.source, self.formats, self.temp, self.show = source, formats, temp, show
        skip = smooth_tokens if smooth_tokens is not None else Smooth.tokens  # measure on text smooth did not read
        _, tokenizer = load_model(source)
        try:
            self.ids = list(iter_token_windows(calibration, tokenizer, seq_len, seq_len * windows, batch_size,
                                               skip_tokens=skip))
        except SurgeonError:  # a text shorter than smooth's calibration: measure on what there is
            skip = 0
            self.ids = list(iter_token_windows(calibration, tokenizer, seq_len, seq_len * windows, batch_size))
        self.skipped = skip
        self.tokens = sum(int(b[:, 1:].numel()) for b in self.ids)
        self.reference: list = []
        self.figures: dict[tuple, dict] = {}

    def measure(self, stage: str, label: str, passes: list) -> Trial:
        """A new Trial of `passes` (its own verdict), measured unless the same passes were before."""
        key = tuple(pass_label(p) for p in passes)
        if key not in self.figures:
            self.figures[key] = _measure(self.source, passes, self.ids, self.formats,
                                         self.temp / f"candidate-{len(self.figures)}", label, self.show,
                                         self.reference)
        return Trial(stage, label, list(passes), self.figures[key])


def _search(bench: _Bench, formats: tuple[str, ...], base: list, absorb, smooths: list, hadamard: bool,
            overlaps: bool) -> Choice:
    """The greedy search of the module docstring, deciding on `formats`."""
    from .transforms import Hadamard
    from .transforms.hadamard import GROUPS

    trials: list[Trial] = []

    def measure(stage: str, label: str, passes: list) -> Trial:
        trials.append(bench.measure(stage, label, passes))
        return trials[-1]

    if base:
        measure("source", "the source, unconverted", []).verdict = "source"
    current = measure("base", "base: " + (" + ".join(p.name for p in base) or "the source"), base)
    current.verdict = "base"

    def pick(tried: list[Trial]) -> Trial | None:
        """Keep the lowest of the candidates that lower every format's error; mark the rest."""
        nonlocal current
        better = [t for t in tried if lowers(t.figures, current.figures, formats)]
        for t in tried:
            t.verdict = "dropped" if t in better else "worse"
        if not better:
            return None
        current = min(better, key=lambda t: t.score(formats))
        current.verdict = "kept"
        return current

    below = list(base)  # the kept passes every later candidate is converted on
    absorbed = absorb is not None and pick([measure("absorb-sinks", "absorb-sinks", [*base, absorb])]) is not None
    if absorbed:
        below.append(absorb)
    smooth = None  # the kept smooth pass
    if smooths:
        kept = pick([measure("smooth", label, [*below, p]) for label, p in smooths])
        smooth = kept.passes[-1] if kept else None
    rotated: tuple[str, ...] = ()  # the kept hadamard groups
    if hadamard:
        under = [*below, *([smooth] if smooth else [])]
        options = [GROUPS] + [(g,) for g in GROUPS]
        while options:
            kept = pick([measure("hadamard", hadamard_label(o), [*under, Hadamard(groups=o)]) for o in options])
            if kept is None:
                break
            rotated = kept.passes[-1].groups
            options = [tuple(h for h in GROUPS if h in rotated or h == g) for g in GROUPS if g not in rotated]
            if len(options) == 1:  # adding the last group is "all", measured in the first round
                break
    if rotated and smooths:
        again = [(label, p) for label, p in smooths if smooth is None or p.alpha != smooth.alpha]
        tried = [measure("smooth again", f"{label} beneath {hadamard_label(rotated)}",
                         [*below, p, Hadamard(groups=rotated)]) for label, p in again]
        if smooth is not None:  # the rotation alone: what smooth fixed, the rotation may fix better without it
            tried.append(measure("smooth again", f"no smooth beneath {hadamard_label(rotated)}",
                                 [*below, Hadamard(groups=rotated)]))
        kept = pick(tried)
        if kept:
            for t in trials:  # the smooth kept alone, if any, is replaced by the one beneath the rotation
                if t.stage == "smooth" and t.verdict == "kept":
                    t.verdict = "replaced"
            smooth = kept.passes[-2] if kept.passes[-2].name == "smooth" else None
    chosen = [*([absorb] if absorbed else []), *([smooth] if smooth else []),
              *([Hadamard(groups=rotated)] if rotated else [])]
    return Choice(formats, chosen, trials, bench.tokens, overlaps_calibration=overlaps, shown=bench.formats)


def choose(source: Path, base: list, calibration: list[Path], *, target: str = "both", absorb=None, **kwargs) -> Choice:
    """Measure the source and `base`, then each stage's candidates on top of the choice so far (see the module
    docstring), and return the optional passes kept with every measurement. `calibration`: the text smooth
    calibrates on and the candidates are measured on (after the tokens smooth reads). `absorb`: an absorb-sinks
    pass, tried first like the other optional passes. Keyword arguments: those of choose_each."""
    return choose_each(source, base, calibration, targets=(target,), absorb=absorb, **kwargs)[target]


def choose_each(source: Path, base: list, calibration: list[Path], *, targets=("nvfp4", "int4"), absorb=None,
                seq_len: int = 256, batch_size: int = 4, alphas=SMOOTH_ALPHAS, hadamard: bool = True,
                smooth_tokens: int | None = None, windows: int = MEASURE_WINDOWS, work_dir: Path | None = None,
                show: bool = True) -> dict[str, Choice]:
    """One search per target (nvfp4, int4 or both), each keeping what lowers its own format(s): {target: Choice}.
    Every candidate is measured in every format of the targets once and shared by the searches that reach it, so
    choosing for both formats apart costs the candidates only one of them tries."""
    formats = tuple(dict.fromkeys(f for t in targets for f in target_formats(t)))
    temp = Path(tempfile.mkdtemp(prefix="surgeon-choose-", dir=work_dir))
    try:
        bench = _Bench(source, calibration, formats, seq_len=seq_len, batch_size=batch_size, windows=windows,
                       smooth_tokens=smooth_tokens, temp=temp, show=show)
        smooths = smooth_options(calibration, seq_len=seq_len, alphas=alphas, smooth_tokens=smooth_tokens)
        overlaps = bench.skipped == 0 and bool(alphas)
        choices = {t: _search(bench, target_formats(t), base, absorb, smooths, hadamard, overlaps) for t in targets}
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    if show:
        from .progress import console

        for choice in choices.values():
            console.print(table(choice))
    return choices


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
            windows: list[float] = []  # each window's mean KL per token (the windows are of one length)
            nll = 0.0
            count = 0
            with fake_quantized(model, fmt):
                for batch, ref in zip(ids, reference):
                    logp = torch.log_softmax(model(input_ids=batch).logits[:, :-1].float(), -1)
                    windows += (ref.exp() * (ref - logp)).sum(-1).mean(-1).tolist()
                    nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
                    count += batch[:, 1:].numel()
            figures[fmt] = {"kl": sum(windows) / len(windows), "perplexity": math.exp(nll / count),
                            "kl_windows": windows}
            advance(1)
    del model
    if passes:
        shutil.rmtree(out, ignore_errors=True)
    return figures


def table(choice: Choice):
    """The rich table the choice was made from: every candidate, its perplexity per target format, the verdict."""
    from rich.table import Table

    t = Table(title=f"passes chosen by W4A4 error on {choice.tokens:,} calibration tokens: KL from fp32 "
                    f"(nats/token; kept only if lower in {' and '.join(f.upper() for f in choice.formats)} by more "
                    f"than {SIGNIFICANCE:g} standard errors), perplexity beside it"
                    + (" — the text is too short to measure past smooth's calibration tokens"
                       if choice.overlaps_calibration else ""))
    t.add_column("stage")
    t.add_column("candidate")
    for f in choice.shown:
        t.add_column(f"{f.upper()} KL", justify="right")
        t.add_column(f"{f.upper()} ppl", justify="right")
    t.add_column("verdict")
    style = {"kept": "[green]kept[/]", "worse": "[red]not lower[/]", "dropped": "lower, not the lowest",
             "base": "the choice to beat", "source": "for comparison", "replaced": "kept, then replaced"}
    for trial in choice.trials:
        t.add_row(trial.stage, trial.label, *_cells(trial, choice.shown), style[trial.verdict])
    return t


def markdown(choice: Choice) -> list[str]:
    """The same table as report.md lines."""
    head = ("| stage | candidate | " + " | ".join(f"{f.upper()} W4A4 KL | {f.upper()} ppl" for f in choice.shown)
            + " | verdict |")
    lines = [head, "|---|---|" + "---:|---:|" * len(choice.shown) + "---|"]
    words = {"kept": "**kept**", "worse": "not lower", "dropped": "lower, not the lowest", "base": "the choice to beat",
             "source": "for comparison", "replaced": "kept, then replaced"}
    for t in choice.trials:
        lines.append(f"| {t.stage} | {t.label} | " + " | ".join(_cells(t, choice.shown)) + f" | {words[t.verdict]} |")
    return lines


def _cells(trial: Trial, formats) -> list[str]:
    return [cell for f in formats for cell in (f"{trial.figures[f]['kl']:.4g}", f"{trial.figures[f]['perplexity']:,.2f}")]
