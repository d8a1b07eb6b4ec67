"""Calibration: what a pass needs measured or read on its source before it rewrites the plan, computed by the
caller (`convert()`) and handed to the pass, so that no pass loads a model, tokenizes text or opens a file.

A pass declares its `Needs`: a scan of the source (absorb-sinks' sinks and scales: from a scan.json, or one pass
over text), the largest |x_j| of some modules' inputs over text (smooth's activation statistics), or the smooth
factors the source records (smooth's later rounds, hadamard). The `Calibrator` fulfils them for one source,
loading its model at most once per convert, and says where each measurement came from by file name and sha256
(what a published model's config may carry, never the converter's file system).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SurgeonError

CALIBRATION_BATCH = 4  # windows per forward, for the scan and the activation statistics alike


@dataclass(frozen=True)
class ScanRequest:
    """A scan of the source: read from `report` (a scan.json of it) or run over `text` (`tokens` text tokens in
    windows of `seq_len`)."""

    report: str | os.PathLike | None = None
    text: object = None
    tokens: int = 8192
    seq_len: int = 256


@dataclass(frozen=True)
class ActivationRequest:
    """Per module of `modules`, the largest |x_j| of its input over `tokens` tokens of `text` (windows of `seq_len`),
    for each input channel j; `role` names what the modules are, for the error when one is missing."""

    modules: tuple[str, ...]
    text: object
    tokens: int
    seq_len: int
    role: str = "module"
    label: str = "calibrating"  # the progress bar's


@dataclass(frozen=True)
class Needs:
    scan: ScanRequest | None = None
    activations: ActivationRequest | None = None
    factors: bool = False  # the smooth factors file the source records (None when it has none)


@dataclass
class Calibration:
    """What the caller measured for one pass. `scan_origin`: the scan's provenance for the config (a scan.json's
    name and sha256, or the scanned text files'); `scan_where`: the same in words, for error messages."""

    scan: object = None  # surgeon.scan.ScanReport
    scan_origin: dict | None = None
    scan_where: str = ""
    activations: dict | None = None  # {module: amax (in_features,)}
    factors: dict | None = None  # {"<tensor>@<axis>": f}


def file_provenance(path: Path) -> dict:
    """A file as a published model may name it: its name and sha256."""
    from .io.digest import cached_file_sha256

    return {"file": path.name, "sha256": cached_file_sha256(path)}


class Calibrator:
    """Fulfils the passes' needs for one source checkpoint, loading its model once, when a need first asks."""

    def __init__(self, source: str | os.PathLike, *, progress: bool = False):
        self.source = Path(source)
        self.progress = progress
        self._loaded = None

    def model(self):
        if self._loaded is None:
            from .sources import load_model

            self._loaded = load_model(self.source)
        return self._loaded

    def close(self) -> None:
        """Drop the loaded model (the passes keep only what they were handed)."""
        self._loaded = None

    def calibrate(self, needs: Needs) -> Calibration:
        calibration = Calibration()
        if needs.scan is not None:
            self.scan(needs.scan, calibration)
        if needs.activations is not None:
            calibration.activations = self.activations(needs.activations)
        if needs.factors:
            from .io.smooth_factors import read_factor_entries

            calibration.factors = read_factor_entries(self.source)
        return calibration

    def scan(self, request: ScanRequest, into: Calibration) -> None:
        from .scan import ScanReport, scan
        from .sources import iter_token_windows, resolve_text

        if request.report is not None:
            path = Path(request.report)
            into.scan = ScanReport.load(path)
            into.scan_origin = {"scan": file_provenance(path)}
            into.scan_where = str(path)
            return
        if request.text is None:
            raise SurgeonError("a scan of the source needs a scan report or text to scan")
        paths = resolve_text(_spec(request.text))
        model, tokenizer = self.model()
        windows = iter_token_windows(paths, tokenizer, request.seq_len, request.tokens,
                                     batch_size=CALIBRATION_BATCH)
        into.scan = scan(model, tokenizer, windows, model_path=str(self.source), total_tokens=request.tokens,
                         progress=self.progress)
        into.scan_origin = {"scan of": [file_provenance(p) for p in paths]}
        into.scan_where = f"the scan of {request.text}"

    def activations(self, request: ActivationRequest) -> dict:
        from .progress import progress_bar
        from .quant import input_channel_amax
        from .sources import iter_token_windows, resolve_text

        paths = resolve_text(_spec(request.text))
        model, tokenizer = self.model()
        modules = dict(model.named_modules())
        absent = [n for n in request.modules if n not in modules]
        if absent:
            raise SurgeonError(f"the model has no module {absent[0]}, which {request.role}")
        windows = iter_token_windows(paths, tokenizer, request.seq_len, request.tokens, batch_size=CALIBRATION_BATCH)
        batches = -(-max(1, request.tokens // request.seq_len) // CALIBRATION_BATCH)
        with progress_bar(request.label, batches, enabled=self.progress) as advance:
            amax, _ = input_channel_amax(model, _advancing(windows, advance),
                                         [(n, modules[n]) for n in request.modules])
        return amax


def _spec(text):
    """A request's text as `resolve_text` takes it (requests hold a tuple where a caller gave a list)."""
    return list(text) if isinstance(text, tuple) else text


def _advancing(batches, advance):
    for batch in batches:
        yield batch
        advance(1)
