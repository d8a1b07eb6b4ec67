"""Small helpers every measuring hook shares: the model inside a wrapper, and one thread for small reductions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when given a wrapper (DeepSpeed engine, DDP) that keeps it as `.module`."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


@contextmanager
def single_thread(x: torch.Tensor) -> Iterator[None]:
    """One intra-op thread for small memory-bound reductions on CPU tensors: as fast as two, and on a shared
    machine a second thread waiting for a busy core makes them several times slower (measured on SmolLM2's
    per-step pressure statistics, 2 shared cores: 0.65 s with one thread, 3.5 s with two; scan's per-layer sums
    ~20× slower)."""
    if x.device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
