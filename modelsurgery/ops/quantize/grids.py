"""Uniform affine quantization grids (Jacob et al. 2018, eq. 1: W ~ (q - z) * s), per tensor, output
channel or group, from min/max or an Lp clipping search (the 'mse' init of BRECQ/QDrop/FlexRound, p=2.4).

Every weight is seen as a matrix [out, R]: rows are output channels, a conv kernel is flattened
into its row (R = in * prod(k)), and GPT-2's Conv1D (stored (in, out)) is transposed first. A
grid holds ``scale`` and integer ``zero`` of shape [rows, n_groups, 1] (rows = 1 per tensor), to
broadcast against the grouped view [out, n_groups, G]. Codes are unsigned in [0, 2^bits - 1];
symmetric grids fix the zero point at 2^(bits-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelsurgery.checkpoint import check_finite
from modelsurgery.errors import SurgeryError

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantScheme:
    bits: int = 4
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    #: a deployment format (``modelsurgery.deploy``) whose stored grid the scales and zero points
    #: must be (fp16 scales; GPTQ v1 zero points >= 1), so what is learned is what is stored
    storage: str | None = None
    #: the dtype that format stores scales in where it is the model's own (compressed-tensors: "bfloat16")
    storage_dtype: str | None = None

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise SurgeryError(f"--bits {self.bits}: expected a bit width from 2 to 8")
        if self.granularity not in GRANULARITIES:
            raise SurgeryError(f"--granularity {self.granularity}: expected one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise SurgeryError("--granularity group needs --group-size G (a positive integer)")
        if self.granularity != "group" and self.group_size is not None:  # it would be left out without a word
            raise SurgeryError(f"--group-size {self.group_size}: applies to --granularity group, not to "
                               f"--granularity {self.granularity}; add --granularity group")

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    def to_dict(self) -> dict:
        return {"bits": self.bits, "granularity": self.granularity,
                "group_size": self.group_size if self.granularity == "group" else None,
                "symmetric": self.symmetric}


@dataclass
class Grid:
    scale: torch.Tensor  # float32 [rows, n_groups, 1]
    zero: torch.Tensor  # float32 holding integers, same shape


# ----- layout -----------------------------------------------------------------------------------
def to_matrix(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Stored weight -> [out, R] (rows = output channels)."""
    if transposed:
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def from_matrix(matrix: torch.Tensor, shape: tuple[int, ...], transposed: bool = False) -> torch.Tensor:
    if transposed:
        return matrix.t()
    return matrix.reshape(shape)


def group_size_for(scheme: QuantScheme, row_length: int, name: str = "weight") -> int:
    """Elements per group along a row; raises when a group size does not divide the row."""
    if scheme.granularity != "group":
        return row_length
    g = int(scheme.group_size or 0)
    if row_length % g:
        raise SurgeryError(
            f"tensor '{name}': --group-size {g} does not divide its row length {row_length}; "
            "choose a divisor or --granularity channel"
        )
    return g


def grouped(matrix: torch.Tensor, group: int) -> torch.Tensor:
    """[out, R] -> [out, R/G, G]."""
    return matrix.reshape(matrix.shape[0], -1, group)


def _reduce(x: torch.Tensor, scheme: QuantScheme, op) -> torch.Tensor:
    """Reduce a grouped view [out, ng, G] to the grid shape."""
    r = op(x, dim=-1, keepdim=True)
    if scheme.granularity == "tensor":
        r = op(op(r, dim=0, keepdim=True), dim=1, keepdim=True)
    return r


def _amin(x, dim, keepdim):
    return x.amin(dim=dim, keepdim=keepdim)


def _amax(x, dim, keepdim):
    return x.amax(dim=dim, keepdim=keepdim)


# ----- grids ------------------------------------------------------------------------------------
def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> Grid:
    """The grid covering [lo, hi] (widened to contain 0)."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if scheme.symmetric:
        absmax = torch.maximum(-lo, hi)
        # as the FlexRound/BRECQ code: the full 2^b levels span [-absmax, absmax]
        scale = (2 * absmax / scheme.qmax).clamp_min(1e-8)
        zero = torch.full_like(scale, 2 ** (scheme.bits - 1))
    else:
        scale = ((hi - lo) / scheme.qmax).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, scheme.qmax)
    return Grid(scale.float(), zero.float())


def minmax_grid(matrix: torch.Tensor, scheme: QuantScheme, group: int) -> Grid:
    g = grouped(matrix.detach().float(), group)
    return grid_from_range(_reduce(g, scheme, _amin), _reduce(g, scheme, _amax), scheme)


#: elements (whole rows) the clipping search scores at a time: 1 MB of float32, so that its 80 passes
#: over them run in the CPU's cache (ten times faster on an 11.5M-element LLaMA MLP matrix than whole)
SEARCH_CHUNK_ELEMENTS = 1 << 18


def rows_per_chunk(row_length: int, elements: int) -> int:
    """How many whole rows of ``row_length`` fit in ``elements`` (at least one): the piece size of the
    row-by-row loops (clipping search, FlexRound's backward, streaming RTN), which give the same result
    as the whole matrix because per channel or group every row has its own grid."""
    return max(1, elements // max(row_length, 1))


def search_grid(matrix: torch.Tensor, scheme: QuantScheme, group: int, p: float = 2.4,
                steps: int = 80, min_ratio: float = 0.2) -> Grid:
    """Shrink the min/max range by each ratio in [min_ratio, 1] and keep, per row/group (or per
    tensor), the grid with the least sum |W - Q(W)|^p.

    Per channel or group every row has its own grids and errors, so the rows are searched a few at
    a time (the same grids as all at once); a per-tensor grid needs the whole matrix."""
    if scheme.granularity == "tensor":
        return _search_rows(matrix, scheme, group, p, steps, min_ratio)
    rows, length = matrix.shape
    step = rows_per_chunk(length, SEARCH_CHUNK_ELEMENTS)
    if step >= rows:
        return _search_rows(matrix, scheme, group, p, steps, min_ratio)
    parts = [_search_rows(matrix[start:start + step], scheme, group, p, steps, min_ratio)
             for start in range(0, rows, step)]
    return Grid(torch.cat([g.scale for g in parts]), torch.cat([g.zero for g in parts]))


def _search_rows(matrix: torch.Tensor, scheme: QuantScheme, group: int, p: float, steps: int,
                 min_ratio: float) -> Grid:
    g = grouped(matrix.detach().float(), group)
    lo, hi = _reduce(g, scheme, _amin), _reduce(g, scheme, _amax)
    best = minmax_grid(matrix, scheme, group)
    best_err = _reduce(lp_error(g, best, scheme, p), scheme, _sum)
    for ratio in torch.linspace(1.0, min_ratio, steps)[1:].tolist():
        cand = grid_from_range(lo * ratio, hi * ratio, scheme)
        err = _reduce(lp_error(g, cand, scheme, p), scheme, _sum)
        better = err < best_err
        best.scale = torch.where(better, cand.scale, best.scale)
        best.zero = torch.where(better, cand.zero, best.zero)
        best_err = torch.minimum(err, best_err)
    return best


def _sum(x, dim, keepdim):
    return x.sum(dim=dim, keepdim=keepdim)


def lp_error(g: torch.Tensor, grid: Grid, scheme: QuantScheme, p: float) -> torch.Tensor:
    """|fake_quantize(g) - g|^p, the same operations in one fresh tensor (in place after the first)."""
    return codes(g, grid, scheme).sub_(grid.zero).mul_(grid.scale).sub_(g).abs_().pow_(p)


def make_grid(matrix: torch.Tensor, scheme: QuantScheme, group: int, init: str = "minmax",
              name: str = "weight") -> Grid:
    """The grid ``init`` starts ``matrix`` from, as ``scheme.storage`` stores it. A NaN or Inf in
    ``matrix`` (tensor ``name``) is refused: every value enters its row's or group's min and max,
    which are NaN or Inf for one, so a finite grid clears the matrix without a pass over it (checked
    before the storage clamps the scale into fp16's range)."""
    if init == "minmax":
        grid = minmax_grid(matrix, scheme, group)
    elif init == "search":
        grid = search_grid(matrix, scheme, group)
    else:
        raise SurgeryError(f"--grid {init}: expected minmax or search")
    if not bool(torch.isfinite(grid.scale).all()):
        check_finite(name, matrix)
    return stored_grid(grid, scheme)


def stored_grid(grid: Grid, scheme: QuantScheme) -> Grid:
    """``grid`` as ``scheme.storage`` stores it (unchanged without one)."""
    if scheme.storage is None:
        return grid
    from modelsurgery.deploy import storable_grid

    scale, zero = storable_grid(scheme.storage, grid.scale, grid.zero, scheme)
    return Grid(scale, zero)


# ----- rounding ---------------------------------------------------------------------------------
def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity gradient (straight-through estimator, Bengio et al. 2013)."""
    return x + (torch.round(x) - x).detach()


def codes(g: torch.Tensor, grid: Grid, scheme: QuantScheme) -> torch.Tensor:
    """Round-to-nearest unsigned codes of a grouped view, clamped to [0, 2^bits - 1] (float32 holding
    integers; the steps after the division in place: one fresh tensor instead of four)."""
    return torch.div(g, grid.scale).round_().add_(grid.zero).clamp_(0, scheme.qmax)


def dequantize(q: torch.Tensor, grid: Grid) -> torch.Tensor:
    return (q - grid.zero) * grid.scale


def fake_quantize(g: torch.Tensor, grid: Grid, scheme: QuantScheme) -> torch.Tensor:
    return dequantize(codes(g, grid, scheme), grid)
