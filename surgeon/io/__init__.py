"""Checkpoint IO: lazy reading, streaming sharded writing, all-or-nothing output directories."""

from .atomic import check_destination, final_path, staged_directory
from .reader import Checkpoint, TensorInfo
from .writer import TensorSpec, parse_size, write_sharded

__all__ = ["Checkpoint", "TensorInfo", "TensorSpec", "check_destination", "final_path", "parse_size", "staged_directory",
           "write_sharded"]
