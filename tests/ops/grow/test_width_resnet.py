"""Width growth of ResNets: every residual block's inner width (conv1 -> bn1 -> conv2) grows, the residual
stream does not. Checked against a functional forward pass written from the state dict (independent of the
family's module), on the digits fixture with real inputs, and against the reference CIFAR ResNet of the
family tests for other geometries (option-A shortcuts, ``downsample``/``fc`` names, several blocks a stage)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app
from modelsurgery.families import detect_family
from modelsurgery.ops.grow import GrowOptions, grow
from modelsurgery.ops.match.derive import permutation_spec
from tests.families.test_resnet import _permute, ref
from tests.ops.grow.helpers import weights

BLOCK = re.compile(r"(layer\d+\.\d+)\.conv1\.weight")


def fixture(fixtures_dir):
    src = fixtures_dir / "digits" / "resnet_seed0.safetensors"
    if not src.is_file():
        pytest.skip("digits fixtures not generated")
    return src


def digits(fixtures_dir, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_file(fixtures_dir / "data" / "digits_eval.safetensors")
    return data["inputs"][:n], data["labels"][:n]


def block_prefixes(state) -> list[str]:
    return sorted(m.group(1) for k in state if (m := BLOCK.fullmatch(k)))


def reference_logits(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The fixture's ResNet (fixtures/make_fixtures.py) as plain functional calls on the state dict: every
    width comes from the tensors, a block with a projection shortcut has stride 2."""

    def bn(h, name):
        return F.batch_norm(h, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                            state[f"{name}.bias"], training=False, eps=1e-5)

    h = F.relu(bn(F.conv2d(x.view(-1, 1, 8, 8), state["conv1.weight"], padding=1), "bn1"))
    for p in block_prefixes(state):
        proj = f"{p}.shortcut.0.weight" in state
        stride = 2 if proj else 1
        out = F.relu(bn(F.conv2d(h, state[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
        out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
        short = bn(F.conv2d(h, state[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1") if proj else h
        h = F.relu(out + short)
    return F.linear(h.mean((2, 3)), state["linear.weight"], state["linear.bias"])


def family_logits(path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return detect_family(Checkpoint.open(path)).build_module()(input=x)


def grow_fixture(tmp_path, fixtures_dir, **options):
    src = fixture(fixtures_dir)
    out = tmp_path / "wide.safetensors"
    report = grow([src], out, GrowOptions(method="width", **options))
    return src, out, report


def max_diff(src, out, x) -> float:
    """Largest logit difference, grown model (as the family builds it, and as the reference computes it)
    against the original through the reference."""
    with torch.no_grad():
        want = reference_logits(weights(src), x)
        return max((family_logits(out, x) - want).abs().max().item(),
                   (reference_logits(weights(out), x) - want).abs().max().item())


def test_reference_reproduces_the_fixture(fixtures_dir):
    x, y = digits(fixtures_dir)
    with torch.no_grad():
        logits = reference_logits(weights(fixture(fixtures_dir)), x)
    assert (logits.argmax(1) == y).float().mean() > 0.95
    assert torch.allclose(family_logits(fixture(fixtures_dir), x), logits, atol=1e-5)


def test_zero_fan_out_x2_is_exact_and_only_the_inner_width_grows(tmp_path, fixtures_dir):
    src, out, report = grow_fixture(tmp_path, fixtures_dir, factor=2)
    a, b = weights(src), weights(out)
    prefixes = block_prefixes(a)
    assert len(prefixes) == 3
    for p in prefixes:
        old = a[f"{p}.conv1.weight"].shape[0]
        assert b[f"{p}.conv1.weight"].shape == (2 * old, *a[f"{p}.conv1.weight"].shape[1:])
        for stat in ("weight", "bias", "running_mean", "running_var"):
            assert b[f"{p}.bn1.{stat}"].shape == (2 * old,)
        assert torch.equal(b[f"{p}.bn1.num_batches_tracked"], a[f"{p}.bn1.num_batches_tracked"])
        assert b[f"{p}.conv2.weight"].shape == (a[f"{p}.conv2.weight"].shape[0], 2 * old, 3, 3)
        # trained channels untouched; new ones: random fan-in, zero fan-out
        assert torch.equal(b[f"{p}.conv1.weight"][:old], a[f"{p}.conv1.weight"])
        assert torch.equal(b[f"{p}.conv2.weight"][:, :old], a[f"{p}.conv2.weight"])
        assert b[f"{p}.conv1.weight"][old:].abs().sum() > 0
        assert not b[f"{p}.conv2.weight"][:, old:].any()
        assert report.width_before[f"{p}.inner"] == old and report.width_after[f"{p}.inner"] == 2 * old
    # nothing else changes: the residual stream (stem, conv2 outputs, bn2, shortcuts, head) keeps its width
    grown = {f"{p}.{t}" for p in prefixes for t in ("conv1.weight", "conv2.weight", "bn1.weight", "bn1.bias",
                                                     "bn1.running_mean", "bn1.running_var")}
    assert b.keys() == a.keys()
    assert {k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])} == grown
    before, after = (detect_family(Checkpoint.open(p)).describe() for p in (src, out))
    assert after["widths"] == before["widths"] == [16, 16, 32, 64]
    assert after["inner_widths"] == [32, 64, 128]
    x, _ = digits(fixtures_dir)
    assert max_diff(src, out, x) <= 1e-5


def test_split_x2_preserves_within_1e4(tmp_path, fixtures_dir):
    src, out, _ = grow_fixture(tmp_path, fixtures_dir, factor=2, split=True)
    a, b = weights(src), weights(out)
    for p in block_prefixes(a):
        old_rows, rows = a[f"{p}.conv1.weight"], b[f"{p}.conv1.weight"]
        old = old_rows.shape[0]
        # Net2Net: every new channel copies one trained channel (fan-in and BN), each copied once at x2,
        # and the pair's fan-out sums to the trained one
        sources = [next(j for j in range(old) if torch.equal(rows[old + k], old_rows[j])) for k in range(old)]
        assert sorted(sources) == list(range(old))
        src_idx = torch.tensor(sources)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(b[f"{p}.bn1.{stat}"][old:], a[f"{p}.bn1.{stat}"][src_idx])
        w2 = b[f"{p}.conv2.weight"]
        assert torch.allclose(w2[:, src_idx] + w2[:, old:], a[f"{p}.conv2.weight"][:, src_idx], atol=1e-6)
    x, _ = digits(fixtures_dir)
    assert max_diff(src, out, x) <= 1e-4


@pytest.mark.parametrize("split", [False, True])
def test_factor_one_and_a_half(tmp_path, fixtures_dir, split):
    src, out, report = grow_fixture(tmp_path, fixtures_dir, factor=1.5, split=split)
    b = weights(out)
    assert [b[f"{p}.conv1.weight"].shape[0] for p in block_prefixes(b)] == [24, 48, 96]
    assert sorted(report.width_after.values()) == [24, 48, 96]
    x, _ = digits(fixtures_dir)
    assert max_diff(src, out, x) <= (1e-4 if split else 1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_grown_model_trains_its_new_channels(tmp_path, fixtures_dir, split):
    src, out, _ = grow_fixture(tmp_path, fixtures_dir, factor=2, split=split)
    model = detect_family(Checkpoint.open(out)).build_module()
    model.train()
    x, y = digits(fixtures_dir, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(model(input=x), y).backward()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    for p in block_prefixes(weights(src)):
        old = weights(src)[f"{p}.conv1.weight"].shape[0]
        # split: the copies have fan-out, so their fan-in learns; zero fan-out: the fan-out learns first
        name, new = (f"{p}.conv1.weight", (slice(old, None),)) if split else (
            f"{p}.conv2.weight", (slice(None), slice(old, None)))
        assert params[name].grad[new].abs().sum() > 0, name
    opt.step()
    for p in block_prefixes(weights(src)):
        name = f"{p}.conv1.weight" if split else f"{p}.conv2.weight"
        assert not torch.equal(params[name].detach(), before[name]), name


CONFIGS = [
    {"blocks": (2, 2), "width": 4, "option": "A"},
    {"blocks": (1, 2), "width": 8, "option": "B", "head": "fc", "shortcut": "downsample"},
]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_other_geometries_against_the_reference_resnet(tmp_path, cfg, split):
    model = ref(**cfg)
    src = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    out = tmp_path / "wide.safetensors"
    grow([src], out, GrowOptions(method="width", factor=1.5, split=split))
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    assert torch.allclose(family_logits(out, x), want, atol=1e-5)
    fam = detect_family(Checkpoint.open(out))
    inner = fam.inner_groups()
    assert [g.size for g in inner] == [round(b.out_channels * 1.5) for b in fam.res_blocks()]
    # weight matching's permutation spec fits the grown shapes, and the grown inner groups are symmetries
    permutation_spec(fam)
    with torch.no_grad():
        permuted = fam.build_module(_permute(weights(out), inner, seed=2))(input=x)
    assert torch.allclose(permuted, want, atol=1e-5)


def test_cli_grow_width_then_inspect(tmp_path, fixtures_dir):
    src = fixture(fixtures_dir)
    out = tmp_path / "wide.safetensors"
    runner = CliRunner()
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "width"])
    assert r.exit_code == 0, r.output
    assert "16 -> 32" in r.stdout and "64 -> 128" in r.stdout
    before, after = (json.loads(runner.invoke(app, ["inspect", str(p), "--json"]).stdout) for p in (src, out))
    assert after["family"] == "resnet" and after["family_info"]["widths"] == before["family_info"]["widths"]
    assert after["family_info"]["inner_widths"] == [2 * w for w in before["family_info"]["inner_widths"]]
    assert after["num_parameters"] > before["num_parameters"]
    x, _ = digits(fixtures_dir, 32)
    assert torch.allclose(family_logits(out, x), family_logits(src, x), atol=1e-5)
