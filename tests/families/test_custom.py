"""Custom family (--model package.module:function): strict fit, named errors, inputs, stages fallback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.families.custom import CustomFamily
from tests.custom_models import TinyConvNet, digits_mlp, mlp_from_config, token_model

SPEC = "tests.custom_models:tiny_convnet"


def test_builds_the_users_module_and_matches_it(tmp_path):
    torch.manual_seed(0)
    model = TinyConvNet().eval()
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), path)
    fam = detect_family(Checkpoint.open(path), model=SPEC)
    assert isinstance(fam, CustomFamily) and fam.name == "custom"
    assert fam.input_names() == ["image"]  # from the module's forward signature
    inputs = fam.example_inputs(batch=3)
    assert inputs["image"].shape == (3, 1, 8, 8)  # from example_input_shape
    built = fam.build_module()
    assert isinstance(built, TinyConvNet) and not built.training
    with torch.no_grad():
        want = model(inputs["image"])
        assert torch.equal(built(**inputs), want)
        stages = built.stages()  # fallback: top-level children in order
        assert [type(b) for b in stages.blocks] == [nn.Sequential, nn.Sequential, nn.AdaptiveMaxPool2d,
                                                    nn.Sequential]
        h, ctx = stages.embed(**inputs)
        for block in stages.blocks:
            h = block(h, **ctx)
        assert torch.equal(stages.head(h), want)
    assert fam.describe()["num_layers"] == 4 and fam.describe()["model"] == SPEC


def test_fit_check_reads_no_tensor_data(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(TinyConvNet().state_dict(), path)
    ckpt = Checkpoint.open(path)
    CustomFamily(ckpt, SPEC)
    assert ckpt._handles == {}  # no safetensors file was opened for data


def test_factory_taking_the_config(tmp_path):
    torch.manual_seed(1)
    model = mlp_from_config({"width": 24}).eval()
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"width": 24}))
    fam = CustomFamily(Checkpoint.open(folder), "tests.custom_models:mlp_from_config")
    x = fam.example_inputs(batch=2)["input"]
    assert x.shape == (2, 4)  # from the first Linear
    with torch.no_grad():
        assert torch.equal(fam.build_module()(input=x), model(x))


def test_embedding_first_gives_token_ids():
    fam = CustomFamily(Checkpoint.from_state_dict(token_model().state_dict()), "tests.custom_models:token_model")
    ids = fam.example_inputs(batch=2, seq_len=5)["input"]
    assert ids.dtype == torch.int64 and ids.shape == (2, 5) and int(ids.max()) < 11


def test_digits_fixture_through_a_factory(fixtures_dir):
    from safetensors.torch import load_file

    fam = CustomFamily(Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors"),
                       "tests.custom_models:digits_mlp")
    data = load_file(fixtures_dir / "data" / "digits_eval.safetensors")
    with torch.no_grad():
        acc = (fam.build_module()(data["inputs"]).argmax(1) == data["labels"]).float().mean()
    assert acc > 0.9


def _ckpt(state, name="user.safetensors"):
    return Checkpoint.from_state_dict(state, path=name)


@pytest.mark.parametrize("spec,words", [
    ("no_such_package_zz.models:make", "cannot import module 'no_such_package_zz.models'"),
    ("tests.custom_models:missing_fn", "has no function 'missing_fn'"),
    ("tests.custom_models", "expected 'package.module:function'"),
    ("tests.custom_models:not_a_module", "returned dict, not an nn.Module"),
    ("tests.custom_models:broken_factory", "factory failed (RuntimeError: factory exploded on purpose)"),
])
def test_bad_specs_are_named(spec, words):
    with pytest.raises(SurgeryError) as err:
        CustomFamily(_ckpt(digits_mlp().state_dict()), spec)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_that_does_not_fit_names_the_tensor():
    state = digits_mlp().state_dict()
    spec = "tests.custom_models:digits_mlp"
    missing = {k: v for k, v in state.items() if k != "2.bias"}
    with pytest.raises(SurgeryError, match=r"user.safetensors: tensor '2.bias' needed by .* is missing"):
        CustomFamily(_ckpt(missing), spec)
    wrong = dict(state, **{"4.weight": torch.zeros(10, 127)})
    with pytest.raises(SurgeryError, match=r"tensor '4.weight' has shape \(10, 127\).*expects \(10, 128\)"):
        CustomFamily(_ckpt(wrong), spec)
    extra = dict(state, **{"6.weight": torch.zeros(3, 3)})
    with pytest.raises(SurgeryError, match=r"tensor '6.weight' is not part of"):
        CustomFamily(_ckpt(extra), spec)
    fam = CustomFamily(_ckpt(state), spec)
    with pytest.raises(SurgeryError, match="'0.weight' has shape"):
        fam.build_module(dict(state, **{"0.weight": torch.zeros(128, 65)}))


def test_never_auto_detected():
    ckpt = Checkpoint.from_state_dict(TinyConvNet().state_dict())
    assert not CustomFamily.detect(ckpt)
    assert detect_family(ckpt).name != "custom"
