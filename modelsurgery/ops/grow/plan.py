"""When to grow: the guideline of Du et al. 2024 ("Stacking Your Transformers", Sec. 4.2, Eq. 2),
log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74, with N the target model's parameters, C = 6 N D its
training compute in FLOPs (D tokens) and d the tokens to train the small model on before growing it with
G_stack; the recommended growth factor is g = 4 (their Sec. 4.1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from modelsurgery.errors import SurgeryError

GROWTH_FACTOR = 4
SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


@dataclass
class GrowthPlan:
    params: float
    tokens: float | None
    compute: float
    growth_tokens: float
    growth_factor: int
    small_model_params: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_count(text: str | float, what: str) -> float:
    """'7B', '300e9', '1.2T', 7000000000 -> a positive number."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([KMBGT]?)\s*", str(text), re.IGNORECASE)
        if not m:
            raise SurgeryError(f"{what} '{text}': expected a number such as 7e9, 7B or 300B")
        try:
            value = float(m.group(1)) * SUFFIXES[m.group(2).upper()]
        except ValueError:
            raise SurgeryError(f"{what} '{text}': expected a number such as 7e9, 7B or 300B") from None
    if not value > 0 or math.isinf(value):
        raise SurgeryError(f"{what} {text}: must be a positive number")
    return value


def growth_tokens(params: float, compute: float) -> float:
    """d of Eq. 2: tokens to train the small model before stacking."""
    if compute <= 10:
        raise SurgeryError(f"compute {compute:g} FLOPs: too small for the guideline (log10 C must be > 1)")
    return 10 ** (0.88 * math.log10(params) + 163.27 / math.log10(compute) - 5.74)


def plan_growth(params: str | float, tokens: str | float | None = None, compute: str | float | None = None
                ) -> GrowthPlan:
    """The guideline for a target of ``params`` parameters trained on ``tokens`` tokens (or ``compute`` FLOPs)."""
    n = parse_count(params, "--params")
    if (tokens is None) == (compute is None):
        raise SurgeryError("--plan needs --params and one of --tokens or --compute")
    d_total = parse_count(tokens, "--tokens") if tokens is not None else None
    c = 6 * n * d_total if d_total is not None else parse_count(compute, "--compute")
    d = growth_tokens(n, c)
    budget = c / (6 * n)  # the whole budget in tokens (the --tokens given, or implied by --compute)
    warnings = []
    if d >= budget:  # an empirical fit, extrapolated: growing after the whole budget is no schedule
        warnings.append(f"the guideline's d = {d:.4g} tokens is not less than the whole budget of {budget:.4g} "
                        "tokens: the guideline, an empirical fit, gives no schedule for this budget")
    return GrowthPlan(params=n, tokens=d_total, compute=c, growth_tokens=d, growth_factor=GROWTH_FACTOR,
                      small_model_params=n / GROWTH_FACTOR, warnings=warnings)
