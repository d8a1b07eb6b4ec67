"""GatedNorm insertion (paper §3.4), identity-initialized.

    y = N(x),  g = σ(W_up · silu(W_down · y)),  out = g ⊙ y,    W_down ∈ R^{r×d}, W_up ∈ R^{d×r}

Identity: W_up = 0 makes g = σ(0) = ½ everywhere, so λ ← 2λ compensates exactly (a power of two: exact in
every float format). W_down ~ N(0, 1/d) gives W_down·y unit scale, so the gate can learn to move each
dimension anywhere in (0, 2)× its original value.
Invariant (tests/test_convert.py): logits equal the source's; added per norm: exactly `gate_down.weight`
(r, d) and `gate_up.weight` (d, r) = 0, with `weight` doubled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from surgeon.errors import SurgeonError
from surgeon.plan import Plan

from .base import QK_NORM, TARGETS, NormTransform, Option

DEFAULT_RANK = 16


@dataclass
class GatedNorm(NormTransform):
    rank: int = DEFAULT_RANK
    name = "gated-norm"
    key = "gated_norm"
    module_pass = True  # inserts the paper's module: `pipeline --control` leaves it out
    options = (Option(("--rank",), "rank", dict(type=int, default=DEFAULT_RANK,
                                                 help="GatedNorm rank r (default %(default)s)")), TARGETS, QK_NORM)

    def __post_init__(self):
        if not 1 <= self.rank <= 4096:
            raise SurgeonError(f"gate rank {self.rank} is out of range; use a positive rank such as 16")

    def record(self) -> dict:
        return {"rank": self.rank}

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        return f"rank {block['rank']}"

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        joined = "absorb_sinks" in surgeon or "gated_attention" in surgeon  # their clauses follow
        return "the gates are identity-initialized" + (", and " if joined else ". ")

    def rewrite_norm(self, plan: Plan, norm: str) -> None:
        weight = plan.require(f"{norm}.weight").spec
        (d,) = weight.shape
        plan.rewrite_scale(weight.name, lambda w: w * 2)  # λ ← 2λ (Gemma: 1 + w ← 2(1 + w))
        down, up = f"{norm}.gate_down.weight", f"{norm}.gate_up.weight"
        std = 1.0 / math.sqrt(d)

        def init_down(name=down, dtype=weight.dtype):
            return torch.randn(self.rank, d, generator=plan.generator(name)).mul_(std).to(dtype)

        plan.add(down, (self.rank, d), weight.dtype, init_down, after=weight.name)
        plan.add(up, (d, self.rank), weight.dtype, lambda: torch.zeros(d, self.rank, dtype=weight.dtype), after=down)
