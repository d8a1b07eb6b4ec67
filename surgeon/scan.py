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
over channels and over tokens, and its correlation with |y| (surgeon.gates, measured in the same pass);
`attention_gates` the same for gated attention's output gates.

The report and scan.json's schema: surgeon/scan_report.py; the hooks: surgeon/scan_recorder.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable

import torch
from torch import nn

from .architectures import decoder_layers, for_model, module_at
from .errors import SurgeonError
from .gates import GateRecorder
from .scan_recorder import Recorder, scan_attention_enabled
from .scan_report import SCHEMA_VERSION, DimStat, LayerStats, MassiveActivation, ScanReport, SinkDim

# the report's classes are surgeon.scan's API too (scan() returns one; absorb-sinks and the reports load one)
__all__ = ["SCHEMA_VERSION", "DimStat", "LayerStats", "MassiveActivation", "ScanReport", "SinkDim", "print_report",
           "scan", "token_text"]


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
    recorder = Recorder(model, tokenizer, massive_abs=massive_abs, massive_ratio=massive_ratio, top_k=top_k,
                         sample_tokens=sample_tokens, sample_dims=sample_dims)
    device = next(model.parameters()).device
    n_windows = n_tokens = seq_len = 0
    bos_id = getattr(tokenizer, "bos_token_id", None)
    has_bos = True

    handles = recorder.hooks(model)
    gates = GateRecorder(model)
    try:
        with scan_attention_enabled(model, recorder) as sinks_on, _progress(progress, total_tokens) as advance, \
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
                         attention_gates=gates.attention_results(),
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


def _build_report(model, tokenizer, rec: Recorder, *, model_name, model_path, windows, tokens, seq_len, bos,
                  sinks_recorded, thresholds, gates=None, attention_gates=None) -> ScanReport:
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
            sink = _r(rec.attention_sink(p - 1))
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
        token_sample=token_sample, gates=gates, attention_gates=attention_gates)


def _norm_vectors(module: nn.Module | None, offset: float = 0.0) -> dict[str, torch.Tensor]:
    """The residual-reading scale vectors of a norm: its effective λ (`weight`; offset + w where the family stores
    w of x·(offset + w), as Gemma does) and, on surgeon norms, λ1 (`pre_affine`)."""
    out = {}
    for attr in ("weight", "pre_affine"):
        value = getattr(module, attr, None) if module is not None else None
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            value = value.detach().float().cpu()
            out[attr] = value + offset if attr == "weight" and offset else value
    return out


def _residual_norms(model) -> dict[str, list[dict[str, torch.Tensor]] | dict[str, torch.Tensor]]:
    """The scale vectors of every residual-reading norm the architecture data names, under its scan.json key:
    a list over the layers for a per-layer norm, one entry for a norm outside the layers (the final norm)."""
    arch = for_model(model)
    n_layers = len(decoder_layers(model))
    out: dict = {}
    for role in arch.residual_readers:
        pattern = arch.norm_pattern(role)
        offset = arch.norm_offset_of(pattern.replace("*", "0") + ".weight")  # a concrete name: patterns match those
        if "*" in pattern:
            out[arch.reader_key(role)] = [_norm_vectors(module_at(model, pattern.replace("*", str(i))), offset)
                                          for i in range(n_layers)]
        else:
            out[arch.reader_key(role)] = _norm_vectors(module_at(model, pattern), offset)
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
        _print_gates(report.gates["norms"], report.gates["mean"], console, Table, box,
                     "gates: g = σ(W_up silu(W_down y)) after each GatedNorm, ½ at identity init", "norm")
    if report.attention_gates:
        _print_gates(report.attention_gates["gates"], report.attention_gates["mean"], console, Table, box,
                     "attention gates: g = σ(x·W_gᵀ) on each attention output, ½ at identity init",
                     "attention gate")


def _print_gates(norms: dict, mean: dict, console, Table, box, title: str, what: str, max_rows: int = 12) -> None:
    """Per-gate statistics; with more than `max_rows` gates, the ones that moved most."""
    names = list(norms)
    if len(names) > max_rows:
        names = sorted(names, key=lambda n: -norms[n]["mean_abs_dev"])[:max_rows]
        title += f" — the {max_rows} of {len(norms)} that moved most"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in (what, "mean|g−½|", "spread ch", "spread tok", "corr(g,|y|)", "g min", "g max"):
        table.add_column(column, justify="left" if column == what else "right", no_wrap=True)

    def cells(row):
        corr = row["corr_abs_y"]
        return (f"{row['mean_abs_dev']:.4f}", f"{row['spread_channels']:.4f}", f"{row['spread_tokens']:.4f}",
                "—" if corr is None else f"{corr:+.3f}", f"{row['g_min']:.3f}", f"{row['g_max']:.3f}")

    for name in names:
        table.add_row(name.removeprefix("model."), *cells(norms[name]))
    table.add_row(f"mean of {len(norms)}", *cells(mean), style="bold")
    console.print(table)
