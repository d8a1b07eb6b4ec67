"""The modeling code written into converted checkpoints, and its registration with transformers' Auto classes."""

from pathlib import Path

from .modeling_surgeon import (
    BASE_MODEL_TYPES,
    CLASSES,
    SurgeonRMSNorm,
    gated_norm_reference,
    register,
    rms_norm_reference,
    surgeon_model_type,
)

# The file copied verbatim into every converted checkpoint (named in its auto_map).
MODELING_FILE = Path(__file__).with_name("modeling_surgeon.py")

__all__ = [
    "BASE_MODEL_TYPES", "CLASSES", "MODELING_FILE", "SurgeonRMSNorm", "gated_norm_reference", "register",
    "rms_norm_reference", "surgeon_model_type",
]
