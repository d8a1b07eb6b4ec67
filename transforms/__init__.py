"""Transform passes. Each edits a Plan (surgeon/plan.py) and is function-preserving at its identity init (GLU
only at α = 0, its annealing start); each file states its math at the top and its invariant is proved in the
tests. A transform has `name` (its CLI name), `key` (its block in config["surgeon"]) and `apply(plan)`;
`preserves_function` (default true) tells --verify whether the logits must match; `module_pass` says whether it
inserts (or works through) the paper's norm modules — what a control run (`surgeon pipeline --control`) leaves
out, keeping every other pass."""

from .absorb_sinks import AbsorbSinks
from .base import RESIDUAL_READERS, NormTransform
from .gated_norm import DEFAULT_RANK, GatedNorm
from .glu import GLU
from .hadamard import Hadamard
from .pre_affine import PreAffine
from .smooth import Smooth

TRANSFORMS = {cls.name: cls for cls in (GatedNorm, PreAffine, AbsorbSinks, GLU, Smooth, Hadamard)}

__all__ = ["DEFAULT_RANK", "GLU", "RESIDUAL_READERS", "Hadamard", "TRANSFORMS", "AbsorbSinks", "GatedNorm", "NormTransform",
           "PreAffine", "Smooth"]
