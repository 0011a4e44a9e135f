"""Lazy reading: opening and inspecting a checkpoint reads its header, never its data.

The test file declares a 4 GiB tensor in a sparse file: its data pages exist nowhere, so any
implementation that reads or copies the data needs seconds and gigabytes, and the test fails on
time and on peak memory."""

from __future__ import annotations

import json
import resource
import struct
import time

import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.ops.inspect import inspect_checkpoint

BIG = 1 << 30  # float32 elements: 4 GiB


def _sparse_checkpoint(path):
    header = {
        "__metadata__": {"format": "pt"},
        "big.weight": {"dtype": "F32", "shape": [BIG // 1024, 1024], "data_offsets": [0, 4 * BIG]},
        "small.bias": {"dtype": "F32", "shape": [4], "data_offsets": [4 * BIG, 4 * BIG + 16]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + 4 * BIG)  # a hole: no data pages written
        f.seek(8 + len(raw) + 4 * BIG)
        f.write(struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    return path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_open_and_inspect_read_only_the_header(tmp_path):
    path = _sparse_checkpoint(tmp_path / "huge.safetensors")
    st = path.stat()
    if st.st_blocks * 512 > 64 << 20:
        pytest.skip("this filesystem does not keep sparse files sparse")
    before = _peak_rss_mb()
    start = time.perf_counter()
    ckpt = Checkpoint.open(path)
    assert ckpt.shape("big.weight") == (BIG // 1024, 1024)
    assert ckpt.info("big.weight").nbytes == 4 * BIG
    assert ckpt.num_parameters == BIG + 4
    report = inspect_checkpoint(path).to_dict()
    assert report["num_parameters"] == BIG + 4 and report["num_bytes"] == 4 * BIG + 16
    # one small tensor from the same file: memory-mapped, the 4 GiB neighbour stays untouched
    assert torch.equal(ckpt.get("small.bias"), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"inspecting took {elapsed:.2f}s: the data was read"
    assert _peak_rss_mb() - before < 512, "peak memory grew by more than 512 MB: the data was loaded"


def test_get_is_memory_mapped_not_copied(tmp_path):
    path = _sparse_checkpoint(tmp_path / "huge.safetensors")
    ckpt = Checkpoint.open(path)
    before = _peak_rss_mb()
    big = ckpt.get("big.weight")
    assert big.shape == (BIG // 1024, 1024)
    assert big[123, :5].tolist() == [0.0] * 5  # reading one row touches one page
    assert _peak_rss_mb() - before < 512
