"""Architecture knowledge as data: one JSON file per model family (mergekit style).

Each file names, as module-path patterns where `*` stands for a layer index, the norms (by role), which of them
read the residual stream, which linears write it, the MLP layout, and where the embedding and LM head live.
Adding a family is adding a file; no code branches on `model_type`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..errors import SurgeonError

DATA_DIR = Path(__file__).parent
SURGEON_PREFIX = "surgeon_"


@dataclass(frozen=True)
class Architecture:
    model_type: str
    description: str
    num_layers_key: str
    hidden_size_key: str
    tie_key: str
    embedding: str
    lm_head: str
    norms: dict[str, str]
    residual_readers: tuple[str, ...]
    residual_writers: tuple[str, ...]
    mlp: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "Architecture":
        return cls(
            model_type=data["model_type"],
            description=data.get("description", ""),
            num_layers_key=data["num_layers"],
            hidden_size_key=data["hidden_size"],
            tie_key=data["tie_word_embeddings"],
            embedding=data["embedding"],
            lm_head=data["lm_head"],
            norms=dict(data["norms"]),
            residual_readers=tuple(data["residual_readers"]),
            residual_writers=tuple(data["residual_writers"]),
            mlp=dict(data.get("mlp", {})),
        )

    def num_layers(self, config: dict) -> int:
        return int(config[self.num_layers_key])

    def tied(self, config: dict) -> bool:
        # transformers' default for these families is untied unless the config says otherwise
        return bool(config.get(self.tie_key, False))

    def norm_pattern(self, role: str) -> str:
        if role not in self.norms:
            raise SurgeonError(
                f"{self.model_type} has no {role!r} norm; its norms are: {', '.join(self.norms)}"
            )
        return self.norms[role]

    def expand(self, pattern: str, config: dict) -> list[str]:
        """A module-path pattern's concrete names, one per layer where it has a `*`."""
        if "*" not in pattern:
            return [pattern]
        return [pattern.replace("*", str(i)) for i in range(self.num_layers(config))]


@cache
def registry() -> dict[str, Architecture]:
    archs = {}
    for path in sorted(DATA_DIR.glob("*.json")):
        arch = Architecture.from_json(json.loads(path.read_text()))
        archs[arch.model_type] = arch
    return archs


def supported() -> list[str]:
    return sorted(registry())


def base_model_type(config: dict) -> str:
    """The stock family a config describes: its model_type, or for a surgeon checkpoint the one it was built on."""
    model_type = config.get("model_type")
    if not model_type:
        raise SurgeonError("config.json has no model_type; is this a Hugging Face model directory?")
    if model_type.startswith(SURGEON_PREFIX):
        return (config.get("surgeon") or {}).get("base_model_type") or model_type[len(SURGEON_PREFIX):]
    return model_type


def for_config(config: dict) -> Architecture:
    model_type = base_model_type(config)
    try:
        return registry()[model_type]
    except KeyError:
        raise SurgeonError(
            f"unsupported model family {model_type!r}; supported: {', '.join(supported())}"
        ) from None


def pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + "\\.".join("([0-9]+)" if p == "*" else re.escape(p) for p in pattern.split(".")) + "$")
