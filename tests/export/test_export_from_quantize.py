"""Round trip with the real producer: `surgery quantize --format packed` -> `surgery export` -> ONNX
Runtime, against the quantize package's own dequantization (independent of the export reader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsurgery.checkpoint import Checkpoint
from modelsurgery.cli.app import app
from modelsurgery.export import export_checkpoint, ort_session
from modelsurgery.families import detect_family

quantize_packing = pytest.importorskip("modelsurgery.ops.quantize.packing")


@pytest.mark.parametrize("source,args", [
    ("charlm/gpt2", ["--bits", "4", "--granularity", "group", "--group-size", "16", "--asymmetric"]),
    ("charlm/llama", ["--bits", "8"]),
    ("digits/cnn_seed0.safetensors", ["--bits", "4"]),
])
def test_quantize_then_export(tmp_path, fixtures_dir, source, args):
    src = fixtures_dir / source
    if not src.exists():
        pytest.skip("fixtures not generated")
    packed = tmp_path / ("q.safetensors" if src.suffix else "q")
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(packed), "--method", "rtn",
                                      "--format", "packed", "--json", *args])
    assert result.exit_code == 0, result.output
    report = export_checkpoint(packed, tmp_path / "q.onnx")
    assert report.quantization["integer_weights"] > 0 and report.quantization["float_weights"] == []
    ckpt = Checkpoint.open(packed)
    state = quantize_packing.dequantize_checkpoint(ckpt)  # the producer's own reading of its format
    family = detect_family(Checkpoint.from_state_dict(state, config=ckpt.config, metadata={
        k: v for k, v in ckpt.metadata.items() if k != quantize_packing.METADATA_KEY}))
    module = family.build_module()
    inputs = family.example_inputs(batch=3, seq_len=10, generator=torch.Generator().manual_seed(5))
    got = ort_session(tmp_path / "q.onnx").run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        assert np.abs(got - module(**inputs).numpy()).max() < 1e-4
