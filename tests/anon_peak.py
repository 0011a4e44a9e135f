"""The peak anonymous memory (RssAnon) a call adds, polled from a thread: for tests that run an operation in a child
process (a fresh heap, the repository root as its working directory) and bound how much anonymous memory it holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def anon() -> int:
    """This process's RssAnon in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def anon_peak_during(fn: Callable[[], object], every: float = 0.002) -> int:
    """The highest RssAnon seen while ``fn()`` runs (polled every ``every`` s), beyond RssAnon before it, in bytes."""
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(every)

    start = anon()
    thread = threading.Thread(target=poll)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], anon()) - start
