"""`surgery demo`: the analyze step against a hand computation, labels that say which changes are by
design and which must be ~0, --only, and (slow) the whole demo with its like-for-like quantize sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.cli.demo import STEPS, analyze_step

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def test_analyze_step_against_a_hand_computation(fixtures_dir, tmp_path):
    """Distance and top-1 alignment before matching, from the files with numpy; matching must improve both."""
    a = load_file(fixtures_dir / "digits" / "mlp_seed0.safetensors")
    b = load_file(fixtures_dir / "digits" / "mlp_seed1.safetensors")
    matrices = [k for k in a if a[k].ndim == 2]
    distance = math.sqrt(sum(float(((a[k] - b[k]).astype(np.float64) ** 2).sum()) for k in matrices))
    align = []
    for k in matrices:
        ua, _, vha = np.linalg.svd(a[k].astype(np.float64), full_matrices=False)
        ub, _, vhb = np.linalg.svd(b[k].astype(np.float64), full_matrices=False)
        align.append(abs(ua[:, 0] @ ub[:, 0]) * abs(vha[0] @ vhb[0]))

    s = analyze_step(fixtures_dir, tmp_path, quiet=True)
    assert s["layers"] == len(matrices) == 3
    assert s["distance_before"] == pytest.approx(distance, rel=1e-5)
    assert s["top1_alignment_before"] == pytest.approx(sum(align) / len(align), abs=1e-4)
    assert s["distance_after"] < s["distance_before"]
    assert s["top1_alignment_after"] > s["top1_alignment_before"]
    assert s["objective_after"] >= s["objective_before"]
    assert list(tmp_path.iterdir()) == []  # analyze writes nothing


def test_demo_labels_what_each_change_means():
    r = runner.invoke(app, ["demo", "--only", "analyze,grow"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps lines at the terminal width
    assert "analyze mlp_seed0.safetensors vs mlp_seed1.safetensors (3 weight matrices)" in text
    assert "surgery analyze fixtures/digits/mlp_seed0.safetensors fixtures/digits/mlp_seed1.safetensors" in text
    assert "max change vs input" in text and "(stacking changes the function by design" in text
    assert "(function-preserving: should be ~0)" in text
    assert "merge" not in text.split("analyze", 1)[0]  # steps left out by --only do not run


def test_demo_json_has_the_chosen_steps_only():
    r = runner.invoke(app, ["demo", "--only", "grow,analyze", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert list(result) == ["analyze", "grow"]  # the demo's order, not the option's
    assert result["grow"]["width"]["max_output_change"] < 1e-5  # function-preserving
    assert result["grow"]["stack"]["max_output_change"] > 0.1  # changes the function by design


def test_demo_only_refuses_an_unknown_step(tmp_path):
    r = runner.invoke(app, ["demo", "--only", "merge,nope", "--keep", str(tmp_path / "k")])
    assert r.exit_code == 1
    assert r.output.count("\n") == 1 and "--only merge,nope" in r.output and "analyze" in r.output
    assert not (tmp_path / "k").exists()


@pytest.mark.slow
def test_whole_demo(tmp_path):
    """Every step once; the quantize sizes compare like with like: both files packed, and the bytes the
    table shows are each file's tensor bytes as read back from it."""
    keep = tmp_path / "demo"
    r = runner.invoke(app, ["demo", "--keep", str(keep), "--fixtures", str(ROOT / "fixtures"), "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert list(result) == list(STEPS)
    for method in ("rtn", "flexround"):
        path = keep / f"mlp_{method}_3bit.safetensors"
        with safe_open(str(path), "np") as f:
            assert json.loads(f.metadata()["modelsurgery.quantization"])["format"] == "packed", method
            data_bytes = sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118 (not iterable)
        assert result["quantize"][method]["bytes"] == data_bytes, method
    assert result["quantize"]["rtn"]["bytes"] == result["quantize"]["flexround"]["bytes"]
    # what the notes printed above each step say to look for
    merge, align, fold = result["merge"], result["align"], result["fold"]
    assert merge["matched_midpoint_accuracy"] > merge["naive_midpoint_accuracy"]
    assert merge["matched_barrier"] < merge["naive_barrier"]
    assert result["analyze"]["distance_after"] < result["analyze"]["distance_before"]
    assert result["grow"]["width"]["max_output_change"] < 1e-5 < result["grow"]["stack"]["max_output_change"]
    assert align["accuracy_after"] > align["accuracy_before"]
    assert align["new_prediction_share_after"] < align["new_prediction_share_before"]
    assert all(x["max_abs_diff"] < 1e-4 for x in result["export"].values())
    assert fold["max_logit_change"] > 0.01 and fold["extract_max_relative_error"] < 1e-4
