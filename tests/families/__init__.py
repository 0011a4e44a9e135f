"""Family tests. ``onnx_max_diff`` is shared by the transformer family tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def onnx_max_diff(module: torch.nn.Module, names: list[str], trace_inputs: dict[str, torch.Tensor],
                  run_inputs: dict[str, torch.Tensor], folder: Path) -> float:
    """Export ``module`` with dynamic batch and sequence axes (traced on ``trace_inputs``), run it in
    ONNX Runtime on ``run_inputs`` (another shape), and return the largest difference from torch."""
    import onnxruntime as ort

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *tensors):
            return self.inner(**dict(zip(names, tensors)))

    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "out"]}
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Positional().eval(), tuple(trace_inputs[n] for n in names), str(path),
                          input_names=names, output_names=["out"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: run_inputs[n].numpy() for n in names})[0]
    with torch.no_grad():
        expected = module(**run_inputs)
    return (torch.from_numpy(got) - expected).abs().max().item()
