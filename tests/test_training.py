"""Compiled models are ordinary, trainable, saveable modules, and compiling leaves the user's model alone.

* a shrunk model trains: forward, backward and an optimizer step change its weights;
* a masked model fine-tunes with its masks held: pruned weights stay zero, and
  shrinking it afterwards still reproduces it;
* ``state_dict`` round-trips into a fresh copy; ``torch.save``/``torch.load``
  of the ``GraphModule`` gives identical outputs;
* ``compile`` never mutates the model it is given.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress.examples import SmallCNN
from fxcompress.masks import current_masks
from fxcompress.passes import Shrink, standard_pruning
from fxcompress.prune import L1Norm

INPUT = (4, 1, 28, 28)


def small_cnn() -> SmallCNN:
    return SmallCNN(c1=8, c2=16, hidden=16)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(INPUT, generator=generator), torch.randint(0, 10, (INPUT[0],), generator=generator)


@pytest.fixture(scope="module")
def pair():
    """(model, masked, shrunk) for SmallCNN at 50% L1 sparsity; tests deep-copy before mutating."""
    from conftest import compile_pair

    torch.manual_seed(0)
    model = small_cnn().eval()
    masked, shrunk = compile_pair(model, torch.randn(INPUT), L1Norm(0.5))
    return model, masked, shrunk


def sgd_steps(model: nn.Module, steps: int = 3, lr: float = 0.1) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()


def test_shrunk_model_is_smaller(pair):
    _, _, shrunk = pair
    assert (shrunk.conv1.out_channels, shrunk.conv2.out_channels, shrunk.fc1.out_features) == (4, 8, 8)
    assert shrunk.fc1.in_features == 8 * 7 * 7


def test_shrunk_model_trains(pair):
    shrunk = copy.deepcopy(pair[2])
    before = {k: v.detach().clone() for k, v in shrunk.named_parameters()}
    x, y = batch()
    shrunk.train()
    loss = nn.functional.cross_entropy(shrunk(x), y)
    loss.backward()
    for name, p in shrunk.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
    torch.optim.SGD(shrunk.parameters(), lr=0.1).step()
    # a conv bias right before a batch norm in train mode has an exactly-zero gradient: BN subtracts the mean
    learning = {k for k, p in shrunk.named_parameters() if p.grad.abs().max() > 1e-5}
    assert learning >= {k for k in before if k.endswith("weight")}
    # SGD at lr 0.1 moves a parameter by 0.1 * grad: more than 1e-6 exactly for the learning ones (float noise
    # leaves the BN-cancelled conv bias a ~1e-9 gradient, which moves it by far less)
    changed = {k for k, p in shrunk.named_parameters() if (p.detach() - before[k]).abs().max() > 1e-6}
    assert changed == learning


def test_masked_model_fine_tunes_with_masks_held(pair):
    masked = copy.deepcopy(pair[1])
    masks = {k: v.clone() for k, v in current_masks(masked).items()}
    assert masks, "the masked model should carry masks"
    orig_before = {k: _orig(masked, k).detach().clone() for k in masks}
    sgd_steps(masked)
    for target, mask in masks.items():
        owner, _, name = target.rpartition(".")
        module = masked.get_submodule(owner)
        assert torch.equal(getattr(module, name + "_mask"), mask), f"{target}: mask changed"
        assert torch.all(getattr(module, name)[mask == 0] == 0), f"{target}: a pruned weight became nonzero"
        orig = _orig(masked, target).detach()
        assert torch.equal(orig[mask == 0], orig_before[target][mask == 0]), f"{target}: pruned weights received updates"
        if name == "weight":  # (biases before a batch norm get no gradient in train mode)
            assert not torch.equal(orig[mask != 0], orig_before[target][mask != 0]), f"{target}: kept weights did not train"


def _orig(gm, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name + "_orig")


def test_fine_tuned_masked_model_still_shrinks_exactly(pair, helpers):
    masked = copy.deepcopy(pair[1])
    sgd_steps(masked)
    with torch.no_grad():  # recompute weight = weight_orig * weight_mask outside autograd, so deepcopy works
        masked(batch()[0])
    reference = copy.deepcopy(masked)
    assert Shrink()(masked).modified
    masked.recompile()
    assert masked.conv1.out_channels == 4
    helpers.outputs_agree(reference, masked, batch(7)[:1], rtol=1e-4)


def test_state_dict_round_trips_into_a_fresh_copy(pair):
    shrunk = pair[2]
    fresh = copy.deepcopy(shrunk)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()
    x = batch()[0]
    assert not torch.equal(fresh.eval()(x), shrunk.eval()(x))
    result = fresh.load_state_dict(shrunk.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(fresh(x), shrunk(x))


@pytest.mark.parametrize("which", [1, 2], ids=["masked", "shrunk"])
def test_torch_save_and_load_of_the_graph_module(pair, which):
    gm = pair[which]
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, fx.GraphModule)
    assert loaded.code == gm.code
    x = batch()[0]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))
    assert set(current_masks(loaded)) == set(current_masks(gm))


def structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, repr(m) if not list(m.children()) else type(m).__name__) for name, m in model.named_modules()]


def test_compile_does_not_mutate_the_users_model():
    torch.manual_seed(0)
    model = small_cnn().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    before = structure(model)
    fxcompress.compile(model, torch.randn(INPUT), standard_pruning(L1Norm(0.5)), frontend="fx")
    assert structure(model) == before
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert {k: id(p) for k, p in model.named_parameters()} == params
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any(hasattr(m, "weight_orig") for m in model.modules())


def test_compile_accepts_a_masked_model_after_fine_tuning(pair, helpers):
    masked = copy.deepcopy(pair[1])
    masked.train()
    x, y = batch()
    nn.functional.cross_entropy(masked(x), y).backward()
    shrunk = fxcompress.compile(masked, x, [Shrink()])
    helpers.outputs_agree(masked, shrunk, (x,))
