"""The allocator helpers: trimming returns the pages of freed heap chunks to the OS, and the mmap
threshold is set only inside its context manager (glibc)."""

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modelsurgery.memory import release_freed_memory

ROOT = Path(__file__).resolve().parents[1]

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


PROBE = """
import ctypes, json
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped(nbytes):
    # glibc's chunk layout: the size field is the word before the pointer; bit 2 is IS_MMAPPED
    p = libc.malloc(nbytes)
    try:
        return bool(ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2)
    finally:
        libc.free(p)
        libc.malloc_trim(0)  # a heap chunk freed at the top would serve the next probe without a mapping
"""


def probe(body: str) -> dict:
    """Run ``body`` after PROBE in a fresh interpreter (whose heap has no large free chunks that
    would serve a probe without a mapping); it prints one JSON object."""
    proc = subprocess.run([sys.executable, "-c", PROBE + textwrap.dedent(body)], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_threshold_is_set_inside_the_context_only():
    r = probe("""
        from modelsurgery.memory import large_allocations_mapped
        out = {"start": [mapped(1 << 20), mapped(8 << 20)]}
        with large_allocations_mapped(4 << 20) as done:
            out["inside"] = [done, mapped(1 << 20), mapped(8 << 20)]
            with large_allocations_mapped(16 << 20):
                out["nested"] = mapped(8 << 20)
            out["outer again"] = mapped(8 << 20)
        out["after"] = [mapped(1 << 20), mapped(8 << 20)]
        with large_allocations_mapped(4 << 20, enabled=False) as done:
            out["disabled"] = [done, mapped(1 << 20)]
        print(json.dumps(out))
    """)
    assert r["start"] == [True, True]  # glibc starts at 128 KiB
    assert r["inside"] == [True, False, True]
    assert r["nested"] is False and r["outer again"] is True
    assert r["after"] == [True, True]  # back to glibc's start value
    assert r["disabled"] == [False, True]


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_calibration_leaves_the_threshold_as_it_found_it():
    """Block reconstruction maps allocations from 1 MB while it trains (``--low-memory``), and gives
    the caller's threshold back when it returns."""
    r = probe("""
        from modelsurgery.checkpoint import Checkpoint
        from modelsurgery.families import detect_family
        from modelsurgery.memory import large_allocations_mapped
        from modelsurgery.ops.quantize import QuantScheme, method_by_name
        from modelsurgery.ops.quantize.operation import read_data
        from modelsurgery.ops.quantize.reconstruct import ReconstructOptions, find_targets, reconstruct_blocks

        family = detect_family(Checkpoint.open("fixtures/digits/mlp_seed0.safetensors"))
        model = family.build_module()
        data = read_data("fixtures/data/digits_calib.safetensors", family, None, 32, None, model)
        with large_allocations_mapped(16 << 20):
            reconstruct_blocks(model, find_targets(model), list(data.batches(32, family)), QuantScheme(3),
                               method_by_name("adaround"), ReconstructOptions(settings={"steps": 2}))
            print(json.dumps({"after": [mapped(8 << 20), mapped(32 << 20)]}))
    """)
    assert r["after"] == [False, True]  # 16 MiB again, not the calibration's 1 MB
