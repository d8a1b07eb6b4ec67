"""The shipped DeepSpeed configs (zero0–3.json) and training recipes (recipes/*.yaml), installed as
`surgeon.configs` so a name such as `smollm2-cpu` or `zero2` finds them without a checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def shipped(kind: str, name: str) -> Path | None:
    """The shipped file `name` of `kind` ("recipe" or "deepspeed"), or None: `smollm2-cpu` → recipes/smollm2-cpu.yaml,
    `zero2` → zero2.json. Anything with a directory part or that exists as given is not a shipped name."""
    folder, suffix = {"recipe": ("recipes", ".yaml"), "deepspeed": ("", ".json")}[kind]
    if Path(name).name != name:
        return None
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    root = files(__name__)
    candidate = root / folder / f"{stem}{suffix}" if folder else root / f"{stem}{suffix}"
    return Path(str(candidate)) if candidate.is_file() else None


def names(kind: str) -> list[str]:
    folder, suffix = {"recipe": ("recipes", ".yaml"), "deepspeed": ("", ".json")}[kind]
    root = files(__name__) / folder if folder else files(__name__)
    return sorted(p.name[: -len(suffix)] for p in root.iterdir() if p.name.endswith(suffix))
