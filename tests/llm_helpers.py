"""Shared helpers of the LLM recovery tests: a tiny Llama trained a few steps on the standard library."""

import copy
import functools

from fxcompress.examples_llm import TrainSettings, stdlib_corpus, tiny_llama, tiny_llama_config, train_lm

CONFIG = dict(hidden=32, layers=3, heads=4, kv_heads=2, ffn=64, seq_len=32)


def trained_teacher():
    """A tiny Llama trained 8 steps on the standard library (a teacher with something to teach); a fresh copy."""
    return copy.deepcopy(_trained_teacher())


@functools.cache
def _trained_teacher():
    model = tiny_llama(tiny_llama_config(**CONFIG), seed=0)
    train_lm(model, stdlib_corpus().split("train")[:200_000],
             TrainSettings(steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2))
    return model.eval()
