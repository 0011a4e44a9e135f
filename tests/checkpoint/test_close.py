"""Checkpoint.close unmaps the files read so far; later reads open them again."""

import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint


def test_reads_after_close(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "m.safetensors")
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    assert torch.equal(ckpt.get("a"), tensors["a"])
    ckpt.close()
    assert not ckpt._handles
    assert torch.equal(ckpt.get("b"), tensors["b"]) and torch.equal(ckpt.get("a"), tensors["a"])
