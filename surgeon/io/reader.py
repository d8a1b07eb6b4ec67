"""Read a Hugging Face checkpoint directory one tensor at a time.

Safetensors (single file or sharded with an index) is memory-mapped: listing the tensors reads only the
headers, and `get(name)` materializes one tensor. PyTorch `.bin` files are opened with `weights_only=True`
(never an arbitrary unpickle) and `mmap=True`, so they stay lazy too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import SurgeonError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """A checkpoint directory: its config and a lazy view of its tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise SurgeonError(f"{self.path} is not a directory; give a Hugging Face model directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SurgeonError(f"{self.path} has no config.json; a Hugging Face model directory needs one")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SurgeonError(f"{config_path} is not valid JSON ({err}); restore it from the source") from None
        self._weight_map: dict[str, str] | None = None
        self.files = self._weight_files()
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[Path, object] = {}
        for file in self.files:
            self._index_file(file)
        if self._weight_map is not None:
            missing = sorted(set(self._weight_map) - set(self.tensors))
            if missing:
                raise SurgeonError(
                    f"the index names {len(missing)} tensor(s) that no shard holds (e.g. {missing[0]!r}); "
                    "the checkpoint is incomplete: copy it again from the source"
                )

    # -- discovery --------------------------------------------------------------------------------

    def _weight_files(self) -> list[Path]:
        for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
            index = self.path / index_name
            if index.is_file():
                return self._files_from_index(index)
            if (self.path / single).is_file():
                return [self.path / single]
        loose = sorted(self.path.glob("*.safetensors"))
        if loose:
            return loose
        raise SurgeonError(
            f"{self.path} has no weights (no {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError, TypeError):
            raise SurgeonError(f"{index} is not a valid index (no weight_map); restore it from the source") from None
        self._weight_map = weight_map
        root = self.path.resolve()
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            file = (self.path / shard).resolve()
            if root not in file.parents:
                raise SurgeonError(f"{index.name} names {shard!r}, a path outside {self.path}; refusing to read it")
            if not file.is_file():
                raise SurgeonError(f"{index.name} names shard {shard!r}, which is missing from {self.path}")
            files.append(file)
        return files

    def _index_file(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                names = list(handle.keys())
                infos = []
                for name in names:
                    sl = handle.get_slice(name)
                    infos.append((name, SAFE_DTYPES[sl.get_dtype()], tuple(sl.get_shape())))
            except Exception as err:  # safetensors raises its own error types for bad headers and sizes
                raise SurgeonError(
                    f"{file.name} is not a readable safetensors file ({_first_line(err)}); it is truncated or "
                    "corrupt: copy it again from the source"
                ) from None
        else:
            try:
                handle = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise SurgeonError(
                    f"{file.name} could not be loaded safely ({_first_line(err)}); only plain tensor state dicts "
                    "are read (weights_only=True): convert it to safetensors"
                ) from None
            infos = [(n, t.dtype, tuple(t.shape)) for n, t in handle.items()]
        self._handles[file] = handle
        for name, dtype, shape in infos:
            if name in self.tensors:
                raise SurgeonError(f"tensor {name!r} appears in two files of {self.path}; the checkpoint is inconsistent")
            self.tensors[name] = TensorInfo(name, file, dtype, shape)

    # -- access -----------------------------------------------------------------------------------

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        handle = self._handles[info.file]
        if isinstance(handle, dict):
            return handle[name]
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise SurgeonError(f"reading {name!r} from {info.file.name} failed ({_first_line(err)})") from None

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
