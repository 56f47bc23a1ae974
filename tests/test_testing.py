"""fastsched.testing: the helpers the optimizer tests rely on do what they claim."""

from __future__ import annotations

import math

import pytest
import torch

from fastsched.testing import (
    LOW_PRECISION_FLOOR,
    TOLERANCES,
    Layout,
    assert_low_precision_close,
    awkward_layouts,
    max_abs_error,
    random_values,
)


def test_tolerance_table_covers_the_supported_dtypes():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert set(TOLERANCES[dtype]) == {"rtol", "atol"}
        assert TOLERANCES[dtype]["rtol"] >= torch.finfo(dtype).eps
    assert TOLERANCES[torch.float32]["rtol"] == 1e-5


@pytest.mark.parametrize("block", [16, 256])
def test_awkward_layouts(block):
    layouts = awkward_layouts(block, empty=True)
    sizes = {l.numel for l in layouts}
    assert {1, block - 1, block, block + 1, 0} <= sizes
    assert any(l.shape == () for l in layouts)
    assert any(l.numel > 2 * block for l in layouts)
    gen = torch.Generator().manual_seed(0)
    for l, v in zip(layouts, random_values(layouts, gen)):
        for dtype in (torch.float32, torch.bfloat16):
            t = l.make(v, dtype=dtype)
            assert t.shape == v.shape and t.dtype == dtype
            assert torch.equal(t, v.to(dtype))
            if l.kind == "permuted":
                assert not t.is_contiguous() and t.t().is_contiguous()
            elif l.kind == "offset":
                assert t.is_contiguous() and t.data_ptr() % 16 != 0
            else:
                assert t.is_contiguous()
    assert not any(l.numel == 0 for l in awkward_layouts(block))


def test_layout_arguments():
    with pytest.raises(ValueError, match="kind must be"):
        Layout((3,), "strided")
    with pytest.raises(ValueError, match="at least two dimensions"):
        Layout((3,), "permuted")
    with pytest.raises(ValueError, match="values of shape"):
        Layout((3,)).make(torch.zeros(4))


def test_max_abs_error():
    a = torch.tensor([1.0, 2.0, float("inf")])
    assert max_abs_error(a, torch.tensor([1.0, 2.5, float("inf")])) == 0.5
    assert max_abs_error(a, torch.tensor([1.0, 2.0, 3.0])) == math.inf
    assert max_abs_error(torch.tensor([float("nan")]), torch.tensor([0.0])) == math.inf
    assert max_abs_error(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        max_abs_error(torch.zeros(2), torch.zeros(3))


def test_low_precision_check_passes_and_fails():
    ref = [torch.linspace(-2, 2, 101, dtype=torch.float64)]
    theirs = [(ref[0] + 0.01).to(torch.bfloat16)]
    ok = [(ref[0] - 0.015).to(torch.bfloat16)]
    errors = assert_low_precision_close(ok, theirs, ref)
    assert errors[0][0] <= 2 * errors[0][1] + LOW_PRECISION_FLOOR[torch.bfloat16]
    bad = [(ref[0] + 0.05).to(torch.bfloat16)]
    with pytest.raises(AssertionError, match="tensor 0"):
        assert_low_precision_close(bad, theirs, ref, msg="bad")
    nan = [torch.full((101,), float("nan"), dtype=torch.bfloat16)]
    with pytest.raises(AssertionError):
        assert_low_precision_close(nan, theirs, ref)
    with pytest.raises(ValueError, match="same number"):
        assert_low_precision_close(ok, theirs, ref + ref)
