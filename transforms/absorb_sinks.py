"""Absorb residual sinks (DESIGN §3): take a sink dimension's scale out of the residual stream, into PreAffine.

For each sink dimension k with a power-of-two scale s_k > 1:

    writers   W[k] ← W[k] / s_k     embedding column k; row k of every attention o_proj and of every MLP, expert
                                    and shared-expert down projection (fused or per expert); their biases at k
    readers   λ1[k] ← λ1[k] · s_k   `pre_affine` of every norm reading the residual stream (pre-attention,
                                    pre-MLP, final), inserted with λ1 = 1 where the model has none

The residual stream is the sum of the writers' outputs, so it becomes h' with h'[k] = h[k] / s_k at every layer,
and every norm sees λ1 ⊙ h' = h: norm outputs, and so the whole model, are unchanged while the stream no longer
carries the outlier. Everything else that reads hidden states (q/k/v, routers, experts, shared-expert gates,
the LM head) reads a norm output, which did not change.

Bit-exact: a power of two only moves the exponent, so (x / s)·s = x and a sum of scaled terms is the scaled sum,
in fp32, bf16 and fp16 alike, unless a value under- or overflows; each rewritten row is checked, and a scale that
is not exact in the storage dtype is refused.

Tied embeddings: the LM head reads the final norm's output, so it must keep the original embedding; it is written
as `lm_head.weight` (the embedding before scaling) and the config says `tie_word_embeddings: false`.

Scales: `auto` takes the scan's `scale_pow2`, the largest power of two ≤ the dimension's mean |h| over the median
dimension's (it brings the dimension to the typical level, never below it). An explicit scale must be positive;
one that is not a power of two is rounded to the nearest power of two (in log scale) with a warning, because only
a power of two is exact; a scale that rounds to 1 or less absorbs nothing and is refused.

Invariant (tests/test_absorb_glu_moe.py): logits identical (torch.equal, fp32 and bf16); every residual-stream
point's dimension k is the source's divided by s_k exactly, every other dimension identical; no dimension is
absorbed twice.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from surgeon.errors import SurgeonError
from surgeon.io import final_path
from surgeon.plan import Plan

AUTO = "auto"


def parse_sinks(sinks) -> str | tuple[int, ...]:
    """`auto`, "507,1234" or a sequence of ints → "auto" or a tuple of distinct dimension indices."""
    if isinstance(sinks, str):
        text = sinks.strip().lower()
        if text == AUTO:
            return AUTO
        if not re.fullmatch(r"-?\d+(\s*,\s*-?\d+)*", text):
            raise SurgeonError(f"--sinks takes `auto` or comma-separated dimension indices such as 507,1234 "
                               f"(got {sinks!r})")
        dims = tuple(int(x) for x in text.split(","))
    else:
        dims = tuple(int(x) for x in sinks)
    if not dims:
        raise SurgeonError("--sinks names no dimension: give `auto` or indices such as 507,1234")
    for k in dims:
        if dims.count(k) > 1:
            raise SurgeonError(f"sink dimension {k} is listed twice in --sinks; list each dimension once")
    return dims


def parse_scale(scale) -> str | float | dict[int, float]:
    """`auto`, a number (as text or not), or {dim: number}; every number must be positive."""
    if isinstance(scale, Mapping):
        return {int(k): _positive(v) for k, v in scale.items()}
    if isinstance(scale, str) and scale.strip().lower() == AUTO:
        return AUTO
    return _positive(scale)


def _positive(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise SurgeonError(f"--scale must be `auto` or a positive power of two such as 64 (got {value!r})")
    return number


def power_of_two(scale: float, dim: int) -> int:
    """The nearest power of two (in log scale), with a warning when that is not `scale` itself; must be > 1."""
    exponent = round(math.log2(scale))
    rounded = 2.0 ** exponent
    if rounded != scale:
        warnings.warn(f"absorb-sinks: scale {scale:g} of dimension {dim} is not a power of two; using {rounded:g} "
                      f"(only a power of two is exact)", stacklevel=3)
    if exponent < 1:
        raise SurgeonError(f"scale {scale:g} of dimension {dim} rounds to {rounded:g}, which absorbs nothing: "
                           f"use a power of two of 2 or more")
    return int(rounded)


def _rescaled(t: torch.Tensor, axis: int, scales: dict[int, int], *, multiply: bool, name: str) -> torch.Tensor:
    """A copy of `t` with index k of `axis` multiplied or divided by scales[k], refused unless exactly invertible."""
    out = t.clone()
    for k, s in scales.items():
        row, original = out.select(axis, k), t.select(axis, k)
        if multiply:
            row.mul_(s)
            back = row / s
        else:
            row.div_(s)
            back = row * s
        if not bool(((back == original) | (back.isnan() & original.isnan())).all()):
            raise SurgeonError(
                f"scaling {name} at dimension {k} by {'' if multiply else '1/'}{s} is not exact in "
                f"{str(t.dtype).removeprefix('torch.')} (values under- or overflow): use a smaller --scale or a "
                f"wider --dtype; nothing was written"
            )
    return out


@dataclass
class AbsorbSinks:
    """Absorb residual-sink dimensions; see the module docstring for the math.

    sinks: "auto" (from the scan) or dimension indices; scale: "auto" (the scan's scale_pow2), one number for
    every sink, or {dim: number}; scan: a scan.json of this model; data: text to scan when there is no scan.json.
    """

    sinks: str | Sequence[int] = AUTO
    scale: str | float | Mapping[int, float] = AUTO
    scan: str | os.PathLike | None = None
    data: str | os.PathLike | None = None
    scan_tokens: int = 8192
    seq_len: int = 256
    progress: bool = False
    name = "absorb-sinks"
    key = "absorb_sinks"
    module_pass = True  # works through PreAffine (λ1 takes the sink's scale): `pipeline --control` leaves it out
    preserves_function = True
    _report: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.sinks = parse_sinks(self.sinks)
        self.scale = parse_scale(self.scale)
        if (self.sinks == AUTO or self.scale == AUTO) and self.scan is None and self.data is None:
            raise SurgeonError("absorb-sinks needs --scan scan.json or --data TEXT to find the sinks and their "
                               "scales (or explicit --sinks with --scale N)")

    # -- which dimensions, by how much ---------------------------------------------------------------

    def scan_report(self, plan: Plan):
        """The scan this transform reads: the given scan.json, or one pass over `data` with the source model."""
        if self._report is None:
            from surgeon.scan import ScanReport

            if self.scan is not None:
                report = ScanReport.load(self.scan)
                where = f"{self.scan}"
            else:
                report = self._run_scan(plan)
                where = f"the scan of {self.data}"
            d, layers = self.hidden_size(plan), plan.arch.num_layers(plan.config)
            if (report.hidden_size, report.num_layers) != (d, layers):
                raise SurgeonError(
                    f"{where} describes a model with hidden size {report.hidden_size} and {report.num_layers} layers; "
                    f"this checkpoint has {d} and {layers}: scan this model"
                )
            self._report = report
        return self._report

    def _run_scan(self, plan: Plan):
        from surgeon.scan import scan
        from surgeon.sources import iter_token_windows, load_model, resolve_text

        paths = resolve_text(self.data)
        model, tokenizer = load_model(plan.source.path)
        windows = iter_token_windows(paths, tokenizer, self.seq_len, self.scan_tokens, batch_size=4)
        try:
            return scan(model, tokenizer, windows, model_path=str(plan.source.path), total_tokens=self.scan_tokens,
                        progress=self.progress)
        finally:
            del model

    @staticmethod
    def hidden_size(plan: Plan) -> int:
        return int(plan.config[plan.arch.hidden_size_key])

    def resolve(self, plan: Plan) -> tuple[dict[int, int], dict[int, float | None]]:
        """{dim: power-of-two scale} and {dim: the scan's ratio to the median, if known}."""
        if self.sinks == AUTO:
            report = self.scan_report(plan)
            if not report.sinks:
                ratio = report.thresholds.get("sink_ratio")
                raise SurgeonError(f"the scan found no residual sink (no dimension ≥ {ratio}× the median mean |h|): "
                                   "nothing to absorb")
            dims = tuple(s.dim for s in report.sinks)
        else:
            dims = self.sinks
        d = self.hidden_size(plan)
        for k in dims:
            if not 0 <= k < d:
                raise SurgeonError(f"sink dimension {k} is out of range: the hidden size is {d} (dimensions 0-{d - 1})")
        ratios: dict[int, float | None] = {k: None for k in dims}
        scales: dict[int, int] = {}
        if self.scale == AUTO:
            report = self.scan_report(plan)
            by_dim = {s.dim: s for s in report.sinks}
            for k in dims:
                if k in by_dim:
                    ratios[k] = by_dim[k].ratio_to_median
                    scales[k] = power_of_two(by_dim[k].scale_pow2, k)
                else:
                    ratios[k], scale = self._ratio_from_profile(report, k)
                    if scale < 2:
                        raise SurgeonError(f"dimension {k} is not a residual sink in the scan (mean |h| "
                                           f"{ratios[k]:.3g}× the median): give --scale N to absorb it anyway")
                    scales[k] = scale
        elif isinstance(self.scale, dict):
            missing = [k for k in dims if k not in self.scale]
            if missing:
                raise SurgeonError(f"no scale given for sink dimension {missing[0]}")
            scales = {k: power_of_two(self.scale[k], k) for k in dims}
        else:
            scales = {k: power_of_two(self.scale, k) for k in dims}
        return scales, ratios

    @staticmethod
    def _ratio_from_profile(report, k: int) -> tuple[float, int]:
        """A dimension the scan did not list as a sink: its mean |h| over the decoder points vs the median's."""
        rows = torch.tensor(report.residual_mean_abs[1:] or report.residual_mean_abs)
        score = rows.mean(0)
        ratio = float(score[k] / max(float(score.median()), 1e-30))
        return ratio, 2 ** int(math.floor(math.log2(ratio))) if ratio >= 1 else 1

    # -- the rewrite ---------------------------------------------------------------------------------

    def refuse_if_applied(self, plan: Plan, dims) -> None:
        done = {entry["dim"] for entry in (plan.surgeon.get(self.key) or {}).get("sinks", [])}
        again = [k for k in dims if k in done]
        if again:
            raise SurgeonError(
                f"sink dimension {again[0]} was already absorbed into this model; absorbing it again would "
                f"double its scale: convert the original checkpoint instead"
            )

    def apply(self, plan: Plan) -> None:
        arch = plan.arch
        if self.sinks != AUTO:  # refuse before any scan runs
            self.refuse_if_applied(plan, self.sinks)
        writers = arch.residual_writer_tensors(plan.tensors, plan.config)
        scales, ratios = self.resolve(plan)
        self.refuse_if_applied(plan, scales)
        d = self.hidden_size(plan)

        embedding = plan.require(arch.embedding).spec
        if embedding.shape[-1] != d:
            raise SurgeonError(f"{embedding.name} has {embedding.shape[-1]} columns, not the hidden size {d}: the "
                               f"{arch.model_type} architecture data does not describe this checkpoint")
        for name, axis in writers:
            shape = plan.tensors[name].spec.shape
            if len(shape) < -axis or shape[axis] != d:
                raise SurgeonError(f"residual writer {name} {tuple(shape)} has no output axis of the hidden size {d}: "
                                   f"the {arch.model_type} architecture data does not describe this checkpoint")

        untied = arch.tied(plan.config)
        if untied:
            self.untie(plan)
        plan.rewrite(embedding.name, lambda t, n=embedding.name: _rescaled(t, -1, scales, multiply=False, name=n))
        for name, axis in writers:
            plan.rewrite(name, lambda t, n=name, a=axis: _rescaled(t, a, scales, multiply=False, name=n))

        readers = [arch.norm_pattern(role) for role in arch.residual_readers]
        for norm in (n for pattern in readers for n in plan.expand(pattern)):
            self.scale_pre_affine(plan, norm, scales)
        pre = plan.surgeon.setdefault("pre_affine", {"targets": [], "inserted_by": self.name})
        pre["targets"] = list(dict.fromkeys([*pre.get("targets", []), *readers]))

        block = plan.surgeon.setdefault(self.key, {"sinks": []})
        block["sinks"] = block["sinks"] + [
            {"dim": k, "scale": s, "ratio_to_median": ratios[k],
             "from": "explicit" if self.scale != AUTO else
             str(final_path(self.scan) if self.scan else f"scan of {self.data}")}
            for k, s in scales.items()
        ]
        block["targets"] = readers
        block["writers"] = [arch.embedding, *arch.residual_writers]
        block["untied_lm_head"] = bool(block.get("untied_lm_head") or untied)
        plan.surgeon.setdefault("transforms", []).append(self.name)
        plan.applied.append(self.name)

    @staticmethod
    def untie(plan: Plan) -> None:
        """Write the LM head as the original embedding (before any scaling) and mark the embeddings untied."""
        arch = plan.arch
        spec = plan.require(arch.embedding).spec
        original = plan.tensors[arch.embedding].produce  # captured before the embedding is rewritten

        def lm_head():
            return original().clone()

        if arch.lm_head in plan.tensors:  # stored although tied: transformers ignored it, the embedding was the head
            if plan.tensors[arch.lm_head].spec.shape != spec.shape:
                raise SurgeonError(f"{arch.lm_head} and {arch.embedding} differ in shape although tied")
            plan.rewrite(arch.lm_head, lambda _stored: lm_head())
        else:
            plan.add(arch.lm_head, spec.shape, spec.dtype, lm_head, after=arch.embedding)
        plan.config[arch.tie_key] = False

    @staticmethod
    def scale_pre_affine(plan: Plan, norm: str, scales: dict[int, int]) -> None:
        """λ1[k] ← λ1[k]·s_k on the norm's pre_affine, inserting λ1 = 1 first where the norm has none."""
        name = f"{norm}.pre_affine"
        if name in plan.tensors:
            plan.rewrite(name, lambda t: _rescaled(t, -1, scales, multiply=True, name=name))
            return
        weight = plan.require(f"{norm}.weight").spec
        (d,) = weight.shape

        def produce(dtype=weight.dtype):
            return _rescaled(torch.ones(d, dtype=dtype), -1, scales, multiply=True, name=name)

        plan.add(name, (d,), weight.dtype, produce, after=weight.name)
