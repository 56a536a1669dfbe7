"""GPTQ through fxcompress on a TinyLlama-1.1B-shaped decoder, by depth: wall time and peak memory.

    python tools/gptq_scale.py                        # 2, 4, 8 and 22 layers, 1 thread
    python tools/gptq_scale.py --layers 2,4 --no-pack --json gptq.json

The model is :func:`bench_llm_speed.build`'s Hugging Face ``LlamaForCausalLM``
with random weights in TinyLlama-1.1B's shape (hidden 2048, 32 query heads
sharing 4 key/value heads, FFN 5632, vocabulary 32000, untied head,
``--layers`` decoder layers; 22 is the real depth, 1.1 B parameters, 4.1 GiB
in fp32). The compile is

    fxcompress.compile(model, tokens[:1],
                       [OneShot(GPTQ(bits=4, group_size=128, exclude=("lm_head",)), data, pack=True)],
                       verify=False)

on ``--sequences`` random sequences of ``--tokens`` tokens (one batch each):
capture through ``torch.export``, then the layer-sequential engine quantizes
every decoder linear layer (act-order, static groups) and packs each into an
int4 kernel module as soon as it is done (``--no-pack`` keeps the dense
quantized weights instead, as ``OneShot`` without ``pack`` does).

Each depth runs in a fresh process: the model is built, the peak resident set
(``VmHWM``) is reset through ``/proc/self/clear_refs`` and the compile runs
once. *wall s* is its wall time; *peak RSS* is the whole process's peak during
the compile, the user's model (1x its weights) and PyTorch and transformers
themselves (about 0.6 GiB) included, also as a multiple of the fp32 weights.
*int4 layers* counts the packed modules in the result and *model kept* says
whether the user's model still holds its original weights. Linux only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from proc_memory import depth_sweep, in_fresh_process, reset_peak, status_bytes
from tabulate import tabulate

DEPTHS = (2, 4, 8, 22)


def measure(args) -> dict:
    """Build the model, run GPTQ once, and return the figures of one table row (run in a fresh process)."""
    import torch
    from bench_llm_speed import build

    import fxcompress
    from fxcompress.kernels import PackedLinear
    from fxcompress.oneshot import GPTQ
    from fxcompress.passes import OneShot

    torch.set_num_threads(args.threads)
    model = build(args.measure)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    probe = model.model.layers[0].mlp.down_proj.weight
    before = probe.detach()[::64].clone()  # a sample of rows, to check the model still holds them
    tokens = torch.randint(0, model.config.vocab_size, (args.sequences, args.tokens),
                           generator=torch.Generator().manual_seed(1))
    data = tuple(tokens.split(1))
    algorithm = GPTQ(bits=args.bits, group_size=args.group_size, exclude=("lm_head",))
    reset_peak()  # the peak from here on
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxcompress.compile(model, tokens[:1], [OneShot(algorithm, data, progress=False, pack=args.pack)],
                                    verify=False)
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    return {
        "layers": args.measure,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights,
        "wall_s": seconds,
        "peak_rss_bytes": peak,
        "rss_after_bytes": status_bytes("VmRSS"),
        "packed_layers": sum(isinstance(m, PackedLinear) for m in result.modules()),
        "quantized_layers": len(result.meta.get(fxcompress.meta.WEIGHT_GRIDS, {})),
        "model_kept": bool(torch.equal(probe.detach()[::64], before)),
        "pack": args.pack,
        "threads": args.threads,
    }


def run_depth(layers: int, args) -> dict:
    """:func:`measure` in a fresh interpreter, so that every depth's peak is its own."""
    command = [sys.executable, __file__, "--measure", str(layers), "--threads", str(args.threads),
               "--sequences", str(args.sequences), "--tokens", str(args.tokens), "--bits", str(args.bits),
               "--group-size", str(args.group_size)] + ([] if args.pack else ["--no-pack"])
    return in_fresh_process(command, f"{layers} layers")


def table(rows: list[dict]) -> str:
    gib = 2**30
    body = [[r["layers"], f"{r['params'] / 1e6:.0f} M", f"{r['wall_s']:.1f}", f"{r['wall_s'] / r['layers']:.1f}",
             f"{r['weights_bytes'] / gib:.2f}", f"{r['peak_rss_bytes'] / gib:.2f}",
             f"{r['peak_rss_bytes'] / r['weights_bytes']:.2f}", f"{r['rss_after_bytes'] / gib:.2f}",
             r["packed_layers"] if r["pack"] else f"- ({r['quantized_layers']} dense)", "yes" if r["model_kept"] else "NO"]
            for r in rows]
    headers = ["layers", "params", "wall s", "s / layer", "weights GiB", "peak RSS GiB", "peak / weights",
               "RSS after GiB", "int4 layers", "model kept"]
    return tabulate(body, headers=headers, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=",".join(map(str, DEPTHS)), help="comma-separated depths")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (GPTQ's column sweep is many small ops: on a shared 2-core "
                             "machine one thread is faster than two)")
    parser.add_argument("--sequences", type=int, default=4, help="calibration sequences (one batch each)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--no-pack", dest="pack", action="store_false",
                        help="keep the dense quantized weights (OneShot without pack=True)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure(args)))
        return 0
    print(table(depth_sweep(args.layers, lambda layers: run_depth(layers, args), "wall_s", args.json)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
