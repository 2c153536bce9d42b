"""The one place where library exceptions become one-line messages and exit codes."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from contextvars import ContextVar
from enum import Enum

from pteenet.errors import (
    BundleError,
    CalibrationError,
    CheckpointError,
    DataError,
    ExportError,
    Interrupted,
    ModelNotFoundError,
    OfflineError,
    OptionError,
    PlacementError,
    PteenetError,
    TraceError,
    TrainingError,
)

# exception type -> (label, exit code). Codes: 2 bad usage/options, 3 input files, 4 network,
# 5 training, 6 export, 1 anything else of ours.
ERROR_TABLE: dict[type[PteenetError], tuple[str, int]] = {
    OptionError: ("bad option", 2),
    ModelNotFoundError: ("unknown model", 2),
    PlacementError: ("placement", 2),
    CheckpointError: ("checkpoint", 3),
    DataError: ("data", 3),
    BundleError: ("bundle", 3),
    TraceError: ("tracing", 3),
    OfflineError: ("offline", 4),
    TrainingError: ("training", 5),
    CalibrationError: ("calibration", 5),
    ExportError: ("export", 6),
}


MAX_LINE = 600  # characters of a message shown; the rest is cut
_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")  # how library messages name a parameter
_RUNNING: ContextVar[Mapping[str, str] | None] = ContextVar("running_flags", default=None)


def describe(exc: BaseException, argv: list[str] | None = None,
             flags: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Return the one line to print and the exit code for ``exc``; ``argv``, the command's
    arguments, gives an interrupted run the exact command that continues it; ``flags`` maps
    the running command's parameter names to its options (:func:`flags_of`)."""
    if isinstance(exc, Interrupted):
        again = f"; continue with: {resume_command(argv)}" if exc.resumable and argv else ""
        return f"interrupted: {as_flags(_one_line(exc), flags)}{again}", 130
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted: nothing was written (earlier results are intact)", 130
    for kind, (label, code) in ERROR_TABLE.items():
        if isinstance(exc, kind):
            return f"error ({label}): {as_flags(_one_line(exc), flags)}", code
    if isinstance(exc, PteenetError):
        return f"error: {as_flags(_one_line(exc), flags)}", 1
    return (f"internal error: {type(exc).__name__}: {_one_line(exc)} "
            f"(run again with --debug for the traceback and please report it)"), 1


def flags_of(command) -> dict[str, str]:
    """A click command's parameter names (as the library names them) and their long options.
    A ``--no-x`` switch also answers for the library's ``x`` (``no_cache`` sets ``cache``):
    library messages name such a setting without saying which way it was set."""
    found = {}
    for p in getattr(command, "params", []):
        longs = [o for o in getattr(p, "opts", ()) if o.startswith("--")]
        if p.name and longs:
            found[p.name] = max(longs, key=len)
            if p.name.startswith("no_") and getattr(p, "is_flag", False):
                found.setdefault(p.name[3:], found[p.name])
    return found


def show_as(command) -> None:
    """Name the command about to run for :func:`as_shown`: typer calls commands outside any
    click context that could say which one runs (recent typers vendor their own click)."""
    _RUNNING.set(flags_of(command))


def as_shown(text: str) -> str:
    """Library text printed outside an error (a note, a warning) with the running command's
    options for the parameters it names, as :func:`describe` does for errors."""
    return as_flags(text, _RUNNING.get())


def as_flags(text: str, flags: Mapping[str, str] | None) -> str:
    """Library messages name parameters in backquotes (`max_drop`; quotes name fields and
    values, backquoted commands hold spaces); on the command line they are options
    (``--max-drop``). A backquoted word that is no option of the command stays."""
    if not flags:
        return text
    return _PARAM.sub(lambda m: flags.get(m.group(1), m.group(0)), text)


def resume_command(argv: list[str]) -> str:
    """The same command line with ``--resume`` (once), quoted for a POSIX shell."""
    args = list(argv) if "--resume" in argv else [*argv, "--resume"]
    return shlex.join(["pteenet", *args])


def describe_usage(exc: Exception, command=None) -> str:
    """A click/typer usage error (bad or missing option or argument) as our one line.
    ``command``: the command being parsed, for errors raised before its context existed."""
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    command = ctx.command if ctx is not None else command
    return f"error (bad option): {_one_line(text)}{_choices(exc, command)}{where}"


def _choices(exc: Exception, command) -> str:
    """The values an option takes, when it was given without one (``--boosted`` bare): click
    only says a value is required, which leaves the user to look them up."""
    name = getattr(exc, "option_name", None)
    for p in getattr(command, "params", []):
        if name in getattr(p, "opts", ()):
            values = _values_of(p)
            return f" (one of: {', '.join(values)})" if values else ""
    return ""


def _values_of(param) -> list[str]:
    """A choice option's values: typer < 0.29 gives click a Choice type, later ones keep the
    Enum annotation."""
    choices = getattr(getattr(param, "type", None), "choices", None)
    if choices is not None:
        return [str(c) for c in choices]
    kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    return [str(e.value) for e in kind] if isinstance(kind, type) and issubclass(kind, Enum) \
        else []


def _one_line(exc: BaseException | str) -> str:
    """One line, and a short one: an edited file may hold megabytes where a name should be.
    The middle is cut, so the fix at the end of a message survives."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    half = MAX_LINE // 2
    return text if len(text) <= MAX_LINE else f"{text[:half]} ... {text[-half:]}"
