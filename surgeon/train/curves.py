"""Curves of a training run, drawn from its metrics.jsonl alone (matplotlib, Agg):

  loss.png        training loss terms per step and the held-out loss at each measurement
  outliers.png    residual peak max |h|, the sink dimensions' mean |h| and the mean linear-input max/RMS per
                  measurement (log scale)
  residual.png    max |h| per residual point (embedding, then each layer) at the first and the last measurement
  gates.png       (models with GatedNorms) per measurement, the mean over the norms of mean |g − ½| and g's spread
                  over channels and over tokens, and of corr(g, |y|) (surgeon.gates)
  attention.png   per measurement, the attention mass on the first token (mean over layers) and, with gated
                  attention, its gates' mean |g − ½|
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from ..plots import _layer_labels, _save  # noqa: E402
from .rundir import read_metrics  # noqa: E402


def draw_curves(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    records = read_metrics(metrics_path)
    out_dir = Path(out_dir)
    train = [r for r in records if "total" in r]
    evals = [r for r in records if "eval" in r]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("total", "lm", "distill", "pressure"):
        points = [(r["step"], r[key]) for r in train if key in r]
        if points and (key == "total" or any(v for _, v in points)):
            ax.plot(*zip(*points), label=f"train {key}", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval"]["loss"] for r in evals], "o-", label="held-out lm")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "loss.png"))

    if evals:
        steps = [r["step"] for r in evals]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [r["eval"]["residual_peak"] for r in evals], "o-", label="residual peak max |h|")
        for dim in evals[-1]["eval"]["sink_abs"]:
            ax.plot(steps, [r["eval"]["sink_abs"].get(dim, float("nan")) for r in evals], ".--",
                    label=f"dim {dim} mean |h|")
        ax.plot(steps, [r["eval"]["linear_input_max_rms"] for r in evals], "s-", label="linear input max/RMS")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        written.append(_save(fig, out_dir / "outliers.png"))

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in (evals[0], evals[-1]) if len(evals) > 1 else evals[:1]:
            values = r["eval"]["residual_max"]
            ax.plot(range(len(values)), values, "o-", label=f"step {r['step']}")
        labels = _layer_labels(len(evals[0]["eval"]["residual_max"]))
        stride = max(1, len(labels) // 16)
        ax.set_xticks(range(0, len(labels), stride), labels[::stride])
        ax.set_xlabel("residual stream after layer")
        ax.set_ylabel("max |h|")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
        written.append(_save(fig, out_dir / "residual.png"))

    gated = [r for r in evals if r["eval"].get("gates")]
    if gated:
        steps = [r["step"] for r in gated]
        means = [r["eval"]["gates"]["mean"] for r in gated]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
        for key, label in (("mean_abs_dev", "mean |g − ½|"), ("spread_channels", "spread over channels"),
                           ("spread_tokens", "spread over tokens")):
            top.plot(steps, [m[key] for m in means], "o-", label=label)
        top.set_ylabel("gate g (½ at init)")
        top.set_title("GatedNorm gates, mean over the norms", fontsize=10)
        top.legend(fontsize=8)
        corr = [float("nan") if m["corr_abs_y"] is None else m["corr_abs_y"] for m in means]
        bottom.plot(steps, corr, "o-", color="tab:red", label="corr(g, |y|) (< 0: outliers damped)")
        bottom.axhline(0, color="grey", lw=0.8)
        bottom.set_ylim(-1.02, 1.02)
        bottom.set_xlabel("step")
        bottom.legend(fontsize=8)
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "gates.png"))

    sinks = [r for r in evals if r["eval"].get("first_token_attention_mean") is not None]
    if sinks:
        steps = [r["step"] for r in sinks]
        gated = [r for r in sinks if r["eval"].get("attention_gates")]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [r["eval"]["first_token_attention_mean"] for r in sinks], "o-",
                label="attention on the first token (mean over layers)")
        if gated:
            ax.plot([r["step"] for r in gated], [r["eval"]["attention_gates"]["mean"]["mean_abs_dev"] for r in gated],
                    "s--", label="attention gates: mean |g − ½|")
        ax.set_xlabel("step")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "attention.png"))
    return written
