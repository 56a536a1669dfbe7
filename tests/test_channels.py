"""Channel-space helpers."""

from __future__ import annotations

import numpy as np
import pytest

from fxcompress.channels import distinct


@pytest.mark.parametrize("size", [0, 1, 7, 100_000])
def test_distinct_is_numpys_unique(size):
    values = np.random.default_rng(size).integers(-50, 2**40 if size > 10 else 5, size=size)
    assert np.array_equal(distinct(values), np.unique(values))
