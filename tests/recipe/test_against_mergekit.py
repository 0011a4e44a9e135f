"""Slow: the same configs run by mergekit itself; every tensor of ours must match mergekit's (float32, 1e-5).

mergekit is not a test dependency (it pins click, pydantic and accelerate versions). Give an
interpreter that can import it in MERGEKIT_PYTHON (e.g. a venv made with
``python -m venv --system-site-packages mk && mk/bin/pip install --no-deps mergekit immutables``),
or install it in this one; otherwise the test is skipped.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.recipe.test_mergekit_configs import LINEAR, PASSTHROUGH, SLERP, TASK_ARITHMETIC, TIES, materialize, run

pytestmark = pytest.mark.slow

SCRIPT = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(config, sys.argv[2], MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=False))
"""


def mergekit_python() -> str:
    python = os.environ.get("MERGEKIT_PYTHON", sys.executable)
    ok = subprocess.run([python, "-c", "import mergekit.merge"], capture_output=True).returncode == 0
    if not ok:
        pytest.skip(f"mergekit is not importable by {python} (set MERGEKIT_PYTHON to an interpreter that has it)")
    return python


def run_mergekit(tmp_path, text: str):
    cfg, out = tmp_path / "mergekit.yml", tmp_path / "mergekit-out"
    cfg.write_text(text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([mergekit_python(), "-c", SCRIPT, str(cfg), str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("config, kind", [
    (SLERP, "llamas"), (PASSTHROUGH, "llamas"), (TIES, "gpt2s"), (TASK_ARITHMETIC, "llamas"), (LINEAR, "llamas"),
    (TIES, "llamas"), (SLERP.replace("self_attn", "attn"), "gpt2s"),
    (TIES.replace("int8_mask: true", "rescale: true\n  lambda: 0.6"), "llamas"),
], ids=["slerp", "passthrough", "ties-gpt2", "task_arithmetic", "linear", "ties-llama", "slerp-gpt2", "ties-rescale"])
def test_same_tensors_as_mergekit(tmp_path, request, config, kind):
    models = request.getfixturevalue(kind)
    if "slerp" in config and kind == "gpt2s":
        models = {"a": models["base"], "b": models["ft1"]}
    expected = run_mergekit(tmp_path, materialize(config, models))
    r, out = run(tmp_path, config, models)
    assert r.exit_code == 0, r.output
    got = load_file(out / "model.safetensors")
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        torch.testing.assert_close(got[name].float(), want.float(), atol=1e-5, rtol=0, msg=name)
