"""The options every command shares, defined once: ``--json``, ``--force``, ``--quiet``/``-q``, ``--debug``,
and for commands that write checkpoints ``--max-shard-size``, ``--no-input-hash``, ``--dtype``.

Flags carry an empty metavar: Typer's help would otherwise print ``--json <bool>`` as if it took a value.
No heavy imports here: every command module imports this one.
"""

from __future__ import annotations

import typer

#: --model's help: where the factory is looked up (``families.custom.load_factory``)
MODEL_HELP = ("Custom model factory 'package.module:function', looked up in the current folder first, then on "
              "the Python path (as `python -m` does), or 'path/to/file.py:function'.")


def json_option(help: str = "Print one JSON object on stdout (logs and progress go to stderr).") -> bool:
    return typer.Option(False, "--json", help=help, metavar="", show_default=False)


def force_option(help: str = "Replace an existing output (accepted by every command; a command that writes "
                 "nothing ignores it).") -> bool:
    return typer.Option(False, "--force", help=help, metavar="", show_default=False)


def quiet_option(help: str = "No progress display (results and errors are still printed).") -> bool:
    return typer.Option(False, "--quiet", "-q", help=help, metavar="", show_default=False)


def debug_option() -> bool:
    return typer.Option(False, "--debug", help="Show tracebacks.", metavar="", show_default=False)


def model_option() -> str:
    return typer.Option(None, "--model", help=MODEL_HELP)


def max_shard_size_option(default: str | None = "5GB", help: str = "Shard folder outputs above this size (e.g. "
                          "500MB, 2GiB).") -> str:
    return typer.Option(default, "--max-shard-size", help=help)


def no_input_hash_option() -> bool:
    return typer.Option(False, "--no-input-hash", help="Record input paths in the provenance without their SHA-256 "
                        "(hashing reads every input in full).", metavar="", show_default=False)


def dtype_option(help: str = "Write the output's float tensors as float32, float16 or bfloat16 (also fp32, fp16, "
                 "bf16; default: as the input).") -> str:
    return typer.Option(None, "--dtype", help=help)
