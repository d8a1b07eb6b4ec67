"""surgeon: model surgery for Hugging Face causal LMs (GatedNorm, PreAffine, sink absorption).

Importing surgeon registers its model families with transformers' Auto classes, so converted checkpoints load
without trust_remote_code.
"""

import os

__version__ = "0.1.0"

# transformers imports DeepSpeed when it is installed; without a GPU, DeepSpeed warns while it guesses the CPU.
if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"

from .modeling import register as _register

_register()
