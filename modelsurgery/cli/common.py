"""What every command shares: one-line errors, --json output, progress on stderr.

Commands parse options, call ONE library function and render its result; no surgery here.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from modelsurgery.errors import SurgeryError

#: all logs and progress go to stderr; stdout is for results (and the single --json object)
err_console = Console(stderr=True)
out_console = Console()

DEBUG_ENV = "MODELSURGERY_DEBUG"


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn SurgeryError (and missing files) into one line on stderr and a non-zero exit."""
    debug = debug or bool(os.environ.get(DEBUG_ENV))
    try:
        yield
    except SurgeryError as e:
        if debug:
            raise
        fail(str(e))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        if debug:
            raise
        fail(f"{e.filename}: {e.strerror}")
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", code=130)


def emit_json(obj: dict) -> None:
    """The one JSON object a --json command prints on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


ProgressCallback = Callable[[str, int, int, dict], None]


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[ProgressCallback]:
    """A callback ``(task, done, total, info)`` for operations; a rich bar on stderr when it is a TTY."""
    if quiet or not err_console.is_terminal:
        yield lambda task, done, total, info=None: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console, transient=True,
    ) as progress:
        tasks: dict[str, int] = {}

        def update(task: str, done: int, total: int, info: dict | None = None) -> None:
            if task not in tasks:
                tasks[task] = progress.add_task(task, total=total, info="")
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (info or {}).items())
            progress.update(tasks[task], completed=done, total=total, info=text)

        yield update


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def parse_float_list(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SurgeryError(f"{what} '{text}': expected comma-separated numbers") from None
