"""--preset fast|default|best: the steps, samples and batch size a preset sets where the user set none, checked
against the sources the declaration names (the FlexRound/LRQ scripts' 5000 iterations, AIMET's 10,000 for
AdaRound, BRECQ's main_imagenet.py 20000 iterations and 1024 samples); the time estimate checked against a hand
computation on a fake clock and against the run's own report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize import QuantizeOptions, quantize_checkpoint
from modelsurgery.ops.quantize.base import method_by_name
from modelsurgery.ops.quantize.operation import CalibrationEstimate, with_preset

ROOT = Path(__file__).resolve().parents[3]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CALIB = ROOT / "fixtures" / "data" / "digits_calib.safetensors"


def _resolved(method: str, preset: str | None, **given) -> tuple[dict, int]:
    m = method_by_name(method)
    samples = given.pop("samples", None)
    opts = with_preset(QuantizeOptions(method=method, preset=preset, params=given, samples=samples), m)
    return m.resolve(opts.params), opts.samples


@pytest.mark.parametrize("method,paper_steps", [("flexround", 5000), ("adaround", 10_000)])
def test_default_preset_is_the_declared_paper_values(method, paper_steps):
    for preset in (None, "default"):
        settings, samples = _resolved(method, preset)
        assert (settings["steps"], settings["batch_size"], samples) == (paper_steps, 32, 128)


def test_best_is_brecqs_main_imagenet_and_fast_is_a_twentieth():
    for method, declared in (("flexround", 5000), ("adaround", 10_000)):
        settings, samples = _resolved(method, "best")
        assert (settings["steps"], settings["batch_size"], samples) == (20_000, 32, 1024)
        settings, samples = _resolved(method, "fast")
        assert (settings["steps"], settings["batch_size"], samples) == (declared // 20, 8, 64)


def test_flexround_signsgd_presets_are_autorounds_recipes():
    """fast/default/best = AutoRound's light/default/best recipes (auto_round/cli/main.py RECIPES: 50, 200 and
    1000 iters; 128, 128 and 512 samples; batch 8); checked against the installed package when it is there."""
    expected = {"fast": (50, 8, 128), "default": (200, 8, 128), "best": (1000, 8, 512)}
    for preset, values in expected.items():
        settings, samples = _resolved("flexround-signsgd", preset)
        assert (settings["steps"], settings["batch_size"], samples) == values, preset
    try:
        from auto_round.cli.main import RECIPES
    except Exception:  # auto-round is a peer, not a test dependency
        return
    for preset, recipe in (("fast", "light"), ("default", "default"), ("best", "best")):
        r = RECIPES[recipe]
        assert (r["iters"], r["batch_size"], r["nsamples"]) == expected[preset], recipe


def test_what_the_user_sets_wins_over_the_preset():
    settings, samples = _resolved("flexround", "fast", steps=7, samples=16)
    assert (settings["steps"], settings["batch_size"], samples) == (7, 8, 16)
    settings, samples = _resolved("adaround", "best", batch_size=4, lr=0.01)
    assert (settings["steps"], settings["batch_size"], settings["lr"], samples) == (20_000, 4, 0.01, 1024)


@pytest.mark.parametrize("method,preset,given,message", [
    ("rtn", "fast", {}, "--preset fast: --method rtn learns nothing"),
    ("flexround", "slow", {}, "--preset slow: expected one of fast, default, best"),
    # a preset that would set nothing the user left out
    ("flexround", "best", {"samples": 8, "params": {"steps": 2, "batch_size": 4}},
     "--preset best: it sets the steps, samples and batch size left out, and --steps, --samples and --batch-size "
     "are all given"),
])
def test_bad_presets_are_refused(tmp_path, method, preset, given, message):
    out = tmp_path / "q.safetensors"
    with pytest.raises(SurgeryError, match=message):
        quantize_checkpoint(MLP, out, QuantizeOptions(method=method, preset=preset, calib=CALIB, **given))
    assert not out.exists()


def test_estimate_on_a_fake_clock():
    """After step 1 at t=10 and step 6 at t=12.5: 0.5 s a step; 3 blocks x 100 steps x 0.5 s = 150 s = 2.5 min."""
    seen = []
    times = iter([0.0, 10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0])
    timer = CalibrationEstimate(lambda *a: seen.append(a), trained_blocks=3, clock=lambda: next(times))
    timer("blocks", 0, 4, {})
    for step in range(1, 8):
        timer("block 1/4", step, 100, {"loss": 1.0})
    messages = [info["message"] for task, _, _, info in seen if "message" in info]
    assert messages == ["estimated 2.5 min for 3 blocks x 100 steps (0.5 s/step)"]
    assert timer.estimate["seconds"] == pytest.approx(150.0)
    assert timer.estimate["timed_steps"] == 5


def test_run_reports_preset_estimate_and_samples(tmp_path):
    out = tmp_path / "q.safetensors"
    seen = []
    r = quantize_checkpoint(MLP, out, QuantizeOptions(method="flexround", preset="fast", calib=CALIB,
                                                      params={"steps": 12}),
                            lambda *a: seen.append(a))
    assert r.options["preset"] == "fast" and r.options["steps"] == 12 and r.options["batch_size"] == 8
    assert r.options["samples"] == 64 and r.options["samples_used"] == 64
    # the classifier (the output head) stays float by default: two of the three layers train
    e = r.estimate
    assert (e["blocks"], e["steps"]) == (2, 12)
    assert e["seconds"] == pytest.approx(2 * 12 * e["seconds_per_step"])
    assert [info["message"] for *_, info in seen if "message" in info] == [e["message"]]
    with safe_open(str(out), "pt") as f:
        recorded = json.loads(f.metadata()["modelsurgery"])["parameters"]
    assert recorded["preset"] == "fast" and recorded["samples"] == 64
    assert recorded["params"]["steps"] == 12 and recorded["params"]["batch_size"] == 8
