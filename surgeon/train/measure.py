"""What continued pretraining exists to change, measured on held-out batches (DESIGN §7), in one no-grad pass.

    metrics = measure(model, heldout_batches, sink_dims=None)

`heldout_batches`: an iterable of input_ids tensors (batch, seq) (or mappings with "input_ids"). Returns a
JSON-serializable dict (dimension keys are strings, so a JSON round trip returns the same dict):

    loss, ppl                    next-token cross-entropy (mean over every predicted token) and exp(loss)
    tokens                       how many tokens were predicted
    residual_max                 [L+1] max |h| per residual point: the embedding output, then each decoder layer's
                                 output
    residual_peak                max of residual_max
    top_dims                     the 4 dimensions with the largest mean |h| over tokens (position 0 excluded),
                                 averaged over the decoder-layer points — the residual sinks, as scan finds them
    sink_abs                     {dim: that mean |h|} for `sink_dims` (top_dims when None)
    sink_first_token_abs         {dim: mean |h| at position 0, averaged over the decoder-layer points}
    linear_input_max_rms         per linear layer W4A4 quantizes (lm_head and gate projections skipped): the mean
                                 over tokens of max|x| / rms(x); then the mean over those layers
    linear_input_max_rms_worst   the largest per-layer value, and linear_input_max_rms_worst_layer its name
    first_token_attention        per decoder layer, the attention mass on key 0 (mean over heads and query
                                 positions 1..; None for a layer whose attention could not be followed), and
                                 first_token_attention_mean its mean: the attention sink
    gates                        only for a model with GatedNorms: surgeon.gates' statistics of every gate
                                 ({"norms": {module path: {mean_abs_dev, spread_channels, spread_tokens,
                                 corr_abs_y, g_min, g_max, tokens}}, "mean": {...}}), in the same pass
    attention_gates              only for a model with gated attention: the same of its output gates
                                 ({"gates": {gate path: {...}}, "mean": {...}}; corr_abs_y None)

Memory is O(layers × d): running sums only. The model's train/eval mode is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.architectures import decoder_layers
from surgeon.errors import SurgeonError
from surgeon.gates import GateRecorder
from surgeon.quant import DEFAULT_SKIP, quantized_linears
from surgeon.scan_recorder import Recorder, scan_attention_enabled
from surgeon.threads import single_thread
from surgeon.threads import unwrap as _unwrap

TOP_DIMS = 4
RMS_EPS = 1e-8


@torch.no_grad()
def measure(model: nn.Module, heldout_batches: Iterable, sink_dims: Sequence[int] | None = None) -> dict:
    model = _unwrap(model)
    layers = decoder_layers(model)
    linears = quantized_linears(model, DEFAULT_SKIP)
    d = model.config.hidden_size
    points = len(layers) + 1
    f64 = dict(dtype=torch.float64)
    res_max = torch.zeros(points, **f64)
    sum_abs = torch.zeros(points, d, **f64)  # positions 1..
    sum_first = torch.zeros(points, d, **f64)  # position 0
    counts = {"rest": 0, "first": 0}
    lin_sum = torch.zeros(len(linears), **f64)
    lin_tokens = torch.zeros(len(linears), **f64)
    seen: dict[int, tuple[torch.Tensor, float, int]] = {}  # q/k/v (gate/up) read one tensor: reduce it once

    def residual(point, hidden):
        with single_thread(hidden):
            _residual(point, hidden)

    def _residual(point, hidden):
        a = hidden.detach().float().abs()
        res_max[point] = max(float(res_max[point]), float(a.amax()))
        sum_first[point] += a[:, 0].reshape(-1, d).sum(0).double().cpu()
        sum_abs[point] += a[:, 1:].reshape(-1, d).sum(0).double().cpu()

    def linear(index, x):
        hit = seen.get(id(x))
        if hit is not None and hit[0] is x:
            total, n = hit[1], hit[2]
        else:
            with single_thread(x):
                xf = x.detach().float()
                rms = xf.pow(2).mean(-1).add_(RMS_EPS).sqrt_()
                ratio = xf.abs().amax(-1) / rms
                total, n = float(ratio.sum()), ratio.numel()
            seen[id(x)] = (x, total, n)
        lin_sum[index] += total
        lin_tokens[index] += n

    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: residual(0, out))]
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(
            lambda m, a, out, p=i + 1: residual(p, out[0] if isinstance(out, tuple) else out)))
    for j, (_, layer) in enumerate(linears):
        handles.append(layer.register_forward_pre_hook(lambda m, a, j=j: linear(j, a[0]) if a else None))
    gates = GateRecorder(model)
    sinks = Recorder(model, None, massive_abs=0.0, massive_ratio=0.0, top_k=0, sample_tokens=0, sample_dims=0)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, tokens, batches = 0.0, 0, 0
    try:
        with scan_attention_enabled(model, sinks):  # only its attention path: the key-0 mass of every layer
            for batch in heldout_batches:
                ids = batch["input_ids"] if isinstance(batch, dict) else batch
                ids = torch.as_tensor(ids)
                if ids.dim() == 1:
                    ids = ids.unsqueeze(0)
                ids = ids.to(device)
                seen.clear()
                logits = model(input_ids=ids).logits
                seen.clear()
                if ids.shape[1] > 1:
                    loss_sum += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                      ids[:, 1:].reshape(-1), reduction="sum"))
                    tokens += ids[:, 1:].numel()
                counts["first"] += ids.shape[0]
                counts["rest"] += ids.shape[0] * (ids.shape[1] - 1)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
        gates.remove()
        model.train(was_training)
    if not batches:
        raise SurgeonError("measure: no held-out batch given")

    mean_abs = (sum_abs[1:] / max(counts["rest"], 1)).mean(0)  # over decoder-layer points
    mean_first = (sum_first[1:] / max(counts["first"], 1)).mean(0)
    top = [int(i) for i in torch.argsort(mean_abs, descending=True)[:TOP_DIMS]]
    dims = top if sink_dims is None else [int(k) for k in sink_dims]
    bad = [k for k in dims if not 0 <= k < d]
    if bad:
        raise SurgeonError(f"measure: sink dims {bad} outside the hidden size {d}")
    per_layer = (lin_sum / lin_tokens.clamp(min=1)).tolist()
    worst = max(range(len(per_layer)), key=per_layer.__getitem__) if per_layer else None
    loss = loss_sum / tokens if tokens else float("nan")
    metrics = {
        "loss": loss,
        "ppl": math.exp(loss) if tokens and loss < 700 else float("inf") if tokens else float("nan"),
        "tokens": tokens,
        "residual_max": [float(v) for v in res_max],
        "residual_peak": float(res_max.max()),
        "top_dims": top,
        "sink_abs": {str(k): float(mean_abs[k]) for k in dims},
        "sink_first_token_abs": {str(k): float(mean_first[k]) for k in dims},
        "linear_input_max_rms": sum(per_layer) / len(per_layer) if per_layer else float("nan"),
        "linear_input_max_rms_worst": per_layer[worst] if per_layer else float("nan"),
        "linear_input_max_rms_worst_layer": linears[worst][0] if per_layer else None,
    }
    sink = [sinks.attention_sink(i) for i in range(len(layers))]
    if any(v is not None for v in sink):
        metrics["first_token_attention"] = sink
        metrics["first_token_attention_mean"] = sum(v for v in sink if v is not None) / sum(v is not None for v in sink)
    gate_stats, attention_stats = gates.results(), gates.attention_results()
    if gate_stats is not None:
        metrics["gates"] = gate_stats
    if attention_stats is not None:
        metrics["attention_gates"] = attention_stats
    return metrics
