"""ONNX export of every family, float and packed-quantized, verified in ONNX Runtime."""

from modelsurgery.export.onnx_export import ExportOptions, ExportReport, export_checkpoint
from modelsurgery.export.ort_check import CheckResult, check_export, op_counts, ort_session
from modelsurgery.export.packed import PackedWeight, dequantized_state, read_packed

__all__ = [
    "CheckResult",
    "ExportOptions",
    "ExportReport",
    "PackedWeight",
    "check_export",
    "dequantized_state",
    "export_checkpoint",
    "op_counts",
    "ort_session",
    "read_packed",
]
