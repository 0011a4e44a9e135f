"""Keeping the C allocator from holding freed memory (glibc; elsewhere these do nothing).

PyTorch's CPU tensors come from the C allocator. glibc's malloc serves tensors below its mmap
threshold (raised at run time up to 32 MB) from its heap, and keeps the pages of freed chunks
there: when long-lived tensors (quantization codes, optimizer state) sit between short-lived ones,
the holes they leave stay resident, and a long reconstruction's resident memory creeps upward
although little of it is live. ``release_freed_memory`` asks glibc to return those pages
(``malloc_trim(0)``, which also releases free pages inside the heap, not only at its top). The
next allocations fault the pages back in, a few milliseconds for tens of MB.

Trimming between steps cannot help inside one: a training step's own transients (activations kept
for backward, gradients, temporaries) fragment the heap before it ends. ``map_large_allocations``
is a context manager that sets glibc's mmap threshold (M_MMAP_THRESHOLD) while it is open, so that
blocks of at least that size get their own mapping, returned to the OS when freed. Mapping costs
page faults on every large allocation: block reconstruction of BERT runs about a fifth slower with
1 MB, for a third less working memory.

A library call leaves the process as it found it, as far as glibc allows: on leaving, the threshold
goes back to what it was before entering when this module set it, else to glibc's start value
(128 KiB, or the ``MALLOC_MMAP_THRESHOLD_`` / ``glibc.malloc.mmap_threshold`` tunable when the
environment sets one). glibc can neither report its threshold nor turn its run-time raising back on
once ``mallopt`` has set it, so after the first use the threshold stays fixed at that value.
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
#: glibc's DEFAULT_MMAP_THRESHOLD_MIN, the threshold a process starts with
GLIBC_START_THRESHOLD = 128 * 1024
#: the threshold this module set last (None: never set, glibc's own)
_current: int | None = None


@cache
def _libc_function(name: str, argtypes: list):
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them (find_library forks ldconfig)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """Return the C allocator's free pages to the OS; False where the C library cannot."""
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,))
    if trim is None:
        return False
    trim(0)
    return True


def _start_threshold() -> int:
    """The threshold glibc started this process with (its default, or the environment's tunable)."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    for item in os.environ.get("GLIBC_TUNABLES", "").replace(":", " ").split():
        if item.startswith("glibc.malloc.mmap_threshold="):
            value = item.split("=", 1)[1]
    try:
        return int(value, 0) if value else GLIBC_START_THRESHOLD
    except ValueError:
        return GLIBC_START_THRESHOLD


def _set_threshold(threshold: int) -> bool:
    global _current
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        return False
    _current = threshold
    return True


@contextmanager
def large_allocations_mapped(threshold: int = 1 << 20, enabled: bool = True) -> Iterator[bool]:
    """While open, allocations of at least ``threshold`` bytes get their own mapping (yields False
    where the C library cannot, or when not ``enabled``); the previous threshold is restored on leaving."""
    before = _current if _current is not None else _start_threshold()
    done = enabled and _set_threshold(threshold)
    try:
        yield done
    finally:
        if done:
            _set_threshold(before)


def file_backed_empty(shape: tuple[int, ...], dtype, folder: Path | None = None, prefix: str = "modelsurgery-"):
    """An uninitialised torch tensor in a shared mapping of an unlinked temporary file in ``folder`` (None:
    ``tempfile``'s, $TMPDIR): its pages are the page cache's to write back and evict, not anonymous memory,
    and the file goes with the tensor. The file's blocks are reserved first (``posix_fallocate``), so a
    disk without room raises OSError here instead of a SIGBUS when a mapped page is written."""
    import torch  # not at import time: the CLI imports this module before torch

    numel = math.prod(shape)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=prefix, suffix=".bin") as f:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, nbytes)
        return torch.from_file(f.name, shared=True, size=numel, dtype=dtype).view(shape)


def row_blocks(start: int, end: int, row_size: int, elements: int) -> list[tuple[int, int]]:
    """Rows ``start:end`` of a matrix whose rows hold ``row_size`` elements, in consecutive (start, stop) blocks of
    at most ``elements`` elements (at least one row): the pieces an operation widens or converts at a time, so that
    its temporaries stay a block's size instead of the matrix's."""
    step = max(1, elements // max(row_size, 1))
    return [(i, min(i + step, end)) for i in range(start, end, step)]
