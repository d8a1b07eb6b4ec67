"""Hadamard: rotate the inputs of the dense linear layers online (QuaRot's online Hadamard, Ashkboos et al. 2024),
so that A4's one scale per token no longer has to cover a few spiking channels.

For a linear layer y = x·Wᵀ and an orthonormal, symmetric H (so H⁻¹ = Hᵀ = H):

    y = (x·H)·(W·H)ᵀ          stored: W ← W·H (folded here, once);  computed: x ← x·H (online, in the model)

H is block-diagonal: the Sylvester Hadamard matrix H_b / √b on every block of b consecutive input features, b the
largest power of two dividing in_features (SmolLM2: 64 of 576 for q/k/v, o and gate/up, 512 of 1536 for down).
A spike in one channel of a token is spread over its block (÷√b), so the token's INT4 scale, set by its largest
value, no longer crushes the others; the weights' groups of 32 see rotated columns, a little harder to quantize.
Measured on the converted SmolLM2 (smoothed, before training; 8 × 256 held-out tokens): INT4 W4A4 perplexity
636 → 116 with every group rotated (down alone: 245), NVFP4 72 → 78.

The rotation cannot be folded into the norm or the previous linear (an RMSNorm scales, a SwiGLU is not linear),
so the model computes x·H: the modeling file's forward pre-hook, in every group's linears (config
`surgeon.hadamard.groups`); a block above 64 runs as two small matmuls, H_a·X·H_b with a·b = block. Groups are the
architecture data's `linear_inputs`: attention_in (q/k/v), attention_out (o), mlp_in (gate/up), mlp_out (down);
the linears of a group read one tensor, rotated once.

The function is the same up to float rounding (H is not a power of two): the weights are rotated in float64 and
rounded once to their dtype; fp32 logits move by ~1e-6 relative (--verify's 1e-5 holds). Order with smooth: smooth
first (its scales and recorded factors are per channel of the unrotated input); smooth on a rotated model is
refused. A smoothed model's factors file stays as smooth wrote it, stored = (source ⊙ m)·H, which training in the
source's coordinates undoes (surgeon.train.coordinates); when smooth ran in an earlier convert and hadamard is this
convert's first pass, the file comes along (read by the caller, surgeon.calibrate). Dense families only (MoE
experts are fused parameters).

Invariant (tests/test_hadamard.py): logits equal the source's within fp32 rounding on every dense family; every
rotated weight equals the source weight times H exactly as the formula says (float64); a rotated linear's input
is x·H; applied twice is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from surgeon.calibrate import Calibration, Needs
from surgeon.errors import SurgeonError
from surgeon.io.smooth_factors import FACTORS_FILE, FACTORS_FORMAT
from surgeon.modeling import block_hadamard_reference, hadamard_block
from surgeon.plan import Plan

from .base import Option, Pass
from .gated_attention import GATE

GROUPS = ("attention_in", "attention_out", "mlp_in", "mlp_out")


def rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """W·H along the input axis (blocks of `block`), computed in float64 and rounded once to w's dtype."""
    return block_hadamard_reference(w.double(), block).to(w.dtype)


@dataclass
class Hadamard(Pass):
    groups: tuple[str, ...] = GROUPS
    max_block: int | None = None  # a power of two: blocks no larger (16 = NVFP4's blocks: each quantized block is
    # rotated within itself, so no spike spreads into a neighbouring block's scale)
    name = "hadamard"
    key = "hadamard"
    changes_linear_inputs = True
    after = MappingProxyType({"smooth": "smooth's scales are per channel of the unrotated inputs",
                              "gated-attention": "the attention gate reads q/k/v's input: it is rotated with them"})
    options = (Option(("--hadamard-groups",), "groups", dict(
        default=",".join(GROUPS), help="the linear inputs rotated online, comma-separated (default: all, "
                                       "%(default)s)")),
               Option(("--hadamard-max-block",), "max_block", dict(
                   type=int, default=None, help="largest rotation block, a power of two (default: the largest "
                                                "power of two dividing each input width)")))

    def __post_init__(self):
        if isinstance(self.groups, str):
            self.groups = tuple(g.strip() for g in self.groups.split(",") if g.strip())
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown or not self.groups:
            raise SurgeonError(f"unknown hadamard group {unknown[0] if unknown else '(none)'!r}; choose from "
                               f"{', '.join(GROUPS)}")
        if self.max_block is not None and (self.max_block < 2 or self.max_block & (self.max_block - 1)):
            raise SurgeonError(f"--hadamard-max-block {self.max_block} is not a power of two ≥ 2: use e.g. 16 or 64")

    def check(self, plan: Plan) -> None:
        if self.key in plan.surgeon:
            raise SurgeonError("the model already has hadamard rotations: rotating again would not undo them, but "
                               "double the online work: convert the original checkpoint instead")

    @staticmethod
    def carries_factors(plan: Plan) -> bool:
        """Smoothed by an earlier convert and nothing else rewritten since: its factors still lead back to the
        source (the rotation composes with them, surgeon.train.coordinates)."""
        return "smooth" in plan.surgeon and FACTORS_FILE not in plan.side_tensors and not plan.applied

    def needs(self, plan: Plan) -> Needs:
        return Needs(factors=self.carries_factors(plan))

    def apply(self, plan: Plan, calibration: Calibration | None = None) -> None:
        self.check(plan)
        arch = plan.arch
        missing = [g for g in self.groups if g not in arch.linear_inputs]
        if missing:
            raise SurgeonError(f"hadamard does not support {arch.model_type}: its architecture data names no "
                               f"{missing[0]} linears (linear_inputs in surgeon/architectures/{arch.model_type}.json); "
                               "the MoE families' fused experts are not supported")
        record = {}
        for group in self.groups:
            patterns = list(arch.linear_inputs[group])
            if group == "attention_in" and "gated_attention" in plan.surgeon:  # the gate reads what q/k/v read
                patterns += [f"{p}.{GATE}" for p in plan.surgeon["gated_attention"]["targets"]]
            weights = [f"{module}.weight" for pattern in patterns for module in plan.expand(pattern)]
            widths = set()
            for name in weights:
                shape = tuple(plan.require(name).spec.shape)
                if len(shape) != 2:
                    raise SurgeonError(f"hadamard rotates linear layers; {name} has shape {shape}")
                widths.add(shape[1])
            if len(widths) != 1:
                raise SurgeonError(f"the {group} linears read inputs of different widths {sorted(widths)}: they "
                                   "cannot share one rotation")
            (width,) = widths
            block = hadamard_block(width)
            if self.max_block is not None:
                block = min(block, self.max_block)
            if block < 2:
                raise SurgeonError(f"the {group} input has {width} features, an odd number: no Hadamard block fits")
            for name in weights:
                plan.rewrite(name, lambda t, b=block: rotate_weight(t, b))
            record[group] = {"linears": patterns, "block": block, "features": width}
        entries = calibration.factors if calibration is not None and self.carries_factors(plan) else None
        if entries is not None:
            plan.side_tensors[FACTORS_FILE] = (entries, {"format": FACTORS_FORMAT})
        plan.surgeon[self.key] = {"groups": record, "targets": [p for g in record.values() for p in g["linears"]]}
        self.mark_applied(plan)

    @classmethod
    def describe(cls, block: dict, *, text: str = "calibration") -> str:
        groups = block.get("groups")
        if not groups:
            return ""
        rotated = ", ".join(f"{g} (blocks of {v['block']})" for g, v in groups.items())
        return f"inputs of {rotated} Hadamard-rotated"

    @classmethod
    def card_row(cls, block: dict) -> tuple[str, str]:
        return ("Hadamard-rotated linear inputs (online)",
                ", ".join(f"{g} (blocks of {v['block']})" for g, v in block["groups"].items()))

    @classmethod
    def explain(cls, surgeon: dict) -> str:
        return ("The hadamard pass multiplies every q/k/v, o, gate/up and down_proj weight by a block-diagonal "
                "Hadamard matrix H on its input side, and the model multiplies the layer's input by H as it runs "
                "(H·H = 1: the same function up to float rounding): a channel that spikes in one token is spread "
                "over its block, so INT4's one scale per token no longer rounds that token's other channels to "
                "zero. ")


def rotated_blocks(surgeon: dict, names) -> dict[str, int]:
    """{tensor name: Hadamard block} of the `names` (checkpoint tensor names) that the `surgeon` block rotates."""
    from surgeon.modeling.modeling_surgeon import target_regex

    out = {}
    for group in ((surgeon or {}).get("hadamard") or {}).get("groups", {}).values():
        regex = target_regex([f"{p}.weight" for p in group["linears"]])
        out.update({n: int(group["block"]) for n in names if regex.match(n)})
    return out
