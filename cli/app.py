"""The root of the CLI: registers one command per file (imported here, statically); errors
become one line here only."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated

import click
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


def _typer_exceptions(names: tuple[str, ...] = ("Exit", "Abort", "ClickException", "UsageError",
                                                "BadParameter")) -> list[type]:
    """typer >= 0.16 vendors click: its exit/usage exceptions are separate classes."""
    import typer.core

    found = []
    vendored = getattr(typer, "_click", None)
    for mod in (typer.core, getattr(typer.core, "click", None), vendored,
                getattr(vendored, "exceptions", None)):
        for n in names:
            obj = getattr(mod, n, None) if mod else None
            if isinstance(obj, type) and issubclass(obj, BaseException):
                found.append(obj)
    return found


# --help exits and aborts are click's (and typer's own copies of them) to handle; usage errors
# become our one line (typer would draw a box around them).
_PASS_THROUGH = tuple({click.exceptions.Exit, click.ClickException, click.exceptions.Abort,
                       typer.Exit, typer.Abort, *_typer_exceptions()})
_USAGE = tuple(e for e in _PASS_THROUGH if e.__name__ in ("UsageError", "BadParameter"))
_HELP = tuple(e for e in {getattr(click.exceptions, "NoArgsIsHelpError", None),  # click >= 8.2
                          *_typer_exceptions(("NoArgsIsHelpError",))} if e is not None)
ARGV = "pteenet.argv"  # ctx.meta key: the arguments as given
_EXIT = getattr(typer.core, "Exit", click.exceptions.Exit)  # what typer's main turns into a code


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
            if isinstance(exc, _HELP):
                raise
            click.echo(describe_usage(exc), err=True)
            raise _EXIT(exc.exit_code) from None

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """The command found is the one whose options library notes are shown with."""
        name, command, rest = super().resolve_command(ctx, args)
        show_as(command)
        return name, command, rest

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _USAGE as exc:
            if isinstance(exc, _HELP):
                raise
            sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand \
                else None
            click.echo(describe_usage(exc, sub), err=True)
            ctx.exit(exc.exit_code)
        except _PASS_THROUGH:
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if ctx.params.get("debug"):
                traceback.print_exc()
            sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand \
                else None
            message, code = describe(exc, ctx.meta.get(ARGV), flags_of(sub))
            click.echo(message, err=True)
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
    for command in (inspect, attach, calibrate, bench, demo, export):
        command.__doc__ = unwrap_help(command.__doc__)
        app.command(no_args_is_help=command is inspect)(command)


_register()


def main() -> None:
    """Console entry point."""
    sys.exit(app())
