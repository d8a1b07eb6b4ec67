"""Gated attention (the paper's attention-sink twin of GatedNorm; Qwen3-Next's output gate), identity-initialized.

    a = Attention(x),   g = σ(x · W_gᵀ),   out = o_proj(a ⊙ g)          x: the attention's input (what q/k/v read)

W_g ∈ R^{(H·d_h) × d} gates every channel of every head (`elementwise`, the paper's best variant), or
W_g ∈ R^{H × d} one scalar per head, repeated over its d_h channels (`head`). Softmax must put its mass somewhere;
a gate lets a head output nothing without parking that mass on the first token (the attention sink) and the
first-token massive activation that feeds it.

Identity: W_g = 0 makes g = σ(0) = ½ everywhere, so o_proj's weight ← 2·W_o compensates exactly (a power of two:
exact in every float format; a bias, if any, is untouched). The gate reads the same normalized input as q/k/v, so
smooth rescales its columns with theirs and hadamard rotates its input with theirs (both after this pass); o_proj's
Hadamard rotation sees the gated output (the modeling file gates before it rotates).
Invariant (tests/test_gated_attention.py): logits equal the source's on every family; added per layer: exactly
`<attention>.output_gate.weight` (H·d_h or H, d) = 0, with o_proj's weight doubled; applying it twice is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.calibrate import Calibration
from surgeon.errors import SurgeonError
from surgeon.plan import Plan

from .base import Option, Pass

GRANULARITIES = ("elementwise", "head")
GATE = "output_gate"  # the gate linear's name inside the attention module


@dataclass
class GatedAttention(Pass):
    granularity: str = "elementwise"
    name = "gated-attention"
    key = "gated_attention"
    module_pass = True  # inserts the paper's module: `pipeline --control` leaves it out
    options = (Option(("--ga-granularity",), "granularity", dict(
        choices=GRANULARITIES, default="elementwise",
        help="gated attention: a gate per channel of every head (elementwise, the default) or one per head")),)

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise SurgeonError(f"unknown gated-attention granularity {self.granularity!r}; choose from "
                               f"{', '.join(GRANULARITIES)}")

    def check(self, plan: Plan) -> None:
        if self.key in plan.surgeon:
            raise SurgeonError("the model already has gated attention; converting again would gate twice: convert "
                               "the original checkpoint instead")
        attention = plan.arch.attention
        if not attention:
            raise SurgeonError(f"gated-attention does not support {plan.arch.model_type}: its architecture data "
                               f"names no attention module (attention in surgeon/architectures/"
                               f"{plan.arch.model_type}.json)")
        if attention["heads"] not in plan.config:
            raise SurgeonError(f"config.json has no {attention['heads']!r}, the attention head count the "
                               f"{plan.arch.model_type} architecture data names")

    def apply(self, plan: Plan, calibration: Calibration | None = None) -> None:
        self.check(plan)
        attention = plan.arch.attention
        heads = int(plan.config[attention["heads"]])
        hidden = int(plan.config[plan.arch.hidden_size_key])
        for module, output in zip(plan.expand(attention["module"]), plan.expand(attention["output"]), strict=True):
            weight = plan.require(f"{output}.weight").spec
            out_features, in_features = weight.shape
            if in_features % heads:
                raise SurgeonError(f"{weight.name} reads {in_features} features, not a multiple of the {heads} heads")
            width = heads if self.granularity == "head" else in_features
            plan.rewrite(weight.name, lambda w: w * 2)
            plan.add(f"{module}.{GATE}.weight", (width, hidden), weight.dtype,
                     lambda width=width, dtype=weight.dtype: torch.zeros(width, hidden, dtype=dtype), after=weight.name)
        plan.surgeon[self.key] = {"targets": [attention["module"]], "output": [attention["output"]],
                                  "granularity": self.granularity, "heads": heads}
        self.mark_applied(plan)

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        return f"attention output gated ({block['granularity']}, {block['heads']} heads)"

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        return ("gated attention",
                f"{block['granularity']} gate on `{block['output'][0]}`'s input, {block['heads']} heads")

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        # a clause: after GatedNorm's ("…, and "), before absorb-sinks' (lower-case) when those are present
        return ("every attention output is gated by σ(x·W_gᵀ) from W_g = 0 (g = ½) with o_proj's weight doubled"
                + (", and " if "absorb_sinks" in surgeon else ". "))
