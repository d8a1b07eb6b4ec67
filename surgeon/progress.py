"""Rich progress for long work, on stderr so stdout stays for results."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int, *, enabled: bool = True,
                 unit: str = "items") -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`; draws a bar (bytes with speed, or counts) when enabled."""
    if not enabled:
        yield lambda n=1: None
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
    with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("training", total=total, completed=start, status="")
        yield lambda step, text="": progress.update(task, completed=step, status=text)
