"""MLP family: Sequential and named MLPs, built modules equal to the torch models, stages, detection."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import Linear, detect_family
from modelsurgery.families.mlp import MLPFamily


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc10 = nn.Linear(5, 9), nn.Linear(9, 7, bias=False), nn.Linear(7, 3)

    def forward(self, x):  # fc10 after fc2: natural order, not string order
        return self.fc10(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_sequential_with_activation_metadata(act):
    torch.manual_seed(0)
    a = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[act]
    model = nn.Sequential(nn.Linear(6, 16), a(), nn.Linear(16, 16), a(), nn.Linear(16, 4)).eval()
    md = {} if act == "relu" else {"modelsurgery.activation": act}
    fam = detect_family(Checkpoint.from_state_dict(model.state_dict(), metadata=md))
    assert isinstance(fam, MLPFamily) and fam.activation == act
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(fam.build_module()(input=x), model(x))
    assert fam.layers() == [Linear("0.weight", "0.bias"), Linear("2.weight", "2.bias"), Linear("4.weight", "4.bias")]
    assert fam.describe()["widths"] == [6, 16, 16, 4] and fam.hidden_size == 16
    assert fam.head_names() == ["4.weight", "4.bias"]


def test_named_layers_in_natural_order_and_stages():
    torch.manual_seed(1)
    model = Named().eval()
    fam = detect_family(Checkpoint.from_state_dict(model.state_dict()))
    assert fam.name == "mlp"
    assert [lin.weight for lin in fam.layers()] == ["fc1.weight", "fc2.weight", "fc10.weight"]
    assert fam.layers()[1].bias is None
    built = fam.build_module()
    x = fam.example_inputs(batch=4)["input"]
    assert x.shape == (4, 5)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(built(input=x), want)
        stages = built.stages()
        h, ctx = stages.embed(input=x)
        for block in stages.blocks:
            h = block(h, **ctx)
        assert torch.equal(stages.head(h), want)
    assert len(stages.blocks) == 3


def test_digits_fixture_accuracy(fixtures_dir):
    fam = detect_family(Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors"))
    data = load_file(fixtures_dir / "data" / "digits_eval.safetensors")
    with torch.no_grad():
        acc = (fam.build_module()(input=data["inputs"]).argmax(1) == data["labels"]).float().mean()
    assert fam.name == "mlp" and acc > 0.9


def test_not_an_mlp():
    broken_chain = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 5)}
    assert not MLPFamily.detect(Checkpoint.from_state_dict(broken_chain))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)).state_dict()
    assert not MLPFamily.detect(Checkpoint.from_state_dict(conv))
    top_level = {"weight": torch.zeros(3, 3)}
    assert not MLPFamily.detect(Checkpoint.from_state_dict(top_level))
    assert not MLPFamily.detect(Checkpoint.from_state_dict({}))


def test_unknown_activation_metadata_is_refused(tmp_path):
    """An activation the family does not compute ('leaky_relu') was run as ReLU: a LeakyReLU MLP exported to
    ONNX (and checked against the same ReLU module) computed another function. Refused naming the value."""
    from modelsurgery.errors import SurgeryError
    from modelsurgery.export import export_checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(), nn.Linear(16, 4)).eval()
    from safetensors.torch import save_file

    src = tmp_path / "leaky.safetensors"
    save_file(model.state_dict(), str(src), metadata={"modelsurgery.activation": "leaky_relu"})
    with pytest.raises(SurgeryError, match="modelsurgery.activation 'leaky_relu' is not supported"):
        export_checkpoint(src, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
