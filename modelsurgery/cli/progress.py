"""Progress display for people and for CI: a rich bar with rate and ETA on a terminal; one plain line per
task every 10 % or 30 s on a pipe, a file or a CI log (nothing with --quiet, nor in an in-process capture
without a file descriptor, such as a test runner's).

Operations call ``progress(task, done, total, info)``. ``info["state"] = "converged"`` (or any word) ends a
task early: the bar is completed and shows the word, the plain line says it, instead of a bar stuck at 6 %.
``info["message"]`` is a one-off line (such as quantize's time estimate), printed as it is above the bars
or among the plain lines, never a task of its own. ``info["unit"] = "bytes"`` counts bytes (the writer's
"hash" of its inputs): shown as sizes ("1.2/4.3 GB", "850 MB/s").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: plain lines: one per task at each 10 % step, and at least every 30 s while the task moves
PLAIN_STEPS, PLAIN_SECONDS = 10, 30.0

ProgressCallback = Callable[[str, int, int, dict], None]

#: the callback of a caller that runs commands inside its own display (``surgery run``'s steps): a command's
#: ``progress_bar`` reports there instead of opening a second display (rich allows one live display at a
#: time) or staying silent for the --json the step runs it with
_outer: ContextVar[ProgressCallback | None] = ContextVar("modelsurgery_outer_progress", default=None)


@contextmanager
def reporting_to(callback: ProgressCallback | None) -> Iterator[None]:
    """Commands run inside report their progress to ``callback`` (None: to their own display)."""
    token = _outer.set(callback)
    try:
        yield
    finally:
        _outer.reset(token)


def outer_progress() -> ProgressCallback | None:
    """The callback of an enclosing ``reporting_to``, if any."""
    return _outer.get()


def _info_text(info: dict | None, plain: Callable[[object], str]) -> str:
    return plain(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in (info or {}).items() if k not in ("state", "unit")))


def _in_bytes(info: dict | None) -> bool:
    return (info or {}).get("unit") == "bytes"


def _size_unit(n: float) -> tuple[int, str]:
    """The largest decimal byte unit ``n`` reaches, and its size in bytes."""
    for i, unit in enumerate(("B", "kB", "MB", "GB")):
        if abs(n) < 1000 ** (i + 1):
            return 1000**i, unit
    return 1000**4, "TB"


def _count(done: int, total: int, info: dict | None) -> str:
    """"done/total", or for bytes "1.2/4.3 GB" in the total's unit."""
    if not _in_bytes(info):
        return f"{done}/{total}"
    scale, unit = _size_unit(total)
    return f"{done / scale:.3g}/{total / scale:.3g} {unit}"


def _rate(done: int, seconds: float, info: dict | None = None) -> str:
    if done <= 0 or seconds <= 0:
        return ""
    per = done / seconds
    if _in_bytes(info):
        scale, unit = _size_unit(per)
        return f"{per / scale:.3g} {unit}/s"
    return f"{per:.3g}/s" if per >= 1 else f"{seconds / done:.3g} s each"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainLines:
    """``task done/total (pct) rate, elapsed, ETA, info`` lines on a console that is not a terminal."""

    def __init__(self, console: Console, plain: Callable[[object], str], clock: Callable[[], float] = time.monotonic):
        self.console, self.plain, self.clock = console, plain, clock
        self.started: dict[str, float] = {}
        self.last: dict[str, tuple[float, int]] = {}  # task -> (time printed, 10 % step printed)

    def __call__(self, task: str, done: int, total: int, info: dict | None = None) -> None:
        if (info or {}).get("message"):
            self.console.print(self.plain(info["message"]), markup=False, highlight=False, soft_wrap=True)
            return
        now = self.clock()
        start = self.started.setdefault(task, now)
        state = (info or {}).get("state")
        step = done * PLAIN_STEPS // total if total > 0 else 0
        printed_at, printed_step = self.last.get(task, (start, -1))
        if done <= 0 and not state:  # a task starting says nothing yet (its first tenth will)
            return
        if not (state or step > printed_step or done >= total or now - printed_at >= PLAIN_SECONDS):
            return
        self.last[task] = (now, step)
        elapsed = now - start
        parts = [_count(done, total, info) + (f" ({100 * done / total:.0f}%)" if total else "")]
        if state:
            parts.append(str(state))
        if rate := _rate(done, elapsed, info):
            parts.append(rate)
        parts.append(f"elapsed {_duration(elapsed)}")
        if not state and 0 < done < total and elapsed > 0:
            parts.append(f"ETA {_duration(elapsed / done * (total - done))}")
        if text := _info_text(info, self.plain):
            parts.append(text)
        self.console.print(f"{self.plain(task)}: {', '.join(parts)}", markup=False, highlight=False, soft_wrap=True)


def _is_os_stream(stream) -> bool:
    """A pipe, file or CI log (an OS file descriptor), not an in-process capture such as a test runner's."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
    return True


@contextmanager
def progress_display(console: Console, plain: Callable[[object], str], quiet: bool = False
                     ) -> Iterator[ProgressCallback]:
    """The callback operations report to: nothing when ``quiet``; plain lines when ``console`` is not a
    terminal; else a rich bar with done/total, rate, elapsed and remaining time."""
    if quiet:
        yield lambda task, done, total, info=None: None
        return
    if not console.is_terminal:
        yield PlainLines(console, plain) if _is_os_stream(console.file) else (lambda task, done, total, info=None: None)
        return
    with Progress(
        TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.fields[count]}", markup=False),
        TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}", markup=False), console=console, transient=True,
    ) as progress:
        tasks: dict[str, int] = {}
        started: dict[str, float] = {}

        def update(task: str, done: int, total: int, info: dict | None = None) -> None:
            if (info or {}).get("message"):
                progress.console.print(plain(info["message"]), markup=False, highlight=False)
                return
            now = time.monotonic()
            if task not in tasks:
                tasks[task] = progress.add_task(plain(task), total=total, info="", rate="", count="")
                started[task] = now
            state = (info or {}).get("state")
            text = _info_text(info, plain)
            if state:
                done, text = total, f"{plain(state)} {text}".strip()
            progress.update(tasks[task], completed=done, total=total, info=text, count=_count(done, total, info),
                            rate=_rate(done, now - started[task], info))

        yield update
