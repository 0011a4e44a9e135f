"""MixtureGrowth: shapes, block structure, orthogonal coefficients, template-form input, bad input."""

import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.grow import GrowOptions, grow
from modelsurgery.ops.grow.mixture import orthogonal_coefficients, spectral_templates
from tests.float_bounds import network_atol, widest_fan_in
from tests.ops.grow.helpers import run_family, save_mlp, weights

SIZES = (6, 10, 12, 3)


def members(tmp_path, k=2, sizes=SIZES):
    return [save_mlp(tmp_path / f"m{i}.safetensors", sizes=sizes, seed=i) for i in range(k)]


@pytest.mark.parametrize("k", [2, 3])
def test_shapes_and_block_diagonal(tmp_path, k):
    srcs = members(tmp_path, k)
    out = tmp_path / "mix.safetensors"
    grow(srcs, out, GrowOptions(method="mixture"))
    w, inputs = weights(out), [weights(s) for s in srcs]
    assert w["0.weight"].shape == (10 * k, 6)
    assert w["2.weight"].shape == (12 * k, 10 * k)
    assert w["4.weight"].shape == (3, 12 * k)
    for m, a in enumerate(inputs):
        # first layer: members' rows stacked; hidden: trained layers on the diagonal; last: columns / K
        assert torch.allclose(w["0.weight"][10 * m:10 * (m + 1)], a["0.weight"], atol=1e-5)
        assert torch.allclose(w["2.weight"][12 * m:12 * (m + 1), 10 * m:10 * (m + 1)], a["2.weight"], atol=1e-5)
        assert torch.allclose(w["4.weight"][:, 12 * m:12 * (m + 1)], a["4.weight"] / k, atol=1e-6)
        assert torch.equal(w["2.bias"][12 * m:12 * (m + 1)], a["2.bias"])
    assert torch.allclose(w["4.bias"], torch.stack([a["4.bias"] for a in inputs]).mean(0))


def test_off_diagonal_blocks_are_new_orthogonal_combinations(tmp_path):
    srcs = members(tmp_path, 2)
    out = tmp_path / "mix.safetensors"
    report = grow(srcs, out, GrowOptions(method="mixture"))
    assert "2 new off-diagonal blocks, 2 with coefficients orthogonal" in report.notes[1]
    w, inputs = weights(out), [weights(s) for s in srcs]
    coefs = []
    for r, c in [(0, 1), (1, 0)]:
        block = w["2.weight"][12 * r:12 * (r + 1), 10 * c:10 * (c + 1)].double()
        templates = spectral_templates(inputs[r]["2.weight"], 3).double()
        # the block is a combination of member r's templates: solve for the coefficients
        sol = torch.linalg.lstsq(templates.reshape(3, -1).T, block.reshape(-1, 1)).solution.reshape(-1)
        assert torch.allclose(torch.einsum("t,tij->ij", sol, templates), block, atol=1e-4)
        coefs.append(sol)
    ones = torch.ones(3, dtype=torch.float64)
    # orthogonal to the trained members' coefficients (1,1,1) and to each other; same norm as them
    assert abs(float(coefs[0] @ ones)) < 1e-3 and abs(float(coefs[1] @ ones)) < 1e-3
    assert abs(float(coefs[0] @ coefs[1])) < 1e-3
    assert float(coefs[0].norm()) == pytest.approx(3 ** 0.5, rel=1e-3)


def test_zero_coefficients_give_the_ensemble(tmp_path):
    srcs = members(tmp_path, 3)
    out = tmp_path / "mix.safetensors"
    grow(srcs, out, GrowOptions(method="mixture", coef_scale=0.0))
    x = {"input": torch.randn(7, 6, generator=torch.Generator().manual_seed(0))}
    ensemble = torch.stack([run_family(s, x) for s in srcs]).mean(0)
    atol = network_atol(ensemble, widest_fan_in(weights(out)))  # one wider sum against three narrow ones
    assert torch.allclose(run_family(out, x), ensemble, rtol=0, atol=atol)


def test_orthogonal_coefficients_property():
    g = torch.Generator().manual_seed(0)
    existing = torch.randn(3, 5, generator=g)
    v, ok = orthogonal_coefficients(existing, g)
    assert ok and torch.allclose(existing @ v, torch.zeros(3), atol=1e-5)
    assert float(v.norm()) == pytest.approx(1.0)
    _, ok = orthogonal_coefficients(torch.randn(5, 5, generator=g), g)
    assert not ok


def test_spectral_templates_sum_to_weight():
    w = torch.randn(9, 7, generator=torch.Generator().manual_seed(1))
    t = spectral_templates(w, 4)
    assert t.shape == (4, 9, 7)
    assert torch.allclose(t.sum(0), w, atol=1e-5)


def test_template_form_input(tmp_path):
    """A checkpoint as the MixtureGrowth code writes it: two template sets and member coefficients per layer."""
    g = torch.Generator().manual_seed(4)
    shapes = {"layers.0": (5, 6), "layers.1": (4, 5), "layers.2": (3, 8)}  # [out_t, in_t] per template
    state = {}
    for prefix, (o, i) in shapes.items():
        for s in range(2):
            state[f"{prefix}.trainable_parameters.template_set_{s}"] = torch.randn(4, o, i, generator=g)
            state[f"{prefix}.coefficients.coefs_member_{s}"] = torch.randn(4, generator=g)
    src = tmp_path / "templates.safetensors"
    save_file(state, src)
    out = tmp_path / "grown.safetensors"
    report = grow([src], out, GrowOptions(method="mixture", seed=3))
    w = weights(out)
    assert w["layers.0.weight"].shape == (10, 6)
    assert w["layers.1.weight"].shape == (8, 10)
    assert w["layers.2.weight"].shape == (3, 16)
    member = {s: torch.einsum("t,tij->ij", state[f"layers.1.coefficients.coefs_member_{s}"],
                              state[f"layers.1.trainable_parameters.template_set_{s}"]) for s in range(2)}
    assert torch.allclose(w["layers.1.weight"][:4, :5], member[0], atol=1e-5)
    assert torch.allclose(w["layers.1.weight"][4:, 5:], member[1], atol=1e-5)
    tpl = state["layers.1.trainable_parameters.template_set_0"]
    sol = torch.linalg.lstsq(tpl.reshape(4, -1).T, w["layers.1.weight"][:4, 5:].reshape(-1, 1)).solution.reshape(-1)
    for s in range(2):
        assert abs(float(sol @ state[f"layers.1.coefficients.coefs_member_{s}"])) < 1e-3
    assert "template form" in report.notes[0]


def test_different_shapes_refused(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", sizes=SIZES)
    b = save_mlp(tmp_path / "b.safetensors", sizes=(6, 11, 12, 3))
    out = tmp_path / "mix.safetensors"
    with pytest.raises(SurgeryError, match=r"different shapes: tensor '0.bias' is \[10\] in .*a.safetensors "
                                           r"and \[11\] in .*b.safetensors"):
        grow([a, b], out, GrowOptions(method="mixture"))
    assert not out.exists()


def test_needs_two_plain_inputs(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors")
    with pytest.raises(SurgeryError, match="two or more"):
        grow([a], tmp_path / "mix.safetensors", GrowOptions(method="mixture"))
    assert not (tmp_path / "mix.safetensors").exists()


def test_members_of_different_activations_are_refused(tmp_path):
    """The activation is part of the architecture (safetensors metadata 'modelsurgery.activation'): a tanh
    member mixed with a ReLU one would run as tanh (the first input's metadata), so the grown net is not
    their ensemble at --coef-scale 0. Refused naming the activations; nothing written. ReLU named or left
    to the default is one architecture."""
    a, b, c = members(tmp_path, 3)
    for path, act in ((a, "tanh"), (b, "relu")):
        save_file(weights(path), path, metadata={"format": "pt", "modelsurgery.activation": act})
    out = tmp_path / "mix.safetensors"
    with pytest.raises(SurgeryError, match=r"activation is 'tanh' in .* and 'relu' in"):
        grow([a, b], out, GrowOptions(method="mixture", coef_scale=0.0))
    assert not out.exists()
    grow([b, c], out, GrowOptions(method="mixture", coef_scale=0.0))  # c: no metadata, ReLU by default
    x = {"input": torch.randn(7, 6, generator=torch.Generator().manual_seed(0))}
    want = (run_family(b, x) + run_family(c, x)) / 2  # one wider sum against two: a bound scaled to the logits
    torch.testing.assert_close(run_family(out, x), want, atol=network_atol(want, widest_fan_in(weights(out))), rtol=0)
