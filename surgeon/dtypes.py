"""Dtype names as users write them (fp32, bf16, fp16; the torch spellings too)."""

from __future__ import annotations

import torch

from .errors import SurgeonError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (None stays None: "as stored")."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = name.lower()
    try:
        return DTYPES[_ALIASES.get(key, key)]
    except KeyError:
        raise SurgeonError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
