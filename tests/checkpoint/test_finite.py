"""check_finite: NaN/Inf in an input tensor refused with the tensor named and the count of bad values."""

import pytest
import torch

from modelsurgery.checkpoint import check_finite
from modelsurgery.errors import SurgeryError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nan_and_inf_named_and_counted(dtype):
    t = torch.zeros(3, 4, dtype=dtype)
    t[0, 1], t[2, 3], t[1, 0] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(SurgeryError, match=r"m\.safetensors: tensor 'h\.0\.w' holds 3 NaN/Inf value\(s\) of 12"):
        check_finite("h.0.w", t, "m.safetensors")


def test_finite_integer_and_empty_tensors_pass():
    check_finite("w", torch.tensor([3e38, -3e38, 0.0]))
    check_finite("ids", torch.tensor([1, 2, 3]))
    check_finite("empty", torch.zeros(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_finite_values_whose_sum_overflows_pass_and_opposite_infinities_are_caught(dtype):
    """The check sums first: finite values can overflow that sum (60000 x 4 > float16's 65504; 3e38 x 2 in
    float32) and must still pass; +Inf and -Inf, whose sum is NaN, must still be refused."""
    big = 60000.0 if dtype == torch.float16 else 3e38
    check_finite("w", torch.full((4,), big, dtype=dtype))
    t = torch.tensor([float("inf"), float("-inf"), 1.0], dtype=dtype)
    with pytest.raises(SurgeryError, match=r"holds 2 NaN/Inf value\(s\) of 3"):
        check_finite("w", t)
