"""The rewrite plan: every output tensor's name, dtype and shape, and how to produce its data.

Transforms edit a plan, never tensors: they wrap a source tensor's producer (e.g. λ ← 2λ), add new tensors
with their initializers, and edit the config. Nothing is read until the writer asks for a tensor, so a plan for
a model of any size costs kilobytes, and data flows one way: read → plan → rewrite → write.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .architectures import Architecture, for_config
from .errors import SurgeonError
from .io import Checkpoint, TensorSpec

Producer = Callable[[], torch.Tensor]


def offset_scale(stored: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                 offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For a norm that stores λ − offset: (the tensor stored for the scale fn(λ), the λ' it computes in fp32 — not
    fn(λ) wherever fn(λ) − offset rounds in the stored dtype)."""
    new = (fn(stored.float() + offset) - offset).to(stored.dtype)
    return new, new.float() + offset


@dataclass
class PlannedTensor:
    spec: TensorSpec
    produce: Producer
    origin: str  # "source" | "rewritten" | "new"


class Plan:
    def __init__(self, source: Checkpoint, seed: int = 0):
        self.source = source
        self.arch: Architecture = for_config(source.config)
        self.config: dict = copy.deepcopy(source.config)
        self.seed = seed
        self.applied: list[str] = []
        # extra safetensors files written beside the weights: {file name: ({key: tensor}, metadata)}
        self.side_tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
        self._order: list[str] = []
        self.tensors: dict[str, PlannedTensor] = {}
        for name, info in source.tensors.items():
            self._order.append(name)
            self.tensors[name] = PlannedTensor(
                TensorSpec(name, info.dtype, info.shape), (lambda n=name: source.get(n, scratch=True)), "source"
            )

    # -- what transforms call ---------------------------------------------------------------------

    @property
    def surgeon(self) -> dict:
        """The config's `surgeon` block (created on first use)."""
        return self.config.setdefault("surgeon", {})

    def expand(self, pattern: str) -> list[str]:
        return self.arch.expand(pattern, self.config)

    def require(self, name: str) -> PlannedTensor:
        if name not in self.tensors:
            raise SurgeonError(
                f"the checkpoint has no tensor {name!r}, which the {self.arch.model_type} architecture data "
                "expects; the checkpoint does not match its config"
            )
        return self.tensors[name]

    def rewrite(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace a tensor's data by fn(data); dtype and shape must stay. `data` may live in the reader's
        scratch buffer: fn may change it in place, but must not keep it."""
        entry = self.require(name)
        inner = entry.produce
        entry.produce = lambda: fn(inner())
        entry.origin = "rewritten" if entry.origin == "source" else entry.origin

    def rewrite_scale(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """rewrite() of a tensor the model multiplies by: fn sees the scale λ. For a norm of a family that stores
        λ − offset (Gemma's x·(1 + w)) that is offset + w, computed in fp32 as those families compute it, and λ − offset
        is stored; for every other tensor, the data itself."""
        offset = self.arch.norm_offset_of(name)
        if not offset:
            self.rewrite(name, fn)
            return
        self.rewrite(name, lambda t: offset_scale(t, fn, offset)[0])

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, produce: Producer, after: str) -> None:
        if name in self.tensors:
            raise SurgeonError(f"tensor {name!r} already exists; the transform was applied before")
        self._order.insert(self._order.index(after) + 1, name)
        self.tensors[name] = PlannedTensor(TensorSpec(name, dtype, tuple(shape)), produce, "new")

    def generator(self, name: str) -> torch.Generator:
        """A generator seeded by (seed, tensor name): initial values do not depend on the writing order."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))

    def cast(self, dtype: torch.dtype) -> None:
        """Store every floating-point tensor as `dtype` (new tensors added afterwards choose their own)."""
        for entry in self.tensors.values():
            if entry.spec.dtype.is_floating_point and entry.spec.dtype != dtype:
                inner = entry.produce
                entry.produce = lambda inner=inner: inner().to(dtype)
                entry.spec = TensorSpec(entry.spec.name, dtype, entry.spec.shape)
        dtype_name = str(dtype).removeprefix("torch.")
        self.config["dtype"] = dtype_name
        if "torch_dtype" in self.config:
            self.config["torch_dtype"] = dtype_name

    # -- what the writer calls --------------------------------------------------------------------

    def specs(self) -> list[TensorSpec]:
        return [self.tensors[n].spec for n in self._order]

    def produce(self, spec: TensorSpec) -> torch.Tensor:
        return self.tensors[spec.name].produce()

    def count(self, origin: str) -> int:
        return sum(1 for e in self.tensors.values() if e.origin == origin)

    @property
    def num_parameters(self) -> int:
        return sum(s.nbytes // s.dtype.itemsize for s in self.specs())
