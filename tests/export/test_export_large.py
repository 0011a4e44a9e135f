"""A float export above 2 GB: tensors go to OUT.onnx.data (slow: run with -m slow, ~8 GB of RAM)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from modelsurgery.export import ExportOptions, export_checkpoint, ort_session


@pytest.mark.slow
def test_export_above_two_gigabytes(tmp_path):
    # 23200 x 23200 float32 = 2.15 GB of weights: more than one protobuf message can hold
    g = torch.Generator().manual_seed(0)
    state = {"0.weight": torch.randn(23200, 23200, generator=g) * 1e-2,
             "1.weight": torch.randn(8, 23200, generator=g) * 1e-2}
    save_file(state, str(tmp_path / "big.safetensors"))
    del state
    out = tmp_path / "big.onnx"
    report = export_checkpoint(tmp_path / "big.safetensors", out, ExportOptions(samples=2))
    assert report.external_data and report.check.passed
    assert out.stat().st_size < 1_000_000
    assert (tmp_path / "big.onnx.data").stat().st_size > 2_000_000_000
    onnx.checker.check_model(str(out))
    x = np.random.default_rng(0).standard_normal((3, 23200)).astype(np.float32)
    assert ort_session(out).run(None, {"input": x})[0].shape == (3, 8)
