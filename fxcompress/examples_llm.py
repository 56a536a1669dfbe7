"""A small Llama-architecture language model on real text that every machine has: the standard library's sources.

LLM compression methods (structured width/depth pruning, Wanda, SparseGPT,
GPTQ, ...) are judged by held-out perplexity of a trained model. Downloaded
checkpoints and corpora are not available offline, so the benchmarks train
their own tiny decoder on the ``*.py`` files of the Python standard library
(``sysconfig.get_paths()["stdlib"]``), which are present wherever Python is.

* **Data** (:func:`stdlib_corpus`): the files, sorted by relative path,
  excluding test suites and generated tables (``SKIPPED_DIRS``); whole files
  are held out: file ``i`` of the sorted list is test when ``i % 10 == 0``,
  validation when ``i % 10 == 5``, training otherwise. Tokens are bytes
  (0-255) with ``EOS`` (256) after every file: no tokenizer to train, the same
  on every machine. ``Corpus.digest`` hashes the split's paths and bytes, so
  a cached model is only reused on the same text (stdlib sources differ
  between Python versions).
* **Model** (:func:`tiny_llama`): ``transformers.LlamaForCausalLM`` with
  grouped-query attention, untied embeddings (``lm_head`` is its own layer,
  which one-shot methods conventionally leave dense).
* **Evaluation** (:func:`perplexity`): token-level perplexity, exp of the
  mean next-token NLL over every predicted position, for an HF model or a
  compiled ``GraphModule`` alike.

>>> encode(b"ab", b"c").tolist()
[97, 98, 256, 99, 256]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import sysconfig
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "EOS", "VOCAB_SIZE", "SKIPPED_DIRS", "Corpus", "stdlib_corpus", "encode", "spread_windows",
    "eval_sequences", "calibration_sequences", "batches", "tiny_llama_config", "tiny_llama", "logits_of", "perplexity",
    "mean_nll", "TrainSettings", "TrainResult", "train_lm",
]

EOS = 256  #: end of file; the only special token
VOCAB_SIZE = 257
#: Directories left out: test suites (large string fixtures, deliberately odd code), a 750 KB string literal
#: (``pydoc_data``), generated charmap tables (``encodings``) and third-party packages (differ per machine).
SKIPPED_DIRS = ("test", "tests", "pydoc_data", "encodings", "site-packages", "__pycache__")
TEST_EVERY, VALID_OFFSET = 10, 5


def encode(*files: bytes) -> torch.Tensor:
    """Tokens of ``files`` in order: each one's bytes, then ``EOS``; int16 keeps a corpus at 2 bytes a token.

    Built in numpy: thousands of small torch ops are slow on a busy machine.
    """
    if not files:
        return torch.empty(0, dtype=torch.int16)
    ends = np.cumsum([len(f) + 1 for f in files]) - 1
    tokens = np.frombuffer(b"\0".join(files) + b"\0", dtype=np.uint8).astype(np.int16)
    tokens[ends] = EOS
    return torch.from_numpy(tokens)


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """The three splits: file lists (relative POSIX paths) and their concatenated tokens."""

    root: str
    files: dict[str, tuple[str, ...]]  #: split name ("train", "valid", "test") -> files, sorted
    tokens: dict[str, torch.Tensor]  #: split name -> 1-D int16 tokens, files in sorted order
    digest: str  #: sha256 of every split's paths and bytes (first 16 hex digits)

    def split(self, name: str) -> torch.Tensor:
        if name not in self.tokens:
            raise ValueError(f"no split {name!r}; splits are {sorted(self.tokens)}")
        return self.tokens[name]


def _split_of(index: int) -> str:
    if index % TEST_EVERY == 0:
        return "test"
    return "valid" if index % TEST_EVERY == VALID_OFFSET else "train"


@functools.lru_cache(maxsize=4)
def stdlib_corpus(root: str | None = None) -> Corpus:
    """The standard library's ``*.py`` files under ``root`` (default: this Python's), split by file.

    Cached per root: reading the ~10 MB takes about a second.
    """
    base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, names in os.walk(base):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_DIRS]  # never descend into site-packages
        paths += [(pathlib.Path(folder) / n).relative_to(base).as_posix() for n in names if n.endswith(".py")]
    paths.sort()
    if len(paths) < TEST_EVERY:
        raise ValueError(f"{base} holds {len(paths)} usable *.py files; the split needs at least {TEST_EVERY}")
    files: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    contents: dict[str, list[bytes]] = {"train": [], "valid": [], "test": []}
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        split, data = _split_of(index), (base / path).read_bytes()
        files[split].append(path)
        contents[split].append(data)
        digest.update(f"{split}\0{path}\0{len(data)}\0".encode())
        digest.update(data)
    return Corpus(str(base), {k: tuple(v) for k, v in files.items()}, {k: encode(*v) for k, v in contents.items()},
                  digest.hexdigest()[:16])


def spread_windows(tokens: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seq_len`` tokens spread evenly over ``tokens``: (n, seq_len) int64.

    Evenly spread rather than the first ``n``, so the held-out figure covers
    many files, not the few that sort first.

    >>> spread_windows(torch.arange(10), 2, 3).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    total = len(tokens) // seq_len
    if n > total:
        raise ValueError(f"{n} windows of {seq_len} tokens asked, the tokens hold {total}")
    starts = (torch.arange(n) * total // n) * seq_len
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def eval_sequences(n: int = 200, seq_len: int = 256, split: str = "test", corpus: Corpus | None = None) -> torch.Tensor:
    """Held-out sequences for perplexity: ``n`` × ``seq_len`` tokens of the test (or validation) files."""
    return spread_windows((corpus or stdlib_corpus()).split(split), n, seq_len)


def calibration_sequences(n: int = 128, seq_len: int = 256, seed: int = 0, corpus: Corpus | None = None) -> torch.Tensor:
    """``n`` × ``seq_len`` tokens at seeded random offsets of the training files, for one-shot methods."""
    tokens = (corpus or stdlib_corpus()).split("train")
    starts = torch.randint(0, len(tokens) - seq_len, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def tiny_llama_config(hidden: int = 384, layers: int = 6, heads: int = 8, kv_heads: int = 2, ffn: int = 1024,
                      seq_len: int = 256):
    """A ``LlamaConfig`` for the byte vocabulary: GQA (``heads`` query heads share ``kv_heads`` key/value
    heads), SwiGLU FFN of width ``ffn``, RoPE, RMSNorm, untied ``lm_head``, no dropout and no KV cache (the
    benchmarks score whole sequences)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=seq_len,
        tie_word_embeddings=False, use_cache=False, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
        attention_dropout=0.0, attn_implementation="sdpa",
    )


def tiny_llama(config=None, seed: int = 0) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (``config`` default: :func:`tiny_llama_config`)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config or tiny_llama_config())


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, an object with ``.logits`` (HF), a dict or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def batches(sequences: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Chunks of ``batch_size`` rows (for evaluation, or as one-shot calibration batches); a last chunk of one
    joins the one before it (an exported graph captured at batch >= 2 refuses batch 1).

    >>> [len(b) for b in batches(torch.zeros(9, 4), 4)]
    [4, 5]
    """
    chunks = list(sequences.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def mean_nll(model: Callable, sequences: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token negative log-likelihood (nats) over every predicted position, and their count.

    ``model(input_ids)`` may be an HF causal LM or a ``GraphModule`` returning
    logits in any form :func:`logits_of` reads. Position 0 of each sequence
    has no prediction, so ``n × (seq_len − 1)`` tokens are scored. A plain
    ``nn.Module`` is put in eval mode for the call (its mode is restored); a
    ``GraphModule`` keeps the mode it was captured in.
    """
    was_training = isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule) and model.training
    if was_training:
        model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches(sequences, batch_size):
                logits = logits_of(model(batch))[:, :-1].float()
                targets = batch[:, 1:]
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               reduction="sum").double())
                count += targets.numel()
    finally:
        if was_training:
            model.train()
    return total / count, count


def perplexity(model: Callable, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """Token-level perplexity: ``exp`` of :func:`mean_nll` over ``sequences`` ((n, seq_len) int64)."""
    return math.exp(mean_nll(model, sequences, batch_size)[0])


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """AdamW with linear warmup and a cosine decay to ``min_lr_ratio`` of the peak.

    With ``steps`` set, training runs exactly that many steps and the schedule
    follows the step count (deterministic for a seed and thread count). With
    ``steps=None`` it runs for ``minutes`` of wall clock and the cosine follows
    elapsed time, so the learning rate anneals to its floor when the budget ends
    whatever the machine's speed (the step count is then the machine's).
    """

    minutes: float = 15.0
    steps: int | None = None
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1  #: on matrices only (not norms)
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    seconds: float
    final_loss: float  #: mean training loss (nats/token) over the last 20 steps
    losses: list[float]  #: training loss of every step


def _lr_factor(settings: TrainSettings, step: int, progress: float) -> float:
    warmup = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warmup * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def train_lm(model: nn.Module, tokens: torch.Tensor, settings: TrainSettings = TrainSettings(),
             log: Callable[[str], None] | None = None, log_every: int = 25) -> TrainResult:
    """Train ``model`` in place on random windows of ``tokens`` (next-token cross-entropy)."""
    if settings.steps is None and settings.minutes <= 0:
        raise ValueError("train_lm needs steps or a positive minutes budget")
    generator = torch.Generator().manual_seed(settings.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.lr, betas=(0.9, settings.beta2))
    budget = settings.minutes * 60.0
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        progress = step / settings.steps if settings.steps is not None else elapsed / budget
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _lr_factor(settings, step, progress)
        starts = torch.randint(0, len(tokens) - settings.seq_len, (settings.batch_size,), generator=generator)
        batch = torch.stack([tokens[s : s + settings.seq_len] for s in starts.tolist()]).long()
        logits = logits_of(model(batch))[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if log and (step % log_every == 0 or step == 1):
            log(f"step {step}: loss {losses[-1]:.3f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{time.perf_counter() - start:.0f} s")
    model.eval()
    tail = losses[-20:]
    return TrainResult(step, step * settings.batch_size * settings.seq_len, time.perf_counter() - start,
                       sum(tail) / max(1, len(tail)), losses)
