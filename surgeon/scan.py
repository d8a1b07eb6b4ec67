"""scan: measure a model's outliers on calibration text — residual sinks, massive activations, attention sinks.

One forward pass over the calibration windows with hooks: memory is independent of the number of tokens
(running sums and maxima per layer, bounded candidate lists, one small sample for a heatmap).

What is measured, per *point* of the residual stream (point 0 = the embedding output, point i = the output of
decoder layer i−1, so a model with L layers has L+1 points):

  max_abs              max |h| over every token and dimension, with where it happened (dim, position, token)
  mean_abs / rms       mean |h| and sqrt(mean h²) over tokens and dimensions
  top_dims             the dimensions with the largest mean |h| over tokens (position 0 excluded: the first
                       token is where massive activations live, reported apart), with their ratio to the
                       median dimension's mean |h| — residual sinks show up as ratios of 10–1000
  attention_sink       (decoder layers) mean attention probability on key position 0, averaged over heads and
                       query positions 1.. (query 0 can only attend to itself); ~1 means an attention sink
  massive              token-specific massive activations (Sun et al. 2024, "Massive activations in LLMs"):
                       |h| > massive_abs and > massive_ratio × the median |h| of that layer's hidden states,
                       grouped by (dim, first token | token id), the largest occurrence kept, with its count

Model-wide `sinks`: dimensions whose mean |h| (position 0 excluded), averaged over the decoder-layer points,
is at least `sink_ratio` × the median dimension's. These are what absorb-sinks rescales (DESIGN §3); each entry
carries the λ of every residual-reading norm at that dimension (the architecture data's residual readers: per
layer, keyed by the norm's module name inside the layer, and the final norm as "final"; `pre_affine` λ1 too for
converted models), and `scale_pow2`, the largest power of two ≤ ratio_to_median, a suggested s_k.

Model-wide `gates` (converted models with GatedNorms): per norm, how far its gate g has moved from ½, its spread
over channels and over tokens, and its correlation with |y| (surgeon.gates, measured in the same pass).

scan.json (schema_version 1), all floats plain JSON numbers:

    {"schema_version": 1, "model": str, "model_path": str, "model_type": str, "num_layers": L,
     "hidden_size": d, "windows": int, "tokens": int, "seq_len": int, "bos": bool, "dtype": str,
     "thresholds": {"massive_abs", "massive_ratio", "sink_ratio", "max_sinks", "top_k"},
     "peak": {"point", "layer", "value", "dim", "position", "token"},         # the largest |h| overall
     "layers": [{"point": i, "name": "embed" | "layers.<i-1>", "max_abs", "max_dim", "max_position",
                 "max_token", "max_token_id", "mean_abs", "rms", "median_dim_mean_abs",
                 "top_dims": [{"dim", "mean_abs", "ratio_to_median"}], "attention_sink": float | null,
                 "attention_sink_max_head": float | null}],
     "sinks": [{"dim", "mean_abs", "median_mean_abs", "ratio_to_median", "scale_pow2", "max_abs",
                "first_token_mean_abs", "per_layer_mean_abs": [L+1 floats],
                "norm_weights": {<pre-attention norm>: [L], <pre-MLP norm>: [L], "final": float,
                                 "pre_affine": {same keys, only for converted models}}}],
                                                                # norm keys: Architecture.reader_key, a
                                                                # per-layer norm's module name in its layer
     "massive": [{"point", "layer", "dim", "value", "abs", "ratio_to_median", "position", "token",
                  "token_id", "count"}],                       # sorted by abs, at most top_k per point
     "residual_mean_abs": [[d floats] × (L+1)],                 # per point, per dim, position 0 excluded
     "first_token_mean_abs": [[d floats] × (L+1)],              # per point, per dim, position 0 only
     "token_sample": {"point", "positions", "tokens", "dims", "abs": [[len(dims) floats] × len(positions)]},
     "gates": {"norms": {module path: {"mean_abs_dev", "spread_channels", "spread_tokens", "corr_abs_y",
                                       "g_min", "g_max", "tokens"}}, "mean": {...}} | null}
                                                                # surgeon.gates; null without GatedNorms (and
                                                                # absent from scan.json written before it)

`layer` is the decoder layer index (−1 for the embedding) and `point` the residual-stream point (layer + 1).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .architectures import decoder_layers, for_model, module_at
from .errors import SurgeonError
from .gates import GateRecorder
from .threads import single_thread

SCHEMA_VERSION = 1
SCAN_ATTENTION = "surgeon_scan"
_MEDIAN_SAMPLE = 1 << 16  # elements used to estimate a layer's median |h| (the 1000× criterion needs no more)
_SINK_CHUNK_BYTES = 64 << 20  # bound on the attention-logit block materialized for the sink score
# PyTorch's CPU flash-attention kernel returns (output, logsumexp); SDPA uses it on CPU but drops the logsumexp
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# ----------------------------------------------------------------------------- the report


@dataclass
class DimStat:
    dim: int
    mean_abs: float
    ratio_to_median: float


@dataclass
class LayerStats:
    point: int
    name: str
    max_abs: float
    max_dim: int
    max_position: int
    max_token: str
    max_token_id: int
    mean_abs: float
    rms: float
    median_dim_mean_abs: float
    top_dims: list[DimStat]
    attention_sink: float | None = None
    attention_sink_max_head: float | None = None


@dataclass
class SinkDim:
    dim: int
    mean_abs: float
    median_mean_abs: float
    ratio_to_median: float
    scale_pow2: int
    max_abs: float
    first_token_mean_abs: float
    per_layer_mean_abs: list[float]
    norm_weights: dict


@dataclass
class MassiveActivation:
    point: int
    layer: int
    dim: int
    value: float
    abs: float
    ratio_to_median: float
    position: int
    token: str
    token_id: int
    count: int


@dataclass
class ScanReport:
    model: str
    model_path: str
    model_type: str
    num_layers: int
    hidden_size: int
    windows: int
    tokens: int
    seq_len: int
    bos: bool
    dtype: str
    thresholds: dict
    peak: dict
    layers: list[LayerStats]
    sinks: list[SinkDim]
    massive: list[MassiveActivation]
    residual_mean_abs: list[list[float]] = field(repr=False)
    first_token_mean_abs: list[list[float]] = field(repr=False)
    token_sample: dict = field(repr=False)
    schema_version: int = SCHEMA_VERSION
    gates: dict | None = field(default=None, repr=False)  # optional: older scan.json files load with None

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike) -> Path:
        """Write scan.json atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanReport:
        """Read a scan.json written by `save` (what absorb-sinks and the reports use)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SurgeonError(f"cannot read scan report {path} ({exc}): run `surgeon scan` to write it") from exc
        if data.get("schema_version") != SCHEMA_VERSION:
            raise SurgeonError(f"{path} has scan schema {data.get('schema_version')}, this surgeon reads "
                               f"{SCHEMA_VERSION}: re-run `surgeon scan`")
        data["layers"] = [LayerStats(**{**row, "top_dims": [DimStat(**d) for d in row["top_dims"]]})
                          for row in data["layers"]]
        data["sinks"] = [SinkDim(**row) for row in data["sinks"]]
        data["massive"] = [MassiveActivation(**row) for row in data["massive"]]
        return cls(**data)

    @property
    def sink_dims(self) -> list[int]:
        return [s.dim for s in self.sinks]


# ----------------------------------------------------------------------------- model structure


def _norm_vectors(module: nn.Module | None) -> dict[str, torch.Tensor]:
    """The residual-reading scale vectors of a norm: its λ (`weight`) and, on surgeon norms, λ1 (`pre_affine`)."""
    out = {}
    for attr in ("weight", "pre_affine"):
        value = getattr(module, attr, None) if module is not None else None
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            out[attr] = value.detach().float().cpu()
    return out


# ----------------------------------------------------------------------------- the attention-sink recorder


_ACTIVE_RECORDER: _Recorder | None = None


def _scan_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention that also gives the active recorder the attention mass on key 0 (q, k after RoPE)."""
    recorder = _ACTIVE_RECORDER
    if recorder is not None:
        output = recorder.attend(module, query, key, value, attention_mask, **kwargs)
        if output is not None:
            return output
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if recorder is not None:
        recorder.attention(module, query, key, attention_mask, kwargs.get("scaling"))
    return output


def _register_scan_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SCAN_ATTENTION, _scan_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SCAN_ATTENTION, sdpa_mask)  # masks exactly as for sdpa


@contextlib.contextmanager
def _scan_attention_enabled(model: nn.Module, recorder: _Recorder):
    """Route attention through `_scan_attention` for the duration; yields whether sink scores are recorded.

    The output stays SDPA's, so the scan runs at close to a plain forward's speed and measures the model as it
    is run: the sink score needs only softmax(q·kᵀ)[..., 0], which `_Recorder.attend` gets from the kernel's
    logsumexp (CPU) and `_Recorder.attention` from blockwise logits (elsewhere), never eager attention's full
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


class _Recorder:
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


# ----------------------------------------------------------------------------- the scan


def token_text(tokenizer, token_id: int) -> str:
    """A token as readable text: decoded, with line breaks and tabs escaped."""
    try:
        text = tokenizer.decode([token_id])
    except Exception:  # a tokenizer that cannot decode a lone id
        text = str(token_id)
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _r(x: float, digits: int = 5) -> float:
    """Round to `digits` significant digits (keeps scan.json small and readable)."""
    if x == 0 or not math.isfinite(x):
        return float(x) if math.isfinite(x) else 0.0
    return float(f"{x:.{digits}g}")


def scan(model: nn.Module, tokenizer, windows: Iterable[torch.Tensor], *, model_name: str = "",
         model_path: str = "", massive_abs: float = 100.0, massive_ratio: float = 1000.0,
         sink_ratio: float = 8.0, max_sinks: int = 8, top_k: int = 8, sample_tokens: int = 48,
         sample_dims: int = 48, total_tokens: int | None = None, progress: bool = True) -> ScanReport:
    """One calibration pass over `windows` (LongTensor batches of token ids, e.g. from
    surgeon.sources.iter_token_windows) collecting the statistics described in the module docstring.

    `total_tokens` only sizes the progress bar. The model is left as it was (hooks removed, attention
    implementation restored).
    """
    model.eval()
    recorder = _Recorder(model, tokenizer, massive_abs=massive_abs, massive_ratio=massive_ratio, top_k=top_k,
                         sample_tokens=sample_tokens, sample_dims=sample_dims)
    device = next(model.parameters()).device
    n_windows = n_tokens = seq_len = 0
    bos_id = getattr(tokenizer, "bos_token_id", None)
    has_bos = True

    handles = recorder.hooks(model)
    gates = GateRecorder(model)
    try:
        with _scan_attention_enabled(model, recorder) as sinks_on, _progress(progress, total_tokens) as advance, \
                torch.inference_mode():
            for batch in windows:
                recorder.input_ids = batch
                model(input_ids=batch.to(device), use_cache=False)
                recorder.batch_done(batch)
                n_windows += batch.shape[0]
                n_tokens += batch.numel()
                seq_len = max(seq_len, batch.shape[1])
                has_bos = has_bos and bos_id is not None and bool((batch[:, 0] == bos_id).all())
                advance(batch.numel())
    finally:
        for handle in handles:
            handle.remove()
        gates.remove()
    if n_windows == 0:
        raise SurgeonError("scan got no token windows: pass more text (or fewer --skip-tokens)")
    return _build_report(model, tokenizer, recorder, model_name=model_name, model_path=model_path,
                         windows=n_windows, tokens=n_tokens, seq_len=seq_len, bos=has_bos,
                         sinks_recorded=sinks_on, gates=gates.results(),
                         thresholds={"massive_abs": massive_abs, "massive_ratio": massive_ratio,
                                     "sink_ratio": sink_ratio, "max_sinks": max_sinks, "top_k": top_k})


@contextlib.contextmanager
def _progress(enabled: bool, total: int | None):
    """A rich progress bar counting tokens; yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("scan"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    start = time.perf_counter()
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("scan", total=total, rate="")

        def advance(n):
            done = bar.tasks[0].completed + n
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f} tok/s")

        yield advance


def _build_report(model, tokenizer, rec: _Recorder, *, model_name, model_path, windows, tokens, seq_len, bos,
                  sinks_recorded, thresholds, gates=None) -> ScanReport:
    P, d = rec.n_points, rec.d
    top_k, sink_ratio, max_sinks = thresholds["top_k"], thresholds["sink_ratio"], thresholds["max_sinks"]
    rest = rec.sum_abs / rec.count_rest if rec.count_rest else rec.sum_abs_first / max(rec.count_first, 1)
    first = rec.sum_abs_first / max(rec.count_first, 1)
    per_token = rec.count_rest + rec.count_first

    layers = []
    for p in range(P):
        value, dim, position, token_id = rec.peak[p]
        median = float(rest[p].median())
        order = torch.argsort(rest[p], descending=True)[:top_k].tolist()
        sink, sink_head = None, None
        if p > 0 and sinks_recorded and rec.sink_count[p - 1]:
            sink = _r(float(rec.sink_sum[p - 1]) / (rec.sink_count[p - 1] * len(rec.sink_head_sum[p - 1])))
            sink_head = _r(float(rec.sink_head_sum[p - 1].max()) / rec.sink_count[p - 1])
        all_abs = (rec.sum_abs[p].sum() + rec.sum_abs_first[p].sum()) / (per_token * d)
        layers.append(LayerStats(
            point=p, name="embed" if p == 0 else f"layers.{p - 1}", max_abs=_r(value), max_dim=dim,
            max_position=position, max_token=token_text(tokenizer, token_id), max_token_id=token_id,
            mean_abs=_r(float(all_abs)), rms=_r(math.sqrt(float(rec.sum_sq[p]) / (per_token * d))),
            median_dim_mean_abs=_r(median),
            top_dims=[DimStat(k, _r(float(rest[p, k])), _r(float(rest[p, k]) / max(median, 1e-30))) for k in order],
            attention_sink=sink, attention_sink_max_head=sink_head))

    # model-wide residual sinks: dims far above the median over the decoder-layer points
    score = rest[1:].mean(0) if P > 1 else rest[0]
    score_median = float(score.median())
    ratios = score / max(score_median, 1e-30)
    norms = _residual_norms(model)
    sinks = []
    for k in torch.argsort(ratios, descending=True)[:max_sinks].tolist():
        ratio = float(ratios[k])
        if ratio < sink_ratio:
            break
        sinks.append(SinkDim(
            dim=k, mean_abs=_r(float(score[k])), median_mean_abs=_r(score_median), ratio_to_median=_r(ratio),
            scale_pow2=2 ** int(math.floor(math.log2(ratio))), max_abs=_r(float(rec.max_abs[:, k].max())),
            first_token_mean_abs=_r(float(first[1:, k].mean() if P > 1 else first[0, k])),
            per_layer_mean_abs=[_r(float(x)) for x in rest[:, k]],
            norm_weights=_norms_at(norms, k)))

    massive = []
    for p in range(P):
        entries = sorted(rec.massive[p].values(), key=lambda e: -e["abs"])[:top_k]
        for e in entries:
            massive.append(MassiveActivation(
                point=p, layer=p - 1, dim=e["dim"], value=_r(e["value"]), abs=_r(e["abs"]),
                ratio_to_median=_r(e["ratio"]), position=e["position"], token=token_text(tokenizer, e["token_id"]),
                token_id=e["token_id"], count=e["count"]))

    peak_point = max(range(P), key=lambda p: rec.peak[p][0])
    value, dim, position, token_id = rec.peak[peak_point]
    peak = {"point": peak_point, "layer": peak_point - 1, "value": _r(value), "dim": dim, "position": position,
            "token": token_text(tokenizer, token_id)}

    # a small tokens × dims sample at the peak point, over the dims with the largest model-wide mean |h|
    sample_dims = torch.argsort(score, descending=True)[: rec.sample_dims].tolist()
    sample = rec.sample[peak_point]
    token_sample = {"point": peak_point, "positions": list(range(sample.shape[0])) if sample is not None else [],
                    "tokens": [token_text(tokenizer, t) for t in rec.sample_ids], "dims": sample_dims,
                    "abs": [[_r(float(x), 4) for x in row] for row in sample[:, sample_dims]]
                    if sample is not None else []}

    config = model.config
    return ScanReport(
        model=model_name or getattr(config, "_name_or_path", "") or type(model).__name__,
        model_path=str(model_path), model_type=getattr(config, "model_type", ""), num_layers=P - 1,
        hidden_size=d, windows=windows, tokens=tokens, seq_len=seq_len, bos=bos,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), thresholds=thresholds, peak=peak,
        layers=layers, sinks=sinks, massive=massive,
        residual_mean_abs=[[_r(float(x), 4) for x in row] for row in rest],
        first_token_mean_abs=[[_r(float(x), 4) for x in row] for row in first],
        token_sample=token_sample, gates=gates)


def _residual_norms(model) -> dict[str, list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]]:
    """The scale vectors of every residual-reading norm the architecture data names, under its scan.json key:
    a list over the layers for a per-layer norm, one entry for a norm outside the layers (the final norm)."""
    arch = for_model(model)
    n_layers = len(decoder_layers(model))
    out: dict = {}
    for role in arch.residual_readers:
        pattern = arch.norm_pattern(role)
        if "*" in pattern:
            out[arch.reader_key(role)] = [_norm_vectors(module_at(model, pattern.replace("*", str(i))))
                                          for i in range(n_layers)]
        else:
            out[arch.reader_key(role)] = _norm_vectors(module_at(model, pattern))
    return out


def _norms_at(norms: dict, k: int) -> dict:
    """λ (and λ1, when present) of every residual-reading norm at dimension k."""
    result: dict = {}
    pre: dict = {}
    for name, rows in norms.items():
        if isinstance(rows, dict):  # a norm outside the layers
            if "weight" in rows:
                result[name] = _r(float(rows["weight"][k]))
            if "pre_affine" in rows:
                pre[name] = _r(float(rows["pre_affine"][k]))
            continue
        if any("weight" in r for r in rows):
            result[name] = [_r(float(r["weight"][k])) if "weight" in r else None for r in rows]
        if any("pre_affine" in r for r in rows):
            pre[name] = [_r(float(r["pre_affine"][k])) if "pre_affine" in r else None for r in rows]
    if pre:
        result["pre_affine"] = pre
    return result


# ----------------------------------------------------------------------------- presenting


def _layer_label(layer: int) -> str:
    return "emb" if layer < 0 else str(layer)


def print_report(report: ScanReport, console=None, max_rows: int = 40) -> None:
    """The report as rich tables: per layer, the sinks, the largest massive activations, the gates."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = (f"{report.model} — {report.num_layers} layers, d={report.hidden_size}, {report.windows} windows × "
             f"{report.seq_len} tokens ({report.tokens:,} tokens, {report.dtype})")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    # columns: the layer's max |h| and where; its largest-mean dimension ("top"), that mean and its ratio to the
    # median dimension's; attention probability on the first token
    for column in ("layer", "max|h|", "dim", "token", "pos", "top", "mean|h|", "×med", "attn0"):
        table.add_column(column, justify="left" if column in ("layer", "token") else "right", no_wrap=True,
                         max_width=12 if column == "token" else None, overflow="ellipsis")
    rows = report.layers
    if len(rows) > max_rows:  # keep the first and last layers, which is where sinks appear and where they peak
        half = max_rows // 2
        rows = rows[:half] + [None] + rows[-half:]
    for row in rows:
        if row is None:
            table.add_row("…", "", "", "", "", "", "", "", "")
            continue
        top = row.top_dims[0] if row.top_dims else None
        table.add_row(
            _layer_label(row.point - 1), f"{row.max_abs:,.1f}", str(row.max_dim),
            repr(row.max_token), str(row.max_position), str(top.dim) if top else "",
            f"{top.mean_abs:,.2f}" if top else "", f"{top.ratio_to_median:,.1f}" if top else "",
            "" if row.attention_sink is None else f"{row.attention_sink:.3f}")
    console.print(table)

    sinks = Table(title=f"residual sinks (mean |h| ≥ {report.thresholds['sink_ratio']}× the median dimension's, "
                        f"over decoder layers, first token excluded)", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("dim", "mean |h|", "×median", "max |h|", "1st-token |h|", "s_k", "λ final"):
        sinks.add_column(column, justify="right")
    for s in report.sinks:
        final = s.norm_weights.get("final")
        sinks.add_row(str(s.dim), f"{s.mean_abs:,.2f}", f"{s.ratio_to_median:,.1f}", f"{s.max_abs:,.1f}",
                      f"{s.first_token_mean_abs:,.1f}", str(s.scale_pow2), "" if final is None else f"{final:.4g}")
    if not report.sinks:
        sinks.add_row("none", "", "", "", "", "", "")
    console.print(sinks)

    massive = Table(title=f"massive activations (|h| > {report.thresholds['massive_abs']:g} and > "
                          f"{report.thresholds['massive_ratio']:g}× median), largest per (dim, token)",
                    title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("dim", "token", "value", "×median", "layers", "count"):
        massive.add_column(column, justify="right" if column != "token" else "left")
    grouped: dict = {}
    for m in report.massive:
        key = (m.dim, "first" if m.position == 0 else m.token_id)
        g = grouped.setdefault(key, {"best": m, "layers": [], "count": 0})
        g["layers"].append(m.layer)
        g["count"] = max(g["count"], m.count)
        if m.abs > g["best"].abs:
            g["best"] = m
    for g in sorted(grouped.values(), key=lambda g: -g["best"].abs)[:12]:
        m = g["best"]
        label = f"{m.token!r} (first)" if m.position == 0 else repr(m.token)
        layers = g["layers"]
        span = (f"{_layer_label(min(layers))}–{_layer_label(max(layers))}" if len(layers) > 1
                else _layer_label(layers[0]))
        massive.add_row(str(m.dim), label, f"{m.value:,.1f}", f"{m.ratio_to_median:,.0f}", span, str(g["count"]))
    if not grouped:
        massive.add_row("none", "", "", "", "", "")
    console.print(massive)
    console.print(f"peak |h| = {report.peak['value']:,.1f} at layer {report.peak['layer']} dim {report.peak['dim']}, "
                  f"token {report.peak['token']!r} (position {report.peak['position']})")
    if report.gates:
        _print_gates(report.gates, console, Table, box)


def _print_gates(gates: dict, console, Table, box, max_rows: int = 12) -> None:
    """Per-norm gate statistics; with more than `max_rows` norms, the ones whose gates moved most."""
    norms = gates["norms"]
    names = list(norms)
    title = "gates: g = σ(W_up silu(W_down y)) after each GatedNorm, ½ at identity init"
    if len(names) > max_rows:
        names = sorted(names, key=lambda n: -norms[n]["mean_abs_dev"])[:max_rows]
        title += f" — the {max_rows} of {len(norms)} norms that moved most"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("norm", "mean|g−½|", "spread ch", "spread tok", "corr(g,|y|)", "g min", "g max"):
        table.add_column(column, justify="left" if column == "norm" else "right", no_wrap=True)

    def cells(row):
        corr = row["corr_abs_y"]
        return (f"{row['mean_abs_dev']:.4f}", f"{row['spread_channels']:.4f}", f"{row['spread_tokens']:.4f}",
                "—" if corr is None else f"{corr:+.3f}", f"{row['g_min']:.3f}", f"{row['g_max']:.3f}")

    for name in names:
        table.add_row(name.removeprefix("model."), *cells(norms[name]))
    table.add_row(f"mean of {len(norms)}", *cells(gates["mean"]), style="bold")
    console.print(table)
