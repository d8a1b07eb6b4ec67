"""surgeon: model surgery for Hugging Face causal LMs (GatedNorm, PreAffine, sink absorption).

Importing surgeon is cheap: no torch, no transformers (the CLI answers `--help` and `inspect` without them).
Importing `surgeon.modeling` registers surgeon's model families with transformers' Auto classes — surgeon's own
loaders do — so converted checkpoints then load without trust_remote_code; stock transformers loads them as remote
code.
"""

__version__ = "0.1.0"
