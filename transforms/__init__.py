"""Transform passes. Each edits a Plan (surgeon/plan.py) and is function-preserving at its identity init;
each file states its math at the top and its invariant is proved in the tests."""

from .base import RESIDUAL_READERS, NormTransform
from .gated_norm import DEFAULT_RANK, GatedNorm
from .pre_affine import PreAffine

TRANSFORMS = {cls.name: cls for cls in (GatedNorm, PreAffine)}

__all__ = ["DEFAULT_RANK", "RESIDUAL_READERS", "TRANSFORMS", "GatedNorm", "NormTransform", "PreAffine"]
