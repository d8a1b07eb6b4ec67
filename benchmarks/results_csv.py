"""Appending a benchmark's rows to its CSV in benchmarks/results/ (the header written once, with the file)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def append_rows(path: Path, header: Sequence[str], rows: Iterable[Sequence | dict]) -> Path:
    """Append `rows` (sequences in header order, or dicts keyed by it) to `path`; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(header)
        for row in rows:
            writer.writerow([row[key] for key in header] if isinstance(row, dict) else row)
    return path
