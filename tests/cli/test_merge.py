"""`surgery merge` / `surgery analyze` end to end through the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app
from modelsurgery.cli.merge import demo_step

runner = CliRunner()


def test_merge_json_eval_and_plot(fixtures_dir, tmp_path):
    out, plot = tmp_path / "m.safetensors", tmp_path / "path.svg"
    d = fixtures_dir / "digits"
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"),
                            "-o", str(out), "--eval", str(fixtures_dir / "data" / "digits_eval.safetensors"),
                            "--points", "3", "--plot", str(plot), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["method"] == "match" and report["family"] == "mlp"
    assert [p["alpha"] for p in report["evaluation"]["matched"]] == [0.0, 0.5, 1.0]
    assert report["evaluation"]["matched_barrier"] < report["evaluation"]["naive_barrier"]
    assert out.exists() and plot.read_text().lstrip().startswith("<?xml")
    # table output, existing output refused without --force
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"),
                            "-o", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"), "-o", str(out),
                            "--force", "--method", "slerp", "--alpha", "0.25"])
    assert r.exit_code == 0 and "slerp" in r.stdout


def test_merge_error_is_one_line_and_writes_nothing(fixtures_dir, tmp_path):
    d = fixtures_dir / "digits"
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "resnet_seed0.safetensors"),
                            "-o", str(out)])
    assert r.exit_code == 1
    assert "error:" in r.output and "tensor '" in r.output and len(r.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_method_flags_come_from_the_declarations(fixtures_dir, tmp_path):
    from modelsurgery.cli.app import load_command
    from modelsurgery.ops.merge import all_methods

    options = {o: p for p in load_command("merge").params for o in p.opts}
    for method in all_methods().values():
        for p in method.params:
            assert f"{method.name}: {p.help} (default {p.default}" in options[f"--{p.name}"].help
    d = fixtures_dir / "digits"
    out = tmp_path / "m.safetensors"
    args = ["merge", str(d / "mlp_seed1.safetensors"), str(d / "mlp_seed2.safetensors"), "-o", str(out)]
    r = runner.invoke(app, [*args, "--method", "linear", "--density", "0.5"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "merge method 'linear' has no parameter 'density'" in r.output and not out.exists()
    r = runner.invoke(app, [*args, "--method", "ties", "--base", str(d / "mlp_seed0.safetensors"),
                            "--density", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["params"] == {"density": 0.5, "scale": 1.0, "normalize": True}
    prov = json.loads(Checkpoint.open(out).metadata["modelsurgery"])["parameters"]
    assert (prov["density"], prov["scale"]) == (0.5, 1.0)
    # a boolean parameter: mergekit's linear with normalize false is the plain weighted sum
    r = runner.invoke(app, [*args, "--method", "linear", "--weights", "1,1", "--no-normalize", "--force"])
    assert r.exit_code == 0, r.output
    a, b = (Checkpoint.open(d / f"mlp_seed{i}.safetensors").get("0.weight") for i in (1, 2))
    torch.testing.assert_close(Checkpoint.open(out).get("0.weight"), a + b)
    # an empty entry is a typo, not a value to skip
    for bad in ("1,,1", "1,1,", ""):
        r = runner.invoke(app, [*args, "--method", "linear", "--weights", bad, "--force"])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert f"--weights '{bad}': expected comma-separated numbers" in r.output


def test_repair_reports_the_corrected_layers(fixtures_dir, tmp_path):
    d = fixtures_dir / "digits"
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"), "-o", str(out),
                            "--eval", str(fixtures_dir / "data" / "digits_eval.safetensors"), "--points", "1",
                            "--repair"])
    assert r.exit_code == 0, r.output
    # the digits MLP: two hidden Linear layers corrected; the classifier (4) kept
    assert "repair: 2 layers rescaled (affine); kept: 4 (output layer)" in r.stdout
    prov = json.loads(Checkpoint.open(out).metadata["modelsurgery"])["parameters"]
    assert prov["repaired"] == {"method": "repair", "layers": ["0", "2"], "batchnorms": 0}


def test_bad_plot_refused_before_any_work(fixtures_dir, tmp_path):
    d = fixtures_dir / "digits"
    out = tmp_path / "m.safetensors"
    args = ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"), "-o", str(out)]
    r = runner.invoke(app, [*args, "--plot", str(tmp_path / "p.gif"), "--eval",
                            str(fixtures_dir / "data" / "digits_eval.safetensors")])
    assert r.exit_code == 1 and "--plot needs a .png" in r.output
    r = runner.invoke(app, [*args, "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 1 and "--plot needs --eval" in r.output
    assert list(tmp_path.iterdir()) == []


def test_analyze_json(fixtures_dir):
    d = fixtures_dir / "digits"
    r = runner.invoke(app, ["analyze", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"),
                            "--top-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [layer["name"] for layer in report["layers"]] == ["0.weight", "2.weight", "4.weight"]
    for layer in report["layers"]:
        assert layer["distance_after"] < layer["distance_before"]
        assert len(layer["alignment_after"]) == 3
        assert all(0 <= x <= 1 + 1e-6 for x in layer["alignment_after"])
        assert len(layer["separated"]) == 3 and len(layer["singular_values_b"]) == 3
    assert report["gap_tolerance"] == 1e-3
    # matching aligns the top singular directions (Ito et al.)
    assert sum(layer["alignment_after"][0] for layer in report["layers"]) > \
        sum(layer["alignment_before"][0] for layer in report["layers"]) + 0.5
    r = runner.invoke(app, ["analyze", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors")])
    assert r.exit_code == 0 and "L2 before" in r.stdout


def test_analyze_marks_pairs_with_close_singular_values(fixtures_dir, tmp_path):
    """B = A with its first layer's two top singular values made equal: those alignments are marked * and the
    footnote says why; the other layers' are not marked."""
    from safetensors.torch import save_file

    a = fixtures_dir / "digits" / "mlp_seed0.safetensors"
    state = Checkpoint.open(a).state_dict()
    u, s, vh = torch.linalg.svd(state["0.weight"].double(), full_matrices=False)
    s[1] = s[0]
    state["0.weight"] = (u * s @ vh).float()
    save_file(state, str(tmp_path / "b.safetensors"))
    r = runner.invoke(app, ["analyze", str(a), str(tmp_path / "b.safetensors"), "--top-k", "3"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip().startswith(("0.", "2.", "4."))}
    assert rows["0.weight"].count("*") == 4 and "*" not in rows["2.weight"] + rows["4.weight"]
    assert "* singular value within 0.001 of the largest from a neighbour" in " ".join(r.stdout.split())


def test_demo_step(fixtures_dir, tmp_path):
    summary = demo_step(fixtures_dir, tmp_path, quiet=True)
    assert summary["matched_midpoint_accuracy"] > summary["naive_midpoint_accuracy"]
    assert Checkpoint.open(summary["output"]).keys()


def test_points_without_eval_is_refused_not_ignored(fixtures_dir, tmp_path):
    """--points counts the alpha values evaluated on --eval data (its help: "with --eval"); without --eval
    nothing is evaluated, so the flag would be silently ignored, as --plot and --repair would: refused too."""
    d = fixtures_dir / "digits"
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"),
                            "-o", str(out), "--points", "5"])
    assert r.exit_code == 1 and "--points needs --eval" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_slerp_t_with_alpha_or_weights_is_refused(fixtures_dir, tmp_path):
    """SLERP's position comes from --t, or from --alpha/--weights when --t is not given (README: "`--t` defaults
    to 0.5; `--alpha` sets it"). Given both, one was silently dropped (--alpha 0.3 --t 0.9 merged at t = 0.9 and
    reported weights [0.7, 0.3]): refused in one line, nothing written."""
    d = fixtures_dir / "digits"
    args = ["merge", str(d / "mlp_seed1.safetensors"), str(d / "mlp_seed2.safetensors"), "--method", "slerp",
            "-o", str(tmp_path / "m.safetensors"), "--t", "0.9"]
    for extra in (["--alpha", "0.3"], ["--weights", "1,4"]):
        r = runner.invoke(app, [*args, *extra])
        assert r.exit_code == 1 and f"{extra[0]} and --t" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_base_that_nothing_reads_is_refused(fixtures_dir, tmp_path):
    """--base is read by task-arithmetic and ties (the task vectors) and by --align (the basis matched into); a
    linear or slerp merge without --align never reads it (the output was the plain average of the models, as
    without --base): refused in one line instead of silently ignored."""
    d = fixtures_dir / "digits"
    args = ["merge", str(d / "mlp_seed1.safetensors"), str(d / "mlp_seed2.safetensors"),
            "--base", str(d / "mlp_seed0.safetensors"), "-o", str(tmp_path / "m.safetensors")]
    for method in ("linear", "slerp"):
        r = runner.invoke(app, [*args, "--method", method])
        assert r.exit_code == 1 and "--base" in r.output and "--align" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    r = runner.invoke(app, [*args, "--method", "linear", "--align"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("flag,value", [("--seed", "1"), ("--backend", "scipy"), ("--device", "cpu")])
@pytest.mark.parametrize("method", [["--method", "linear"], ["--method", "slerp"], ["--method", "match", "--no-align"]])
def test_matching_options_without_matching_are_refused_not_ignored(fixtures_dir, tmp_path, flag, value, method):
    """--seed, --backend and --device configure weight matching only; a merge that does not match would silently
    ignore them (as --points without --eval): refused in one line naming the flag, nothing written."""
    d = fixtures_dir / "digits"
    r = runner.invoke(app, ["merge", str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors"),
                            "-o", str(tmp_path / "m.safetensors"), *method, flag, value])
    assert r.exit_code == 1 and f"{flag} configures weight matching" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def _recorded(out):
    return json.loads(Checkpoint.open(out).metadata["modelsurgery"])["parameters"]


def test_matching_options_apply_when_matching_runs(fixtures_dir, tmp_path):
    """With matching (match, or another method with --align) the options are taken and recorded; not given,
    the defaults --help states (backend auto, seed 0) are recorded as before."""
    d = fixtures_dir / "digits"
    a, b = str(d / "mlp_seed0.safetensors"), str(d / "mlp_seed1.safetensors")
    r = runner.invoke(app, ["merge", a, b, "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    assert (_recorded(tmp_path / "d.safetensors")["backend"], _recorded(tmp_path / "d.safetensors")["seed"]) \
        == ("auto", 0)
    r = runner.invoke(app, ["merge", a, b, "-o", str(tmp_path / "s.safetensors"), "--method", "linear", "--align",
                            "--seed", "3", "--backend", "scipy", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (_recorded(tmp_path / "s.safetensors")["backend"], _recorded(tmp_path / "s.safetensors")["seed"]) \
        == ("scipy", 3)
    # without matching nothing about matching is recorded (it did not run)
    r = runner.invoke(app, ["merge", a, b, "-o", str(tmp_path / "l.safetensors"), "--method", "linear"])
    assert r.exit_code == 0, r.output
    assert "backend" not in _recorded(tmp_path / "l.safetensors")
    help_text = " ".join(runner.invoke(app, ["merge", "--help"]).stdout.replace("│", " ").split())
    for words in ("(default auto; only when matching)", "(default cpu; only when matching)",
                  "(default 0; only when matching)"):
        assert words in help_text, words
