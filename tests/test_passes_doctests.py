"""The ``>>>`` examples in the passes' docstrings (``passes/`` is installed as ``fxcompress.passes``, outside
the ``fxcompress/`` folder whose doctests pytest collects itself)."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import torch

import fxcompress.passes

MODULES = sorted(m.name for m in pkgutil.iter_modules(fxcompress.passes.__path__)
                 if ">>>" in importlib.util.find_spec(f"fxcompress.passes.{m.name}").loader.get_source(
                     f"fxcompress.passes.{m.name}"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"fxcompress.passes.{name}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples are tiny: one thread is faster on a busy machine
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=False)
    finally:
        torch.set_num_threads(threads)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in fxcompress.passes.{name} failed"
