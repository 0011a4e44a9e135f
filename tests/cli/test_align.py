"""`surgery align` from the command line: table and chart, --json, warnings on stderr, errors, demo step."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from modelsurgery.cli.align import demo_step
from modelsurgery.cli.app import app

runner = CliRunner()


def toy(path, new_scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    head = torch.randn(6, 8, generator=g)
    head[4:] *= new_scale
    sd = {"0.weight": torch.randn(8, 4, generator=g), "0.bias": torch.randn(8, generator=g), "2.weight": head,
          "2.bias": torch.randn(6, generator=g)}
    save_file(sd, str(path))
    return sd


def test_table_chart_and_output(tmp_path):
    sd = toy(tmp_path / "m.safetensors")
    res = runner.invoke(app, ["align", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "a.safetensors"),
                              "--old-classes", "4", "--norm", "2"])
    assert res.exit_code == 0, res.output
    for text in ("2.weight", "mean norm before", "gamma", "per-class weight norms", "negative weights", "wrote"):
        assert text in res.stdout
    out = load_file(str(tmp_path / "a.safetensors"))
    gamma = sd["2.weight"][:4].norm(dim=1).mean() / sd["2.weight"][4:].norm(dim=1).mean()
    torch.testing.assert_close(out["2.weight"][4:], sd["2.weight"][4:] * gamma)


def test_json_is_one_object(tmp_path):
    toy(tmp_path / "m.safetensors")
    torch.save({"inputs": torch.randn(40, 4), "labels": torch.randint(0, 6, (40,))}, tmp_path / "eval.pt")
    res = runner.invoke(app, ["align", str(tmp_path / "m.safetensors"), "--old-classes", "4", "--json",
                              "--eval", str(tmp_path / "eval.pt")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["output"] is None and report["groups"][1]["classes"] == "4:6"
    assert set(report["eval"]) == {"before", "after"} and "accuracy_old" in report["eval"]["after"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.pt", "m.safetensors"]


def test_premise_warning_goes_to_stderr(tmp_path):
    toy(tmp_path / "m.safetensors", new_scale=0.2)
    res = runner.invoke(app, ["align", str(tmp_path / "m.safetensors"), "--old-classes", "4", "--json"])
    assert res.exit_code == 0
    assert "warning:" in res.stderr and "premise" in res.stderr
    assert json.loads(res.stdout)["groups"][1]["capped"] is True


@pytest.mark.parametrize("args, words", [
    (["--old-classes", "6"], "out of range"),
    (["--old-classes", "2", "--layer", "head"], "no layer or tensor named 'head'"),
    (["--classes", "0-3"], "start:end"),
])
def test_errors_are_one_line_and_write_nothing(tmp_path, args, words):
    toy(tmp_path / "m.safetensors")
    res = runner.invoke(app, ["align", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "a.safetensors"), *args])
    assert res.exit_code == 1
    assert res.stderr.startswith("error:") and words in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a.safetensors").exists()


def test_force_needed_to_replace(tmp_path):
    toy(tmp_path / "m.safetensors")
    args = ["align", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "a.safetensors"), "--old-classes", "4"]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "already exists" in res.stderr
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_demo_step(fixtures_dir, tmp_path):
    if not (fixtures_dir / "digits" / "incremental_clipped.safetensors").is_file():
        pytest.skip("class-incremental fixtures not generated")
    result = demo_step(fixtures_dir, tmp_path, quiet=True)
    assert result["accuracy_after"] > result["accuracy_before"]
    assert (tmp_path / "incremental_aligned.safetensors").is_file()


def test_non_finite_classifier_exit_status_agrees_with_what_was_written(tmp_path):
    """Issue #14 item 7: an all-NaN classifier used to be written, then crash drawing the chart (exit 1
    with an output on disk). Whatever the operation decides, the exit status must match the disk."""
    sd = toy(tmp_path / "m.safetensors")
    sd["2.weight"] = torch.full_like(sd["2.weight"], float("nan"))
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = tmp_path / "a.safetensors"
    res = runner.invoke(app, ["align", str(tmp_path / "m.safetensors"), "-o", str(out), "--old-classes", "4"])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert (res.exit_code == 0 and out.exists()) or (res.exit_code == 1 and not out.exists()), res.output


def test_a_large_head_is_charted_as_ranges_of_classes(tmp_path):
    """A head of 1000 classes was charted one line per class (2,000 lines; 32,000 for an LLM vocabulary): now at
    most CHART_ROWS ranges of consecutive classes, none across the old/new boundary, each showing the mean L1
    norm of its rows, checked against numpy on the weights."""
    g = torch.Generator().manual_seed(3)
    head = torch.rand(1000, 16, generator=g)
    head[700:] *= 2.0
    save_file({"0.weight": torch.randn(16, 4, generator=g), "2.weight": head}, str(tmp_path / "m.safetensors"))
    res = runner.invoke(app, ["align", str(tmp_path / "m.safetensors"), "--old-classes", "700", "--no-clamp"])
    assert res.exit_code == 0, res.output
    chart = res.stdout[res.stdout.index("per-class weight norms"):].splitlines()[2:]
    ranges = [line.split()[0] for line in chart if line.split() and ":" in line.split()[0]]
    assert 40 <= len(ranges) <= 64 and len(chart) < 2 * 64 + 4, res.stdout
    bounds = [tuple(map(int, r.split(":"))) for r in ranges]
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000 and (700 in [a for a, _ in bounds])  # 700 starts a range
    assert all(b1 == a2 for (_, b1), (a2, _) in itertools.pairwise(bounds))  # consecutive, no class left out
    a, b = bounds[0]
    before = np.abs(head[a:b].numpy()).sum(axis=1).mean()
    assert f"{before:.3f}" in chart[[line.split()[0] if line.split() else "" for line in chart].index(f"{a}:{b}")]
    a, b = bounds[-1]
    gamma = np.abs(head[:700].numpy()).sum(1).mean() / np.abs(head[700:].numpy()).sum(1).mean()
    after = (np.abs(head[a:b].numpy()).sum(axis=1) * gamma).mean()
    row = [line.split()[0] if line.split() else "" for line in chart].index(f"{a}:{b}")
    assert f"{after:.3f}" in chart[row + 1], chart[row:row + 2]
