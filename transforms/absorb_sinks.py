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
a power of two is exact; a scale that rounds to 1 or less absorbs nothing and is refused. The scan is the
caller's (surgeon.calibrate: a scan.json of this model, or one pass over text), handed to the pass, which reads
nothing itself.

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
from dataclasses import dataclass
from types import MappingProxyType

import torch

from surgeon.calibrate import Calibration, Needs, ScanRequest
from surgeon.errors import SurgeonError
from surgeon.plan import Plan

from .base import CALIBRATION_TEXT, Option, Pass

AUTO = "auto"
CLI_NEEDS_SCAN = ("absorb-sinks needs --scan scan.json or --data TEXT to find the sinks and their scales (or explicit "
                  "--sinks with --scale N)")


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
class AbsorbSinks(Pass):
    """Absorb residual-sink dimensions; see the module docstring for the math.

    sinks: "auto" (from the scan) or dimension indices; scale: "auto" (the scan's scale_pow2), one number for
    every sink, or {dim: number}; scan: a scan.json of this model; data: text to scan when there is no scan.json
    (the caller scans, surgeon.calibrate).
    """

    sinks: str | Sequence[int] = AUTO
    scale: str | float | Mapping[int, float] = AUTO
    scan: str | os.PathLike | None = None
    data: str | os.PathLike | None = None
    scan_tokens: int = 8192
    seq_len: int = 256
    name = "absorb-sinks"
    key = "absorb_sinks"
    module_pass = True  # works through PreAffine (λ1 takes the sink's scale): `pipeline --control` leaves it out
    after = MappingProxyType({"pre-affine": "absorb-sinks inserts PreAffine on the residual norms where absent and "
                                            "reuses one that is already there"})
    options = (
        Option(("--sinks",), "sinks", dict(default=AUTO, help="residual-sink dimensions: auto (from the scan) or "
                                                              "comma-separated indices such as 507,1234")),
        Option(("--scale",), "scale", dict(default=AUTO, help="divide each sink by this power of two (rounded to "
                                                              "one, with a warning); auto: the scan's scale_pow2, "
                                                              "which brings the dimension to the typical level")),
        Option(("--scan",), "scan", dict(default=None, help="scan.json of this model (from `surgeon scan`)")),
        CALIBRATION_TEXT,
        Option(("--scan-tokens",), "scan_tokens", dict(type=int, default=8192,
                                                       help="text tokens scanned with --data (default 8192)")),
    )

    def __post_init__(self):
        self.sinks = parse_sinks(self.sinks)
        self.scale = parse_scale(self.scale)
        if self.wants_scan and self.scan is None and self.data is None:
            raise SurgeonError("absorb-sinks needs a scan of the source to find the sinks and their scales: a scan "
                               "report (scan) or text to scan (data), or explicit sinks with a scale")

    @classmethod
    def from_args(cls, args) -> AbsorbSinks:
        if AUTO in (parse_sinks(args.sinks), parse_scale(args.scale)) and args.scan is None and args.data is None:
            raise SurgeonError(CLI_NEEDS_SCAN)
        return super().from_args(args)

    @property
    def wants_scan(self) -> bool:
        return self.sinks == AUTO or self.scale == AUTO

    # -- which dimensions, by how much ---------------------------------------------------------------

    def needs(self, plan: Plan) -> Needs:
        if not self.wants_scan:
            return Needs()
        return Needs(scan=ScanRequest(report=self.scan, text=self.data, tokens=self.scan_tokens,
                                      seq_len=self.seq_len))

    def scan_report(self, plan: Plan, calibration: Calibration | None):
        """The scan handed over by the caller, checked against this checkpoint."""
        if calibration is None or calibration.scan is None:
            raise SurgeonError("absorb-sinks needs a scan of its source: convert() reads or runs it "
                               "(surgeon.calibrate) and hands it over")
        report = calibration.scan
        d, layers = self.hidden_size(plan), plan.arch.num_layers(plan.config)
        if (report.hidden_size, report.num_layers) != (d, layers):
            raise SurgeonError(
                f"{calibration.scan_where} describes a model with hidden size {report.hidden_size} and "
                f"{report.num_layers} layers; this checkpoint has {d} and {layers}: scan this model"
            )
        return report

    @staticmethod
    def hidden_size(plan: Plan) -> int:
        return int(plan.config[plan.arch.hidden_size_key])

    def resolve(self, plan: Plan, calibration: Calibration | None = None
                ) -> tuple[dict[int, int], dict[int, float | None]]:
        """{dim: power-of-two scale} and {dim: the scan's ratio to the median, if known}."""
        if self.sinks == AUTO:
            report = self.scan_report(plan, calibration)
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
            report = self.scan_report(plan, calibration)
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

    def check(self, plan: Plan) -> None:
        if self.sinks != AUTO:  # refuse before any scan runs
            self.refuse_if_applied(plan, self.sinks)

    def apply(self, plan: Plan, calibration: Calibration | None = None) -> None:
        arch = plan.arch
        self.check(plan)
        writers = arch.residual_writer_tensors(plan.tensors, plan.config)
        scales, ratios = self.resolve(plan, calibration)
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

        gated = [n for n, _ in writers if n.endswith(".weight") and f"{n.removesuffix('.weight')}.gate_down.weight"
                 in plan.tensors]
        if gated:  # its gate reads λ ⊙ n(x): rescaling λ would move the gate
            raise SurgeonError(f"absorb-sinks rescales the residual-writing norm {gated[0].removesuffix('.weight')}, "
                               "which carries a GatedNorm gate: absorb the sinks first, then add gated-norm")
        untied = arch.tied(plan.config)
        if untied:
            self.untie(plan)
        plan.rewrite(embedding.name, lambda t, n=embedding.name: _rescaled(t, -1, scales, multiply=False, name=n))
        for name, axis in writers:  # a writer norm (Gemma's post-norms): its λ, through rewrite_scale
            plan.rewrite_scale(name, lambda t, n=name, a=axis: _rescaled(t, a, scales, multiply=False, name=n))

        readers = [arch.norm_pattern(role) for role in arch.residual_readers]
        for norm in (n for pattern in readers for n in plan.expand(pattern)):
            self.scale_pre_affine(plan, norm, scales)
        pre = plan.surgeon.setdefault("pre_affine", {"targets": [], "inserted_by": self.name})
        pre["targets"] = list(dict.fromkeys([*pre.get("targets", []), *readers]))

        block = plan.surgeon.setdefault(self.key, {"sinks": []})
        block["sinks"] = block["sinks"] + [
            {"dim": k, "scale": s, "ratio_to_median": ratios[k],
             "from": "explicit" if self.scale != AUTO else calibration.scan_origin}  # files by name and sha256
            for k, s in scales.items()
        ]
        block["targets"] = readers
        block["writers"] = [arch.embedding, *arch.residual_writers]
        block["untied_lm_head"] = bool(block.get("untied_lm_head") or untied)
        self.mark_applied(plan)

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        sinks = block.get("sinks") or []
        if not sinks:
            return ""
        untied = " and the LM head untied from the embedding" if block.get("untied_lm_head") else ""
        return "absorbed " + ", ".join(f"dim {s['dim']} ÷{s['scale']:g}" for s in sinks) + untied

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        return "absorbed residual sinks", ", ".join(f"{s['dim']} (÷{s['scale']})" for s in block["sinks"])

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        return ("each sink dimension is divided by a power of two in every residual writer (embedding, o_proj and "
                "down_proj rows) and multiplied back in every reading norm's PreAffine. The residual stream shrinks "
                "while every norm output stays as it was. "
                + ("" if "smooth" in surgeon else
                   "Activation quantization sees the same values (NVFP4's FP8 block scales are relative to one scale "
                   "per tensor, so the shrunken rows lose a little precision). "))

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
