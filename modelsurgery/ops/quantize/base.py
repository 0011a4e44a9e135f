"""Weight quantizers and their registry: a method is one file with a ``WeightQuantizer`` subclass
registered by name (RTN; AdaRound, Nagel et al. 2020; FlexRound, Lee et al. ICML 2023).

A quantizer owns one weight: it builds the initial grid, returns the fake-quantized weight
(differentiable in its learned parameters) for block reconstruction, and finally exports integer
codes, the grid and the dequantized weight, which are exactly what the packed and fake outputs hold.

A method declares its parameters (``params``: steps, learning rate, regulariser ...) with their
defaults from its paper or reference code (``params.py``); the quantizer receives the resolved
values as ``settings``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.quantize.grids import (
    Grid,
    QuantScheme,
    codes,
    dequantize,
    from_matrix,
    group_size_for,
    grouped,
    make_grid,
    stored_grid,
    to_matrix,
)
from modelsurgery.ops.quantize.params import BATCH_SIZE, MethodParam, resolve_params

METHODS: dict[str, type[WeightQuantizer]] = {}


def register(cls: type[WeightQuantizer]) -> type[WeightQuantizer]:
    METHODS[cls.name] = cls
    return cls


def method_by_name(name: str) -> type[WeightQuantizer]:
    from modelsurgery.ops.quantize import adaround, flexround, flexround_signsgd, rtn  # noqa: F401  (registration)

    if name not in METHODS:
        raise SurgeryError(f"--method {name}: expected one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods() -> list[type[WeightQuantizer]]:
    method_by_name("rtn")  # registration
    return [METHODS[k] for k in sorted(METHODS)]


@dataclass
class QuantizedWeight:
    """The result for one weight: scale float32 and zero_point uint8 of shape [rows, n_groups]
    (rows = 1 per tensor), the integer codes [out, R] (``codes``) and the dequantized float32 weight
    in the stored layout (``dequantized``). Either is held and the other computed from it when
    asked: the packed formats need only the codes, the fake output and the module only the floats."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    group_size: int
    transposed: bool
    #: the weight's stored shape
    shape: tuple[int, ...]
    #: uint8 codes as exported; None once dropped to save memory (``codes`` recomputes them)
    stored_codes: torch.Tensor | None = None
    #: the dequantized float32 weight when held (``_store`` points it at the module's parameter)
    stored_dequantized: torch.Tensor | None = None

    @property
    def codes(self) -> torch.Tensor:
        """uint8 codes [out, R]. Recomputed when not stored: round(W_q / s) + z gives the codes back
        exactly, since W_q = (q - z) * s in float32 is within one part in 2^23 of the integer
        multiple and |q - z| < 256."""
        if self.stored_codes is not None:
            return self.stored_codes
        matrix = to_matrix(self.dequantized.float(), self.transposed)
        q = torch.round(grouped(matrix, self.group_size) / self.scale[..., None]) + self.zero_point[..., None]
        return q.reshape(matrix.shape).to(torch.uint8)

    @property
    def dequantized(self) -> torch.Tensor:
        """(q - z) * s in float32, in the stored layout: the same floats as ``export`` computed them
        from the float codes (integers, exact in float32 either way)."""
        if self.stored_dequantized is not None:
            return self.stored_dequantized
        q = grouped(self.stored_codes, self.group_size).float()
        grid = Grid(self.scale[..., None], self.zero_point[..., None].float())
        return from_matrix(dequantize(q, grid).reshape(self.stored_codes.shape), self.shape,
                           self.transposed).contiguous()


class WeightQuantizer(nn.Module):
    name: ClassVar[str] = "rtn"
    #: False: nothing to train (the block is not reconstructed)
    learned: ClassVar[bool] = False
    #: grid initialisation when the user does not choose one
    default_grid: ClassVar[str] = "minmax"
    #: the method's parameters with their defaults (the one definition of each default)
    params: ClassVar[tuple[MethodParam, ...]] = (BATCH_SIZE,)
    #: learning-rate schedule over the steps: "constant", "cosine" or "linear" (decay to 0)
    lr_schedule: ClassVar[str] = "constant"
    #: "adam", or "signsgd": each step moves a parameter by lr * sign(gradient) (SignRound)
    optimizer: ClassVar[str] = "adam"
    #: which calibration batch each step trains on: "random" (one drawn at random every step, as the
    #: BRECQ/FlexRound reference code draws its sample indices), or "epochs" (every batch once per
    #: epoch, in a fresh random order each epoch, as AutoRound's SignRound goes through its samples)
    batch_order: ClassVar[str] = "random"

    @classmethod
    def resolve(cls, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every declared parameter's value: ``given`` where set, else the method's default."""
        return resolve_params(cls.name, cls.params, given or {})

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, transposed: bool = False,
                 grid: str | None = None, tensor_name: str = "weight", settings: Mapping[str, Any] | None = None):
        super().__init__()
        self.settings = self.resolve(settings)
        self.scheme = scheme
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype
        self.transposed = transposed
        matrix = to_matrix(weight.detach().float(), transposed)
        self.rows, self.row_length = matrix.shape
        self.group = group_size_for(scheme, self.row_length, tensor_name)
        # a view of a float32 weight (never written while its quantizer lives): no second copy
        self.register_buffer("w", grouped(matrix, self.group).contiguous())
        # refuses a NaN/Inf (one would become a NaN row, its scale, and spread downstream)
        init = make_grid(matrix, scheme, self.group, grid or self.default_grid, tensor_name)
        self.register_buffer("scale0", init.scale)
        self.register_buffer("zero", init.zero)

    # ----- what subclasses change ---------------------------------------------------------------
    def grid(self) -> Grid:
        return Grid(self.scale0, self.zero)

    def hard_codes(self) -> torch.Tensor:
        return codes(self.w, self.grid(), self.scheme)

    def regularizer(self, progress: float) -> torch.Tensor:
        return self.w.new_zeros(())

    @classmethod
    def signed_step(cls, bits: int, steps: int) -> float:
        """Initial step size of a ``signsgd`` method when no lr is given: SignRound's 1 / steps."""
        return 1.0 / steps

    def initial_step(self) -> float:
        """The step size a ``signsgd`` method starts from: ``lr`` when given, else ``signed_step(bits, steps)``."""
        return self.settings["lr"] or self.signed_step(self.scheme.bits, max(1, self.settings["steps"]))

    # ----- shared -------------------------------------------------------------------------------
    def to_stored(self, g: torch.Tensor) -> torch.Tensor:
        return from_matrix(g.reshape(self.rows, self.row_length), self.shape, self.transposed)

    def forward(self) -> torch.Tensor:
        """The fake-quantized weight in the stored layout (float32); learned methods make it
        differentiable in their parameters."""
        return self.to_stored(dequantize(self.hard_codes(), self.grid()))

    @torch.no_grad()
    def export(self) -> QuantizedWeight:
        grid = stored_grid(Grid(self.grid().scale.detach().float(), self.zero), self.scheme)
        return QuantizedWeight(
            stored_codes=self.hard_codes().reshape(self.rows, self.row_length).to(torch.uint8),
            scale=grid.scale.squeeze(-1).contiguous(),
            zero_point=grid.zero.squeeze(-1).to(torch.uint8).contiguous(),
            group_size=self.group,
            transposed=self.transposed,
            shape=self.shape,
        )
