"""Shared test settings and helpers for the fxcompress test suite.

The machine running the tests is small and shared, so every test runs with at
most two intra-op threads and a fixed seed. The helpers compile one model twice
with the same pruner — once masked (no ``Shrink``), once shrunk — which is how
the suite checks the equivalence invariant on independent inputs.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

import fxcompress
from fxcompress.export import EXPORTER_VARIABLE
from fxcompress.passes import AnalyzeGroups, InsertMasks, PropagateChannels, standard_pruning

torch.set_num_threads(2)

#: ``to_onnx`` exports through ``torch.export`` by default, ~15x slower than the TorchScript exporter on a small
#: model: tests that export only on the way to something else use the TorchScript one (subprocesses included);
#: the files that test exporting itself (``EXPORT_TESTS``) run the default.
os.environ[EXPORTER_VARIABLE] = "torchscript"
EXPORT_TESTS = {"test_export.py", "test_matmul_nbits.py", "test_stepwise.py", "test_readme.py"}


@pytest.fixture(autouse=True)
def _default_exporter(request, monkeypatch) -> None:
    if Path(str(request.node.fspath)).name in EXPORT_TESTS:
        monkeypatch.delenv(EXPORTER_VARIABLE, raising=False)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    """Same random weights and inputs on every run, whatever order tests run in; and the thread count
    back as it was (the tools' ``main`` sets their own)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (``_seed`` restores the count): small LLM kernels and Hessians run
    steadier, and a parallel test gets the other core."""
    torch.set_num_threads(1)
    yield


def masked_pipeline(pruner) -> list:
    """The standard pipeline without ``Shrink``: the masked (simulated) model."""
    return [InsertMasks(pruner), AnalyzeGroups(), PropagateChannels()]


def compile_pair(model: nn.Module, inputs, pruner, verify: bool = True,
                 frontend: str = "auto") -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(masked, shrunk)`` compiled from the same model with the same pruner, warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = fxcompress.compile(model, inputs, masked_pipeline(pruner), verify=verify, frontend=frontend)
        shrunk = fxcompress.compile(model, inputs, standard_pruning(pruner), verify=verify, frontend=frontend)
    return masked.eval(), shrunk.eval()


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``max|a - b| / max|a|``: the error measure of the equivalence invariant."""
    assert reference.shape == other.shape, f"shape {tuple(other.shape)} != {tuple(reference.shape)}"
    scale = reference.abs().max().item() or 1.0
    return (reference - other).abs().max().item() / scale


@torch.no_grad()
def outputs_agree(a: nn.Module, b: nn.Module, inputs: Sequence[torch.Tensor], rtol: float = 1e-4) -> float:
    """Run both modules in eval mode on ``inputs``; return the relative error (asserting it is within ``rtol``)."""
    error = relative_error(a.eval()(*inputs), b.eval()(*inputs))
    assert error <= rtol, f"outputs differ by {error:.2e} relative to their scale"
    return error


def count_macs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> int:
    """Multiply-accumulates of one forward pass, counted by ``torch.utils.flop_counter``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(*inputs)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial affine parameters and running statistics.

    Default-initialised BatchNorm is the identity in eval mode, which would hide
    bugs in how biases and running means of removed channels are handled.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("weight", "bias", "running_mean"):
                tensor = getattr(module, name, None)
                if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and tensor is not None:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5 + (1.0 if name == "weight" else 0.0))
            running_var = getattr(module, "running_var", None)
            if isinstance(running_var, torch.Tensor):
                running_var.copy_(torch.rand(running_var.shape, generator=generator) + 0.5)
    return model


TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    """``tools/<name>.py`` imported as module ``name`` (once); tools import each other by name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        sys.path.insert(0, str(TOOLS))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path.remove(str(TOOLS))
    return sys.modules[name]


@pytest.fixture(scope="session")
def helpers() -> Callable:
    """The helpers above, for test modules (``helpers.compile_pair(...)``)."""
    import types

    return types.SimpleNamespace(
        masked_pipeline=masked_pipeline,
        compile_pair=compile_pair,
        relative_error=relative_error,
        outputs_agree=outputs_agree,
        count_macs=count_macs,
        count_params=count_params,
        randomize_norms=randomize_norms,
        load_tool=load_tool,
    )
