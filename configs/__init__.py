"""The shipped DeepSpeed configs (zero0–3.json) and training recipes (recipes/*.yaml), installed as
`surgeon.configs` so a name such as `smollm2-cpu` or `zero2` finds them without a checkout."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

# kind -> (folder, suffix, what a user passes instead)
KINDS = {"recipe": ("recipes", ".yaml", "a YAML file or a shipped recipe"),
         "deepspeed": ("", ".json", "a JSON file or a shipped config")}


def _folder(kind: str):
    folder = KINDS[kind][0]
    return files(__name__) / folder if folder else files(__name__)


def shipped(kind: str, name: str) -> Path | None:
    """The shipped file `name` of `kind` ("recipe" or "deepspeed"), or None: `smollm2-cpu` → recipes/smollm2-cpu.yaml,
    `zero2` → zero2.json. Anything with a directory part or that exists as given is not a shipped name."""
    suffix = KINDS[kind][1]
    if Path(name).name != name:
        return None
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    candidate = _folder(kind) / f"{stem}{suffix}"
    return Path(str(candidate)) if candidate.is_file() else None


def locate(kind: str, path: str | os.PathLike, what: str) -> Path:
    """`path` if it is a file, else the shipped file of that name; else a one-line SurgeonError naming the shipped
    ones (`what` starts the message: "recipe", "DeepSpeed config")."""
    from surgeon.errors import SurgeonError

    path = Path(path)
    if not path.is_file():
        path = shipped(kind, str(path)) or path
    if not path.is_file():
        raise SurgeonError(f"{what} {path} not found: pass {KINDS[kind][2]} ({', '.join(names(kind))})")
    return path


def names(kind: str) -> list[str]:
    suffix = KINDS[kind][1]
    return sorted(p.name[: -len(suffix)] for p in _folder(kind).iterdir() if p.name.endswith(suffix))
