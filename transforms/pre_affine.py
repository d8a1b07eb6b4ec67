"""PreAffine insertion (paper §3.3): a learnable vector before the norm, N(λ1 ⊙ x), identity at λ1 = 1.

Invariant (tests/test_convert.py): logits equal the source's; added per norm: exactly `pre_affine` (d,) = 1.
It is also where absorb-sinks puts the scales it takes out of the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from surgeon.plan import Plan

from .base import NormTransform


@dataclass
class PreAffine(NormTransform):
    name = "pre-affine"
    key = "pre_affine"
    module_pass = True  # inserts the paper's module: `pipeline --control` leaves it out

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        if "absorb_sinks" in surgeon:  # its clause says what the vectors hold
            return ""
        return "PreAffine starts at λ = 1, the identity, so every linear reads what the source's does. "

    def rewrite_norm(self, plan: Plan, norm: str) -> None:
        weight = plan.require(f"{norm}.weight").spec
        (d,) = weight.shape
        plan.add(f"{norm}.pre_affine", (d,), weight.dtype, lambda: torch.ones(d, dtype=weight.dtype),
                 after=weight.name)
