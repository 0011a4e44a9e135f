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
