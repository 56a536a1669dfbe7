"""fxcompress's own C kernels (fxcompress/native.py): exact arithmetic, the overflow bound, the build's failure
reasons and the huge-page weight copies."""

from __future__ import annotations

import stat

import pytest
import torch

from fxcompress import native

needs_native = pytest.mark.skipif(bool(native.gemv_missing()), reason=native.gemv_missing() or "")


@needs_native
@pytest.mark.parametrize("digits", [2, 3])
def test_gemv_int8_is_exact_but_for_the_activation_grid(digits):
    """Each activation is rounded to a grid of 2**(8 * digits - 1) - 1 steps of its row's largest magnitude and
    the products are summed exactly in integers: the error is below one step per input (half a step, plus
    float32's rounding of x / step) times the weight's row sum of magnitudes, plus float32's rounding of the
    result; an all-zero row gives exactly zero."""
    weight = torch.randint(-128, 128, (37, 300), dtype=torch.int8)  # rows not a multiple of 4, a partial block
    scales = torch.rand(37) + 0.5
    x = torch.randn(3, 300)
    x[1, 5], x[2] = 1e4, 0.0
    y = native.gemv_int8(x, weight, weight.sum(1, dtype=torch.int32), scales, digits)
    exact = x.double() @ (weight.double() * scales.double()[:, None]).T
    step = x.double().abs().amax(1, keepdim=True) / (2 ** (8 * digits - 1) - 1)
    limit = step * (weight.double().abs().sum(1) * scales.double()) + 2.0**-23 * exact.abs()
    assert ((y.double() - exact).abs() <= limit).all() and not y[2].any()
    broken = native.gemv_int8(x, weight, weight.sum(1, dtype=torch.int32) + 1, scales, digits)
    assert not ((broken.double() - exact).abs() <= limit).all()  # the check can fail: a wrong row total


@needs_native
def test_gemv_int8_sums_the_largest_products_without_overflow_past_int32():
    """At 140,000 inputs (a sum of 4.6e9 per row, over int32) of the largest digit times the largest weight,
    each int32 lane holds a 16th and the lanes are summed in int64: the result is exact."""
    columns = 140_000
    weight = torch.full((4, columns), -128, dtype=torch.int8)
    x = torch.ones(1, columns)  # every activation the row's largest: every digit 255
    y = native.gemv_int8(x, weight, weight.sum(1, dtype=torch.int32), torch.ones(4), 2)
    assert torch.equal(y, torch.full((1, 4), -128.0 * columns))
    assert columns <= native.GEMV_MAX_INPUTS


def test_a_compiler_that_fails_is_named_with_its_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path / "cache"))
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'cc: error: no such flag' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    library, why = native._load(str(compiler))
    assert library is None and str(compiler) in why and "gemv.c" in why
    assert native._load(None)[1] == "no C compiler found (set CC, or install gcc)"
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built left to load


@pytest.mark.parametrize("shape", [(1024, 4096), (3, 5)], ids=["4-MiB", "small"])
def test_huge_page_copy_holds_the_same_values_in_exactly_their_bytes(shape):
    tensor = torch.randint(-128, 128, shape, dtype=torch.int8)
    copy = native.huge_page_copy(tensor)
    assert torch.equal(copy, tensor) and copy.is_contiguous() and copy.data_ptr() != tensor.data_ptr()
    assert copy.untyped_storage().nbytes() == tensor.numel()  # saving it writes no slack
    if tensor.numel() >= 2 << 20:
        assert copy.data_ptr() % (2 << 20) == 0  # the data starts on a huge-page boundary
    tensor.zero_()
    assert copy.any()  # a copy, not a view
