"""Read a Hugging Face checkpoint directory one tensor at a time.

Safetensors (single file or sharded with an index): the safetensors library opens and validates each file
(header, dtypes, offsets against the file size); `get(name)` then reads that one tensor's bytes itself. A
plain memory map would leave every page read resident in this process until the file is closed, so peak
memory would grow with the model; the streaming path maps, uses, and drops one tensor at a time. PyTorch `.bin` files are opened with `weights_only=True`
(never an arbitrary unpickle) and `mmap=True`, so they stay lazy too.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SurgeonError
from .headers import (BIN_INDEX, DTYPE_NAMES, SAFE_INDEX, check_index_complete, load_bin, read_config,
                      safetensors_entries, weight_files)

SAFE_DTYPES = {code: getattr(torch, name) for code, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = -1  # absolute byte offset in a safetensors file (-1: read through the file's handle)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A checkpoint directory: its config and a lazy view of its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config: dict = read_config(self.path)
        self.files, weight_map = weight_files(self.path)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._last_scratch: tuple[mmap.mmap, int, int] | None = None
        for file in self.files:
            self._index_file(file)
        check_index_complete(weight_map, self.tensors)

    # -- discovery --------------------------------------------------------------------------------

    def _index_file(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            infos = [(n, SAFE_DTYPES[code], shape, offset) for n, code, shape, offset in safetensors_entries(file)]
            handle = None
        else:
            handle = load_bin(file)
            infos = [(n, t.dtype, tuple(t.shape), -1) for n, t in handle.items()]
        self._handles[file] = handle
        for name, dtype, shape, offset in infos:
            if name in self.tensors:
                raise SurgeonError(f"tensor {name!r} appears in two files of {self.path}; the checkpoint is inconsistent")
            self.tensors[name] = TensorInfo(name, file, dtype, shape, offset)

    # -- access -----------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str, *, scratch: bool = False) -> torch.Tensor:
        """One tensor, in memory of its own. With `scratch=True` it is instead a zero-copy view of a private
        map of the file, valid only until the next scratch read, whose pages are then dropped from this
        process (the streaming writer consumes each tensor at once; peak memory stays one tensor)."""
        info = self.tensors[name]
        return _check_finite(info, self._read(info, scratch))

    def _read(self, info: TensorInfo, scratch: bool) -> torch.Tensor:
        name = info.name
        if info.offset < 0:
            return self._handles[info.file][name]
        if scratch and info.nbytes:
            self._release_scratch()
            view = torch.frombuffer(self._map(info.file), dtype=torch.uint8, count=info.nbytes, offset=info.offset)
            if info.offset % info.dtype.itemsize == 0:  # a typed view needs element alignment
                self._last_scratch = (self._maps[info.file], info.offset, info.nbytes)
                return view.view(info.dtype).reshape(info.shape)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        buffer = memoryview(raw.numpy())
        fd = os.open(info.file, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                n = os.preadv(fd, [buffer[done:]], info.offset + done)
                if n == 0:
                    raise SurgeonError(f"{info.file.name} ended inside tensor {name!r}; it is truncated")
                done += n
        finally:
            os.close(fd)
        return raw.view(info.dtype).reshape(info.shape)

    def _map(self, file: Path) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as fh:
                # copy-on-write: a transform may change a scratch tensor in place without touching the file
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def _release_scratch(self) -> None:
        if self._last_scratch is not None:
            mm, offset, nbytes = self._last_scratch
            start = offset - offset % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, min(offset + nbytes, len(mm)) - start)
            self._last_scratch = None

    @property
    def num_parameters(self) -> int:
        return sum(info.numel for info in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def side_files(self) -> list[Path]:
        """Every file that is not weights, index or config: tokenizer, generation config, templates."""
        skip = {SAFE_INDEX, BIN_INDEX, "config.json"}
        weights = {f.resolve() for f in self.files}
        return sorted(
            p for p in self.path.iterdir()
            if p.is_file() and p.name not in skip and p.resolve() not in weights
            and not p.name.startswith(".") and p.suffix not in (".safetensors", ".bin")
        )


FINITE_CHUNK = 1 << 22  # elements checked at a time: the check's scratch stays a few MB, not a tensor's size


def _check_finite(info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Refuse a floating tensor holding NaN or ±inf: every read passes here, so the streaming rewrite checks each
    source tensor as it reads it, at no extra read."""
    if not tensor.dtype.is_floating_point or not tensor.numel():
        return tensor
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), FINITE_CHUNK):
        chunk = flat[start:start + FINITE_CHUNK]
        if chunk.dtype.itemsize == 1:  # float8: isfinite is not implemented for it everywhere
            chunk = chunk.float()
        finite = torch.isfinite(chunk)
        if not bool(finite.all()):
            bad = start + int((~finite).nonzero()[0])
            index = list(torch.unravel_index(torch.tensor(bad), tensor.shape)) if tensor.dim() else []
            raise SurgeonError(
                f"tensor {info.name!r} in {info.file.name} holds a non-finite value ({flat[bad].item()} at "
                f"{[int(i) for i in index]}); the checkpoint is corrupt or was saved from a diverged run: use "
                "another checkpoint"
            )
    return tensor
