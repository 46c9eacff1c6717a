"""torch.distributed and ``storch.compile``: a rank whose estimator was built with update=False, while the others
update theirs (tests/reliability/_ddp_compiled.py runs them in two gloo processes).

Each replayed call of a compiled step runs the estimators' updates at its ``.backward()``; a rank whose estimator
skips its update joins the ranks' check there, in the graph's order, so that EVERY rank raises a StorchError that
names what each ran. Before, the compile recorder kept only the updating estimators: the skipping rank never
joined the check, and the other waited in its update's collective until the group's timeout.
"""

from __future__ import annotations

import pytest
import torch

import _ddp
import _ddp_compiled
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 2


ranks = _gloo.ranks_fixture(_ddp_compiled.worker, WORLD, "ddp_compiled")


@pytest.mark.parametrize("case, first, second", [
    ("update_ma", "Score(baseline='moving_average', decay=0.9, update=True) averaging moving averages",
     "Score(baseline='moving_average', update=False) skipping its update (update=False)"),
    # (RELAX's first collective at its first update: rank 0's η, λ and network broadcast, test_ddp_initial_values.py)
    ("update_relax", "Relax(control_variate='rebar+network', lr=0.01, update=True) broadcasting the trained parameters",
     "Relax(control_variate='rebar+network', update=False) skipping its update (update=False)"),
    # a step with two surrogates, the first after an update=False estimator only (_ddp_compiled.TwoSurrogates): the
    # returned one's record holds both estimators (before, the first's record was kept: rank 0 raised at its trace,
    # "more than one surrogate loss", and rank 1's returned surrogate never reached the probe)
    ("two_surrogates_update_b", "Score(baseline='moving_average', decay=0.9, update=True) averaging moving averages",
     "Score(baseline='moving_average', update=False) skipping its update (update=False)"),
])
def test_update_false_on_one_rank_in_a_compiled_step_raises_on_every_rank(ranks, case, first, second):
    _ddp.assert_refused_on_every_rank(ranks, case, first, second)


def test_update_false_on_every_rank_in_a_compiled_step_is_no_error(ranks):
    assert ranks[0]["update_none"] == ranks[1]["update_none"] == ("ok", {}), (ranks[0]["update_none"],
                                                                             ranks[1]["update_none"])


def test_two_surrogates_the_first_with_skipped_updates_only_compile_as_in_one_process(ranks):
    # the same model on both ranks (estimator a: update=False, b: update=True): one process compiles it (its first
    # surrogate records nothing); before, two processes raised "builds more than one surrogate loss" at the trace
    # (the first surrogate had recorded a's skipped update)
    (k0, averages0), (k1, averages1) = ranks[0]["two_surrogates"], ranks[1]["two_surrogates"]
    assert k0 == k1 == "ok", (ranks[0]["two_surrogates"], ranks[1]["two_surrogates"])
    assert list(averages0) == ["b"] and torch.equal(averages0["b"], averages1["b"]), (averages0, averages1)
