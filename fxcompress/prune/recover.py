"""Recovery fine-tuning: train a compressed causal LM to reproduce the dense model it was cut from.

Structured pruning of an LLM (heads, FFN channels, the residual width, whole
decoder layers) costs perplexity that a short fine-tune wins back.
:func:`recover` distills the teacher's next-token distribution into the
student: at every position, ``T² · KL(teacher ‖ student)`` of the logits
softened by the temperature ``T``, optionally plus ``ce_weight`` times the
next-token cross-entropy on the text itself (:func:`distillation_loss`).
Distilling the dense model's full distribution carries far more signal per
token than the text's one-hot targets, which matters when the budget is a few
minutes (Sheared-LLaMA and Minitron recover this way, Xia et al. 2023,
Muralidharan et al. 2024).

The budget is a step count (deterministic for a seed and thread count), a
wall-clock budget in minutes, or both (the steps drive the schedule, the
minutes stop it early). AdamW with a linear warmup and a cosine decay to
``min_lr_ratio`` of the peak; with minutes alone the cosine follows elapsed
time, so the learning rate anneals when the budget ends whatever the
machine's speed. The data is drawn from a seeded generator
(:func:`token_windows` draws random windows of a token stream), or cycled in
order from a list of batches.

The student is any ``nn.Module`` called as ``model(input_ids)`` and returning
logits (a tensor, an object with ``.logits``, a dict or a tuple's first): a
written-back Hugging Face model, a depth-pruned copy, a shrunk or masked
``GraphModule`` (masked weights stay zero: masks apply in every forward).

With ``Recovery(adapters=LoRA(rank=...))`` the fine-tune trains low-rank
adapters on the student's linear layers instead of its weights
(:mod:`fxcompress.prune.lora`), and merges them into the weights at the end:
the student comes back as the same module, with its own class and
``state_dict`` keys. Gradients and AdamW's two state tensors then exist for
the adapters (and any norms or biases they keep training) only, not for
every weight, which is what makes a recovery fit in memory beside the
teacher at a scale where full fine-tuning would not; at equal steps it
usually recovers less.

>>> teacher = torch.nn.Sequential(torch.nn.Embedding(8, 8)).eval()
>>> student = torch.nn.Sequential(torch.nn.Embedding(8, 8))
>>> data = token_windows(torch.arange(64) % 8, batch_size=4, seq_len=8)
>>> result = recover(student, teacher, data, Recovery(steps=30, lr=0.1))
>>> result.steps, result.stopped_by, result.losses[-1] < result.losses[0] / 4
(30, 'steps', True)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import ConfigError
from fxcompress.examples_llm import logits_of
from fxcompress.prune.lora import LoRA, add_adapters

__all__ = ["Recovery", "RecoveryResult", "recover", "distillation_loss", "token_windows"]

#: A batch sampler: draws one batch of ``input_ids`` from the seeded generator it is given.
Sampler = Callable[[torch.Generator], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Recovery:
    """The settings of one recovery fine-tune (see the module docstring). At least one of ``steps`` and
    ``minutes`` is set."""

    steps: int | None = None
    minutes: float | None = None
    lr: float = 5e-4
    warmup_steps: int = 5
    min_lr_ratio: float = 0.0
    temperature: float = 1.0
    ce_weight: float = 0.0  #: weight of the next-token cross-entropy beside the distillation term
    weight_decay: float = 0.0
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    seed: int = 0
    adapters: LoRA | None = None  #: train low-rank adapters (merged at the end) instead of every weight


    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ConfigError("Recovery needs a budget: steps, minutes or both")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"Recovery.steps must be >= 0, got {self.steps}")
        if self.minutes is not None and self.minutes <= 0:
            raise ConfigError(f"Recovery.minutes must be > 0, got {self.minutes}")
        if self.temperature <= 0 or self.lr <= 0:
            raise ConfigError(f"Recovery needs a positive temperature and lr, got {self.temperature} and {self.lr}")
        if self.adapters is not None and not isinstance(self.adapters, LoRA):
            raise ConfigError(f"Recovery.adapters must be a LoRA(...) or None, got {self.adapters!r}")

    def lr_factor(self, step: int, progress: float) -> float:
        """The learning rate's multiple of ``lr`` at ``step``, ``progress`` (0..1) through the budget."""
        warmup = min(1.0, (step + 1) / max(1, self.warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return warmup * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclasses.dataclass
class RecoveryResult:
    steps: int
    seconds: float  #: wall time of the fine-tune (teacher forwards included)
    stopped_by: str  #: "steps" or "minutes"
    losses: list[float]  #: the training loss of every step
    trainable_params: int  #: parameters the optimizer updated (the adapters' alone with ``adapters``)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      input_ids: torch.Tensor | None = None, ce_weight: float = 0.0) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` at temperature ``T``, averaged over positions, plus ``ce_weight`` times
    the next-token cross-entropy of ``student`` on ``input_ids`` (logits at positions ``0..n-2`` predict
    tokens ``1..n-1``). Logits are ``(..., vocab)``.

    >>> x = torch.tensor([[[1.0, 2.0, 0.5]]])
    >>> float(distillation_loss(x, x, temperature=2.0))
    0.0
    """
    t = temperature
    s, q = student.flatten(0, -2).float(), teacher.flatten(0, -2).float()
    loss = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(q / t, -1), log_target=True, reduction="batchmean") * t * t
    if ce_weight:
        if input_ids is None:
            raise ConfigError("distillation_loss: ce_weight needs the input_ids")
        next_token = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
        loss = loss + ce_weight * next_token
    return loss


def token_windows(tokens: torch.Tensor, batch_size: int, seq_len: int) -> Sampler:
    """A sampler of ``batch_size`` windows of ``seq_len`` tokens at random offsets of the 1-D ``tokens``
    (``(batch_size, seq_len)`` int64), drawn from the generator it is called with."""
    if len(tokens) <= seq_len:
        raise ConfigError(f"token_windows: {len(tokens)} tokens hold no window of {seq_len}")

    def sample(generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
        return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()

    return sample


def _draw(data: Sampler | Sequence[torch.Tensor], generator: torch.Generator):
    if callable(data):
        while True:
            yield data(generator)
    if not len(data):
        raise ConfigError("recover: no batches to train on")
    yield from itertools.cycle(data)


def _optimizer(params: list[nn.Parameter], settings: Recovery) -> torch.optim.Optimizer:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=settings.lr, betas=(0.9, settings.beta2))


def recover(student: nn.Module, teacher: nn.Module, data: Sampler | Sequence[torch.Tensor],
            settings: Recovery = Recovery(steps=100), log: Callable[[str], None] | None = None,
            log_every: int = 10) -> RecoveryResult:
    """Fine-tune ``student`` in place to match ``teacher``'s logits on ``data`` (a :data:`Sampler` such as
    :func:`token_windows`, or a list of ``input_ids`` batches cycled in order); return what it took.

    The teacher runs in eval mode without gradients and is not modified; the
    student is left in eval mode. The global RNG is forked, so dropout in the
    student (and the adapters' initialisation) is seeded by ``settings.seed``
    and the caller's RNG stream is unchanged. With ``settings.adapters`` the
    adapters are merged even when the fine-tune is interrupted, so the
    student never leaves with adapter modules in it.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    batches = _draw(data, generator)
    teacher_was_training = teacher.training
    teacher.eval()
    student.train()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        adapters = add_adapters(student, settings.adapters) if settings.adapters is not None else None
        params = adapters.trainable() if adapters else [p for p in student.parameters() if p.requires_grad]
        try:
            losses, stopped_by = _fine_tune(student, teacher, batches, params, settings, start, log, log_every)
        finally:
            if adapters:
                adapters.merge()
            student.eval()
            teacher.train(teacher_was_training)
    return RecoveryResult(len(losses), time.perf_counter() - start, stopped_by, losses, sum(p.numel() for p in params))


def _fine_tune(student: nn.Module, teacher: nn.Module, batches, params: list[nn.Parameter], settings: Recovery,
               start: float, log: Callable[[str], None] | None, log_every: int) -> tuple[list[float], str]:
    """The training loop of :func:`recover` over ``params``: the step losses and what stopped it."""
    optimizer = _optimizer(params, settings)
    budget = None if settings.minutes is None else settings.minutes * 60.0
    losses: list[float] = []
    last_step = 0.0  # seconds the previous step took: a step that would end past the budget is not started
    while settings.steps is None or len(losses) < settings.steps:
        elapsed = time.perf_counter() - start
        if budget is not None and elapsed + last_step > budget:
            return losses, "minutes"
        step = len(losses)
        progress = step / settings.steps if settings.steps is not None else elapsed / budget
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * settings.lr_factor(step, progress)
        input_ids = next(batches)
        with torch.no_grad():
            target = logits_of(teacher(input_ids))
        loss = distillation_loss(logits_of(student(input_ids)), target, settings.temperature, input_ids,
                                 settings.ce_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        last_step = time.perf_counter() - start - elapsed
        if log and (len(losses) % log_every == 0 or len(losses) == 1):
            log(f"recovery step {len(losses)}: loss {losses[-1]:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{time.perf_counter() - start:.0f} s")
    return losses, "steps"
