import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelsurgery.errors import SurgeryError
from modelsurgery.ops.grow import interleave_layout, slices_layout, stack_layout


def test_gstack_repeats_whole_stack_in_order():
    # Du et al.: target block i takes source block i mod L
    assert stack_layout(3, 2) == [0, 1, 2, 0, 1, 2]
    assert stack_layout(2, 4) == [0, 1, 0, 1, 0, 1, 0, 1]


def test_depth_upscaling_slices():
    layout = slices_layout(32, "0:24,8:32")
    assert len(layout) == 48
    assert layout[:24] == list(range(24)) and layout[24:] == list(range(8, 32))


@pytest.mark.parametrize("spec", ["0:33", "5:5", "-1:3", "4:2", "0-3", "a:b"])
def test_bad_slices(spec):
    with pytest.raises(SurgeryError, match=spec.split(",")[0].replace("-", r"\-")):
        slices_layout(32, spec)


def test_interleave_positions():
    layout, identity = interleave_layout(4, 2)
    assert layout == [0, 1, 1, 2, 3, 3]
    assert identity == {2, 5}


@given(st.integers(1, 12), st.integers(1, 12))
def test_interleave_properties(n, k):
    k = min(k, n)
    layout, identity = interleave_layout(n, k)
    assert len(identity) == n // k
    # dropping the identity copies gives back the input order; each copy repeats the block before it
    assert [b for i, b in enumerate(layout) if i not in identity] == list(range(n))
    assert all(layout[i] == layout[i - 1] for i in identity)


@given(st.integers(1, 10), st.integers(1, 5))
def test_stack_properties(n, g):
    layout = stack_layout(n, g)
    assert len(layout) == n * g
    assert all(layout[i] == i % n for i in range(n * g))
