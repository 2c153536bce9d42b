"""The root of the CLI: registers one command per file (imported here, statically); errors
become one line here only."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Annotated

import typer
from typer.core import TyperGroup

from ._errors import describe, describe_usage, flags_of, show_as
from ._output import unwrap_help
from .attach_cmd import attach
from .bench_cmd import bench
from .calibrate_cmd import calibrate
from .demo_cmd import demo
from .export_cmd import export
from .inspect_cmd import inspect
from .predict_cmd import predict


def _base(cls: type, name: str) -> type:
    """The base class called ``name`` of one of typer's public exceptions: typer does not
    export click's usage-error classes (and, from 0.16, vendors its own click), so they are
    found through ``typer.BadParameter`` instead of a private module."""
    return next(c for c in cls.__mro__ if c.__name__ == name)


# --help exits and aborts are typer's to handle; usage errors become our one line (typer would
# draw a box around them), except "no arguments", which shows the help.
_USAGE = _base(typer.BadParameter, "UsageError")
# A reader that stopped reading (``pteenet attach --help | head``) is no error of the command's:
# typer ends such a run quietly.
_PASS_THROUGH = (typer.Exit, typer.Abort, _base(typer.BadParameter, "ClickException"),
                 BrokenPipeError)
ARGV = "pteenet.argv"  # ctx.meta key: the arguments as given


def _is_help(exc: BaseException) -> bool:
    """click >= 8.2 raises ``NoArgsIsHelpError`` (a usage error) for ``no_args_is_help``."""
    return type(exc).__name__ == "NoArgsIsHelpError"


class _Group(TyperGroup):
    """Overrides ``invoke`` (and ``make_context``, for usage errors) so every library or usage
    error ends as one line on stderr and an exit code (the traceback only with ``--debug``)."""

    def make_context(self, info_name, args, parent=None, **extra):
        """Usage errors before any command runs (``pteenet --bogus``): one line too. Keeps
        the arguments, for the exact command that continues an interrupted run."""
        argv = list(args)
        try:
            ctx = super().make_context(info_name, args, parent=parent, **extra)
            ctx.meta[ARGV] = argv
            return ctx
        except _USAGE as exc:
            if _is_help(exc):
                raise
            typer.echo(describe_usage(exc), err=True)
            raise typer.Exit(exc.exit_code) from None

    def resolve_command(self, ctx: typer.Context, args: list[str]):
        """The command found is the one whose options library notes are shown with."""
        name, command, rest = super().resolve_command(ctx, args)
        show_as(command)
        return name, command, rest

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except _USAGE as exc:
            if _is_help(exc):
                raise
            sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand \
                else None
            typer.echo(describe_usage(exc, sub), err=True)
            ctx.exit(exc.exit_code)
        except _PASS_THROUGH:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand \
                else None
            message, code = describe(exc, ctx.meta.get(ARGV), flags_of(sub))
            typer.echo(message, err=True)
            ctx.exit(code)


app = typer.Typer(
    cls=_Group,
    name="pteenet",
    help="Retrofit early exits onto a pretrained image classifier: inspect where its FLOPs go, "
    "attach and train exit branches on its own predictions, calibrate when they may answer, and "
    "benchmark the saving against the untouched backbone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """pteenet: early exits for pretrained classifiers."""


def _register() -> None:
    """One command per file, in the order ``--help`` lists them (help text unwrapped)."""
    for command in (inspect, attach, calibrate, bench, predict, export, demo):
        command.__doc__ = unwrap_help(command.__doc__)
        app.command(no_args_is_help=command in (inspect, predict))(command)


_register()


def main() -> None:
    """Console entry point.

    A command that failed (its one line already printed) ends at once when it holds nothing
    that needs tearing down, no thread and no child process: unwinding torch's modules at
    interpreter exit took 1.4 s on an idle machine and 11 s on a busy one (issue 29: a writer
    refused by the lock, still running long after it said so)."""
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if code and _nothing_to_tear_down():
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
        raise


def _nothing_to_tear_down() -> bool:
    import multiprocessing
    import threading

    return threading.active_count() == 1 and not multiprocessing.active_children()
