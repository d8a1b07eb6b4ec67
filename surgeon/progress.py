"""Progress for long work, on stderr so stdout stays for results.

On a terminal: rich bars, redrawn in place. Anywhere else (a CI log, a redirect) rich draws nothing until the end
and a redraw per refresh would flood the log, so the same progress becomes plain lines: one when another 10% is
done (at most one per 5 s), one at least every 30 s while work advances, and one at the end. transformers' own
tqdm bars are switched off where surgeon loads a model (`silence_transformers`), or shown as surgeon's
(`gguf_progress`), so that one kind of progress is on screen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True)

PLAIN_STEP = 0.1  # a plain line per tenth of the work ...
PLAIN_MIN_GAP_S = 5.0  # ... but not more often than this (a short job prints its last line only, nearly)
PLAIN_EVERY_S = 30.0  # and one at least this often while work advances
clock = time.monotonic  # what the plain lines time themselves by (a test sets its own)


def _live() -> bool:
    """Whether the console redraws in place (a terminal or a notebook), not a log."""
    return console.is_interactive or console.is_jupyter


class PlainLines:
    """Progress as plain periodic lines: `update(completed, status)` prints when a line is due, `close()` the last."""

    def __init__(self, description: str, total: int | None, *, unit: str = "items", start: int = 0):
        self.description, self.total, self.unit = description, total, unit
        self.completed, self.status = start, ""
        self.started = self.last_time = clock()
        self.last_fraction = self._fraction()
        self.printed: int | None = None  # the count the last line showed

    def _fraction(self) -> float:
        return min(self.completed / self.total, 1.0) if self.total else 0.0

    def update(self, completed: int, status: str = "") -> None:
        self.completed, self.status = completed, status
        now, fraction = clock(), self._fraction()
        gap = now - self.last_time
        if gap >= PLAIN_EVERY_S or (fraction - self.last_fraction >= PLAIN_STEP - 1e-9 and gap >= PLAIN_MIN_GAP_S):
            self._line(now, fraction)

    def close(self) -> None:
        if self.printed != self.completed:
            self._line(clock(), self._fraction())

    def _line(self, now: float, fraction: float) -> None:
        self.last_time, self.last_fraction, self.printed = now, fraction, self.completed
        console.print(self.text(now), soft_wrap=True, markup=False, highlight=False)

    def text(self, now: float) -> str:
        if self.unit == "bytes":
            count = f"{self.completed / 1e6:,.1f}" + (f"/{self.total / 1e6:,.1f}" if self.total else "") + " MB"
        else:
            count = f"{self.completed:,}" + (f"/{self.total:,}" if self.total else "")
            count += "" if self.unit == "items" else f" {self.unit}"
        percent = f" ({100 * self._fraction():.0f}%)" if self.total else ""
        elapsed = int(now - self.started)
        status = f"  {self.status}" if self.status else ""
        return f"{self.description}: {count}{percent}, {elapsed // 60}:{elapsed % 60:02d} elapsed{status}"


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True,
                 unit: str = "items") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar (bytes with speed, or counts) when enabled."""
    if not enabled:
        yield lambda n=1: None
        return
    if not _live():
        lines = PlainLines(description, total, unit=unit)
        yield lambda n=1: lines.update(lines.completed + n)
        lines.close()  # not after a failure: the error is the last line
        return
    counter = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), *counter, TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


@contextmanager
def training_progress(total: int, start: int = 0, *, enabled: bool = True) -> Iterator[Callable[[int, str], None]]:
    """Yield `show(step, text)`: a bar over the run's steps with a live status text (loss, residual peak)."""
    if not enabled:
        yield lambda step, text="": None
        return
    if not _live():
        lines = PlainLines("training", total, unit="steps", start=start)
        yield lines.update
        lines.close()
        return
    with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("training", total=total, completed=start, status="")
        yield lambda step, text="": progress.update(task, completed=step, status=text)


def silence_transformers() -> None:
    """Switch off transformers' tqdm bars ("Loading weights", "Writing model shards"): surgeon shows its own
    progress, and a tqdm bar in a log is a line per refresh."""
    from transformers.utils import logging

    logging.disable_progress_bar()


@contextmanager
def gguf_progress(enabled: bool = True) -> Iterator[None]:
    """For the duration: transformers' GGUF loader, which iterates its tensors through tqdm directly ("Converting
    and de-quantizing GGUF tensors..."), advances surgeon's progress instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # a transformers without that loop: nothing to route
        yield
        return

    def routed(iterable, desc: str | None = None, **_):
        total = len(iterable) if hasattr(iterable, "__len__") else None
        with progress_bar((desc or "loading GGUF").rstrip(". "), total, enabled=enabled) as advance:
            for item in iterable:
                yield item
                advance(1)

    gguf_utils.tqdm = routed
    try:
        yield
    finally:
        gguf_utils.tqdm = original


@contextmanager
def quiet_tqdm() -> Iterator[None]:
    """For the duration: every tqdm bar disabled (compressed-tensors draws one per step — applying the config,
    compressing, decompressing — under surgeon's own progress); restored after."""
    from tqdm import tqdm

    original = tqdm.__init__

    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True  # over a caller's own disable=(not show_progress)
        original(self, *args, **kwargs)

    tqdm.__init__ = quiet
    try:
        yield
    finally:
        tqdm.__init__ = original
