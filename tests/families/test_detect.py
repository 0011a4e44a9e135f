"""Family detection across every family, on checkpoints written by the libraries that own the formats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import UnknownFamily, detect_family, family_by_name, registered
from tests.hf_tiny import save_tiny_bert, save_tiny_gpt2, save_tiny_llama


@pytest.mark.parametrize("name,family", [("mlp_seed0", "mlp"), ("mlp_seed1", "mlp"), ("cnn_seed0", "cnn"),
                                         ("cnn_seed2", "cnn"), ("resnet_seed0", "resnet"),
                                         ("resnet_seed1", "resnet")])
def test_digits_fixtures(fixtures_dir, name, family):
    assert detect_family(Checkpoint.open(fixtures_dir / "digits" / f"{name}.safetensors")).name == family


@pytest.mark.parametrize("save,family", [(save_tiny_gpt2, "gpt2"), (save_tiny_llama, "llama"),
                                         (save_tiny_bert, "bert")])
def test_transformers_folders(tmp_path, save, family):
    if family not in registered():
        pytest.skip(f"the {family} family is not written yet")
    folder = save(tmp_path / family)
    assert detect_family(Checkpoint.open(folder)).name == family
    assert detect_family(Checkpoint.open(folder / "model.safetensors")).name in (family, "unknown")


def test_torch_pickles_of_each_small_family(tmp_path):
    cases = {
        "mlp": nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        "cnn": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 8 * 8, 3)),
    }
    for family, model in cases.items():
        torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / f"{family}.pth")
        assert detect_family(Checkpoint.open(tmp_path / f"{family}.pth")).name == family


def test_unknown_and_registry():
    odd = Checkpoint.from_state_dict({"emb": torch.zeros(3, 4, 5), "x": torch.zeros(2)})
    fam = detect_family(odd)
    assert isinstance(fam, UnknownFamily) and not fam.runnable
    with pytest.raises(SurgeryError, match="no known model family matches this checkpoint's tensors; pass --model"):
        fam.build_module()
    assert {"mlp", "cnn", "resnet", "custom"} <= set(registered())
    assert family_by_name("resnet").name == "resnet"
    with pytest.raises(SurgeryError, match="unknown family 'nope'"):
        family_by_name("nope")


def test_model_argument_forces_the_custom_family():
    from tests.custom_models import digits_mlp

    ckpt = Checkpoint.from_state_dict(digits_mlp().state_dict())
    assert detect_family(ckpt).name == "mlp"
    assert detect_family(ckpt, model="tests.custom_models:digits_mlp").name == "custom"
