"""Fake quantization for W4A4 evaluation (DESIGN §8): values are rounded to the 4-bit grid and scaled back, so
a float model computes what a W4A4 kernel would.

NVFP4 (the paper's App. A.4.2): E2M1 values {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6} in blocks of 16 along the
input dimension; each block has a scale stored as FP8-E4M3, and the whole tensor one FP32 scale chosen so the
largest block scale lands at E4M3's maximum, 448:

    s_t = amax(x) / (6 · 448)                      (per tensor for weights, per token for activations)
    s_b = e4m3(amax(block) / 6 / s_t)              (round-to-nearest-even, saturating)
    q   = e2m1(x / (s_b · s_t)) · s_b · s_t        (round-to-nearest-even on the E2M1 grid)

INT4, symmetric: q = clamp(round(x / s), −7, 7) · s with s = amax / 7, per group of `group` input channels for
weights and per token for activations.

SmoothQuant (Xiao et al. 2023) as an optional pre-pass: per input channel j of a linear layer,
    s_j = max|X_j|^α / max|W_:,j|^(1−α)           (α = 0.5; max|X_j| over calibration tokens)
and the layer computes q_a(x / s) · q_w(W · s)ᵀ, which is x · Wᵀ before rounding: the activation outlier channels
are divided down and the weights take them up. Layers that read the same tensor (q/k/v, gate/up) share one s,
taken over all their weights, as a deployment folds s into the norm (or the writer) in front of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SurgeonError

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
INT4_MAX = 7.0
INT4_GROUP = 32
TINY = torch.finfo(torch.float32).tiny
FORMATS = ("none", "nvfp4", "int4")
# Left in full precision: the LM head (unless asked) and the rank-r gate projections of GatedNorm.
DEFAULT_SKIP = ("lm_head", "gate_down", "gate_up")


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to even mantissa, saturating at ±6. The grid's step is 0.5 below 2,
    1 below 4 and 2 up to 6, so rounding |x|/step half-to-even (torch.round) is exactly E2M1's rounding."""
    a = x.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return (a / step).round_().mul_(step).copysign_(x)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to FP8-E4M3 (torch's cast is round-to-nearest-even), saturating at 448."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def _blocks(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """View the last dimension as (n_blocks, size), zero-padding a ragged tail (zeros change no amax)."""
    d = x.shape[-1]
    pad = -d % size
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size), d


def nvfp4(x: torch.Tensor, *, per_row: bool, amax: float | None = None) -> torch.Tensor:
    """NVFP4 fake quantization along the last dimension; one FP32 scale per row (`per_row`) or per tensor, from
    the tensor's own amax or, given `amax`, a fixed one (static: a serving engine's calibrated input global scale;
    blocks above it saturate at E4M3's 448 and E2M1's 6)."""
    dtype = x.dtype
    xf = x.float()
    if amax is not None:
        amax, per_row = torch.tensor(float(amax)), False
    else:
        amax = xf.abs().amax(dim=-1, keepdim=True) if per_row else xf.abs().amax()
    s_t = (amax / (E2M1_MAX * E4M3_MAX)).clamp(min=TINY)
    blocks, d = _blocks(xf, NVFP4_BLOCK)
    s_t_b = s_t.unsqueeze(-1) if per_row else s_t
    # an all-zero block gets scale TINY: 0 / TINY = 0, so it stays zero without a branch
    scale = round_e4m3(blocks.abs().amax(dim=-1, keepdim=True) / E2M1_MAX / s_t_b).mul_(s_t_b).clamp_(min=TINY)
    q = round_e2m1(blocks / scale).mul_(scale)
    return q.reshape(*xf.shape[:-1], -1)[..., :d].to(dtype)


def int4(x: torch.Tensor, *, group: int | None) -> torch.Tensor:
    """Symmetric INT4 along the last dimension: per group of `group` values, or per row when group is None."""
    dtype = x.dtype
    xf = x.float()
    blocks, d = _blocks(xf, group) if group else (xf.unsqueeze(-2), xf.shape[-1])
    s = (blocks.abs().amax(dim=-1, keepdim=True) / INT4_MAX).clamp_(min=TINY)
    q = (blocks / s).round_().clamp_(-INT4_MAX, INT4_MAX).mul_(s)
    return q.reshape(*xf.shape[:-1], -1)[..., :d].to(dtype)


# per format: (weights, activations): weights per tensor / per group, activations dynamic per token
_QUANTIZERS = {
    "nvfp4": (lambda w: nvfp4(w, per_row=False), lambda x: nvfp4(x, per_row=True)),
    "int4": (lambda w: int4(w, group=INT4_GROUP), lambda x: int4(x, group=None)),
}


def _quantizers(fmt: str):
    try:
        return _QUANTIZERS[fmt]
    except KeyError:
        raise SurgeonError(f"unknown quantization format {fmt!r}; use one of {', '.join(FORMATS)}") from None


def quantize_weight(w: torch.Tensor, fmt: str) -> torch.Tensor:
    return _quantizers(fmt)[0](w)


def quantize_activation(x: torch.Tensor, fmt: str) -> torch.Tensor:
    return _quantizers(fmt)[1](x)


def quantized_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(part in skip for part in name.split("."))]


SMOOTH_ALPHA = 0.5
SMOOTH_FLOOR = 1e-5


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise SurgeonError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")


def balance_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-channel s = max|X_j|^α / max|W_:,j|^(1−α), both maxima floored (no division by 0)."""
    check_alpha(alpha)
    a = act_amax.float().clamp(min=SMOOTH_FLOOR).pow(alpha)
    return (a / weight_amax.float().clamp(min=SMOOTH_FLOOR).pow(1 - alpha)).clamp(min=SMOOTH_FLOOR)


@torch.no_grad()
def input_channel_amax(model: nn.Module, windows, layers: list[tuple[str, nn.Module]]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Per layer, max |x_j| over every token of `windows` (batches of token ids) for each input channel j; and
    which layers read one tensor: group ids, equal for a layer whose input is the very tensor the previous
    layer read (q/k/v, gate/up), taken from the first forward."""
    amax: dict[str, torch.Tensor] = {}
    group_of: dict[str, int] = {}
    last = {"x": None, "group": -1, "groups": 0}

    def hook(name):
        def record(module, args):
            x = args[0]
            a = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
            if name not in group_of:
                if last["x"] is not x:
                    last["group"], last["groups"] = last["groups"], last["groups"] + 1
                group_of[name] = last["group"]
            last["x"] = x
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    try:
        for ids in windows:
            last["x"] = None
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return amax, group_of


@torch.no_grad()
def smoothquant_scales(model: nn.Module, windows, alpha: float = SMOOTH_ALPHA,
                       skip: tuple[str, ...] = DEFAULT_SKIP) -> dict[str, torch.Tensor]:
    """{linear layer name: s (in_features,)} from the activations of `windows` (batches of token ids); layers
    whose forward reads the tensor the previous one read share s (see the module docstring)."""
    check_alpha(alpha)  # before the calibration forward
    layers = quantized_linears(model, skip)
    amax, group_of = input_channel_amax(model, windows, layers)
    scales = {}
    weights = dict(layers)
    for group in set(group_of.values()):
        names = [n for n in group_of if group_of[n] == group]
        a = torch.stack([amax[n] for n in names]).amax(0)
        w = torch.stack([weights[n].weight.detach().abs().amax(0).float() for n in names]).amax(0)
        s = balance_scales(a, w, alpha)
        for n in names:
            scales[n] = s
    return scales


@contextmanager
def fake_quantized(model: nn.Module, fmt: str, skip: tuple[str, ...] = DEFAULT_SKIP,
                   smooth: dict[str, torch.Tensor] | None = None,
                   inputs: dict[str, float] | None = None) -> Iterator[int]:
    """Within the block, every linear layer (but `skip`) has W4 weights and A4 inputs; restored on exit.
    `smooth` ({layer name: s}, smoothquant_scales) quantizes x / s and W · s instead. `inputs` ({layer name:
    calibrated amax}, NVFP4 only): the inputs' tensor scale is fixed from it, as a deployed checkpoint's
    input_global_scale, instead of taken per token. Yields the number of layers quantized."""
    if fmt == "none":
        yield 0
        return
    if inputs is not None and fmt != "nvfp4":
        raise SurgeonError(f"a static input scale is NVFP4's; {fmt} scales its inputs per token")
    quantize_w, quantize_x = _quantizers(fmt)
    layers = quantized_linears(model, skip)
    saved, hooks = [], []
    try:
        with torch.no_grad():
            for name, layer in layers:
                saved.append((layer, layer.weight.data))
                s = None if smooth is None else smooth.get(name)
                if inputs is not None:
                    layer.weight.data = quantize_w(layer.weight.data)
                    hooks.append(layer.register_forward_pre_hook(
                        lambda mod, args, a=inputs[name]: (nvfp4(args[0], per_row=False, amax=a), *args[1:])))
                elif s is None:
                    layer.weight.data = quantize_w(layer.weight.data)
                    hooks.append(layer.register_forward_pre_hook(
                        lambda mod, args: (quantize_x(args[0]), *args[1:])))
                else:
                    w = layer.weight.data
                    layer.weight.data = quantize_w(w * s.to(w))
                    hooks.append(layer.register_forward_pre_hook(
                        lambda mod, args, s=s: (quantize_x(args[0] / s.to(args[0])), *args[1:])))
        yield len(layers)
    finally:
        for hook in hooks:
            hook.remove()
        for layer, weight in saved:
            layer.weight.data = weight
