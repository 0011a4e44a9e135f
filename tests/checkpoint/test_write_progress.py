"""The writer's "write" task: the operations' progress callback hears one report per tensor written,
from 0 to the number of tensors the output holds (counted by safetensors' own reader), whatever the
output (one file, shards, .pt) and however a tensor is written (produced or copied byte for byte)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint, plan_copy, plan_tensor, write_checkpoint
from tests.progress_record import Recorder


def _source(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(64, 64, generator=g) for i in range(5)}
    save_file(state, tmp_path / "src.safetensors")
    return Checkpoint.open(tmp_path / "src.safetensors")


def _planned(ckpt):
    # three copied byte for byte (no tensor is produced for them), two produced when written
    return ([plan_copy(ckpt, n, raw=True) for n in ckpt.keys()[:3]]
            + [plan_tensor(n, ckpt.get(n) * 2) for n in ckpt.keys()[3:]])


def _tensors_in(files) -> int:
    n = 0
    for f in files:
        if f.name.endswith(".safetensors"):
            with safe_open(f, "pt") as s:
                n += len(list(s.keys()))
    return n


@pytest.mark.parametrize("out,shard", [("one.safetensors", "5GB"), ("folder", "5GB"), ("shards", "40KB")])
def test_write_counts_every_tensor_to_the_total(tmp_path, out, shard):
    ckpt = _source(tmp_path)
    rec = Recorder()
    report = write_checkpoint(tmp_path / out, _planned(ckpt), max_shard_size=shard, progress=rec)
    if shard == "40KB":
        assert len([f for f in report.files if f.name.endswith(".safetensors")]) > 1  # really sharded
    assert rec.finished("write", _tensors_in(report.files)) == [0, 1, 2, 3, 4, 5]


def test_pt_output_and_no_callback(tmp_path):
    ckpt = _source(tmp_path)
    rec = Recorder()
    write_checkpoint(tmp_path / "m.pt", _planned(ckpt), progress=rec)
    assert len(torch.load(tmp_path / "m.pt")) == 5
    assert rec.finished("write", 5) == [0, 1, 2, 3, 4, 5]
    write_checkpoint(tmp_path / "quiet.safetensors", _planned(ckpt))  # the callback is optional
