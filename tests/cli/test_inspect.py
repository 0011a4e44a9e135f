"""`surgery inspect`: --json fields and family detection, checked against independent counts
(the reference safetensors reader, transformers' own models, the torch modules that made the files)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import save_tiny_bert, save_tiny_gpt2, save_tiny_llama

runner = CliRunner()
HF = {"gpt2": save_tiny_gpt2, "llama": save_tiny_llama, "bert": save_tiny_bert}


def inspect_json(path, *extra) -> dict:
    result = runner.invoke(app, ["inspect", str(path), "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)  # exactly one JSON object on stdout


def _reference_counts(tensors: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    return (len(tensors), sum(t.numel() for t in tensors.values()),
            sum(t.numel() * t.element_size() for t in tensors.values()))


def _check_fields(report: dict, tensors: dict[str, torch.Tensor]) -> None:
    n, params, nbytes = _reference_counts(tensors)
    assert report["num_tensors"] == n and report["num_parameters"] == params and report["num_bytes"] == nbytes
    by_name = {t["name"]: t for t in report["tensors"]}
    assert set(by_name) == set(tensors)
    for k, v in tensors.items():
        assert by_name[k]["shape"] == list(v.shape) and by_name[k]["parameters"] == v.numel()
        assert by_name[k]["dtype"] == str(v.dtype).replace("torch.", "")
    assert sorted(n for names in report["groups"].values() for n in names) == sorted(tensors)


@pytest.mark.parametrize("kind,layers", [("mlp", 3), ("cnn", 4), ("resnet", 3)])
def test_digits_fixtures(fixtures_dir, kind, layers):
    path = fixtures_dir / "digits" / f"{kind}_seed0.safetensors"
    report = inspect_json(path)
    assert report["family"] == kind and report["num_layers"] == layers
    _check_fields(report, load_file(path))


@pytest.mark.parametrize("kind", sorted(HF))
def test_hf_families(tmp_path, kind):
    folder = HF[kind](tmp_path / kind)
    report = inspect_json(folder)
    assert report["family"] == kind
    cfg = json.loads((folder / "config.json").read_text())
    assert report["num_layers"] == cfg.get("num_hidden_layers", cfg.get("n_layer")) == 3
    assert report["hidden_size"] == cfg.get("hidden_size", cfg.get("n_embd"))
    _check_fields(report, load_file(folder / "model.safetensors"))
    blocks = [g for g in report["groups"] if g.startswith("block ")]
    assert blocks == ["block 0", "block 1", "block 2"]


def test_parameter_count_matches_transformers_model(tmp_path):
    from transformers import LlamaForCausalLM

    folder = save_tiny_llama(tmp_path / "llama")
    model = LlamaForCausalLM.from_pretrained(folder)
    assert inspect_json(folder)["num_parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sharded_folder_written_by_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    src = HF[kind](tmp_path / "src")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="30KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 1
    for target in (sharded, sharded / "model.safetensors.index.json"):
        report = inspect_json(target)
        assert report["family"] == kind and report["num_layers"] == 3
        assert sorted(report["files"]) == sorted(str(s) for s in shards)
        want = {}
        for s in shards:
            want.update(load_file(s))
        _check_fields(report, want)


def test_hand_built_sequential_cnn_and_pickle(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    state = model.state_dict()
    torch.save({"state_dict": state, "epoch": 2}, tmp_path / "cnn.pt")
    report = inspect_json(tmp_path / "cnn.pt")
    assert report["family"] == "cnn" and report["num_layers"] == 3
    assert report["family_info"]["input_shape"] == [3, 6, 6]  # 8 * 6 * 6 features after two "same" 3x3 convs
    _check_fields(report, state)


def test_unknown_family_and_custom_model(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"something": torch.zeros(3, 3, 3), "else": torch.ones(2)}, path)
    assert inspect_json(path)["family"] == "unknown"
    from tests.custom_models import TinyConvNet

    custom = tmp_path / "custom.safetensors"
    save_file(TinyConvNet().state_dict(), custom)
    report = inspect_json(custom, "--model", "tests.custom_models:tiny_convnet")
    assert report["family"] == "custom" and report["family_info"]["model"] == "tests.custom_models:tiny_convnet"


def test_provenance_and_metadata_shown(tmp_path):
    from modelsurgery.checkpoint import Provenance, plan_tensor, write_checkpoint

    src = tmp_path / "src.safetensors"
    save_file({"w": torch.ones(2)}, src, metadata={"author": "me"})
    out = tmp_path / "out.safetensors"
    write_checkpoint(out, [plan_tensor("w", torch.ones(2))], metadata={"author": "me"},
                     provenance=Provenance("copy", {"x": 1}, [src]))
    report = inspect_json(out)
    assert report["metadata"]["author"] == "me"
    assert report["provenance"]["operation"] == "copy" and report["provenance"]["parameters"] == {"x": 1}
    table = runner.invoke(app, ["inspect", str(out)])
    assert table.exit_code == 0 and "provenance" in table.stdout and "copy" in table.stdout


def test_table_output_lists_family_and_totals(fixtures_dir):
    result = runner.invoke(app, ["inspect", str(fixtures_dir / "digits" / "resnet_seed0.safetensors"), "--all"])
    assert result.exit_code == 0
    assert "resnet" in result.stdout and "layer2.0.shortcut.0.weight" in result.stdout
    n = sum(t.numel() for t in load_file(fixtures_dir / "digits" / "resnet_seed0.safetensors").values())
    assert f"{n:,} parameters" in result.stdout
