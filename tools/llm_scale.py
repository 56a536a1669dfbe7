"""Compile time and peak memory of structured pruning on a TinyLlama-1.1B-shaped decoder, by depth.

    python tools/llm_scale.py                       # 2, 4, 8, 16 and 22 layers, 2 threads
    python tools/llm_scale.py --layers 2,22 --json scale.json

The model is a Hugging Face ``LlamaForCausalLM`` with random weights in
TinyLlama-1.1B's shape: hidden 2048, 32 query heads sharing 4 key/value heads,
FFN 5632, vocabulary 32000, untied head, ``--layers`` decoder layers (22 is the
real depth, 1.1 B parameters, 4.1 GiB in fp32). The compile is
``fxcompress.compile(model, {"input_ids": (2, 16) tokens},
standard_pruning(L1Norm(0.5, exclude=("model.embed_tokens",))), verify=False)``:
half of the attention heads go in whole GQA groups (each key/value head with its
four query heads) and half of every FFN's channels; the residual width stays
because the embedding is excluded. The table checks that the result has exactly
those widths.

Each depth runs in a fresh process: the model is built, then the peak resident
set (``VmHWM``) is reset through ``/proc/self/clear_refs`` and the compile runs
once. *Compile s* is its wall time (capture through ``torch.export``, analysis,
masks, shrink); *peak RSS* is the whole process's peak during the compile
(PyTorch and transformers themselves, about 0.8 GiB, included), also as a
multiple of the fp32 weights. Linux only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from proc_memory import depth_sweep, in_fresh_process, reset_peak, status_bytes
from tabulate import tabulate

DEPTHS = (2, 4, 8, 16, 22)
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 2048, 32, 4, 5632, 32000


def measure(layers: int, threads: int) -> dict:
    """Build the model, compile it once, and return the figures of one table row (run in a fresh process)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxcompress
    from fxcompress.passes import standard_pruning
    from fxcompress.prune import L1Norm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=VOCAB)
    model = LlamaForCausalLM(config).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = {"input_ids": torch.randint(0, VOCAB, (2, 16))}
    reset_peak()  # the peak from here on
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(model, tokens, standard_pruning(L1Norm(0.5, exclude=("model.embed_tokens",))),
                                   verify=False)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    shapes = {name: tuple(p.shape) for name, p in small.named_parameters()}
    layer = "model.layers.0"
    return {
        "layers": layers,
        "params": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in small.parameters()),
        "weights_bytes": weights,
        "compile_s": seconds,
        "peak_rss_bytes": peak,
        "query_heads_after": shapes[f"{layer}.self_attn.q_proj.weight"][0] // (HIDDEN // HEADS),
        "kv_heads_after": shapes[f"{layer}.self_attn.k_proj.weight"][0] // (HIDDEN // HEADS),
        "ffn_after": shapes[f"{layer}.mlp.up_proj.weight"][0],
        "hidden_after": shapes["model.embed_tokens.weight"][1],
    }


def run_depth(layers: int, threads: int) -> dict:
    """:func:`measure` in a fresh interpreter, so that every depth's peak is its own."""
    return in_fresh_process([sys.executable, __file__, "--measure", str(layers), "--threads", str(threads)],
                            f"{layers} layers")


def table(rows: list[dict]) -> str:
    gib = 2**30
    body = [[r["layers"], f"{r['params'] / 1e6:.0f} M", f"{r['params_after'] / 1e6:.0f} M",
             f"{r['query_heads_after']}/{r['kv_heads_after']}", r["ffn_after"], f"{r['compile_s']:.1f}",
             f"{r['compile_s'] / r['layers']:.2f}", f"{r['weights_bytes'] / gib:.2f}", f"{r['peak_rss_bytes'] / gib:.2f}",
             f"{r['peak_rss_bytes'] / r['weights_bytes']:.2f}"] for r in rows]
    headers = ["layers", "params", "after", "heads q/kv after", "FFN after", "compile s", "s / layer",
               "weights GiB", "peak RSS GiB", "peak / weights"]
    return tabulate(body, headers=headers, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=",".join(map(str, DEPTHS)), help="comma-separated depths")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.threads)))
        return 0
    print(table(depth_sweep(args.layers, lambda layers: run_depth(layers, args.threads), "compile_s", args.json)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
