#!/usr/bin/env python
"""One module against the same run without it: two or more `surgeon pipeline` run directories side by side.

For each run's trained model: fp32, NVFP4 and INT4 W4A4 perplexity on the pipeline's own evaluation text (from its
results.json) and on --held text (evaluated here, 1,000 tokens skipped, --windows × --seq-len tokens: text the run
never read and the recipe was never tuned on, e.g. benchmarks/brown_text.py's), the attention mass on the first
token (mean over layers), the first-token massive activation and the residual peak (from its trained scan), and the
gates' mean |g − ½| (GatedNorm and attention gates, scanned here on the run's scan text when the scan predates
attention-gate telemetry). The first run is the baseline: every other row carries its ratios to it. Rows are appended
to benchmarks/results/<--csv>.

    python benchmarks/compare_runs.py RUN_WITHOUT RUN_WITH --held DIR [--csv compare_runs.csv] [--label NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_csv import RESULTS_DIR, append_rows  # noqa: E402

HEADER = ["date", "label", "run", "transforms", "steps", "eval_fp32", "eval_nvfp4", "eval_int4", "held_text",
          "held_tokens", "held_fp32", "held_nvfp4", "held_int4", "first_token_attention", "first_token_massive",
          "residual_peak", "gate_dev", "attention_gate_dev", "held_nvfp4_vs_base", "held_int4_vs_base",
          "held_fp32_vs_base", "eval_nvfp4_vs_base", "eval_int4_vs_base", "eval_fp32_vs_base"]


def held_perplexity(model_dir: Path, text: Path, windows: int, seq_len: int) -> dict:
    from surgeon.evaluate import evaluate_model
    from surgeon.sources import iter_token_windows, load_model, resolve_text

    model, tokenizer = load_model(model_dir)
    batches = list(iter_token_windows(resolve_text(str(text)), tokenizer, seq_len, seq_len * windows, 4,
                                      skip_tokens=1000))
    result = evaluate_model(model, batches, ("nvfp4", "int4"), name=model_dir.name)
    return {"tokens": result.tokens, **result.perplexity}


def trained_scan(run: Path) -> dict:
    """The trained model's scan; rescanned (same text and budget as the run's) when it has gates the scan missed."""
    scan = json.loads((run / "scan-trained" / "scan.json").read_text())
    config = json.loads((run / "model-trained" / "config.json").read_text())
    if "gated_attention" in (config.get("surgeon") or {}) and not scan.get("attention_gates"):
        from surgeon.scan import scan as run_scan
        from surgeon.sources import iter_token_windows, load_model, resolve_text

        cfg = json.loads((run / "results.json").read_text())["config"]
        model, tokenizer = load_model(run / "model-trained")
        paths = resolve_text(cfg["data"])[:cfg["eval_files"]]  # the pipeline scans its evaluation text
        windows = iter_token_windows(paths, tokenizer, cfg["seq_len"], cfg["scan_tokens"], cfg["batch_size"])
        scan = run_scan(model, tokenizer, windows, model_name="trained",
                        model_path=str(run / "model-trained")).to_dict()
    return scan


def mean_gate_dev(block: dict | None) -> float | str:
    value = ((block or {}).get("mean") or {}).get("mean_abs_dev")
    return round(value, 5) if value is not None else ""


def row_of(run: Path, label: str, held: Path, windows: int, seq_len: int) -> dict:
    results = json.loads((run / "results.json").read_text())
    evals = results["perplexity"]["trained"]
    scan = trained_scan(run)
    attention = [layer["attention_sink"] for layer in scan["layers"] if layer.get("attention_sink") is not None]
    first = scan["first_token_mean_abs"][1:]
    h = held_perplexity(run / "model-trained", held, windows, seq_len)
    config = json.loads((run / "model-trained" / "config.json").read_text())
    return {
        "date": datetime.date.today().isoformat(), "label": label, "run": run.name,
        "transforms": "+".join(config["surgeon"]["transforms"]), "steps": (results.get("training") or {}).get("steps"),
        "eval_fp32": round(evals["none"], 3), "eval_nvfp4": round(evals["nvfp4"], 2),
        "eval_int4": round(evals["int4"], 2),
        "held_text": held.name, "held_tokens": h["tokens"], "held_fp32": round(h["none"], 3),
        "held_nvfp4": round(h["nvfp4"], 2), "held_int4": round(h["int4"], 2),
        "first_token_attention": round(sum(attention) / len(attention), 4) if attention else "",
        "first_token_massive": round(max(max(r) for r in first), 1), "residual_peak": round(scan["peak"]["value"], 1),
        "gate_dev": mean_gate_dev(scan.get("gates")), "attention_gate_dev": mean_gate_dev(scan.get("attention_gates")),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="pipeline run directories; the first is the baseline")
    parser.add_argument("--held", type=Path, required=True, help="held-apart text (a folder or file)")
    parser.add_argument("--label", action="append", help="a name per run (default: the directory's name)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--csv", default="compare_runs.csv")
    args = parser.parse_args(argv)
    labels = args.label or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("compare_runs: give one --label per run, or none")
    missing = [r for r in args.runs if not (r / "results.json").is_file() or not (r / "model-trained").is_dir()]
    if missing:
        raise SystemExit(f"compare_runs: {missing[0]} is not a finished pipeline run (no results.json or model-trained/)")
    rows = [row_of(run, label, args.held, args.windows, args.seq_len) for run, label in zip(args.runs, labels)]
    base = rows[0]
    for row in rows:
        for where in ("held", "eval"):
            for fmt in ("nvfp4", "int4", "fp32"):
                row[f"{where}_{fmt}_vs_base"] = round(row[f"{where}_{fmt}"] / base[f"{where}_{fmt}"], 4)
    out = append_rows(RESULTS_DIR / args.csv, HEADER, rows)
    for row in rows:
        print(" ".join(f"{k}={row[k]}" for k in HEADER[1:]))
    print(f"rows appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
