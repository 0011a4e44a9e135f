"""`surgery dequantize` and the packed folder's config.json: a packed folder is refused by transformers
(never loaded as a random float model), and its dequantized folder loads in transformers as the float
model it stands for.

References: transformers' own loader (its refusal of a quantization_config without ``quant_method``,
``AutoHfQuantizer.supports_quant_method``) and its forward; the fake-quantized output (the quantizer's
float result, written without packing) for the values; compressed-tensors' own decompression in
transformers (``CompressedTensorsConfig(dequantize=True)``) for a compressed-tensors folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from tests.hf_tiny import save_tiny_gpt2

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
MLP = ROOT / "fixtures" / "digits" / "mlp_seed0.safetensors"


def _quantize(src: Path, out: Path, fmt: str, *extra: str) -> None:
    r = runner.invoke(app, ["quantize", str(src), "-o", str(out), "--method", "rtn", "--bits", "4",
                            "--format", fmt, "-q", *extra])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("deq")
    src = save_tiny_gpt2(root / "float")
    _quantize(src, root / "packed", "packed")
    _quantize(src, root / "fake", "fake")
    return root


def test_transformers_refuses_a_packed_folder(gpt2):
    from transformers import AutoModelForCausalLM

    qc = json.loads((gpt2 / "packed" / "config.json").read_text())["quantization_config"]
    assert "surgery dequantize" in qc["dequantize"] and "quant_method" not in qc
    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(gpt2 / "packed")


def test_dequantized_folder_loads_in_transformers_as_the_quantized_model(gpt2):
    from transformers import AutoModelForCausalLM

    out = gpt2 / "deq"
    r = runner.invoke(app, ["dequantize", str(gpt2 / "packed"), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["source_format"] == "packed" and report["weights"] == 12 and report["dtype"] == "float32"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    fake = AutoModelForCausalLM.from_pretrained(gpt2 / "fake").eval()
    floats = AutoModelForCausalLM.from_pretrained(gpt2 / "float").eval()
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        ours, theirs, ref = model.eval()(ids).logits, fake(ids).logits, floats(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # the packed codes are the fake weights
    assert not torch.allclose(ours, ref, atol=1e-4)  # and they are quantized, not the float originals
    w, w0 = model.state_dict(), floats.state_dict()
    # RTN, symmetric min-max grid: step 2 max|w| / (2^4 - 1) per output channel (Conv1D: a column)
    name = "transformer.h.0.mlp.c_fc.weight"
    step = 2 * w0[name].t().abs().amax(1) / 15
    assert ((w[name] - w0[name]).abs().t() <= step[:, None] * 0.5 + 1e-6).all()


def test_dtype_and_file_output(gpt2, tmp_path):
    out = tmp_path / "half"
    r = runner.invoke(app, ["dequantize", str(gpt2 / "packed"), "-o", str(out), "--dtype", "bfloat16", "-q"])
    # -q as on every command (cli/options.py, README "Shared options"): no progress, the result still printed
    assert r.exit_code == 0 and "dequantized to bfloat16" in r.stdout, r.output
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    packed = tmp_path / "mlp.safetensors"
    _quantize(MLP, packed, "packed")
    r = runner.invoke(app, ["dequantize", str(packed), "-o", str(tmp_path / "mlp_float.safetensors")])
    assert r.exit_code == 0, r.output
    with safe_open(tmp_path / "mlp_float.safetensors", "pt") as f:
        names = list(f.keys())
        assert "0.weight" in names and not any(k.endswith(".qweight") for k in names)


@pytest.mark.parametrize("case", ["float", "fake", "exists", "dtype"])
def test_bad_input_one_line_nothing_written(gpt2, tmp_path, case):
    src, out, extra = gpt2 / "packed", tmp_path / "out", []
    if case == "float":
        src = gpt2 / "float"
    elif case == "fake":
        src = gpt2 / "fake"
    elif case == "exists":
        out.mkdir()
    else:
        extra = ["--dtype", "int8"]
    r = runner.invoke(app, ["dequantize", str(src), "-o", str(out), *extra])
    assert r.exit_code == 1
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    want = {"float": "not a quantized checkpoint", "fake": "already float", "exists": "--force",
            "dtype": "--dtype int8"}[case]
    assert want in " ".join(r.output.split())
    assert (not out.exists()) if case != "exists" else not any(out.iterdir())


def test_compressed_tensors_folder_matches_transformers_decompression(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from modelsurgery.deploy import deploy
    from modelsurgery.ops.quantize.grids import QuantScheme
    from tests.deploy.conftest import rtn_source

    ct = tmp_path / "ct"
    deploy(rtn_source("compressed-tensors", QuantScheme(4, "group", 16, False), skip=()), ct, "compressed-tensors")
    r = runner.invoke(app, ["dequantize", str(ct), "-o", str(tmp_path / "deq"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source_format"] == "compressed-tensors"
    ids = torch.arange(1, 17).reshape(2, 8)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "deq").eval()
    theirs = AutoModelForCausalLM.from_pretrained(ct, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs.eval()(ids).logits, rtol=0, atol=1e-5)
