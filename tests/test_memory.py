"""The allocator helpers: trimming returns the pages of freed heap chunks to the OS (glibc)."""

import platform

import pytest
import torch

from modelsurgery.memory import map_large_allocations, release_freed_memory

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not glibc, reason="malloc_trim is glibc's")
def test_trim_returns_the_holes_left_between_live_tensors():
    release_freed_memory()
    # 64 KiB tensors come from the heap; freeing every other one leaves holes that glibc keeps
    chunks = [torch.ones(16384) for _ in range(2000)]  # 125 MiB
    del chunks[::2]
    held = anon_bytes()
    assert release_freed_memory() is True
    assert held - anon_bytes() > 40 * 2**20  # most of the ~62 MiB of holes
    assert sum(int(c[0]) for c in chunks) == 1000  # the live ones are untouched


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_large_allocations_can_be_mapped():
    assert map_large_allocations(1 << 20) is True
