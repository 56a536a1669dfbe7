"""The NNI config_list adapter maps every supported key onto the typed pruners."""

from __future__ import annotations

import pytest
from torch import nn

from fxcompress import ConfigError
from fxcompress import prune as P


def test_per_layer_ratio_with_op_types_and_exclusions():
    pruner = P.from_config_list(
        [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "exclude_op_names": ["conv1"]},
         {"op_names": ["fc2"], "exclude": True}],
        criterion="fpgm",
    )
    assert pruner == P.FPGM(0.5, op_types=(nn.Conv2d,), exclude=("conv1", "fc2"))


def test_total_sparsity_means_global_allocation_with_a_cap():
    pruner = P.from_config_list([{"op_names": ["conv*"], "total_sparsity": 0.6, "max_sparse_ratio": 0.8}])
    assert isinstance(pruner, P.L1Norm)
    assert pruner.allocation is P.Allocation.GLOBAL and pruner.max_sparsity_per_layer == 0.8
    assert pruner.op_names == ("conv*",)


def test_granularity_selects_level_or_nm_and_several_entries_combine():
    pruner = P.from_config_list([
        {"op_types": ["Linear"], "sparsity_per_layer": 0.9, "granularity": "default"},
        {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "2:4"},
    ])
    assert isinstance(pruner, P.Combined)
    level, nm = pruner.pruners
    assert level == P.LevelPruner(0.9, op_types=(nn.Linear,))
    assert (nm.n, nm.m, nm.op_types) == (2, 4, (nn.Conv2d,))


def test_criterion_options_reach_data_aware_pruners():
    ev = P.Evaluator([], loss=lambda m, b: b)
    pruner = P.from_config_list([{"sparse_ratio": 0.3}], criterion="taylor", evaluator=ev, num_batches=2)
    assert isinstance(pruner, P.Taylor) and pruner.evaluator is ev and pruner.num_batches == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ([{"sparse_ratio": 0.5, "sparsity_typo": 1}], "unknown keys \\['sparsity_typo'\\]"),
        ([{"op_types": ["Conv9d"], "sparse_ratio": 0.5}], "'Conv9d' is not a torch.nn module"),
        ([{"op_types": ["Conv2d"]}], "exactly one of sparse_ratio"),
        ([{"sparse_ratio": 0.5, "sparsity": 0.4}], "only one of them"),
        ([{"sparse_ratio": 0.5, "granularity": "block"}], "granularity 'block'"),
        ([{"op_names": ["fc"], "exclude": True}], "no entry that prunes"),
        ({"sparse_ratio": 0.5}, "list of dictionaries"),
    ],
)
def test_bad_config_lists_are_clear_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        P.from_config_list(config)
