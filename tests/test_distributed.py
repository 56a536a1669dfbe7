"""Issue 17, "Scale out": pruned models fine-tune under ``torch.distributed`` (DDP and FSDP, gloo, CPU).

One ``torchrun --standalone --nproc-per-node 2`` launch (``tests/ddp_worker.py``) runs every scenario on
both ranks. Under DDP: a shrunk ``GraphModule`` (``SmallCNN``), a masked one (``InsertMasks`` +
``PropagateChannels``, masks as ``torch.nn.utils.prune`` re-parametrisation), and a tiny
``LlamaForCausalLM`` written back with ``output="module"``. Each rank trains on a batch of its own; the
tests check that the gradient averaging left both ranks with identical weights that moved from where they
started, and that the loss went down.

Under FSDP: FSDP2 (``torch.distributed.fsdp.fully_shard``) runs on CPU with gloo in torch 2.14, so it is
the one tested (FSDP1 is not). A written-back Llama with per-layer widths (layer 0 pruned, layer 1 not)
is sharded per decoder layer, then at the root; after training, the full state dict gathered from the
shards (``get_model_state_dict(..., StateDictOptions(full_state_dict=True))``) is the same on both ranks
and loads into a fresh model of the saved widths (``writeback.from_pretrained``) that gives the sharded
model's logits. A masked ``torch.export`` graph of the Llama is sharded at its root (a captured graph
calls no submodule, so per-layer units would never be unsharded) and keeps its zeros while its masked
weights train.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' reports, from one 2-process launch."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    # --standalone: a rendezvous on localhost with a port the OS picks, so parallel runs never collide;
    # the timeout only turns a hung launch into a failure
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    reports = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    return reports


def _scenario(ranks: list[dict], name: str) -> list[dict]:
    results = [r[name] for r in ranks]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}, {name}:\n{result['error']}"
    return results


def _check_training(results: list[dict]) -> None:
    r0, r1 = results
    assert r0["after"].keys() == r1["after"].keys() == r0["before"].keys()
    different = [k for k in r0["after"] if not torch.equal(r0["after"][k], r1["after"][k])]
    assert not different, f"ranks disagree on {different}"
    assert r0["losses"][0] != r1["losses"][0]  # each rank trained on a batch of its own
    moved = [k for k, v in r0["before"].items() if v.is_floating_point() and not torch.equal(v, r0["after"][k])]
    assert moved, "no weight moved"
    for rank, result in enumerate(results):
        assert result["final_loss"] < result["losses"][0], f"rank {rank}: loss {result['losses']} -> " \
                                                            f"{result['final_loss']}"


def test_shrunk_graph_module_fine_tunes_under_ddp(ranks):
    results = _scenario(ranks, "cnn")
    assert results[0]["graph"] and not results[0]["masks_before"]
    assert results[0]["after"]["conv1.weight"].shape[0] == 4  # shrunk: half of conv1's 8 channels left
    _check_training(results)
    assert all(not torch.equal(results[0]["before"][k], results[0]["after"][k])
               for k in ("conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"))


def _check_masks_kept(result: dict, before: dict) -> None:
    """Same masks as before training, each masking something, masked entries still zero, the rest trained."""
    assert result["masks_after"].keys() == before.keys()
    for name, (mask, value) in result["masks_after"].items():
        assert torch.equal(mask, before[name][0]), f"{name}: mask changed"
        assert not mask.all(), f"{name}: nothing masked"
        assert (value[~mask.bool()] == 0).all(), f"{name}: a masked weight moved off zero"
        assert not torch.equal(value, before[name][1]), f"{name}: did not train"


def test_masked_graph_module_keeps_its_zeros_under_ddp(ranks):
    results = _scenario(ranks, "masked_cnn")
    assert results[0]["graph"]
    _check_training(results)
    before, after = results[0]["masks_before"], results[0]["masks_after"]
    assert "conv1.weight" in before and "fc1.weight" in before
    for result in results:
        _check_masks_kept(result, before)
        assert result["shrunk_widths"] == (4, 8, 16)  # the fine-tuned masked model shrinks, outputs verified
    assert all(torch.equal(after[k][1], results[1]["masks_after"][k][1]) for k in after)


def test_written_back_llama_fine_tunes_under_ddp(ranks):
    results = _scenario(ranks, "llama")
    assert results[0]["type"] == "LlamaForCausalLM" and not results[0]["graph"]
    assert results[0]["config"] == {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                                    "intermediate_size": 64}
    _check_training(results)


def test_written_back_llama_with_per_layer_widths_fine_tunes_under_fsdp(ranks):
    results = _scenario(ranks, "fsdp_llama")
    r0 = results[0]
    assert r0["type"] == "LlamaForCausalLM" and r0["sharded_type"] == "FSDPLlamaForCausalLM"
    assert r0["after"]["model.layers.0.mlp.down_proj.weight"].shape == (64, 64)  # pruned by half
    assert r0["after"]["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)  # excluded: dense
    assert r0["widths"]["model.layers.0.mlp.down_proj"] == {"in_features": 64, "out_features": 64}
    _check_training(results)  # the gathered full state dicts are identical on both ranks
    for rank, result in enumerate(results):
        assert result["fresh_type"] == "LlamaForCausalLM"
        assert result["logits_gap"] < 1e-5, f"rank {rank}: reloaded logits differ by {result['logits_gap']}"


def test_masked_llama_graph_keeps_its_zeros_under_fsdp(ranks):
    """The graph reads its masked weights with ``get_attr``: they must train (gradients through the mask),
    and the entries the masks remove stay zero."""
    results = _scenario(ranks, "fsdp_masked_llama")
    assert results[0]["graph"] and results[0]["sharded_type"].startswith("FSDP")
    _check_training(results)
    before = results[0]["masks_before"]
    assert "model.layers.0.mlp.gate_proj.weight" in before and "model.embed_tokens.weight" in before
    for result in results:
        _check_masks_kept(result, before)
