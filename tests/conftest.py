"""Shared test set-up. TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here,
before surgeon (and so surgeon.kernels) is imported by any test."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
