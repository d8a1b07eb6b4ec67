"""The scan's hooks: running statistics of every residual-stream point and the attention mass on the first
key, recorded while the model runs its own attention (surgeon/scan.py describes what is measured).

`scan_attention_enabled` routes attention through SDPA plus the recorder for the duration; the model's output
stays SDPA's. Everything a `Recorder` holds is O(layers × dims).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .architectures import decoder_layers
from .threads import single_thread

SCAN_ATTENTION = "surgeon_scan"
_MEDIAN_SAMPLE = 1 << 16  # elements used to estimate a layer's median |h| (the 1000× criterion needs no more)
_SINK_CHUNK_BYTES = 64 << 20  # bound on the attention-logit block materialized for the sink score
# PyTorch's CPU flash-attention kernel returns (output, logsumexp); SDPA uses it on CPU but drops the logsumexp
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


_ACTIVE_RECORDER: Recorder | None = None


def _scan_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also gives the active recorder the attention mass on key 0 (q, k after RoPE)."""
    recorder = _ACTIVE_RECORDER
    if recorder is not None:
        output = recorder.attend(module, query, key, value, attention_mask, **kwargs)
        if output is not None:
            return output
    if kwargs.get("softcap"):  # SDPA cannot soft-cap the logits (Gemma 2): attend eagerly, recording as we go
        return _softcapped_attention(module, query, key, value, attention_mask, recorder, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if recorder is not None:
        recorder.attention(module, query, key, attention_mask, kwargs.get("scaling"))
    return output


def _softcapped_attention(module, query, key, value, attention_mask, recorder, *, softcap, scaling=None,
                          dropout=0.0, **_):
    """Eager attention with logits soft-capped as softcap·tanh(logits / softcap) before the mask (Gemma 2's
    order), giving the recorder the key-0 mass from the same probabilities."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    lq, lk = query.shape[2], k.shape[2]
    logits = torch.matmul(query, k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None:  # the "is_causal" case: queries are the last lq positions
        future = torch.arange(lk, device=logits.device) > (torch.arange(lq, device=logits.device) + lk - lq)[:, None]
        logits = logits.masked_fill(future, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask[:, :, :, :lk], float("-inf"))
    else:
        logits = logits + attention_mask[:, :, :, :lk]
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    layer = recorder.attn_index.get(id(module)) if recorder is not None else None
    if layer is not None and lq > 1:
        mass0 = probs[:, :, 1:, 0].float().nan_to_num(0.0)
        recorder._add_sink(layer, mass0.sum((0, 2), dtype=torch.float64).cpu(), query.shape[0] * (lq - 1))
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


def _register_scan_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SCAN_ATTENTION, _scan_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SCAN_ATTENTION, sdpa_mask)  # masks exactly as for sdpa


@contextlib.contextmanager
def scan_attention_enabled(model: nn.Module, recorder: Recorder):
    """Route attention through `_scan_attention` for the duration; yields whether sink scores are recorded.

    The output stays SDPA's, so the scan runs at close to a plain forward's speed and measures the model as it
    is run: the sink score needs only softmax(q·kᵀ)[..., 0], which `Recorder.attend` gets from the kernel's
    logsumexp (CPU) and `Recorder.attention` from blockwise logits (elsewhere), never eager attention's full
    probability tensor.
    """
    global _ACTIVE_RECORDER
    original = model.config._attn_implementation
    enabled = False
    try:
        _register_scan_attention()
        model.set_attn_implementation(SCAN_ATTENTION)
        enabled = model.config._attn_implementation == SCAN_ATTENTION
    except Exception:  # a model that cannot switch attention dynamically: scan it without sink scores
        enabled = False
    _ACTIVE_RECORDER = recorder if enabled else None
    try:
        yield enabled
    finally:
        _ACTIVE_RECORDER = None
        if enabled:
            model.set_attn_implementation(original)


class Recorder:
    """Running statistics for every residual-stream point; everything it holds is O(layers × dims)."""

    def __init__(self, model, tokenizer, *, massive_abs, massive_ratio, top_k, sample_tokens, sample_dims):
        self.tokenizer = tokenizer
        self.layers = decoder_layers(model)
        self.n_points = len(self.layers) + 1
        self.d = model.config.hidden_size
        self.massive_abs, self.massive_ratio, self.top_k = massive_abs, massive_ratio, top_k
        self.sample_tokens, self.sample_dims = sample_tokens, sample_dims
        P, d = self.n_points, self.d
        f64 = dict(dtype=torch.float64)
        self.sum_abs = torch.zeros(P, d, **f64)  # positions 1.. of every window
        self.sum_abs_first = torch.zeros(P, d, **f64)  # position 0
        self.sum_sq = torch.zeros(P, **f64)
        self.max_abs = torch.zeros(P, d, **f64)  # per dim max |h| (the sinks' max_abs)
        self.count_rest = 0
        self.count_first = 0
        self.peak = [(-1.0, 0, 0, 0)] * P  # (value, dim, position, token id) of the largest |h| per point
        self.massive: list[dict] = [{} for _ in range(P)]
        self.sample: list[torch.Tensor | None] = [None] * P  # |h| of the first window's first tokens
        self.sample_ids: list[int] = []
        self.sink_sum = torch.zeros(len(self.layers), **f64)
        self.sink_head_sum: list[torch.Tensor | None] = [None] * len(self.layers)
        self.sink_count = [0] * len(self.layers)
        # the attention function is handed its attention module: every module of layer i maps to i
        self.attn_index = {id(m): i for i, layer in enumerate(self.layers) for m in layer.modules()}
        self.input_ids: torch.Tensor | None = None
        self.first_batch = True
        self.fast = _FLASH_CPU is not None  # see attend()

    # -- hooks

    def hooks(self, model) -> list:
        embed = model.get_input_embeddings()
        handles = [embed.register_forward_hook(lambda m, args, out: self.residual(0, out))]
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(
                lambda m, args, out, point=i + 1: self.residual(point, out[0] if isinstance(out, tuple) else out)))
        return handles

    @torch.no_grad()
    def residual(self, point: int, hidden: torch.Tensor) -> None:
        with single_thread(hidden):
            self._residual(point, hidden)

    def _residual(self, point: int, hidden: torch.Tensor) -> None:
        a = hidden.detach().abs().float()  # (batch, seq, d)
        b, seq, d = a.shape
        rows = a.view(-1, d)
        first = a[:, 0].sum(0)
        # float32 sums per batch, float64 across batches; the running state lives on the CPU whatever the device
        self.sum_abs_first[point] += first.cpu()
        self.sum_abs[point] += (rows.sum(0) - first).cpu()
        flat = rows.view(-1)
        self.sum_sq[point] += float(torch.dot(flat, flat))
        dim_max = rows.amax(0).cpu()
        torch.maximum(self.max_abs[point], dim_max.double(), out=self.max_abs[point])

        top = float(dim_max.max())
        if top > self.peak[point][0]:
            index = int(flat.argmax())
            row, dim = divmod(index, d)
            window, position = divmod(row, seq)
            self.peak[point] = (top, dim, position, int(self.input_ids[window, position]))

        # massive activations: |h| > massive_abs and > massive_ratio × the median |h| of this layer (estimated
        # on an evenly strided subsample: the criterion is a ratio of 10³, the median needs no precision)
        median = float(flat[:: max(1, flat.numel() // _MEDIAN_SAMPLE)].median())
        threshold = max(self.massive_abs, self.massive_ratio * median)
        if top > threshold:
            self._massive(point, hidden, flat, d, seq, threshold, median)

        if self.first_batch:
            self.sample[point] = a[0, : self.sample_tokens].cpu().clone()

    def _massive(self, point, hidden, flat, d, seq, threshold, median) -> None:
        values, indices = flat.topk(min(4 * self.top_k, flat.numel()))
        signed = hidden.detach().reshape(-1)
        found = self.massive[point]
        for value, index in zip(values.tolist(), indices.tolist()):
            if value <= threshold:
                break
            row, dim = divmod(index, d)
            window, position = divmod(row, seq)
            token_id = int(self.input_ids[window, position])
            key = (dim, "first" if position == 0 else token_id)
            entry = found.get(key)
            if entry is None:
                found[key] = entry = {"dim": dim, "abs": -1.0, "count": 0}
            entry["count"] += 1
            if value > entry["abs"]:
                entry.update(abs=value, value=float(signed[index]), position=position, token_id=token_id,
                             ratio=value / max(median, 1e-30))
        if len(found) > 64 * self.top_k:  # keep the candidate set bounded on pathological models
            self.massive[point] = dict(sorted(found.items(), key=lambda kv: -kv[1]["abs"])[: 16 * self.top_k])

    @torch.no_grad()
    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """Attention output and the key-0 mass in one go, on CPU: PyTorch's CPU flash-attention kernel (the one
        SDPA itself dispatches to) also returns each row's logsumexp, so the mass on key 0 is
        exp(q·k₀·scale − lse) — no extra pass over the logits. Returns None (use the SDPA + logits path) where
        that kernel does not apply: other devices, dropout, soft-capping or attention sinks, a KV cache."""
        layer = self.attn_index.get(id(module))
        if (not self.fast or layer is None or query.device.type != "cpu" or kwargs.get("dropout")
                or kwargs.get("softcap") or kwargs.get("s_aux") is not None or query.shape[2] != key.shape[2]):
            return None
        from transformers.integrations.sdpa_attention import repeat_kv

        b, hq, lq, dh = query.shape
        groups = hq // key.shape[1]
        scale = kwargs.get("scaling") or dh ** -0.5
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, :, :, :lq]
            if mask.dtype == torch.bool:  # the kernel takes an additive mask in the query's dtype
                mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, float("-inf"))
            else:
                mask = mask.to(query.dtype)
        try:
            output, lse = _FLASH_CPU(query, k, v, 0.0, mask is None and lq > 1, attn_mask=mask, scale=scale)
        except (RuntimeError, TypeError):  # a build or dtype the kernel refuses: stay on the general path
            self.fast = False
            return None
        if lq > 1:
            logit0 = (query[:, :, 1:].float() * k[:, :, :1].float()).sum(-1) * scale  # (b, hq, lq-1)
            if mask is not None:
                logit0 = logit0 + mask[:, :, 1:, 0].float()
            mass0 = (logit0 - lse[:, :, 1:].float()).exp().nan_to_num(0.0)
            self._add_sink(layer, mass0.sum((0, 2), dtype=torch.float64), b * (lq - 1))
        return output.transpose(1, 2).contiguous(), None

    def attention_sink(self, layer: int) -> float | None:
        """Layer `layer`'s attention mass on key 0, the mean over heads and query positions 1.. (None: not seen)."""
        if not self.sink_count[layer]:
            return None
        return float(self.sink_sum[layer]) / (self.sink_count[layer] * len(self.sink_head_sum[layer]))

    def _add_sink(self, layer: int, head_sum: torch.Tensor, count: int) -> None:
        self.sink_sum[layer] += head_sum.sum()
        if self.sink_head_sum[layer] is None:
            self.sink_head_sum[layer] = torch.zeros_like(head_sum)
        self.sink_head_sum[layer] += head_sum
        self.sink_count[layer] += count

    @torch.no_grad()
    def attention(self, module, query, key, attention_mask, scaling) -> None:
        """Accumulate softmax(q·kᵀ·scale + mask)[..., 0] over query positions 1.., per head (the general path,
        after SDPA computed the output).

        Blocks of query rows keep the logits under _SINK_CHUNK_BYTES whatever the sequence length; grouped
        (GQA) heads are handled by folding the query groups into the row axis, without repeating k.
        """
        layer = self.attn_index.get(id(module))
        if layer is None:
            return
        b, hq, lq, dh = query.shape
        hkv, lk = key.shape[1], key.shape[2]
        if lq < 2:
            return
        scale = scaling if scaling is not None else dh ** -0.5
        groups = hq // hkv
        q = query.detach().float().view(b, hkv, groups, lq, dh)
        k_t = key.detach().float().transpose(-1, -2)  # (b, hkv, dh, lk)
        offset = lk - lq  # the queries are the last lq positions
        step = max(1, _SINK_CHUNK_BYTES // max(1, 4 * b * hq * lk))
        head_sum = torch.zeros(hq, dtype=torch.float64)
        for start in range(1, lq, step):
            stop = min(lq, start + step)
            rows = stop - start
            logits = torch.matmul(q[:, :, :, start:stop].reshape(b, hkv, groups * rows, dh), k_t)
            logits = logits.view(b, hq, rows, lk).mul_(scale)
            if attention_mask is None:  # SDPA's "is_causal" case
                keys = torch.arange(lk, device=logits.device)
                future = keys > (torch.arange(start, stop, device=logits.device) + offset).unsqueeze(1)
                logits.masked_fill_(future, float("-inf"))
            elif attention_mask.dtype == torch.bool:
                logits.masked_fill_(~attention_mask[:, :, start:stop, :lk], float("-inf"))
            else:
                logits.add_(attention_mask[:, :, start:stop, :lk].float())
            mass0 = torch.softmax(logits, dim=-1)[..., 0]  # (b, hq, rows)
            head_sum += mass0.nan_to_num(0.0).sum((0, 2), dtype=torch.float64).cpu()
        self._add_sink(layer, head_sum, b * (lq - 1))

    def batch_done(self, input_ids: torch.Tensor) -> None:
        if self.first_batch:
            self.sample_ids = input_ids[0, : self.sample_tokens].tolist()
        self.first_batch = False
        self.count_first += input_ids.shape[0]
        self.count_rest += input_ids.shape[0] * (input_ids.shape[1] - 1)
