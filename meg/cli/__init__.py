"""The `meg` command line: one click group, sub-commands grouped by area.

Sub-commands are imported lazily so that `meg --help` stays fast and a command's heavy
imports (torch, diffusers, grpc) are paid only when it runs. To add one, put a click
command or group in a module and name it in ``COMMANDS`` (or in ``meg.cli.bench``'s
``BENCHMARKS`` for `meg bench ...`).

Errors are reported here, once for every command: a `meg.errors.MegError` (the user's
input, a missing model, an unreachable edge …) prints one line ``error: FIELD: message``
and exits with the code of its kind (``EXIT_CODES``); anything else is a bug and keeps its
traceback (exit 1).

====  ======================================================================
code  meaning
====  ======================================================================
0     success
1     internal error (a bug; the traceback is printed)
2     bad input: a command-line usage error or an `InvalidInputError`
3     not found: a model, checkpoint or file (`ModelNotFoundError`)
4     unavailable: an edge/policy service unreachable, a deadline passed, the link failed
5     resource exhausted: queue full, a size limit
6     authentication failed
130   interrupted (Ctrl-C)
====  ======================================================================
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

import meg.models  # noqa: F401  (registers meg-tiny as a model source; light: no torch)

__all__ = ["EXIT_CODES", "LazyGroup", "exit_code_for", "main", "quiet_third_party"]

# name -> ("module:attribute", one-line help shown by `meg --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("meg.demo:demo", "The whole system on loopback: one image and its report."),
    "bench": ("meg.cli.bench:bench", "Benchmarks: print a table and write JSON."),
    "channel": ("meg.channel.cli:channel", "Wireless channel emulator: BER curves, link budget."),
    "train": ("meg.models.cli:train", "Train the embedded meg-tiny model family (stages or all)."),
    "eval": ("meg.models.cli:eval_group", "Measure a model family: prompt fidelity, decoder MSE, judge."),
    "generate": ("meg.services.cli:generate", "Generate an image as the user device, with an edge's help."),
    "serve": ("meg.services.serve_cli:serve", "Run the edge server or the policy service."),
    "devices": ("meg.cli.devices:devices", "Device profiles (latency/energy models) and calibration."),
    "export-onnx": ("meg.split.onnx_cli:export_onnx", "Export a split's device partition to ONNX (cached)."),
    "ui": ("meg.ui:ui", "Preview-refine in the browser: prompt box, live preview, refine button, final image."),
    "session": ("meg.session_cli:session", "Preview-refine in the terminal: preview each prompt, /final refines on the edge."),
    "policy": ("meg.policy.cli:policy", "Plan split/steps/merge under limits: profile, train (CVPO, PPO), eval."),
    "hybrid": ("meg.policy.hybrid_cli:hybrid", "Hybrid SR controller: measured table, batch decisions."),
    "fuzz": ("meg.fuzz.cli:fuzz", "Coverage-guided fuzzing (atheris) of every parser of untrusted input."),
}


EXIT_CODES: dict[str, int] = {
    "InvalidInputError": 2,
    "ModelNotFoundError": 3,
    "UnavailableError": 4,
    "DeadlineExceededError": 4,
    "ChannelError": 4,
    "CancelledByClient": 4,
    "ResourceExhaustedError": 5,
    "AuthenticationError": 6,
}
"""Exit code by `meg.errors` class (the first base class found in this table wins)."""


def exit_code_for(exc: BaseException) -> int:
    """Exit code of an exception raised by a command (see the table in the module docstring)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in EXIT_CODES and cls.__module__ == "meg.errors":
            return EXIT_CODES[cls.__name__]
    return 1


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            target = self.lazy[cmd_name][0]
            module_name, attr = target.split(":")
            command = getattr(importlib.import_module(module_name), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{target} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; a `MegError` becomes one line and its exit code (the one handler)."""
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from meg.errors import MegError  # light: no torch

            if not isinstance(exc, MegError) or ctx.parent is not None:
                raise
            where = f"{exc.field}: " if exc.field and not exc.message.startswith(f"{exc.field}:") else ""
            click.echo(f"error: {where}{exc.message}", err=True)
            ctx.exit(exit_code_for(exc))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help texts come from the registry, so listing commands imports nothing heavy.
        rows = [(name, self.lazy[name][1]) for name in sorted(self.lazy)]
        # (a loop, not a comprehension: zero-argument super() does not work inside one)
        for name in super().list_commands(ctx):
            command = super().get_command(ctx, name)
            rows.append((name, command.get_short_help_str(60) if command else ""))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meg-edge")
def cli() -> None:
    """MEG: latent diffusion split between an edge server and a user device.

    Start with `meg demo` (edge server, policy service and device client on loopback,
    one generated image and its report). Every command has --help.
    """
    quiet_third_party()


def quiet_third_party() -> None:
    """Silence third-party notices (transformers' optional torchvision backends, diffusers'
    missing `accelerate`): they say nothing about the user's command. Errors still show."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    for name in ("transformers", "diffusers"):
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")
        if name in sys.modules:  # already imported: its logger read the variable before
            importlib.import_module(f"{name}.utils.logging").set_verbosity_error()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="meg")
