"""Checkpoint IO: lazy reading, streaming sharded writing, all-or-nothing output directories.

Imported by module path, not re-exported here, so that reading a checkpoint does not load the model classes or
DeepSpeed: `hf_dir` (the Hugging Face directory around the weights: model type, side files, modeling files,
manifest) and `ds_checkpoint` (a DeepSpeed training checkpoint as one state dict, weights-only).
"""

from .atomic import check_destination, final_path, staged_directory
from .reader import Checkpoint, TensorInfo
from .writer import TensorSpec, parse_size, write_sharded

__all__ = ["Checkpoint", "TensorInfo", "TensorSpec", "check_destination", "final_path", "parse_size", "staged_directory",
           "write_sharded"]
