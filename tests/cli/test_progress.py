"""Progress people and CI can read: plain lines every 10 % or 30 s when stderr is a pipe or a file, with rate
and ETA; a 'converged' end state; nothing with --quiet. The ETA is checked against a hand computation on a
fake clock (elapsed / done * remaining)."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from modelsurgery.cli.common import plain
from modelsurgery.cli.progress import PlainLines

ROOT = Path(__file__).resolve().parents[2]


def _lines(calls, times):
    buf = io.StringIO()
    clock = iter(times)
    p = PlainLines(Console(file=buf, width=200), plain, clock=lambda: next(clock))
    for call in calls:
        p(*call)
    return buf.getvalue().splitlines()


def test_one_line_per_tenth_with_rate_and_eta():
    calls = [("train", i, 40, {"loss": 0.5}) for i in range(0, 41)]
    lines = _lines(calls, [2.0 * i for i in range(41)])  # 2 s a step
    expected = ["train: 1/40 (2%)"] + [f"train: {4 * k}/40 ({10 * k}%)" for k in range(1, 11)]  # first step, tenths
    assert [line.split(",")[0] for line in lines] == expected
    # at 12/40 after 24 s: 0.5 steps/s, 28 steps left -> 56 s
    assert lines[3] == "train: 12/40 (30%), 2 s each, elapsed 0:00:24, ETA 0:00:56, loss=0.5"
    assert "ETA" not in lines[-1]


def test_every_30_seconds_between_tenths():
    calls = [("slow", i, 1000, {}) for i in range(0, 60)]
    lines = _lines(calls, [20.0 * i for i in range(60)])  # 20 s a step: a tenth takes 2000 s
    stamps = [line.split("elapsed ")[1].split(",")[0] for line in lines]
    assert stamps[:3] == ["0:00:20", "0:01:00", "0:01:40"]  # 30 s (or more) apart


def test_converged_end_state():
    lines = _lines([("weight matching", 1, 100, {"objective": 2.0}),
                    ("weight matching", 6, 100, {"objective": 3.0, "state": "converged"})], [0.0, 1.0, 2.0])
    assert lines[-1].startswith("weight matching: 6/100 (6%), converged,") and "ETA" not in lines[-1]


def test_piped_quantize_prints_lines_unless_quiet(tmp_path):
    mlp = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
    calib = ROOT / "fixtures" / "data" / "digits_calib.safetensors"
    code = "import sys; from modelsurgery.cli.app import main; sys.argv = ['surgery', *sys.argv[1:]]; main()"
    base = [sys.executable, "-c", code, "quantize", str(mlp), "--method", "adaround", "--steps", "20",
            "--calib", str(calib), "--samples", "32"]
    r = subprocess.run([*base, "-o", str(tmp_path / "a.safetensors")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "blocks: 3/3 (100%)" in "\n".join(lines) and any("block 1/3: 20/20 (100%)" in x for x in lines)
    assert any("ETA" in x for x in lines)
    # the estimate: after step 6 of block 1 (5 timed steps), before block 1 ends; 2 blocks train (the head is
    # a default skip)
    estimate = [i for i, x in enumerate(lines) if x.startswith("estimated ")]
    assert len(estimate) == 1 and re.fullmatch(r"estimated [\d.]+ (s|min) for 2 blocks x 20 steps \([\d.e-]+ s/step\)",
                                               lines[estimate[0]])
    assert lines.index(next(x for x in lines if "block 1/3: 20/20" in x)) > estimate[0]
    r = subprocess.run([*base, "-o", str(tmp_path / "b.safetensors"), "-q"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stderr == ""
