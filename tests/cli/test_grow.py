"""`surgery grow` end to end through the Typer app: --json, rich output, one-line errors, --plan."""

import json

import torch
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.ops.grow.helpers import hf_folder, run_family, save_mlp, weights

runner = CliRunner()


def test_stack_json(tmp_path):
    src = hf_folder(tmp_path, "gpt2")
    out = tmp_path / "grown"
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "stack", "--factor", "2", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["layers_before"] == 3 and report["layers_after"] == 6
    assert report["layout"] == [0, 1, 2, 0, 1, 2]
    assert (out / "config.json").is_file()


def test_width_table_and_function(tmp_path):
    src = save_mlp(tmp_path / "mlp.safetensors")
    out = tmp_path / "wide.safetensors"
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "width", "--factor", "2", "--split"])
    assert r.exit_code == 0, r.output
    assert "function preserving" in r.stdout and "10 -> 20" in r.stdout
    x = {"input": torch.randn(3, 6)}
    assert torch.allclose(run_family(out, x), run_family(src, x), atol=1e-5)


def test_mixture_cli(tmp_path):
    a = save_mlp(tmp_path / "a.safetensors", seed=0)
    b = save_mlp(tmp_path / "b.safetensors", seed=1)
    out = tmp_path / "mix.safetensors"
    r = runner.invoke(app, ["grow", str(a), str(b), "-o", str(out), "--method", "mixture", "--json"])
    assert r.exit_code == 0, r.output
    assert weights(out)["2.weight"].shape == (24, 20)


def test_errors_are_one_line_and_write_nothing(tmp_path):
    src = hf_folder(tmp_path, "gpt2")
    out = tmp_path / "grown"
    for args, msg in [(["--factor", "0.5"], "--factor 0.5"), (["--layers", "0:9"], "out of range")]:
        r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "stack", *args])
        assert r.exit_code == 1
        assert r.stderr.strip().startswith("error:") and msg in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not out.exists()
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "nope"])
    assert r.exit_code == 1 and "unknown growth method 'nope'" in r.stderr


def test_plan_cli():
    r = runner.invoke(app, ["grow", "--plan", "--params", "7B", "--tokens", "300B", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["growth_factor"] == 4
    assert abs(plan["growth_tokens"] / 2.0479e10 - 1) < 2e-4  # hand computation in tests/ops/grow/test_plan.py
    r = runner.invoke(app, ["grow", "--plan", "--params", "7B", "--tokens", "300B"])
    assert "2.048e+10" in r.stdout and "--factor 4" in r.stdout


def test_provenance_hash_and_no_input_hash(tmp_path):
    import hashlib

    from modelsurgery.checkpoint import Checkpoint

    src = save_mlp(tmp_path / "mlp.safetensors")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    for flag, out in [([], tmp_path / "a.safetensors"), (["--no-input-hash"], tmp_path / "b.safetensors")]:
        r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "width", *flag])
        assert r.exit_code == 0, r.output
        record = json.loads(Checkpoint.open(out).metadata["modelsurgery"])
        assert record["operation"] == "grow.width"
        if flag:
            assert record["sources"] == [] and record["parameters"]["inputs_unhashed"] == [str(src)]
        else:
            assert record["sources"][0]["sha256"] == digest


def test_plan_cli_warns_when_growth_comes_after_the_budget():
    r = runner.invoke(app, ["grow", "--plan", "--params", "410M", "--tokens", "10B", "--json"])
    assert r.exit_code == 0, r.output
    assert "not less than the whole budget" in r.stderr and json.loads(r.stdout)["warnings"]
