"""All assignment backends reach the optimum: brute force on tiny problems, each other on larger ones."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.match.assignment import solve_assignment

BACKENDS = ("lap", "scipy", "torch")


def value(S, p):
    return float(S[torch.arange(S.shape[0]), p].sum())


def brute_force(S):
    n = S.shape[0]
    return max(sum(float(S[i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000), integer=st.booleans())
def test_backends_match_brute_force(n, seed, integer):
    g = torch.Generator().manual_seed(seed)
    S = torch.randint(-3, 4, (n, n), generator=g).double() if integer else torch.randn(n, n, generator=g).double()
    best = brute_force(S)
    for b in BACKENDS:
        p = solve_assignment(S, b)
        assert sorted(p.tolist()) == list(range(n))
        assert value(S, p) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("kind", ["random", "constant", "rank1", "ties", "scaled"])
def test_backends_agree_on_larger_and_degenerate_costs(kind):
    g = torch.Generator().manual_seed(1)
    n = 60
    S = {
        "random": lambda: torch.randn(n, n, generator=g),
        "constant": lambda: torch.full((n, n), 2.5),
        "rank1": lambda: torch.outer(torch.randn(n, generator=g), torch.randn(n, generator=g)),
        "ties": lambda: torch.randint(0, 2, (n, n), generator=g).float(),
        "scaled": lambda: 1e6 * torch.randn(n, n, generator=g),
    }[kind]().double()
    values = {b: value(S, solve_assignment(S, b)) for b in BACKENDS}
    ref = values["scipy"]
    for b, v in values.items():
        assert v == pytest.approx(ref, rel=1e-9, abs=1e-9), (b, values)


def test_numpy_input_and_bad_shapes():
    S = np.eye(4)
    assert solve_assignment(S, "torch").tolist() == [0, 1, 2, 3]
    with pytest.raises(SurgeryError, match="square"):
        solve_assignment(torch.zeros(3, 4))
    with pytest.raises(SurgeryError, match="backend"):
        solve_assignment(torch.zeros(3, 3), "nope")
