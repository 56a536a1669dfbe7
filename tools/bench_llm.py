"""Held-out perplexity of a small trained Llama-architecture LM under every LLM compression method.

The model is ``transformers.LlamaForCausalLM`` (RoPE, RMSNorm, SwiGLU) with
grouped-query attention: by default hidden 384, 6 layers, 8 query heads
sharing 2 key/value heads, FFN 1024 (2.67x), untied ``lm_head``, byte
vocabulary (256 bytes + end-of-file): 9.5 M parameters, 0.2 M of them
embedding and ``lm_head``. It is trained here, on CPU, on the Python standard
library's own sources (``fxcompress.examples_llm``: every 10th file by sorted
path is held out as test, every 10th from the 5th as validation), with
AdamW, warmup and a cosine decay over a wall-clock budget (``--train-minutes``,
default 15) or a fixed step count (``--train-steps``, deterministic), batch
16 x 256 tokens. The trained weights are cached under ``--cache`` (default
``~/.cache/fxcompress/bench_llm/``) in a folder named by a hash of the
model config, the training settings and the data split's digest, so later
runs reuse them; ``--retrain`` trains again.

Each method in ``METHODS`` turns the dense model and calibration sequences
(``--calibration`` sequences of 256 tokens at seeded random offsets of the
training files) into a compressed model; the table gives its held-out
perplexity over ``--n-eval`` test sequences of 256 tokens (evenly spread
windows; ``n x 255`` tokens scored), the change against dense, the method's
wall seconds (compression only, not evaluation), and the parameters and
nonzero parameters of the result (weights ``fold-qdq`` stored as integers count).

Every method compresses each linear layer of the decoder (the attention's
q/k/v/o and the FFN's gate/up/down projections, ``DECODER_LINEARS``) and
nothing else: ``lm_head`` and the embedding stay dense and in float, as the
one-shot papers leave them. Issue 18's one-shot rows (``fxcompress.oneshot``
through the ``one-shot`` pass, layer-sequential) calibrate on the same
sequences, given as batches of ``CALIBRATION_BATCH`` (16: 8 batches at the
default 128 x 256): 50 % unstructured and 2:4 sparsity by magnitude, Wanda and
SparseGPT; RTN and GPTQ (act-order, static groups) at 4 and 3 bits, AWQ at 4
bits, all asymmetric with groups of 128 input columns; simulated W8A8
(per-channel symmetric int8 weights by round to nearest, per-tensor static
int8 activations) plain and after SmoothQuant smoothing (alpha 0.5), and the
smoothed one folded into int8 QDQ form (``-qdq``: int8 weights, int32 biases,
what ONNX Runtime runs in int8). A
compiled row's seconds include capturing the model with ``torch.export``
(the same few seconds for every row) and the pass's checks. Under the table
the tool prints issue 18's acceptance checks computed from the rows
(``ACCEPTANCE``: e.g. Wanda's perplexity loss as a fraction of magnitude's at
50 %), also in ``--json`` as ``"acceptance"``.

Issue 17's structured rows (``STRUCTURED``) remove 25 % or 50 % of all
parameters: ``l1-width``/``act-width``/``taylor-width`` prune heads (whole GQA
groups), FFN channels and the hidden size by L1, by ``P.ActivationNorm`` or by
``P.Taylor`` (gradients of the next-token loss on the calibration sequences)
and return the user's ``LlamaForCausalLM`` rewritten at the new widths
(``output="module"``);
``depth`` rows remove whole decoder layers by Block Influence (ShortGPT,
``P.depth_prune``; 2 and 3 of the 6 layers, the nearest whole-layer counts).
With ``--recover-minutes`` and/or ``--recover-steps`` each structured model is
then fine-tuned by ``P.recover``: logit distillation from the dense model
(KL at ``--recover-temperature``, plus ``--recover-ce`` times next-token
cross-entropy) on random windows of the training files only, ``--recover-batch``
sequences a step, AdamW at ``--recover-lr`` with warmup and a cosine; the
table adds the recovered perplexity, its change against dense, the
fine-tune's seconds and steps. With ``--recover-lora RANK`` the fine-tune
trains rank-``RANK`` LoRA adapters on the decoder linear layers
(``DECODER_LINEARS``) instead of every weight and merges them at the end
(``P.LoRA``; the rows' ``recover_trainable`` in ``--json`` counts what
trained). Issue 17's checks (best recovered 25 % row
within 10 % of dense; activation-aware beats L1 before recovery) are in
``ACCEPTANCE`` too.

The per-layer allocation of the width rows differs: ``l1-width``/``act-width``
fit one sparsity for every group (uniform); ``act-width-global`` ranks all
channels across groups and layers at once (``allocation="global"``, so widths
differ per layer); ``search-width`` lets ``fxcompress.auto.search`` find it
(``SEARCH_TRIALS`` Optuna trials at the same parameter budget, each scored by
minus the perplexity of the first ``SEARCH_SEQUENCES`` calibration sequences,
never the evaluation split; one searched sparsity per layer's FFN and one for
every layer's heads, ``SEARCH_TIE``; the first trial is the uniform
allocation) and compiles the pruner it found into the ``LlamaForCausalLM``
(``output="module"``); the search's table goes to stderr.

Unigram and bigram byte models fitted on the training files are printed first
as a sanity floor: a trained model must beat them clearly. Choose methods' settings with ``--eval-split valid`` and
report test.

    python tools/bench_llm.py                                  # train once (15 min), then every method
    python tools/bench_llm.py --methods dense,magnitude-50%,magnitude-2:4 --json out.json
    python tools/bench_llm.py --methods magnitude-50%,wanda-50%,sparsegpt-50%,rtn-w4g128,gptq-w4g128
    python tools/bench_llm.py --train-steps 400 --retrain      # deterministic training
    python tools/bench_llm.py --train-steps 440 --recover-minutes 5 \
        --methods l1-width-25%,act-width-25%,depth-25%,l1-width-50%,act-width-50%,depth-50%

Torch threads (``--threads``, default 2) change the training trajectory;
compare runs at the same count.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch import nn

import fxcompress
from fxcompress import prune as P
from fxcompress.auto import search
from fxcompress.examples_llm import (
    VOCAB_SIZE,
    TrainSettings,
    batches,
    calibration_sequences,
    eval_sequences,
    logits_of,
    perplexity,
    stdlib_corpus,
    tiny_llama,
    tiny_llama_config,
    train_lm,
)
from fxcompress.oneshot import AWQ, GPTQ, RTN, SparseGPT, Wanda
from fxcompress.passes import FoldQDQ, OneShot, standard_pruning, w8a8_passes
from fxcompress.passes.fold_qdq import QuantizedWeights
from fxcompress.report import count_nonzero_params, count_params


__all__ = ["METHODS", "Method", "ModelSettings", "STRUCTURED", "ACCEPTANCE", "Check", "RecoveredWithin", "acceptance",
           "load_or_train", "input_statistics", "ngram_counts", "ngram_perplexity", "run", "main"]

#: A method: (dense model, calibration input_ids (n, seq_len) int64) -> compressed model, called as
#: ``model(input_ids)`` and returning logits (a tensor or an object with ``.logits``). The dense model is the
#: trained ``LlamaForCausalLM`` in eval mode, shared by every row: a method must not modify it (deep-copy it
#: first, as ``fxcompress.compile`` does). Register a new method in ``METHODS`` under a name saying its
#: setting ("wanda-50%", "gptq-w4g128"); its time in the table is the call's wall time.
Method = Callable[[nn.Module, torch.Tensor], nn.Module]

#: The decoder's linear layers (attention and FFN projections); ``lm_head`` and the embedding are not in it.
#: On the exported graph of an HF model the layers are plain ``nn.Module`` containers, not ``nn.Linear``:
#: with the default ``op_types`` ``LevelPruner``/``NMPruner`` select nothing there (and say nothing), so the
#: selection is by name with ``op_types=(nn.Module,)``.
DECODER_LINEARS = ("model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj")

#: Calibration sequences per batch of the one-shot methods (the engine holds one batch's activations at a time;
#: the captured graph's batch dim is dynamic from 2 up, so this need not equal the example input's 2).
CALIBRATION_BATCH = 16


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    hidden: int = 384
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    ffn: int = 1024
    seq_len: int = 256


# ---------------------------------------------------------------------------- methods


def _example(calibration: torch.Tensor) -> tuple[torch.Tensor]:
    """Two calibration sequences: the capture's example input (batch >= 2 keeps the batch dim dynamic)."""
    return (calibration[:2],)


def _compile(model: nn.Module, calibration: torch.Tensor, passes) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capture's notes on constant batch sizes and the causal mask's ops
        return fxcompress.compile(model, _example(calibration), passes)


def dense(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """The trained model itself."""
    return model


def weight_pruning(pruner_class, **options) -> Method:
    """Magnitude pruning of single weights in the decoder's linear layers (masks; shapes kept)."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        pruner = pruner_class(op_types=(nn.Module,), op_names=DECODER_LINEARS, **options)
        return _compile(model, calibration, standard_pruning(pruner))
    return method


def calibration_batches(calibration: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The calibration sequences as the one-shot passes take them: batches of ``CALIBRATION_BATCH`` (a last
    batch of one joins the one before it: the captured graph refuses batch 1)."""
    return tuple(batches(calibration, CALIBRATION_BATCH))


def one_shot(algorithm_class, **options) -> Method:
    """A ``fxcompress.oneshot`` algorithm on the decoder's linear layers, calibrated layer by layer on the
    calibration sequences (sparsity as masks, quantization as dequantized weights with their grids recorded)."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        algorithm = algorithm_class(op_names=DECODER_LINEARS, **options)
        return _compile(model, calibration, [OneShot(algorithm, calibration_batches(calibration), progress=False)])
    return method


def w8a8(alpha: float | None, fold: bool = False) -> Method:
    """Simulated W8A8 of every linear layer but ``lm_head`` (the decoder's): per-channel int8 weights, per-tensor
    static int8 inputs; with ``alpha``, SmoothQuant's smoothing first (None: the plain W8A8 baseline). With
    ``fold``, ``fold-qdq`` then stores the int8 weights and int32 biases and rounds activations with
    quantize/dequantize ops: the graph ``to_onnx`` hands ONNX Runtime's int8 kernels, evaluated in PyTorch."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        passes = w8a8_passes(calibration_batches(calibration), alpha, exclude=("lm_head",))
        return _compile(model, calibration, passes + [FoldQDQ()] if fold else passes)
    return method


def _compile_module(model: nn.Module, calibration: torch.Tensor, passes) -> nn.Module:
    """As :func:`_compile`, returning the user's model class written back at the new widths (trainable as is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxcompress.compile(model, _example(calibration), passes, output="module")


def width_pruning(removed: float) -> Method:
    """Structured L1 pruning of heads (whole GQA groups), FFN channels and the hidden size, one ratio
    for every group, fitted so that ``removed`` of all parameters go (``target="params=..."``); the result is
    the written-back ``LlamaForCausalLM``."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        return _compile_module(model, calibration, standard_pruning(P.L1Norm(), target=f"params={1 / (1 - removed):.6f}"))
    return method


def _calibration_evaluator(calibration: torch.Tensor) -> P.Evaluator:
    """The calibration sequences as a data-aware pruner's evaluator (batches of ``CALIBRATION_BATCH``; the loss,
    next-token cross-entropy, is there for criteria that take gradients)."""
    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = logits_of(model(batch))
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
    return P.Evaluator(list(calibration_batches(calibration)), loss=loss, progress=False)


def data_aware_width_pruning(pruner_class, removed: float) -> Method:
    """As :func:`width_pruning` (same groups, same ``target``), ranked by the data-aware ``pruner_class`` on
    every calibration sequence."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        evaluator = _calibration_evaluator(calibration)
        pruner = pruner_class(evaluator=evaluator, num_batches=len(evaluator.data))
        return _compile_module(model, calibration, standard_pruning(pruner, target=f"params={1 / (1 - removed):.6f}"))
    return method


def activation_width_pruning(removed: float) -> Method:
    """Width pruning ranked by ``P.ActivationNorm``: each channel's consumer-column weight norms times its input
    activations' norms."""
    return data_aware_width_pruning(P.ActivationNorm, removed)


def taylor_width_pruning(removed: float) -> Method:
    """Width pruning ranked by ``P.Taylor``: ``Σ |w · ∂L/∂w|`` over each channel's weights, ``∂L/∂w`` the gradient
    of the next-token cross-entropy summed over the calibration batches."""
    return data_aware_width_pruning(P.Taylor, removed)


def flap_width_pruning(removed: float, compensate: bool = True,
                       allocation: P.Allocation = P.Allocation.GLOBAL) -> Method:
    """FLAP (An et al., 2024): heads (whole GQA groups) and FFN channels ranked by ``P.Fluctuation`` (input
    variance times squared column norms on every calibration sequence), standardised per layer and structure
    and compared across layers (``Allocation.GLOBAL``: FLAP's adaptive structure search), fitted to the same
    ``target`` as :func:`width_pruning`; the residual width stays, as in the paper. With ``compensate`` the
    removed channels' mean contributions go into the biases of ``o_proj``/``down_proj`` (``compensate-bias``;
    the written-back config sets ``attention_bias``/``mlp_bias``)."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        evaluator = _calibration_evaluator(calibration)
        pruner = P.Fluctuation(evaluator=evaluator, num_batches=len(evaluator.data), exclude=("model.embed_tokens",),
                               allocation=allocation)
        passes = standard_pruning(pruner, target=f"params={1 / (1 - removed):.6f}", compensate=compensate)
        return _compile_module(model, calibration, passes)
    return method


#: Trials of the ``search-width`` rows' search; the first is the uniform allocation at the same budget.
SEARCH_TRIALS = 16
#: Calibration sequences each trial is scored on (minus their perplexity): the first of the calibration set.
SEARCH_SEQUENCES = 32
#: Groups sharing one searched sparsity (``auto.search``'s ``tie``): each layer's FFN alone, every layer's heads
#: together (a head group of this model is a whole GQA group, half a layer's heads), the hidden size alone.
SEARCH_TIE = r"layers\.\d+\.mlp|self_attn"


def _activation_criterion(calibration: torch.Tensor, **options) -> P.ActivationNorm:
    """``P.ActivationNorm`` on every calibration sequence, as the ``act-width`` rows rank channels."""
    evaluator = _calibration_evaluator(calibration)
    return P.ActivationNorm(evaluator=evaluator, num_batches=len(evaluator.data), **options)


def global_activation_width_pruning(removed: float) -> Method:
    """As :func:`activation_width_pruning` (same criterion, same ``target``), with one ranking of all channels
    across groups and layers (``allocation="global"``) instead of one sparsity for every group."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        pruner = _activation_criterion(calibration, allocation=P.Allocation.GLOBAL)
        return _compile_module(model, calibration, standard_pruning(pruner, target=f"params={1 / (1 - removed):.6f}"))
    return method


def _minus_perplexity(sequences: torch.Tensor, model: nn.Module) -> float:
    """A search's score (higher is better): minus the perplexity of ``sequences``."""
    return -perplexity(model, sequences)


def searched_width_pruning(removed: float, trials: int = SEARCH_TRIALS) -> Method:
    """As :func:`activation_width_pruning` (same criterion, same parameter budget), with the per-group sparsities
    found by ``fxcompress.auto.search`` (see the module docstring); the pruner found is compiled again into the
    user's ``LlamaForCausalLM`` (``output="module"``)."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        score = functools.partial(_minus_perplexity, calibration[:SEARCH_SEQUENCES])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the capture's notes, as in _compile
            result = search(model, _example(calibration), score, f"params={1 / (1 - removed):.6f}", trials,
                            criterion=_activation_criterion(calibration), tie=SEARCH_TIE, progress=False)
        print(result.table(), file=sys.stderr, flush=True)
        return _compile_module(model, calibration, standard_pruning(result.pruner))
    return method


def layers_to_remove(layers: int, removed: float) -> int:
    """The whole-layer count nearest ``removed`` of ``layers`` (halves round up), at least one, one left.

    >>> layers_to_remove(6, 0.25), layers_to_remove(6, 0.5)
    (2, 3)
    """
    return min(layers - 1, max(1, math.floor(removed * layers + 0.5)))


def depth_pruning(removed: float) -> Method:
    """Whole decoder layers removed by Block Influence on the calibration sequences (``P.depth_prune``),
    :func:`layers_to_remove` of them: a copy of the ``LlamaForCausalLM`` with fewer layers."""
    def method(model: nn.Module, calibration: torch.Tensor) -> nn.Module:
        remove = layers_to_remove(model.config.num_hidden_layers, removed)
        return P.depth_prune(model, calibration_batches(calibration), remove).model
    return method


METHODS: dict[str, Method] = {
    "dense": dense,
    # -- unstructured and N:M, weight magnitude (issue 18's baselines)
    "magnitude-50%": weight_pruning(P.LevelPruner, sparsity=0.5),
    "magnitude-2:4": weight_pruning(P.NMPruner, n=2, m=4),
    # -- one-shot methods of fxcompress.oneshot (issue 18), calibrated layer by layer
    "wanda-50%": one_shot(Wanda, sparsity=0.5),
    "sparsegpt-50%": one_shot(SparseGPT, sparsity=0.5),
    "wanda-2:4": one_shot(Wanda, n=2, m=4),
    "sparsegpt-2:4": one_shot(SparseGPT, n=2, m=4),
    "rtn-w4g128": one_shot(RTN, bits=4, group_size=128),
    "gptq-w4g128": one_shot(GPTQ, bits=4, group_size=128),
    "rtn-w3g128": one_shot(RTN, bits=3, group_size=128),
    "gptq-w3g128": one_shot(GPTQ, bits=3, group_size=128),
    "awq-w4g128": one_shot(AWQ, bits=4, group_size=128),
    "w8a8": w8a8(alpha=None),
    "smoothquant-w8a8-a0.5": w8a8(alpha=0.5),
    "smoothquant-w8a8-a0.5-qdq": w8a8(alpha=0.5, fold=True),
    # -- structured pruning (issue 17): width by L1 and by activations, depth by Block Influence
    "l1-width-25%": width_pruning(0.25),
    "l1-width-50%": width_pruning(0.50),
    "act-width-25%": activation_width_pruning(0.25),
    "act-width-50%": activation_width_pruning(0.50),
    "act-width-global-25%": global_activation_width_pruning(0.25),
    "search-width-25%": searched_width_pruning(0.25),
    "flap-width-25%": flap_width_pruning(0.25),
    "flap-width-50%": flap_width_pruning(0.50),
    "taylor-width-25%": taylor_width_pruning(0.25),
    "taylor-width-50%": taylor_width_pruning(0.50),
    "depth-25%": depth_pruning(0.25),
    "depth-50%": depth_pruning(0.50),
}

#: The structured rows: they shrink the model, and the recovery fine-tune (``--recover-*``) applies to them.
STRUCTURED = ("l1-width-25%", "l1-width-50%", "act-width-25%", "act-width-50%", "flap-width-25%", "flap-width-50%",
              "taylor-width-25%", "taylor-width-50%", "depth-25%", "depth-50%",
              "act-width-global-25%", "search-width-25%")


# ---------------------------------------------------------------------------- acceptance checks (issues 17, 18)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not judged: the baseline loses nothing"}[met]


@dataclasses.dataclass(frozen=True)
class Check:
    """One target: ``method``'s perplexity loss against dense (its row's ``delta``, before any recovery)
    compared with ``baseline``'s: at most ``at_most`` times it, or (``at_most`` None) smaller."""

    method: str
    baseline: str
    says: str  #: "Wanda loses {ratio} of what magnitude loses at 50 %"; {ratio} is filled in
    at_most: float | None
    target: str  #: the target as written in the issue ("≤ 1/3", "less")
    issue: int = 18

    def judge(self, rows: dict[str, dict]) -> dict | None:
        """The result on ``rows`` (by method name), or None when either row is missing."""
        if self.method not in rows or self.baseline not in rows:
            return None
        loss, base = rows[self.method]["delta"], rows[self.baseline]["delta"]
        ratio = loss / base if base > 0 else None
        if self.at_most is None:
            met = loss < base
        else:
            met = None if ratio is None else ratio <= self.at_most
        said = self.says.format(ratio="n/a" if ratio is None else f"{ratio:.2f}")
        return {"issue": self.issue, "method": self.method, "baseline": self.baseline, "loss": loss,
                "baseline_loss": base, "ratio": ratio, "target": self.target, "met": met,
                "text": f"{said} ({loss:+.3f} vs {base:+.3f} perplexity; target {self.target}): {_verdict(met)}"}


@dataclasses.dataclass(frozen=True)
class RecoveredWithin:
    """One target on recovered rows: the lowest recovered perplexity among ``methods`` (those present and
    recovered) is at most ``1 + within`` times dense's."""

    methods: tuple[str, ...]
    within: float
    says: str  #: "best 25 % recovered ({method}) ..."; {method} and {ratio} are filled in
    target: str
    issue: int = 17

    def judge(self, rows: dict[str, dict]) -> dict | None:
        recovered = [rows[m] for m in self.methods if m in rows and rows[m].get("recovered") is not None]
        if not recovered or "dense" not in rows:
            return None
        best = min(recovered, key=lambda r: r["recovered"])
        dense = rows["dense"]["perplexity"]
        ratio = best["recovered"] / dense
        met = ratio <= 1 + self.within
        said = self.says.format(method=best["method"], ratio=f"{ratio:.3f}")
        return {"issue": self.issue, "method": best["method"], "baseline": "dense", "loss": best["recovered"] - dense,
                "baseline_loss": 0.0, "ratio": ratio, "target": self.target, "met": met,
                "text": f"{said} ({best['recovered']:.3f} vs dense {dense:.3f}; target {self.target}): {_verdict(met)}"}


ACCEPTANCE: tuple[Check | RecoveredWithin, ...] = (
    # issue 18: one-shot methods against their baselines
    Check("wanda-50%", "magnitude-50%", "Wanda loses {ratio} of what magnitude loses at 50 %", 1 / 3, "≤ 1/3"),
    Check("sparsegpt-50%", "magnitude-50%", "SparseGPT loses {ratio} of what magnitude loses at 50 %", 1 / 3, "≤ 1/3"),
    Check("sparsegpt-2:4", "magnitude-2:4", "SparseGPT loses {ratio} of what magnitude loses at 2:4", 1 / 2, "≤ 1/2"),
    Check("gptq-w4g128", "rtn-w4g128", "GPTQ-4g128 loses {ratio} of what RTN-4g128 loses", 1 / 2, "≤ 1/2"),
    Check("smoothquant-w8a8-a0.5", "w8a8", "SmoothQuant W8A8 (α 0.5) loses {ratio} of what plain W8A8 loses", None,
          "less"),
    # issue 17: structured pruning, before and after recovery
    RecoveredWithin(("l1-width-25%", "act-width-25%", "depth-25%"), 0.10,
                    "The best 25 % row recovered ({method}) is {ratio}x dense's perplexity", "≤ 1.10x"),
    Check("act-width-25%", "l1-width-25%", "Activation-aware width pruning loses {ratio} of what L1 loses at 25 % "
          "(before recovery)", None, "less", issue=17),
    Check("act-width-50%", "l1-width-50%", "Activation-aware width pruning loses {ratio} of what L1 loses at 50 % "
          "(before recovery)", None, "less", issue=17),
)


def acceptance(rows: list[dict]) -> list[dict]:
    """The checks of ``ACCEPTANCE`` whose rows are in ``rows`` (dicts with ``method``, ``perplexity``,
    ``delta`` and, when recovered, ``recovered``, as :func:`run` returns), in ``ACCEPTANCE``'s order: each with
    its ``issue``, ``loss``, ``baseline_loss``, ``ratio`` (None when the baseline loses nothing, where no
    fraction of it means anything), ``met`` (True, False, or None when it cannot be judged) and the sentence
    ``text``."""
    by_name = {r["method"]: r for r in rows}
    return [result for check in ACCEPTANCE if (result := check.judge(by_name)) is not None]


# ---------------------------------------------------------------------------- the model, trained once


def _cache_key(model_settings: ModelSettings, train: TrainSettings, digest: str) -> str:
    blob = json.dumps({"model": dataclasses.asdict(model_settings), "train": dataclasses.asdict(train),
                       "data": digest, "vocab": VOCAB_SIZE, "threads": torch.get_num_threads()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _config(model_settings: ModelSettings):
    m = model_settings
    return tiny_llama_config(m.hidden, m.layers, m.heads, m.kv_heads, m.ffn, m.seq_len)


def load_or_train(model_settings: ModelSettings, train: TrainSettings, cache: pathlib.Path,
                  retrain: bool = False, log=print) -> tuple[nn.Module, dict]:
    """The trained model and its training figures, from the cache when it holds this configuration.

    The folder holds ``model.safetensors`` (weights as data, no pickle),
    ``config.json`` (the ``LlamaConfig``) and ``train.json`` (settings, data
    digest, steps, tokens seen, losses).
    """
    from safetensors.torch import load_file, save_file

    corpus = stdlib_corpus()
    folder = cache / _cache_key(model_settings, train, corpus.digest)
    model = tiny_llama(_config(model_settings), seed=train.seed)
    if not retrain and (folder / "train.json").exists():
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        info = json.loads((folder / "train.json").read_text())
        log(f"loaded the trained model from {folder}")
        return model.eval(), dict(info, cached=True)
    log(f"training {count_params(model) / 1e6:.2f} M parameters on {len(corpus.split('train')) / 1e6:.2f} M "
        f"training tokens ({len(corpus.files['train'])} files) for "
        + (f"{train.steps} steps" if train.steps is not None else f"{train.minutes:g} minutes"))
    result = train_lm(model, corpus.split("train"), train, log=log)
    valid = eval_sequences(64, model_settings.seq_len, "valid", corpus)
    info = {
        "model": dataclasses.asdict(model_settings), "train": dataclasses.asdict(train), "data_digest": corpus.digest,
        "params": count_params(model), "steps": result.steps, "tokens_seen": result.tokens_seen,
        "train_seconds": result.seconds, "final_train_loss": result.final_loss,
        "valid_perplexity_64": perplexity(model, valid), "threads": torch.get_num_threads(),
        "losses": result.losses,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(model.config.to_json_string())
    (folder / "train.json").write_text(json.dumps(info))
    log(f"trained {result.steps} steps ({result.tokens_seen / 1e6:.2f} M tokens) in {result.seconds:.0f} s; "
        f"saved to {folder}")
    return model.eval(), dict(info, cached=False)


# ---------------------------------------------------------------------------- baselines


def ngram_counts(train_tokens: torch.Tensor, order: int) -> torch.Tensor:
    """Byte counts (``order=1``, shape (V,)) or byte-pair counts (``order=2``, shape (V, V)) of the training text."""
    tokens = train_tokens.long()
    if order == 1:
        return torch.bincount(tokens, minlength=VOCAB_SIZE).double()
    pairs = torch.bincount(tokens[:-1] * VOCAB_SIZE + tokens[1:], minlength=VOCAB_SIZE**2)
    return pairs.double().reshape(VOCAB_SIZE, VOCAB_SIZE)


def ngram_perplexity(counts: torch.Tensor, sequences: torch.Tensor, add: float) -> float:
    """Perplexity of the add-``add`` smoothed unigram (1-D ``counts``) or bigram (2-D) model, scored on the
    same positions as :func:`perplexity` (1 .. seq_len-1 of every sequence)."""
    targets = sequences[:, 1:].reshape(-1)
    smoothed = counts + add
    if counts.dim() == 1:
        logp = (smoothed / smoothed.sum()).log()[targets]
    else:
        logp = (smoothed / smoothed.sum(1, keepdim=True)).log()[sequences[:, :-1].reshape(-1), targets]
    return math.exp(-float(logp.mean()))


def baseline_rows(corpus, sequences: torch.Tensor, valid: torch.Tensor) -> list[dict]:
    """Unigram and bigram byte models; the smoothing constant of each is chosen on validation windows."""
    rows = []
    for order, name in ((1, "unigram"), (2, "bigram")):
        counts = ngram_counts(corpus.split("train"), order)
        add = min((1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-5), key=lambda a: ngram_perplexity(counts, valid, a))
        rows.append({"baseline": f"byte {name} (add-{add:g}, train counts)",
                     "perplexity": ngram_perplexity(counts, sequences, add)})
    return rows


# ---------------------------------------------------------------------------- the table


#: A column of a linear layer's input is an outlier feature when its norm over the calibration tokens exceeds
#: this multiple of the median column's (LLM.int8()'s magnitude-6 threshold, applied to the column norms).
OUTLIER_MULTIPLE = 6.0


def input_statistics(model: nn.Module, calibration: torch.Tensor) -> list[dict]:
    """Per decoder linear layer, what Wanda and SmoothQuant rely on: how uneven its input columns are.

    Wanda scores weight ``W[i, j]`` by ``|W[i, j]| * ||X_j||`` (``X_j``: input column ``j`` over the
    calibration tokens); it differs from magnitude only where the column norms differ, and it pays off where
    a few columns carry outlier features hundreds of times the median (large LLMs). Each row gives the
    largest column norm over the median, the number of outlier columns (:data:`OUTLIER_MULTIPLE`), and the
    share of weights on which Wanda's 50 % mask (per output row) equals magnitude's. The norms are measured
    as the data-aware pruners measure them (``linear_input_norms`` on the captured graph).
    """
    from fxcompress.oneshot.engine import selected_linear_sites
    from fxcompress.prune.data_aware import linear_input_norms

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the capture's notes on constant batch sizes and the causal mask's ops
        gm = fxcompress.trace(model, _example(calibration))
    targets = [site.target for site in selected_linear_sites(gm, (nn.Module,), DECODER_LINEARS, ())]
    evaluator = _calibration_evaluator(calibration)
    norms = linear_input_norms(gm, evaluator, set(targets), len(evaluator.data))
    rows = []
    for target in targets:
        columns = norms[target]
        median = columns.median()
        weight = model.get_parameter(target).detach().abs().double()
        kept = weight.shape[1] // 2
        masks = [torch.zeros_like(weight, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :kept], True)
                 for score in (weight, weight * columns)]
        rows.append({"layer": target.removesuffix(".weight"), "max_over_median": float(columns.max() / median),
                     "outlier_columns": int((columns > OUTLIER_MULTIPLE * median).sum()), "columns": len(columns),
                     "wanda_equals_magnitude": float((masks[0] == masks[1]).float().mean())})
    return rows


def _stored_integers(model: nn.Module) -> int:
    """Weight and bias elements ``fold-qdq`` stored as integer buffers (no longer parameters, still weights)."""
    return sum(t.numel() for m in model.modules() if isinstance(m, QuantizedWeights)
               for name, t in m.named_buffers(recurse=False) if name in ("weight", "bias", "bias_float"))


def run(methods: list[str], model: nn.Module, sequences: torch.Tensor, calibration: torch.Tensor,
        batch_size: int = 8, log=print, recovery: P.Recovery | None = None, train_tokens: torch.Tensor | None = None,
        recover_batch: int = 8) -> list[dict]:
    """One row per method: perplexity, its change against dense, seconds, parameters and nonzeros; with
    ``recovery``, the ``STRUCTURED`` rows also fine-tune by distillation from ``model`` on windows of
    ``train_tokens`` (``recover_batch`` x the sequences' length) and add ``recovered`` (perplexity),
    ``recovered_delta``, ``recover_seconds``, ``recover_steps`` and ``recover_trainable`` (parameters trained)."""
    if recovery is not None and train_tokens is None:
        raise ValueError("run: recovery needs the training tokens")
    rows: list[dict] = []
    dense_ppl = None
    for name in methods:
        start = time.perf_counter()
        compressed = METHODS[name](model, calibration)
        seconds = time.perf_counter() - start
        ppl = perplexity(compressed, sequences, batch_size)
        if name == "dense":
            dense_ppl = ppl
        row = {"method": name, "perplexity": ppl, "delta": None if dense_ppl is None else ppl - dense_ppl,
               "seconds": seconds, "params": count_params(compressed) + _stored_integers(compressed),
               "nonzero": count_nonzero_params(compressed) + _stored_integers(compressed),
               "recovered": None, "recovered_delta": None, "recover_seconds": None, "recover_steps": None,
               "recover_trainable": None}
        if recovery is not None and name in STRUCTURED:
            data = P.token_windows(train_tokens, recover_batch, sequences.shape[1])
            result = P.recover(compressed, model, data, recovery, log=log, log_every=25)
            row["recovered"] = perplexity(compressed, sequences, batch_size)
            row["recovered_delta"] = None if dense_ppl is None else row["recovered"] - dense_ppl
            row["recover_seconds"], row["recover_steps"] = result.seconds, result.steps
            row["recover_trainable"] = result.trainable_params
        rows.append(row)
        log(_fmt(rows[-1:]).splitlines()[-1])
    return rows


def _fmt(rows: list[dict]) -> str:
    recovered = any(r.get("recovered") is not None for r in rows)
    headers = ["method", "perplexity", "Δ vs dense", "s", "params", "nonzero"]
    if recovered:
        headers += ["recovered", "Δ recovered", "recover s", "steps"]
    table = []
    for r in rows:
        line = [r["method"], f"{r['perplexity']:.3f}", "-" if r["delta"] is None else f"{r['delta']:+.3f}",
                f"{r['seconds']:.1f}", f"{r['params']:,}", f"{r['nonzero']:,}"]
        if recovered and r.get("recovered") is None:
            line += ["-"] * 4
        elif recovered:
            line += [f"{r['recovered']:.3f}", "-" if r["recovered_delta"] is None else f"{r['recovered_delta']:+.3f}",
                     f"{r['recover_seconds']:.0f}", str(r["recover_steps"])]
        table.append(line)
    return tabulate(table, headers=headers, disable_numparse=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS).replace("%", "%%") + " (dense is always added)")
    parser.add_argument("--train-minutes", type=float, default=15.0, help="training budget, wall clock (default 15)")
    parser.add_argument("--train-steps", type=int, default=None, help="train exactly this many steps instead")
    parser.add_argument("--train-batch", type=int, default=16, help="training sequences per step (default 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak learning rate (default 2e-3)")
    parser.add_argument("--cache", default="~/.cache/fxcompress/bench_llm", help="where trained models are kept")
    parser.add_argument("--retrain", action="store_true", help="train even when the cache holds the model")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out sequences of --seq-len tokens (default 200)")
    parser.add_argument("--eval-split", choices=("test", "valid"), default="test")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sequences (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    parser.add_argument("--hidden", type=int, default=ModelSettings.hidden)
    parser.add_argument("--layers", type=int, default=ModelSettings.layers)
    parser.add_argument("--heads", type=int, default=ModelSettings.heads)
    parser.add_argument("--kv-heads", type=int, default=ModelSettings.kv_heads)
    parser.add_argument("--ffn", type=int, default=ModelSettings.ffn)
    parser.add_argument("--seq-len", type=int, default=ModelSettings.seq_len)
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, training, calibration and recovery")
    parser.add_argument("--recover-minutes", type=float, default=None,
                        help="fine-tune each structured row by distillation for this wall-clock budget (cosine over "
                             "time; with --recover-steps, a cap)")
    parser.add_argument("--recover-steps", type=int, default=None,
                        help="fine-tune each structured row for exactly this many steps (deterministic)")
    parser.add_argument("--recover-lora", type=int, default=0, metavar="RANK",
                        help="recover through LoRA adapters of this rank on the decoder linears, merged at the end "
                             "(default 0: fine-tune every weight)")
    parser.add_argument("--recover-batch", type=int, default=8, help="recovery sequences per step (default 8)")
    parser.add_argument("--recover-lr", type=float, default=P.Recovery.lr,
                        help=f"recovery's peak learning rate (default {P.Recovery.lr:g})")
    parser.add_argument("--recover-temperature", type=float, default=P.Recovery.temperature,
                        help=f"distillation temperature (default {P.Recovery.temperature:g})")
    parser.add_argument("--recover-ce", type=float, default=P.Recovery.ce_weight,
                        help=f"weight of next-token cross-entropy beside the distillation (default {P.Recovery.ce_weight:g})")
    parser.add_argument("--input-statistics", action="store_true",
                        help="print each decoder layer's input-column statistics (what Wanda and SmoothQuant rely "
                             "on) on the calibration sequences, instead of the methods' table")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the settings, training figures and rows as JSON")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - progress goes to stderr
    model_settings = ModelSettings(args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.seq_len)
    train = TrainSettings(minutes=args.train_minutes, steps=args.train_steps, batch_size=args.train_batch,
                          seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    start = time.perf_counter()
    model, info = load_or_train(model_settings, train, pathlib.Path(os.path.expanduser(args.cache)), args.retrain, log)
    corpus = stdlib_corpus()
    sequences = eval_sequences(args.n_eval, args.seq_len, args.eval_split, corpus)
    calibration = calibration_sequences(args.calibration, args.seq_len, seed=args.seed, corpus=corpus)
    if args.input_statistics:
        rows = input_statistics(model, calibration)
        print(tabulate([[r["layer"], f"{r['max_over_median']:.1f}", f"{r['outlier_columns']} / {r['columns']}",
                         f"{r['wanda_equals_magnitude']:.3f}"] for r in rows],
                       headers=["layer", "max / median column norm", f"columns > {OUTLIER_MULTIPLE:g}x median",
                                "Wanda 50% mask = magnitude's"], disable_numparse=True))
        return {"settings": vars(args), "input_statistics": rows}
    baselines = baseline_rows(corpus, sequences, eval_sequences(min(args.n_eval, 64), args.seq_len, "valid", corpus))
    methods = args.methods.split(",")
    methods = methods if "dense" in methods else ["dense", *methods]  # every Δ is against it
    recovery = None
    if args.recover_minutes is not None or args.recover_steps is not None:
        recovery = P.Recovery(steps=args.recover_steps, minutes=args.recover_minutes, lr=args.recover_lr,
                              temperature=args.recover_temperature, ce_weight=args.recover_ce, seed=args.seed,
                              adapters=P.LoRA(rank=args.recover_lora, op_names=DECODER_LINEARS) if args.recover_lora else None)
    rows = run(methods, model, sequences, calibration, args.batch_size, log, recovery, corpus.split("train"),
               args.recover_batch)
    summary = {k: v for k, v in info.items() if k != "losses"}
    print(f"model: {summary['params']:,} parameters ({args.layers} layers, hidden {args.hidden}, {args.heads} heads / "
          f"{args.kv_heads} KV heads, FFN {args.ffn}, vocab {VOCAB_SIZE}, untied); trained {summary['steps']} steps, "
          f"{summary['tokens_seen']:,} tokens, {summary['train_seconds']:.0f} s, final train loss "
          f"{summary['final_train_loss']:.3f} nats/token" + (" (cached)" if info["cached"] else ""))
    print(f"data: stdlib {corpus.digest}: {len(corpus.files['train'])}/{len(corpus.files['valid'])}/"
          f"{len(corpus.files['test'])} train/valid/test files; {args.eval_split}: {len(sequences)} x {args.seq_len} "
          f"tokens ({sequences[:, 1:].numel():,} scored); calibration {len(calibration)} x {args.seq_len} "
          f"(one-shot methods: {len(calibration_batches(calibration))} x <= {CALIBRATION_BATCH} sequences a batch)\n")
    print(tabulate([[b["baseline"], f"{b['perplexity']:.3f}"] for b in baselines], headers=["baseline", "perplexity"],
                   disable_numparse=True) + "\n")
    print(_fmt(rows))
    checks = acceptance(rows)
    for issue in dict.fromkeys(c["issue"] for c in checks):  # in ACCEPTANCE's order
        print(f"\nissue {issue}'s acceptance, from the rows above (perplexity lost against dense):")
        print("\n".join(f"  {c['text']}" for c in checks if c["issue"] == issue))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; threads {args.threads}")
    result = {"settings": dict(vars(args), calibration_batch=CALIBRATION_BATCH), "training": info, "data_digest": corpus.digest,
              "eval_tokens": sequences[:, 1:].numel(), "baselines": baselines, "rows": rows, "acceptance": checks}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
