"""The `meg` command line: one click group, sub-commands grouped by area.

Sub-commands are imported lazily so that `meg --help` stays fast and a command's heavy
imports (torch, diffusers, grpc) are paid only when it runs. To add one, put a click
command or group in a module and name it in ``COMMANDS`` (or in ``meg.cli.bench``'s
``BENCHMARKS`` for `meg bench ...`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

__all__ = ["LazyGroup", "main"]

# name -> ("module:attribute", one-line help shown by `meg --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("meg.demo:demo", "The whole system on loopback: one image and its report."),
    "bench": ("meg.cli.bench:bench", "Benchmarks: print a table and write JSON."),
    "channel": ("meg.channel.cli:channel", "Wireless channel emulator: BER curves, link budget."),
    "train": ("meg.models.cli:train", "Train the embedded meg-tiny model family (stages or all)."),
    "eval": ("meg.models.cli:eval_group", "Measure a model family: prompt fidelity, decoder MSE, judge."),
    "generate": ("meg.services.cli:generate", "Generate an image as the user device, with an edge's help."),
    "serve": ("meg.services.cli:serve", "Run the edge server or the policy service."),
    "devices": ("meg.devices.cli:devices", "Device profiles (latency/energy models) and calibration."),
    "export-onnx": ("meg.split.onnx_cli:export_onnx", "Export a split's device partition to ONNX (cached)."),
    "policy": ("meg.policy.cli:policy", "Plan split/steps/merge under limits: profile, train (CVPO, PPO), eval."),
}


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

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help texts come from the registry, so listing commands imports nothing heavy.
        rows = [(name, self.lazy[name][1]) for name in sorted(self.lazy)]
        rows += [
            (name, (cmd.get_short_help_str(60) if (cmd := super().get_command(ctx, name)) else ""))
            for name in super().list_commands(ctx)
        ]
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="meg")
