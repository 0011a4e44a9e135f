"""Round-to-nearest (RTN): W_q = s * (clamp(round(W / s) + z, 0, 2^b - 1) - z), no data needed.

The baseline every learned rounding is compared with; the grid comes from min/max (default) or
the Lp clipping search (``--grid search``).
"""

from __future__ import annotations

from modelsurgery.ops.quantize.base import WeightQuantizer, register


@register
class RTNQuantizer(WeightQuantizer):
    name = "rtn"
    learned = False
    default_grid = "minmax"
