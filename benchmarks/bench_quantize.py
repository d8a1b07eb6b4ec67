"""Benchmark: `surgeon quantize` — wall time and peak memory against the model's size, per scheme.

Each case runs in a fresh process that reports its own wall time and peak resident memory (getrusage of itself):
`surgeon quantize MODEL OUT --scheme S` (calibrated on --tokens of the default text where the scheme calibrates)
and, in the same run, the baseline: a process that loads the model with surgeon's loader and does nothing else, so
the ratio says what quantizing costs over holding the model. Rows are appended to
benchmarks/results/quantize.csv.

    python benchmarks/bench_quantize.py [--model default] [--schemes nvfp4,w4a4] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_csv import RESULTS_DIR, append_rows  # noqa: E402

HEADER = ["date", "model", "case", "seconds", "peak_rss_mb", "peak_over_load", "weights_mb", "written_mb",
          "calibration_tokens"]
# a child: run the work, then print "<seconds> <peak RSS in KB>" of itself on the last line
CHILD = ("import resource, sys, time\nt = time.perf_counter()\n{work}\n"
         "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
LOAD_ONLY = "from surgeon.sources import load_model\nload_model(sys.argv[1])"
QUANTIZE = "from surgeon.cli import main\nassert main(sys.argv[1:]) == 0"


def child(work: str, argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `work` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", CHILD.format(work=work), *argv], check=True, cwd=cwd,
                          capture_output=True, text=True)
    seconds, peak_kb = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(peak_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--schemes", default="nvfp4,w4a4")
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    from surgeon.sources import resolve_model

    model_dir = resolve_model(args.model)
    weights_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        load_s, load_mb = child(LOAD_ONLY, [str(model_dir)], tmp)
        rows.append({"case": "load only (baseline)", "seconds": load_s, "peak_rss_mb": load_mb, "written_mb": "",
                     "calibration_tokens": 0})
        for scheme in args.schemes.split(","):
            out = tmp / scheme
            seconds, peak = child(QUANTIZE, ["quantize", str(model_dir), str(out), "--scheme", scheme, "--tokens",
                                             str(args.tokens), "--no-progress"], tmp)
            record = json.loads((out / "surgeon_quantize.json").read_text())
            rows.append({"case": f"quantize {scheme}", "seconds": seconds, "peak_rss_mb": peak,
                         "written_mb": record["bytes_written"] / 1e6,
                         "calibration_tokens": record["calibration_tokens"]})
    date = datetime.date.today().isoformat()
    for row in rows:
        row.update(date=date, model=args.model, weights_mb=round(weights_mb, 1),
                   peak_over_load=round(row["peak_rss_mb"] / load_mb, 2), seconds=round(row["seconds"], 1),
                   peak_rss_mb=round(row["peak_rss_mb"]),
                   written_mb=row["written_mb"] if row["written_mb"] == "" else round(row["written_mb"], 1))
        print(f"{row['case']:24s} {row['seconds']:7.1f} s  peak {row['peak_rss_mb']:6.0f} MB "
              f"(×{row['peak_over_load']:.2f} of loading)  weights {row['weights_mb']} MB → {row['written_mb']} MB")
    path = append_rows(RESULTS_DIR / "quantize.csv", HEADER, rows)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
