"""torch.distributed, ranks that disagree (tests/reliability/_ddp_mismatch.py runs them in two gloo processes).

Each storch collective is preceded by one small check of what every rank is about to run (the estimator's
class, the options that give its state its meaning and those that change how it evolves: decay, lr, update;
what it averages) and of the values' layout: ranks with different estimators or such options, or a rank whose
step has no costs or no data, or whose estimator was built with update=False, while the others update their
estimators, raise a StorchError on EVERY rank; before, one rank raised or went on while the other waited
forever in a collective. Different cost names are not an error (each is averaged over the ranks that have it).
"""

from __future__ import annotations

import pytest
import torch

import _ddp
import _ddp_mismatch
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 2


ranks = _gloo.ranks_fixture(_ddp_mismatch.worker, WORLD, "ddp_mismatch")


MA = "Score(baseline='moving_average', decay=0.9, update=True)"


@pytest.mark.parametrize("case, first, second", [
    ("nvil", MA, "Score(baseline='learned', decay=0.9, lr=0.01, update=True)"),
    ("nvil_built", MA, "Score(baseline='learned', decay=0.9, lr=0.01, update=True)"),
    ("relax", MA, "Relax("),
    # (before: no error, and the ranks' buffers differed from the first step)
    ("mapo_buffer", "SumAndSampleSequences(buffer=2, eos=None)", "SumAndSampleSequences(buffer=3, eos=None)"),
    # options that change how the state evolves (before: no error, the ranks' states drifted apart)
    ("decay", f"{MA} averaging moving averages", "Score(baseline='moving_average', decay=0.5, update=True) averaging"),
    ("nvil_lr", "Score(baseline='learned', decay=0.9, lr=0.01, update=True) broadcasting",
     "Score(baseline='learned', decay=0.9, lr=0.02, update=True) broadcasting"),
    ("relax_lr", "Relax(control_variate='rebar+network', lr=0.01, update=True)",
     "Relax(control_variate='rebar+network', lr=0.02, update=True)"),
    # update=False on one rank (before: the other rank waited in its update's collective until the timeout)
    ("update_ma", f"{MA} averaging moving averages",
     "Score(baseline='moving_average', update=False) skipping its update (update=False)"),
    # the same through storch.surrogate_loss().backward() (before: a hang)
    *[(f"update_ma_surrogate{order}", f"{MA} averaging moving averages",
       "Score(baseline='moving_average', update=False) skipping its update (update=False)")
      for order in (1, 2)],
    ("update_relax", "Relax(control_variate='rebar+network', lr=0.01, update=True) broadcasting the trained parameters",
     "Relax(control_variate='rebar+network', update=False) skipping its update"),
])
def test_different_estimators_raise_on_every_rank(ranks, case, first, second):
    _ddp.assert_refused_on_every_rank(ranks, case, first, second)


FROZEN = "averaging score's learned baseline gradients (frozen, requires_grad=False: "


MODULE = "Score(baseline='callable', lr=0.05, update=True)"


@pytest.mark.parametrize("case, kind, n, heads", [
    ("frozen_module_first", MODULE, 1, ""), ("frozen_module", MODULE, 1, ""),
    ("frozen_nvil", "Score(baseline='learned', decay=0.9, lr=0.05, update=True)", 4, "; heads: cost_rec")])
def test_a_baseline_frozen_on_one_rank_raises_on_every_rank(ranks, case, kind, n, heads):
    """The baseline= module (or NVIL's heads) frozen on rank 1 alone: every rank raises, naming what each has frozen
    (before: rank 1 skipped the regression before the ranks' check, and rank 0 waited in it until the timeout)."""
    _ddp.assert_refused_on_every_rank(ranks, case, f"{kind} {FROZEN}none{heads})",
                                      f"{kind} {FROZEN}all {n} parameters{heads})")
    assert "frozen with requires_grad=False" in ranks[0][case][1]


def test_a_baseline_frozen_on_one_rank_with_update_false_everywhere_is_no_error(ranks):
    # no rank updates, whatever is frozen (before: rank 0 alone in the check of a skipped update, until the timeout)
    assert ranks[0]["frozen_update_none"] == ranks[1]["frozen_update_none"] == ("ok", None), (
        ranks[0]["frozen_update_none"], ranks[1]["frozen_update_none"])


def test_a_baseline_frozen_at_construction_on_one_rank_raises_on_every_rank(ranks):
    # rank 1's estimator never updates (has_update False): it declares update=False (and that its module was frozen
    # at construction) and joins the check of a skipped update, where rank 0's update waits (before: rank 1 declared
    # nothing and joined none; rank 0 waited until the timeout)
    _ddp.assert_refused_on_every_rank(
        ranks, "frozen_at_construction", f"{MODULE} broadcasting",
        "Score(baseline='callable', frozen='every parameter, at construction (never trained)', update=False) skipping")


def test_a_baseline_frozen_on_every_rank_is_no_error(ranks):
    assert ranks[0]["frozen_everywhere"] == ranks[1]["frozen_everywhere"] == ("ok", 0.0), (
        ranks[0]["frozen_everywhere"], ranks[1]["frozen_everywhere"])


@pytest.mark.parametrize("case", ["update_none", "update_none_decay", "update_none_relax_lr"])
def test_update_false_on_every_rank_is_no_error(ranks, case):
    """Every rank skips its update: they agree (one check, on the first step), and no average is kept. Their decay
    or lr may differ then (review r-30: refused as different estimators, although no state evolves)."""
    assert ranks[0][case] == ranks[1][case] == ("ok", {}), (ranks[0][case], ranks[1][case])


@pytest.mark.parametrize("case", ["no_costs", "no_costs_first"])
def test_a_rank_without_costs_raises_on_every_rank(ranks, case):
    kind, message = ranks[1][case]  # the rank without costs: its own error, saying why and what the others ran
    assert kind == "StorchError" and "the graph has no costs" in message, message
    assert "every rank must register costs in every step" in message, message
    assert f"rank 0: {MA} averaging moving averages" in message, message
    kind, message = ranks[0][case]  # the others: no longer waiting in their moving average's collective
    assert kind == "StorchError" and "rank 1: a step with no costs" in message, message


def test_a_step_without_costs_of_an_unsynchronised_estimator_raises_on_its_rank_alone(ranks):
    kind, message = ranks[0]["no_costs_local"]
    assert kind == "StorchError" and message.startswith("the graph has no costs"), message
    assert "torch.distributed" not in message, message


def test_no_rank_with_costs_is_the_one_process_error_on_every_rank(ranks):
    for r in range(WORLD):
        kind, message = ranks[r]["no_costs_all"]
        assert kind == "StorchError" and message.startswith("the graph has no costs"), message


def test_an_empty_shard_raises_on_every_rank_with_the_distributed_advice(ranks):
    kind, message = ranks[1]["empty"]  # its own error
    assert kind == "PlateError" and "would hold 0 data points" in message, message
    assert "skipping the step on one rank hangs the others" in message, message
    assert "DistributedSampler(drop_last=True)" in message and "Skip empty batches" not in message, message
    kind, message = ranks[0]["empty"]
    assert kind == "StorchError" and "rank 1: a step with no costs or no data" in message, message


def test_different_cost_names_are_each_averaged_over_the_ranks_that_have_them(ranks):
    (k0, ma0), (k1, ma1) = ranks[0]["names"], ranks[1]["names"]
    assert k0 == k1 == "ok", (ma0, ma1)
    assert set(ma0) == set(ma1) == {"rec", "other"}
    for key in ma0:
        assert torch.equal(ma0[key], ma1[key])
    assert ranks[0]["after"] == ranks[1]["after"] == ("ok", True)


def test_an_empty_shard_in_evaluation_under_no_grad_raises_on_its_rank_alone(ranks):
    """Under torch.no_grad() no rank runs an estimator's collective: the rank with the empty shard raises the
    one-process error at once, and the others finish their evaluation (nobody waits)."""
    kind, message = ranks[1]["empty_eval"]
    assert kind == "PlateError" and "Skip empty batches" in message, message
    assert "torch.distributed" not in message, message
    assert ranks[0]["empty_eval"][0] == "ok", ranks[0]["empty_eval"]
