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
sets glibc's mmap threshold (M_MMAP_THRESHOLD), so that blocks of at least that size get their own
mapping, returned to the OS when freed; it also stops glibc from raising the threshold at run time.
The setting lasts for the process. Mapping costs page faults on every large allocation: block
reconstruction of BERT runs about a fifth slower with 1 MB, for a third less working memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@cache
def _libc_function(name: str, argtypes: list):
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
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


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Give allocations of at least ``threshold`` bytes their own mapping for the rest of the
    process; False where the C library cannot."""
    mallopt = _libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1
