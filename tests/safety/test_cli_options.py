"""Issue #14 items 2, 9, 12, 13 through the CLI: options range-checked with the allowed range in a one-line
message, OS errors (full disk, bad output names) as one line, symlinked side files never carried."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.checkpoint.helpers import snapshot
from tests.ops.grow.helpers import hf_folder, save_mlp

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


GROW_CASES = [
    (["--method", "width", "--init-scale", "nan"], ["--init-scale", "finite"]),
    (["--method", "width", "--init-scale", "-1"], ["--init-scale", ">= 0"]),
    (["--method", "width", "--factor", "inf"], ["--factor", "finite"]),
    (["--method", "stack", "--factor", "1e9"], ["--factor", "[1, 64]"]),
    (["--method", "stack", "--factor", "0"], ["--factor", "[1, 64]"]),
    (["--method", "stack", "--factor", "1.5"], ["--factor", "integer"]),
    (["--method", "width", "--factor", "1"], ["--factor", "(1, 64]"]),
    (["--method", "interleave", "--every", "0"], ["--every", ">= 1"]),
    (["--method", "mixture", "--templates", "0"], ["--templates", ">= 1"]),
    (["--method", "mixture", "--coef-scale", "nan"], ["--coef-scale", "finite"]),
    (["--max-shard-size", "0"], ["max shard size", "at least 1 byte"]),
    (["--seed", "-1"], ["--seed"]),
]


@pytest.mark.parametrize("args,words", GROW_CASES)
def test_grow_options_range_checked(tmp_path, args, words):
    src = save_mlp(tmp_path / "mlp.safetensors")
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["grow", str(src), "-o", str(tmp_path / "out.safetensors"), *args])
    _one_line_error(r, *words)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args,words", [
    (["--old-classes", "0"], ["--old-classes", ">= 1"]),
    (["--old-classes", "5", "--norm", "3"], ["--norm", "1, 2"]),
    (["--old-classes", "5", "--bias", "bogus"], ["--bias", "scale, keep"]),
])
def test_align_options_range_checked(tmp_path, fixtures_dir, args, words):
    src = fixtures_dir / "digits" / "incremental_clipped.safetensors"
    r = runner.invoke(app, ["align", str(src), "-o", str(tmp_path / "a.safetensors"), *args])
    _one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,words", [
    (["--samples", "0"], ["--samples", "[1, 4096]"]),
    (["--samples", "-1"], ["--samples", "[1, 4096]"]),
    (["--seq-len", "0"], ["--seq-len", ">= 1"]),
    (["--tolerance", "nan"], ["--tolerance", "finite"]),
    (["--tolerance", "0"], ["--tolerance", "> 0"]),
    (["--dtype", "bogus"], ["--dtype", "fp32, fp16"]),
])
def test_export_options_range_checked(tmp_path, fixtures_dir, args, words):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    r = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.onnx"), *args])
    _one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


def test_export_never_replaces_existing_external_data(tmp_path, fixtures_dir):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    (tmp_path / "m.onnx.data").write_bytes(b"someone's data")
    r = runner.invoke(app, ["export", str(src), "-o", str(tmp_path / "m.onnx"), "--no-check"])
    _one_line_error(r, "m.onnx.data", "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx.data"]


@pytest.mark.parametrize("out", [".", "", ".."])
def test_output_that_names_no_file_is_one_line(tmp_path, out, monkeypatch):
    src = save_mlp(tmp_path / "mlp.safetensors")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["grow", str(src), "-o", out, "--method", "width", "--force"])
    _one_line_error(r, "names no file or folder")
    assert snapshot(tmp_path) == before


def test_output_inside_the_input_folder_refused(tmp_path):
    src = hf_folder(tmp_path, "gpt2")
    before = snapshot(src)
    for out in (src / "grown", src / "grown.safetensors"):
        r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "stack", "--force"])
        _one_line_error(r, "would overwrite the input")
    assert snapshot(src) == before


def test_symlinked_side_file_is_not_carried(tmp_path):
    src = hf_folder(tmp_path, "gpt2")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    (src / "tokenizer.json").unlink(missing_ok=True)
    (src / "tokenizer.json").symlink_to(secret)
    os.mkfifo(src / "vocab.pipe")
    (src / "merges.txt").write_text("kept")
    out = tmp_path / "grown"
    r = runner.invoke(app, ["grow", str(src), "-o", str(out), "--method", "stack"])
    assert r.exit_code == 0, r.output
    assert "tokenizer.json: not carried" in r.stderr and "outside the checkpoint folder" in r.stderr
    assert "vocab.pipe: not carried" in r.stderr
    assert not (out / "tokenizer.json").exists() and (out / "merges.txt").read_text() == "kept"
    assert all("TOPSECRET" not in p.read_text(errors="replace") for p in out.iterdir())


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A file-size limit makes writes fail with EFBIG, as a full disk fails with ENOSPC."""
    src = save_mlp(tmp_path / "mlp.safetensors")
    work = tmp_path / "out"
    work.mkdir()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run([sys.executable, "-m", "modelsurgery", "grow", str(src), "-o", str(work / "o.safetensors"),
                        "--method", "width", "--factor", "64", "--quiet"], cwd=ROOT, capture_output=True,
                       text=True, preexec_fn=limit, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nothing was written" in lines[0], r.stderr
    assert list(work.iterdir()) == []


def test_eval_data_is_never_the_output(tmp_path, fixtures_dir):
    src = fixtures_dir / "digits" / "incremental_clipped.safetensors"
    data = tmp_path / "eval.safetensors"
    data.write_bytes((fixtures_dir / "data" / "digits_eval.safetensors").read_bytes())
    before = snapshot(tmp_path)
    r = runner.invoke(app, ["align", str(src), "-o", str(data), "--old-classes", "5", "--eval", str(data),
                            "--force"])
    _one_line_error(r, "would overwrite the input")
    assert snapshot(tmp_path) == before


def test_output_inside_a_plain_input_folder_refused(tmp_path):
    """A folder without config.json: the folder as given on the command line is protected."""
    src = tmp_path / "mlp"
    src.mkdir()
    save_mlp(src / "model.safetensors")
    r = runner.invoke(app, ["grow", str(src), "-o", str(src / "wide.safetensors"), "--method", "width"])
    _one_line_error(r, "would overwrite the input")
    assert sorted(p.name for p in src.iterdir()) == ["model.safetensors"]


def test_check_device():
    import torch

    from modelsurgery.cli.common import check_device
    from modelsurgery.errors import SurgeryError

    assert check_device("cpu") == "cpu" and check_device(None) is None
    for bad, words in [("bogus", "not a device"), ("meta", "unsupported device type")]:
        with pytest.raises(SurgeryError, match=words):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SurgeryError, match="CUDA is not available"):
            check_device("cuda")


MERGE_CASES = [
    (["--weights", "nan,1"], ["--weights", "finite"]),
    (["--weights", "inf,1"], ["--weights", "finite"]),
    (["--alpha", "nan"], ["--alpha", "finite"]),
    (["--points", "0"], ["--points", "[1, 1001]"]),
    (["--points", "-1"], ["--points", "[1, 1001]"]),
    (["--points", "100000"], ["--points", "[1, 1001]"]),
    (["--device", "bogus"], ["--device", "not a device"]),
]


@pytest.mark.parametrize("args,words", MERGE_CASES)
def test_merge_options_range_checked(tmp_path, fixtures_dir, args, words):
    a, b = fixtures_dir / "digits" / "mlp_seed0.safetensors", fixtures_dir / "digits" / "mlp_seed1.safetensors"
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "m.safetensors"), *args])
    _one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,words", [(["--top-k", "0"], ["--top-k", ">= 1"]),
                                        (["--top-k", "-1"], ["--top-k", ">= 1"])])
def test_analyze_options_range_checked(fixtures_dir, args, words):
    a, b = fixtures_dir / "digits" / "mlp_seed0.safetensors", fixtures_dir / "digits" / "mlp_seed1.safetensors"
    _one_line_error(runner.invoke(app, ["analyze", str(a), str(b), *args]), *words)


def test_merge_plot_and_eval_follow_the_output_rules(tmp_path, fixtures_dir):
    """Issue #14 item 7: an existing plot is not overwritten, a plot in a missing folder is refused before
    the merged checkpoint is written, and the evaluation data is never the output."""
    a, b = fixtures_dir / "digits" / "mlp_seed0.safetensors", fixtures_dir / "digits" / "mlp_seed1.safetensors"
    data = tmp_path / "eval.safetensors"
    data.write_bytes((fixtures_dir / "data" / "digits_eval.safetensors").read_bytes())
    plot = tmp_path / "p.png"
    plot.write_bytes(b"an older plot")
    before = snapshot(tmp_path)
    common = ["merge", str(a), str(b), "--eval", str(data), "--points", "3"]
    for args, words in [(["-o", str(tmp_path / "m.safetensors"), "--plot", str(plot)], ["p.png", "already exists"]),
                        (["-o", str(tmp_path / "m.safetensors"), "--plot", str(tmp_path / "nodir" / "p.png")],
                         ["output folder does not exist"]),
                        (["-o", str(data), "--force"], ["would overwrite the input"])]:
        _one_line_error(runner.invoke(app, [*common, *args]), *words)
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args,words", [
    (["--samples", "0"], ["--samples", "[1, 1000000]"]),
    (["--samples", "-1"], ["--samples", "[1, 1000000]"]),
    (["--seq-len", "0"], ["--seq-len", ">= 1"]),
    (["--method", "flexround", "--lr", "inf"], ["--lr", "finite"]),
    (["--method", "flexround", "--lr", "nan"], ["--lr", "finite"]),
    (["--method", "adaround", "--steps", "-1"], ["--steps"]),
])
def test_quantize_options_range_checked(tmp_path, fixtures_dir, args, words):
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    calib = fixtures_dir / "data" / "digits_calib.safetensors"
    r = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "q.safetensors"), "--calib", str(calib),
                            *args])
    _one_line_error(r, *words)
    assert list(tmp_path.iterdir()) == []


def test_quantize_never_writes_over_its_calibration_data(tmp_path, fixtures_dir):
    """Issue #14 item 6: `-o calib.safetensors --calib calib.safetensors --force` replaced the data."""
    src = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    calib = tmp_path / "calib.safetensors"
    calib.write_bytes((fixtures_dir / "data" / "digits_calib.safetensors").read_bytes())
    before = snapshot(tmp_path)
    for flag in ("--calib", "--eval"):
        r = runner.invoke(app, ["quantize", str(src), "-o", str(calib), flag, str(calib), "--method", "rtn",
                                "--force"])
        _one_line_error(r, "would overwrite the input")
    assert snapshot(tmp_path) == before
