"""Names the ``>>>`` examples in fxcompress's docstrings use without defining them (doctests only).

It lives at the repository root, not in the package, so that the wheel does
not ship a module that imports pytest. Examples of ``fxcompress.auto`` need
optuna and those that build torchvision models need torchvision: without
them, those doctests are skipped, as the tests that need them are.

Every doctest gets fresh objects, built after ``torch.manual_seed(0)``, and runs
on one intra-op thread (the examples are tiny: on a busy machine one thread is
several times faster than two, and the printed numbers stay the same):

- ``torch``, ``nn``, ``F`` (``torch.nn.functional``), ``fxcompress`` and
  ``SmallCNN`` (:class:`fxcompress.examples.SmallCNN`);
- ``model``: a ``SmallCNN()`` with random weights, in eval mode; ``x``: one input for it, ``(1, 1, 28, 28)``;
- ``data``: two batches ``(images, labels)`` of 16 random images, labelled by ``model``'s predictions;
- ``evaluate(m)``: top-1 accuracy of ``m`` on ``data`` in percent, i.e. agreement with ``model`` (100.0 for it);
- ``evaluator``: an :class:`~fxcompress.prune.Evaluator` on ``data`` with cross-entropy,
  ``evaluate`` and no progress bars.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.examples import SmallCNN, accuracy
from fxcompress.prune import Evaluator
from fxcompress.report import SECTION_BUILDERS

collect_ignore_glob = [] if importlib.util.find_spec("optuna") else ["fxcompress/auto/*"]


@pytest.fixture(autouse=True)
def _doctest_objects(request: pytest.FixtureRequest) -> Iterator[None]:
    test = getattr(request.node, "dtest", None)
    if test is None:  # an ordinary test: tests/conftest.py sets those up
        yield
        return
    if any("torchvision" in example.source for example in test.examples):
        pytest.importorskip("torchvision")
    doctest_namespace = request.getfixturevalue("doctest_namespace")
    sections = dict(SECTION_BUILDERS)  # an example may register a report section
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():
        images = [torch.randn(16, 1, 28, 28) for _ in range(2)]
        data = [(batch, model(batch).argmax(1)) for batch in images]

    def evaluate(m: nn.Module) -> float:
        return accuracy(m, torch.cat(images), torch.cat([labels for _, labels in data]))

    doctest_namespace.update(
        torch=torch, nn=nn, F=F, fxcompress=fxcompress, SmallCNN=SmallCNN,
        model=model, x=torch.randn(1, 1, 28, 28), data=data, evaluate=evaluate,
        evaluator=Evaluator(data, loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), evaluate=evaluate, progress=False),
    )
    yield
    torch.set_num_threads(threads)
    SECTION_BUILDERS.clear()
    SECTION_BUILDERS.update(sections)
