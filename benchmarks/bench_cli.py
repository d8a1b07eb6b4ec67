"""Benchmark: how fast the CLI answers, beside torch's own import, in the same run.

Wall time (median of --repeat fresh processes, run in turn so a busy machine skews all alike) of
`python -c "import torch"`, `surgeon --help`, `surgeon inspect <checkpoint>` and `python -c "import surgeon"`, each
with its ratio to torch's import. Targets (issue 17): --help ≤ 0.5× torch's import, inspect < 1.5×. The checkpoint
is the installed default model's imported directory when there is one, else a tiny one built here. Every process
runs from a temporary directory (never the repository root, whose kernels/ shadows a package transformers probes
for). Results are appended to benchmarks/results/cli_speed.csv.

    python benchmarks/bench_cli.py [--repeat 5] [--model DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_csv import RESULTS_DIR, append_rows  # noqa: E402

TARGETS = {"surgeon --help": 0.5, "surgeon inspect": 1.5}
HEADER = ["date", "case", "median_s", "ratio_to_torch", "target", "repeat", "checkpoint"]


def tiny_checkpoint(folder: Path) -> Path:
    """A two-layer Llama written by transformers (built in a subprocess: this process stays light)."""
    path = folder / "tiny-llama"
    script = ("import sys\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
              "LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, "
              "num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).save_pretrained(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=folder, capture_output=True)
    return path


def default_checkpoint() -> Path | None:
    """The default model's imported directory, if `surgeon` has imported it into its cache already."""
    from surgeon.paths import cache_dir

    found = sorted((cache_dir() / "gguf").glob("*/config.json")) if (cache_dir() / "gguf").is_dir() else []
    return found[0].parent if found else None


def time_command(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--model", type=Path, help="checkpoint for `surgeon inspect` (default: see above)")
    args = parser.parse_args()
    surgeon = shutil.which("surgeon") or sys.exit("the `surgeon` command is not installed (pip install -e .)")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        model = args.model or default_checkpoint() or tiny_checkpoint(cwd)
        cases = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "surgeon --help": [surgeon, "--help"],
            "surgeon inspect": [surgeon, "inspect", str(model)],
            "python -c 'import surgeon'": [sys.executable, "-c", "import surgeon"],
        }
        for argv in cases.values():  # warm the page cache once, unmeasured
            time_command(argv, cwd)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, argv in cases.items():
                times[name].append(time_command(argv, cwd))
    medians = {name: statistics.median(t) for name, t in times.items()}
    torch_s = medians["python -c 'import torch'"]
    date = datetime.datetime.now().isoformat(timespec="seconds")
    rows, verdicts = [], []
    for name, median in medians.items():
        ratio, target = median / torch_s, TARGETS.get(name)
        rows.append([date, name, f"{median:.3f}", f"{ratio:.2f}", target or "", args.repeat, model.name])
        mark = "" if target is None else (" ok" if ratio <= target else f" MISSES the target ≤ {target}×")
        print(f"{name:28s} {median:6.3f} s  {ratio:5.2f}× torch's import{mark}")
        verdicts.append(target is None or ratio <= target)
    out = append_rows(RESULTS_DIR / "cli_speed.csv", HEADER, rows)
    print(json.dumps({"checkpoint": str(model), "repeat": args.repeat, "results": str(out)}))
    sys.exit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
