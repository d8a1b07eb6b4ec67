"""The files of a training run directory (written by surgeon.train.loop, read by export, the pipeline and the
curves): names only and the metrics reader, so readers need not import the training stack."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SurgeonError

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RUN_JSON = "run.json"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (a run directory, or the file itself); [] when there is none yet."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SurgeonError(f"{path} has a line that is not JSON; restore it from the run") from None
    return records
