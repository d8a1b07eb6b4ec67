"""Figures of a scan report (matplotlib, Agg: no display needed). Each takes a ScanReport (or one loaded from
scan.json) and a path, so before/after figures can be redrawn from saved reports alone.

  residual_heatmap.png   layers × dimensions, mean |h| per dimension (first token excluded), dimensions sorted
                         by their model-wide mean |h|, log colour — the residual-sink picture (paper Fig. 1/2)
  max_abs.png            max |h| per layer (log), the sink dimensions' mean |h| and the median dimension's,
                         and the attention-sink score per layer
  token_heatmap.png      |h| of the first window's first tokens × the top dimensions at the peak layer, log
                         colour — the massive activation on the first token (Sun et al. Fig. 1 style)
  gates.png              (models with GatedNorms) per layer and norm role, mean |g − ½| and corr(g, |y|)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: scans run on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .scan import ScanReport  # noqa: E402

_FLOOR = 1e-3  # log colour scales need a positive floor; |h| below it reads as "nothing"


def _save(fig, path: Path) -> Path:
    """Write atomically (a reader never sees half a PNG) and close the figure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def _layer_labels(n_points: int) -> list[str]:
    return ["emb"] + [str(i) for i in range(n_points - 1)]


def residual_heatmap(report: ScanReport, path: str | os.PathLike, zoom: int = 24) -> Path:
    """Two panels on one colour scale: the `zoom` largest dimensions, labelled, and all dimensions."""
    matrix = np.asarray(report.residual_mean_abs, dtype=np.float64)  # (points, d)
    order = np.argsort(-matrix[1:].mean(0) if matrix.shape[0] > 1 else -matrix[0], kind="stable")
    data = np.clip(matrix[:, order], _FLOOR, None)
    norm = LogNorm(vmin=max(data.min(), _FLOOR), vmax=data.max())
    zoom = min(zoom, data.shape[1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.18 * data.shape[0] + 2.4), sharey=True,
                                      gridspec_kw={"width_ratios": [1, 2.2], "wspace": 0.04})
    left.imshow(data[:, :zoom], aspect="auto", interpolation="nearest", cmap="magma", norm=norm)
    image = right.imshow(data, aspect="auto", interpolation="nearest", cmap="magma", norm=norm)
    labels = _layer_labels(data.shape[0])
    step = max(1, data.shape[0] // 16)
    left.set_yticks(range(0, data.shape[0], step), labels[::step])
    left.set_ylabel("residual stream after layer")
    left.set_xticks(range(zoom), [str(int(d)) for d in order[:zoom]], fontsize=7, rotation=90)
    left.set_xlabel(f"top {zoom} dimensions (dim id)")
    right.set_xlabel(f"all {data.shape[1]} dimensions, sorted by mean |h| over layers")
    sinks = ", ".join(f"{s.dim} ({s.ratio_to_median:,.0f}×)" for s in report.sinks[:4]) or "none"
    fig.subplots_adjust(top=1 - 0.55 / fig.get_figheight())  # keep the title close to the panels
    fig.suptitle(f"{report.model}: residual stream mean |h| per dimension (first token excluded); "
                 f"sink dimensions: {sinks}", fontsize=10, y=1 - 0.2 / fig.get_figheight())
    fig.colorbar(image, ax=[left, right], label="mean |h| (log)", pad=0.01)
    return _save(fig, Path(path))


def max_abs_per_layer(report: ScanReport, path: str | os.PathLike) -> Path:
    points = np.arange(len(report.layers))
    labels = _layer_labels(len(points))
    has_sinks = any(row.attention_sink is not None for row in report.layers)
    fig, axes = plt.subplots(2 if has_sinks else 1, 1, figsize=(10, 6.5 if has_sinks else 4), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1.3]} if has_sinks else None)
    ax = axes[0, 0]
    ax.semilogy(points, [max(row.max_abs, _FLOOR) for row in report.layers], "o-", color="black", lw=2,
                label="max |h| (any token)")
    for s in report.sinks[:4]:
        ax.semilogy(points, np.clip(s.per_layer_mean_abs, _FLOOR, None), "-", lw=1.2,
                    label=f"dim {s.dim}: mean |h| (first token excluded)")
    ax.semilogy(points, [max(row.median_dim_mean_abs, _FLOOR) for row in report.layers], "--", color="grey",
                label="median dimension: mean |h|")
    peak = report.peak
    ax.annotate(f"{peak['value']:,.0f}\ndim {peak['dim']}, {peak['token']!r} @{peak['position']}",
                xy=(peak["point"], peak["value"]), xytext=(8, -28), textcoords="offset points", fontsize=8,
                arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_ylabel("|h|")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{report.model}: residual stream magnitude per layer ({report.tokens:,} tokens)", fontsize=10)
    if has_sinks:
        ax2 = axes[1, 0]
        sink = [np.nan if row.attention_sink is None else row.attention_sink for row in report.layers]
        head = [np.nan if row.attention_sink_max_head is None else row.attention_sink_max_head
                for row in report.layers]
        ax2.plot(points, sink, "o-", color="tab:blue", label="mean over heads")
        ax2.plot(points, head, "x:", color="tab:blue", alpha=0.6, label="most sink-bound head")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("attention on\nfirst token")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8, loc="lower right")
    bottom = axes[-1, 0]
    step = max(1, len(points) // 16)
    bottom.set_xticks(points[::step], labels[::step])
    bottom.set_xlabel("residual stream after layer")
    return _save(fig, Path(path))


def token_heatmap(report: ScanReport, path: str | os.PathLike) -> Path | None:
    sample = report.token_sample
    if not sample or not sample.get("abs"):
        return None
    data = np.clip(np.asarray(sample["abs"], dtype=np.float64), _FLOOR, None)  # (tokens, dims)
    fig, ax = plt.subplots(figsize=(11, 0.16 * data.shape[0] + 2))
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma",
                      norm=LogNorm(vmin=max(data.min(), _FLOOR), vmax=data.max()))
    tokens = [t if len(t) <= 14 else t[:13] + "…" for t in sample["tokens"]]
    ax.set_yticks(range(len(tokens)), [f"{i} {t!r}" for i, t in enumerate(tokens)], fontsize=6)
    ax.set_xticks(range(len(sample["dims"])), [str(d) for d in sample["dims"]], fontsize=6, rotation=90)
    ax.set_xlabel("hidden dimension (largest model-wide mean |h| first)")
    layer = "embedding" if sample["point"] == 0 else f"layer {sample['point'] - 1}"
    ax.set_title(f"{report.model}: |h| after {layer} (the peak), first window", fontsize=10)
    fig.colorbar(image, ax=ax, label="|h| (log)")
    return _save(fig, Path(path))


def gate_stats(report: ScanReport, path: str | os.PathLike) -> Path | None:
    """One line per norm role (its module name inside a layer: the pre-attention norm, the pre-MLP norm, …) over
    the layers; norms outside the layers (the final norm) sit one step after the last layer."""
    if not report.gates:
        return None
    roles: dict[str, list[tuple[int, dict]]] = {}
    for name, row in report.gates["norms"].items():
        match = re.search(r"layers\.(\d+)\.(.+)$", name)
        layer, role = (int(match[1]), match[2]) if match else (report.num_layers, name.rsplit(".", 1)[-1])
        roles.setdefault(role, []).append((layer, row))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for role, rows in roles.items():
        rows.sort(key=lambda lr: lr[0])
        layers = [layer for layer, _ in rows]
        style = "o-" if len(rows) > 1 else "s"
        top.plot(layers, [row["mean_abs_dev"] for _, row in rows], style, label=role)
        bottom.plot(layers, [np.nan if row["corr_abs_y"] is None else row["corr_abs_y"] for _, row in rows], style,
                    label=role)
    top.set_ylabel("mean |g − ½|")
    top.set_title(f"{report.model}: GatedNorm gates ({report.tokens:,} tokens)", fontsize=10)
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylim(-1.02, 1.02)
    bottom.set_ylabel("corr(g, |y|)\n< 0: outliers damped")
    bottom.set_xlabel("decoder layer (final norm after the last)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, Path(path))


def write_all(report: ScanReport, out_dir: str | os.PathLike) -> list[Path]:
    """Every figure of the report into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    written = [residual_heatmap(report, out / "residual_heatmap.png"),
               max_abs_per_layer(report, out / "max_abs.png"),
               token_heatmap(report, out / "token_heatmap.png"),
               gate_stats(report, out / "gates.png")]
    return [p for p in written if p is not None]
