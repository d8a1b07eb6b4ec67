"""SwiGLU / GeGLU → GLU, annealed (DESIGN §3).

    SwiGLU   down(up(x) ⊙ φ(gate(x)))              GLU   down(up(x) ⊙ σ(gate(x)))
    act_α(z) = (1 − α)·φ(z) + α·σ(z)               α = 0: φ (bit for bit);  α = 1: σ (bit for bit)

φ is the family's activation: silu for SwiGLU (Llama, Qwen, Mistral…), a GELU for GeGLU (Gemma's
gelu_pytorch_tanh); it is recorded in the surgeon block (`from`). φ(z) ≠ σ(z), so the two differ and cannot be swapped without changing the function: the MLP activation of
every dense MLP, expert and shared expert (the architecture data's `mlp.activation_modules`) becomes act_α, with
α in the config (`surgeon.glu.alpha`) and in a non-persistent buffer of each activation module, which a trainer
drives from 0 to 1 (`surgeon.modeling.set_glu_alpha`). No tensor changes and none is added.

At α = 0 (the default) the pass is function-preserving. `alpha=1` converts directly, with a warning: the model
then is a stock GLU model (`hidden_act: "sigmoid"`), written with its stock model_type and no custom code when it
carries no other surgeon module; `--verify` reports by how much the logits moved instead of failing.
Invariant (tests/test_absorb_glu_moe.py): α = 0 gives identical logits; α = 1 loads in stock transformers without
remote code and equals the source model computed with `hidden_act="sigmoid"`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from surgeon.errors import SurgeonError
from surgeon.modeling import GLU_ACTIVATION
from surgeon.plan import Plan

from .base import Option, Pass

# the gated-MLP activations a GLU anneal can start from: SwiGLU's and GeGLU's (transformers' ACT2FN names)
GATED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_accurate")


@dataclass
class GLU(Pass):
    alpha: float = 0.0
    name = "glu"
    key = "glu"
    options = (Option(("--glu-alpha",), "alpha", dict(
        type=float, default=0.0, help="α of act_α = (1−α)·φ + α·σ (φ: the MLP's silu or GELU): 0 (default) keeps the function for "
                                      "annealing in training; 1 converts to GLU directly (changes the function; a "
                                      "stock model if nothing else is added)")),)

    def __post_init__(self):
        try:
            self.alpha = float(self.alpha)
        except (TypeError, ValueError):
            self.alpha = math.nan
        if not 0.0 <= self.alpha <= 1.0:
            raise SurgeonError(f"--glu-alpha must lie in [0, 1] (0 keeps the function, 1 is GLU); got {self.alpha}")

    @property
    def preserves_function(self) -> bool:
        return self.alpha == 0.0

    def check(self, plan: Plan) -> None:
        if self.key in plan.surgeon:
            raise SurgeonError(f"the model already has glu (α = {plan.surgeon[self.key].get('alpha')}); converting "
                               "again would anneal twice: convert the original checkpoint instead")

    def apply(self, plan: Plan, calibration=None) -> None:
        arch = plan.arch
        self.check(plan)
        act_key, targets = arch.mlp.get("activation"), arch.activation_modules
        if not act_key or not targets:
            raise SurgeonError(f"the {arch.model_type} architecture data names no MLP activation "
                               f"(mlp.activation, mlp.activation_modules): glu cannot be applied")
        act = plan.config.get(act_key)
        if act == GLU_ACTIVATION:
            raise SurgeonError(f"the model already is a GLU model ({act_key}: {act!r}): nothing to anneal")
        if act not in GATED_ACTIVATIONS:
            raise SurgeonError(f"glu anneals a SwiGLU or GeGLU MLP ({act_key} one of {', '.join(GATED_ACTIVATIONS)}); "
                               f"this model's {act_key} is {act!r}")
        if self.alpha == 1.0:
            warnings.warn("glu at α = 1 changes the function: the MLPs become GLU (sigmoid); continued training, "
                          "not this conversion, recovers the model's quality", stacklevel=2)
            plan.config[act_key] = GLU_ACTIVATION
        elif self.alpha > 0.0:
            warnings.warn(f"glu at α = {self.alpha:g} changes the function (only α = 0 preserves it)", stacklevel=2)
        plan.surgeon[self.key] = {"alpha": self.alpha, "targets": list(targets), "activation_key": act_key,
                                  "from": act, "to": GLU_ACTIVATION}
        self.mark_applied(plan)

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        return f"{_family(block)} annealed towards GLU, α {block['alpha']:g}"

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        return f"{_family(block)} → GLU, α", f"{block['alpha']:g}"


def _family(block: dict) -> str:
    return "SwiGLU" if block.get("from", "silu") in ("silu", "swish") else "GeGLU"
