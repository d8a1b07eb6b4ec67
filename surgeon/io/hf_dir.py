"""The Hugging Face model directory around the weights: its config's model type, the side files a model directory
carries (tokenizer, generation config, templates), the modeling files its auto_map names, and surgeon's manifest.

convert and export both write such a directory; the rules live here so the two agree (a GLU model trained to α = 1
is exported stock through the same `set_model_type` that convert uses for `--glu-alpha 1`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import SurgeonError
from ..modeling import BASE_MODEL_TYPES, CLASSES, MODELING_FILE, needs_surgeon_modules, surgeon_model_type
from .reader import Checkpoint

MANIFEST = "surgeon_manifest.json"


def set_model_type(config: dict, base: str) -> dict:
    """Our model_type, architectures and auto_map when the config needs surgeon's modules; else the stock family's
    (no auto_map). Shared by convert and export (a GLU model trained to α = 1 is exported stock)."""
    if base not in BASE_MODEL_TYPES:
        raise SurgeonError(f"no surgeon model class for family {base!r}; supported: {', '.join(BASE_MODEL_TYPES)}")
    config_cls, model_cls = CLASSES[base]
    block = config.get("surgeon") or {}
    if not needs_surgeon_modules(config):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config["model_type"] = base
        config["architectures"] = block.get("base_architectures") or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]]
        config.pop("auto_map", None)
        return config
    config["model_type"] = surgeon_model_type(base)
    config["architectures"] = [model_cls.__name__]
    module = MODELING_FILE.stem
    config["auto_map"] = {"AutoConfig": f"{module}.{config_cls.__name__}",
                          "AutoModelForCausalLM": f"{module}.{model_cls.__name__}"}
    return config


def copy_side_files(ckpt: Checkpoint, dest: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the checkpoint's side files (tokenizer, generation config, templates: Checkpoint.side_files) into
    `dest`, except the names in `skip`; returns the names copied."""
    copied = []
    for side in ckpt.side_files():
        if side.name not in skip:
            shutil.copy2(side, dest / side.name)
            copied.append(side.name)
    return copied


def modeling_files(config: dict) -> list[str]:
    """The remote-code files a config's auto_map names (`modeling_surgeon.py` for "modeling_surgeon.Class"), once
    each, in auto_map order."""
    return list(dict.fromkeys(f"{v.split('.')[0]}.py" for v in (config.get("auto_map") or {}).values()
                              if isinstance(v, str) and "." in v))


def copy_modeling_files(config: dict, dest: Path, model_dir: Path) -> None:
    """Copy every file the config's auto_map names into `dest`: the model directory's own copy when it has one (the
    code the model was trained with), else surgeon's."""
    for name in modeling_files(config):
        src = model_dir / name if (model_dir / name).is_file() else MODELING_FILE.with_name(name)
        if not src.is_file():
            raise SurgeonError(f"the modeling file {name} named by auto_map is neither in {model_dir} nor "
                               "in surgeon; nothing was written")
        shutil.copy2(src, dest / name)
