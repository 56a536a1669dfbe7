"""Budgeted search for per-group sparsities with Optuna, in one process or many sharing a study.

A trial asks the sampler for one *preference* in ``[0, 1]`` per group, scales
the preferences until the predicted cost meets the budget exactly
(:func:`~fxcompress.auto.cost.fit_to_budget`), gives back single channels
while the budget still affords them (whole channels leave some of it
unspent, :func:`~fxcompress.auto.cost.spend_leftover`), compiles those sparsities from
the shared, once-traced workspace and scores the result with the user's
``evaluate(model) -> float`` (higher is better). The first trial of a fresh
study is uniform sparsity at the same budget, so the search starts from the
baseline it has to beat and reports it.

Scaling out: every worker is a process that loads the study by name from one
Optuna storage and runs trials until the study holds ``n_trials`` finished
ones. ``search(..., n_workers=4)`` starts the workers on this machine (a
journal file in ``output_dir`` unless ``storage`` is given, kept so that a
rerun resumes). A worker that dies loses only its running trial: its
heartbeat stops, the trial is failed and queued again (:class:`Heartbeat`). To use more
machines, give every machine the same storage: a journal file on a shared
file system (``storage="/nfs/study.log"``) or a database URL Optuna accepts
(``storage="postgresql://user@host/db"``); start the search on one machine
and :func:`run_worker` (or ``python -m fxcompress auto MODEL --join``) on the
others with the same ``study_name``. Workers read the budget, criterion and
latency table from the study itself, so all of them search the same problem.

With ``model``, its example input ``x`` and ``evaluate`` (a real search runs
tens of trials):

>>> result = search(model, x, evaluate, budget=Budget("macs", 3), n_trials=4, progress=False)
>>> print(result.table())
group              channels    kept  sparsity    uniform sparsity
---------------  ----------  ------  ----------  ------------------
conv1.weight[0]          32  ...
macs (dense)                        4.241e+06
macs budget (1/3)                   1.414e+06
...
>>> small = result.model       # the compressed GraphModule, verified against its masked form
>>> result.pruner              # the sparsities found, for this model's groups
PerGroupSparsity(criterion=L1Norm(...), sparsities={'conv1.weight[0]': ..., 'fc1.weight[0]': ...})

Per-layer allocation of an LLM's structured pruning (heads as whole GQA
groups, FFN channels, the hidden size; one group each per decoder layer, the
hidden size once), under a parameter budget, three ways:

- *uniform*: ``standard_pruning(ActivationNorm(...), target="params=1.33")``,
  every group at one sparsity (the target's fit leaves groups within one
  channel step of it);
- *global*: the same with ``ActivationNorm(..., allocation="global")``, one
  ranking across all groups, so widths differ per layer;
- *searched*: ``search(model, x, evaluate, "params=1.33", criterion=ActivationNorm(...),
  tie=...)`` with ``evaluate`` returning, say, minus the perplexity on
  calibration sequences (never the test split).

Per-layer widths are written back by ``output="module"`` (or
``fxcompress.writeback.write_back``) into ``config.fxcompress_layer_widths``,
and a saved model loads with ``fxcompress.writeback.from_pretrained``. A
search's ``result.pruner`` names groups by stable keys, so it applies to a
fresh trace of the same model: ``fxcompress.compile(model, x,
standard_pruning(result.pruner), output="module")`` returns the user's class
(or ``write_back(model, result.model)``, without scoring again).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import multiprocessing
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import optuna
from tabulate import tabulate
from torch import fx, nn

from fxcompress.auto.cost import (
    Budget, BudgetMetric, CostModel, LatencyTable, cost_model, fit_to_budget, measure_cost, spend_leftover,
)
from fxcompress.auto.pergroup import PerGroupSparsity
from fxcompress.auto.workspace import Workspace
from fxcompress.errors import ConfigError, coerce_enum
from fxcompress.prune.base import ChannelPruner
from fxcompress.prune.magnitude import L1Norm

__all__ = [
    "SamplerKind",
    "SearchConfig",
    "SearchResult",
    "ModelSource",
    "InlineSource",
    "open_storage",
    "default_storage",
    "Heartbeat",
    "searched_parameters",
    "search",
    "run_worker",
    "iterative_search",
    "IterativeResult",
]

Evaluate = Callable[[nn.Module], float]

#: Study user attributes written by the coordinator and read by every worker.
CONFIG_ATTR = "fxcompress.config"
LATENCY_ATTR = "fxcompress.latency_table"
GROUPS_ATTR = "fxcompress.groups"
#: Trial user attributes.
SPARSITIES_ATTR, COST_ATTR, PID_ATTR, BASELINE_ATTR = "sparsities", "predicted_cost", "worker_pid", "baseline"
#: Trial user attribute: when the worker running it last said it is alive (seconds since the epoch).
HEARTBEAT_ATTR = "heartbeat"


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """How a running trial proves its worker alive, on every storage (journal files have no heartbeat of
    their own): every ``interval`` seconds it stamps ``HEARTBEAT_ATTR``; a RUNNING trial silent for
    ``grace_period`` seconds belongs to a dead worker and is failed, and retried once (Optuna's
    ``RetryFailedTrialCallback``)."""

    interval: float = 10.0
    grace_period: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.interval < self.grace_period:
            raise ConfigError(f"heartbeat interval must be positive and below the grace period, got "
                              f"{self.interval!r} and {self.grace_period!r}")

    @contextlib.contextmanager
    def beating(self, trial: optuna.Trial) -> Iterator[None]:
        """Stamp the trial now and every ``interval`` seconds until the block ends."""
        stop = threading.Event()

        def beat() -> None:
            while True:
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
                if stop.wait(self.interval):
                    return

        thread = threading.Thread(target=beat, daemon=True)
        trial.set_user_attr(HEARTBEAT_ATTR, time.time())  # a retried trial carries its dead run's stamp
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale(self, study: optuna.Study) -> list[int]:
        """Fail and re-enqueue RUNNING trials whose worker stopped beating; return their numbers."""
        now, failed = time.time(), []
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            last = trial.user_attrs.get(HEARTBEAT_ATTR, trial.datetime_start.timestamp())
            if now - last <= self.grace_period:
                continue
            try:
                if not study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
                    continue
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker failed (or the worker finished) it first
            failed.append(trial.number)
            optuna.storages.RetryFailedTrialCallback(max_retry=1)(study, study._storage.get_trial(trial._trial_id))
        return failed


class SamplerKind(enum.Enum):
    """Optuna samplers the search can use."""

    TPE = "tpe"  #: tree-structured Parzen estimator (multivariate), Optuna's default
    CMAES = "cmaes"  #: CMA-ES (needs the ``cmaes`` package)
    RANDOM = "random"  #: random search: the baseline a sampler must beat


def make_sampler(kind: SamplerKind, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    startup = max(3, min(10, n_trials // 4))
    if kind is SamplerKind.TPE:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if kind is SamplerKind.RANDOM:
        return optuna.samplers.RandomSampler(seed=seed)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise ConfigError("sampler 'cmaes' needs the cmaes package: pip install cmaes") from None
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """What a search optimises: the same for every worker, stored in the study."""

    budget: Budget = dataclasses.field(default_factory=lambda: Budget(BudgetMetric.MACS, 2.0))
    criterion: ChannelPruner = dataclasses.field(default_factory=L1Norm)
    max_sparsity: float = 0.9  #: no group loses more than this fraction of its channels
    sampler: SamplerKind = SamplerKind.TPE
    seed: int = 0
    #: check each trial's shrunk model against its masked one (the final model is always checked)
    verify: bool = False
    #: a regular expression: groups whose keys hold the same match share one searched value (:func:`searched_parameters`)
    tie: str | None = None

    def __post_init__(self) -> None:
        coerce_enum(self, "sampler", SamplerKind)
        if self.tie is not None:
            _tie_pattern(self.tie)
        if not 0 < self.max_sparsity < 1:
            raise ConfigError(f"max_sparsity must be in (0, 1), got {self.max_sparsity!r}")
        if not isinstance(self.criterion, ChannelPruner):
            raise ConfigError(f"criterion must be a ChannelPruner such as L1Norm(), got {self.criterion!r}")

    def to_dict(self) -> dict:
        return {"budget": self.budget.to_dict(), "max_sparsity": self.max_sparsity, "sampler": self.sampler.value,
                "seed": self.seed, "verify": self.verify, "tie": self.tie, **PerGroupSparsity(self.criterion).to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchConfig:
        criterion = PerGroupSparsity.from_dict(data).criterion
        return cls(Budget.from_dict(data["budget"]), criterion, float(data["max_sparsity"]), data["sampler"],
                   int(data["seed"]), bool(data["verify"]), data.get("tie"))


def _tie_pattern(tie: str) -> re.Pattern:
    """``tie`` compiled, or a ConfigError saying why it is not a pattern (checked when the config is made, so a
    bad pattern fails before any tracing)."""
    if not isinstance(tie, str) or not tie:
        raise ConfigError(f"tie must be a regular expression such as r'layers\\.\\d+\\.', got {tie!r}")
    try:
        return re.compile(tie)
    except re.error as error:
        raise ConfigError(f"tie {tie!r} is not a regular expression: {error}") from None


def searched_parameters(keys: list[str], tie: str | None) -> dict[str, str]:
    """Per group key, the name of the searched value it reads: groups tied by ``tie`` share one.

    Without ``tie`` every group is searched on its own. With it, groups whose
    keys hold the same first match of the regular expression share one value,
    so a model with many groups fits in few trials; a key with no match keeps
    its own. For a Hugging Face decoder, ``r"layers\\.\\d+\\."`` searches one
    sparsity per decoder layer (its heads and FFN together) and
    ``r"layers\\.\\d+\\.mlp|self_attn"`` one per layer's FFN and one for every
    layer's heads. A pattern that matches no key is an error.

    >>> keys = ["model.embed_tokens.weight[1]", "model.layers.0.self_attn.q_proj.weight[0]",
    ...         "model.layers.0.mlp.gate_proj.weight[0]", "model.layers.1.mlp.gate_proj.weight[0]"]
    >>> list(searched_parameters(keys, r"layers\\.\\d+\\.").values())
    ['model.embed_tokens.weight[1]', 'tie:layers.0.', 'tie:layers.0.', 'tie:layers.1.']
    """
    if tie is None:
        return {k: k for k in keys}
    pattern = _tie_pattern(tie)
    matches = {k: pattern.search(k) for k in keys}
    if not any(matches.values()):
        raise ConfigError(f"tie {tie!r} matches none of this model's groups ({', '.join(keys[:3])}"
                          f"{', ...' if len(keys) > 3 else ''}); write a pattern that matches the part keys share")
    return {k: f"tie:{m.group(0)}" if m else k for k, m in matches.items()}


# ---------------------------------------------------------------------------- where the model comes from


class ModelSource(Protocol):
    """What a worker process needs, picklable: ``load() -> (model, example_inputs, evaluate)``."""

    def load(self) -> tuple[nn.Module, tuple, Evaluate]: ...


@dataclasses.dataclass(frozen=True)
class InlineSource:
    """The objects themselves (pickled to spawned workers: ``evaluate`` must be a module-level function,
    a ``functools.partial`` of one, or an instance of a module-level class)."""

    model: nn.Module
    example_inputs: tuple
    evaluate: Evaluate

    def load(self) -> tuple[nn.Module, tuple, Evaluate]:
        return self.model, self.example_inputs, self.evaluate


def open_storage(spec: str | os.PathLike | None):
    """``None``: in memory; a URL with ``://``: an Optuna RDB storage; anything else: a journal file path."""
    if spec is None:
        return None
    text = os.fspath(spec)
    if "://" in text:
        return text
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(text).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(text))


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every trial at INFO; the search shows a progress bar and a summary instead."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


# ---------------------------------------------------------------------------- one trial


@dataclasses.dataclass
class Objective:
    """One trial: preferences -> sparsities on budget -> compiled candidate -> ``evaluate``."""

    ws: Workspace
    evaluate: Evaluate
    config: SearchConfig
    cost: CostModel
    heartbeat: Heartbeat = dataclasses.field(default_factory=Heartbeat)

    @property
    def target(self) -> float:
        return self.cost.dense / self.config.budget.ratio

    def predict(self, sparsities: Mapping[str, float]) -> float:
        return self.cost.predict(self.ws.kept_fractions(sparsities))

    def fit(self, preferences: Mapping[str, float]) -> dict[str, float] | None:
        return fit_to_budget(preferences, self.predict, self.target, self.config.max_sparsity)

    @property
    def parameters(self) -> dict[str, str]:
        """Per group key, the searched value it reads (tied groups share one)."""
        return searched_parameters(self.ws.keys, self.config.tie)

    def __call__(self, trial: optuna.Trial) -> float:
        with self.heartbeat.beating(trial):
            return self.run(trial)

    def run(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(PID_ATTR, os.getpid())
        names = self.parameters
        values = {name: trial.suggest_float(name, 0.0, 1.0) for name in dict.fromkeys(names.values())}
        preferences = {k: values[name] for k, name in names.items()}
        sparsities = self.fit(preferences)
        if sparsities is None:
            raise optuna.TrialPruned(f"budget unreachable with max_sparsity={self.config.max_sparsity}")
        if trial.user_attrs.get(BASELINE_ATTR) != "uniform":  # the baseline stays uniform
            sparsities = spend_leftover(self.ws, sparsities, self.predict, self.target)
        trial.set_user_attr(SPARSITIES_ATTR, sparsities)
        trial.set_user_attr(COST_ATTR, self.predict(sparsities))
        return float(self.evaluate(self.ws.compile(sparsities, verify=self.config.verify)))


def _finished(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _study_config(study: optuna.Study) -> tuple[SearchConfig, LatencyTable | None, list[str]]:
    attrs = study.user_attrs
    if CONFIG_ATTR not in attrs:
        raise ConfigError(f"study {study.study_name!r} was not created by fxcompress.auto.search: nothing to join")
    table = attrs.get(LATENCY_ATTR)
    return SearchConfig.from_dict(attrs[CONFIG_ATTR]), LatencyTable.from_dict(table) if table else None, attrs[
        GROUPS_ATTR]


def run_worker(
    source: ModelSource,
    study_name: str,
    storage: str | os.PathLike,
    n_trials: int,
    index: int = 0,
    config: SearchConfig | None = None,
    progress: bool = False,
    barrier=None,
    heartbeat: Heartbeat | None = None,
) -> int:
    """Join study ``study_name`` and run trials until it holds ``n_trials`` finished ones; return how many ran here.

    ``config`` is read from the study when not given (a worker on another
    machine needs only the model, the evaluate function and the storage).
    Worker ``index`` seeds its sampler with ``seed + index`` so that workers
    do not propose the same points. As every worker checks the count before
    starting a trial, a study may end with up to ``workers - 1`` extra trials.
    ``barrier`` (a ``multiprocessing.Barrier``) makes workers started together
    wait until all are ready, so a slow start does not leave one idle.
    Before each trial the worker fails (and re-enqueues) trials of dead
    workers (see :class:`Heartbeat`).
    """
    heartbeat = heartbeat or Heartbeat()
    with _quiet_optuna():
        study = _load_study(study_name, storage)
        stored, table, keys = _study_config(study)
        config = config or stored
        model, example_inputs, evaluate = source.load()
        ws = Workspace.trace(model, example_inputs, config.criterion)
        if ws.keys != keys:
            raise ConfigError(f"worker {index}: this model's groups {ws.keys} differ from the study's {keys}: "
                              "every worker must load the same model")
        study.sampler = make_sampler(config.sampler, config.seed + index, n_trials)
        objective = Objective(ws, evaluate, config, cost_model(ws, config.budget.metric, table), heartbeat)
        if barrier is not None:
            barrier.wait()
        ran = 0
        while _finished(study) < n_trials:
            heartbeat.fail_stale(study)
            study.optimize(objective, n_trials=1, show_progress_bar=progress)
            ran += 1
    return ran


def _load_study(study_name: str, storage: str | os.PathLike) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise ConfigError(f"no study {study_name!r} in storage {os.fspath(storage)!r}: start the search there "
                          "first (without --join / --resume), or check the name") from None


def _worker_entry(source: ModelSource, study_name: str, storage: str, n_trials: int, index: int,
                  config: SearchConfig, barrier, heartbeat: Heartbeat) -> None:
    import torch

    torch.set_num_threads(1)  # several workers share the machine's cores
    run_worker(source, study_name, storage, n_trials, index, config, barrier=barrier, heartbeat=heartbeat)


# ---------------------------------------------------------------------------- the result


@dataclasses.dataclass
class SearchResult:
    """The best per-group sparsities found, the model they give, and how they compare with uniform."""

    pruner: PerGroupSparsity
    model: fx.GraphModule
    value: float  #: ``evaluate`` of the best trial
    budget: Budget
    sizes: dict[str, int]
    dense_cost: float
    predicted_cost: float
    measured_cost: float  #: of ``model``, measured (MACs and params exactly; latency timed)
    uniform_sparsity: float | None
    uniform_value: float | None
    trials_by_worker: dict[int, int]
    study: optuna.Study = dataclasses.field(repr=False)

    @property
    def sparsities(self) -> dict[str, float]:
        return dict(self.pruner.sparsities)

    def group_table(self) -> str:
        rows = []
        for key, n in self.sizes.items():
            s = self.sparsities.get(key, 0.0)
            uniform = "-" if self.uniform_sparsity is None else f"{self.uniform_sparsity:.1%}"
            rows.append([key, n, self.pruner.kept(n, s), f"{s:.1%}", uniform])
        return tabulate(rows, headers=["group", "channels", "kept", "sparsity", "uniform sparsity"])

    def table(self) -> str:
        """The final summary: per-group choices, then cost and metric against uniform sparsity."""
        metric = self.budget.metric.value
        rows = [
            [f"{metric} (dense)", f"{self.dense_cost:,.4g}"],
            [f"{metric} budget (1/{self.budget.ratio:g})", f"{self.dense_cost / self.budget.ratio:,.4g}"],
            [f"{metric} predicted / measured", f"{self.predicted_cost:,.4g} / {self.measured_cost:,.4g}"],
            ["metric, searched", f"{self.value:.4g}"],
            ["metric, uniform at the same budget", "-" if self.uniform_value is None else f"{self.uniform_value:.4g}"],
            ["trials per worker (pid: count)", ", ".join(f"{p}: {c}" for p, c in self.trials_by_worker.items())],
        ]
        return self.group_table() + "\n\n" + tabulate(rows, headers=["search", ""], disable_numparse=True)

    def to_dict(self) -> dict:
        return {"pruner": self.pruner.to_dict(), "value": self.value, "budget": self.budget.to_dict(),
                "sizes": self.sizes, "dense_cost": self.dense_cost, "predicted_cost": self.predicted_cost,
                "measured_cost": self.measured_cost, "uniform_sparsity": self.uniform_sparsity,
                "uniform_value": self.uniform_value, "trials_by_worker": self.trials_by_worker}


def _trials_by_worker(study: optuna.Study) -> dict[int, int]:
    counts: dict[int, int] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        pid = trial.user_attrs.get(PID_ATTR, -1)
        counts[pid] = counts.get(pid, 0) + 1
    return counts


def _uniform(study: optuna.Study) -> tuple[float | None, float | None]:
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if trial.user_attrs.get(BASELINE_ATTR) == "uniform":
            return next(iter(trial.user_attrs[SPARSITIES_ATTR].values())), trial.value
    return None, None


def _result(study: optuna.Study, objective: Objective) -> SearchResult:
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise ConfigError("no trial completed: the budget may be unreachable (raise max_sparsity or lower the ratio)")
    best = study.best_trial
    ws, config = objective.ws, objective.config
    sparsities = best.user_attrs[SPARSITIES_ATTR]
    model = ws.compile(sparsities, verify=True)
    uniform_sparsity, uniform_value = _uniform(study)
    return SearchResult(
        pruner=ws.pruner(sparsities), model=model, value=best.value, budget=config.budget, sizes=ws.sizes,
        dense_cost=objective.cost.dense, predicted_cost=objective.predict(sparsities),
        measured_cost=measure_cost(model, ws.example_inputs, config.budget.metric),
        uniform_sparsity=uniform_sparsity, uniform_value=uniform_value,
        trials_by_worker=_trials_by_worker(study), study=study,
    )


# ---------------------------------------------------------------------------- the drivers


def default_storage(output_dir: str | os.PathLike, study_name: str) -> str:
    """The journal file a study lives in when no storage is given: in the output directory, never deleted."""
    return os.path.join(os.fspath(output_dir), f"{study_name}.journal")


def _create_study(storage, study_name: str, objective: Objective, table: LatencyTable | None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize", load_if_exists=True)
    if CONFIG_ATTR in study.user_attrs:
        stored, _, keys = _study_config(study)
        if stored.to_dict() != objective.config.to_dict() or keys != objective.ws.keys:
            raise ConfigError(f"study {study_name!r} already exists with another configuration or model; "
                              "give a new study_name or the same settings")
        return study
    study.set_user_attr(CONFIG_ATTR, objective.config.to_dict())
    study.set_user_attr(GROUPS_ATTR, objective.ws.keys)
    if table is not None:
        study.set_user_attr(LATENCY_ATTR, table.to_dict())
    uniform = objective.fit({k: 1.0 for k in objective.ws.keys})
    if uniform is not None:
        study.enqueue_trial(dict.fromkeys(objective.parameters.values(), 1.0), user_attrs={BASELINE_ATTR: "uniform"})
    return study


def _run_parallel(source: ModelSource, study: optuna.Study, storage_spec: str, n_trials: int, n_workers: int,
                  config: SearchConfig, progress: bool, heartbeat: Heartbeat) -> None:
    """Spawn ``n_workers`` processes on the shared storage and show their joint progress.

    A worker that dies costs only its running trial: the others go on, and its
    trial is failed once its heartbeat is stale. The search fails only when no
    worker finished its share.
    """
    from tqdm.auto import tqdm

    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(n_workers, timeout=600)
    workers = [context.Process(target=_worker_entry, args=(source, study.study_name, storage_spec, n_trials, i,
                                                           config, barrier, heartbeat), daemon=True)
               for i in range(n_workers)]
    for w in workers:
        w.start()
    with tqdm(total=n_trials, desc=f"search ({n_workers} workers)", disable=not progress) as bar:
        while any(w.is_alive() for w in workers):
            time.sleep(0.5)
            bar.n = min(n_trials, _finished(study))
            bar.refresh()
    failed = [i for i, w in enumerate(workers) if w.exitcode != 0]
    if len(failed) == n_workers:
        raise ConfigError(f"every search worker failed (exit codes {[w.exitcode for w in workers]}); "
                          "their traceback is above")
    if failed:
        warnings.warn(f"search workers {failed} died (exit codes {[workers[i].exitcode for i in failed]}); "
                      "the others finished the study", stacklevel=2)
        _fail_orphans(study, heartbeat)


def _fail_orphans(study: optuna.Study, heartbeat: Heartbeat) -> None:
    """Wait out the grace period of trials left RUNNING by dead workers, then fail them (no worker is left)."""
    deadline = time.time() + heartbeat.grace_period + heartbeat.interval
    while study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) and time.time() < deadline:
        heartbeat.fail_stale(study)
        time.sleep(min(0.5, heartbeat.interval))
    heartbeat.fail_stale(study)


def search(
    model: nn.Module,
    example_inputs,
    evaluate: Evaluate,
    budget: Budget | str | float = 2.0,
    n_trials: int = 30,
    *,
    criterion: ChannelPruner | None = None,
    max_sparsity: float = 0.9,
    tie: str | None = None,
    sampler: SamplerKind | str = SamplerKind.TPE,
    seed: int = 0,
    storage: str | os.PathLike | None = None,
    study_name: str | None = None,
    n_workers: int = 1,
    latency_table: LatencyTable | None = None,
    verify: bool = False,
    progress: bool = True,
    source: ModelSource | None = None,
    heartbeat: Heartbeat | None = None,
    output_dir: str | os.PathLike = "fxcompress-auto",
) -> SearchResult:
    """Find per-group sparsities that maximise ``evaluate`` under ``budget`` (see the module docstring).

    ``budget`` is a :class:`Budget`, text such as ``"params=2"``, or a number
    (that many times fewer MACs). ``evaluate(model)`` gets each candidate,
    already shrunk and in eval mode, and may modify it (re-estimate batch-norm
    statistics, fine-tune briefly). ``n_workers > 1`` runs trials in spawned
    processes sharing ``storage`` (by default the journal file
    ``output_dir/<study_name>.journal``, kept after the run so that completed
    trials survive any failure and a rerun with the same ``study_name`` resumes);
    they get ``source`` (default: the objects themselves, pickled), which the
    command line uses to make each worker import the model file itself.
    ``tie`` (a regular expression over group keys) makes groups share one
    searched value, e.g. ``r"layers\\.\\d+\\."`` one per decoder layer of an LLM,
    whose many groups would otherwise need many trials (see
    :func:`searched_parameters`); the uniform baseline is the same either way.
    """
    budget = budget if isinstance(budget, Budget) else (
        Budget.parse(budget) if isinstance(budget, str) else Budget(BudgetMetric.MACS, budget))
    if not isinstance(n_trials, int) or n_trials < 1 or not isinstance(n_workers, int) or n_workers < 1:
        raise ConfigError(f"n_trials and n_workers must be positive integers, got {n_trials!r} and {n_workers!r}")
    config = SearchConfig(budget, criterion or L1Norm(), max_sparsity, sampler, seed, verify, tie)
    ws = Workspace.trace(model, example_inputs, config.criterion)
    if budget.metric is BudgetMetric.LATENCY and latency_table is None:
        latency_table = LatencyTable.measure(ws, progress=progress)
    objective = Objective(ws, evaluate, config, cost_model(ws, budget.metric, latency_table))
    study_name = study_name or f"fxcompress-{uuid.uuid4().hex[:8]}"
    heartbeat = heartbeat or Heartbeat()
    objective.heartbeat = heartbeat
    if n_workers > 1 and storage is None:
        storage = default_storage(output_dir, study_name)
    with _quiet_optuna():
        study = _create_study(open_storage(storage), study_name, objective, latency_table)
        if n_workers > 1:
            _run_parallel(source or InlineSource(model, ws.example_inputs, evaluate), study, os.fspath(storage),
                          n_trials, n_workers, config, progress, heartbeat)
        else:
            heartbeat.fail_stale(study)  # a resumed study may hold trials of a run that died
            study.sampler = make_sampler(config.sampler, seed, n_trials)
            remaining = max(0, n_trials - _finished(study))
            study.optimize(objective, n_trials=remaining, show_progress_bar=progress and remaining > 0)
        return _result(study, objective)


# ---------------------------------------------------------------------------- schedule-aware: AutoCompress-style


@dataclasses.dataclass
class IterativeResult:
    """The rounds of :func:`iterative_search` and the final (fine-tuned) model."""

    rounds: list[SearchResult]
    model: fx.GraphModule
    dense_cost: float
    final_cost: float

    def table(self) -> str:
        rows = [[i + 1, f"{r.budget.ratio:.3g}", f"{r.measured_cost:,.4g}", f"{r.value:.4g}",
                 "-" if r.uniform_value is None else f"{r.uniform_value:.4g}"] for i, r in enumerate(self.rounds)]
        rows.append(["total", f"{self.dense_cost / self.final_cost:.3g}", f"{self.final_cost:,.4g}", "", ""])
        return tabulate(rows, headers=["round", "ratio", "cost after", "metric (searched)", "metric (uniform)"],
                        disable_numparse=True)


def iterative_search(
    model: nn.Module,
    example_inputs,
    evaluate: Evaluate,
    finetune: Callable[[nn.Module], object],
    budget: Budget | str | float = 2.0,
    rounds: int = 3,
    trials_per_round: int = 20,
    **options,
) -> IterativeResult:
    """AutoCompress-style schedule: search, prune, fine-tune briefly, repeat with a tighter budget.

    Round ``r`` (of ``rounds``) aims at ``ratio ** (r / rounds)`` of the
    original cost, so each search only removes what a short fine-tune
    (``finetune(model)``, training in place) can recover before the next.
    Each round traces the previous round's (smaller) model once. MACs and
    params budgets only: a latency table would have to be re-measured per
    round (use :func:`search` for latency).
    """
    budget = budget if isinstance(budget, Budget) else (
        Budget.parse(budget) if isinstance(budget, str) else Budget(BudgetMetric.MACS, budget))
    if budget.metric is BudgetMetric.LATENCY:
        raise ConfigError("iterative_search takes MACs or params budgets; use search() for latency")
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be a positive integer, got {rounds!r}")
    dense = measure_cost(model, example_inputs, budget.metric)
    current, results = model, []
    for r in range(1, rounds + 1):
        ratio = measure_cost(current, example_inputs, budget.metric) * budget.ratio ** (r / rounds) / dense
        if ratio <= 1.0001:
            continue
        result = search(current, example_inputs, evaluate, Budget(budget.metric, ratio), trials_per_round, **options)
        finetune(result.model)
        current = result.model
        results.append(result)
    return IterativeResult(results, current, dense, measure_cost(current, example_inputs, budget.metric))
