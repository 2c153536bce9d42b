"""One progress bar style for every long step (feature cache, training, calibration, bench).

Each bar counts images and advances per batch, so it shows images/s and an ETA from the first
batches on; a bar that moved once per epoch showed neither until the run was nearly over.
Bars go to stderr, so ``--json`` output on stdout stays parseable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["bar", "single_bar"]


class _Rate(ProgressColumn):
    """Images per second, from rich's moving window over the recent advances."""

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} img/s")


class _Info(ProgressColumn):
    """A task's ``info`` field (training shows its loss and agreement there), if it has one."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def bar(enabled: bool = True) -> Progress:
    """A rich Progress (use as a context manager; ``add_task`` counts images).

    Off a terminal (a pipe, a log file, a test) the finished bars are not printed: there they
    would only be stray lines on stderr, around a one-line error."""
    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _Rate(), TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
                    _Info(), console=console, disable=not enabled,
                    transient=not console.is_terminal)


@contextlib.contextmanager
def single_bar(enabled: bool, description: str, total: int
               ) -> Iterator[Callable[[int], None] | None]:
    """One bar of ``total`` images; yields its advance function (None when disabled)."""
    if not enabled:
        yield None
        return
    with bar() as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
