"""Shared test set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, before surgeon (and so
surgeon.kernels) is imported by any test. The repository root is taken off sys.path (`python -m pytest` puts
it there): its `kernels/` folder would shadow the PyPI package `kernels` that transformers probes for; the
package is imported as `surgeon.kernels` through the install instead.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers such as tiny.py


@pytest.fixture(scope="module")
def restore_environment():
    """In-process training makes this process a group of one (RANK, MASTER_PORT, ...): a module that trains takes
    this fixture (autouse there) so later modules get the environment back."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
