"""A checkpoint directory's table of contents from its headers alone, without torch: config.json, the weight files
(an index, one file, or loose shards), and each tensor's name, dtype, shape and byte offset.

A safetensors file is 8 bytes of header length, a JSON header, then the data; the safetensors library validates
the header against the file (dtypes, offsets, size) when it opens it, with framework="numpy" so torch stays out.
`surgeon inspect` reads only this (it answers in a fraction of torch's import); the lazy reader (reader.py)
discovers files and tensors through the same functions. A PyTorch `.bin` has no header: it is opened through
torch (weights_only, mmap), so only such a checkpoint pays for the import.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import SurgeonError, one_line

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# safetensors' dtype codes → torch's dtype names (reader.py maps them onto torch dtypes) and their sizes in bytes
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise SurgeonError(f"{path} is not a directory; give a Hugging Face model directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SurgeonError(f"{path} has no config.json; a Hugging Face model directory needs one")
    try:
        return json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SurgeonError(f"{config_path} is not valid JSON ({err}); restore it from the source") from None


def weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files and, when an index names them, its weight map (tensor name → shard)."""
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = path / index_name
        if index.is_file():
            return _files_from_index(path, index)
        if (path / single).is_file():
            return [path / single], None
    loose = sorted(path.glob("*.safetensors"))
    if loose:
        return loose, None
    raise SurgeonError(f"{path} has no weights (no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")


def _files_from_index(path: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError):
        raise SurgeonError(f"{index} is not a valid index (no weight_map); restore it from the source") from None
    root = path.resolve()
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        file = (path / shard).resolve()
        if root not in file.parents:
            raise SurgeonError(f"{index.name} names {shard!r}, a path outside {path}; refusing to read it")
        if not file.is_file():
            raise SurgeonError(f"{index.name} names shard {shard!r}, which is missing from {path}")
        files.append(file)
    return files, weight_map


def check_index_complete(weight_map: dict[str, str] | None, names) -> None:
    missing = sorted(set(weight_map or ()) - set(names))
    if missing:
        raise SurgeonError(
            f"the index names {len(missing)} tensor(s) that no shard holds (e.g. {missing[0]!r}); "
            "the checkpoint is incomplete: copy it again from the source"
        )


def safetensors_entries(file: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, safetensors dtype code, shape, absolute byte offset) of every tensor in a validated file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as handle:
            handle.keys()  # opening validated the header against the file; we read it for the offsets
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        start = 8 + length
        entries = [(name, e["dtype"], tuple(e["shape"]), start + e["data_offsets"][0])
                   for name, e in header.items() if name != "__metadata__"]
        for _, code, _, _ in entries:
            DTYPE_NAMES[code]  # a dtype surgeon cannot read is as unreadable as a bad header
    except Exception as err:  # safetensors raises its own error types for bad headers and sizes
        raise SurgeonError(
            f"{file.name} is not a readable safetensors file ({one_line(err)}); it is truncated or "
            "corrupt: copy it again from the source"
        ) from None
    return entries


def load_bin(file: Path):
    """A PyTorch .bin state dict, lazily mapped; never an arbitrary unpickle."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise SurgeonError(
            f"{file.name} could not be loaded safely ({one_line(err)}); only plain tensor state dicts "
            "are read (weights_only=True): convert it to safetensors"
        ) from None


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    file: Path
    dtype: str  # torch's name for it: "bfloat16", "float32", ...
    shape: tuple[int, ...]
    itemsize: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


class Headers:
    """A checkpoint's config and tensor table, read from headers (no tensor data, no torch for safetensors)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.files, weight_map = weight_files(self.path)
        self.tensors: dict[str, HeaderEntry] = {}
        for file in self.files:
            for entry in _file_entries(file):
                if entry.name in self.tensors:
                    raise SurgeonError(f"tensor {entry.name!r} appears in two files of {self.path}; the checkpoint "
                                       "is inconsistent")
                self.tensors[entry.name] = entry
        check_index_complete(weight_map, self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def num_parameters(self) -> int:
        return sum(e.numel for e in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def _file_entries(file: Path) -> list[HeaderEntry]:
    if file.suffix == ".safetensors":
        return [HeaderEntry(name, file, DTYPE_NAMES[code], shape, ITEMSIZE[code])
                for name, code, shape, _ in safetensors_entries(file)]
    return [HeaderEntry(name, file, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.dtype.itemsize)
            for name, t in load_bin(file).items()]
