"""The `surgery` command: one Typer app, one small module per subcommand."""

from __future__ import annotations

import typer

from modelsurgery import __version__
from modelsurgery.cli import align, demo, export, grow, inspect, merge, quantize
from modelsurgery.cli import dequantize as dequantize_cli
from modelsurgery.cli import extract as extract_cli
from modelsurgery.cli import fold as fold_cli
from modelsurgery.cli import run as run_cli
from modelsurgery.cli.common import handle_sigterm

app = typer.Typer(
    name="surgery",
    help="Surgery on neural-network checkpoints: merge, grow, align, quantize, export, inspect.",
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
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Surgery on neural-network checkpoints."""


app.command("inspect")(inspect.inspect_command)
app.command("merge")(merge.merge_command)
app.command("analyze")(merge.analyze_command)
app.command("grow")(grow.grow_command)
app.command("align")(align.align_command)
app.command("quantize")(quantize.quantize_command)
app.command("export")(export.export_command)
app.command("fold")(fold_cli.fold_command)
app.command("extract")(extract_cli.extract_command)
app.command("dequantize")(dequantize_cli.dequantize_command)
app.command("demo")(demo.demo_command)
app.command("run")(run_cli.run_command)


def main() -> None:
    handle_sigterm()
    app()


if __name__ == "__main__":
    main()
