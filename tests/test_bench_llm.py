"""The LLM benchmark's data split, perplexity, tiny-LM training and a short run of ``tools/bench_llm.py``."""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import pathlib
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from fxcompress import examples_llm as L  # noqa: E402 - after the skip

torch.set_num_threads(2)
TINY = ["--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--ffn", "64", "--seq-len", "64"]


def _bench():
    if "bench_llm" in sys.modules:
        return sys.modules["bench_llm"]
    spec = importlib.util.spec_from_file_location("bench_llm", pathlib.Path(__file__).parents[1] / "tools" / "bench_llm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_llm"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_split_is_deterministic_and_holds_out_whole_files():
    first, again = L.stdlib_corpus(), L.stdlib_corpus.__wrapped__()  # the second reads the files anew
    assert first.digest == again.digest and first.files == again.files
    train, valid, test = (set(first.files[k]) for k in ("train", "valid", "test"))
    assert train and valid and test
    assert not (train & test) and not (train & valid) and not (valid & test)
    ordered = sorted(train | valid | test)
    assert [p for i, p in enumerate(ordered) if i % 10 == 0] == list(first.files["test"])
    assert not any(part in L.SKIPPED_DIRS for p in ordered for part in pathlib.PurePosixPath(p).parts[:-1])
    assert int((first.split("test") == L.EOS).sum()) == len(test)  # one end-of-file per held-out file
    assert torch.equal(L.eval_sequences(5, 64), L.eval_sequences(5, 64))
    assert torch.equal(L.calibration_sequences(3, 64, seed=1), L.calibration_sequences(3, 64, seed=1))
    assert not torch.equal(L.calibration_sequences(3, 64, seed=1), L.calibration_sequences(3, 64, seed=2))


class _Bigram(nn.Module):
    """Logits from a fixed table indexed by the current token; refuses batch 1 as an exported graph may."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> dict:
        assert ids.shape[0] != 1
        return {"logits": self.table[ids]}


def test_perplexity_is_exp_of_the_mean_nll_computed_by_hand():
    table = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]])
    sequences = torch.tensor([[0, 1, 2], [1, 1, 0], [2, 1, 1]])
    nll = []
    for seq in sequences.tolist():
        for prev, nxt in zip(seq[:-1], seq[1:]):
            row = table[prev].tolist()
            nll.append(-(row[nxt] - math.log(sum(math.exp(v) for v in row))))
    # batch 2 leaves a last batch of one, which joins the one before it
    assert L.perplexity(_Bigram(table), sequences, batch_size=2) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    assert L.mean_nll(_Bigram(table), sequences, batch_size=2)[1] == 6


def test_ngram_baselines_score_the_same_positions_as_perplexity():
    bench = _bench()
    train, sequences = torch.tensor([0, 1, 0, 1, 1]), torch.tensor([[0, 1, 1]])
    unigram = bench.ngram_counts(train, 1)
    assert unigram[:3].tolist() == [2, 3, 0]
    p1 = (3 + 1) / (5 + L.VOCAB_SIZE)  # add-one: both scored tokens are 1
    assert bench.ngram_perplexity(unigram, sequences, 1.0) == pytest.approx(1 / p1)
    bigram = bench.ngram_counts(train, 2)  # pairs 0>1 twice, 1>0 once, 1>1 once
    p_01, p_11 = (2 + 1) / (2 + L.VOCAB_SIZE), (1 + 1) / (2 + L.VOCAB_SIZE)
    assert bench.ngram_perplexity(bigram, sequences, 1.0) == pytest.approx((p_01 * p_11) ** -0.5)


def test_tiny_llama_trains_deterministically_with_gqa():
    config = L.tiny_llama_config(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seq_len=64)
    tokens = L.stdlib_corpus().split("train")[:50_000]
    settings = L.TrainSettings(steps=8, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=2)
    runs = [L.train_lm(L.tiny_llama(config), tokens, settings) for _ in range(2)]
    assert runs[0].losses == runs[1].losses and runs[0].tokens_seen == 8 * 4 * 64
    assert sum(runs[0].losses[-2:]) < sum(runs[0].losses[:2]) - 0.5
    model = L.tiny_llama(config)
    assert model.model.layers[0].self_attn.k_proj.out_features * 2 == model.model.layers[0].self_attn.q_proj.out_features


def test_short_run_prints_the_table_and_reuses_the_cached_model(tmp_path, capsys):
    bench = _bench()
    args = TINY + ["--train-steps", "3", "--n-eval", "4", "--calibration", "4", "--cache", str(tmp_path)]
    result = bench.main(args + ["--methods", "dense,magnitude-50%,magnitude-2:4"])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "magnitude-50%", "magnitude-2:4"]
    assert rows["dense"]["delta"] == 0 and rows["dense"]["nonzero"] == rows["dense"]["params"]
    linear = sum(p.numel() for n, p in L.tiny_llama(L.tiny_llama_config(32, 2, 4, 2, 64, 64)).named_parameters()
                 if n.endswith("proj.weight"))
    for name in ("magnitude-50%", "magnitude-2:4"):  # half of every decoder linear weight, nothing else
        assert rows[name]["params"] == rows["dense"]["params"]
        assert rows[name]["nonzero"] == rows["dense"]["params"] - linear // 2
        assert math.isfinite(rows[name]["perplexity"])
    assert result["eval_tokens"] == 4 * 63 and not result["training"]["cached"]
    table = capsys.readouterr().out
    assert all(name in table for name in rows) and "byte unigram" in table
    again = bench.main(args + ["--methods", "dense"])
    assert again["training"]["cached"] and again["rows"][0]["perplexity"] == rows["dense"]["perplexity"]


@pytest.mark.slow  # 4 s: every one-shot row of the tool
def test_one_shot_rows_compress_every_decoder_linear_and_the_acceptance_checks_are_computed():
    from fxcompress import meta
    from fxcompress.report import count_nonzero_params, count_params
    from fxcompress.trace import fetch_attr

    bench = _bench()
    model = L.tiny_llama(L.tiny_llama_config(32, 2, 4, 2, 64, 64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = L.calibration_sequences(18, 64)
    assert [len(b) for b in bench.calibration_batches(calibration)] == [16, 2]
    linears = {f"{n}.weight": m.weight for n, m in model.named_modules() if n.endswith("_proj")}
    assert len(linears) == 14
    assert all(any(fnmatch.fnmatchcase(n[: -len(".weight")], p) for p in bench.DECODER_LINEARS) for n in linears)

    sparse = bench.METHODS["wanda-50%"](model, calibration)
    for target, weight in linears.items():  # half of each row of every decoder linear, nothing else
        kept = fetch_attr(sparse, target).detach() != 0
        assert (kept.sum(1) == weight.shape[1] // 2).all(), target
    assert count_params(sparse) == count_params(model)
    assert count_nonzero_params(sparse) == count_params(model) - sum(w.numel() for w in linears.values()) // 2

    quantized = bench.METHODS["gptq-w4g128"](model, calibration)
    grids = quantized.meta[meta.WEIGHT_GRIDS]
    assert set(grids) == set(linears)  # lm_head stays in float
    for target, grid in grids.items():
        weight = fetch_attr(quantized, target).detach()
        assert grid.bits == 4 and grid.group_size == min(128, weight.shape[1]) and grid.holds(weight), target
    assert torch.equal(fetch_attr(quantized, "lm_head.weight"), model.lm_head.weight)
    folded = bench.METHODS["smoothquant-w8a8-a0.5-qdq"](model, calibration)
    stored = [m for m in folded.modules() if type(m).__name__ == "QuantizedWeights"]
    assert len(stored) == 14 and all(m.weight.dtype == torch.int8 for m in stored)  # lm_head stays in float
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model is untouched

    rows = [{"method": name, "delta": delta} for name, delta in (
        ("dense", 0.0), ("magnitude-50%", 3.0), ("wanda-50%", 0.6), ("sparsegpt-50%", 1.5), ("magnitude-2:4", 0.0),
        ("sparsegpt-2:4", 0.1), ("rtn-w4g128", 1.0), ("gptq-w4g128", 0.5), ("w8a8", 0.2),
        ("smoothquant-w8a8-a0.5", 0.25))]
    checks = {c["method"] + " vs " + c["baseline"]: c for c in bench.acceptance(rows)}
    assert {k: (c["ratio"], c["met"]) for k, c in checks.items()} == {
        "wanda-50% vs magnitude-50%": (pytest.approx(0.2), True),
        "sparsegpt-50% vs magnitude-50%": (pytest.approx(0.5), False),
        "sparsegpt-2:4 vs magnitude-2:4": (None, None),  # magnitude lost nothing: no fraction of it to judge
        "gptq-w4g128 vs rtn-w4g128": (pytest.approx(0.5), True),  # at the target is within it
        "smoothquant-w8a8-a0.5 vs w8a8": (pytest.approx(1.25), False)}
    assert checks["wanda-50% vs magnitude-50%"]["text"].startswith(
        "Wanda loses 0.20 of what magnitude loses at 50 % (+0.600 vs +3.000 perplexity; target ≤ 1/3): met")
    assert [c["method"] for c in bench.acceptance(rows[:3])] == ["wanda-50%"]  # a check needs both of its rows


def test_help_prints_though_method_names_hold_percent_signs(capsys):
    with pytest.raises(SystemExit):
        _bench().parse_args(["--help"])  # method names hold "%", which argparse's help must not read as formats
    assert "(dense is always added)" in " ".join(capsys.readouterr().out.split())


def test_structured_rows_recover_by_distillation_and_leave_the_dense_model_alone():
    from fxcompress.prune import Recovery

    bench = _bench()
    model = L.tiny_llama(L.tiny_llama_config(32, 2, 4, 2, 64, 64)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sequences, calibration = L.eval_sequences(4, 64), L.calibration_sequences(4, 64)
    rows = bench.run(["dense", "l1-width-25%", "depth-50%"], model, sequences, calibration, log=lambda line: None,
                     recovery=Recovery(steps=2), train_tokens=L.stdlib_corpus().split("train")[:100_000],
                     recover_batch=2)
    dense, width, depth = rows
    assert dense["recovered"] is None and dense["recover_steps"] is None  # only structured rows fine-tune
    assert width["recover_steps"] == depth["recover_steps"] == 2
    assert all(math.isfinite(r["recovered"]) and r["recovered"] != r["perplexity"] for r in (width, depth))
    assert width["recovered_delta"] == pytest.approx(width["recovered"] - dense["perplexity"])
    assert 0.70 < width["params"] / dense["params"] < 0.80
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert depth["params"] == dense["params"] - layer  # one of the two layers
    assert bench.layers_to_remove(6, 0.25) == 2 and bench.layers_to_remove(2, 0.5) == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher is untouched
    assert "recovered" in bench._fmt(rows) and "recovered" not in bench._fmt([dict(dense, recovered=None)])


def test_issue_17s_checks_judge_the_best_recovered_25_percent_row_and_activation_against_l1():
    bench = _bench()
    rows = [{"method": m, "perplexity": p, "delta": p - 4.0, "recovered": r} for m, p, r in (
        ("dense", 4.0, None), ("l1-width-25%", 5.0, 4.5), ("act-width-25%", 4.6, 4.3), ("depth-25%", 6.0, 4.35),
        ("l1-width-50%", 9.0, None), ("act-width-50%", 9.5, None))]
    checks = [c for c in bench.acceptance(rows) if c["issue"] == 17]
    assert [(c["method"], c["met"]) for c in checks] == [
        ("act-width-25%", True), ("act-width-25%", True), ("act-width-50%", False)]
    assert checks[0]["ratio"] == pytest.approx(4.3 / 4.0) and checks[0]["baseline"] == "dense"
    assert checks[0]["text"].startswith("The best 25 % row recovered (act-width-25%) is 1.075x dense's perplexity")
    rows[2]["recovered"] = 4.5  # 1.125x: now depth-25% (4.35) is the best, and within 10 %
    assert bench.acceptance(rows)[0]["method"] == "depth-25%"
    rows[3]["recovered"] = 4.45
    assert bench.acceptance(rows)[0]["met"] is False
    assert [c["issue"] for c in bench.acceptance(rows[:4])] == [17, 17]  # no 50 % rows, no check at 50 %


def test_input_statistics_find_an_outlier_column_and_where_wanda_departs_from_magnitude():
    """One input feature made 50x louder (the RMSNorm weight before the attention) is counted as an outlier in
    the q/k/v projections' inputs, and Wanda's mask departs further from magnitude's there."""
    bench = _bench()
    model = L.tiny_llama(L.tiny_llama_config(hidden=32, layers=1, heads=4, kv_heads=2, ffn=64, seq_len=16), seed=0).eval()
    calibration = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {r["layer"]: r for r in bench.input_statistics(model, calibration)}
    assert set(before) == {f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                           "mlp.down_proj")}
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] *= 50
    after = {r["layer"]: r for r in bench.input_statistics(model, calibration)}
    q = "model.layers.0.self_attn.q_proj"
    assert before[q]["outlier_columns"] == 0 and after[q]["outlier_columns"] == 1 and after[q]["columns"] == 32
    assert after[q]["max_over_median"] > 20 > before[q]["max_over_median"]
    assert after[q]["wanda_equals_magnitude"] < before[q]["wanda_equals_magnitude"]
