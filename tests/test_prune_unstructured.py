"""Level (magnitude) pruning, local and global, and N:M semi-structured masks."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress import prune as P
from fxcompress.analysis import get_analysis
from fxcompress.examples import SmallCNN
from fxcompress.masks import current_masks
from fxcompress.passes import InsertMasks, standard_pruning

torch.set_num_threads(2)
X = torch.randn(2, 1, 28, 28)


def model():
    torch.manual_seed(0)
    return SmallCNN(8, 16, 32).eval()


def sparsity(mask: torch.Tensor) -> float:
    return 1.0 - float(mask.mean())


def test_local_level_pruning_reaches_sparsity_in_every_layer_and_keeps_shapes():
    m = model()
    small = fxcompress.compile(m, X, standard_pruning(P.LevelPruner(0.9)))
    masks = current_masks(small)
    assert set(masks) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    for name, mask in masks.items():
        assert sparsity(mask) == pytest.approx(int(mask.numel() * 0.9) / mask.numel())
        kept = small.get_submodule(name.rsplit(".", 1)[0]).weight.detach().abs()[mask.bool()]
        dropped = m.get_submodule(name.rsplit(".", 1)[0]).weight.detach().abs()[~mask.bool()]
        assert kept.min() >= dropped.max()  # the smallest magnitudes went
    assert small.conv2.weight.shape == m.conv2.weight.shape  # unstructured masks stay simulated


def test_global_level_pruning_uses_one_threshold_and_reaches_total_sparsity():
    m = model()
    gm = fxcompress.trace(m, X)
    masks = P.LevelPruner(0.8, allocation="global").compute_masks(gm, get_analysis(gm))
    total = sum(mask.numel() for mask in masks.values())
    dropped = sum(int((mask == 0).sum()) for mask in masks.values())
    assert dropped == int(total * 0.8)
    weights = {n: gm.get_submodule(n.rsplit(".", 1)[0]).weight.detach().abs() for n in masks}
    kept_min = min(float(weights[n][masks[n].bool()].min()) for n in masks)
    dropped_max = max(float(weights[n][~masks[n].bool()].max()) for n in masks if (masks[n] == 0).any())
    assert kept_min >= dropped_max
    assert len({round(sparsity(mask), 2) for mask in masks.values()}) > 1  # layers differ


def test_global_level_pruning_caps_each_layer():
    m = model()
    with torch.no_grad():
        m.fc1.weight.mul_(1e-4)  # globally the smallest: would be emptied without the cap
    gm = fxcompress.trace(m, X)
    masks = P.LevelPruner(0.5, allocation="global", max_sparsity_per_layer=0.6).compute_masks(gm, get_analysis(gm))
    assert all(sparsity(mask) <= 0.6 + 1e-6 for mask in masks.values())


def test_nm_masks_keep_the_n_largest_of_every_m_inputs():
    m = model()
    with pytest.warns(UserWarning, match="conv1.weight has 1 inputs"):
        small = fxcompress.compile(m, X, standard_pruning(P.NMPruner(n=2, m=4)))
    masks = current_masks(small)
    assert "conv1.weight" not in masks
    for name in ("conv2.weight", "fc1.weight", "fc2.weight"):
        mask = masks[name]
        weight = m.get_submodule(name.rsplit(".", 1)[0]).weight.detach().abs()
        laid_mask = (mask.movedim(1, -1) if mask.dim() > 2 else mask).reshape(-1, 4)
        laid_weight = (weight.movedim(1, -1) if weight.dim() > 2 else weight).reshape(-1, 4)
        assert torch.all(laid_mask.sum(1) == 2)
        kept_min = laid_weight.masked_fill(laid_mask == 0, float("inf")).min(1).values
        dropped_max = laid_weight.masked_fill(laid_mask == 1, float("-inf")).max(1).values
        assert torch.all(kept_min >= dropped_max)
        assert sparsity(mask) == 0.5


def test_nm_layer_mask_example():
    mask = P.NMPruner(n=2, m=4).layer_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.0, 0.0, -1.0, 5.0]]))
    assert mask.tolist() == [[0, 1, 1, 0, 0, 0, 1, 1]]


def test_nm_rejects_bad_n_and_m():
    with pytest.raises(fxcompress.ConfigError, match="0 < n <= m"):
        P.NMPruner(n=5, m=4)


def test_level_pruning_from_text_pipeline():
    small = fxcompress.compile(model(), X, "insert-masks{pruner=level,sparsity=0.5},analyze-groups,propagate-channels,shrink")
    assert sparsity(current_masks(small)["fc1.weight"]) == pytest.approx(0.5)


def test_layers_of_an_exported_graph_are_selected_by_their_original_type():
    """``torch.export`` keeps plain containers where the model had ``nn.Linear``; selection must still find them."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    gm = fxcompress.compile(model, torch.randn(2, 8), [InsertMasks(P.LevelPruner(0.5))], frontend="export")
    assert fxcompress.report.count_nonzero_params(gm) < fxcompress.report.count_params(gm)


def test_a_selection_that_matches_no_layer_says_so():
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    with pytest.warns(UserWarning, match="LevelPruner selects no layer"):
        fxcompress.compile(model, torch.randn(2, 8), [InsertMasks(P.LevelPruner(0.5, op_names=("nothing*",)))])
