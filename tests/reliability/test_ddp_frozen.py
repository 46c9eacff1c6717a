"""torch.distributed, ranks that freeze (requires_grad=False) different parameters of what an estimator trains, or
whose step trains nothing on one rank (tests/reliability/_ddp_frozen.py runs them in two gloo processes).

Before, a rank with nothing to train returned from its update before the ranks' check, and the others waited in it
until the group's timeout: RELAX / REBAR / LAX with every parameter of the control variate frozen on one rank, or
whose step there had only credit=False costs; score with a baseline= module frozen at construction on one rank (its
has_update False: it joined no check). Ranks that froze different parameters of one shape raised nothing and trained
apart. Now every rank reaches the check: ranks that freeze different parameters raise StorchError on every rank,
naming what each has frozen; a rank whose step trains nothing adds zeros to the ranks' mean (as the global batch's
data points that no credited cost reaches).
"""

from __future__ import annotations

import math

import pytest
import torch

import _ddp
import _ddp_frozen
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 2
BETA1 = 0.9  # Adam's (the estimators' own optimizer): exp_avg = β1·m + (1 - β1)·gradient


ranks = _gloo.ranks_fixture(_ddp_frozen.worker, WORLD, "ddp_frozen")


VARIANCE = "averaging the control variate's variance gradients (frozen, requires_grad=False: "


@pytest.mark.parametrize("case, kind, n", [
    ("relax_all", "Relax(control_variate='rebar+network', lr=0.01, update=True)", 6),  # η, λ and the network's 4
    ("rebar_all_first", "Rebar(lr=0.01, update=True)", 2),  # before the first update
    ("lax_all", "Lax(lr=0.01, update=True)", 4),  # its default network's 4, after the step that built it
])
def test_a_control_variate_frozen_on_one_rank_raises_on_every_rank(ranks, case, kind, n):
    # before: gloo's timeout on rank 0 (waiting in the average), and the worker died
    _ddp.assert_refused_on_every_rank(ranks, case, f"{kind} {VARIANCE}none)", f"{kind} {VARIANCE}all {n} parameters)")
    assert "frozen with requires_grad=False" in ranks[0][case][1]


def test_control_variates_frozen_apart_raise_on_every_rank_naming_them(ranks):
    # η frozen on rank 0, λ on rank 1: one scalar each, the same layout (before: no error, rank 0 stepped λ and rank 1
    # η, and they held different control variates from then on)
    kind = "Rebar(lr=0.01, update=True)"
    _ddp.assert_refused_on_every_rank(ranks, "rebar_some", f"{kind} {VARIANCE}eta)", f"{kind} {VARIANCE}log_temperature)")


def test_a_control_variate_frozen_on_every_rank_is_no_error(ranks):
    (k0, s0), (k1, s1) = ranks[0]["rebar_all_everywhere"], ranks[1]["rebar_all_everywhere"]
    assert k0 == k1 == "ok", (s0, s1)
    for s in (s0, s1):  # nothing trained, nothing changed
        assert int(s["update_steps"]) == 0 and float(s["eta"]) == 1.0 and float(s["log_temperature"]) == math.log(0.5), s


@pytest.mark.parametrize("name, n", [("relax", 6), ("lax", 4)])
def test_a_rank_whose_step_trains_nothing_adds_zeros_to_the_mean(ranks, name, n):
    """Rank 1's cost has credit=False: ∂φ Σ ĝ² = 0 there. The ranks take one step, the same, along rank 0's gradient
    divided by W² (the mean over the ranks, then by W: the global batch's Σ ĝ², whose ĝ per point is ĝ_rank / W); rank
    0's gradient is read from the same step taken alone (synchronisation off, the same state and draws)."""
    (k0, s0), (k1, s1) = ranks[0][f"{name}_uncredited"], ranks[1][f"{name}_uncredited"]
    assert k0 == k1 == "ok", (s0, s1)
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
    before, local = ranks[0][f"{name}_uncredited_before"], ranks[0][f"{name}_uncredited_local"]
    assert int(before["update_steps"]) == 1 and int(s0["update_steps"]) == int(local["update_steps"]) == 2
    # rank 1 alone trains nothing in that step: no Adam step (as in one process)
    assert int(ranks[1][f"{name}_uncredited_local"]["update_steps"]) == 1
    moments = [key for key in s0 if key.endswith("exp_avg")]
    assert len(moments) == n
    nonzero = 0
    for key in moments:
        synced = (s0[key] - BETA1 * before[key]) / (1 - BETA1)
        alone = (local[key] - BETA1 * before[key]) / (1 - BETA1)
        torch.testing.assert_close(synced, alone / WORLD ** 2, rtol=1e-3, atol=1e-9)
        nonzero += int((alone.abs() > 1e-6).any())
    assert nonzero >= 2  # (a gradient to compare: RELAX's η, λ and network, LAX's network's layers)


def test_no_rank_training_anything_takes_no_step(ranks):
    # every rank's cost with credit=False: no error, and φ and Adam's moments as they were (as in one process)
    for r in range(WORLD):
        kind, after = ranks[r]["relax_uncredited_everywhere"]
        before = ranks[r]["relax_uncredited_everywhere_before"]
        assert kind == "ok", after
        assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in after), r


SCORE = "Score(baseline='callable', lr=0.05, update=True) broadcasting the trained parameters (rank 0's)"


@pytest.mark.parametrize("case, second", [
    ("score_frozen_built", "Score(baseline='callable', frozen='every parameter, at construction (never trained)', "
                           "update=False) skipping its update"),
    ("score_frozen_built_no_update", "Score(baseline='callable', update=False) skipping its update"),
])
def test_a_score_baseline_frozen_at_construction_on_one_rank_raises_on_every_rank(ranks, case, second):
    # rank 1's has_update is False (decided at construction): it joins the ranks' check where it skips the update, as
    # an estimator built with update=False does (before: it joined none, and rank 0 waited until the timeout)
    _ddp.assert_refused_on_every_rank(ranks, case, SCORE, second)


def test_a_score_baseline_frozen_at_construction_on_every_rank_is_no_error(ranks):
    for r in range(WORLD):
        kind, params = ranks[r]["score_frozen_built_everywhere"]
        assert kind == "ok", params
        assert all(float(p) == 0.0 for p in params.values()), params


def test_score_baselines_frozen_apart_raise_on_every_rank_naming_them(ranks):
    # one of the module's two scalars frozen on each rank, another (the same layout; before f-ddp4: no error, and each
    # rank trained another parameter)
    kind = "Score(baseline='callable', lr=0.05, update=True) averaging score's learned baseline gradients"
    _ddp.assert_refused_on_every_rank(ranks, "score_some", f"{kind} (frozen, requires_grad=False: a)",
                                      f"{kind} (frozen, requires_grad=False: c)")


@pytest.mark.parametrize("baseline", ["moving_average", "learned"])
def test_scores_state_with_a_rank_whose_step_trains_nothing(ranks, baseline):
    # (score had no early return there: a control for the relaxed family's case)
    case = f"score_uncredited_{baseline}"
    assert ranks[0][case] == ranks[1][case] == ("ok", True), (ranks[0][case], ranks[1][case])


def _gradient(state: dict, before: dict, name: str) -> torch.Tensor:
    """The gradient that one Adam step stepped ``name`` along, read from its first moment (linear in it)."""
    return (state[f"exp_avg.{name}"] - BETA1 * before[f"exp_avg.{name}"]) / (1 - BETA1)


def test_nvil_with_a_rank_whose_only_cost_is_uncredited_steps_as_the_credited_data_alone(ranks):
    """Rank 1's only cost has credit=False: the global batch's regression is a mean over rank 0's data points alone,
    the regression rank 0 takes by itself (synchronisation off, the same state and draws): its ψ, Adam moments and c.
    Before, rank 1 added zeros to the mean: the step along half that gradient (exp_avg's part (1 - β1)·g/2)."""
    (k0, s0), (k1, s1) = ranks[0]["nvil_uncredited_one"], ranks[1]["nvil_uncredited_one"]
    assert k0 == k1 == "ok", (s0, s1)
    local, before = ranks[0]["nvil_uncredited_one_local"], ranks[0]["nvil_uncredited_one_before"]
    assert s0.keys() == s1.keys() == local.keys()
    assert int(s0["update_steps"]) == int(before["update_steps"]) + 1
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
        torch.testing.assert_close(s0[key], local[key], rtol=1e-6, atol=1e-9, msg=key)
    grads = [_gradient(local, before, key[len("exp_avg."):]) for key in local if key.startswith("exp_avg.")]
    assert len(grads) == 4 and max(float(g.abs().max()) for g in grads) > 1e-3  # (a gradient to compare)


def test_nvil_heads_average_over_the_ranks_whose_costs_credit_them(ranks):
    """Two costs, "rec" credited on both ranks and "b" on rank 0 alone (credit=False on rank 1): head "rec" steps along
    the mean of the ranks' gradients (the global batch's mean over both shards), head "b" along rank 0's alone (the
    global batch's credited "b" data points are rank 0's); each rank's gradient read from the same step taken alone.
    Before, head "b" stepped along half of rank 0's gradient."""
    (k0, s0), (k1, s1) = ranks[0]["nvil_uncredited_two"], ranks[1]["nvil_uncredited_two"]
    assert k0 == k1 == "ok", (s0, s1)
    before = ranks[0]["nvil_uncredited_two_before"]
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key
        assert torch.equal(before[key], ranks[1]["nvil_uncredited_two_before"][key]), key
    alone = [ranks[r]["nvil_uncredited_two_local"] for r in range(WORLD)]
    names = [key[len("exp_avg."):] for key in s0 if key.startswith("exp_avg.")]
    assert {n.split(".")[2] for n in names} == {"cost_rec", "cost_b"} and len(names) == 8, names
    for name in names:
        synced = _gradient(s0, before, name)
        if ".cost_b." in name:
            expected = _gradient(alone[0], before, name)
            # rank 1 alone regressed nothing on head "b" (no Adam moment change there)
            assert torch.equal(alone[1][f"exp_avg.{name}"], before[f"exp_avg.{name}"]), name
        else:
            expected = (_gradient(alone[0], before, name) + _gradient(alone[1], before, name)) / WORLD
        assert float(expected.abs().max()) > 0 or "0.weight" in name or "0.bias" in name, name
        torch.testing.assert_close(synced, expected, rtol=1e-4, atol=1e-8, msg=name)


def test_a_module_frozen_at_construction_and_update_false_on_another_rank_is_no_error(ranks):
    # neither rank trains its baseline: the ranks' check compares state options and update=False only (before, it
    # refused them: rank 0's note "frozen at construction" differed from rank 1's update=False)
    for r in range(WORLD):
        kind, params = ranks[r]["score_frozen_built_and_no_update"]
        assert kind == "ok", params
        assert all(float(p) == 0.0 for p in params.values()), params
