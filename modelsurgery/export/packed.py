"""Packed quantized checkpoints as the ONNX export reads them.

The format (layout, metadata, validation, dequantization) has one owner,
``modelsurgery.ops.quantize.packing``, which ``surgery quantize`` writes with; the exporter uses its
reader unchanged, so what export accepts is exactly what quantize writes and documents.
"""

from __future__ import annotations

from modelsurgery.ops.quantize.packing import (
    METADATA_KEY,
    SUFFIXES,
    PackedWeight,
    dequantized_state,
    read_packed,
    read_packed_weight,
    read_scheme,
    unpack_codes,
)

__all__ = [
    "METADATA_KEY",
    "SUFFIXES",
    "PackedWeight",
    "dequantized_state",
    "read_packed",
    "read_packed_weight",
    "read_scheme",
    "unpack_codes",
]
