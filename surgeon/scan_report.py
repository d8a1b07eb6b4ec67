"""The scan report: what `surgeon scan` writes as scan.json and what absorb-sinks and the reports read.

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
     "attention_gates": {"gates": {gate path: the same keys}, "mean": {...}} | null}   # gated attention's

`layer` is the decoder layer index (−1 for the embedding) and `point` the residual-stream point (layer + 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import SurgeonError

SCHEMA_VERSION = 1


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
    attention_gates: dict | None = field(default=None, repr=False)  # {"gates", "mean"}: gated attention's

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
