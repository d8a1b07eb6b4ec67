"""surgeon: model surgery for Hugging Face causal LMs (GatedNorm, PreAffine, sink absorption).

Importing surgeon registers its model families with transformers' Auto classes, so converted checkpoints load
without trust_remote_code.
"""

__version__ = "0.1.0"

from .modeling import register as _register

_register()
