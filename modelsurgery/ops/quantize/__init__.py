"""Post-training weight quantization: grids, RTN / AdaRound / FlexRound, block reconstruction, packing."""

from modelsurgery.ops.quantize.base import METHODS, QuantizedWeight, WeightQuantizer, method_by_name
from modelsurgery.ops.quantize.grids import QuantScheme
from modelsurgery.ops.quantize.operation import QuantizeOptions, QuantizeResult, quantize_checkpoint
from modelsurgery.ops.quantize.packing import dequantize_checkpoint, pack_codes, unpack_codes

__all__ = [
    "METHODS",
    "QuantScheme",
    "QuantizeOptions",
    "QuantizeResult",
    "QuantizedWeight",
    "WeightQuantizer",
    "dequantize_checkpoint",
    "method_by_name",
    "pack_codes",
    "quantize_checkpoint",
    "unpack_codes",
]
