"""torch.distributed: REBAR / RELAX ranks built with other initial values of what their update trains, and score's
``baseline=`` module initialised per rank (tests/reliability/_ddp_initial_values.py runs them in two gloo processes).

``temperature=`` and ``eta=`` are initial values of parameters the update trains (a checkpoint's trained values
replace them), so they are not compared across ranks as options are; a ``network=`` may be initialised from a per-rank
seed. At its first update every rank's parameters become rank 0's (as DDP's broadcast at wrapping does for a module's),
then the ranks take the same Adam step. Before, each rank trained on from its own values, silently.
"""

from __future__ import annotations

import math

import pytest
import torch

import _ddp_initial_values
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 2
LR = 0.01  # the estimators' default: Adam's first step moves each parameter by at most about this


ranks = _gloo.ranks_fixture(_ddp_initial_values.worker, WORLD, "ddp_initial_values")


def _same_on_every_rank(ranks, case: str) -> dict:
    (k0, p0), (k1, p1) = ranks[0][case], ranks[1][case]
    assert k0 == k1 == "ok", (ranks[0][case], ranks[1][case])
    assert p0.keys() == p1.keys()
    for name in p0:
        assert torch.equal(p0[name], p1[name]), (name, p0[name], p1[name])
    return p0


@pytest.mark.parametrize("case, name, rank_0s", [
    ("rebar_temperature", "log_temperature", math.log(0.5)),  # rank 1: log(0.3)
    ("relax_eta", "eta", 1.0),  # rank 1: 2.0
])
def test_a_trained_initial_value_that_differs_starts_from_rank_0s_on_every_rank(ranks, case, name, rank_0s):
    params = _same_on_every_rank(ranks, case)
    # rank 0's value, one Adam step on (rank 1's is 0.5 or 1.0 away)
    assert abs(float(params[name]) - rank_0s) <= 1.01 * LR, float(params[name])


def test_a_network_initialised_from_a_per_rank_seed_starts_from_rank_0s_on_every_rank(ranks):
    params = _same_on_every_rank(ranks, "relax_network")
    assert any(name.startswith("network.") for name in params), list(params)


def test_ranks_that_differ_in_plain_direct_gradient_train_one_phi(ranks):
    # the option changes the plate layout (5 or 3 blocks) and the direct-path part of the control variate, neither
    # the meaning of η, λ and their moments (state_options) nor their step, the ranks' mean of ∂φ Σ ĝ² with one lr
    # (evolution_options): the ranks run the same collectives and hold the same φ, one Adam step from η = 1
    params = _same_on_every_rank(ranks, "rebar_plain_direct")
    assert 0 < abs(float(params["eta"]) - 1.0) <= 1.01 * LR, float(params["eta"])


def test_a_score_baseline_module_initialised_per_rank_starts_from_rank_0s_on_every_rank(ranks):
    # a user's baseline= module outside DDP, built at 0 on rank 0 and 1 on rank 1: the regression averages ψ's
    # gradient, never ψ (before: 0.10 and 1.10 after two steps, one step 0.05 and 1.05)
    params = _same_on_every_rank(ranks, "score_module")
    assert abs(float(params["baseline_fn.b"])) <= 1.01 * 0.05, float(params["baseline_fn.b"])


def test_nvil_heads_built_while_unsynchronised_start_from_rank_0s_on_every_rank(ranks):
    # built from each rank's generator while storch.distributed.synchronize(model, enabled=False); NVIL's heads were
    # broadcast only when built, so the ranks trained on from their own (before: the first layers differed after the
    # first synchronised step by as much as they did when built)
    built0, built1 = ranks[0]["score_nvil_built"], ranks[1]["score_nvil_built"]
    assert any(name.startswith("baseline_fn.heads.") for name in built0), list(built0)
    assert max(float((built0[n] - built1[n]).abs().max()) for n in built0) > 10 * 0.05  # they start apart
    params = _same_on_every_rank(ranks, "score_nvil_unsynchronised")
    # rank 0's heads, one Adam step on (lr 0.05)
    for name in built0:
        assert float((params[name] - built0[name]).abs().max()) <= 1.01 * 0.05, name


def test_an_nvil_head_built_while_unsynchronised_after_the_first_update_starts_from_rank_0s(ranks):
    # a head for a new cost, built while synchronisation was off after the estimator's first synchronised update (an
    # evaluation on every rank): set to rank 0's at the next update (before: broadcast_once_ had run for the estimator,
    # and the ranks trained their own heads apart, silently); the broadcast runs once, for the head's 4 tensors
    built0, built1 = ranks[0]["late_head_built"], ranks[1]["late_head_built"]
    assert len(built0) == 4 and max(float((built0[n] - built1[n]).abs().max()) for n in built0) > 10 * 0.05
    for r in range(WORLD):
        kind, result = ranks[r]["late_head"]
        assert kind == "ok", result
        agree, counted = result
        assert agree
        assert counted == [[(4, "the trained parameters (rank 0's)")], []], counted



def test_nvil_heads_built_in_another_order_on_each_rank_are_matched_by_cost(ranks):
    # built while unsynchronised, "a" then "b" on rank 0 and "b" then "a" on rank 1: the broadcast and the gradients'
    # mean go by name (before: by ModuleDict position, rank 1's "b" was set to rank 0's "a", silently apart by name)
    for r in range(WORLD):
        assert ranks[r]["apart_order"] == ("ok", True), ranks[r]["apart_order"]


def test_nvil_heads_built_for_different_costs_on_each_rank_raise_on_every_rank(ranks):
    # rank 0's first step has cost "a" alone, rank 1's "b" alone: before, rank 1's head "b" was set to rank 0's "a"
    # and their gradients averaged, no error
    kind = "Score(baseline='learned', decay=0.9, lr=0.05, update=True)"
    for r in range(WORLD):
        _met_apart(ranks[r]["apart_costs"])
        message = ranks[r]["apart_costs"][1]
        assert f"rank 0: {kind} broadcasting the learned baseline's new head for cost 'a'" in message, message
        assert f"rank 1: {kind} broadcasting the learned baseline's new head for cost 'b'" in message, message


def _met_apart(recorded: tuple) -> None:
    kind, message = recorded
    assert kind == "StorchError", recorded
    assert "rank 0 first met cost 'a', rank 1 cost 'b'" in message, message
    assert "storch.add_cost" in message and "same order on every rank" in message, message


def test_nvil_costs_added_in_another_order_on_each_rank_raise_saying_so(ranks):
    # the same costs, "a" then "b" on rank 0 and "b" then "a" on rank 1, in one step: each head is broadcast from
    # rank 0 as its cost is first met, so the ranks' broadcasts differ; before, the message said only that the ranks
    # use different estimators or call them in a different order
    for r in range(WORLD):
        _met_apart(ranks[r]["order_in_step"])
