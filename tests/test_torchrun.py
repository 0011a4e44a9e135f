"""Data-parallel calibration under ``torchrun --nproc_per_node 2`` (gloo, CPU) on the digits MLP:
one output written (rank 0), one JSON report with world_size 2, and the codes of the single-process
run with the same global batch (the gradients are summed in another order, so the learned scales
agree to float32 rounding and a code could flip on a tie; on this fixture none does)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from modelsurgery.ops.quantize.packing import unpack_codes

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"
CALIB = ROOT / "fixtures" / "data" / "digits_calib.safetensors"
ROW_LENGTHS = {"0.weight": 64, "2.weight": 128, "4.weight": 128}


def _quantize(out: Path, launcher: list[str]) -> dict:
    args = [*launcher, "quantize", str(MLP), "-o", str(out), "--calib", str(CALIB), "--samples", "256",
            "--steps", "40", "--bits", "3", "--no-default-skips", "--format", "packed", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=out.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)  # one JSON object: only rank 0 prints


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_learn_the_single_process_codes(tmp_path):
    (tmp_path / "dp").mkdir()
    (tmp_path / "sp").mkdir()
    dp = _quantize(tmp_path / "dp" / "q.safetensors",
                   ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "modelsurgery"])
    sp = _quantize(tmp_path / "sp" / "q.safetensors", [sys.executable, "-m", "modelsurgery"])
    assert dp["world_size"] == 2 and sp["world_size"] == 1
    assert [p.name for p in (tmp_path / "dp").iterdir()] == ["q.safetensors"]
    a, b = load_file(tmp_path / "dp" / "q.safetensors"), load_file(tmp_path / "sp" / "q.safetensors")
    assert a.keys() == b.keys()
    for name, length in ROW_LENGTHS.items():
        codes_a = unpack_codes(a[f"{name}.qweight"], 3, length)
        codes_b = unpack_codes(b[f"{name}.qweight"], 3, length)
        assert np.mean(codes_a == codes_b) == 1.0, name
        assert (a[f"{name}.scale"] - b[f"{name}.scale"]).abs().max() <= 1e-4 * b[f"{name}.scale"].abs().max()
    # both reduce the block losses over all 256 samples
    assert np.allclose([x["loss"] for x in dp["blocks"]], [x["loss"] for x in sp["blocks"]], rtol=1e-3)
