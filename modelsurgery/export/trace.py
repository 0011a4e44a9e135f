"""Trace a family's torch module into an ONNX graph with dynamic batch and sequence axes.

Uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it runs on CPU
in about a second for these models and needs no extra package (the torch.export-based exporter
needs ``onnxscript``). It emits opsets up to 20; newer opsets are reached with ONNX's version
converter afterwards.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnx import version_converter
from torch import nn

from modelsurgery.errors import SurgeryError

#: the newest opset torch's TorchScript exporter writes
TRACE_MAX_OPSET = 20


class _Positional(nn.Module):
    """The exporter passes positional tensors; family modules take keyword inputs."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.module(**dict(zip(self.names, tensors)))


def dynamic_axes(inputs: dict[str, torch.Tensor], output_names: list[str], output_ndim: int
                 ) -> dict[str, dict[int, str]]:
    """Batch is dynamic everywhere; token inputs (integer, [batch, seq]) and their outputs get a sequence axis."""
    axes: dict[str, dict[int, str]] = {}
    has_seq = False
    for name, t in inputs.items():
        axes[name] = {0: "batch"}
        if not t.is_floating_point() and t.ndim >= 2:
            axes[name][1] = "sequence"
            has_seq = True
    for name in output_names:
        axes[name] = {0: "batch", 1: "sequence"} if has_seq and output_ndim >= 3 else {0: "batch"}
    return axes


def trace_module(module: nn.Module, inputs: dict[str, torch.Tensor], output_names: list[str], opset: int,
                 keep_batchnorm: bool = False, source: str = "model") -> onnx.ModelProto:
    """The ONNX graph of ``module`` called with keyword ``inputs`` (loaded in memory).

    ``keep_batchnorm`` exports BatchNormalization as its own node instead of folding it into the
    preceding convolution's weights (needed when those weights are to be stored as integers).
    """
    names = list(inputs)
    with torch.no_grad():
        out = module(**inputs)
    if not isinstance(out, torch.Tensor):
        raise SurgeryError(f"{source}: the model returns {type(out).__name__}, export needs one tensor")
    axes = dynamic_axes(inputs, output_names, out.ndim)
    trace_opset = min(opset, TRACE_MAX_OPSET)
    training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
    with tempfile.TemporaryDirectory(prefix="surgery-trace-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    _Positional(module, names).eval(), tuple(inputs[n] for n in names), str(path),
                    input_names=names, output_names=output_names, dynamic_axes=axes,
                    opset_version=trace_opset, do_constant_folding=True, dynamo=False, training=training,
                )
            except Exception as e:  # the exporter raises many types; name the model and the cause
                raise SurgeryError(f"{source}: torch could not export the model to ONNX ({e})") from e
        model = onnx.load(str(path), load_external_data=True)
    if opset > trace_opset:
        model = convert_opset(model, opset, source)
    return model


def convert_opset(model: onnx.ModelProto, opset: int, source: str) -> onnx.ModelProto:
    """ONNX's version converter on the graph alone: weight bytes are set aside while it runs, since
    it serialises the model (a protobuf message cannot pass 2 GiB) and never changes initializers."""
    stash = {}
    for init in model.graph.initializer:
        if len(init.raw_data) > 1024:
            stash[init.name] = init.raw_data
            init.ClearField("raw_data")
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as e:
        raise SurgeryError(f"{source}: cannot convert the exported graph to opset {opset} ({e})") from e
    finally:
        for init in model.graph.initializer:
            if init.name in stash:
                init.raw_data = stash[init.name]
    for init in converted.graph.initializer:
        if init.name in stash:
            init.raw_data = stash.pop(init.name)
    if stash:
        raise SurgeryError(f"{source}: converting to opset {opset} lost initializer '{next(iter(stash))}'")
    del converted.graph.value_info[:]  # the converter's inferred shapes: bulk in the file, unused by runtimes
    return converted
