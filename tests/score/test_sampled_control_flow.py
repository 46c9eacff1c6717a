"""Control flow on samples (p-flow): what the refusals of Python reads advise, and the kit on partitions.

The refusal of ``bool()`` advises a ``torch.where`` for a branch on a sample and says where an early exit of a
loop over masked samples keeps the gradient unbiased (tests/models/test_adaptive_computation.py measures both
placements); the refusal of ``int()`` / an index advises selecting among candidate ops with the sample (ENAS,
tests/models/test_architecture_search.py). ``storch.testing.check_against_enumeration`` runs a model that calls
``make(plate)`` once per step of a partition (one estimator for the sequence, as docs/partitions.md writes it).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Bernoulli, Categorical

import storch
import storch.testing as kit


def _refusal(read):
    est = storch.estimator("score", plate="k", n_samples=2)
    with storch.Graph(), pytest.raises(storch.PlateError) as err:
        read(est(Categorical(logits=torch.zeros(3))))
    return str(err.value)


def test_a_branch_on_a_sample_is_advised_a_where():
    msg = _refusal(lambda k: 1 if k == 0 else 2)
    assert "`h = torch.where(k == 0, f(h), g(h))`" in msg and "`h = h + b * f(h)`" in msg, msg


def test_the_early_exit_is_advised_after_the_masked_updates_not_after_the_draw():
    msg = _refusal(lambda k: not k)
    assert "after the masked updates that read `done`" in msg and "before the next draw" in msg, msg
    assert "Not right after the draw that set `done`" in msg and "biased" in msg, msg


@pytest.mark.parametrize("read", [int, lambda k: [0, 1, 2][k]])
def test_a_choice_among_ops_is_advised_to_select_with_the_sample(read):
    assert "`torch.stack([op(h) for op in ops])[k]`" in _refusal(read)


def _gates_in_a_partition() -> kit.Model:
    """Two Bernoulli gates drawn by ONE estimator (a partition of two steps); cost (b0 + 2 b1 - 1)²."""

    def build(make, theta):
        b0 = make("gate")(Bernoulli(logits=theta[0]))
        b1 = make("gate")(Bernoulli(logits=theta[1] + b0))
        storch.add_cost((b0 + 2 * b1 - 1) ** 2)

    def exact(theta):
        total = 0
        for b0 in (0.0, 1.0):
            for b1 in (0.0, 1.0):
                l1 = theta[1] + b0
                p = torch.sigmoid(theta[0] if b0 else -theta[0]) * torch.sigmoid(l1 if b1 else -l1)
                total = total + p * (b0 + 2 * b1 - 1) ** 2
        return total

    theta = torch.tensor([0.3, -0.5], dtype=torch.float64)
    return kit.Model("gates[partition]", theta, build, exact, lambda: [Bernoulli(logits=theta[:1])])


def test_the_kit_runs_a_partition_model_with_an_estimator_that_overrides_its_weights():
    # the kit's uniform-weights check built the model with a new estimator per make(plate) call, so the
    # partition's second step raised "plate name 'gate' is already used" (with raise_on_failure, the default)
    report = kit.check_against_enumeration("score", models=[_gates_in_a_partition()], orders=(0, 1),
                                           options={"n_samples": 2, "baseline": "leave_one_out"},
                                           n_replicates=1000)
    assert len(report.checks) == 2


def _halting(exit_after_draw: bool):
    """Halt at step 1 for sure (logits -20, +20); the state h is updated under the mask of the draws so far."""
    theta = torch.tensor([-20.0, 20.0, 0.0], requires_grad=True)
    est = storch.estimator("score", plate="halt", n_samples=1)
    with storch.Graph():
        h, done = torch.tensor(0.5), torch.zeros((), dtype=torch.bool)
        for t in range(3):
            h = torch.where(done, h, torch.tanh(h + 1))
            if not exit_after_draw and bool(getattr(done, "tensor", done).all()):
                break
            done = done | est(Bernoulli(logits=theta[t] + h)).bool()
            if exit_after_draw and bool(done.tensor.all()):
                break
        storch.add_cost((h - 0.9) ** 2)
        storch.surrogate_loss()


def test_a_partition_whose_last_draw_reaches_no_cost_is_warned():
    # the exit right after the draw that ended the loop: h was last updated under step 0's mask, so the cost
    # carries step 0 only and step 1's draw gets no credit (a biased gradient, silent before)
    with pytest.warns(storch.UnusedSampleWarning, match=r"partition 'halt' .* drew step 1 \(of 0-1\).*after the "
                                                         r"masked updates"):
        _halting(exit_after_draw=True)


def test_the_advised_early_exit_is_not_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error", storch.UnusedSampleWarning)
        _halting(exit_after_draw=False)


def _late_draw_unused(extra_draws: int = 0):
    # an RL loop that draws the next action at the end of its body (SARSA-style): the last draw reaches no cost
    est = storch.estimator("score", plate="episode", n_samples=2, baseline="leave_one_out")
    theta = torch.zeros(2, requires_grad=True)
    a = est(Categorical(logits=theta))
    for _ in range(2):
        storch.add_cost((a.float() - 0.5) ** 2, name="r")
        a = est(Categorical(logits=theta + a.float()))
    for _ in range(extra_draws):
        a = est(Categorical(logits=theta + a.float()))


def _node_unused():
    used = storch.estimator("score", plate="used", n_samples=2, baseline="leave_one_out")
    storch.estimator("score", plate="unused", n_samples=2)(Bernoulli(logits=torch.zeros((), requires_grad=True)))
    storch.add_cost(used(Bernoulli(logits=torch.zeros((), requires_grad=True))))


def _two_costs_one_name():
    b = storch.estimator("score", plate="b", n_samples=2, baseline="leave_one_out")(
        Bernoulli(logits=torch.zeros((), requires_grad=True)))
    storch.add_cost(b, name="c")
    storch.add_cost(2 * b, name="c")


def _late_draws_unused():
    # two draws after the last cost: not the next-action pattern (one draw), so not UnusedLastDrawWarning
    _late_draw_unused(extra_draws=1)


def _unused_sample_warnings(build, ignore_last_draw: bool) -> list:
    """The categories of the UnusedSampleWarnings of ``build``'s step, with the documented filter or without."""
    with storch.Graph(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ignore_last_draw:
            warnings.filterwarnings("ignore", category=storch.UnusedLastDrawWarning)
        build()
        storch.backward()
    return [w.category for w in caught if issubclass(w.category, storch.UnusedSampleWarning)]


def test_a_harmless_unused_last_draw_can_be_filtered_alone():
    # an RL loop drawing the next action at the end of its body leaves its last draw unused (harmless): that case is
    # its own subclass, so `warnings.filterwarnings("ignore", category=storch.UnusedLastDrawWarning)` silences it and
    # not the other UnusedSampleWarnings (before: one class, so the filter could only silence all of them)
    assert issubclass(storch.UnusedLastDrawWarning, storch.UnusedSampleWarning)  # ("error" on the parent still catches)
    assert _unused_sample_warnings(_late_draw_unused, False) == [storch.UnusedLastDrawWarning]
    assert _unused_sample_warnings(_late_draw_unused, True) == []
    assert _unused_sample_warnings(_late_draws_unused, False) == [storch.UnusedSampleWarning]
    assert _unused_sample_warnings(_late_draws_unused, True) == [storch.UnusedSampleWarning]
    assert _unused_sample_warnings(_node_unused, True) == [storch.UnusedSampleWarning]


@pytest.mark.parametrize("build, said", [(_late_draw_unused, "partition 'episode' (estimator 'score') drew step 2"),
                                         (_node_unused, "node 'unused' (estimator 'score') is upstream of no cost"),
                                         (_two_costs_one_name, "two costs named 'c' were added at the same step")])
@pytest.mark.parametrize("step", ["backward", "surrogate_loss"])
def test_the_surrogates_warnings_point_at_the_users_call(build, said, step):
    # they used stacklevel=5: right from storch.backward(), but pointing into storch/eager.py from surrogate_loss()
    with storch.Graph(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build()
        storch.backward() if step == "backward" else storch.surrogate_loss()
    ours = [w for w in caught if said in str(w.message)]
    assert len(ours) == 1, [str(w.message)[:80] for w in caught]
    assert ours[0].filename == __file__, (ours[0].filename, ours[0].lineno)
