"""Width growth preserves the function (within 1e-5) for every family it applies to, in both modes."""

import json

import pytest
import torch

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.errors import SurgeryError
from modelsurgery.families import detect_family
from modelsurgery.ops.grow import GrowOptions, grow
from tests.float_bounds import network_atol, widest_fan_in
from tests.hf_tiny import load_hf
from tests.ops.grow.helpers import hf_folder, run_family, save_flat_cnn, save_mlp, weights

INNER_KEY = {"gpt2": "n_inner", "llama": "intermediate_size", "bert": "intermediate_size"}


def example(path, batch=5):
    fam = detect_family(Checkpoint.open(path))
    return fam.example_inputs(batch=batch, seq_len=6, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
def test_mlp_width(tmp_path, factor, split):
    src = save_mlp(tmp_path / "mlp.safetensors", sizes=(6, 10, 12, 3))
    out = tmp_path / "wide.safetensors"
    grow([src], out, GrowOptions(method="width", factor=factor, split=split, init_scale=0.5))
    w = weights(out)
    assert w["0.weight"].shape == (round(10 * factor), 6)
    assert w["2.weight"].shape == (round(12 * factor), round(10 * factor))
    assert w["4.weight"].shape == (3, round(12 * factor))
    x = example(src)
    before, after = run_family(src, x), run_family(out, x)
    assert torch.allclose(after, before, atol=1e-5)
    # the trained units are untouched (zero fan-out) or kept in place (split)
    assert torch.equal(w["0.weight"][:10], weights(src)["0.weight"])
    new_rows = w["0.weight"][10:]
    assert new_rows.abs().sum() > 0  # not dead: random fan-in or copies


def test_split_is_net2net(tmp_path):
    src = save_mlp(tmp_path / "mlp.safetensors", sizes=(4, 5, 2))
    out = tmp_path / "wide.safetensors"
    grow([src], out, GrowOptions(method="width", factor=2, split=True))
    a, b = weights(src), weights(out)
    rows = b["0.weight"]
    # every new unit copies one old unit's fan-in and bias; each old unit is copied once at factor 2
    sources = [next(j for j in range(5) if torch.equal(rows[5 + k], a["0.weight"][j])) for k in range(5)]
    assert sorted(sources) == list(range(5))
    for k, j in enumerate(sources):
        assert b["0.bias"][5 + k] == a["0.bias"][j]
        # the fan-out of j is shared between j and its copy (sum unchanged)
        assert torch.allclose(b["2.weight"][:, j] + b["2.weight"][:, 5 + k], a["2.weight"][:, j], atol=1e-6)


def test_fixture_mlp_width(tmp_path, fixtures_dir):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    if not src.is_file():
        pytest.skip("digits fixtures not generated")
    out = tmp_path / "wide.safetensors"
    grow([src], out, GrowOptions(method="width", factor=2))
    x = example(src, batch=16)
    assert torch.allclose(run_family(out, x), run_family(src, x), atol=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_cnn_fixture_width(tmp_path, fixtures_dir, split):
    src = fixtures_dir / "digits" / "cnn_seed0.safetensors"
    if not src.is_file():
        pytest.skip("digits fixtures not generated")
    out = tmp_path / "wide.safetensors"
    report = grow([src], out, GrowOptions(method="width", factor=2, split=split))
    assert set(report.width_after.values()) == {32, 64}
    w = weights(out)
    assert w["1.running_var"].shape == (32,) and w["12.weight"].shape == (10, 64)
    x = example(src, batch=8)
    want = run_family(src, x)  # a split unit's halves sum in another order: a bound scaled to the logits
    assert torch.allclose(run_family(out, x), want, rtol=0, atol=network_atol(want, widest_fan_in(weights(out))))


@pytest.mark.parametrize("split", [False, True])
def test_cnn_flatten_keeps_channel_major_columns(tmp_path, split):
    src = save_flat_cnn(tmp_path / "cnn.safetensors")
    out = tmp_path / "wide.safetensors"
    grow([src], out, GrowOptions(method="width", factor=1.5, split=split))
    w = weights(out)
    assert w["0.weight"].shape == (6, 1, 3, 3) and w["3.weight"].shape == (9, 6, 3, 3)
    assert w["6.weight"].shape == (5, 9 * 64)
    x = example(src, batch=4)
    want = run_family(src, x)
    assert torch.allclose(run_family(out, x), want, rtol=0, atol=network_atol(want, widest_fan_in(weights(out))))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_transformer_width_transformers_agrees(tmp_path, kind, split):
    src = hf_folder(tmp_path, kind)
    out = tmp_path / "wide"
    report = grow([src], out, GrowOptions(method="width", factor=2, split=split))
    inner = json.loads((out / "config.json").read_text())[INNER_KEY[kind]]
    assert inner == 2 * next(iter(report.width_before.values()))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = load_hf(src)(input_ids=ids)[0]
        after = load_hf(out)(input_ids=ids)[0]
    assert torch.allclose(after, before, atol=1e-5)
    assert torch.allclose(run_family(out, {"input_ids": ids}), after, atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 0.0, -2])
def test_bad_factor_writes_nothing(tmp_path, factor):
    src = save_mlp(tmp_path / "mlp.safetensors")
    out = tmp_path / "wide.safetensors"
    with pytest.raises(SurgeryError, match=f"--factor {float(factor)}"):
        grow([src], out, GrowOptions(method="width", factor=factor))
    assert not out.exists()


def test_width_unsupported_family(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "odd.safetensors"
    save_file({"a": torch.zeros(3), "b.c": torch.zeros(2, 2, 2)}, src)
    with pytest.raises(SurgeryError, match="no hidden units"):
        grow([src], tmp_path / "o.safetensors", GrowOptions(method="width", factor=2))
    assert not (tmp_path / "o.safetensors").exists()


def test_width_needs_the_mlp_size_in_config(tmp_path):
    """A transformer whose config.json names no MLP size cannot get a consistent config: refused, nothing written."""
    src = hf_folder(tmp_path, "llama")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["intermediate_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "wide"
    with pytest.raises(SurgeryError, match="config.json names no MLP size"):
        grow([src], out, GrowOptions(method="width", factor=2))
    assert not out.exists()


def test_gpt2_config_without_n_inner(tmp_path):
    """The published GPT-2 config.json has no n_inner key (transformers then uses 4 x n_embd): width growth
    writes the grown size there, and transformers runs the grown folder as it runs the source."""
    src = hf_folder(tmp_path, "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["n_inner"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "wide"
    grow([src], out, GrowOptions(method="width", factor=1.5))
    assert json.loads((out / "config.json").read_text())["n_inner"] == 6 * cfg["n_embd"]
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out)(input_ids=ids)[0], load_hf(src)(input_ids=ids)[0],
                                   atol=1e-5, rtol=1e-5)
