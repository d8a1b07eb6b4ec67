"""The modeling code written into converted checkpoints, and its registration with transformers' Auto classes.

Importing this package registers every surgeon family (AutoConfig, AutoModelForCausalLM), so a converted checkpoint
loads without trust_remote_code; every surgeon path that builds or loads a model comes through here first.
"""

import os
from pathlib import Path

import torch

# transformers imports DeepSpeed while it loads or saves a model; without a GPU, DeepSpeed warns while it guesses the
# CPU. Decided here, before the first transformers model import below, with the torch this package needs anyway.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

from .modeling_surgeon import (  # noqa: E402
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

register()

__all__ = [
    "BASE_MODEL_TYPES", "CLASSES", "GLU_ACTIVATION", "MODELING_FILE", "AnnealedGLUActivation", "HadamardInput",
    "SurgeonRMSNorm", "annealed_glu_reference", "block_hadamard_reference", "gated_norm_reference", "hadamard_block",
    "needs_surgeon_modules", "register", "rms_norm_reference", "set_glu_alpha", "surgeon_model_type",
]
