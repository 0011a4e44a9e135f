"""Every classic merge method against results computed by hand."""

import math

import pytest
import torch

from modelsurgery.ops.merge import get_method
from modelsurgery.ops.merge.merge import MergeOptions


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_linear_weighted_and_normalised():
    out = get_method("linear").fn([t(1, 2), t(3, 6)], [1.0, 3.0], None, None)
    torch.testing.assert_close(out, t(2.5, 5.0))  # (1*1 + 3*3)/4, (2 + 18)/4


def test_slerp_quarter_circle():
    a, b = t(1, 0), t(0, 1)
    out = get_method("slerp").fn([a, b], [0.5, 0.5], None, None)
    torch.testing.assert_close(out, t(math.sqrt(0.5), math.sqrt(0.5)))
    out = get_method("slerp").fn([a, b], [2 / 3, 1 / 3], None, None)  # t = 1/3 -> 30 degrees
    torch.testing.assert_close(out, t(math.cos(math.pi / 6), math.sin(math.pi / 6)))


def test_slerp_parallel_falls_back_to_lerp():
    out = get_method("slerp").fn([t(1, 1), t(2, 2)], [0.5, 0.5], None, None)
    torch.testing.assert_close(out, t(1.5, 1.5))


def test_task_arithmetic():
    base, m1, m2 = t(1, 1, 1), t(2, 1, 0), t(1, 3, 1)
    out = get_method("task-arithmetic").fn([m1, m2], [1.0, 0.5], base, MergeOptions(scale=2.0))
    # deltas (1,0,-1) and (0,2,0); sum 1*(1,0,-1) + 0.5*(0,2,0) = (1,1,-1); base + 2*that
    torch.testing.assert_close(out, t(3, 3, -1))


def test_ties_trim_elect_disjoint_mean():
    base = torch.zeros(4)
    m1 = t(4, -1, 2, 0.5)   # density 0.5 keeps 4 and 2
    m2 = t(2, 3, -3, 0.1)   # keeps 3 and -3
    m3 = t(-1, 0.2, 1, 0)   # keeps -1 and 1 (ties at |1|: 1 and -1 both kept -> 2 of 4)
    out = get_method("ties").fn([m1, m2, m3], [1.0, 1.0, 1.0], base, MergeOptions(density=0.5))
    # trimmed: (4,0,2,0), (0,3,-3,0), (-1,0,1,0); sums (3,3,0,0) -> signs (+,+,0,0)
    # entry 0: agreeing 4 -> 4; entry 1: 3; entry 2: sign 0, nothing agrees -> 0; entry 3: 0
    torch.testing.assert_close(out, t(4, 3, 0, 0))


def test_ties_weights_and_scale():
    base = t(1, 1)
    out = get_method("ties").fn([t(3, 1), t(2, 0)], [1.0, 3.0], base, MergeOptions(density=1.0, scale=0.5))
    # deltas (2,0)*1 and (1,-1)*3 = (3,-3); sums (5,-3): signs (+,-); entry 0: (2+3)/(1+3) = 1.25
    # entry 1: only model 2 agrees: -3/3 = -1; base + 0.5 * (1.25, -1)
    torch.testing.assert_close(out, t(1.625, 0.5))


def test_unknown_method():
    from modelsurgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="merge method 'nope'"):
        get_method("nope")
