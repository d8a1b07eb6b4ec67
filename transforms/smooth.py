"""Smooth (SmoothQuant folded into the weights, Xiao et al. 2023): move the per-channel outliers of the linear
layers' inputs into their weights, where W4's groups of 32 take them far better than A4's one scale per token.

For each smoothing point, a calibration pass gives, per input channel j, the largest |x_j| over the calibration
tokens (a_j) and over the point's readers' weights the largest |W_:,j| (w_j); then

    s_j = 2^round(log2(a_j^α / w_j^(1−α)))          (SmoothQuant's balance, rounded to a power of two)

and the point's writer divides channel j by s_j while every reader multiplies column j by s_j:

    norm → readers    γ[j] ← γ[j] / s_j of the norm (pre-attention, pre-MLP); column j of q/k/v, resp. gate/up,
                      ← · s_j; where the norm carries a GatedNorm, column j of its `gate_down` ← · s_j too, so the
                      gate reads W_down · y exactly as before (its output multiplies y / s, which the readers
                      scale back)
    up → down         row j of `mlp.up` (and its bias) ← / s_j; column j of `mlp.down` ← · s_j: the MLP's
                      activation is applied to the gate branch, so act(gate) ⊙ (up / s) is the hidden state / s

The function is unchanged: each reader computes Σ_j (W_:,j · s_j)(x_j / s_j). Bit-exact, because a power of two
only moves the exponent (as in absorb-sinks); every rewritten tensor is checked and a scale that is not exact in
the storage dtype is refused. PreAffine (before the norm's RMS) is untouched; the final norm feeds only the LM
head, which W4A4 leaves in full precision, so it is left alone; o_proj's input (attention output) is left alone
too: the measured damage there is small and a scale would have to be shared across the query heads of a KV
group.

Calibration: the model as it is before this pass equals the source model (every earlier pass preserves the
function), so the caller (surgeon.calibrate) runs the source on `data` (`tokens` text tokens, windows of `seq_len`)
with a forward pre-hook on each reader and hands the pass a_j; the pass reads nothing itself. Architecture data:
`norm_readers` (per norm role, the linears reading its output) and `mlp.up` / `mlp.down`; a family without them
(the MoE families, whose experts are fused parameters) is refused.

The factors are kept beside the weights in `smooth_factors.safetensors` (surgeon.io.smooth_factors): key
`<tensor>@<axis>` → the vector f with rewritten = source × f along that axis (1/s for a writer, s for a reader;
up_proj has a row and a column entry). Training reads it to take its optimizer steps on the unsmoothed weights
(surgeon.train.coordinates), and export carries it to the trained model; a later convert does not, unless
hadamard is its first pass (the rotation composes with the factors).

Smoothing a smoothed checkpoint again (typically after training, whose updates move the activations the first
scales were calibrated on) is a recalibration: new scales from the checkpoint as it is, folded the same way, and
the recorded factors become the product of both rounds' (when the checkpoint has its factors file; else none are
written). Two smooth passes in one convert are refused.

Invariant (tests/test_smooth.py): logits identical (torch.equal); the rewritten tensors are exactly the source's
scaled by a power of two per channel, and by exactly the recorded factors; a reader's inputs' max/RMS falls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType

import torch

from surgeon.calibrate import ActivationRequest, Calibration, Needs
from surgeon.errors import SurgeonError
from surgeon.io.smooth_factors import FACTORS_FILE, FACTORS_FORMAT
from surgeon.plan import Plan, offset_scale
from surgeon.quant import SMOOTH_ALPHA, balance_scales, check_alpha

from .base import CALIBRATION_TEXT, Option, Pass
from .gated_attention import GATE

POINTS = ("pre_attention", "pre_mlp")
CLI_NEEDS_TEXT = "smooth needs calibration text: --data TEXT (.txt, .jsonl, a folder, or `default`)"

__all__ = ["FACTORS_FILE", "FACTORS_FORMAT", "POINTS", "Smooth"]


def power_of_two(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.log2(s).round())


def _scaled(t: torch.Tensor, axis: int, s: torch.Tensor, *, multiply: bool, name: str) -> torch.Tensor:
    """`t` with index j of `axis` multiplied (or divided) by s_j, refused unless exactly invertible."""
    shape = [1] * t.dim()
    shape[axis] = -1
    factor = s.to(t.dtype).reshape(shape)
    out = t * factor if multiply else t / factor
    back = out / factor if multiply else out * factor
    if not bool(((back == t) | (back.isnan() & t.isnan())).all()):
        raise SurgeonError(f"smoothing {name} is not exact in {str(t.dtype).removeprefix('torch.')} (values under- "
                           f"or overflow): use a smaller --smooth-alpha or a wider --dtype; nothing was written")
    return out


def _compensation(stored: torch.Tensor, s: torch.Tensor, offset: float) -> torch.Tensor:
    """The readers' factor where the norm stores λ − offset (Gemma): λ/s is exact (s a power of two), but the stored
    λ/s − offset is rounded wherever λ/s is far from the offset, so the model scales by λ' ≠ λ/s. Multiplying the
    readers by λ/λ' (fp64; equal to s wherever nothing was rounded) keeps λ'·W' = λ·W to one rounding of W'."""
    lam = stored.float() + offset  # as the family computes its scale, in fp32
    lam_new = offset_scale(stored, lambda t: t / s.float(), offset)[1]  # the rounding rewrite_scale stores
    if bool(((lam_new == 0) & (lam != 0)).any()):
        raise SurgeonError(f"smoothing a norm that stores λ − {offset:g} rounds a channel's λ/s to 0 in "
                           f"{str(stored.dtype).removeprefix('torch.')}: use a smaller --smooth-alpha or a wider "
                           "--dtype; nothing was written")
    # a dead channel (λ = 0, real in Gemma 3) stays dead whatever its readers' columns are: they take s as elsewhere
    return torch.where(lam == 0, s.double(), lam.double() / lam_new.double().where(lam_new != 0, 1.0))


def _multiplied(t: torch.Tensor, factor: torch.Tensor, *, name: str) -> torch.Tensor:
    """`t` with column j multiplied by factor_j, rounded once from fp64 (refused where that overflows)."""
    out = (t.double() * factor.reshape([1] * (t.dim() - 1) + [-1])).to(t.dtype)
    if not bool((out.isfinite() | ~t.isfinite()).all()):
        raise SurgeonError(f"smoothing {name} overflows {str(t.dtype).removeprefix('torch.')}: use a smaller "
                           "--smooth-alpha or a wider --dtype; nothing was written")
    return out


@dataclass
class Smooth(Pass):
    """Fold SmoothQuant scales into the weights; see the module docstring. data: calibration text (required), a
    spec as `surgeon.sources.resolve_text` takes (a file, folder, JSONL, `default`, or a list of them), which the
    caller measures the source on (surgeon.calibrate)."""

    data: str | os.PathLike | list | None = None
    alpha: float = SMOOTH_ALPHA
    tokens: int = 8192
    seq_len: int = 256
    name = "smooth"
    key = "smooth"
    changes_linear_inputs = True
    after = MappingProxyType({"gated-attention": "the attention gate reads the pre-attention norm's output: smooth "
                                                 "scales its columns with q/k/v's"})
    options = (
        CALIBRATION_TEXT,
        Option(("--smooth-alpha",), "alpha", dict(
            type=float, default=SMOOTH_ALPHA, help="SmoothQuant's α: the share of each input channel's outlier moved "
                                                   "into the weights (default %(default)s)")),
        Option(("--smooth-tokens",), "tokens", dict(type=int, default=8192,
                                                   help="calibration tokens of --data (default %(default)s)")),
    )

    def __post_init__(self):
        check_alpha(self.alpha)  # a bad alpha fails before anything is read
        if self.data is None or (isinstance(self.data, (list, tuple)) and not self.data):
            raise SurgeonError("smooth needs calibration text (data: a .txt or .jsonl file, a folder of them, "
                               "`default`, or a list of them)")
        if self.tokens < 1:
            raise SurgeonError(f"smooth needs at least one calibration token (got tokens={self.tokens})")

    @classmethod
    def from_args(cls, args) -> Smooth:
        check_alpha(args.smooth_alpha)
        if args.data is None:
            raise SurgeonError(CLI_NEEDS_TEXT)
        if args.smooth_tokens < 1:
            raise SurgeonError(f"smooth needs at least one calibration token (got --smooth-tokens "
                               f"{args.smooth_tokens})")
        return super().from_args(args)

    # -- the plan: which tensors, scaled along which axis ----------------------------------------------

    @staticmethod
    def points(plan: Plan) -> list[dict]:
        """Per layer and point: the writer tensors (divided, with the axis of the channel), the reader weights
        (multiplied along their input axis), and the GatedNorm `gate_down` when the norm has one."""
        arch = plan.arch
        readers = arch.norm_readers
        missing = [p for p in POINTS if p not in readers] + [k for k in ("up", "down") if k not in arch.mlp]
        if missing:
            raise SurgeonError(f"smooth does not support {arch.model_type}: its architecture data names no "
                               f"{missing[0]} readers (norm_readers / mlp in surgeon/architectures/"
                               f"{arch.model_type}.json); the MoE families' fused experts are not supported")
        out = []
        for i in range(arch.num_layers(plan.config)):
            at = lambda pattern: pattern.replace("*", str(i))  # noqa: E731
            for role in POINTS:
                norm = at(arch.norm_pattern(role))
                gates = [f"{norm}.gate_down.weight"]  # GatedNorm's gate, and the attention gate (with q/k/v)
                if role == "pre_attention" and arch.attention:
                    gates.append(f"{at(arch.attention['module'])}.{GATE}.weight")
                out.append({"point": norm, "divide": [(f"{norm}.weight", -1)],
                            "readers": [f"{at(r)}.weight" for r in readers[role]]
                            + [g for g in gates if g in plan.tensors],
                            "quantized": [at(r) for r in readers[role]]})
            up, down = at(arch.mlp["up"]), at(arch.mlp["down"])
            divide = [(f"{up}.weight", -2)] + ([(f"{up}.bias", -1)] if f"{up}.bias" in plan.tensors else [])
            out.append({"point": down, "divide": divide, "readers": [f"{down}.weight"], "quantized": [down]})
        for point in out:
            for name, _ in point["divide"]:
                plan.require(name)
            for name in point["readers"]:
                plan.require(name)
        return out

    def check(self, plan: Plan) -> None:
        if self.name in plan.applied:
            raise SurgeonError("smooth is given twice: one smooth pass per convert (a smoothed checkpoint can be "
                               "smoothed again later, e.g. after training, to recalibrate)")
        if "hadamard" in plan.surgeon:
            raise SurgeonError("smooth must come before hadamard: its scales are per channel of the unrotated inputs "
                               "(smooth a checkpoint without hadamard, then rotate it)")
        self.points(plan)

    def needs(self, plan: Plan) -> Needs:
        """The source's input maxima at every quantized reader; a smoothed source's factors (this is a new round)."""
        modules = tuple(n for point in self.points(plan) for n in point["quantized"])
        text = tuple(self.data) if isinstance(self.data, list) else self.data
        return Needs(activations=ActivationRequest(
            modules, text, self.tokens, self.seq_len, label="smooth: calibrating",
            role=f"the {plan.arch.model_type} architecture data names as a norm reader"),
            factors=self.key in plan.surgeon)

    def scales(self, plan: Plan, points: list[dict], amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{point: power-of-two s} from the source model's input maxima `amax` on the calibration text."""
        scales = {}
        for point in points:
            a = torch.stack([amax[n] for n in point["quantized"]]).amax(0)
            # the weights as this plan has them (earlier passes may have rescaled rows, never these columns' role)
            w = torch.stack([plan.tensors[f"{n}.weight"].produce().detach().abs().amax(0).float()
                             for n in point["quantized"]]).amax(0)
            scales[point["point"]] = power_of_two(balance_scales(a, w, self.alpha))
        return scales

    def apply(self, plan: Plan, calibration: Calibration | None = None) -> None:
        self.check(plan)
        if calibration is None or calibration.activations is None:
            raise SurgeonError("smooth needs the activation statistics of its source: convert() measures them "
                               "(surgeon.calibrate) and hands them over")
        earlier = plan.surgeon.get(self.key)  # a smoothed checkpoint (e.g. trained since): this round recalibrates
        previous = calibration.factors if earlier else {}
        points = self.points(plan)
        scales = self.scales(plan, points, calibration.activations)
        factors = {}
        for point in points:
            s = scales[point["point"]]
            compensate = None
            for name, axis in point["divide"]:  # a norm's λ (Gemma: 1 + w), through rewrite_scale
                offset = plan.arch.norm_offset_of(name)
                if offset:
                    compensate = _compensation(plan.tensors[name].produce(), s, offset)
                plan.rewrite_scale(name, lambda t, n=name, a=axis, s=s: _scaled(t, a, s, multiply=False, name=n))
                if not offset:  # stored = factor ⊙ source only where nothing is added
                    factors[f"{name}@{axis}"] = 1 / s
            for name in point["readers"]:
                if compensate is None:
                    plan.rewrite(name, lambda t, n=name, s=s: _scaled(t, -1, s, multiply=True, name=n))
                else:
                    plan.rewrite(name, lambda t, n=name, c=compensate: _multiplied(t, c, name=n))
                factors[f"{name}@-1"] = s
        if previous is not None:  # the factors from the source weights: the earlier rounds' times this one's
            factors = {k: previous.get(k, 1) * factors.get(k, 1) for k in {**previous, **factors}}
            plan.side_tensors[FACTORS_FILE] = ({k: v.float() for k, v in factors.items()}, {"format": FACTORS_FORMAT})
        every = torch.cat([s.log2() for s in scales.values()])
        plan.surgeon[self.key] = {
            "alpha": self.alpha, "calibration_tokens": self.tokens, "points": len(points),
            "targets": [plan.arch.norm_pattern(r) for r in POINTS] + [plan.arch.mlp["down"]],
            "log2_scale_range": [int(every.min()), int(every.max())],
            "rounds": earlier.get("rounds", 1) + 1 if earlier else 1,
        }
        self.mark_applied(plan)

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        low, high = block["log2_scale_range"]
        return (f"smoothed with α {block['alpha']:g} on {block['calibration_tokens']:,} {text} tokens, "
                f"scales 2^{low}…2^{high}")

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        low, high = block["log2_scale_range"]
        return ("smoothed (SmoothQuant folded in), α",
                f"{block['alpha']:g}: {block['points']} points, scales 2^{low}…2^{high}")

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        return ("The smooth pass then divides each input channel j of the q/k/v, gate/up and down_proj layers by a "
                "power of two s_j (SmoothQuant's balance of activation and weight maxima, folded into the norm "
                "weights" + (", GatedNorm's down projection" if "gated_norm" in surgeon else "") + " and up_proj's "
                "rows) and multiplies the reading weights' column j by s_j"
                + (" (the attention gate's with q/k/v's)" if "gated_attention" in surgeon else "")
                + ": bit for bit the same function, but the "
                "activations' per-channel outliers now sit in the weights, where INT4's groups of 32 take them. ")
