"""Does a checkpoint's config describe its tensors? Checked before anything is written.

The expected names and shapes are the family's own: its model is built from config.json on the meta device (no
memory, exact for every family and for surgeon's modules) and its state dict compared with the checkpoint's
headers. Checkpoints may store a parameter differently from how transformers holds it (MoE experts one tensor per
expert, fused in memory): transformers' own conversion mapping for the family says how, and a per-expert tensor is
compared with its slice of the fused parameter. Tensors the model does not know (an old `rotary_emb.inv_freq`) are
left alone, as transformers leaves them; a parameter the checkpoint lacks would load as random values: refused.

Imported by module path (not from surgeon.io): it imports transformers and the model classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import SurgeonError, one_line
from .reader import Checkpoint

# config keys that size the tensors, named in the error so the user knows where to look
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads",
             "num_key_value_heads", "head_dim", "num_hidden_layers", "num_local_experts", "num_experts")


@dataclass(frozen=True)
class _Converter:
    """One of transformers' checkpoint conversions: per-expert source patterns (`*`: the expert) → a fused target."""
    sources: tuple[re.Pattern, ...]
    target: str


def check_tensors(ckpt: Checkpoint) -> None:
    """Raise a one-line SurgeonError naming the first tensor whose name or shape config.json does not describe."""
    from ..architectures import base_model_type, for_config

    for_config(ckpt.config)  # an unsupported family is refused first, as everywhere else
    model = _meta_model(ckpt.config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    required = [name for name, _ in model.named_parameters()]  # tied parameters once, under their first name
    renames, converters = _conversions(base_model_type(ckpt.config))
    sizes = ", ".join(f"{k} {ckpt.config[k]}" for k in SIZE_KEYS if k in ckpt.config)
    found: set[str] = set()
    for name, info in ckpt.tensors.items():
        target = name
        for old, new in renames:
            target = target.replace(old, new)
        want = expected.get(target)
        if want is None:
            want, target = _per_expert(target, expected, converters)
        if want is None:
            continue
        found.add(target)
        if tuple(info.shape) != want:
            raise SurgeonError(
                f"tensor {name!r} in {info.file.name} has shape {list(info.shape)}, but config.json ({sizes}) makes "
                f"it {list(want)}; the config does not match the weights: restore config.json from the source"
            )
    missing = [name for name in required if name not in found]
    if missing:
        raise SurgeonError(
            f"the checkpoint has no tensor {missing[0]!r} ({len(missing)} missing), which config.json's "
            f"{ckpt.config.get('model_type')} model needs; the checkpoint is incomplete or its config is not its "
            "own: copy it again from the source"
        )


def _meta_model(config: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..modeling import register

    register()  # surgeon_* checkpoints are built with their own modules
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # a config transformers cannot build (e.g. heads that do not divide hidden_size)
        raise SurgeonError(f"config.json does not describe a buildable {config.get('model_type')} model "
                           f"({one_line(err, 200)}); restore config.json from the source") from None


def _conversions(model_type: str) -> tuple[list[tuple[str, str]], list[_Converter]]:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except ImportError:  # a transformers that loads checkpoints as stored
        return [], []
    renames, converters = [], []
    for entry in mapping:
        sources, targets = list(entry.source_patterns), list(entry.target_patterns)
        if type(entry).__name__ == "WeightRenaming" and len(sources) == len(targets) == 1:
            renames.append((sources[0], targets[0]))
        elif len(targets) == 1 and all("*" in s for s in sources):
            converters.append(_Converter(
                tuple(re.compile(re.escape(s).replace(r"\*", r"(\d+)") + "$") for s in sources), targets[0]))
    return renames, converters


def _per_expert(name: str, expected: dict, converters: list[_Converter]) -> tuple[tuple | None, str]:
    """A per-expert tensor's expected shape: its fused parameter's without the expert axis, the concatenated axis
    split among the sources (gate and up fused into gate_up)."""
    for conv in converters:
        for regex in conv.sources:
            match = regex.search(name)
            if not match:
                continue
            fused = name[: match.start()] + conv.target
            shape = expected.get(fused)
            if shape is None or len(shape) < 2 or int(match.group(1)) >= shape[0]:
                return None, name
            inner = list(shape[1:])
            inner[0] //= len(conv.sources)
            return tuple(inner), fused
    return None, name
