"""Architecture knowledge as data: one JSON file per model family (mergekit style).

Each file names, as module-path patterns where `*` stands for a layer index, the norms (by role), which of them
read the residual stream, which linears write it, the MLP layout, and where the embedding and LM head live.
Adding a family is adding a file; no code branches on `model_type`.

`residual_writers` are the writers as transformers holds them in memory: a module (its `.weight`, and `.bias` if
any) or a fused parameter such as MoE experts' `down_proj` (num_experts, hidden, intermediate). Checkpoints in the
wild may store a writer differently: `residual_writer_alternatives` lists, per writer, the other names it is found
under (per-expert tensors such as Mixtral's `block_sparse_moe.experts.*.w2`, where the second `*` is the expert;
the dense MLP of a MoE model's dense layers). Every layer must hold each writer under one of its names.
In every writer tensor the residual dimension is the output axis: axis -2 of a weight ((out, in) or
(experts, out, in)), axis -1 of a bias. `mlp.activation_modules` names the modules whose `act_fn` is the MLP's
activation (dense MLP, experts, shared expert). `norm_readers` names, per norm role, the linear layers that read
that norm's output (the smooth pass rescales their input columns). `linear_inputs` groups the dense linear layers
by the tensor they read (attention_in: q/k/v, attention_out: o, mlp_in: gate/up, mlp_out: down), for the hadamard
pass; a family whose experts are fused parameters has none. `attention` names the attention module (`module`, whose
input is what q/k/v read), its output projection (`output`) and the config key of its head count (`heads`), for the
gated-attention pass.

`norm_offset` (default 0) is what a norm adds to its stored weight: Gemma's norms compute `x·(1 + w)` and store w, so
their scale λ is `norm_offset + weight`. Every rewrite of a norm's scale (GatedNorm's doubling, absorb's and smooth's
rescaling) acts on λ, through `norm_offset_of`. A residual writer may be a norm (Gemma's post-attention and
post-feed-forward norms: the layer adds their output to the stream); its λ's axis -1 is then the residual dimension.

Derived from the patterns: `layers`, the module path of the decoder-layer list (what precedes `.*` in every
per-layer pattern), and each residual reader's key in scan.json (`reader_key`: its module name inside the layer,
e.g. the pre-attention norm's, or the role for a norm outside the layers, such as "final"). Code that walks a
model finds its layers and norms through `decoder_layers` / `module_at` here, never by attribute names.
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
    mlp: dict = field(default_factory=dict)
    residual_writer_alternatives: dict[str, tuple[str, ...]] = field(default_factory=dict)
    norm_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    linear_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    attention: dict[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0
    layers: str = ""

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
            residual_writers=tuple(data.get("residual_writers", ())),
            mlp=dict(data.get("mlp", {})),
            residual_writer_alternatives={
                k: tuple(v) for k, v in data.get("residual_writer_alternatives", {}).items()
            },
            norm_readers={k: tuple(v) for k, v in data.get("norm_readers", {}).items()},
            linear_inputs={k: tuple(v) for k, v in data.get("linear_inputs", {}).items()},
            attention=dict(data.get("attention", {})),
            norm_offset=float(data.get("norm_offset", 0.0)),
            layers=_layers_path(data),
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

    def reader_key(self, role: str) -> str:
        """A residual reader's key in scan.json: its module name inside the layer (e.g. the pre-attention norm's),
        or the role itself for a norm outside the layers ("final")."""
        pattern = self.norm_pattern(role)
        return pattern.removeprefix(f"{self.layers}.*.") if "*" in pattern else role

    def norm_offset_of(self, tensor: str) -> float:
        """What the model adds to the stored tensor before scaling by it: `norm_offset` for a norm's weight, else 0."""
        if not self.norm_offset or not tensor.endswith(".weight"):
            return 0.0
        module = tensor.removesuffix(".weight")
        return self.norm_offset if any(pattern_regex(p).match(module) for p in self.norms.values()) else 0.0

    @property
    def activation_modules(self) -> tuple[str, ...]:
        return tuple(self.mlp.get("activation_modules", ()))

    def residual_writer_tensors(self, names, config: dict) -> list[tuple[str, int]]:
        """Every tensor among `names` that writes the residual stream, with the axis holding the residual dimension
        (the embedding excluded; -1 for a bias and for a writer that is a norm). Raises when the data describes no
        writers or a layer lacks one of them."""
        if not self.residual_writers:
            raise SurgeonError(f"the {self.model_type} architecture data describes no residual writers "
                               f"(residual_writers in surgeon/architectures/{self.model_type}.json)")
        names = list(names)
        found: dict[str, int] = {}
        layers = range(self.num_layers(config))
        norms = set(self.norms.values())
        for writer in self.residual_writers:
            covered: set[int] = set()
            for pattern in (writer, *self.residual_writer_alternatives.get(writer, ())):
                regex = tensor_regex(pattern)
                for name in names:
                    match = regex.match(name)
                    if match:
                        covered.add(int(match.group(1)) if regex.groups else -1)
                        found[name] = -1 if name.endswith("bias") or pattern in norms else -2
            missing = [i for i in layers if i not in covered] if "*" in writer else ([] if covered else [None])
            if missing:
                where = f" in layer {missing[0]}" if missing[0] is not None else ""
                raise SurgeonError(
                    f"the checkpoint has no residual writer {writer!r}{where} (nor any of its alternative names); "
                    f"the {self.model_type} architecture data does not describe this checkpoint"
                )
        return list(found.items())

    def expand(self, pattern: str, config: dict) -> list[str]:
        """A module-path pattern's concrete names, one per layer where it has a `*`."""
        if "*" not in pattern:
            return [pattern]
        return [pattern.replace("*", str(i)) for i in range(self.num_layers(config))]


def _layers_path(data: dict) -> str:
    """The decoder-layer list's module path: the part before `.*` that every per-layer pattern shares."""
    patterns = [*data["norms"].values(), *data.get("residual_writers", ())]
    prefixes = {pattern.split(".*", 1)[0] for pattern in patterns if ".*" in pattern}
    if len(prefixes) != 1:
        raise SurgeonError(f"the {data['model_type']} architecture data has per-layer patterns under "
                           f"{sorted(prefixes) or 'no layer list'}; every `*` pattern must start with one layer list")
    return prefixes.pop()


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


def for_model(model) -> Architecture:
    """The architecture of a transformers model (a surgeon_* one included): its config's family."""
    config = model.config
    return for_config({"model_type": config.model_type, "surgeon": getattr(config, "surgeon", None)})


def module_at(model, path: str):
    """The module at `path` (e.g. "model.norm"), or None when the model has none there."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def decoder_layers(model):
    """The decoder blocks of `model` (its ModuleList at the family's `layers` path, converted models included)."""
    from torch import nn

    arch = for_model(model)
    layers = module_at(model, arch.layers)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise SurgeonError(f"{type(model).__name__} has no decoder layers at {arch.layers!r}, where the "
                           f"{arch.model_type} architecture data puts them (surgeon/architectures/"
                           f"{arch.model_type}.json)")
    return layers


def pattern_regex(pattern: str) -> re.Pattern:
    return re.compile("^" + "\\.".join("([0-9]+)" if p == "*" else re.escape(p) for p in pattern.split(".")) + "$")


def tensor_regex(pattern: str) -> re.Pattern:
    """The tensors of a module-or-parameter pattern: the name itself, or its `.weight` / `.bias`; `*` is an index."""
    return re.compile(pattern_regex(pattern).pattern.removesuffix("$") + "(?:\\.(?:weight|bias))?$")
