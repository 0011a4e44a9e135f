"""Applying a permutation never changes the function: permuted vs original outputs per family.

Transformer families are checked against transformers' own models loaded with the permuted weights
(an implementation independent of ours)."""

import pytest
import torch
from torch import nn

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.match.derive import permutation_spec
from modelsurgery.ops.match.fx_spec import module_spec
from modelsurgery.ops.match.spec import apply_permutation
from modelsurgery.ops.match.weight_matching import weight_matching
from tests.float_bounds import network_atol, widest_fan_in
from tests.hf_tiny import load_hf, save_tiny_bert, save_tiny_gpt2, save_tiny_llama
from tests.ops.match.perms import random_perms


@pytest.mark.parametrize("kind", ["mlp", "cnn", "resnet"])
def test_digits_families_preserve_function(fixtures_dir, kind):
    ckpt = Checkpoint.open(fixtures_dir / "digits" / f"{kind}_seed0.safetensors")
    family = detect_family(ckpt)
    spec = permutation_spec(family)
    state = ckpt.state_dict()
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    permuted = apply_permutation(state, spec, perms)
    assert any(not torch.equal(permuted[k], state[k]) for k in spec.axes)
    x = family.example_inputs(batch=16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = family.build_module(state)(**x)
        out = family.build_module(permuted)(**x)
    # permuted units sum in another order: a bound scaled to the logits (up to 30 here)
    torch.testing.assert_close(out, ref, atol=network_atol(ref, widest_fan_in(state)), rtol=0)


HF = {
    "gpt2": (save_tiny_gpt2, "n_embd"),
    "llama": (save_tiny_llama, "hidden_size"),
    "bert": (save_tiny_bert, "hidden_size"),
}


@pytest.mark.parametrize("name", sorted(HF))
def test_transformer_families_preserve_function(tmp_path, name):
    folder = HF[name][0](tmp_path / name)
    ckpt = Checkpoint.open(folder)
    family = detect_family(ckpt)
    assert family.name == name
    spec = permutation_spec(family)
    heads = [g for g in spec.groups.values() if g.kind == "heads"]
    assert len(heads) == family.num_layers
    assert ("residual" in spec.groups) == (name != "bert")  # an encoder outputs its residual stream
    perms = random_perms(spec, torch.Generator().manual_seed(0))
    model = load_hf(folder)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids)[0]
        own = model.state_dict()
        permuted = apply_permutation(ckpt.state_dict(), spec, perms)
        changed = {k: v for k, v in permuted.items() if k in own}
        assert len(changed) >= len(spec.axes) - 1
        own.update(changed)
        model.load_state_dict(own)
        out = model(input_ids=ids)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_llama_grouped_query_heads_move_together(tmp_path):
    ckpt = Checkpoint.open(save_tiny_llama(tmp_path / "l"))
    spec = permutation_spec(detect_family(ckpt))
    g = spec.groups["block0.heads"]
    assert (g.size, g.q_per_kv, g.rotary) == (2, 2, True)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, input):
        h = torch.relu(self.bn(self.stem(input)))
        h = torch.relu(h + self.b2(self.c2(torch.relu(self.b1(self.c1(h))))))
        h = nn.functional.max_pool2d(h, 2)
        return self.out(torch.relu(self.fc(torch.flatten(h, 1))))


def _randomize_bn(m):
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.normal_()
            b.running_var.uniform_(0.5, 2)
            b.weight.data.normal_()
    return m.eval()


def test_fx_spec_groups_residual_adds_and_flatten():
    m = _randomize_bn(TinyResNet())
    x = torch.randn(4, 1, 8, 8)
    spec = module_spec(m, {"input": x})
    # stem and c2 share the residual stream; c1 has its own group; fc its own; the output is fixed
    assert sorted(g.size for g in spec.groups.values()) == [8, 8, 16]
    assert spec.axes["fc.weight"][1][0].expand == 16
    assert spec.axes["c2.weight"][0][0].group == spec.axes["stem.weight"][0][0].group
    assert "out.bias" not in spec.axes
    m2 = TinyResNet()
    m2.load_state_dict(apply_permutation(m.state_dict(), spec, random_perms(spec, torch.Generator().manual_seed(2))))
    with torch.no_grad():
        torch.testing.assert_close(m2.eval()(x), m(x), atol=1e-5, rtol=1e-5)


def test_fx_spec_fixes_groups_touched_by_unknown_ops():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, input):
            h = self.a(input)
            return self.b(torch.cumsum(h, dim=1))  # cumsum mixes units in order: not permutable

    spec = module_spec(Odd(), {"input": torch.randn(2, 4)})
    assert spec.groups == {}


def test_weight_matching_recovers_a_hidden_permutation(fixtures_dir):
    ckpt = Checkpoint.open(fixtures_dir / "digits" / "mlp_seed0.safetensors")
    spec = permutation_spec(detect_family(ckpt))
    A = ckpt.state_dict()
    B = apply_permutation(A, spec, random_perms(spec, torch.Generator().manual_seed(5)))
    r = weight_matching(A, B, spec)
    back = apply_permutation(B, spec, r.perms)
    for k in A:
        torch.testing.assert_close(back[k], A[k])
    assert r.objective_after == pytest.approx(sum(float((v * v).sum()) for k, v in A.items() if k in spec.axes),
                                              rel=1e-5)


@pytest.mark.parametrize("name,backend", [("gpt2", "scipy"), ("llama", "lap"), ("llama", "torch")])
def test_weight_matching_recovers_heads_and_residual(tmp_path, name, backend):
    folder = HF[name][0](tmp_path / name)
    ckpt = Checkpoint.open(folder)
    spec = permutation_spec(detect_family(ckpt))
    A = ckpt.state_dict()
    B = apply_permutation(A, spec, random_perms(spec, torch.Generator().manual_seed(7)))
    r = weight_matching(A, B, spec, backend=backend)
    back = apply_permutation(B, spec, r.perms)
    for k in spec.axes:
        torch.testing.assert_close(back[k], A[k])


def test_unknown_family_is_not_permutable():
    ckpt = Checkpoint.from_state_dict({"x": torch.zeros(2, 3, 4)})
    with pytest.raises(SurgeryError, match="not permutable"):
        permutation_spec(detect_family(ckpt))


def test_per_head_norms_as_wide_as_the_stream_are_not_taken_for_unknown_stream_readers(tmp_path):
    """One-head Qwen3: q_norm/k_norm are head_dim = hidden wide but shared by all heads (whole heads move, so
    they stay as they are); the unknown-stream-tensor guard must not refuse them. transformers' forward is the
    reference."""
    from tests.hf_tiny import save_tiny_qwen3

    folder = save_tiny_qwen3(tmp_path / "q", num_attention_heads=1, num_key_value_heads=1, head_dim=32)
    ckpt = Checkpoint.open(folder)
    spec = permutation_spec(detect_family(ckpt))
    assert "residual" in spec.groups
    model = load_hf(folder)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids)[0]
        model.load_state_dict(apply_permutation(ckpt.state_dict(), spec, random_perms(spec, torch.Generator())),
                              strict=False)
        torch.testing.assert_close(model(input_ids=ids)[0], ref, atol=1e-5, rtol=1e-5)
