"""Sharded folders: written by us (read back by us and by transformers) and by transformers'
``save_pretrained(max_shard_size=...)`` (read by us)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modelsurgery.checkpoint import Checkpoint, plan_copy, plan_tensor, write_checkpoint
from modelsurgery.errors import SurgeryError
from tests.checkpoint.helpers import assert_same_tensors
from tests.hf_tiny import load_hf, save_tiny_llama


def _state(n: int = 10) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(16, 16, generator=g) for i in range(n)}  # 1024 bytes each
    state["tail"] = torch.randn(8, generator=g).to(torch.bfloat16)  # 16 bytes
    return state


def test_small_max_shard_size_writes_several_shards_and_index(tmp_path):
    state = _state()
    out = tmp_path / "sharded"
    report = write_checkpoint(out, [plan_tensor(k, v) for k, v in state.items()], max_shard_size="3KB")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    # 3000 bytes hold two 1024-byte tensors: 10 tensors -> 5 shards, the 16-byte tail joins the last
    assert [s.name for s in shards] == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for shard in shards:
        tensors = load_file(shard)  # each shard is a valid file for the reference reader
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 3000
        assert all(index["weight_map"][k] == shard.name for k in tensors)
    assert set(report.files) >= {out / s.name for s in shards}
    assert_same_tensors(Checkpoint.open(out).state_dict(), state)
    assert_same_tensors(Checkpoint.open(out / "model.safetensors.index.json").state_dict(), state)


def test_tensor_bigger_than_max_shard_gets_its_own_shard(tmp_path):
    state = {"small": torch.ones(4), "big": torch.randn(64, 64), "small2": torch.zeros(4)}
    out = tmp_path / "big"
    write_checkpoint(out, [plan_tensor(k, v) for k, v in state.items()], max_shard_size=1000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert_same_tensors(Checkpoint.open(out).state_dict(), state)


def test_single_file_output_refuses_to_exceed_max_shard(tmp_path):
    out = tmp_path / "one.safetensors"
    with pytest.raises(SurgeryError, match="max-shard-size"):
        write_checkpoint(out, [plan_tensor(k, v) for k, v in _state().items()], max_shard_size="2KB")
    assert list(tmp_path.iterdir()) == []


def test_reads_transformers_sharded_save_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    src = save_tiny_llama(tmp_path / "hf_ref")
    model = LlamaForCausalLM.from_pretrained(src).eval()
    sharded = tmp_path / "hf_sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint.open(sharded)
    assert isinstance(LlamaConfig(**ckpt.config), LlamaConfig) and ckpt.config["num_hidden_layers"] == 3
    want = {}
    for s in shards:
        want.update(load_file(s))
    assert_same_tensors(ckpt.state_dict(), want)
    assert_same_tensors(ckpt.state_dict(), load_file(src / "model.safetensors"))


def test_transformers_loads_our_sharded_output(tmp_path):
    src = save_tiny_llama(tmp_path / "src")
    ckpt = Checkpoint.open(src)
    out = tmp_path / "resharded"
    write_checkpoint(out, [plan_copy(ckpt, k) for k in ckpt], config=ckpt.config,
                     extra_files=ckpt.extra_files(), max_shard_size="30KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_hf(out)(ids).logits, load_hf(src)(ids).logits)


def test_a_folder_with_both_formats_is_read_as_transformers_loads_it(tmp_path):
    """Hub repositories often keep their old .bin shards beside model.safetensors; transformers'
    from_pretrained prefers model.safetensors, then its index, then pytorch_model.bin, then its index.
    Each folder here holds two files of different weights: what we read must be what transformers runs."""
    src = save_tiny_llama(tmp_path / "a", seed=0)
    other = {k: v + 1 for k, v in load_file(src / "model.safetensors").items()}  # another model's weights
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(0))

    def bin_shards(folder):
        names = sorted(other)
        parts = {"pytorch_model-00001-of-00002.bin": names[:5], "pytorch_model-00002-of-00002.bin": names[5:]}
        for file, keys in parts.items():
            torch.save({k: other[k] for k in keys}, folder / file)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: f for f, keys in parts.items() for k in keys}}))

    both_st = tmp_path / "safetensors_and_bin_shards"
    both_st.mkdir()
    for f in ("config.json", "model.safetensors"):
        (both_st / f).write_bytes((src / f).read_bytes())
    bin_shards(both_st)
    bin_and_shards = tmp_path / "bin_and_bin_shards"  # pytorch_model.bin wins over its own index
    bin_and_shards.mkdir()
    (bin_and_shards / "config.json").write_bytes((src / "config.json").read_bytes())
    torch.save(load_file(src / "model.safetensors"), bin_and_shards / "pytorch_model.bin")
    bin_shards(bin_and_shards)
    for folder in (both_st, bin_and_shards):
        ours = Checkpoint.open(folder).state_dict()
        assert_same_tensors(ours, load_file(src / "model.safetensors"))  # the first file, not the shards
        with torch.no_grad():  # transformers runs src's weights from this folder too (the shards are +1 away)
            assert torch.equal(load_hf(folder)(ids).logits, load_hf(src)(ids).logits)
