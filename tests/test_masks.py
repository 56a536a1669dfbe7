"""Structured masks remember their per-dim keep-vectors; every question answered from them
must equal the answer read from the tensor, and a mask changed in place must not be trusted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress
from fxcompress.analysis import get_analysis
from fxcompress.masks import (
    _alive_positions,
    _already_zero,
    _outer_mask,
    current_masks,
    kept_components,
    mask_factors,
    ones_where_kept,
)
from fxcompress.passes import standard_pruning
from fxcompress.prune import L1Norm


def _general(mask: torch.Tensor) -> torch.Tensor:
    """The same values without the remembered factors: every question takes the tensor path."""
    return mask.clone()


@st.composite
def masks_and_positions(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    dims = draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))
    dead = {d: np.array(sorted(draw(st.sets(st.integers(0, shape[d] - 1)))), dtype=np.int64) for d in dims}
    # what Shrink keeps: a subset of the dims, each keeping its live positions (the mask is zero elsewhere)
    kept = {d: np.setdiff1d(np.arange(shape[d]), dead[d]) for d in draw(st.sets(st.sampled_from(sorted(dims))))}
    kept = {d: k for d, k in kept.items() if len(k)}
    probe = {d: np.array(sorted(draw(st.sets(st.integers(0, shape[d] - 1), min_size=1))), dtype=np.int64)
             for d in draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))}
    return shape, dead, kept, probe


@settings(max_examples=200, deadline=None)
@given(masks_and_positions())
def test_answers_from_factors_equal_answers_from_the_tensor(case):
    shape, dead, kept, probe = case
    mask = _outer_mask(torch.Size(shape), dead)
    plain = _general(mask)
    assert mask_factors(mask) is not None and mask_factors(plain) is None
    for dim in range(len(shape)):
        assert np.array_equal(_alive_positions(mask, dim), _alive_positions(plain, dim))
    assert _already_zero(mask, probe) == _already_zero(plain, probe)
    assert ones_where_kept(mask, kept) == ones_where_kept(plain, kept)


def test_a_mask_changed_in_place_is_read_from_the_tensor():
    mask = _outer_mask(torch.Size((4, 3)), {0: np.array([1])})
    assert not _alive_positions(mask, 0)[1]
    mask[1, 0] = 1.0  # in place: the remembered factors no longer describe it
    assert mask_factors(mask) is None
    assert _alive_positions(mask, 0)[1]


def test_kept_channels_follow_a_mask_edited_after_pruning():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    *masking, _ = standard_pruning(L1Norm(0.5))
    gm = fxcompress.compile(model, x, masking)
    analysis = get_analysis(gm)
    masks = current_masks(gm)
    before = kept_components(analysis, masks).sum()
    removed_row = int(np.flatnonzero(masks["0.weight"].flatten(1).amax(1).numpy() == 0)[0])
    masks["0.weight"][removed_row] = 1.0  # the user revives one filter by hand
    masks["0.bias"][removed_row] = 1.0
    assert kept_components(analysis, masks).sum() == before + 1


@pytest.mark.parametrize("inference", [False, True])
def test_masks_made_in_inference_mode_are_still_correct(inference):
    with torch.inference_mode(inference):
        mask = _outer_mask(torch.Size((4, 2)), {0: np.array([0, 3])})
    assert np.array_equal(_alive_positions(mask, 0), [False, True, True, False])


def test_combining_masks_reports_a_change_exactly_when_the_mask_changes():
    from fxcompress.masks import apply_masks

    for existing_dead, new_dead in [({0: np.arange(4)}, {1: np.array([0])}),  # already all zero
                                    ({0: np.array([1])}, {0: np.array([1])}),  # same rows again
                                    ({0: np.array([1])}, {1: np.array([2])})]:  # a new column
        gm = fxcompress.trace(torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.randn(1, 3))
        apply_masks(gm, {"0.weight": _outer_mask(torch.Size((4, 3)), existing_dead)})
        before = current_masks(gm)["0.weight"].clone()
        changed = apply_masks(gm, {"0.weight": _outer_mask(torch.Size((4, 3)), new_dead)})
        assert changed == (not torch.equal(current_masks(gm)["0.weight"], before))
