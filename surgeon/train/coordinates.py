"""Optimizer steps in the source's coordinates (recipe `optimizer_coordinates: source`).

`smooth` stores w = m ⊙ u: the source weight u scaled per channel by a power of two m, which it records in
smooth_factors.safetensors (transforms/smooth.py). The function is the same, AdamW's trajectory is not: Adam moves
every element by about lr whatever its size, so a norm weight divided by 2^9 moves 2^9 times faster relative to
itself, and a column multiplied by 2^9 that much slower. On SmolLM2 (issue 6) that cost fp32 perplexity: +3.6% over
plain continued pretraining in the stored coordinates, +1.8% in the source's, at a higher W4A4 perplexity.

RescaledAdamW takes each step on u, exactly: for every parameter with a factor, w ← w / m and grad ← grad · m (the
chain rule: ∂L/∂u = m ⊙ ∂L/∂w), the AdamW step (its moments live in u's coordinates), then w ← w · m and the
gradient back. m is a power of two, so every conversion is exact and the weights between steps are the stored
ones: checkpoints, evaluation, QAT and export see nothing different. Gradient clipping (DeepSpeed's, before the
step) sees ∂L/∂w.

It needs an optimizer that steps the module's own parameters: ZeRO stage 0 in fp32, i.e. on CPU. Stages 1–3 and
bf16 step flattened master copies; `check_supported` refuses them before anything runs.
"""

from __future__ import annotations

import torch

from ..errors import SurgeonError

COORDINATES = ("stored", "source")


def check_supported(coordinates: str, zero_stage: int, gpu: bool) -> None:
    if coordinates != "source":
        return
    if zero_stage != 0 or gpu:
        where = f"ZeRO stage {zero_stage}" if zero_stage else "bf16 on the GPU"
        raise SurgeonError(f"optimizer_coordinates: source needs ZeRO stage 0 in fp32 (CPU), but this run has {where}, "
                           "whose optimizer steps flattened copies of the weights: use configs/zero0.json on CPU, or "
                           "optimizer_coordinates: stored")


class RescaledAdamW(torch.optim.AdamW):
    """torch AdamW whose steps on the parameters in `factors` ({parameter: m}) are AdamW steps on w / m."""

    def __init__(self, params, *, factors: dict[torch.nn.Parameter, torch.Tensor], **kwargs):
        super().__init__(params, **kwargs)
        mine = {id(p) for group in self.param_groups for p in group["params"]}
        self._factors = [(p, m.to(device=p.device, dtype=p.dtype)) for p, m in factors.items() if id(p) in mine]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise SurgeonError("RescaledAdamW does not take a closure")
        for p, m in self._factors:
            p.div_(m)
            if p.grad is not None:
                p.grad.mul_(m)
        try:
            return super().step()
        finally:
            for p, m in self._factors:
                p.mul_(m)
                if p.grad is not None:
                    p.grad.div_(m)
