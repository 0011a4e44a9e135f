"""CNN family: built modules reproduce the torch models that wrote the checkpoints, with arch metadata
and with the documented default; layers(), stages() and the channel-major flatten contract."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import Linear, Norm, detect_family
from modelsurgery.families.cnn import CNNFamily

ARCH = ["conv", "bn", "relu", "maxpool", "conv", "bn", "relu", "avgpool", "flatten", "linear"]


def _randomize_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def lenet() -> nn.Sequential:
    torch.manual_seed(0)
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10)))


def ckpt_of(model: nn.Module, **metadata) -> Checkpoint:
    md = {k.replace("_", "."): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    md = {("modelsurgery." + k if not k.startswith("modelsurgery") else k): v for k, v in md.items()}
    md = {k.replace("input.shape", "input_shape"): v for k, v in md.items()}
    return Checkpoint.from_state_dict(model.state_dict(), metadata=md)


def run(module, x):
    with torch.no_grad():
        return module(input=x)


def test_arch_metadata_reproduces_the_model_exactly():
    model = lenet()
    fam = detect_family(ckpt_of(model, arch=ARCH, input_shape=[1, 8, 8]))
    assert isinstance(fam, CNNFamily)
    built = fam.build_module()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(run(built, x), want)
    assert torch.equal(run(built, x.flatten(1)), want)  # flattened [N, C*H*W] inputs too
    assert fam.example_inputs(batch=3)["input"].shape == (3, 1, 8, 8)
    assert fam.describe()["layers"] == ARCH and fam.describe()["num_layers"] == 3


def test_stages_compose_to_the_forward_pass():
    model = lenet()
    built = detect_family(ckpt_of(model, arch=ARCH, input_shape=[1, 8, 8])).build_module()
    stages = built.stages()
    assert len(stages.blocks) == 3  # conv group, conv group, linear
    ids = {id(p) for p in built.parameters()}
    assert all(id(p) in ids for b in stages.blocks for p in b.parameters())  # the model's own parameters
    x = torch.randn(4, 64)
    with torch.no_grad():
        h, ctx = stages.embed(input=x)
        for block in stages.blocks:
            h = block(h, **ctx)
        assert torch.equal(stages.head(h), model(x.reshape(4, 1, 8, 8)))


def test_layers_in_forward_order_with_roles():
    fam = detect_family(ckpt_of(lenet(), arch=ARCH))
    layers = fam.layers()
    assert [type(x) for x in layers] == [Linear, Norm, Linear, Norm, Linear]
    assert [x.weight for x in layers] == ["0.weight", "1.weight", "4.weight", "5.weight", "9.weight"]
    assert layers[1].running_mean == "1.running_mean" and layers[1].kind == "batchnorm"
    assert [x.weight for x in fam.weight_layers()] == ["0.weight", "4.weight", "9.weight"]
    assert fam.head_names() == ["9.weight", "9.bias"]


@pytest.mark.parametrize("gap", [True, False])
def test_default_without_metadata(gap):
    """Default: ReLU after each conv(+BN) group and hidden linear; global pool + flatten before the first
    linear when its in_features equals the channel count, flatten otherwise; 'same' padding."""
    torch.manual_seed(1)
    head_in = 12 if gap else 12 * 6 * 6
    model = _randomize_bn(nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 5, padding=2), nn.ReLU(),
        *([nn.AdaptiveAvgPool2d(1)] if gap else []), nn.Flatten(),
        nn.Linear(head_in, 20), nn.ReLU(), nn.Linear(20, 4)))
    fam = detect_family(Checkpoint.from_state_dict(model.state_dict()))
    assert fam.name == "cnn"
    shape = fam.input_shape()
    assert shape == ((3, 8, 8) if gap else (3, 6, 6))
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.equal(run(fam.build_module(), x), model(x))


def test_vgg_style_features_and_classifier():
    torch.manual_seed(2)

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.classifier = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 7))

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    model = VGG().eval()
    arch = {"features": ["conv", "relu", "maxpool", "conv", "relu", "maxpool"],
            "classifier": ["linear", "relu", "dropout", "linear"]}
    fam = detect_family(ckpt_of(model, arch=arch, input_shape=[3, 8, 8]))
    assert fam.name == "cnn"
    # 'classifier' sorts before 'features' but runs after it
    assert [x.weight for x in fam.layers()] == ["features.0.weight", "features.3.weight", "classifier.0.weight",
                                               "classifier.3.weight"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(run(fam.build_module(), x), model(x))
    assert fam.spatial_positions("classifier.0") == 4


def test_flatten_is_channel_major():
    """spatial_positions(): permuting conv channels and the matching blocks of linear inputs keeps the function."""
    torch.manual_seed(3)
    model = _randomize_bn(nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(6 * 4 * 4, 5)))
    fam = detect_family(Checkpoint.from_state_dict(model.state_dict()))
    pos = fam.spatial_positions("4")
    assert pos == 16
    assert fam.spatial_positions("0") == 1  # a conv's input: one position per channel
    with pytest.raises(SurgeryError, match="not a conv or linear layer"):
        fam.spatial_positions("3")  # the Flatten
    perm = torch.randperm(6)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        sd[k] = sd[k][perm]
    feat = (perm[:, None] * pos + torch.arange(pos)).reshape(-1)
    sd["4.weight"] = sd["4.weight"][:, feat]
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(run(fam.build_module(sd), x), model(x))


def test_digits_fixture_classifies_real_digits(fixtures_dir):
    data = load_file(fixtures_dir / "data" / "digits_eval.safetensors")
    fam = detect_family(Checkpoint.open(fixtures_dir / "digits" / "cnn_seed0.safetensors"))
    assert fam.name == "cnn" and fam.input_shape() == (1, 8, 8)
    logits = run(fam.build_module(), data["inputs"])
    assert (logits.argmax(1) == data["labels"]).float().mean() > 0.95


def test_build_with_other_dtype_and_state():
    model = lenet()
    fam = detect_family(ckpt_of(model, arch=ARCH))
    zeroed = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    zeroed["1.running_var"] = torch.ones(8)
    zeroed["5.running_var"] = torch.ones(16)
    out = run(fam.build_module(zeroed), torch.randn(2, 1, 8, 8))
    assert torch.equal(out, torch.zeros(2, 10))
    half = fam.build_module(dtype=torch.bfloat16)
    assert run(half, torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("arch,input_shape,words", [
    (["bn", "conv", "relu"], None, "says layer '0' is a bn"),
    (["conv", "bn", "relu", "maxpool", "conv", "bn", "relu", "avgpool", "flatten"], None, "'9.weight' is not placed"),
    (["conv", "bn", "wobble"], None, "unknown layer kind 'wobble'"),
    ("{not json", None, "not JSON"),
    ([*ARCH[:-3], "flatten", "flatten", "linear"], [1, 8, 8], "'9.weight' expects 16 input features"),
    (ARCH, "[1, 8]", "not [C, H, W]"),
])
def test_bad_metadata_is_a_named_error(arch, input_shape, words):
    md = {"modelsurgery.arch": arch if isinstance(arch, str) else json.dumps(arch)}
    if input_shape is not None:
        md["modelsurgery.input_shape"] = input_shape if isinstance(input_shape, str) else json.dumps(input_shape)
    fam = CNNFamily(Checkpoint.from_state_dict(lenet().state_dict(), path="net.safetensors", metadata=md))
    with pytest.raises(SurgeryError, match=re.escape(words)) as err:
        fam.build_module()
    assert "net.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_not_detected_for_mlp_resnet_or_broken_chains(fixtures_dir):
    for name in ("mlp_seed0", "resnet_seed0"):
        assert not CNNFamily.detect(Checkpoint.open(fixtures_dir / "digits" / f"{name}.safetensors"))
    bad = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(4, 8, 3))  # channels do not chain
    assert not CNNFamily.detect(Checkpoint.from_state_dict(bad.state_dict()))
    odd = {"0.weight": torch.zeros(4, 1, 3, 3), "0.extra": torch.zeros(4)}
    assert not CNNFamily.detect(Checkpoint.from_state_dict(odd))


def test_describe_survives_what_build_refuses():
    """A flatten size no square input explains: inspect still works, building names the tensor."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 7, 3))
    fam = CNNFamily(Checkpoint.from_state_dict(model.state_dict(), path="odd.pt"))
    d = fam.describe()
    assert d["input_shape"] is None and not d["runnable"] and "'3.weight'" in d["problem"]
    with pytest.raises(SurgeryError, match=r"odd.pt: no square input fits tensor '3.weight'"):
        fam.build_module()
    md = {"modelsurgery.input_shape": "[1, 5, 7]"}
    fixed = CNNFamily(Checkpoint.from_state_dict(model.state_dict(), metadata=md))
    x = torch.randn(2, 1, 5, 7)
    with torch.no_grad():
        assert torch.equal(fixed.build_module()(input=x), model.eval()(x))
