"""Fault injection: every deliberately broken rule of ``tools/mutate_rules.py`` is caught by verification.

Each mutant replaces one ``RULES`` entry (monkeypatched) with a typical
mistake; compiling its model with ``verify=True`` must raise
``VerificationError``, and the table must be intact afterwards.
"""

from __future__ import annotations

import pytest

from fxcompress.rules import RULES


@pytest.fixture(scope="module")
def mutate_rules(helpers):
    return helpers.load_tool("mutate_rules")



def test_catalogue_has_at_least_30_mutants_across_op_families(mutate_rules):
    mutants = mutate_rules.MUTANTS
    assert len(mutants) >= 30
    assert len({m.name for m in mutants}) == len(mutants)
    assert len({m.key for m in mutants}) >= 20


@pytest.mark.parametrize("index", range(45))
def test_mutant_is_killed_by_verification(mutate_rules, index):
    mutant = mutate_rules.MUTANTS[index]
    before = dict(RULES._rules)
    killed, why = mutate_rules.is_killed(mutant)
    assert killed, f"mutant {mutant.name!r} survived: {why}"
    assert RULES._rules == before


def test_catalogue_size_matches_parametrisation(mutate_rules):
    assert len(mutate_rules.MUTANTS) == 45


def test_unmutated_models_compile_and_agree(mutate_rules, helpers):
    """Under the real rules every mutant's model compiles and shrunk agrees with masked: a kill is the mutant's doing.

    All but one also lose parameters: softmax over channels freezes every channel, which is exactly what its
    forgotten-freeze mutant gets wrong. Norms and means over channels prune (statistics over kept channels).
    """
    frozen = {"softmax module unfrozen"}
    import torch

    from fxcompress.prune import L1Norm

    for mutant in mutate_rules.MUTANTS:
        torch.manual_seed(0)
        model, x = mutant.model().eval(), torch.randn(*mutant.shape)
        masked, small = helpers.compile_pair(model, x, L1Norm(0.5))
        pruned = helpers.count_params(small) < helpers.count_params(model)
        assert pruned is (mutant.name not in frozen), mutant.name
        helpers.outputs_agree(masked, small, [x])
