"""`surgery inspect` names each deployment format and its scheme; `surgery export` takes GPTQ and
compressed-tensors folders as it takes packed ones, and ONNX Runtime runs them faithfully."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.cli.app import app
from modelsurgery.deploy import deploy
from modelsurgery.export import ExportOptions, export_checkpoint
from modelsurgery.ops.quantize.grids import QuantScheme
from tests.deploy.conftest import reference_model, rtn_source

runner = CliRunner()
SCHEME = QuantScheme(4, "group", 32, True)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    paths = {}
    for fmt, name in (("gguf", "m.gguf"), ("gptq", "gptq"), ("compressed-tensors", "ct")):
        src = rtn_source(fmt, SCHEME)
        deploy(src, root / name, fmt, gguf_tokenizer="none")
        paths[fmt] = (src, root / name)
    return paths


@pytest.mark.parametrize("fmt", ["gguf", "gptq", "compressed-tensors"])
def test_inspect_shows_format_and_scheme(outputs, fmt):
    _, path = outputs[fmt]
    res = runner.invoke(app, ["inspect", str(path), "--json"])
    assert res.exit_code == 0, res.output
    quant = json.loads(res.stdout)["quantization"]
    if fmt == "gguf":
        assert quant["format"] == "gguf" and quant["type"] == "Q4_0" and quant["file_type"] == "MOSTLY_Q4_0"
    else:
        assert quant["format"] == fmt
    assert (quant["bits"], quant["granularity"], quant["group_size"], quant["symmetric"]) == (4, "group", 32, True)
    text = runner.invoke(app, ["inspect", str(path)])
    assert text.exit_code == 0 and f"'format': '{fmt}'" in text.output.replace("\n", "")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_export_accepts_the_folder_with_integer_weights(outputs, fmt, tmp_path, token_ids):
    src, path = outputs[fmt]
    out = tmp_path / "m.onnx"
    report = export_checkpoint(path, out, ExportOptions())
    assert report.quantization["integer_weights"] == len(src.weights)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": token_ids.numpy().astype(np.int64),
             "attention_mask": np.ones(token_ids.shape, dtype=np.int64)}
    (logits,) = session.run(None, feeds)
    with torch.no_grad():
        ours = reference_model(src)(token_ids).logits.numpy()
    np.testing.assert_allclose(logits, ours, atol=1e-4, rtol=0)
