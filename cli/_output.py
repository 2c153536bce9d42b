"""All command output goes through one :class:`Output`: human (rich), JSON, or quiet."""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["Output"]

_LEFT = ("cut", "name", "class", "classes", "exit", "metric", "path")


class Output:
    """Human mode prints rich tables and notes; JSON mode prints one JSON document at the end."""

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """A line for humans (on stderr in JSON mode so stdout stays parseable)."""
        if self.quiet:
            return
        (self.err if self.json_mode else self.console).print(text)

    def warn(self, text: str) -> None:
        """One warning line on stderr (shown even in JSON mode; not in quiet mode)."""
        if not self.quiet:
            self.err.print(f"warning: {text}")

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.json_mode or self.quiet:
            return
        t = Table(title=title, title_justify="left")
        for i, c in enumerate(columns):  # the first column names the row: folded, never cut
            t.add_column(c, justify="left" if c in _LEFT else "right",
                         overflow="fold" if i == 0 else "ellipsis")
        for r in rows:
            t.add_row(*("" if v is None else str(v) for v in r))
        self.console.print(t)

    def result(self, data: Any) -> None:
        """The command's result: printed as JSON in JSON mode, otherwise already shown."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")


def pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"


def human(n: float | None) -> str:
    if n is None:
        return ""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def kb(n: int | None) -> str:
    """Bytes as kilobytes (1 KB = 1024 bytes), the unit the feature cache is sized in."""
    return "" if n is None else f"{n / 1024:.1f} KB"


def unwrap_help(doc: str | None) -> str | None:
    """Join each docstring paragraph into one line: Typer's rich help keeps single newlines,
    which would break --help text at the source's line ends instead of the terminal's."""
    if doc is None:
        return None
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)
