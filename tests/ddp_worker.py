"""One rank of the distributed fine-tuning check in ``tests/test_distributed.py`` (issue 17, "Scale out").

Run as ``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py OUT_DIR``.
Every rank builds the same models from the same seed, compiles them with fxcompress, wraps each in
``DistributedDataParallel`` or shards it with FSDP2 (``fully_shard``; gloo, CPU), fine-tunes a few steps
on a batch of its own, and writes ``OUT_DIR/rank{RANK}.pt``: per scenario the state dict before and after
(under FSDP, the full state dict gathered from the shards), the training losses, the loss on its batch
after the last step, and facts the test checks (or the traceback when the scenario failed).
"""

from __future__ import annotations

import sys
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

STEPS = 4
#: a rank whose partner died raises after this instead of waiting forever (a safety net, not synchronisation)
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
TINY_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 128, "max_position_embeddings": 64, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": None}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cnn(masked: bool):
    from fxcompress.passes import InsertMasks, PropagateChannels, standard_pruning

    import fxcompress
    from fxcompress.examples import SmallCNN
    from fxcompress.prune import L1Norm

    torch.manual_seed(0)  # the same model on every rank
    model = SmallCNN(8, 16, 32)
    passes = [InsertMasks(L1Norm(0.5)), PropagateChannels()] if masked else standard_pruning(L1Norm(0.5))
    gm = fxcompress.compile(model, torch.randn(2, 1, 28, 28), passes)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(100 + rank)  # a batch of this rank's own
    batch = (torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))

    def loss(module, batch):
        x, y = batch
        return F.cross_entropy(module(x), y)

    return gm, batch, loss, lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _llama(exclude: tuple[str, ...] = ()):
    """A tiny Llama pruned by half and written back; layers matching ``exclude`` keep their widths."""
    import transformers
    from fxcompress.passes import standard_pruning

    import fxcompress
    from fxcompress.prune import L1Norm

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    ids = torch.randint(3, 128, (1, 8))
    mine = fxcompress.compile(model, {"input_ids": ids}, standard_pruning(L1Norm(0.5, exclude=exclude)),
                              output="module")
    g = torch.Generator().manual_seed(200 + dist.get_rank())
    batch = torch.randint(3, 128, (4, 16), generator=g)

    def loss(module, ids):
        return module(input_ids=ids, labels=ids).loss

    return mine, batch, loss, lambda params: torch.optim.Adam(params, lr=1e-2)


def _masked_llama_graph():
    """A tiny Llama captured by ``torch.export`` (it reads its weights with ``get_attr``), masked by half."""
    import transformers
    from fxcompress.passes import InsertMasks, PropagateChannels

    import fxcompress
    from fxcompress.examples_llm import logits_of
    from fxcompress.prune import L1Norm

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    gm = fxcompress.compile(model, (torch.randint(3, 128, (2, 16)),), [InsertMasks(L1Norm(0.5)), PropagateChannels()])
    g = torch.Generator().manual_seed(300 + dist.get_rank())
    batch = torch.randint(3, 128, (4, 16), generator=g)

    def loss(module, ids):
        logits = logits_of(module(ids))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return gm, batch, loss, lambda params: torch.optim.Adam(params, lr=1e-2)


def _masks(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{qualified name: (mask, the value the last forward read)}`` of every masked tensor."""
    from fxcompress.masks import own_masks

    return {f"{path}.{name}".lstrip("."): (mask.detach().clone(), getattr(module, name).detach().clone())
            for path, module in model.named_modules() for name, mask in own_masks(module).items()}


def _fine_tune(model: nn.Module, batch, loss_fn, optimizer) -> dict:
    before = _state(model)
    model.train()
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters and buffers
    opt = optimizer(ddp.parameters())
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(ddp, batch)
        opt.zero_grad()
        loss.backward()  # gradients averaged across ranks
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        # the loss after the last step, on the bare model: a forward of ``ddp`` without grad would stop
        # it from syncing buffers at its next forward (DDP's ``require_forward_param_sync``)
        final = loss_fn(model, batch).item()
        # train-mode forwards update batch-norm statistics from each rank's own batch; DDP broadcasts
        # rank 0's buffers at the start of a forward, so one eval-mode forward leaves all in sync
        ddp.eval()
        loss_fn(ddp, batch)
    return {"before": before, "after": _state(model), "losses": losses, "final_loss": final}


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers a Hugging Face model calls (none for a captured graph, which calls no submodule)."""
    if isinstance(model, torch.fx.GraphModule):
        return []
    return list(model.model.layers)


def _fine_tune_sharded(model: nn.Module, batch, loss_fn, optimizer) -> dict:
    """FSDP2: each decoder layer its own unit, then the root; the full state dict gathered on every rank.

    ``full_state_dict=True`` without ``cpu_offload`` gives every rank the whole tensors (with
    ``cpu_offload=True`` only rank 0 gets them), so the test can compare what both ranks gathered.
    A captured graph reads its weights with ``get_attr`` and calls no submodule, so FSDP's per-module
    hooks would never unshard a layer's parameters: the graph is one unit, sharded at the root.
    """
    before = _state(model)
    model.train()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = optimizer(model.parameters())
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(model, batch)
        opt.zero_grad()
        loss.backward()  # gradients reduce-scattered: each rank keeps the mean over ranks of its shard's
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = loss_fn(model, batch).item()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {"before": before, "after": {k: v.detach().clone() for k, v in full.items()}, "losses": losses,
            "final_loss": final, "sharded_type": type(model).__name__}


def _reloads_gathered_state(model: nn.Module, saved: Path, batch, state: dict) -> dict:
    """Load the gathered state into a fresh model of the saved widths; its logits against the sharded model's."""
    from fxcompress.writeback import WIDTHS_KEY, from_pretrained

    fresh = from_pretrained(saved)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        gap = (fresh(input_ids=batch).logits - model(input_ids=batch).logits).abs().max().item()
    return {"fresh_type": type(fresh).__name__, "logits_gap": gap, "widths": getattr(fresh.config, WIDTHS_KEY, None)}


def _run(name: str, build, out: Path, fine_tune=_fine_tune) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, batch, loss_fn, optimizer = build()
        result = {"type": type(model).__name__, "graph": isinstance(model, torch.fx.GraphModule),
                  "masks_before": _masks(model)}
        saved = out / name
        if name == "fsdp_llama":  # saved before training (transformers writes on rank 0 only), rebuilt after it
            if dist.get_rank() == 0:
                model.save_pretrained(saved)
            dist.barrier()
        result.update(fine_tune(model, batch, loss_fn, optimizer))
        if name == "fsdp_llama":
            result.update(_reloads_gathered_state(model, saved, batch, result["after"]))
        result["masks_after"] = _masks(model)
        if name in ("llama", "fsdp_llama"):
            result["config"] = {k: getattr(model.config, k) for k in
                                ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")}
        if name == "masked_cnn":  # the fine-tuned masked model still shrinks to an equivalent one (verified)
            import fxcompress

            model.eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = fxcompress.shrink(model)
            result["shrunk_widths"] = (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features)
        return result
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        return {"error": traceback.format_exc()}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        results = {"world_size": dist.get_world_size()}
        for name, build, fine_tune in (
                ("cnn", lambda: _cnn(masked=False), _fine_tune), ("masked_cnn", lambda: _cnn(masked=True), _fine_tune),
                ("llama", _llama, _fine_tune),
                # layer 1 keeps its widths: per-layer widths, recorded in the config
                ("fsdp_llama", lambda: _llama(exclude=("model.layers.1.*",)), _fine_tune_sharded),
                ("fsdp_masked_llama", _masked_llama_graph, _fine_tune_sharded)):
            results[name] = _run(name, build, out, fine_tune)
        torch.save(results, out / f"rank{dist.get_rank()}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
