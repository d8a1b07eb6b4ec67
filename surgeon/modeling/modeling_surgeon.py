"""surgeon modeling: a stock transformers family plus GatedNorm / PreAffine norms.

This file is copied verbatim into every converted checkpoint and named in its `auto_map`, so it must stay
self-contained: torch and transformers only, no import of surgeon. When surgeon is importable, the norms run
through `surgeon.kernels` (fused Triton on CUDA); otherwise through the torch reference below, which is the
definition both paths must match.

    RMSNorm      N(x)  = λ ⊙ x / sqrt(mean(x²) + ε)          (computed in fp32, as the stock families do)
    PreAffine    N(λ1 ⊙ x)                                    identity at λ1 = 1
    GatedNorm    y = N(x);  out = y ⊙ σ(W_up · silu(W_down · y))
                 identity at W_up = 0 with λ doubled (σ(0) = ½; a power of two, exact in every float format)

`config.surgeon` says which norms carry what: `{"gated_norm": {"rank": r, "targets": [...]},
"pre_affine": {"targets": [...]}}`, targets being module names with `*` standing for a layer index.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
import transformers
from transformers import initialization as init

# Base families whose norms are the plain RMSNorm above (weight applied as is).
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------- reference math


def rms_norm_reference(x, weight, eps, pre_affine=None):
    """N(λ1 ⊙ x): fp32 statistics, output in x's dtype times λ, exactly as transformers' LlamaRMSNorm."""
    dtype = x.dtype
    h = x.to(torch.float32)
    if pre_affine is not None:
        h = h * pre_affine.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def gated_norm_reference(x, weight, w_down, w_up, eps, pre_affine=None):
    """g ⊙ N(λ1 ⊙ x) with g = σ(W_up silu(W_down y)); w_down is (r, d), w_up is (d, r), as nn.Linear weights."""
    y = rms_norm_reference(x, weight, eps, pre_affine)
    gate = torch.sigmoid(F.linear(F.silu(F.linear(y, w_down)), w_up))
    return y * gate


_KERNELS = None


def _kernels():
    """surgeon.kernels when surgeon is installed (fused kernels), else False: resolved once."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from surgeon import kernels as module
        except ImportError:
            module = False
        _KERNELS = module
    return _KERNELS


# ----------------------------------------------------------------------------- the norm module


class SurgeonRMSNorm(nn.Module):
    """RMSNorm carrying an optional PreAffine vector (`pre_affine`) and an optional gate (`gate_down`, `gate_up`).

    `weight` keeps the stock name, so the base family's checkpoint keys still apply.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, gate_rank: int = 0, pre_affine: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.pre_affine = nn.Parameter(torch.ones(hidden_size)) if pre_affine else None
        self.gate_rank = gate_rank
        if gate_rank:
            self.gate_down = nn.Linear(hidden_size, gate_rank, bias=False)
            self.gate_up = nn.Linear(gate_rank, hidden_size, bias=False)

    @torch.no_grad()
    def reset_parameters(self):
        """The identity initialization, λ = 1, λ1 = 1, W_up = 0, W_down ~ N(0, 1/d); through transformers'
        guarded initializers, so it never overwrites weights loaded from a checkpoint."""
        init.ones_(self.weight)
        if self.pre_affine is not None:
            init.ones_(self.pre_affine)
        if self.gate_rank:
            init.normal_(self.gate_down.weight, mean=0.0, std=1.0 / math.sqrt(self.weight.shape[0]))
            init.zeros_(self.gate_up.weight)

    def forward(self, x):
        kernels = _kernels()
        if self.gate_rank:
            fn = kernels.gated_norm if kernels else gated_norm_reference
            return fn(x, self.weight, self.gate_down.weight, self.gate_up.weight, self.variance_epsilon,
                      pre_affine=self.pre_affine)
        if kernels and self.pre_affine is not None:
            return kernels.pre_affine_rms_norm(x, self.weight, self.pre_affine, self.variance_epsilon)
        return rms_norm_reference(x, self.weight, self.variance_epsilon, self.pre_affine)

    def extra_repr(self):
        extras = [f"{self.weight.shape[0]}", f"eps={self.variance_epsilon}"]
        if self.pre_affine is not None:
            extras.append("pre_affine")
        if self.gate_rank:
            extras.append(f"gate_rank={self.gate_rank}")
        return ", ".join(extras)


def target_regex(patterns):
    """Module-name patterns (`*` = one path component, e.g. a layer index) as one compiled regex."""
    if not patterns:
        return None
    parts = ["\\.".join("[^.]+" if p == "*" else re.escape(p) for p in pat.split(".")) for pat in patterns]
    return re.compile("^(?:" + "|".join(parts) + ")$")


def install_norms(model: nn.Module, surgeon: dict) -> list[str]:
    """Replace every targeted norm of `model` by a SurgeonRMSNorm of the same size and ε; returns the names."""
    gated = (surgeon or {}).get("gated_norm") or {}
    rank = int(gated.get("rank", 0))
    gated_re = target_regex(gated.get("targets"))
    pre_re = target_regex(((surgeon or {}).get("pre_affine") or {}).get("targets"))
    replaced = []
    for name, module in list(model.named_modules()):
        has_gate = bool(gated_re and gated_re.match(name))
        has_pre = bool(pre_re and pre_re.match(name))
        if not (has_gate or has_pre):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 1:
            raise ValueError(f"surgeon: target {name!r} is not a norm with a 1-d weight ({type(module).__name__})")
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        norm = SurgeonRMSNorm(weight.shape[0], eps, gate_rank=rank if has_gate else 0, pre_affine=has_pre)
        norm.to(device=weight.device, dtype=weight.dtype)
        model.set_submodule(name, norm)
        replaced.append(name)
    return replaced


# ----------------------------------------------------------------------------- config and model classes


class SurgeonMixin:
    """Builds the base family, then swaps in the norms `config.surgeon` names. Nothing else differs."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name in install_norms(self, getattr(config, "surgeon", None)):
            self._init_weights(self.get_submodule(name))

    def _init_weights(self, module):
        if isinstance(module, SurgeonRMSNorm):
            module.reset_parameters()
        else:
            super()._init_weights(module)


def surgeon_model_type(base_model_type: str) -> str:
    return f"surgeon_{base_model_type}"


def _build_classes(base_model_type: str):
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_model_type])
    config_cls = type(f"Surgeon{base_config.__name__}", (base_config,),
                      {"model_type": surgeon_model_type(base_model_type), "__module__": __name__})
    model_cls = type(f"Surgeon{base_model.__name__}", (SurgeonMixin, base_model),
                     {"config_class": config_cls, "__module__": __name__})
    return config_cls, model_cls


CLASSES = {}
for _base in BASE_MODEL_TYPES:
    CLASSES[_base] = _build_classes(_base)
    for _cls in CLASSES[_base]:
        globals()[_cls.__name__] = _cls


def register():
    """Register every surgeon family with the Auto classes (what `import surgeon` does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for base, (config_cls, model_cls) in CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
