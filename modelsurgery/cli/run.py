"""`surgery run RECIPE.yml -o OUT`: a mergekit config, or a multi-step recipe of surgery commands."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import typer
from rich.table import Table

from modelsurgery.cli.common import (
    emit_json,
    err_console,
    human_bytes,
    out_console,
    progress_bar,
    safe,
    user_errors,
    warn,
)
from modelsurgery.cli.options import (
    debug_option,
    dtype_option,
    force_option,
    json_option,
    max_shard_size_option,
    no_input_hash_option,
    quiet_option,
)
from modelsurgery.recipe import RecipeFailed, RunOptions, run_recipe


class _Commands(Mapping):
    """The surgery commands a step may run, each with its option declarations (the one schema),
    imported when a step names it."""

    def __init__(self) -> None:
        from modelsurgery.cli.app import COMMANDS, load_command

        self._names = [n for n in COMMANDS if n != "run"]
        self._load = load_command
        self._loaded: dict = {}

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def run_command(
    recipe: Path = typer.Argument(..., help="Recipe: a mergekit config (merge_method: ...) or 'steps:'."),
    output: Path = typer.Option(..., "-o", "--output", help="mergekit config: the merged model (folder or "
                                ".safetensors); steps: the folder that holds every step's output."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (steps, inputs with sizes, outputs, "
                                 "what is cached) and do nothing."),
    dtype: str = dtype_option(help="mergekit config: write the float tensors as float32, float16 or bfloat16 "
                              "(the config's out_dtype; both given must agree). Steps: set it in a step's options."),
    max_shard_size: str = max_shard_size_option(None, help="mergekit config: shard a folder output above this size "
                                                "(default 5GB). Steps: set it in a step's options."),
    no_input_hash: bool = no_input_hash_option(),
    force: bool = force_option(help="Rerun every step, replacing existing outputs."),
    json_out: bool = json_option(help="Print one JSON object with every step's result."),
    quiet: bool = quiet_option(),
    debug: bool = debug_option(),
) -> None:
    """Run a recipe: a mergekit YAML config as it is, or steps chaining surgery commands.

    Step options are the commands' own long options without the dashes (dtype, max_shard_size and
    no_input_hash on every step that writes a checkpoint, mergekit steps included). A step is skipped
    (cached) when its output's record shows the same operation, options and input hashes.

    Examples:\n
      surgery run slerp.yml -o merged/\n
      surgery run slerp.yml -o merged/ --dtype bfloat16 --max-shard-size 2GB\n
      surgery run pipeline.yml -o build/ --dry-run\n
      surgery run pipeline.yml -o build/ --json
    """
    failed = None
    with user_errors(debug):
        with progress_bar(quiet) as progress:
            try:
                write = {k: v for k, v in (("dtype", dtype), ("max_shard_size", max_shard_size),
                                           ("no_input_hash", no_input_hash)) if v not in (None, False)}
                result = run_recipe(recipe, output, _Commands(), RunOptions(dry_run=dry_run, force=force, write=write),
                                    progress)
            except RecipeFailed as e:
                failed, result = e, e.result
        for step in result.steps:  # a mergekit step's notes (a command step's command printed its own)
            if step.run == "mergekit" and step.status == "ran":
                for note in (step.result or {}).get("notes", []):
                    warn(note)
        if failed is not None and not json_out:
            if result.kind == "steps":  # which steps ran, were cached, or failed
                render(result.to_dict())
            raise failed
    if json_out:
        emit_json(result.to_dict())
        if failed is not None:
            err_console.print(f"[bold red]error:[/] {safe(failed)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        return
    render(result.to_dict())


def describe_input(i: dict) -> str:
    return f"step {i['from_step']}" if i["from_step"] else human_bytes(i["bytes"] or 0)


def render(r: dict) -> None:
    title = safe(f"{r['recipe']} ({r['kind']}) -> {r['output']}") + (" \\[dry run]" if r["dry_run"] else "")
    table = Table(title=title, show_edge=False)
    for col in ("step", "status", "inputs", "output", "seconds"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for s in r["steps"]:
        # one input a line: each escaped on its own, so the newline between them stays a line break
        ins = "\n".join(safe(f"{i['path']} ({describe_input(i)})") for i in s["inputs"])
        table.add_row(safe(f"{s['name']} ({s['run']})"), s["status"], ins, safe(s["output"]),
                      "" if s["status"] == "planned" else f"{s['seconds']:.2f}")
    out_console.print(table)
    if r["dry_run"]:
        for s in r["steps"]:
            out_console.print(f"  {safe(s['name'])}: {safe(s['command'])}", highlight=False, soft_wrap=True)
