"""Input digests (``checkpoint.digests``): hashed side by side in the background and once per
process, checked against hashlib over the whole file; a changed file (even one changed within the
clock's granularity, git's "racily clean" case) is hashed again; the CLI starts hashing the
checkpoints a writing command names, never its output."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from safetensors import safe_open

from modelsurgery.checkpoint import digests, plan_tensor, write_checkpoint
from modelsurgery.checkpoint.store import weight_files
from modelsurgery.cli.app import prefetch_input_digests


def _settled_file(path, data: bytes, age_s: float = 10.0):
    """``data`` written to ``path`` with an mtime ``age_s`` in the past (not racy)."""
    path.write_bytes(data)
    past = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(past, past))
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_digest_is_hashlib_over_the_whole_file_in_any_chunking(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "CHUNK", 7)  # many reads, a short last one
    f = _settled_file(tmp_path / "f.bin", os.urandom(1000))
    assert digests.file_digest(f) == _sha(f)
    empty = _settled_file(tmp_path / "empty.bin", b"")
    assert digests.file_digest(empty) == hashlib.sha256(b"").hexdigest()


def test_started_files_are_hashed_side_by_side_and_shared(tmp_path):
    files = [_settled_file(tmp_path / f"s{i}.bin", os.urandom(300_000 + i)) for i in range(5)]
    jobs = digests.start(files)
    assert [digests.result(j, f) for j, f in zip(jobs, files)] == [_sha(f) for f in files]
    assert digests.start(files[:1])[0] is jobs[0]  # known: not hashed again
    assert digests.file_digest(files[3]) == _sha(files[3])


def test_a_changed_file_is_hashed_again(tmp_path):
    f = _settled_file(tmp_path / "f.bin", b"a" * 4096, age_s=20)
    assert digests.file_digest(f) == _sha(f)
    _settled_file(f, b"b" * 4096, age_s=10)  # same size, another mtime
    assert digests.file_digest(f) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_a_racy_file_is_not_remembered(tmp_path, monkeypatch):
    """A file hashed within RACY_NS of its last change may change again within the mtime's
    granularity, keeping its size and mtime: its digest must not be remembered (git's rule)."""
    monkeypatch.setattr(digests, "RACY_NS", 600 * 10**9)  # however slow the machine, the hash comes within
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 4096)
    mtime = os.stat(f).st_mtime_ns
    assert digests.file_digest(f) == hashlib.sha256(b"a" * 4096).hexdigest()
    job = digests.start([f])[0]
    assert digests.result(job, f) == hashlib.sha256(b"a" * 4096).hexdigest()
    f.write_bytes(b"b" * 4096)
    os.utime(f, ns=(mtime, mtime))  # the same size and mtime: only the racy rule tells them apart
    assert digests.file_digest(f) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_stopped_hashing_still_gives_the_right_digest(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "CHUNK", 4096)  # slow enough to be stopped midway, most runs
    files = [_settled_file(tmp_path / f"s{i}.bin", os.urandom(4 << 20)) for i in range(2)]
    jobs = digests.start(files)
    digests.only(files[:1])  # the second is not wanted: stopped, or done already
    assert [digests.result(j, f) for j, f in zip(jobs, files)] == [_sha(f) for f in files]


def test_a_stopped_wait_returns_at_once(tmp_path):
    f = _settled_file(tmp_path / "f.bin", b"x")
    stop = threading.Event()
    stop.set()
    assert digests.result(Future(), f, stop) == ""  # a job that never finishes


def test_weight_files_are_what_the_checkpoint_reads(tmp_path):
    tensors = [plan_tensor(f"l{i}.weight", torch.randn(64, 64)) for i in range(4)]
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    write_checkpoint(sharded, tensors, max_shard_size=40_000)
    write_checkpoint(single, tensors)
    from modelsurgery.checkpoint import Checkpoint

    for folder in (sharded, single):
        assert weight_files(folder) == Checkpoint.open(folder).source_files
    assert len(weight_files(sharded)) > 1
    assert weight_files(sharded / "model.safetensors.index.json") == weight_files(sharded)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for other in (tmp_path / "notes.txt", tmp_path / "missing", "org/not-cached", "4", tmp_path):
        assert weight_files(other) == []


def test_the_cli_starts_hashing_the_inputs_not_the_output(tmp_path, monkeypatch):
    tensors = [plan_tensor("w", torch.randn(8, 8))]
    model, out = tmp_path / "model", tmp_path / "out"
    write_checkpoint(model, tensors)
    write_checkpoint(out, tensors)  # an existing output (replaced with --force): not hashed
    monkeypatch.chdir(tmp_path)
    args = ["model", "-o", "out", "--bits", "4", "--force"]
    assert prefetch_input_digests("quantize", args) == weight_files("model")
    assert prefetch_input_digests("quantize", [*args, "--no-input-hash"]) == []
    assert prefetch_input_digests("inspect", ["model"]) == []  # records no digests
    monkeypatch.setenv("RANK", "1")  # a torchrun rank that writes nothing
    assert prefetch_input_digests("quantize", args) == []


@pytest.mark.parametrize("shards", [1, 3])
def test_provenance_of_a_cli_run_holds_the_inputs_sha256(tmp_path, fixtures_dir, shards):
    from typer.testing import CliRunner

    from modelsurgery.checkpoint import Checkpoint, plan_copy
    from modelsurgery.cli.app import app

    mlp = Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors")
    model = tmp_path / "model"
    write_checkpoint(model, [plan_copy(mlp, k) for k in mlp],
                     max_shard_size=mlp.nbytes // 2 if shards > 1 else 10**9)
    sources = weight_files(model)
    assert len(sources) == shards
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), "--method", "rtn", "--bits", "4"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        record = json.loads(f.metadata()["modelsurgery"])
    assert [s["sha256"] for s in record["sources"]] == [_sha(p) for p in sources]
