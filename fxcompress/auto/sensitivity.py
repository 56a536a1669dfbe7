"""Sensitivity analysis: prune each group alone at a ladder of sparsities and measure the metric.

Which layers tolerate pruning is the first question before choosing
per-layer sparsities by hand or bounding a search. Each cell of the table is
one model compiled from the shared :class:`~fxcompress.auto.workspace.Workspace`
(no retracing) and scored by the user's ``evaluate(model) -> float`` (higher
is better). Results are cached in a JSON file under a fingerprint of the
model's graph, weights and criterion, so an interrupted run resumes where it
stopped and a rerun with a longer ladder only evaluates the new cells.

With ``model``, its example input ``x`` and ``evaluate`` (here the agreement,
in percent, with the dense model's predictions; add ``cache="sens.json"`` to
keep and resume the results):

>>> result = sensitivity(model, x, evaluate, sparsities=(0.25, 0.5, 0.75), progress=False)
>>> print(result.table())
group              channels    dense    25%    50%    75%
---------------  ----------  -------  -----  -----  -----
conv1.weight[0]          32      100  ...
conv2.weight[0]          64      100  ...
fc1.weight[0]           128      100  ...
>>> result.plot("sensitivity.png")  # doctest: +SKIP
PosixPath('sensitivity.png')
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tabulate import tabulate
from torch import nn

from fxcompress.auto.workspace import Workspace
from fxcompress.errors import ConfigError
from fxcompress.prune.base import ChannelPruner

__all__ = ["SensitivityResult", "SensitivityCache", "sensitivity"]

Evaluate = Callable[[nn.Module], float]


@dataclasses.dataclass
class SensitivityCache:
    """``{fingerprint: {"dense": value, "cells": {"group|sparsity": value}}}`` in one JSON file.

    Written after every cell (to a temporary file, then renamed), so a killed
    run loses at most the cell in progress.
    """

    path: Path | None
    fingerprint: str
    data: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, path: str | os.PathLike | None, fingerprint: str) -> SensitivityCache:
        if path is None or not Path(path).exists():
            return cls(None if path is None else Path(path), fingerprint)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"sensitivity cache {path} is not valid JSON ({exc}); delete it to start over") from exc
        return cls(Path(path), fingerprint, data)

    @property
    def _entry(self) -> dict:
        return self.data.setdefault(self.fingerprint, {"dense": None, "cells": {}})

    @staticmethod
    def cell(key: str, sparsity: float) -> str:
        return f"{key}|{sparsity:.6g}"

    def get(self, key: str | None, sparsity: float = 0.0) -> float | None:
        return self._entry["dense"] if key is None else self._entry["cells"].get(self.cell(key, sparsity))

    def put(self, key: str | None, sparsity: float, value: float) -> None:
        if key is None:
            self._entry["dense"] = value
        else:
            self._entry["cells"][self.cell(key, sparsity)] = value
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(self.path.suffix + ".tmp")
        scratch.write_text(json.dumps(self.data, indent=1) + "\n", encoding="utf-8")
        os.replace(scratch, self.path)


@dataclasses.dataclass
class SensitivityResult:
    """Metric of the dense model and of each group pruned alone at each sparsity."""

    dense: float
    sparsities: tuple[float, ...]
    sizes: dict[str, int]  #: channels per group
    values: dict[str, tuple[float, ...]]  #: per group, the metric at each of ``sparsities``
    evaluated: int = 0  #: cells evaluated in this run (the others came from the cache)

    def table(self) -> str:
        headers = ["group", "channels", "dense", *(f"{s:.0%}" for s in self.sparsities)]
        rows = [[k, self.sizes[k], self.dense, *v] for k, v in self.values.items()]
        return tabulate(rows, headers=headers, floatfmt=".4g")

    def drop_at(self, sparsity: float) -> dict[str, float]:
        """Per group, how much the metric falls when it alone is pruned at ``sparsity`` (a ladder rung)."""
        if sparsity not in self.sparsities:
            raise ConfigError(f"sparsity {sparsity} is not on the ladder {self.sparsities}")
        i = self.sparsities.index(sparsity)
        return {k: self.dense - v[i] for k, v in self.values.items()}

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG of metric against sparsity, one line per group, the dense metric dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, values in self.values.items():
            ax.plot([0.0, *self.sparsities], [self.dense, *values], marker="o", label=f"{key} ({self.sizes[key]})")
        ax.axhline(self.dense, color="grey", linestyle="--", linewidth=1, label="dense")
        ax.set(xlabel="sparsity of the group alone", ylabel="metric", title="Sensitivity per group")
        ax.legend(fontsize="small", loc="best")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_ladder(sparsities: Sequence[float]) -> tuple[float, ...]:
    ladder = tuple(float(s) for s in sparsities)
    if not ladder:
        raise ConfigError("sensitivity needs at least one sparsity, e.g. (0.25, 0.5, 0.75)")
    bad = [s for s in ladder if not 0 < s < 1]
    if bad:
        raise ConfigError(f"sensitivity: sparsities must lie in (0, 1), got {bad}")
    return tuple(sorted(set(ladder)))


def sensitivity(
    model: nn.Module,
    example_inputs,
    evaluate: Evaluate,
    sparsities: Sequence[float] = (0.25, 0.5, 0.75),
    *,
    criterion: ChannelPruner | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    workspace: Workspace | None = None,
) -> SensitivityResult:
    """Evaluate every searchable group pruned alone at each of ``sparsities`` (see the module docstring)."""
    from tqdm.auto import tqdm

    ladder = _check_ladder(sparsities)
    ws = workspace or Workspace.trace(model, example_inputs, criterion)
    store = SensitivityCache.open(cache, ws.fingerprint())
    todo = [(k, s) for k in ws.keys for s in ladder if store.get(k, s) is None]
    if store.get(None) is None:
        store.put(None, 0.0, float(evaluate(ws.compile({}))))
    for key, s in tqdm(todo, desc="sensitivity", disable=not progress):
        store.put(key, s, float(evaluate(ws.compile({key: s}))))
    values = {k: tuple(store.get(k, s) for s in ladder) for k in ws.keys}
    return SensitivityResult(store.get(None), ladder, ws.sizes, values, evaluated=len(todo))
