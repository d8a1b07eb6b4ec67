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

A rotated linear (the hadamard pass) stores w = (u ⊙ m)·H, H its block Hadamard (orthonormal, H⁻¹ = H): then
u = (w·H) / m and ∂L/∂u = m ⊙ (∂L/∂w·H), and back w = (u ⊙ m)·H. H is not a power of two, so these conversions
round (~1e-7 relative a step, in fp32) where the smooth factors alone are exact. AdamW's step is not rotation
invariant (its second moment is per element), so without this a rotated linear would train differently from its
source.

It needs an optimizer that steps the module's own parameters: ZeRO stage 0 in fp32, i.e. on CPU. Stages 1–3 and
bf16 step flattened master copies; `check_supported` refuses them before anything runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import SurgeonError
from ..modeling import block_hadamard_reference

COORDINATES = ("stored", "source")


@dataclass(frozen=True)
class ToSource:
    """How a stored weight w relates to its source u: w = (u ⊙ factor)·H_block (factor None: 1; block None: no H)."""

    factor: torch.Tensor | None = None
    block: int | None = None


def source_maps(model_dir: str | os.PathLike) -> dict[str, ToSource]:
    """{tensor name: ToSource} of a converted model: smooth's recorded factors and hadamard's rotations; empty when
    the stored weights are the source's."""
    from surgeon.io import Checkpoint
    from surgeon.transforms.hadamard import rotated_blocks
    from surgeon.io.smooth_factors import load_factors

    ckpt = Checkpoint(model_dir)
    block = ckpt.config.get("surgeon") or {}
    factors = load_factors(model_dir, {n: t.shape for n, t in ckpt.tensors.items()}) if "smooth" in block else {}
    blocks = rotated_blocks(block, ckpt.tensors)
    return {n: ToSource(factors.get(n), blocks.get(n)) for n in {**factors, **blocks}}


def check_supported(coordinates: str, zero_stage: int, gpu: bool) -> None:
    if coordinates != "source":
        return
    if zero_stage != 0 or gpu:
        where = f"ZeRO stage {zero_stage}" if zero_stage else "bf16 on the GPU"
        raise SurgeonError(f"optimizer_coordinates: source needs ZeRO stage 0 in fp32 (CPU), but this run has {where}, "
                           "whose optimizer steps flattened copies of the weights: use configs/zero0.json on CPU, or "
                           "optimizer_coordinates: stored")


def _rotate(t: torch.Tensor, block: int | None) -> None:
    if block:
        t.copy_(block_hadamard_reference(t, block))


class RescaledAdamW(torch.optim.AdamW):
    """torch AdamW whose steps on the parameters in `maps` ({parameter: ToSource}) are AdamW steps on their source
    coordinates u (w = (u ⊙ m)·H)."""

    def __init__(self, params, *, maps: dict[torch.nn.Parameter, ToSource], **kwargs):
        super().__init__(params, **kwargs)
        mine = {id(p) for group in self.param_groups for p in group["params"]}
        self._maps = [(p, None if t.factor is None else t.factor.to(device=p.device, dtype=p.dtype), t.block)
                      for p, t in maps.items() if id(p) in mine]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise SurgeonError("RescaledAdamW does not take a closure")
        for p, m, block in self._maps:  # u = (w·H) / m, ∂L/∂u = m ⊙ (∂L/∂w·H)
            _rotate(p, block)
            if m is not None:
                p.div_(m)
            if p.grad is not None:
                _rotate(p.grad, block)
                if m is not None:
                    p.grad.mul_(m)
        try:
            return super().step()
        finally:
            for p, m, block in self._maps:  # w = (u ⊙ m)·H, and the gradient back
                if m is not None:
                    p.mul_(m)
                _rotate(p, block)
                if p.grad is not None:
                    if m is not None:
                        p.grad.div_(m)
                    _rotate(p.grad, block)
