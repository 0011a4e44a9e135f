"""torch.fx-derived specs for user modules given with --model package.module:function."""

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.fx_spec import module_spec
from modelsurgery.ops.match.spec import apply_permutation
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints
from tests import custom_models
from tests.custom_models import TinyConvNet
from tests.ops.match.perms import random_perms
from tests.ops.match.user_models import ResidualMLP

FACTORY = "tests.ops.match.user_models:residual_mlp"


def _save(module, path, seed):
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def test_residual_user_module_spec_preserves_function(tmp_path):
    path = _save(ResidualMLP(), tmp_path / "a.safetensors", 0)
    family = detect_family(Checkpoint.open(path), FACTORY)
    spec = permutation_spec(family)
    # residual stream (inp, fc2, norm) is one group; fc1's units another; the output stays fixed
    assert sorted(g.size for g in spec.groups.values()) == [32, 64]
    assert spec.axes["norm.weight"][0][0].group == spec.axes["fc2.weight"][0][0].group
    state = Checkpoint.open(path).state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, torch.Generator().manual_seed(1)))
    x = torch.randn(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(family.build_module(permuted)(input=x), family.build_module(state)(input=x),
                                   atol=1e-5, rtol=1e-5)


def test_depthwise_conv_and_flatten_user_module(tmp_path):
    path = _save(TinyConvNet(), tmp_path / "c.safetensors", 0)
    family = detect_family(Checkpoint.open(path), "tests.custom_models:tiny_convnet")
    spec = permutation_spec(family)
    assert [g.size for g in spec.groups.values()] == [6]  # stem channels, carried through the depthwise conv
    assert spec.axes["head.1.weight"][1][0].expand == 4  # 2x2 pooled positions per channel
    state = Checkpoint.open(path).state_dict()
    permuted = apply_permutation(state, spec, random_perms(spec, torch.Generator().manual_seed(2)))
    x = family.example_inputs(batch=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(family.build_module(permuted)(**x), family.build_module(state)(**x),
                                   atol=1e-5, rtol=1e-5)


def test_merge_with_model_factory_undoes_a_shuffle(tmp_path):
    a = _save(ResidualMLP(), tmp_path / "a.safetensors", 0)
    ckpt = Checkpoint.open(a)
    spec = permutation_spec(detect_family(ckpt, FACTORY))
    b = tmp_path / "b.safetensors"
    save_file(apply_permutation(ckpt.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(3))), str(b))
    out = tmp_path / "m.safetensors"
    merge_checkpoints([a, b], out, MergeOptions(model=FACTORY))
    merged = Checkpoint.open(out)
    names = ckpt.keys()
    for k in names:
        torch.testing.assert_close(merged.get(k), ckpt.get(k))


@pytest.mark.parametrize("factory", ["tied_lm", "tied_norm_lm", "tied_functional_lm", "block_twice", "linear_twice",
                                     "shared_projection"])
def test_shared_layers_random_permutations_preserve_outputs(tmp_path, factory):
    """A module called twice or a parameter under two names reaches one parameter axis twice; the
    groups meeting there are one group, so any permutation keeps the model's function."""
    model = f"tests.custom_models:{factory}"
    module = getattr(custom_models, factory)()
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path / "m.safetensors"
    save_file({k: v.detach().clone() for k, v in module.state_dict().items()}, str(path))  # tied: two copies
    family = detect_family(Checkpoint.open(path), model)
    spec = permutation_spec(family)
    assert spec.groups, "nothing is permutable: the test would prove nothing"
    state = Checkpoint.open(path).state_dict()
    x = family.example_inputs(batch=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = family.build_module(state)(**x)
        for seed in range(5):
            permuted = apply_permutation(state, spec, random_perms(spec, torch.Generator().manual_seed(seed)))
            assert any(not torch.equal(permuted[k], state[k]) for k in state)
            torch.testing.assert_close(family.build_module(permuted)(**x), want, atol=1e-5, rtol=1e-5)


def test_shared_layers_form_one_group():
    spec = module_spec(custom_models.LinearTwice(), {"input": torch.randn(2, 6)})
    # inp's outputs, both of shared's axes and out's inputs: one group of 8
    assert [g.size for g in spec.groups.values()] == [8]
    group = spec.axes["inp.weight"][0][0].group
    assert {spec.axes["shared.weight"][ax][0].group for ax in (0, 1)} == {group}
    tied = module_spec(custom_models.TiedLM(), {"input_ids": torch.randint(0, 13, (2, 5))})
    assert tied.axes["head.weight"] == tied.axes["emb.weight"] and 0 not in tied.axes["emb.weight"]  # vocab fixed
    assert sorted(g.size for g in tied.groups.values()) == [8, 16]  # the width (emb, proj, fc2, head), fc1's units


def test_linear_on_another_axis_than_the_conv_channels_is_not_permuted():
    """A Linear over the last axis of a conv output mixes widths, not channels: the channel group
    stays fixed rather than joined with the Linear's inputs (here W == C, which a size check misses)."""

    class ConvThenLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = torch.nn.Conv2d(1, 4, 1), torch.nn.Linear(4, 4)

        def forward(self, image):
            return self.lin(torch.relu(self.conv(image)))

    spec = module_spec(ConvThenLinear(), {"image": torch.randn(2, 1, 4, 4)})
    assert "conv.weight" not in spec.axes and 1 not in spec.axes.get("lin.weight", {})


def test_spec_refuses_two_descriptions_of_one_axis():
    from modelsurgery.errors import SurgeryError
    from modelsurgery.ops.match.spec import PermGroup, PermutationSpec, Segment

    spec = PermutationSpec()
    spec.add_group(PermGroup("a", 4))
    spec.add_group(PermGroup("b", 4))
    spec.add_axis("w", 0, Segment("a"))
    spec.add_axis("w", 0, Segment("a"))  # the same description again is fine
    with pytest.raises(SurgeryError, match="tensor 'w': axis 0 is driven by a and b"):
        spec.add_axis("w", 0, Segment("b"))
    assert spec.axes["w"][0] == [Segment("a")]
