"""What every command shares: one-line errors, --json output, progress on stderr.

Commands parse options, call ONE library function and render its result; no surgery here.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from modelsurgery.errors import SurgeryError, SurgeryWarning

#: all logs and progress go to stderr; stdout is for results (and the single --json object).
#: No emoji codes (``:b:`` in a name stays text) and no automatic highlighting of file-supplied text.
err_console = Console(stderr=True, emoji=False, highlight=False)
out_console = Console(emoji=False, highlight=False)

DEBUG_ENV = "MODELSURGERY_DEBUG"

# C0/C1 control characters, DEL, and lone surrogates (from undecodable file names) cannot be printed
# as they are: shown as escapes, so a name cannot clear the screen, forge a line or crash the encoder
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def plain(text: object) -> str:
    """Text from a file or a user with control characters, line breaks and lone surrogates shown as
    escapes (``\\x1b``, ``\\n``): safe to print as one line, without markup interpretation."""
    return _UNPRINTABLE.sub(_visible, str(text))


def safe(text: object) -> str:
    """Text from a file or a user, made safe to embed in rich markup: ``plain`` plus escaped markup
    (``[bold]`` prints as written). Use it for every name, path, key or message a file or user supplied."""
    return escape(plain(text))


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {safe(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {safe(message)}", soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, SurgeryWarning):
        warn(str(message))
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def handle_sigterm() -> None:
    """Treat SIGTERM like SIGINT (temporaries removed, nothing half-written); the command-line entry
    point calls it, the library never does."""
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn SurgeryError (and OS errors: missing files, full disk, read-only folder) into one line on
    stderr and a non-zero exit; SurgeryWarnings into ``warning:`` lines."""
    debug = debug or bool(os.environ.get(DEBUG_ENV))
    with warnings.catch_warnings():
        warnings.simplefilter("always", SurgeryWarning)
        warnings.showwarning = _show_warning
        try:
            yield
        except SurgeryError as e:
            if debug:
                raise
            fail(str(e))
        except OSError as e:
            if debug:
                raise
            where = e.filename if e.filename is not None else "error"
            fail(f"{where}: {e.strerror or e}; nothing was written")
        except RecursionError:
            if debug:
                raise
            fail("input nested too deeply to process; nothing was written")
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            fail(f"{what}; nothing was written", code=143 if isinstance(e, Terminated) else 130)


def emit_json(obj: dict) -> None:
    """The one JSON object a --json command prints on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


ProgressCallback = Callable[[str, int, int, dict], None]


@contextmanager
def progress_bar(quiet: bool = False) -> Iterator[ProgressCallback]:
    """A callback ``(task, done, total, info)`` for operations: a rich bar with rate and ETA on stderr when it
    is a terminal, one plain line per task every 10 % or 30 s when it is not (CI logs), nothing when ``quiet``;
    inside a recipe step, the recipe's own callback (``progress.reporting_to``)."""
    from modelsurgery.cli.progress import outer_progress, progress_display

    outer = outer_progress()
    if outer is not None:  # a recipe step: its display (quiet or not as `surgery run` was asked) shows it
        yield outer
        return
    with progress_display(err_console, plain, quiet) as update:
        yield update


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def parse_float_list(text: str | None, what: str) -> list[float] | None:
    """Comma-separated finite numbers (NaN and Inf are refused; so is an empty entry, '0.5,,0.5', which
    would otherwise drop a value the user meant to give)."""
    if text is None:
        return None
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise SurgeryError(f"{what} '{text}': expected comma-separated numbers") from None
    for v in values:
        check_finite_option(v, what)
    return values


# ----- option validation at the CLI boundary -------------------------------------------------------
def check_finite_option(value: float | None, flag: str) -> float | None:
    """Refuse NaN and Inf; None (option not given) passes."""
    if value is not None and not math.isfinite(value):
        raise SurgeryError(f"{flag} {value}: must be a finite number")
    return value


def check_range(value: float | None, flag: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | None:
    """Refuse a value outside [low, high] (open ends with ``low_open``/``high_open``), NaN/Inf, and a
    non-integer when ``integer``; the message states the allowed range. None (not given) passes."""
    if value is None:
        return None
    check_finite_option(value, flag)
    lo = "" if low is None else ("(" if low_open else "[") + _number(low)
    hi = "" if high is None else _number(high) + (")" if high_open else "]")
    allowed = (f"{lo}, {hi}" if low is not None and high is not None else
               (f">{'' if low_open else '='} {_number(low)}" if low is not None
                else f"<{'' if high_open else '='} {_number(high)}"))
    bad = ((low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high))
           or (integer and value != int(value)))
    if bad:
        kind = "an integer " if integer else ""
        raise SurgeryError(f"{flag} {_number(value)}: must be {kind}in {allowed}" if low is not None and
                           high is not None else f"{flag} {_number(value)}: must be {kind}{allowed}")
    return value


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_choice(value: str | None, flag: str, choices) -> str | None:
    if value is not None and value not in choices:
        raise SurgeryError(f"{flag} {value}: expected one of {', '.join(map(str, choices))}")
    return value


def check_device(value: str | None, flag: str = "--device") -> str | None:
    """A torch device this machine has, 'auto' resolved (``modelsurgery.devices.resolve_device``)."""
    from modelsurgery.devices import resolve_device

    return resolve_device(value, flag)
