"""SHA-256 of input files, for provenance and recipe records: hashed in the background, on as many
threads as there are files and CPUs, and each file once per process.

SHA-256 runs at about 1 GB/s on one core, slower than a copy in the page cache: hashing the shards
of a checkpoint one after another made it the slowest part of every streaming write (a 15 GB model
is 15 s of hashing). Shards are hashed side by side instead (hashlib lets go of the GIL), and the
CLI starts hashing the checkpoints a writing command names as the command starts (``start``), so
that it runs on an idle core while Python imports torch (about a second, on one core).

A digest is remembered under the file's identity (resolved path, device, inode, size and mtime), so
a file changed in between is hashed again; as git's index does with "racily clean" entries, a file
modified less than ``RACY_NS`` before its hashing began is not remembered (a change within the
clock's granularity could keep its size and mtime). No torch here: the CLI uses this module before
it imports the command.

A write that ends before the hashing waits for it; ``results`` then reports the bytes hashed of the
total (each job counts what its thread has read), so a multi-GB input does not leave a finished bar
and nothing moving.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as StillRunning
from pathlib import Path

#: bytes read and hashed at a time (into one reused buffer per thread; hashlib is as fast from 1 MB up)
CHUNK = 1 << 22
#: the most files hashed side by side (a disk gives no more beyond; memory: THREADS x CHUNK)
THREADS = 8
#: a file modified this recently (nanoseconds before its hashing began) is hashed again when next asked
RACY_NS = 2_000_000_000
#: seconds between two reports of the bytes hashed while a write waits for its digests
REPORT_EVERY = 0.1


class Hashing(Future):
    """A file's digest, done or being computed (a result of None: none to give, hash it yourself), and
    how many of its ``size`` bytes are hashed so far (written by the hashing thread only)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.hashed = size, 0


_lock = threading.Lock()
#: identity -> its digest's job
_known: dict[tuple, Hashing] = {}
#: the started files not hashed yet, each with the event that stops its hashing (``only``)
_unfinished: dict[tuple, threading.Event] = {}


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _settled(key: tuple, began_ns: int) -> bool:
    """Whether a digest of the file ``key`` names, hashed from ``began_ns``, may be remembered: its
    last change lies more than ``RACY_NS`` before (git's racily-clean rule)."""
    return began_ns - key[-1] > RACY_NS


def _sha256(path: Path, stop: threading.Event | None = None, job: Hashing | None = None) -> str:
    """The hex SHA-256 of the file's bytes; "" when ``stop`` is set before the end. ``job`` counts the
    bytes hashed."""
    h = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if stop is not None and stop.is_set():
                return ""
            h.update(view[:n])
            if job is not None:
                job.hashed += n
    return h.hexdigest()


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start(paths: Iterable[Path]) -> list[Hashing | None]:
    """Start hashing ``paths`` in daemon threads (one per file, as many as there are CPUs, up to
    ``THREADS``; daemons, so that a command that fails exits at once instead of waiting for them); one
    job per path: the one already known for a file hashed or started before, None for a path that
    cannot be read (``result`` then meets the error)."""
    jobs: list[Hashing | None] = []
    queue: deque = deque()
    with _lock:
        for path in map(Path, paths):
            try:
                key = _identity(path)
            except OSError:
                jobs.append(None)
                continue
            if key not in _known:
                _known[key] = Hashing(key[3])
                _unfinished[key] = threading.Event()
                queue.append((path, key, _known[key], _unfinished[key]))
            jobs.append(_known[key])
    for _ in range(min(len(queue), _cpus(), THREADS)):
        threading.Thread(target=_hash_queue, args=(queue,), name="sha256", daemon=True).start()
    return jobs


def _hash_queue(queue: deque) -> None:
    while True:
        try:
            path, key, job, stop = queue.popleft()
        except IndexError:
            return
        began = time.time_ns()
        try:
            digest = _sha256(path, stop, job) or None  # "": stopped (``only``)
            if _identity(path) != key:  # changed while hashed
                digest = None
        except OSError:  # gone or unreadable
            digest = None
        with _lock:
            _unfinished.pop(key, None)
            if digest is None or not _settled(key, began):  # a racy file's digest serves who waits now
                _known.pop(key, None)
        job.set_result(digest)


def result(job: Hashing | None, path: Path, stop: threading.Event | None = None) -> str:
    """The digest ``job`` (from ``start``) computes for ``path``; when it has none to give (the file
    changed, was unreadable or was stopped), ``file_digest``'s. "" once ``stop`` is set."""
    while job is not None:
        try:
            digest = job.result(timeout=0.05)
        except StillRunning:
            if stop is not None and stop.is_set():
                return ""
            continue
        if digest is not None:
            return digest
        break
    return file_digest(path, stop)


def file_digest(path: Path, stop: threading.Event | None = None) -> str:
    """The hex SHA-256 of ``path``: remembered, or waited for if being hashed, or hashed now on this
    thread. "" once ``stop`` is set (a write given up: the digest is not needed)."""
    path = Path(path)
    key = _identity(path)
    with _lock:
        job = _known.get(key)
    if job is not None:
        return result(job, path, stop)
    began = time.time_ns()
    digest = _sha256(path, stop)
    if digest and _settled(key, began) and _identity(path) == key:
        done = Hashing(key[3])
        done.set_result(digest)
        with _lock:
            _known.setdefault(key, done)
    return digest


def results(jobs: Sequence[Hashing | None], paths: Sequence[Path], stop: threading.Event | None = None,
            progress: Callable[[int, int], None] | None = None) -> list[str]:
    """``result`` of each job, in order. While some are still being hashed, ``progress(bytes hashed,
    bytes in all)`` hears how far they are, every ``REPORT_EVERY`` s and once at the end; nothing when
    every job is done already."""
    running = [j for j in jobs if j is not None and not j.done()]
    if progress is None or not running:
        return [result(j, p, stop) for j, p in zip(jobs, paths)]
    known = [j for j in jobs if j is not None]
    total = sum(j.size for j in known)
    while running and not (stop is not None and stop.is_set()):
        progress(sum(j.size if j.done() else min(j.hashed, j.size) for j in known), total)
        running = list(wait(running, timeout=REPORT_EVERY, return_when=FIRST_COMPLETED).not_done)
    values = [result(j, p, stop) for j, p in zip(jobs, paths)]
    if not running:
        progress(total, total)
    return values


def only(paths: Iterable[Path]) -> None:
    """Stop hashing every started file but ``paths``: the CLI starts hashing each checkpoint its
    command line names, and the writer, which knows its sources, stops the others."""
    wanted = set()
    for path in map(Path, paths):
        try:
            wanted.add(_identity(path))
        except OSError:
            continue
    with _lock:
        for key, stop in _unfinished.items():
            if key not in wanted:
                stop.set()
