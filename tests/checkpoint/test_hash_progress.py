"""The writer's "hash" task: when the inputs' SHA-256 is still being computed as the last tensor is written,
the progress callback hears the bytes hashed of the sources' total until the digests are in; nothing when
they are done already. Real hashing of a real file: a sparse 256 MiB source (no disk, no time to write)
takes SHA-256 0.1-1 s, while the tiny output is written in milliseconds. The digest the
output records is checked against hashlib."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

import torch
from rich.console import Console
from safetensors import safe_open

from modelsurgery.checkpoint import Provenance, digests, plan_tensor, write_checkpoint
from modelsurgery.cli.common import plain
from modelsurgery.cli.progress import PlainLines
from tests.progress_record import Recorder

BIG = 256 << 20


def _sparse(path, size: int = BIG):
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: reads as zeros, written in no time
    return path


def _zeros_sha256(size: int) -> str:
    h, block = hashlib.sha256(), bytes(1 << 20)
    for _ in range(size >> 20):
        h.update(block)
    return h.hexdigest()


def _recorded(out) -> list[dict]:
    with safe_open(str(out), framework="pt") as f:
        return json.loads(f.metadata()["modelsurgery"])["sources"]


def _tiny():
    return [plan_tensor(f"w{i}", torch.full((4, 4), float(i))) for i in range(3)]


def test_a_write_that_ends_before_the_hashing_reports_the_bytes_hashed(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "REPORT_EVERY", 0.01)  # reports within the hashing on a fast SHA-256 too
    big = _sparse(tmp_path / "big.bin")
    rec = Recorder()
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, _tiny(), provenance=Provenance("test", {}, [big]), progress=rec)
    done = rec.finished("hash", BIG)  # the sources' bytes: one total, never backwards, ends there
    assert done[0] < BIG  # still hashing when the tensors were written
    assert any(0 < d < BIG for d in done), done  # and heard while it ran, not only at the ends
    tasks = [task for task, *_ in rec.calls]
    assert tasks.index("hash") > len(tasks) - 1 - tasks[::-1].index("write")  # after the last tensor
    assert {info.get("unit") for task, _, _, info in rec.calls if task == "hash"} == {"bytes"}
    assert _recorded(out) == [{"file": str(big), "sha256": _zeros_sha256(BIG)}]


def test_no_hash_task_when_the_digests_are_done(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    past = time.time_ns() - 10 * 10**9
    os.utime(src, ns=(past, past))  # not racy: its digest is remembered
    expected = hashlib.sha256(src.read_bytes()).hexdigest()
    assert digests.file_digest(src) == expected
    rec = Recorder()
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, _tiny(), provenance=Provenance("test", {}, [src]), progress=rec)
    assert set(rec.tasks()) == {"write"}
    assert _recorded(out)[0]["sha256"] == expected


def test_a_pt_output_waits_for_no_digest(tmp_path):
    """A .pt file has no metadata to record digests in: the writer neither waits for them nor reports a hash."""
    big = _sparse(tmp_path / "big.bin")
    rec = Recorder()
    write_checkpoint(tmp_path / "out.pt", _tiny(), provenance=Provenance("test", {}, [big]), progress=rec)
    assert set(rec.tasks()) == {"write"}
    assert sorted(torch.load(tmp_path / "out.pt")) == ["w0", "w1", "w2"]


def test_plain_lines_show_bytes_as_sizes():
    buf = io.StringIO()
    clock = iter([0.0, 2.0, 5.0])
    lines = PlainLines(Console(file=buf, width=200), plain, clock=lambda: next(clock))
    total = 4_300_000_000
    for done in (0, 1_200_000_000, total):
        lines("hash", done, total, {"unit": "bytes"})
    # 1.2 GB in 2 s: 600 MB/s; 3.1 GB left at that rate: 5.17 s
    assert buf.getvalue().splitlines() == [
        "hash: 1.2/4.3 GB (28%), 600 MB/s, elapsed 0:00:02, ETA 0:00:05",
        "hash: 4.3/4.3 GB (100%), 860 MB/s, elapsed 0:00:05",
    ]


def test_the_bar_shows_bytes_as_sizes(monkeypatch):
    from modelsurgery.cli import common

    buf = io.StringIO()
    monkeypatch.setattr(common, "err_console", Console(file=buf, force_terminal=True, width=200, emoji=False))
    with common.progress_bar() as progress:
        progress("hash", 1_500_000, 3_000_000, {"unit": "bytes"})
        progress("write", 2, 5, {})
    text = buf.getvalue()
    assert "1.5/3 MB" in text and "2/5" in text and "unit=" not in text
