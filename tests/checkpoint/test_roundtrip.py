"""Round trips through every format we read and write, checked bit for bit against the reference
readers (safetensors' own loader, torch.load, transformers' from_pretrained)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelsurgery.checkpoint import Checkpoint, plan_copy, plan_tensor, write_checkpoint
from tests.checkpoint.helpers import assert_same_tensors, bits, sample_state
from tests.hf_tiny import load_hf, save_tiny_gpt2


def _plans(state):
    return [plan_tensor(k, v) for k, v in state.items()]


def test_safetensors_file_every_dtype_bit_exact(tmp_path):
    state = sample_state()
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, _plans(state))
    assert_same_tensors(load_file(out), state)  # the reference reader agrees with what we wrote
    ckpt = Checkpoint.open(out)
    assert_same_tensors(ckpt.state_dict(), state)
    for k, v in state.items():
        assert ckpt.info(k).dtype == v.dtype and ckpt.shape(k) == tuple(v.shape)
        assert ckpt.info(k).nbytes == v.numel() * v.element_size()


def test_reads_reference_writer_with_metadata(tmp_path):
    state = sample_state(1)
    path = tmp_path / "ref.safetensors"
    save_file(state, path, metadata={"format": "pt", "note": "hello"})
    ckpt = Checkpoint.open(path)
    assert ckpt.metadata == {"format": "pt", "note": "hello"}
    assert_same_tensors(ckpt.state_dict(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtype_cast_on_write_matches_torch_cast(tmp_path, dtype):
    state = sample_state(2)
    out = tmp_path / "cast.safetensors"
    write_checkpoint(out, _plans(state), dtype=dtype)
    got = load_file(out)
    for k, v in state.items():
        want = v.to(dtype) if v.is_floating_point() else v  # integers and bools are never cast
        assert got[k].dtype == want.dtype and bits(got[k]) == bits(want), k


def test_raw_copy_interleaved_with_computed_tensors(tmp_path):
    src = tmp_path / "src.safetensors"
    state = sample_state(3)
    save_file(state, src)
    ckpt = Checkpoint.open(src)
    plans = []
    for i, k in enumerate(ckpt.keys()):  # alternate kernel byte copies and tensors written from memory
        plans.append(plan_copy(ckpt, k, f"copy.{k}", raw=i % 2 == 0))
        plans.append(plan_tensor(f"made.{k}", state[k]))
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, plans)
    got = load_file(out)
    for k, v in state.items():
        assert bits(got[f"copy.{k}"]) == bits(v) and bits(got[f"made.{k}"]) == bits(v), k


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
@pytest.mark.parametrize("container", ["plain", "state_dict", "model"])
def test_torch_pickles_and_containers(tmp_path, suffix, container):
    state = {k: v for k, v in sample_state(4).items() if k != "empty"}
    obj = state if container == "plain" else {container: state, "epoch": 7, "optimizer_name": "adam"}
    path = tmp_path / f"weights{suffix}"
    torch.save(obj, path)
    assert_same_tensors(Checkpoint.open(path).state_dict(), state)


def test_torch_pickle_nested_dicts_are_flattened_and_legacy_format_reads(tmp_path):
    inner = {"weight": torch.randn(3, 2), "bias": torch.randn(3)}
    path = tmp_path / "nested.pt"
    torch.save({"model": {"encoder": inner, "step": 3}}, path)
    got = Checkpoint.open(path).state_dict()
    assert_same_tensors(got, {"encoder.weight": inner["weight"], "encoder.bias": inner["bias"]})
    legacy = tmp_path / "legacy.pt"
    torch.save(inner, legacy, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    assert_same_tensors(Checkpoint.open(legacy).state_dict(), inner)


def test_write_pt_output_reads_back_with_torch_load(tmp_path):
    state = {k: v for k, v in sample_state(5).items() if not k.startswith("f8")}
    out = tmp_path / "out.pt"
    write_checkpoint(out, _plans(state))
    assert_same_tensors(torch.load(out, weights_only=True), state)


def test_hf_folder_round_trip_carries_config_and_tokenizer(tmp_path):
    src = save_tiny_gpt2(tmp_path / "gpt2")
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}
    (src / "tokenizer.json").write_text(json.dumps(tokenizer))
    (src / "special_tokens_map.json").write_text("{}")
    ckpt = Checkpoint.open(src)
    assert ckpt.folder == src and ckpt.config["model_type"] == "gpt2"
    assert {p.name for p in ckpt.extra_files()} >= {"tokenizer.json", "special_tokens_map.json",
                                                     "generation_config.json"}
    out = tmp_path / "copy"
    report = write_checkpoint(out, [plan_copy(ckpt, k) for k in ckpt], config=ckpt.config,
                              extra_files=ckpt.extra_files())
    assert (out / "config.json").is_file() and out / "model.safetensors" in report.files
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text()) == ckpt.config
    assert_same_tensors(Checkpoint.open(out).state_dict(), load_file(src / "model.safetensors"))
    # transformers itself loads our folder and computes the same logits as the original
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_hf(out)(ids).logits, load_hf(src)(ids).logits)


def test_folder_with_single_pickle_and_config(tmp_path):
    folder = tmp_path / "pt_folder"
    folder.mkdir()
    state = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4)}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    ckpt = Checkpoint.open(folder)
    assert ckpt.config == {"model_type": "toy"}
    assert_same_tensors(ckpt.state_dict(), state)


def test_pytorch_bin_shard_index(tmp_path):
    folder = tmp_path / "bin_shards"
    folder.mkdir()
    a, b = {"a.weight": torch.randn(3, 3)}, {"b.weight": torch.randn(2), "b.bias": torch.randn(2)}
    torch.save(a, folder / "pytorch_model-00001-of-00002.bin")
    torch.save(b, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a.weight": "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin",
                  "b.bias": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_tensors(Checkpoint.open(folder).state_dict(), {**a, **b})
