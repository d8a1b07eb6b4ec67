"""Write tensors into sharded safetensors files, streaming one tensor at a time.

A plan knows every output tensor's name, dtype and shape before any data is read, so each shard's header can
be written first and its tensors appended as they are produced: peak memory is the largest tensor, not a
shard or a model (the safetensors library's `save_file` needs the whole shard in memory). The format is the
documented one: 8-byte little-endian header length, a JSON header padded with spaces to 8 bytes, then the
tensors' bytes back to back in header order. Files are named `model-0000i-of-0000N.safetensors`, with
`model.safetensors.index.json` beside them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SurgeonError
from .atomic import final_path
from .reader import SAFE_DTYPES, SAFE_INDEX

TORCH_TO_SAFE = {dtype: name for name, dtype in SAFE_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', or a byte count."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    try:
        value = float(num) * units[s[len(num):]]
    except (ValueError, KeyError):
        raise SurgeonError(f"shard size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise SurgeonError(f"shard size {text!r} must be positive")
    return int(value)


def layout_shards(specs: Sequence[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard closes when the next tensor would take it past `shard_size`
    (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        if spec.dtype not in TORCH_TO_SAFE:
            raise SurgeonError(f"tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot store")
        header[spec.name] = {"dtype": TORCH_TO_SAFE[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    # A uint8 view of contiguous memory: no copy for tensors already contiguous (the usual case).
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A write's OSError names the file (`fh.write` raises EFBIG / ENOSPC without one), for the CLI's one line."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:  # an errno-less OSError keeps its own words
            err.filename = str(final_path(path))
        err.surgeon_action = "writing"  # what the CLI's line says was being done (errors.os_error_line)
        raise


def write_sharded(
    out_dir: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    shard_size: int,
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[TensorSpec], None] | None = None,
) -> list[Path]:
    """Write `specs` in order into shards under `out_dir`, calling `produce(spec)` for each tensor's data.
    Returns the shard paths; writes the index too."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SurgeonError("the plan names a tensor twice; this is a bug in a transform")
    metadata = {"format": "pt", **(metadata or {})}
    shards = layout_shards(specs, shard_size)
    paths = []
    weight_map = {}
    for i, shard in enumerate(shards):
        path = out_dir / shard_name(i, len(shards))
        with _naming(path), open(path, "wb") as fh:
            fh.write(_header(shard, metadata))
            for spec in shard:
                tensor = produce(spec)
                if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise SurgeonError(
                        f"tensor {spec.name!r} came out {tensor.dtype} {tuple(tensor.shape)}, planned "
                        f"{spec.dtype} {spec.shape}; this is a bug in a transform"
                    )
                fh.write(_tensor_bytes(tensor))
                del tensor  # before the next one is produced: peak memory stays one tensor
                weight_map[spec.name] = path.name
                if on_tensor is not None:
                    on_tensor(spec)
        paths.append(path)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs),
                          "total_parameters": sum(s.nbytes // s.dtype.itemsize for s in specs)},
             "weight_map": weight_map}
    with _naming(out_dir / SAFE_INDEX):
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths
