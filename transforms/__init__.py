"""Transform passes. Each edits a Plan (surgeon/plan.py) and is function-preserving at its identity init (GLU
only at α = 0, its annealing start); each file states its math at the top and its invariant is proved in the
tests. A pass (transforms/base.py `Pass`) has `name` (its CLI name), `key` (its block in config["surgeon"]) and
`apply(plan, calibration)`, and owns what is said about it elsewhere: its `surgeon convert` options (`options`,
`from_args`), the passes that must come before it (`after`, checked by convert()), what it needs measured on the
source (`needs`, computed by the caller: surgeon/calibrate.py), and how the report describes it (`describe`,
`explain`). `preserves_function` (default true) tells --verify whether the logits must match; `module_pass` says
whether it inserts (or works through) the paper's norm modules — what a control run (`surgeon pipeline
--control`) leaves out, keeping every other pass."""

from .absorb_sinks import AbsorbSinks
from .base import RESIDUAL_READERS, NormTransform, Option, Pass
from .gated_attention import GatedAttention
from .gated_norm import DEFAULT_RANK, GatedNorm
from .glu import GLU
from .hadamard import Hadamard
from .pre_affine import PreAffine
from .smooth import Smooth

# in the main job's order (the CLI's option groups follow it)
TRANSFORMS = {cls.name: cls for cls in (GatedNorm, GatedAttention, PreAffine, AbsorbSinks, Smooth, Hadamard, GLU)}

__all__ = ["DEFAULT_RANK", "GLU", "RESIDUAL_READERS", "Hadamard", "TRANSFORMS", "AbsorbSinks", "GatedAttention",
           "GatedNorm", "NormTransform", "Option", "Pass", "PreAffine", "Smooth"]
