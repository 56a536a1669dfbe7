"""Decode speed of a TinyLlama-1.1B-shaped model on CPU: fp32, bf16, int8 and int4 weight-only (fxcompress's packed
kernels) against torchao's Int8WeightOnlyConfig / Int4WeightOnlyConfig.

What is timed: one decode step of a Hugging Face ``LlamaForCausalLM``
(random weights; 22 layers, hidden 2048, 32 heads / 4 KV heads, FFN 5632,
vocab 32000 unless ``--layers`` shrinks it), batch 1, at ``--context`` tokens
of context: ``model(input_ids=<1 token>, cache=cache,
use_cache=True)`` after a prefill of ``--context`` random tokens, the KV cache
cropped back to ``--context`` after every step so that every timed step sees
the same context. That is the per-token work of ``generate()`` without its
sampling logic. Steps are timed one by one with ``time.perf_counter`` after
``--warmup`` untimed steps; tokens/s is ``1 / median``.

The variants are copies of one model: ``fp32``; ``bf16`` (``model.to(bf16)``);
``fxcompress-int8``, ``-int8-onednn``, ``-int8pack``, ``-int4`` and ``-int4pack`` = the bf16
model with every ``nn.Linear`` (``lm_head`` included) quantized
round-to-nearest and packed in place by ``fxcompress.kernels.pack_linears``,
so ``generate()`` and the cache are the model's own. int8 is symmetric per
output row, run by ``Int8WeightLinear``'s default kernel (fxcompress's native
VNNI matrix-vector kernel on activations written as two fixed-point bytes,
where the CPU has AVX-512 VNNI and a C compiler is found; else the next of
``fxcompress.kernels.INT8_KERNELS`` that runs); ``-int8-onednn`` and
``-int8pack`` force oneDNN's int8 GEMM and ``_weight_int8pack_mm``, so one run
compares the three; int4 is asymmetric in groups of ``--group-size``, run by
fxcompress's native int4 kernel where it runs (else, and in ``-int4pack``,
``aten._weight_int4pack_mm_for_cpu``). ``torchao`` rows apply
``quantize_`` with its configs to the same bf16 model. Packed variants run
bf16 activations because ``_weight_int8pack_mm`` and the int4 kernel are fast
only there (fp32 activations take a slow path, several times slower than
dense fp32). ``rel err`` compares the last prefill logits with fp32's. A
config that fails on CPU prints its error instead of figures.

Memory: each variant is rebuilt in a fresh subprocess (same seed); after the
conversion the peak resident set (``VmHWM``) is reset through
``/proc/self/clear_refs``, a few decode steps run, and the table gives the
resident set before decoding and the peak during it.

    python tools/bench_llm_speed.py                 # the full 1.1B shape, 2 threads (tens of minutes)
    python tools/bench_llm_speed.py --layers 2 --threads 1 --steps 5 --no-memory   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import inspect
import json
import statistics
import subprocess
import sys
import time

import torch
from proc_memory import reset_peak, status_bytes
from tabulate import tabulate

VARIANTS = ("fp32", "bf16", "fxcompress-int8", "fxcompress-int8-onednn", "fxcompress-int8pack", "fxcompress-int4",
            "fxcompress-int4pack", "torchao-int8", "torchao-int4")
#: ``pack_linears``' bits and kernel for those bits (None: the default) of each fxcompress variant
PACKED = {"fxcompress-int8": (8, None), "fxcompress-int8-onednn": (8, "onednn"), "fxcompress-int8pack": (8, "int8pack"),
          "fxcompress-int4": (4, None), "fxcompress-int4pack": (4, "int4pack")}


def build(layers: int, seed: int = 0):
    """The TinyLlama-1.1B-shaped ``LlamaForCausalLM`` (``layers`` decoder layers), random weights, fp32, eval."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def convert(model, variant: str, group_size: int):
    """``variant`` of ``model`` (converted in place); raises whatever a peer's config raises on CPU."""
    if variant == "fp32":
        return model
    model = model.to(torch.bfloat16)
    if variant in PACKED:
        from fxcompress.kernels import pack_linears

        bits, kernel = PACKED[variant]
        pack_linears(model, bits=bits, group_size=group_size, **{f"int{bits}_kernel": kernel})
    elif variant.startswith("torchao"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig() if variant.endswith("int8") else Int4WeightOnlyConfig(group_size))
    return model


def state_bytes(model) -> int:
    """Bytes of every parameter and buffer (a packed int4 weight counts half a byte per value)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _cache_keyword(model) -> str:
    """``cache`` where this transformers names the KV cache so (``past_key_values`` is deprecated there)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, context: int, seed: int = 1):
    from transformers import DynamicCache

    tokens = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=tokens, use_cache=True, **{_cache_keyword(model): cache})
    return out.logits[0, -1].float(), cache, out.logits[:, -1:].argmax(-1)


def decode_steps(model, cache, token, context: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` decode steps at ``context`` tokens of context (cache cropped back each time)."""
    times = []
    position = torch.tensor([[context]])
    with torch.no_grad():
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, position_ids=position, use_cache=True, **{_cache_keyword(model): cache})
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
            cache.crop(-1)  # back to `context` tokens (newer transformers take only the count to drop)
    return times


def time_variants(args) -> tuple[list[list], dict]:
    base = build(args.layers)
    rows, speeds, reference = [], {}, None
    for variant in args.variants:
        print(f"  {variant} ...", file=sys.stderr, flush=True)
        try:
            model = convert(copy.deepcopy(base), variant, args.group_size)
            logits, cache, token = prefill(model, args.context)
            decode_steps(model, cache, token, args.context, args.warmup)
            times = decode_steps(model, cache, token, args.context, args.steps)
        except Exception as exc:  # a peer config that does not run here: its exact error is the row
            rows.append([variant, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160],
                         "", "", "", ""])
            continue
        reference = logits if reference is None else reference
        median = statistics.median(times)
        speeds[variant] = 1 / median
        error = float((logits - reference).norm() / reference.norm())
        rows.append([variant, f"{1 / median:.2f}", "", f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}",
                     f"{state_bytes(model) / 2**20:.0f}", f"{error:.4f}"])
        del model, cache
        gc.collect()
    for row in rows:
        if row[0] in speeds and "fp32" in speeds:
            row[2] = f"{speeds[row[0]] / speeds['fp32']:.2f}"
    return rows, speeds


def measure_memory(args, variant: str) -> dict:
    """In this (fresh) process: build, convert, release what the conversion freed, reset the peak, decode."""
    model = convert(build(args.layers), variant, args.group_size)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the resident set is the model's
    except OSError:
        pass
    reset_peak()
    resident = status_bytes("VmRSS")
    _, cache, token = prefill(model, args.context)
    decode_steps(model, cache, token, args.context, 2)
    return {"resident": resident, "peak": status_bytes("VmHWM")}


def memory_columns(args, rows: list[list]) -> None:
    for row in rows:
        command = [sys.executable, __file__, "--measure-memory", row[0], "--layers", str(args.layers),
                   "--context", str(args.context), "--group-size", str(args.group_size), "--threads",
                   str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            row += ["", done.stderr.strip().splitlines()[-1][:80] if done.stderr.strip() else "failed"]
            continue
        found = json.loads(done.stdout.strip().splitlines()[-1])
        row += [f"{found['resident'] / 2**20:.0f}", f"{found['peak'] / 2**20:.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22: TinyLlama-1.1B's shape)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--context", type=int, default=128, help="tokens of context each decode step sees")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (32, 64, 128 or 256)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ",".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("--measure-memory", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory(args, args.measure_memory)))
        return 0
    print(f"LlamaForCausalLM, hidden 2048, {args.layers} layers, 32/4 heads, FFN 5632, vocab 32000; batch 1, "
          f"{args.context} tokens of context, {args.threads} threads, torch {torch.__version__}", file=sys.stderr)
    rows, _ = time_variants(args)
    headers = ["variant", "tokens/s", "x fp32", "step ms (min-max)", "weights MiB", "rel err vs fp32"]
    if not args.no_memory:
        memory_columns(args, rows)
        headers += ["resident MiB", "peak decode MiB"]
    print(tabulate(rows, headers=headers))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "json"}, "headers": headers,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
