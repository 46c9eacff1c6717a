"""torch.distributed: the ranks' check of an estimator's declared options (tests/reliability/_ddp_declared_options.py
runs them in two gloo processes).

Before each of its collectives storch checks that every rank runs the same estimator with the same
``state_options()`` and ``evolution_options()``, the public hooks of the estimator protocol: a third party's
estimator with state declares them as the first-party ones do, and ranks that differ raise a StorchError on EVERY
rank naming the option (before, the hooks were private: a third party's ranks drifted apart silently, or one waited
forever). An estimator built with update=False joins the check once; a copy of it (copy.deepcopy, pickle) is
another estimator and joins it again (before, the copy carried the "checked" flag: a hang).
"""

from __future__ import annotations

import pytest

import _ddp
import _ddp_declared_options
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 2


ranks = _gloo.ranks_fixture(_ddp_declared_options.worker, WORLD, "ddp_declared_options")


def test_a_third_party_estimator_with_the_same_declared_options_on_every_rank_is_averaged(ranks):
    (k0, (mean0, agree0)), (k1, (mean1, agree1)) = ranks[0]["same"], ranks[1]["same"]
    assert k0 == k1 == "ok" and agree0 and agree1, (ranks[0]["same"], ranks[1]["same"])
    assert mean0 == mean1 != 0.0  # (averaged over the ranks, whose shards differ)


@pytest.mark.parametrize("case, first, second", [
    # evolution_options(): how the state evolves
    ("decay", "RunningMeanScore(decay=0.9, target='total', update=True) averaging mean costs",
     "RunningMeanScore(decay=0.5, target='total', update=True) averaging mean costs"),
    # state_options(): what the state means
    ("target", "RunningMeanScore(decay=0.9, target='total', update=True)",
     "RunningMeanScore(decay=0.9, target='rec', update=True)"),
    # evolution_options() == {"update": False}: the rank joins the check where its update would run
    ("update", "RunningMeanScore(decay=0.9, target='total', update=True) averaging mean costs",
     "RunningMeanScore(target='total', update=False) skipping its update (update=False)"),
])
def test_a_third_party_estimators_declared_options_that_differ_are_refused_on_every_rank(ranks, case, first, second):
    _ddp.assert_refused_on_every_rank(ranks, case, first, second)


@pytest.mark.parametrize("case", ["deepcopy", "pickle"])
def test_a_copy_of_a_checked_update_false_estimator_joins_the_check_again(ranks, case):
    assert ranks[0][f"{case}_checked"] == ranks[1][f"{case}_checked"] == ("ok", None)
    _ddp.assert_refused_on_every_rank(
        ranks, case, "Score(baseline='moving_average', decay=0.9, update=True) averaging moving averages",
        "Score(baseline='moving_average', update=False) skipping its update (update=False)")
