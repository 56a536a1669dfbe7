"""Quantizer-by-quantizer agreement of an int8 graph with ONNX Runtime, free of error amplification.

PyTorch and ONNX Runtime compute each quantized tensor of a QDQ graph from
the same integers, but with their own float summation order and
requantization arithmetic, so a value within a rounding error of a grid
boundary lands one step apart now and then (about 1e-5 of the codes). In a
deep network such a flip changes the next layer's inputs and flips multiply
from layer to layer: a correct export of a four-layer random-weight encoder
ends several output steps apart, which an end-to-end comparison cannot tell
from a wrong kernel.

This check can. ONNX Runtime runs a copy of the graph that also returns every
activation quantizer's integer codes (extra graph outputs do not stop its
QDQ fusions: the int8 kernels that run are the ones the user's session runs).
PyTorch then runs the graph *teacher-forced*: each quantizer computes its
codes from ONNX Runtime's codes of the quantizers before it and passes ONNX
Runtime's codes on. Every quantizer is thus compared on identical integer
inputs, and the export is accepted when every code is within one step of
PyTorch's and at most :data:`FLIP_RATE` of a quantizer's codes differ at
all, and the outputs computed from ONNX Runtime's last codes match within
the caller's tolerance. A wrong scale, zero point or kernel (e.g. the int16
saturation of u8s8 dot products on x86 CPUs without VNNI) moves many codes or
moves them by more than a step, and fails here naming the quantizer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import onnx
import torch
from torch import fx

from fxcompress.quant.ops import QUANTIZE

__all__ = ["FLIP_RATE", "QuantizerAgreement", "StepwiseCheck", "stepwise_check", "cpu_has_vnni"]

#: The largest share of a quantizer's codes that may sit one step from PyTorch's on identical inputs.
FLIP_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class QuantizerAgreement:
    """How one activation quantizer's codes in ONNX Runtime compare with PyTorch's from the same inputs."""

    node: str
    max_steps: int
    flip_rate: float

    @property
    def agrees(self) -> bool:
        return self.max_steps <= 1 and self.flip_rate <= FLIP_RATE


@dataclasses.dataclass(frozen=True)
class StepwiseCheck:
    """Every quantizer's agreement (graph order) and the error of the outputs computed from ONNX Runtime's codes."""

    quantizers: tuple[QuantizerAgreement, ...]
    output_error: float
    tolerance: float

    @property
    def worst(self) -> QuantizerAgreement | None:
        return max(self.quantizers, key=lambda q: (q.max_steps, q.flip_rate), default=None)

    def failure(self) -> str | None:
        """What disagrees, in words, or None when the export computes what the graph does."""
        wrong = next((q for q in self.quantizers if not q.agrees), None)
        if wrong is not None:
            hint = "" if cpu_has_vnni() else (
                "; this CPU has no VNNI, where int8 kernels saturate u8 x s8 products in 16 bits: quantize "
                "weights to 7 bits (QConfig.int8(weight_bits=7)) so that they cannot")
            return (f"quantizer {wrong.node!r} differs from PyTorch's on the same integer inputs by up to "
                    f"{wrong.max_steps} step(s) on {wrong.flip_rate:.2%} of its codes (allowed: 1 step on "
                    f"{FLIP_RATE:.1%}){hint}")
        if not self.output_error <= self.tolerance:
            return (f"the outputs computed from ONNX Runtime's last quantized tensors differ by "
                    f"{self.output_error:.2e} of their scale (tolerance {self.tolerance:.0e})")
        return None


def _probe(module: fx.GraphModule) -> tuple[fx.GraphModule, list[fx.Node], int]:
    """A copy of ``module`` that also returns every activation quantizer's codes; those nodes; how many outputs
    ``module`` itself has."""
    probe = copy.copy(module)  # shares the tensors; the graph is its own
    probe.graph = copy.deepcopy(module.graph)
    quantizers = [n for n in probe.graph.nodes if n.op == "call_function" and n.target is QUANTIZE]
    output = probe.graph.output_node()
    outputs = list(output.args[0])
    output.args = (tuple(outputs + quantizers),)
    probe.recompile()
    return probe, quantizers, len(outputs)


class _TeacherForced(fx.Interpreter):
    """Runs the graph passing ONNX Runtime's codes on at every quantizer, and compares its own codes with them."""

    def __init__(self, module: fx.GraphModule, codes: dict[str, torch.Tensor]) -> None:
        super().__init__(module)
        self.codes = codes
        self.agreements: list[QuantizerAgreement] = []

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name not in self.codes:
            return value
        theirs = self.codes[n.name]
        steps = (value.to(torch.int32) - theirs.to(torch.int32)).abs()
        self.agreements.append(QuantizerAgreement(
            n.name, int(steps.max()) if steps.numel() else 0,
            float((steps > 0).float().mean()) if steps.numel() else 0.0))
        return theirs.to(value.dtype)


def stepwise_check(module: fx.GraphModule, tensors: Sequence[torch.Tensor], tolerance: float,
                   export: Callable[[fx.GraphModule, int], onnx.ModelProto], session_of, relative_error) -> StepwiseCheck:
    """Compare ``module`` quantizer by quantizer with ONNX Runtime on ``tensors`` (see the module docstring).

    ``export(probe, n_outputs)`` writes a module with ``n_outputs`` outputs to ONNX at ``tensors``' shapes,
    ``session_of(model)`` opens the session the user's export is checked with, and ``relative_error(expected,
    got)`` measures the outputs as the end-to-end check does."""
    probe, quantizers, n_outputs = _probe(module)
    session = session_of(export(probe, n_outputs + len(quantizers)))
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
    results = session.run(None, feeds)
    codes = {q.name: torch.from_numpy(r) for q, r in zip(quantizers, results[n_outputs:])}
    forced = _TeacherForced(probe, codes)
    with torch.no_grad():
        outputs = forced.run(*tensors)
    error = relative_error([o for o in outputs[:n_outputs]], results[:n_outputs])
    return StepwiseCheck(tuple(forced.agreements), error, tolerance)


@cache
def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (``avx512_vnni`` or ``avx_vnni``), read from Linux's ``/proc/cpuinfo``;
    True where that cannot be read, so that no advice is given on a guess."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags
