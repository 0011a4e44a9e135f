"""torch.fx-derived specs for user modules given with --model package.module:function."""

import torch
from safetensors.torch import save_file

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.families import detect_family
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.spec import apply_permutation, random_perms
from modelsurgery.ops.merge.merge import MergeOptions, merge_checkpoints
from tests.custom_models import TinyConvNet
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
