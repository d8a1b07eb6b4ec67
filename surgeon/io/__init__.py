"""Checkpoint IO: lazy reading, streaming sharded writing, all-or-nothing output directories.

The names below are imported on first use (PEP 562), so `surgeon.io.headers` — what `surgeon inspect` reads —
comes without torch. `hf_dir` (the Hugging Face directory around the weights: model type, side files, modeling
files, manifest) and `ds_checkpoint` (a DeepSpeed training checkpoint as one state dict, weights-only) are imported
by module path, so that reading a checkpoint does not load the model classes or DeepSpeed.
"""

import importlib

_EXPORTS = {"Checkpoint": "reader", "TensorInfo": "reader", "TensorSpec": "writer", "parse_size": "writer",
            "write_sharded": "writer", "check_destination": "atomic", "final_path": "atomic",
            "staged_directory": "atomic"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
