"""Head, FFN and hidden-size pruning across transformer families: equivalence, size, MACs and CPU latency.

Every model is built from a config with random weights (no downloads), pruned
with ``L1Norm(0.5)`` on every prunable group — which for a transformer means
half of the attention heads of every layer (query, key, value and output
projection together, grouped-query-attention groups kept whole), half of
every FFN's hidden channels and, with ``--hidden prune`` (the default), half
of the hidden size (the residual stream: embeddings, every block's output
projections, the LayerNorm/RMSNorm widths; statistics over the kept channels)
— shrunk, and checked: the shrunk model must reproduce the masked model to
1e-4 of the output's scale. ``--hidden keep`` excludes the embedding layer
from the selection, which keeps the residual width. The ``hidden`` column is
the residual width before and after. A hidden size that reaches a graph
output (``BertModel``'s ``last_hidden_state``) is kept whatever the option.

    python tools/zoo_transformers.py                 # realistic sizes (BERT-base, sequence 128)
    python tools/zoo_transformers.py --size tiny     # seconds; what the tests run
    python tools/zoo_transformers.py --models bert --hidden keep --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch import nn

import fxcompress
from fxcompress.passes import standard_pruning
from fxcompress.pipeline import VerifyOutputs
from fxcompress.prune import L1Norm
from fxcompress.report import count_macs, count_params, measure_latencies

__all__ = ["MODELS", "run_one", "main"]


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[str], nn.Module]
    inputs: Callable[[str], tuple]
    frontend: str
    #: the layer that writes the residual stream first (its path; ``--hidden keep`` excludes it)
    embedding: str
    #: which dim of ``embedding.weight`` is the hidden size
    hidden_dim: int = 1


def _hf(config_name: str, model_name: str, tiny: dict, base: dict) -> Callable[[str], nn.Module]:
    def build(size: str) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**(tiny if size == "tiny" else base))
        return getattr(transformers, model_name)(config).eval()

    return build


def _tokens(size: str) -> tuple:
    return (torch.randint(0, 1000, (1, 16 if size == "tiny" else 128), generator=torch.Generator().manual_seed(0)),)


def _image(side_tiny: int, side_base: int = 224) -> Callable[[str], tuple]:
    return lambda size: (torch.randn(1, 3, *(2 * [side_tiny if size == "tiny" else side_base]),
                                     generator=torch.Generator().manual_seed(0)),)


def _torchvision(name: str, tiny: dict) -> Callable[[str], nn.Module]:
    """A torchvision model by name; ``tiny`` are constructor arguments of its class for the tiny size."""
    def build(size: str) -> nn.Module:
        import torchvision

        if size != "tiny":
            return torchvision.models.get_model(name, weights=None).eval()
        cls_name, kwargs = tiny["cls"], {k: v for k, v in tiny.items() if k != "cls"}
        return getattr(torchvision.models, cls_name)(**kwargs).eval()

    return build


TINY_LM = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=256, vocab_size=1000)
MODELS: dict[str, Case] = {
    "bert": Case(_hf("BertConfig", "BertModel", TINY_LM, {}), _tokens, "export", "embeddings.word_embeddings"),
    "gpt2": Case(
        _hf("GPT2Config", "GPT2LMHeadModel",
            dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, use_cache=False, bos_token_id=0, eos_token_id=0),
            dict(use_cache=False)),
        _tokens, "export", "lm_head"),  # wte is tied to lm_head, which the exported graph reads
    "llama-gqa": Case(
        _hf("LlamaConfig", "LlamaForCausalLM", dict(TINY_LM, num_key_value_heads=2, use_cache=False),
            dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000, use_cache=False)),
        _tokens, "export", "model.embed_tokens"),
    "hf-vit": Case(
        _hf("ViTConfig", "ViTForImageClassification", dict(TINY_LM, image_size=32, patch_size=8), {}),
        _image(32), "export", "vit.embeddings.patch_embeddings.projection", 0),
    "vit_b_16": Case(_torchvision("vit_b_16", dict(cls="VisionTransformer", image_size=32, patch_size=8, num_layers=2,
                                                   num_heads=4, hidden_dim=128, mlp_dim=256)), _image(32), "fx",
                     "conv_proj", 0),
    "swin_t": Case(_torchvision("swin_t", dict(cls="SwinTransformer", patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                               num_heads=[2, 4], window_size=[4, 4])), _image(32), "fx",
                   "features.0.0", 0),
}


def _hidden_size(model: nn.Module, case: Case) -> int:
    return model.get_parameter(f"{case.embedding}.weight").shape[case.hidden_dim]


def run_one(name: str, size: str = "base", runs: int = 10, latency: bool = True, hidden: str = "prune") -> dict:
    """Prune one model, verify, measure; returns one table row as a dict."""
    case = MODELS[name]
    torch.manual_seed(0)
    model = case.build(size)
    inputs = case.inputs(size)
    verifier = VerifyOutputs(inputs, rtol=1e-4)
    pruner = L1Norm(0.5, exclude=(case.embedding,) if hidden == "keep" else ())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxcompress.compile(model, inputs, standard_pruning(pruner), verify=False, hooks=[verifier],
                                   frontend=case.frontend)
    seconds = time.perf_counter() - start
    row = {
        "model": name,
        "frontend": case.frontend,
        "compile_s": seconds,
        "max_rel_error": verifier.errors.get("shrink", float("nan")),
        "params_ratio": count_params(model) / count_params(small),
        "macs_ratio": count_macs(model, inputs) / count_macs(small, inputs),
        "hidden": f"{_hidden_size(model, case)} -> {_hidden_size(small, case)}",
    }
    if latency:
        dense_t, small_t = measure_latencies([model, small], inputs, runs=runs, warmup=2, threads=2)
        row["latency_ratio"] = dense_t.median_ms / small_t.median_ms
        row["dense_ms"], row["shrunk_ms"] = dense_t.median_ms, small_t.median_ms
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--size", choices=("tiny", "base"), default="base")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model (median reported)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--hidden", choices=("prune", "keep"), default="prune",
                        help="prune the hidden size (residual width) too, or keep it")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(run_one(name, args.size, args.runs, latency=not args.no_latency, hidden=args.hidden))
        except Exception as exc:  # one broken model must not hide the others
            rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        print(tabulate([rows[-1]], headers="keys", floatfmt=".3g"), flush=True)
    print("\n" + tabulate(rows, headers="keys", floatfmt=".3g"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
