"""surgeon modeling: a stock transformers family plus GatedNorm / PreAffine norms and the annealed GLU activation.

This file is copied verbatim into every converted checkpoint and named in its `auto_map`, so it must stay
self-contained: torch and transformers only, no import of surgeon. When surgeon is importable, the norms run
through `surgeon.kernels` (fused Triton on CUDA); otherwise through the torch reference below, which is the
definition both paths must match.

    RMSNorm      N(x)  = λ ⊙ x / sqrt(mean(x²) + ε)          (computed in fp32, as the stock families do)
                 λ = w, or λ = 1 + w in Gemma (`norm_offset` 1: the stored w is 0 at the identity)
    PreAffine    N(λ1 ⊙ x)                                    identity at λ1 = 1
    GatedNorm    y = N(x);  out = y ⊙ σ(W_up · silu(W_down · y))
                 identity at W_up = 0 with λ doubled (σ(0) = ½; a power of two, exact in every float format)
    GLU anneal   act_α(z) = (1 − α)·φ(z) + α·σ(z)              φ at α = 0 (bit for bit), σ at α = 1; φ is the
                 family's activation: silu (SwiGLU) or gelu_pytorch_tanh (Gemma's GeGLU)
    Hadamard     a linear reads x·H and stores W·H (H orthonormal, symmetric, block-diagonal): (x·H)(W·H)ᵀ = x·Wᵀ
    GatedAttn    o_proj(a ⊙ σ(x·W_gᵀ)), x the attention's input (what q/k/v read), a the attention output;
                 W_g (heads·head_dim or heads, d) = 0 with o_proj's weight doubled is the identity (σ(0) = ½)

`config.surgeon` says which modules carry what: `{"gated_norm": {"rank": r, "targets": [...]},
"pre_affine": {"targets": [...]}, "glu": {"alpha": α, "targets": [...]}}`, targets being module names with `*`
standing for a layer index (for "glu": the modules whose `act_fn` is the MLP activation — dense MLP, experts,
shared expert; its "from" names φ). `{"norm_offset": 1.0}` says the family's norms scale by offset + w (Gemma). α lives in the config and, in the model, in a non-persistent buffer of every annealed activation:
a trainer moves it with `set_glu_alpha(model, α)`, which keeps the two in step, so a saved model says its α.
A model whose `hidden_act` already is "sigmoid" (α = 1, exported) runs the stock activation.
`{"hadamard": {"groups": {name: {"linears": [...], "block": b}}}}` names the linears whose input is rotated online
by a block-diagonal Sylvester Hadamard matrix of block b (a forward pre-hook that runs before any other, so a
quantizer or a probe hooked on the layer sees what the layer multiplies); the linears of one group read the same
tensor (q/k/v, gate/up), which is rotated once per layer.
`{"gated_attention": {"targets": [attention modules], "output": [their o_proj], "granularity": "elementwise" |
"head", "heads": n}}` gives each targeted attention module an `output_gate` linear (no bias) and two hooks: the
attention's input goes through the gate, and o_proj's input is multiplied by the gate (per channel, or per head
broadcast over its head_dim) before anything else o_proj does (a Hadamard rotation of o_proj's input sees the
gated output).

MoE families: transformers 5 holds the experts fused ((experts, out, in) parameters) and converts per-expert
checkpoints (`experts.N.down_proj.weight`, Mixtral's `block_sparse_moe.experts.N.w2.weight`) while loading, by a
mapping keyed by model_type. Importing this file registers the base family's mapping for our surgeon_* type, so a
converted checkpoint loads whichever layout it stores, with surgeon installed or as remote code.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)
from transformers import initialization as init

SURGEON_PREFIX = "surgeon_"  # our model_type is the base family's with this prefix: it never collides with a stock one
GLU_ACTIVATION = "sigmoid"  # the stock `hidden_act` of a GLU model: what act_α is at α = 1


# ----------------------------------------------------------------------------- reference math


def rms_norm_reference(x, weight, eps, pre_affine=None, offset=0.0):
    """N(λ1 ⊙ x): fp32 statistics, output in x's dtype times λ, exactly as transformers' LlamaRMSNorm; with an
    offset (Gemma), λ = offset + w and the product is taken in fp32 before the cast, exactly as Gemma's RMSNorm."""
    dtype = x.dtype
    h = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics; float64 stays float64
    if pre_affine is not None:
        h = h * pre_affine.to(h.dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + weight.to(h.dtype))).to(dtype)
    return weight * h.to(dtype)


def gated_norm_reference(x, weight, w_down, w_up, eps, pre_affine=None, offset=0.0):
    """g ⊙ N(λ1 ⊙ x) with g = σ(W_up silu(W_down y)); w_down is (r, d), w_up is (d, r), as nn.Linear weights."""
    y = rms_norm_reference(x, weight, eps, pre_affine, offset)
    gate = torch.sigmoid(F.linear(F.silu(F.linear(y, w_down)), w_up))
    return y * gate


def _sylvester(n: int) -> torch.Tensor:
    """The n × n Sylvester Hadamard matrix (n a power of two) over √n: orthonormal and symmetric, so H⁻¹ = H."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


HADAMARD_FACTOR = 64  # a block above this runs as a Kronecker product, H_ab = H_a ⊗ H_b (Sylvester), b ≤ 64
_HADAMARD_CACHE: dict = {}


def _hadamard(n: int, like: torch.Tensor) -> torch.Tensor:
    key = (n, like.dtype, like.device)
    if key not in _HADAMARD_CACHE:
        _HADAMARD_CACHE[key] = _sylvester(n).to(dtype=like.dtype, device=like.device)
    return _HADAMARD_CACHE[key]


def hadamard_block(d: int) -> int:
    """The block of a rotated input of d features: the largest power of two dividing d."""
    return d & -d


def block_hadamard_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """x (…, d) with every block of `block` consecutive features multiplied by H_block; H is its own inverse.
    A block above HADAMARD_FACTOR is viewed as (a, b) and computed as H_a · X · H_b, two small matmuls (a + b
    multiply-adds a feature instead of a·b; on CPU 4× faster than the dense block of 512, forward and backward)."""
    if x.shape[-1] % block or block & (block - 1):
        raise ValueError(f"surgeon: a Hadamard block of {block} does not tile {x.shape[-1]} features")
    if block <= HADAMARD_FACTOR:
        return (x.unflatten(-1, (-1, block)) @ _hadamard(block, x)).flatten(-2)
    b = min(HADAMARD_FACTOR, 1 << -(-(block.bit_length() - 1) // 2))  # the fast index: ⌈log2(block) / 2⌉ bits
    a = block // b
    y = x.unflatten(-1, (-1, a, b)) @ _hadamard(b, x)
    if a <= HADAMARD_FACTOR:
        y = _hadamard(a, x) @ y
    else:  # blocks above 4096: H_a along the slow index, recursively
        y = block_hadamard_reference(y.transpose(-1, -2), a).transpose(-1, -2)
    return y.flatten(-3)


class HadamardInput:
    """Forward pre-hook rotating a linear layer's input; one instance serves the linears of a group in one layer,
    which read the same tensor: it is rotated once, for the first of them, and reused by the others."""

    def __init__(self, block: int, members: int):
        self.block, self.members = block, members
        self._seen = self._rotated = None
        self._uses = 0

    def __call__(self, module, args):
        x = args[0]
        if x is not self._seen or self._uses >= self.members:
            self._seen, self._rotated, self._uses = x, block_hadamard_reference(x, self.block), 0
        rotated = self._rotated
        self._uses += 1
        if self._uses >= self.members:  # every member has it: hold no activation between forwards
            self._seen = self._rotated = None
        return (rotated, *args[1:])


def _layer_index(name: str) -> tuple[str, ...]:
    """The indices in a module path (e.g. ("3",) for model.layers.3.self_attn): which layer it belongs to."""
    return tuple(p for p in name.split(".") if p.isdigit())


class AttentionGate:
    """The hooks of one gated attention module: a pre-hook on the attention computes g = σ(output_gate(x)) from
    its input, a pre-hook on its o_proj multiplies o_proj's input by g (a head's scalar repeated over head_dim)."""

    def __init__(self):
        self._g = None

    def attention(self, module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._g = torch.sigmoid(module.output_gate(x))

    def output(self, module, args):
        g, self._g = self._g, None  # hold no activation between forwards
        if g is None:
            raise RuntimeError("surgeon: an attention gate's o_proj ran without its attention module")
        a = args[0]
        if g.shape[-1] != a.shape[-1]:  # one gate per head: repeated over the head's channels
            g = g.repeat_interleave(a.shape[-1] // g.shape[-1], dim=-1)
        return (a * g.to(a.dtype), *args[1:])


def _gated_attention(model: nn.Module, surgeon: dict):
    """[(attention module name, module, its o_proj)] for the `surgeon["gated_attention"]` block ([] without)."""
    block = (surgeon or {}).get("gated_attention")
    if not block:
        return []
    modules = dict(model.named_modules())
    attention_re, output_re = target_regex(block["targets"]), target_regex(block["output"])
    outputs = {_layer_index(n): m for n, m in modules.items() if output_re.match(n)}
    found = []
    for name, module in modules.items():
        if attention_re.match(name):
            o_proj = outputs.get(_layer_index(name))
            if not isinstance(o_proj, nn.Linear):
                raise ValueError(f"surgeon: the gated attention {name!r} has no o_proj linear matching "
                                 f"{block['output']}")
            found.append((name, module, o_proj))
    if not found:
        raise ValueError(f"surgeon: no module matches the gated attention targets {block['targets']}")
    return found


def add_attention_gates(model: nn.Module, surgeon: dict) -> list[str]:
    """An `output_gate` linear (no bias, zero-initialized) in every attention module `surgeon["gated_attention"]`
    names; returns their names. Added before the rotations (a rotated q/k/v group includes the gate)."""
    block = (surgeon or {}).get("gated_attention") or {}
    added = []
    for name, module, o_proj in _gated_attention(model, surgeon):
        width = int(block["heads"]) if block.get("granularity") == "head" else o_proj.in_features
        module.output_gate = nn.Linear(o_proj.out_features, width, bias=False, device=o_proj.weight.device,
                                       dtype=o_proj.weight.dtype)
        module.output_gate.surgeon_identity_zero = True  # _init_weights: W_g = 0, the identity
        added.append(f"{name}.output_gate")
    return added


def hook_attention_gates(model: nn.Module, surgeon: dict) -> None:
    """The AttentionGate hooks of every gated attention module; after the rotations, so that o_proj gates its
    input before it rotates it."""
    for _, module, o_proj in _gated_attention(model, surgeon):
        hook = AttentionGate()
        module.register_forward_pre_hook(hook.attention, with_kwargs=True)
        o_proj.register_forward_pre_hook(hook.output, prepend=True)


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

    `weight` keeps the stock name, so the base family's checkpoint keys still apply; the scale is
    `weight_offset + weight` (Gemma stores w of x·(1 + w)).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, gate_rank: int = 0, pre_affine: bool = False,
                 offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset))
        self.weight_offset = float(offset)
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
        init.constant_(self.weight, 1.0 - self.weight_offset)  # λ = 1
        if self.pre_affine is not None:
            init.ones_(self.pre_affine)
        if self.gate_rank:
            init.normal_(self.gate_down.weight, mean=0.0, std=1.0 / math.sqrt(self.weight.shape[0]))
            init.zeros_(self.gate_up.weight)

    def forward(self, x):
        kernels = _kernels()
        if self.weight_offset:
            # the kernels take λ itself; the reference keeps Gemma's fp32 product, so it is the one on CPU
            if kernels and x.is_cuda:
                return self._forward(kernels, x, self.weight + self.weight_offset)
            return self._forward(False, x, self.weight, self.weight_offset)
        return self._forward(kernels, x, self.weight)

    def _forward(self, kernels, x, weight, offset=0.0):
        if self.gate_rank:
            if kernels:
                return kernels.gated_norm(x, weight, self.gate_down.weight, self.gate_up.weight,
                                          self.variance_epsilon, pre_affine=self.pre_affine)
            return gated_norm_reference(x, weight, self.gate_down.weight, self.gate_up.weight, self.variance_epsilon,
                                        pre_affine=self.pre_affine, offset=offset)
        if kernels and self.pre_affine is not None:
            return kernels.pre_affine_rms_norm(x, weight, self.pre_affine, self.variance_epsilon)
        return rms_norm_reference(x, weight, self.variance_epsilon, self.pre_affine, offset)

    def extra_repr(self):
        extras = [f"{self.weight.shape[0]}", f"eps={self.variance_epsilon}"]
        if self.weight_offset:
            extras.append(f"offset={self.weight_offset}")
        if self.pre_affine is not None:
            extras.append("pre_affine")
        if self.gate_rank:
            extras.append(f"gate_rank={self.gate_rank}")
        return ", ".join(extras)


# ----------------------------------------------------------------------------- the annealed activation


def annealed_glu_reference(z, alpha, base=F.silu):
    """act_α(z) = (1 − α)·φ(z) + α·σ(z): exactly φ at α = 0 and exactly torch.sigmoid at α = 1."""
    return (1 - alpha) * base(z) + alpha * torch.sigmoid(z)


def glu_base_activation(name: str):
    """φ, the activation a GLU anneal starts from, by its config name (silu/swish, or a transformers ACT2FN key)."""
    if name in ("silu", "swish"):
        return F.silu
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class AnnealedGLUActivation(nn.Module):
    """The MLP activation while SwiGLU/GeGLU is annealed into GLU; `alpha` is a buffer (not saved: the config
    holds α); `base` names φ, the family's activation."""

    def __init__(self, alpha: float = 0.0, base: str = "silu"):
        super().__init__()
        self.initial_alpha = float(alpha)
        self.base = base
        self._base_fn = glu_base_activation(base)
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """α from the config; needed because transformers builds the model on the meta device."""
        self.alpha.fill_(self.initial_alpha)

    def forward(self, z):
        return annealed_glu_reference(z, self.alpha, self._base_fn)

    def extra_repr(self):
        return f"alpha={self.initial_alpha}, from={self.base}"


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
    offset = float((surgeon or {}).get("norm_offset", 0.0))
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
        norm = SurgeonRMSNorm(weight.shape[0], eps, gate_rank=rank if has_gate else 0, pre_affine=has_pre,
                              offset=offset)
        norm.to(device=weight.device, dtype=weight.dtype)
        model.set_submodule(name, norm)
        replaced.append(name)
    return replaced


def install_rotations(model: nn.Module, surgeon: dict) -> list[str]:
    """A HadamardInput pre-hook (before any other hook) on every linear `surgeon["hadamard"]` names; returns them."""
    groups = ((surgeon or {}).get("hadamard") or {}).get("groups") or {}
    modules = dict(model.named_modules())
    hooked = []
    for group in groups.values():
        regex = target_regex(group["linears"])
        per_layer: dict[tuple, list[str]] = {}  # one tensor read by the group's linears, per layer
        for name in modules:
            if regex.match(name):
                per_layer.setdefault(_layer_index(name), []).append(name)
        if not per_layer:
            raise ValueError(f"surgeon: no module matches the Hadamard-rotated linears {group['linears']}")
        for names in per_layer.values():
            hook = HadamardInput(int(group["block"]), len(names))
            for name in names:
                module = modules[name]
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"surgeon: Hadamard target {name!r} is not a linear layer")
                module.register_forward_pre_hook(hook, prepend=True)
                module.surgeon_hadamard_block = hook.block
                hooked.append(name)
    return hooked


def _activation_key(glu: dict) -> str:
    return glu.get("activation_key", "hidden_act")


def install_activations(model: nn.Module, config) -> list[str]:
    """Replace the `act_fn` of every module `config.surgeon["glu"]` targets by an AnnealedGLUActivation at the
    config's α; nothing when there is no glu block or the family already runs the GLU activation."""
    glu = (getattr(config, "surgeon", None) or {}).get("glu")
    if not glu or getattr(config, _activation_key(glu), None) == GLU_ACTIVATION:
        return []
    regex = target_regex(glu.get("targets"))
    replaced = []
    for name, module in list(model.named_modules()):
        if regex and regex.match(name) and isinstance(getattr(module, "act_fn", None), nn.Module):
            module.act_fn = AnnealedGLUActivation(glu.get("alpha", 0.0), glu.get("from", "silu"))
            replaced.append(f"{name}.act_fn")
    if not replaced:
        raise ValueError(f"surgeon: no module matching {glu.get('targets')} has an act_fn to anneal")
    return replaced


@torch.no_grad()
def set_glu_alpha(model: nn.Module, alpha: float) -> int:
    """Set α of every annealed activation and of the config (what save_pretrained writes); returns how many."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"surgeon: GLU α must lie in [0, 1], got {alpha}")
    modules = [m for m in model.modules() if isinstance(m, AnnealedGLUActivation)]
    if not modules:
        raise ValueError("surgeon: the model has no annealed GLU activation (convert it with --transform glu)")
    for module in modules:
        module.alpha.fill_(alpha)
        module.initial_alpha = alpha
    model.config.surgeon["glu"]["alpha"] = alpha
    return len(modules)


def needs_surgeon_modules(config: dict) -> bool:
    """Whether a config (as a dict) needs this file's modules, or is a stock family model (e.g. GLU at α = 1)."""
    surgeon = config.get("surgeon") or {}
    glu = surgeon.get("glu")
    return bool(surgeon.get("gated_norm") or surgeon.get("pre_affine") or surgeon.get("hadamard")
                or surgeon.get("gated_attention")
                or (glu and config.get(_activation_key(glu)) != GLU_ACTIVATION))


# ----------------------------------------------------------------------------- config and model classes


CLASSES: dict[str, tuple[type, type]] = {}  # base model_type → (config class, model class), in definition order


class SurgeonMixin:
    """Builds the base family, then swaps in the norms and activations `config.surgeon` names and hooks the
    Hadamard rotations onto its linears. Nothing else differs."""

    def __init_subclass__(cls, **kwargs):
        # each family's model class below registers itself (with its config class) under its base model_type
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            CLASSES[cls.config_class.model_type.removeprefix(SURGEON_PREFIX)] = (cls.config_class, cls)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        surgeon = getattr(config, "surgeon", None)
        for name in (install_norms(self, surgeon) + install_activations(self, config)
                     + add_attention_gates(self, surgeon)):
            self._init_weights(self.get_submodule(name))
        install_rotations(self, surgeon)
        hook_attention_gates(self, surgeon)

    def initialize_weights(self):
        """transformers initializes the inner base model with the base family's `_init_weights`, which does not
        know the annealed activation, and builds it on the meta device: set α from the config afterwards."""
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, AnnealedGLUActivation):
                module.reset_parameters()

    def _init_weights(self, module):
        if isinstance(module, (SurgeonRMSNorm, AnnealedGLUActivation)):
            module.reset_parameters()
        elif getattr(module, "surgeon_identity_zero", False):
            init.zeros_(module.weight)
        else:
            super()._init_weights(module)


def surgeon_model_type(base_model_type: str) -> str:
    return f"{SURGEON_PREFIX}{base_model_type}"


# One pair per base family surgeon/architectures/ describes: the stock classes plus the mixin, nothing copied.
class SurgeonLlamaConfig(LlamaConfig): model_type = "surgeon_llama"  # noqa: E701
class SurgeonLlamaForCausalLM(SurgeonMixin, LlamaForCausalLM): config_class = SurgeonLlamaConfig  # noqa: E701
class SurgeonMistralConfig(MistralConfig): model_type = "surgeon_mistral"  # noqa: E701
class SurgeonMistralForCausalLM(SurgeonMixin, MistralForCausalLM): config_class = SurgeonMistralConfig  # noqa: E701
class SurgeonQwen2Config(Qwen2Config): model_type = "surgeon_qwen2"  # noqa: E701
class SurgeonQwen2ForCausalLM(SurgeonMixin, Qwen2ForCausalLM): config_class = SurgeonQwen2Config  # noqa: E701
class SurgeonQwen3Config(Qwen3Config): model_type = "surgeon_qwen3"  # noqa: E701
class SurgeonQwen3ForCausalLM(SurgeonMixin, Qwen3ForCausalLM): config_class = SurgeonQwen3Config  # noqa: E701
class SurgeonMixtralConfig(MixtralConfig): model_type = "surgeon_mixtral"  # noqa: E701
class SurgeonMixtralForCausalLM(SurgeonMixin, MixtralForCausalLM): config_class = SurgeonMixtralConfig  # noqa: E701
class SurgeonQwen2MoeConfig(Qwen2MoeConfig): model_type = "surgeon_qwen2_moe"  # noqa: E701
class SurgeonQwen2MoeForCausalLM(SurgeonMixin, Qwen2MoeForCausalLM): config_class = SurgeonQwen2MoeConfig  # noqa: E701
class SurgeonQwen3MoeConfig(Qwen3MoeConfig): model_type = "surgeon_qwen3_moe"  # noqa: E701
class SurgeonQwen3MoeForCausalLM(SurgeonMixin, Qwen3MoeForCausalLM): config_class = SurgeonQwen3MoeConfig  # noqa: E701
class SurgeonSmolLM3Config(SmolLM3Config): model_type = "surgeon_smollm3"  # noqa: E701
class SurgeonSmolLM3ForCausalLM(SurgeonMixin, SmolLM3ForCausalLM): config_class = SurgeonSmolLM3Config  # noqa: E701
# Gemma: norms scale by 1 + w (config.surgeon["norm_offset"]) and the MLP is GeGLU; the same stock-plus-mixin pair
class SurgeonGemma2Config(Gemma2Config): model_type = "surgeon_gemma2"  # noqa: E701
class SurgeonGemma2ForCausalLM(SurgeonMixin, Gemma2ForCausalLM): config_class = SurgeonGemma2Config  # noqa: E701
class SurgeonGemma3TextConfig(Gemma3TextConfig): model_type = "surgeon_gemma3_text"  # noqa: E701
class SurgeonGemma3ForCausalLM(SurgeonMixin, Gemma3ForCausalLM): config_class = SurgeonGemma3TextConfig  # noqa: E701


BASE_MODEL_TYPES = tuple(CLASSES)


def register_weight_conversions():
    """Give each surgeon_* type its base family's checkpoint conversion (per-expert tensors → fused experts).

    transformers keys these mappings by model_type and skips them for custom code unless registered, so without
    this a surgeon_mixtral model would leave its experts uninitialized when loading a per-expert checkpoint."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without conversion mappings loads checkpoints as stored
        return
    for base in BASE_MODEL_TYPES:
        mapping = get_checkpoint_conversion_mapping(base)
        if mapping:
            register_checkpoint_conversion_mapping(surgeon_model_type(base), mapping, overwrite=True)


register_weight_conversions()  # at import: also when transformers imports this file as a checkpoint's remote code


def register():
    """Register every surgeon family with the Auto classes (what importing surgeon.modeling does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for base, (config_cls, model_cls) in CLASSES.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    register_weight_conversions()
