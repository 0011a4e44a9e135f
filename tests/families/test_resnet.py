"""ResNet family against an independent CIFAR ResNet implementation (projection and option-A
shortcuts, any depth and width); residual_groups()/inner_groups() checked by permutation invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import Linear, Norm, detect_family
from modelsurgery.families.resnet import ResNetFamily


class RefBlock(nn.Module):
    """The BasicBlock of the CIFAR ResNet papers/repositories, written independently of the family."""

    def __init__(self, c_in, c_out, stride, option, name="shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.name, self.option, self.pad = name, option, (c_out - c_in) // 2
        if stride != 1 or c_in != c_out:
            if option == "B":
                self.add_module(name, nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                                    nn.BatchNorm2d(c_out)))
        else:
            self.option = "identity"

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.option == "B":
            short = getattr(self, self.name)(x)
        elif self.option == "A":
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            short = x
        return F.relu(out + short)


class RefResNet(nn.Module):
    def __init__(self, blocks=(3, 3, 3), width=16, option="B", c_in=3, classes=10, head="linear",
                 shortcut="shortcut"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        c = width
        for s, n in enumerate(blocks):
            planes = width * 2**s
            layers = [RefBlock(c if j == 0 else planes, planes, 2 if (j == 0 and s > 0) else 1, option, shortcut)
                      for j in range(n)]
            c = planes
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.head = head
        setattr(self, head, nn.Linear(c, classes))
        self.nstages = len(blocks)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for s in range(self.nstages):
            x = getattr(self, f"layer{s + 1}")(x)
        return getattr(self, self.head)(F.adaptive_avg_pool2d(x, 1).flatten(1))


def ref(seed=0, **kw) -> RefResNet:
    torch.manual_seed(seed)
    model = RefResNet(**kw)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # non-trivial BN statistics, so a wrong BN wiring shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def family_of(model) -> ResNetFamily:
    fam = detect_family(Checkpoint.from_state_dict(model.state_dict()))
    assert isinstance(fam, ResNetFamily)
    return fam


CONFIGS = [
    {"blocks": (3, 3, 3), "width": 16, "option": "B"},  # ResNet-20
    {"blocks": (3, 3, 3), "width": 16, "option": "A"},  # ResNet-20 as in the paper (option A)
    {"blocks": (1, 2), "width": 8, "option": "B", "head": "fc", "shortcut": "downsample"},
    {"blocks": (2, 1, 1, 1), "width": 4, "option": "B", "c_in": 1},
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_reproduces_reference(cfg):
    model = ref(**cfg)
    fam = family_of(model)
    built = fam.build_module()
    x = torch.randn(3, cfg.get("c_in", 3), 8, 8)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(built(input=x), want)
        stages = built.stages()
        h, ctx = stages.embed(input=x)
        for block in stages.blocks:
            h = block(h, **ctx)
        assert torch.equal(stages.head(h), want)
    assert len(stages.blocks) == sum(cfg["blocks"]) == fam.num_layers
    assert fam.stage_blocks() == [list(range(sum(cfg["blocks"][:s]), sum(cfg["blocks"][: s + 1])))
                                  for s in range(len(cfg["blocks"]))]


def test_flattened_input_and_input_shape_metadata():
    model = ref(blocks=(1, 1), width=4, c_in=1)
    meta = {"modelsurgery.input_shape": "[1, 8, 8]"}
    fam = detect_family(Checkpoint.from_state_dict(model.state_dict(), metadata=meta))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fam.build_module()(input=x.flatten(1)), model(x))
    assert fam.example_inputs(batch=2)["input"].shape == (2, 1, 8, 8)


def test_blocks_names_and_roles():
    fam = family_of(ref(blocks=(2, 2), width=4))
    blocks = fam.blocks()
    assert [b.prefix for b in blocks] == ["layer1.0.", "layer1.1.", "layer2.0.", "layer2.1."]
    assert fam.block_of("layer2.0.shortcut.1.running_var") == (2, "shortcut.1.running_var")
    assert fam.block_of("conv1.weight") is None
    assert fam.block_name(3, "bn2.weight") == "layer2.1.bn2.weight"
    assert set(fam.block_linears(2)) == {"conv1", "conv2", "shortcut"}
    assert fam.block_linears(2)["shortcut"] == Linear("layer2.0.shortcut.0.weight")
    assert fam.block_norms(0)["bn2"].running_var == "layer1.0.bn2.running_var"
    layers = fam.layers()
    assert sum(isinstance(x, Linear) for x in layers) == 1 + 2 * 4 + 1 + 1 and isinstance(layers[1], Norm)
    assert fam.head_names() == ["linear.weight", "linear.bias"]
    assert fam.describe()["stages"] == [2, 2] and fam.describe()["widths"] == [4, 4, 8]


def _permute(state, groups, seed):
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in state.items()}
    for group in groups:
        perm = torch.randperm(group.size, generator=g)
        for name in group.out_axis:
            state[name] = state[name][perm]
        for name in group.in_axis:
            state[name] = state[name][:, perm]
    return state


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c["option"] == "B"])
def test_permutation_groups_leave_the_function_unchanged(cfg):
    model = ref(**cfg)
    fam = family_of(model)
    groups = fam.residual_groups() + fam.inner_groups()
    # every channel-carrying tensor is covered: each conv/linear weight on both axes (input image and
    # classes excepted), each BN tensor on its axis
    axis0 = [n for g in groups for n in g.out_axis]
    axis1 = [n for g in groups for n in g.in_axis]
    assert len(axis0) == len(set(axis0)) and len(axis1) == len(set(axis1))
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked") or name.startswith(cfg.get("head", "linear") + "."):
            continue
        assert name in axis0, name
        if t.dim() == 4 and name != "conv1.weight":
            assert name in axis1, name
    assert len(fam.residual_groups()) == len(cfg["blocks"])  # one stream per stage (stem joins stage 1)
    x = torch.randn(2, cfg.get("c_in", 3), 8, 8)
    with torch.no_grad():
        want = model(x)
        got = fam.build_module(_permute(model.state_dict(), groups, seed=1))(input=x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a group missing one of its tensors is not a symmetry: the test can tell
    first = groups[0]
    partial = type(first)(first.name, first.size, first.out_axis, first.in_axis[:-1])
    with torch.no_grad():
        broken = fam.build_module(_permute(model.state_dict(), [partial], seed=1))(input=x)
    assert not torch.allclose(broken, want, rtol=1e-3, atol=1e-3)


def test_option_a_groups_record_the_padding():
    fam = family_of(ref(blocks=(1, 1, 1), width=4, option="A"))
    groups = fam.residual_groups()
    assert [g.size for g in groups] == [4, 8, 16]
    assert [g.padded_from for g in groups] == [None, "residual.0", "residual.1"]
    assert [g.pad_offset for g in groups] == [0, 2, 4]


def test_output_projections_make_identity_blocks():
    model = ref(blocks=(2, 2), width=4)
    fam = family_of(model)
    assert fam.output_projections(2) == []  # a projection-shortcut block cannot become an identity
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for lin in fam.output_projections(1):
        state[lin.weight].zero_()
        state[lin.bias].zero_()
    built = fam.build_module(state)
    stages = built.stages()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h, _ = stages.embed(input=x)
        h = stages.blocks[0](h)
        assert torch.equal(stages.blocks[1](h), h)


def test_digits_fixture(fixtures_dir):
    path = fixtures_dir / "digits" / "resnet_seed0.safetensors"
    fam = detect_family(Checkpoint.open(path))
    assert fam.name == "resnet" and fam.input_shape() == (1, 8, 8)
    data = load_file(fixtures_dir / "data" / "digits_eval.safetensors")
    with torch.no_grad():
        logits = fam.build_module()(input=data["inputs"])
    assert (logits.argmax(1) == data["labels"]).float().mean() > 0.95


def test_not_detected_without_blocks_or_head():
    state = ref(blocks=(1,), width=4).state_dict()
    assert ResNetFamily.detect(Checkpoint.from_state_dict(state))
    no_head = {k: v for k, v in state.items() if not k.startswith("linear")}
    assert not ResNetFamily.detect(Checkpoint.from_state_dict(no_head))
    no_conv2 = {k: v for k, v in state.items() if "conv2" not in k}
    assert not ResNetFamily.detect(Checkpoint.from_state_dict(no_conv2))
