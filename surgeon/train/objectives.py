"""Training objectives for continued pretraining (DESIGN §7): what the loss is made of, and the hooks one forward
needs to compute it.

    total = lm · LM + distill · KD + pressure · P      (QAT and the GLU α schedule change the forward, not the sum;
                                                     a quantized micro-batch: qat_lm · LM + qat_distill · KD_self)

LM        next-token cross-entropy, mean over the predicted tokens (positions 1.. of each window).
KD        self-distillation: KL(teacher ‖ student) of the next-token distributions at temperature T, × T², mean over
          every position (each is a next-token distribution, labelled or not). The teacher is the frozen source
          model, which the converted model equals at step 0, so KD and its gradient are 0 there; it runs under
          no_grad inside `loss`, on the same batch, and is never hooked (no QAT, no pressure).
P         outlier pressure. For every token row x ∈ R^d of a watched activation:
              ratio(x) = smax_τ(|x| / rms(x)),  rms(x) = sqrt(mean(x²) + ε)
              P_point  = mean over tokens of relu(ratio(x) − threshold)
          and P is the mean of P_point over the linear layers' inputs (`pressure_on` "linear_inputs": a forward
          pre-hook on every nn.Linear that W4A4 quantizes, i.e. all but lm_head and the gate projections; q/k/v and
          gate/up read the same tensor, which is computed once and counted once per layer reading it) plus the
          mean over the decoder layers' outputs (`"residual"`). Every token counts, the first one too: its
          massive activation is what the gates are there to take over.
          smax_τ is the Boltzmann soft maximum Σ_j softmax(z/τ)_j · z_j (`pressure_temperature` τ, in units of
          the ratio; τ = 0 is the hard max). Chosen over logsumexp because it never exceeds the hard max (so
          `threshold` keeps its meaning and a token whose max/RMS is below it is never penalized, whatever d is;
          τ·logsumexp overshoots by up to τ·log d, which for d = 4096 and τ = 1 is 8, more than the threshold)
          and over a top-k mean because it needs no k: one dominant outlier gives the max, two equal ones each get
          half the gradient (the hard max would push one and let the other take over). Its gradient,
          ∂s/∂z_j = p_j·(1 + (z_j − s)/τ), reaches every element near the top, and through rms(x) every element.
          Cost: a custom autograd function that saves the input (the linear layer saves it anyway) and two
          scalars per row; p and z are recomputed in the backward. Nothing outlives the step.
QAT       `qat` = "int4" | "nvfp4" | a list of them: while the step context is open, every quantized linear computes
          F.linear(q_a(x), q_w(W), b) with the formats of surgeon.quant (exactly the values `fake_quantized`
          gives) through a straight-through estimator — forward q(v), backward identity, i.e.
          v + (q(v) − v).detach() but bit-exact — so the fp weights get the gradients. The pressure hooks see the
          unquantized inputs. `qat_fraction` f < 1 runs only that share of the micro-batches through the
          quantizer (micro-batch g, counted over the run, when ⌊(g+1)·f⌋ > ⌊g·f⌋; f = ½ with grad_accum 2 is one
          quantized and one full-precision micro-batch per step): training through the quantizer alone drifts the
          full-precision model (docs/experiments.md), the mix keeps both forwards good at the cost of neither.
          On the quantized micro-batches `qat_lm` (default: `lm`) replaces the LM weight, and `qat_distill` adds
          KL(the same model's full-precision prediction ‖ the quantized one), T = 1, the target computed under
          no_grad on the same batch with the quantizer lifted (one extra forward): the quantized forward learns to
          match the full-precision one instead of (or besides) the text, which pulls the shared weights less far
          from what the full-precision micro-batches want. A list of formats takes them in turn: the n-th quantized
          micro-batch of the run uses formats[n mod len], so both W4A4 formats are in the loop.
New parameters' signal  `new_learn_from` = "all" (default) | "quantized": with "quantized" the new parameters
          (GatedNorm's gates and PreAffine's λ1, surgeon.train.engine.is_new_parameter) get no gradient from the
          full-precision micro-batches, only from the quantized ones: the gates train as a quantization adapter
          (they learn what helps the quantized forward) while the pretrained weights learn from every micro-batch.
          A model without new parameters (the control) trains exactly as with "all".
GLU α     `glu_alpha_steps` = [start, end]: α = clamp((step − start) / (end − start), 0, 1), set by set_glu_alpha
          (buffers and config) on entering the step context.

Activation (gradient) checkpointing: transformers' default (non-reentrant) recomputes each layer during the
backward, and checks that the recompute saves as many tensors as the forward did. The recomputed layers must run
the same hooks — the QAT forward, so the gradients are those of the quantized forward, and the linear-input
pressure statistics (computed again and dropped) — so with checkpointing call backward inside `step_context`.
Leaving the context before the backward then raises a SurgeonError instead of wrong gradients or torch's
CheckpointError. (Residual pressure alone hooks the layers' outputs, outside the recomputed region.) Reentrant
checkpointing runs the layers under no_grad: the linear-input pressure would then get no gradient; don't.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.errors import SurgeonError
from surgeon.modeling import AnnealedGLUActivation, set_glu_alpha
from surgeon.quant import DEFAULT_SKIP, quantize_activation, quantize_weight, quantized_linears
from surgeon.threads import single_thread
from surgeon.threads import unwrap as _unwrap
from surgeon.train.engine import is_new_parameter

QAT_FORMATS = ("int4", "nvfp4")
NEW_LEARN_FROM = ("all", "quantized")
PRESSURE_POINTS = ("linear_inputs", "residual")
RMS_EPS = 1e-8


# ----------------------------------------------------------------------------- config


@dataclass(init=False)
class ObjectiveConfig:
    lm: float = 1.0
    distill: float = 0.0
    distill_temperature: float = 1.0
    pressure: float = 0.0
    pressure_threshold: float = 6.0
    pressure_on: tuple[str, ...] = ("linear_inputs",)
    pressure_temperature: float = 1.0
    qat: str | None = None
    qat_fraction: float = 1.0
    qat_lm: float | None = None
    qat_distill: float = 0.0
    new_learn_from: str = "all"
    glu_alpha_steps: tuple[int, int] | None = None

    def __init__(self, **settings):
        names = [f.name for f in fields(self)]
        unknown = [key for key in settings if key not in names]
        if unknown:
            raise SurgeonError(f"unknown objective setting{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(repr, unknown))}; valid settings: {', '.join(names)}")
        for f in fields(self):
            setattr(self, f.name, settings.get(f.name, f.default))
        self._validate()

    def _validate(self) -> None:
        for key in ("lm", "distill", "distill_temperature", "pressure", "pressure_threshold", "pressure_temperature",
                    "qat_lm", "qat_distill"):
            value = getattr(self, key)
            if key == "qat_lm" and value is None:
                continue
            if isinstance(value, bool):
                raise SurgeonError(f"objective setting {key} must be a number, got {value!r}")
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise SurgeonError(f"objective setting {key} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise SurgeonError(f"objective setting {key} must be a finite number ≥ 0, got {value!r}")
            setattr(self, key, value)
        if isinstance(self.qat_fraction, bool) or not isinstance(self.qat_fraction, (int, float)) \
                or not 0 < self.qat_fraction <= 1:
            raise SurgeonError(f"objective setting qat_fraction must be in (0, 1], got {self.qat_fraction!r}")
        self.qat_fraction = float(self.qat_fraction)
        if self.distill_temperature <= 0:
            raise SurgeonError(f"objective setting distill_temperature must be > 0, got {self.distill_temperature}")
        if self.lm + self.distill + self.pressure + self.qat_distill + (self.qat_lm or 0) == 0:
            raise SurgeonError("objective settings lm, distill, pressure, qat_lm and qat_distill are all 0: "
                               "nothing to train")
        on = (self.pressure_on,) if isinstance(self.pressure_on, str) else self.pressure_on
        try:
            on = tuple(dict.fromkeys(on))
        except TypeError:
            raise SurgeonError(f"objective setting pressure_on must be a list of {', '.join(PRESSURE_POINTS)}, "
                               f"got {self.pressure_on!r}") from None
        bad = [p for p in on if p not in PRESSURE_POINTS]
        if bad or (self.pressure > 0 and not on):
            raise SurgeonError(f"objective setting pressure_on must name one or more of "
                               f"{', '.join(PRESSURE_POINTS)}, got {self.pressure_on!r}")
        self.pressure_on = on
        if isinstance(self.qat, str) and self.qat.lower() in ("none", ""):
            self.qat = None
        formats = [self.qat] if isinstance(self.qat, str) else self.qat
        if self.qat is not None and (not isinstance(formats, (list, tuple)) or not formats
                                     or any(f not in QAT_FORMATS for f in formats)):
            raise SurgeonError(f"objective setting qat must be none, int4, nvfp4 or a list of them, got {self.qat!r}")
        if isinstance(self.qat, (list, tuple)):  # one format is kept as a string, as written
            self.qat = formats[0] if len(formats) == 1 else tuple(formats)
        if self.new_learn_from not in NEW_LEARN_FROM:
            raise SurgeonError(f"objective setting new_learn_from must be one of {', '.join(NEW_LEARN_FROM)}, got "
                               f"{self.new_learn_from!r}")
        if self.new_learn_from == "quantized" and self.qat is None:
            raise SurgeonError("objective setting new_learn_from: quantized trains the new parameters on the "
                               "quantized micro-batches only: set qat (int4 or nvfp4) too")
        if self.qat is None and (self.qat_distill > 0 or self.qat_lm is not None):
            raise SurgeonError("objective settings qat_lm and qat_distill weigh the quantized micro-batches' loss: "
                               "set qat (int4 or nvfp4) too")
        steps = self.glu_alpha_steps
        if steps is not None:
            ok = (isinstance(steps, (list, tuple)) and len(steps) == 2
                  and all(isinstance(s, int) and not isinstance(s, bool) for s in steps))
            if not ok or not 0 <= steps[0] <= steps[1]:
                raise SurgeonError(f"objective setting glu_alpha_steps must be [start, end] with 0 ≤ start ≤ end "
                                   f"(integer steps), got {steps!r}")
            self.glu_alpha_steps = (steps[0], steps[1])

    @property
    def qat_formats(self) -> tuple[str, ...]:
        """The QAT formats, taken in turn by the quantized micro-batches (empty: no QAT)."""
        if self.qat is None:
            return ()
        return (self.qat,) if isinstance(self.qat, str) else tuple(self.qat)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["qat"] = list(self.qat) if isinstance(self.qat, tuple) else self.qat
        out["pressure_on"] = list(self.pressure_on)
        out["glu_alpha_steps"] = list(self.glu_alpha_steps) if self.glu_alpha_steps else None
        return out


def glu_alpha(step: int, steps: tuple[int, int]) -> float:
    """α of the linear schedule: 0 up to `start`, 1 from `end` on."""
    start, end = steps
    if step >= end:
        return 1.0
    if step <= start:
        return 0.0
    return (step - start) / (end - start)


# ----------------------------------------------------------------------------- differentiable max/RMS


class _MaxRMS(torch.autograd.Function):
    """Per row of x (…, d): s = smax_τ(|x| / sqrt(mean(x²) + ε)), float32. Saves x and (rms, s) per row only."""

    @staticmethod
    def forward(ctx, x, temperature):
        with single_thread(x):
            return _MaxRMS._forward(ctx, x, temperature)

    @staticmethod
    def _forward(ctx, x, temperature):
        z, r = _ratio(x)
        if temperature > 0:
            s = (torch.softmax(z / temperature, dim=-1) * z).sum(-1)
        else:
            s = z.amax(-1)
        ctx.save_for_backward(x, r, s)
        ctx.temperature = temperature
        return s

    @staticmethod
    def backward(ctx, grad_s):
        x, r, s = ctx.saved_tensors
        with single_thread(x):
            return _MaxRMS._backward(ctx, x, r, s, grad_s)

    @staticmethod
    def _backward(ctx, x, r, s, grad_s):
        tau = ctx.temperature
        xf = x.float()
        z = xf.abs() / r
        if tau > 0:
            p = torch.softmax(z / tau, dim=-1)
            dz = p * (1 + (z - s.unsqueeze(-1)) / tau)
        else:
            dz = F.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
        dz = dz * grad_s.unsqueeze(-1)
        # z_j = |x_j| / r, r = sqrt(mean(x²) + ε):  dx_i = (dz_i·sign(x_i) − x_i/(d·r) · Σ_j dz_j z_j) / r
        d = x.shape[-1]
        dx = (dz * xf.sign() - xf / (d * r) * (dz * z).sum(-1, keepdim=True)) / r
        return dx.to(x.dtype), None


def _ratio(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    r = xf.pow(2).mean(-1, keepdim=True).add_(RMS_EPS).sqrt_()
    return xf.abs() / r, r


def max_rms(x: torch.Tensor, temperature: float = 0.0) -> torch.Tensor:
    """max|x| / rms(x) per row (soft maximum with temperature τ > 0), differentiable, float32."""
    return _MaxRMS.apply(x, float(temperature))


# ----------------------------------------------------------------------------- QAT


class _STE(torch.autograd.Function):
    """Forward q(v), backward identity: v + (q(v) − v).detach(), with the forward value exactly q(v)."""

    @staticmethod
    def forward(ctx, v, quantize):
        return quantize(v)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _qat_forward(layer: nn.Linear, fmt: str):
    def forward(x):
        return F.linear(_STE.apply(x, lambda v: quantize_activation(v, fmt)),
                        _STE.apply(layer.weight, lambda w: quantize_weight(w, fmt)), layer.bias)

    forward._surgeon_qat = True
    return forward


# ----------------------------------------------------------------------------- objectives


def _input_ids(batch) -> torch.Tensor:
    if isinstance(batch, Mapping):
        return batch["input_ids"]
    return batch


class Objectives:
    """The loss of one training step; see the module docstring. Use:

        with objectives.step_context(step, total_steps):
            outputs = model(input_ids=batch)
            loss, terms = objectives.loss(batch, outputs)
            loss.backward()   # here, inside the context, when layers are checkpointed
    """

    def __init__(self, cfg: ObjectiveConfig | Mapping, model: nn.Module, teacher: nn.Module | None = None):
        self.cfg = cfg if isinstance(cfg, ObjectiveConfig) else ObjectiveConfig(**cfg)
        self.model = _unwrap(model)
        self.teacher = _unwrap(teacher) if teacher is not None else None
        if self.needs_teacher and self.teacher is None:
            raise SurgeonError("distill > 0 needs a teacher: pass the frozen source model as `teacher`")
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.linears = quantized_linears(self.model, DEFAULT_SKIP)
        self.new_parameters = [p for name, p in self.model.named_parameters()
                               if p.requires_grad and is_new_parameter(name)]
        if (self.cfg.qat or self._pressure_on("linear_inputs")) and not self.linears:
            raise SurgeonError(f"{type(self.model).__name__} has no linear layer to quantize or watch")
        if self.cfg.glu_alpha_steps is not None:
            if not any(isinstance(m, AnnealedGLUActivation) for m in self.model.modules()):
                raise SurgeonError("glu_alpha_steps is set but the model has no annealed GLU activation "
                                   "(convert it with --transform glu)")
        self._reset_step()
        self._active = False
        self._quantizing: list[nn.Linear] = []  # the layers running through the quantizer in this context

    @property
    def needs_teacher(self) -> bool:
        return self.cfg.distill > 0

    def _pressure_on(self, point: str) -> bool:
        return self.cfg.pressure > 0 and point in self.cfg.pressure_on

    def _reset_step(self) -> None:
        self._linear_stats: list[tuple[torch.Tensor, int]] = []  # (per-token ratio, how many layers read it)
        self._seen: dict[int, tuple[weakref.ref, int]] = {}  # id(input) -> (weak ref to it, index in stats)
        self._residual_stats: list[torch.Tensor] = []
        self._collecting = False
        self._pending_backward = 0  # losses of this step whose backward has not started

    # -- hooks

    # Each forward of the model starts a fresh collection (so several micro-batches, each forward then loss(), may
    # share one context); loss() consumes it. A checkpointed layer recomputed during the backward (no forward of
    # the whole model) still computes its statistics, so it saves the same tensors as the original forward
    # (non-reentrant checkpointing checks that), but they are dropped. Inputs are held weakly: nothing keeps an
    # activation alive that would otherwise be freed.

    def _model_hook(self, module, args, kwargs):
        self._linear_stats, self._residual_stats, self._seen = [], [], {}
        self._collecting = True
        return None

    def _linear_hook(self, module, args):
        if not args:
            return None
        x = args[0]
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x:
            if seen[1] is not None:
                ratio, count = self._linear_stats[seen[1]]
                self._linear_stats[seen[1]] = (ratio, count + 1)
            return None
        ratio = max_rms(x, self.cfg.pressure_temperature)
        index = None
        if self._collecting:
            index = len(self._linear_stats)
            self._linear_stats.append((ratio, 1))
        self._seen[id(x)] = (weakref.ref(x), index)
        return None

    def _residual_hook(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        ratio = max_rms(hidden, self.cfg.pressure_temperature)
        if self._collecting:
            self._residual_stats.append(ratio)
        return None

    @contextmanager
    def step_context(self, step: int, total_steps: int | None = None, *, micro: int = 0,
                     micro_per_step: int = 1) -> Iterator[Objectives]:
        """Set α for `step`, install this micro-batch's hooks (pressure statistics, QAT), remove them on exit."""
        if self._active:
            raise SurgeonError("step_context is already open; close it before the next step")
        if self.cfg.glu_alpha_steps is not None:
            set_glu_alpha(self.model, glu_alpha(step, self.cfg.glu_alpha_steps))
        handles, patched = [], []
        self._reset_step()
        self._active = True
        try:
            if self.cfg.pressure > 0:
                handles.append(self.model.register_forward_pre_hook(self._model_hook, with_kwargs=True))
            if self._pressure_on("linear_inputs"):  # registered before QAT: they see the fp inputs
                handles += [layer.register_forward_pre_hook(self._linear_hook) for _, layer in self.linears]
            if self._pressure_on("residual"):
                from surgeon.architectures import decoder_layers

                handles += [layer.register_forward_hook(self._residual_hook) for layer in decoder_layers(self.model)]
            fmt = self.qat_format(step * micro_per_step + micro)
            if fmt is not None:
                for _, layer in self.linears:
                    if "forward" in layer.__dict__:
                        raise SurgeonError(f"{type(layer).__name__} already has its forward replaced; "
                                           f"cannot train it through the quantizer")
                    layer.forward = _qat_forward(layer, fmt)
                    patched.append(layer)
            elif self.cfg.new_learn_from == "quantized":  # a full-precision micro-batch: the adapter learns nothing
                handles += [p.register_hook(torch.zeros_like) for p in self.new_parameters]
            self._quantizing = patched
            yield self
            if (patched or self._pressure_on("linear_inputs")) and self._pending_backward \
                    and _checkpointing(self.model):
                raise SurgeonError("with activation checkpointing, qat and pressure on linear_inputs need the "
                                   "backward inside step_context, where the recomputed layers run the same hooks")
        finally:
            for handle in handles:
                handle.remove()
            for layer in patched:
                if getattr(layer.__dict__.get("forward"), "_surgeon_qat", False):
                    del layer.forward
            self._reset_step()
            self._active = False
            self._quantizing = []

    def quantizes(self, micro_batch: int) -> bool:
        """Whether micro-batch `micro_batch` (counted over the run) runs through the QAT quantizer."""
        return self.qat_format(micro_batch) is not None

    def qat_format(self, micro_batch: int) -> str | None:
        """The format micro-batch `micro_batch` (counted over the run) is quantized with, None for full precision:
        the quantized micro-batches take the formats in turn."""
        f, formats = self.cfg.qat_fraction, self.cfg.qat_formats
        done = math.floor(micro_batch * f)  # quantized micro-batches before this one
        if not formats or math.floor((micro_batch + 1) * f) == done:
            return None
        return formats[done % len(formats)]

    # -- the loss

    def loss(self, batch, outputs) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted total (a scalar tensor) and every computed term as a python float (unweighted), plus
        "total". "lm" is always reported; "distill" and "pressure" when their weight is > 0."""
        cfg = self.cfg
        ids = _input_ids(batch)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        total = logits.new_zeros((), dtype=torch.float32)
        terms: dict[str, float] = {}

        # labels shifted, not logits: slicing the logits copies all of them (200 MB for SmolLM2's batch)
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)
        lm = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        terms["lm"] = lm.item()
        quantized = bool(self._quantizing)
        lm_weight = cfg.qat_lm if quantized and cfg.qat_lm is not None else cfg.lm
        if lm_weight > 0:
            total = total + lm_weight * lm

        if quantized and cfg.qat_distill > 0:
            kd = self._self_distill(ids, logits)
            terms["qat_distill"] = kd.item()
            total = total + cfg.qat_distill * kd

        if cfg.distill > 0:
            kd = self._distill(ids, logits)
            terms["distill"] = kd.item()
            total = total + cfg.distill * kd

        if cfg.pressure > 0:
            if not self._active:
                raise SurgeonError("the pressure term is collected by hooks: call loss() inside step_context")
            pressure, ratio = self._pressure(total)
            self._linear_stats, self._residual_stats, self._seen = [], [], {}
            self._collecting = False  # a checkpointed recompute during the backward adds nothing
            terms["pressure"] = pressure.item()
            terms["pressure_ratio"] = ratio  # mean (soft) max/RMS of the watched rows, for the log
            total = total + cfg.pressure * pressure

        if total.requires_grad and self._active and (cfg.qat or self._pressure_on("linear_inputs")):
            self._pending_backward += 1
            total.register_hook(self._mark_backward)
        terms["total"] = total.item()
        return total, terms

    def _mark_backward(self, grad):
        self._pending_backward -= 1
        return grad

    def _distill(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids.to(_device(self.teacher))).logits.to(logits.device)
        return _kl(logits, teacher_logits, self.cfg.distill_temperature)

    def _self_distill(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """KL(the model's own full-precision prediction ‖ its quantized one) on the same batch: the full-precision
        forward runs under no_grad with the quantizer lifted and the pressure statistics of the quantized forward
        kept aside, so only the quantized forward gets the gradient."""
        stats = (self._linear_stats, self._residual_stats, self._seen, self._collecting)
        forwards = [(layer, layer.__dict__.pop("forward")) for layer in self._quantizing]
        try:
            with torch.no_grad():
                target = self.model(input_ids=ids).logits
        finally:
            for layer, forward in forwards:
                layer.forward = forward
            self._linear_stats, self._residual_stats, self._seen, self._collecting = stats
        return _kl(logits, target, 1.0)

    def _pressure(self, like: torch.Tensor) -> tuple[torch.Tensor, float]:
        t = self.cfg.pressure_threshold
        total = like.new_zeros(())
        ratios, n = 0.0, 0
        if self._linear_stats:
            layers = sum(count for _, count in self._linear_stats)
            term = sum(count * F.relu(s - t).mean() for s, count in self._linear_stats) / layers
            total = total + term
            ratios += sum(count * float(s.detach().mean()) for s, count in self._linear_stats)
            n += layers
        if self._residual_stats:
            total = total + sum(F.relu(s - t).mean() for s in self._residual_stats) / len(self._residual_stats)
            ratios += sum(float(s.detach().mean()) for s in self._residual_stats)
            n += len(self._residual_stats)
        if not n:
            raise SurgeonError("the pressure term saw no activation: run the model's forward inside step_context, "
                               "then loss() once for it")
        return total, ratios / n


def _kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions at temperature T, × T², mean over positions."""
    vocab = min(student.shape[-1], teacher.shape[-1])  # padded vocabularies: compare the shared part
    log_p_s = F.log_softmax(student[..., :vocab].float() / T, dim=-1).reshape(-1, vocab)
    log_p_t = F.log_softmax(teacher[..., :vocab].float() / T, dim=-1).reshape(-1, vocab)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * T * T


def _checkpointing(model: nn.Module) -> bool:
    """Whether layers are recomputed during the backward (transformers 5 renamed gradient → activation)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(model)):
            return bool(getattr(model, attr))
    return False


def _device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
