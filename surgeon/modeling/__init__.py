"""The modeling code written into converted checkpoints, and its registration with transformers' Auto classes."""

from pathlib import Path

from .modeling_surgeon import (
    BASE_MODEL_TYPES,
    CLASSES,
    GLU_ACTIVATION,
    AnnealedGLUActivation,
    HadamardInput,
    SurgeonRMSNorm,
    annealed_glu_reference,
    block_hadamard_reference,
    gated_norm_reference,
    hadamard_block,
    needs_surgeon_modules,
    register,
    rms_norm_reference,
    set_glu_alpha,
    surgeon_model_type,
)

# The file copied verbatim into every converted checkpoint (named in its auto_map).
MODELING_FILE = Path(__file__).with_name("modeling_surgeon.py")

__all__ = [
    "BASE_MODEL_TYPES", "CLASSES", "GLU_ACTIVATION", "MODELING_FILE", "AnnealedGLUActivation", "HadamardInput",
    "SurgeonRMSNorm", "annealed_glu_reference", "block_hadamard_reference", "gated_norm_reference", "hadamard_block", "needs_surgeon_modules", "register", "rms_norm_reference",
    "set_glu_alpha", "surgeon_model_type",
]
