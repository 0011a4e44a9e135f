"""The `surgery` command: one Typer app, one small module per subcommand.

Each subcommand's module (and with it torch, onnx, transformers) is imported only when that command
runs or shows its own help: `surgery --help` and `surgery --version` import none of them.
"""

from __future__ import annotations

import importlib
import os
from itertools import pairwise
from pathlib import Path

import click
import typer
from typer.core import TyperGroup

from modelsurgery import __version__
from modelsurgery.cli.common import handle_sigterm

#: name -> (module under modelsurgery.cli, function, one-line summary for `surgery --help`); the
#: summary is the start of the function's docstring (tests/test_startup.py checks it)
COMMANDS = {
    "inspect": ("inspect", "inspect_command", "Show tensors grouped by block, totals, the detected family, "
                "metadata and provenance."),
    "merge": ("merge", "merge_command", "Merge models: permute every model after the first into its basis "
              "(weight matching), then average."),
    "analyze": ("merge", "analyze_command", "Per layer: L2 distance and top singular vector alignment of two "
                "models, before/after weight matching."),
    "grow": ("grow", "grow_command", "Grow a trained model deeper or wider, keeping what it learned."),
    "align": ("align", "align_command", "Weight Aligning (Zhao et al., CVPR 2020): rescale the new-class rows "
              "of the classifier so their mean norm matches the old classes', removing the bias toward new classes "
              "after class-incremental training."),
    "quantize": ("quantize", "quantize_command", "Quantize Linear and Conv weights to 2-8 bits, learning the "
                 "rounding block by block."),
    "dequantize": ("dequantize", "dequantize_command", "Turn integer codes, scales and zero points back into "
                   "float weights, W = (q - zero_point) * scale."),
    "export": ("export", "export_command", "Export a checkpoint to ONNX with dynamic batch (and sequence) axes "
               "and check it in ONNX Runtime."),
    "fold": ("fold", "fold_command", "Fold PEFT adapters into the base weights, one tensor at a time (the whole "
             "model is never in memory)."),
    "extract": ("extract", "extract_command", "Extract a LoRA adapter (TUNED - BASE, truncated SVD per layer) "
                "that PEFT loads as it is."),
    "demo": ("demo", "demo_command", "Run every capability once on the bundled fixtures and print what it did."),
    "run": ("run", "run_command", "Run a recipe: a mergekit YAML config as it is, or steps chaining surgery "
            "commands."),
}


#: the commands whose output's provenance holds the SHA-256 of their input checkpoints
HASHING_INPUTS = frozenset({"merge", "grow", "align", "quantize", "dequantize", "fold", "extract"})


def prefetch_input_digests(name: str, args: list[str]) -> list[Path]:
    """Start hashing the checkpoints named on the command line of a command that will record their
    SHA-256, before its module (and torch, about a second on one core) is imported: the hashing then
    runs on an idle core. Any argument naming a checkpoint counts but the output (``-o``); the
    writer asks for the digests it needs, and takes each from here when the file is unchanged. Not
    with ``--no-input-hash``, nor on a torchrun rank other than 0 (which writes nothing). The files
    it started hashing."""
    if name not in HASHING_INPUTS or "--no-input-hash" in args or os.environ.get("RANK", "0") != "0":
        return []
    from modelsurgery.checkpoint.digests import start
    from modelsurgery.checkpoint.store import weight_files

    outputs = {value for flag, value in pairwise(args) if flag in ("-o", "--output")}
    named = [a for a in args if not a.startswith("-") and a not in outputs]
    files = list(dict.fromkeys(f for a in named for f in weight_files(a)))
    start(files)
    return files


def load_command(name: str) -> click.Command:
    """The click command of subcommand ``name``, its module imported now."""
    module, function, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(f"modelsurgery.cli.{module}"), function)
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(fn)
    command = typer.main.get_command(single)
    command.name = name
    return flags_without_value(command)


def flags_without_value(command: click.Command) -> click.Command:
    """Give every flag of ``command`` (its own, the --x/--no-x pairs, --help) an empty metavar, as
    ``cli/options.py`` gives the shared ones: Typer's help would otherwise print ``--split <bool>`` as if the
    flag took a value."""
    for param in command.params:
        if getattr(param, "is_flag", False):  # Typer's options are not click.Option instances
            param.metavar = ""
    get_help_option = command.get_help_option

    def help_option(ctx: click.Context) -> click.Option | None:
        option = get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    return command


class LazyGroup(TyperGroup):
    """Lists the subcommands from ``COMMANDS`` and imports one only to run it or show its help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in COMMANDS:  # for the listing in `surgery --help`: name and summary only
            return click.Command(cmd_name, short_help=COMMANDS[cmd_name][2], help=COMMANDS[cmd_name][2])
        return super().get_command(ctx, cmd_name)

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""  # `surgery --help` lists it as a flag, not as `--help <bool>`
        return option

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and args[0] in COMMANDS:
            prefetch_input_digests(args[0], args[1:])
            return args[0], load_command(args[0]), args[1:]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="surgery",
    cls=LazyGroup,
    help="Surgery on neural-network checkpoints: inspect, merge, analyze, grow, align, quantize, dequantize, export, "
    "fold, extract, run (and a demo).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"modelsurgery {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.",
                                 metavar="", show_default=False),
) -> None:
    """Surgery on neural-network checkpoints."""


def main() -> None:
    handle_sigterm()
    app()


if __name__ == "__main__":
    main()
