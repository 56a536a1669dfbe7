"""The zoo sweeps' per-model check (``tools/zoo.py``, ``tools/zoo_timm.py`` and their tests).

One compile through the standard pruning pipeline, stopped before ``Shrink``
to record the masked outputs, then finished: the shrunk model must reproduce
the masked one, and the MACs and parameters it saves are measured on the
user's untouched model and on the result. A driver of the compiler, so it
lives above it: nothing in the compiler imports this module.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from torch import nn

import fxcompress
from fxcompress.analysis import get_analysis
from fxcompress.passes import standard_pruning
from fxcompress.pipeline import run_pipeline
from fxcompress.report import count_macs, count_params, flat_outputs, frozen_summary, relative_error
from fxcompress.trace import normalize_example_inputs

__all__ = ["PruningCheck", "check_pruning"]


@dataclass
class PruningCheck:
    """One model through the standard pruning pipeline: time, equivalence and compression."""

    compile_s: float  #: wall-clock seconds of the whole ``compile`` (trace → shrink), verify=False
    compile_cpu_s: float  #: CPU seconds of the same (all threads): steadier than wall time on a busy machine
    error: float  #: masked vs shrunk output, relative to the masked output's max magnitude
    macs_dense: int
    macs_shrunk: int
    params_dense: int
    params_shrunk: int
    why: str  #: :func:`frozen_summary` of the masked model's analysis

    @property
    def macs_ratio(self) -> float:
        return self.macs_dense / max(self.macs_shrunk, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_dense / max(self.params_shrunk, 1)

    def passed(self, tolerance: float = 1e-4) -> bool:
        return self.error <= tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "macs_ratio": self.macs_ratio, "params_ratio": self.params_ratio}


def check_pruning(model: nn.Module, example_inputs, pruner, frontend: str = "auto") -> PruningCheck:
    """Compile ``model`` with ``standard_pruning(pruner)`` and compare the masked and the shrunk model.

    One compile serves both: the pipeline runs up to ``Shrink``, the masked
    outputs are recorded, then ``Shrink`` runs on the same module, exactly as
    inside ``compile``. ``compile_s`` is the time of both parts (trace →
    shrink, ``verify=False``), without the forward pass in between. Dense
    figures are measured on ``model`` itself, which is not modified.
    ``frontend`` is :func:`fxcompress.compile`'s.
    """
    inputs = normalize_example_inputs(example_inputs)
    *masking, shrink = standard_pruning(pruner)
    start, start_cpu = time.perf_counter(), time.process_time()
    gm = fxcompress.compile(model, inputs, masking, verify=False, frontend=frontend)
    compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    masked_out = flat_outputs(gm, inputs)
    why = frozen_summary(get_analysis(gm))
    start, start_cpu = time.perf_counter(), time.process_time()
    gm = run_pipeline(gm, [shrink])
    compile_s += time.perf_counter() - start
    compile_cpu_s += time.process_time() - start_cpu
    return PruningCheck(
        compile_s=compile_s,
        compile_cpu_s=compile_cpu_s,
        error=relative_error(masked_out, flat_outputs(gm, inputs)),
        macs_dense=count_macs(model, inputs),
        macs_shrunk=count_macs(gm, inputs),
        params_dense=count_params(model),
        params_shrunk=count_params(gm),
        why=why,
    )
