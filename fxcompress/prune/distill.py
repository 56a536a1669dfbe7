"""Layer-wise knowledge distillation from the original (teacher) graph to the compressed (student) graph.

Both graphs come from the same traced model, so their nodes share names.
Compression keeps the graph and changes channel counts, so intermediate
outputs are matched **by node name where the shapes agree** (a pruned layer's
output has fewer channels than the teacher's and is skipped); the final
output (logits) is always distilled with a temperature-softened KL term.

With ``model``, its example input ``x`` and ``data``, a list of ``(images,
labels)`` batches (here ``fc1`` is left unpruned, so its output can be matched):

>>> from fxcompress.passes import standard_pruning
>>> from fxcompress.prune import Evaluator, L1Norm
>>> teacher = fxcompress.trace(model, x)
>>> student = fxcompress.compile(model, x, standard_pruning(L1Norm(0.8, exclude=("fc1",))))
>>> kd = LayerwiseDistillation(teacher, student, task_loss=lambda out, b: F.cross_entropy(out, b[1]))
>>> kd.layers                       # matched intermediate nodes: same name, same shape
('fc1', 'relu_2')
>>> Evaluator(data, loss=kd, progress=False).train(student, epochs=3)   # optimizer steps taken
6
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from fxcompress import meta
from fxcompress.errors import ConfigError
from fxcompress.prune.evaluator import default_inputs

__all__ = ["LayerwiseDistillation", "tap", "matching_nodes"]


def tap(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A view of ``gm`` (sharing its modules and parameters) that returns ``(output, {name: value})``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    wanted = set(names)
    features = {n.name: env[n] for n in gm.graph.nodes if n.name in wanted}
    graph.output((output, features))
    return fx.GraphModule(gm, graph)


def _shape(node: fx.Node):
    tm = node.meta.get(meta.TENSOR_META)
    return tuple(tm.shape[1:]) if hasattr(tm, "shape") else None


def matching_nodes(teacher: fx.GraphModule, student: fx.GraphModule) -> tuple[str, ...]:
    """Names of ``call_module``/``call_function``/``call_method`` nodes with the same name and output shape in both."""
    mine = {n.name: _shape(n) for n in student.graph.nodes if n.op.startswith("call")}
    found = []
    for node in teacher.graph.nodes:
        shape = _shape(node)
        if node.op.startswith("call") and shape is not None and mine.get(node.name) == shape:
            found.append(node.name)
    return tuple(found)


@dataclasses.dataclass
class LayerwiseDistillation:
    """Loss ``task + alpha * T^2 * KL(teacher || student at temperature T) + beta * mean feature MSE``.

    Callable as ``loss(model, batch)`` so it plugs into
    :class:`~fxcompress.prune.evaluator.Evaluator` (``model`` must be
    ``student``). ``layers`` defaults to every node whose name and output
    shape match (see :func:`matching_nodes`), minus the graph's output.
    """

    teacher: fx.GraphModule
    student: fx.GraphModule
    task_loss: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    layers: tuple[str, ...] | None = None
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 4.0
    inputs: Callable[[Any], tuple] = default_inputs

    def __post_init__(self) -> None:
        output_names = {a.name for n in self.student.graph.nodes if n.op == "output" for a in n.all_input_nodes}
        matched = matching_nodes(self.teacher, self.student)
        if self.layers is None:
            self.layers = tuple(n for n in matched if n not in output_names)
        missing = sorted(set(self.layers) - set(matched))
        if missing:
            raise ConfigError(f"distillation layers {missing} do not exist with the same shape in teacher and student")
        self._teacher = tap(self.teacher, self.layers).eval()
        self._student = tap(self.student, self.layers)

    def __call__(self, model, batch) -> torch.Tensor:
        if model is not self.student:
            raise ConfigError("LayerwiseDistillation was built for another student module")
        x = self.inputs(batch)
        with torch.no_grad():
            t_out, t_feat = self._teacher(*x)
        self._student.train(model.training)
        s_out, s_feat = self._student(*x)
        loss = self.alpha * self.soft_logits(s_out, t_out)
        if self.layers and self.beta:
            loss = loss + self.beta * torch.stack([F.mse_loss(s_feat[n], t_feat[n]) for n in self.layers]).mean()
        if self.task_loss is not None:
            loss = loss + self.task_loss(s_out, batch)
        return loss

    def soft_logits(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                        reduction="batchmean") * t * t
