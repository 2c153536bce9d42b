"""One progress bar style for every long step (feature cache, training, calibration, bench).

Each bar counts images and advances per batch, so it shows images/s and an ETA from the first
batches on; a bar that moved once per epoch showed neither until the run was nearly over.
Bars go to stderr, so ``--json`` output on stdout stays parseable.

Off a terminal (``pteenet attach ... > attach.log 2>&1``, CI, ``nohup``, a notebook) rich draws
nothing live, so a 16-minute attach used to log nothing until it ended. There each step prints a
plain line instead, as tqdm does in a log: once a step has run 5 s, at every further 10 % and
at least every 30 s, with done/total, the rate and the ETA (:class:`LogProgress`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

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

__all__ = ["LogProgress", "bar", "single_bar"]

LOG_EVERY_SHARE = 0.10  # a plain line at every further 10 % ...
LOG_EVERY_SECONDS = 30.0  # ... and at least this often while a step runs,
LOG_DELAY_SECONDS = 5.0  # once it has run this long (tqdm's ``delay``): a quick step prints
# nothing, so a command that fails after one keeps its one-line error


class _Rate(ProgressColumn):
    """Images per second, from rich's moving window over the recent advances."""

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:,.0f} img/s")


class _Info(ProgressColumn):
    """A task's ``info`` field (training shows its loss and agreement there), if it has one."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("info", "")))


def bar(enabled: bool = True) -> Progress | LogProgress:
    """A rich Progress (use as a context manager; ``add_task`` counts images).

    Off a terminal (a pipe, a log file, a test) the rich bars would draw nothing until the end:
    a :class:`LogProgress` with the same calls prints plain lines there instead."""
    console = Console(stderr=True)
    if enabled and not console.is_terminal:
        return LogProgress(sys.stderr)
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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _LogTask:
    def __init__(self, description: str, total: float, now: float) -> None:
        self.description, self.total, self.completed = description, total, 0.0
        self.start = self.shown_at = now
        self.shown_share, self.info, self.done, self.shown = 0.0, "", False, False


class LogProgress:
    """The calls of rich's Progress that pteenet makes (``add_task``, ``advance``, ``update``),
    printed as plain lines for a log: ``training: 4,500/45,000 (10%), 380 img/s, ETA 1:47``.

    Once a step has run ``delay`` seconds, a line comes at once, then whenever it passes another
    ``every_share`` of its total or ``every_seconds`` since its last line, and when it
    completes; nothing repeats itself, so a log of an hour-long run stays a few dozen lines per
    step, and a step done within ``delay`` prints nothing."""

    def __init__(self, stream: TextIO, every_share: float = LOG_EVERY_SHARE,
                 every_seconds: float = LOG_EVERY_SECONDS, delay: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.every_share, self.every_seconds = stream, every_share, every_seconds
        self.delay = LOG_DELAY_SECONDS if delay is None else delay  # read when made: patchable
        self.clock = clock
        self.tasks: list[_LogTask] = []

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append(_LogTask(description, float(total or 0), self.clock()))
        self.tasks[-1].info = str(fields.get("info", ""))
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, completed: float | None = None, advance: float | None = None,
               total: float | None = None, info: str | None = None, **_: Any) -> None:
        t = self.tasks[task]
        if total is not None:
            t.total = float(total)
        if completed is not None:
            t.completed = float(completed)
        if advance is not None:
            t.completed += advance
        if info is not None:
            t.info = info
        self._maybe_show(t)

    def _maybe_show(self, t: _LogTask) -> None:
        if t.done or t.total <= 0:
            return
        now, share = self.clock(), min(1.0, t.completed / t.total)
        finished = share >= 1.0
        if now - t.start < self.delay:
            return
        if t.shown and not (finished or share - t.shown_share >= self.every_share
                            or now - t.shown_at >= self.every_seconds):
            return
        t.shown_at, t.shown_share, t.done, t.shown = now, share, finished, True
        elapsed = now - t.start
        rate = t.completed / elapsed if elapsed > 0 else 0.0
        when = f"in {_duration(elapsed)}" if finished else \
            f"ETA {_duration((t.total - t.completed) / rate)}" if rate > 0 else "ETA ?"
        info = f", {t.info}" if t.info else ""
        self.stream.write(f"{t.description}: {t.completed:,.0f}/{t.total:,.0f} ({share:.0%}), "
                          f"{rate:,.0f} img/s, {when}{info}\n")
        self.stream.flush()
