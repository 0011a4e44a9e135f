import math

import pytest

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.grow import plan_growth


def test_guideline_hand_computation():
    # N = 7e9, D = 300e9: C = 6 N D = 1.26e22. By hand: log10 N = 9.845098, log10 C = 22.100371,
    # 0.88 * 9.845098 = 8.663686, 163.27 / 22.100371 = 7.387658, sum - 5.74 = 10.311344,
    # d = 10^10.311344 = 2.0479e10 tokens.
    plan = plan_growth("7B", "300B")
    assert plan.compute == pytest.approx(1.26e22)
    assert plan.growth_tokens == pytest.approx(2.0479e10, rel=2e-4)
    assert plan.growth_factor == 4
    assert plan.small_model_params == pytest.approx(1.75e9)


def test_guideline_from_compute_matches_tokens():
    a = plan_growth(4.1e8, tokens=1e10)
    b = plan_growth("410M", compute=6 * 4.1e8 * 1e10)
    assert a.growth_tokens == pytest.approx(b.growth_tokens)
    # by hand: log10 N = 8.612784, log10 C = 19.390935; 0.88 * 8.612784 = 7.579250,
    # 163.27 / 19.390935 = 8.419914; 7.579250 + 8.419914 - 5.74 = 10.259164
    assert math.log10(a.growth_tokens) == pytest.approx(10.259164, abs=2e-6)


@pytest.mark.parametrize("params,tokens,msg", [("-5", "1B", "--params"), ("7B", "0", "--tokens"),
                                               ("seven", "1B", "--params"), ("7B", None, "--tokens")])
def test_guideline_bad_input(params, tokens, msg):
    with pytest.raises(SurgeryError, match=msg):
        plan_growth(params, tokens)


def test_growth_after_the_whole_budget_is_flagged():
    """410M parameters on 10B tokens: by hand (above) d = 10^10.259164 = 1.816e10 tokens, more than the 1e10
    of the whole budget, so the small model could not be trained that long before growing. The plan says
    so (in its warnings, on stderr from the CLI) instead of printing an impossible schedule as advice."""
    plan = plan_growth("410M", "10B")
    assert plan.growth_tokens > 1e10
    assert plan.warnings and "10B" not in plan.warnings[0] and "1e+10" in plan.warnings[0]
    same = plan_growth("410M", compute=6 * 4.1e8 * 1e10)  # the budget in tokens is C / 6N
    assert same.warnings == plan.warnings
    assert plan_growth("7B", "300B").warnings == []  # 2.05e10 of 3e11 tokens
