"""`surgery export` through the real Typer app: --json, human output, errors, the demo step."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.cli.export import demo_step
from modelsurgery.export import ort_session
from tests.export.packing import write_packed
from tests.hf_tiny import save_tiny_gpt2


@pytest.fixture
def runner():
    return CliRunner()


def mlp_file(path):
    torch.manual_seed(0)
    save_file({"0.weight": torch.randn(16, 8), "0.bias": torch.randn(16), "2.weight": torch.randn(4, 16)},
              str(path))
    return path


def test_json_is_one_object(tmp_path, runner):
    src = mlp_file(tmp_path / "m.safetensors")
    result = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["family"] == "mlp" and report["opset"] == 17 and report["check"]["passed"]
    ops = report["op_counts"]
    assert ops.get("Gemm", 0) + ops.get("MatMul", 0) == 2
    assert report["file_bytes"] == (tmp_path / "m.onnx").stat().st_size
    out = ort_session(tmp_path / "m.onnx").run(None, {"input": torch.randn(5, 8).numpy()})[0]
    assert out.shape == (5, 4)


def test_packed_human_output(tmp_path, runner):
    torch.manual_seed(0)
    state = {"0.weight": torch.randn(16, 32), "0.bias": torch.randn(16), "2.weight": torch.randn(4, 16)}
    packed, _ = write_packed(state, ["0.weight", "2.weight"], tmp_path / "p.safetensors", 4, 8)
    result = runner.invoke(app, ["export", str(packed), "-o", str(tmp_path / "p.onnx")])
    assert result.exit_code == 0, result.output
    assert "integer weights: 2 (4 bits, group)" in result.stdout
    assert "max abs diff" in result.stdout and "DequantizeLinear" in result.stdout


def test_errors_are_one_line_and_exit_1(tmp_path, runner):
    src = mlp_file(tmp_path / "m.safetensors")
    torch.manual_seed(0)
    packed, _ = write_packed({"0.weight": torch.randn(16, 8)}, ["0.weight"], tmp_path / "p.safetensors", 4)
    result = runner.invoke(app, ["export", str(packed), "-o", str(tmp_path / "p.onnx"), "--opset", "20"])
    assert result.exit_code == 1
    assert "error:" in result.stderr and "--opset 21 or newer (got 20)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()
    (tmp_path / "m.onnx").write_text("x")
    result = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "already exists" in result.stderr


def test_help_has_examples(runner):
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "surgery export" in result.stdout and "--opset" in result.stdout


def test_demo_step_exports_and_runs_a_fixture(tmp_path, fixtures_dir):
    if not (fixtures_dir / "digits" / "mlp_seed0.safetensors").exists():
        pytest.skip("fixtures not generated")
    results = demo_step(fixtures_dir, tmp_path, quiet=True)
    mlp = results["digits/mlp_seed0.safetensors"]
    assert mlp["family"] == "mlp" and mlp["max_abs_diff"] < 1e-4
    assert ort_session(tmp_path / "mlp_seed0.onnx").run(None, {"input": torch.rand(2, 64).numpy()})[0].shape == (2, 10)


@pytest.mark.parametrize("flag", [["--tolerance", "1e-3"], ["--data", "DATA"], ["--samples", "3"]])
def test_check_options_with_no_check_are_refused_not_ignored(tmp_path, runner, flag):
    """--tolerance, --data and --samples only configure the ONNX Runtime check (their help: "the check accepts",
    "inputs for the check", "check inputs"); with --no-check nothing would read them, so a tolerance the user
    asked for would be silently unchecked: refused in one line, nothing written."""
    src = mlp_file(tmp_path / "m.safetensors")
    save_file({"inputs": torch.randn(4, 8)}, tmp_path / "d.safetensors")
    args = [a.replace("DATA", str(tmp_path / "d.safetensors")) for a in flag]
    result = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.onnx"), "--no-check", *args])
    assert result.exit_code == 1 and f"{flag[0]} configures the check" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()
    result = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.onnx"), *args])
    assert result.exit_code == 0, result.output


def test_seq_len_nothing_reads_is_refused(tmp_path, runner):
    """--seq-len cuts generated token samples and --data text lines: for an MLP (feature inputs), for --data
    tensors (used as stored) and with --no-check nothing reads it, so it is refused in one line with nothing
    written; on a token model it sets the check inputs' length (ORT is fed [4, 5] token ids)."""
    src = mlp_file(tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    for args, words in ((["--seq-len", "5"], "model of feature inputs"),
                        (["--seq-len", "5", "--no-check"], "--seq-len configures the check")):
        result = runner.invoke(app, ["export", str(src), "-o", str(out), *args])
        assert result.exit_code == 1 and words in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()

    gpt2 = save_tiny_gpt2(tmp_path / "gpt2")
    save_file({"input_ids": torch.randint(0, 50, (4, 6))}, tmp_path / "ids.safetensors")
    result = runner.invoke(app, ["export", str(gpt2), "-o", str(out), "--seq-len", "5",
                                 "--data", str(tmp_path / "ids.safetensors")])
    assert result.exit_code == 1 and "holds tensors" in result.stderr and not out.exists(), result.output
    result = runner.invoke(app, ["export", str(gpt2), "-o", str(out), "--seq-len", "5", "--json"])
    assert result.exit_code == 0, result.output
    check = json.loads(result.stdout)["check"]
    assert check["passed"] and check["input_shapes"]["input_ids"] == [4, 5] and out.exists()
