"""Gate telemetry: what every GatedNorm's gate does on real tokens, measured alongside an existing pass.

A GatedNorm is a norm module with `gate_rank` > 0 and `gate_down`, `gate_up` linears (surgeon's SurgeonRMSNorm,
or the copy a checkpoint's remote code defines: found by those attributes, not by class):

    y = N(x) = λ ⊙ (λ1 ⊙ x) / sqrt(mean((λ1 ⊙ x)²) + ε),   g = σ(W_up · silu(W_down · y)),   out = g ⊙ y

At identity init W_up = 0, so g = ½ everywhere. A forward hook recomputes y and g from the norm's input and
parameters (float32, no grad; the model's output is untouched) and keeps running float64 sums, O(d) per norm.
Over the T tokens t and d channels c a norm has seen, with standard deviations taken with correction 0:

    mean_abs_dev      mean over (t, c) of |g − ½|                   how far the gate has moved from its init
    spread_channels   mean over t of std over c of g                how differently one token's channels are gated
    spread_tokens     mean over c of std over t of g                how much a channel's gate depends on the token
    corr_abs_y        Pearson correlation of g with |y| over every (t, c) element; < 0 means large |y| gets a
                      small gate, the paper's outlier suppression. None when g or |y| is constant (variance
                      ≤ 1e-12 × its mean square: float rounding, not signal), e.g. at identity init
    g_min, g_max      the extremes of g
    tokens            T

    with record_gates(model) as gates:
        ...forward passes...
    gates.results()   # {"norms": {module path: {the keys above}}, "mean": {key: mean over the norms, for STATS}}
                      # or None when the model has no GatedNorm or no token went through one
    gates.attention_results()   # the same for the gated attention's gates g = σ(x·W_gᵀ) ("gates" for "norms";
                                # corr_abs_y None: the gated value is the attention output, not recomputed here)

"mean" averages corr_abs_y over the norms where it is defined (None when it is nowhere). Everything is plain
JSON (no NaN). DeepSpeed engines are unwrapped (`.module`), so the names are the model's own; a call whose
weights are not gathered on this rank (ZeRO-3 partitions) is skipped.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .modeling.modeling_surgeon import rms_norm_reference
from .threads import single_thread
from .threads import unwrap as _unwrap

STATS = ("mean_abs_dev", "spread_channels", "spread_tokens", "corr_abs_y", "g_min", "g_max")
_FLAT = 1e-12  # a variance at or below this × the mean square is float rounding: the correlation is undefined


def is_gated_norm(module: nn.Module) -> bool:
    return ((getattr(module, "gate_rank", 0) or 0) > 0 and isinstance(getattr(module, "gate_down", None), nn.Linear)
            and isinstance(getattr(module, "gate_up", None), nn.Linear))


def gated_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in _unwrap(model).named_modules() if is_gated_norm(m)]


def attention_gates(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every gated attention's `output_gate` linear (g = σ of its output), by module path."""
    return [(f"{name}.output_gate", m.output_gate) for name, m in _unwrap(model).named_modules()
            if isinstance(getattr(m, "output_gate", None), nn.Linear)]


class _Sums:
    """One norm's running float64 sums (g over channels kept per channel for spread_tokens)."""

    def __init__(self, d: int):
        self.tokens = 0
        self.abs_dev = self.channel_std = self.a = self.a2 = self.ga = 0.0
        self.g = torch.zeros(d, dtype=torch.float64)
        self.g2 = torch.zeros(d, dtype=torch.float64)
        self.g_min, self.g_max = math.inf, -math.inf

    @torch.no_grad()
    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        d = self.g.numel()
        if x.shape[-1] != d or module.weight.numel() != d:  # e.g. ZeRO-3 weights not gathered here: skip
            return
        with single_thread(x):
            pre = getattr(module, "pre_affine", None)
            y = rms_norm_reference(x.detach().float(), module.weight.float(), module.variance_epsilon,
                                   None if pre is None else pre.float(), getattr(module, "weight_offset", 0.0))
            g = torch.sigmoid(F.linear(F.silu(F.linear(y, module.gate_down.weight.float())),
                                       module.gate_up.weight.float()))
            self.accumulate(g, y.abs())

    @torch.no_grad()
    def add_logits(self, logits: torch.Tensor) -> None:
        """An attention gate's σ input (its linear's output); no |y| to correlate with."""
        if logits.shape[-1] != self.g.numel():  # ZeRO-3: not gathered here
            return
        with single_thread(logits):
            self.accumulate(torch.sigmoid(logits.detach().float()), None)

    def accumulate(self, g: torch.Tensor, a: torch.Tensor | None) -> None:
        d = self.g.numel()
        # float64 from here: spread_tokens and the correlation subtract large sums
        g = g.reshape(-1, d).double()
        self.tokens += g.shape[0]
        self.abs_dev += float((g - 0.5).abs().sum())
        self.channel_std += float(g.std(-1, correction=0).sum()) if d > 1 else 0.0
        self.g += g.sum(0).cpu()
        self.g2 += (g * g).sum(0).cpu()
        if a is not None:
            a = a.reshape(-1, d).double()
            self.a += float(a.sum())
            self.a2 += float((a * a).sum())
            self.ga += float((g * a).sum())
        self.g_min = min(self.g_min, float(g.min()))
        self.g_max = max(self.g_max, float(g.max()))

    def stats(self) -> dict:
        t, n = self.tokens, self.tokens * self.g.numel()
        mean_g = self.g / t
        var_tokens = (self.g2 / t - mean_g * mean_g).clamp_(min=0)
        mg, ma = float(self.g.sum()) / n, self.a / n
        g2, a2 = float(self.g2.sum()) / n, self.a2 / n
        vg, va = g2 - mg * mg, a2 - ma * ma
        corr = None
        if vg > _FLAT * g2 and va > _FLAT * a2:
            corr = max(-1.0, min(1.0, (self.ga / n - mg * ma) / math.sqrt(vg * va)))
        return {"mean_abs_dev": self.abs_dev / n, "spread_channels": self.channel_std / t,
                "spread_tokens": float(var_tokens.sqrt().mean()), "corr_abs_y": corr,
                "g_min": self.g_min, "g_max": self.g_max, "tokens": t}


class GateRecorder:
    """Hooks every GatedNorm and attention gate of `model` until `remove()`; `results()` and
    `attention_results()` at any time (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.sums: dict[str, _Sums] = {}
        self.attention: dict[str, _Sums] = {}
        self.handles = []
        for name, module in gated_norms(model):
            sums = self.sums[name] = _Sums(module.gate_up.out_features)  # not weight's shape: ZeRO-3 partitions it
            self.handles.append(module.register_forward_hook(
                lambda m, args, out, s=sums: s.add(m, args[0]) if args else None))
        for name, gate in attention_gates(model):
            sums = self.attention[name] = _Sums(gate.out_features)
            self.handles.append(gate.register_forward_hook(lambda m, args, out, s=sums: s.add_logits(out)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def results(self) -> dict | None:
        norms = _summary(self.sums)
        return None if norms is None else {"norms": norms[0], "mean": norms[1]}

    def attention_results(self) -> dict | None:
        """{"gates": {attention gate path: the keys above, corr_abs_y None}, "mean": ...}, or None without any."""
        gates = _summary(self.attention)
        return None if gates is None else {"gates": gates[0], "mean": gates[1]}


def _summary(sums: dict[str, _Sums]) -> tuple[dict, dict] | None:
    rows = {name: s.stats() for name, s in sums.items() if s.tokens}
    if not rows:
        return None
    mean = {}
    for key in STATS:
        values = [row[key] for row in rows.values() if row[key] is not None]
        mean[key] = sum(values) / len(values) if values else None
    return rows, mean


@contextlib.contextmanager
def record_gates(model: nn.Module) -> Iterator[GateRecorder]:
    """A GateRecorder on `model` for the duration of the block; its results stay readable afterwards."""
    recorder = GateRecorder(model)
    try:
        yield recorder
    finally:
        recorder.remove()
