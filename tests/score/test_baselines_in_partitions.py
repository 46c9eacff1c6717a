"""score's baselines where models ported from RL / hard attention broke them.

- a partition whose plates grow (step 0 before the data plate, later steps on it): ``greedy`` and
  ``learned`` work and are unbiased (z-tests against enumeration);
- ``learned`` without inputs on masked logits (-inf): finite features, and a regression step whose
  loss or gradients are not finite leaves the baseline's parameters and optimizer unchanged;
- a callable baseline that depends on the node's own samples (or, in a partition, on the sequence's
  samples of any step) is refused, not silently biased;
- ``inputs=`` at later steps of a partition are checked and used (when they do not depend on the
  sequence's own samples) or refused.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Bernoulli, Categorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

F64 = torch.float64
DATA = torch.tensor([-1.0, 0.5, 1.5], dtype=F64)
THETA = torch.tensor([0.3, -0.4], dtype=F64)


def _growing_episode(est, th, per_step_inputs=False):
    """x0 ~ Bern(σ(θ0)) before the data plate; x1 ~ Bern(σ(θ1 + c x0)) on it; a cost at each step."""
    c = storch.denote_independent(DATA, 0, "data")
    x0 = est(Bernoulli(logits=th[0]))                           # step 0: plates (seq, replicate)
    storch.add_cost((x0 - 0.3) ** 2, name="c0")
    inputs = c.unsqueeze(-1) if per_step_inputs else None       # a function of the data only
    x1 = est(Bernoulli(logits=th[1] + c * x0), inputs=inputs)   # step 1: plates (seq, replicate, data)
    storch.add_cost((x0 + x1 - c) ** 2, name="c1")


def _growing_exact(th):
    total = th.new_zeros(())
    for c in DATA:
        for x0, x1 in itertools.product((0.0, 1.0), repeat=2):
            lp = Bernoulli(logits=th[0]).log_prob(th.new_tensor(x0))
            lp = lp + Bernoulli(logits=th[1] + c * x0).log_prob(th.new_tensor(x1))
            total = total + lp.exp() * ((x0 - 0.3) ** 2 + (x0 + x1 - c) ** 2) / len(DATA)
    return total


@pytest.mark.parametrize("baseline,per_step_inputs", [("greedy", False), ("learned", False), ("learned", True)])
def test_baselines_when_a_partitions_plates_grow_are_unbiased(baseline, per_step_inputs):
    torch.manual_seed(80)
    est = storch.estimator("score", plate="seq", n_samples=3, baseline=baseline, lr=0.05)
    if baseline == "learned":  # train b_ψ first, so that it is not 0
        for _ in range(30):
            with storch.Graph():
                _, th = replicate(THETA, 16)
                _growing_episode(est, th, per_step_inputs)
                storch.backward()
        assert est.update_steps == 30 and est.skipped_updates == 0
    with storch.Graph() as graph:
        leaf, th = replicate(THETA, 3000)
        _growing_episode(est, th, per_step_inputs)
        if per_step_inputs:  # the cost at step 1 sees step 1's inputs, the one at step 0 none
            node = graph.nodes[0]
            assert node.at(0).inputs is None and node.at(1).inputs is node.step_inputs[1]
        g, = per_replicate_derivatives(storch.surrogate_loss(1), leaf, 1)
    assert_unbiased(g, torch.func.grad(_growing_exact)(THETA), f"{baseline} with growing plates")


# -- learned baseline on masked logits ----------------------------------------------------------------


def _masked_policy_exact(theta, mask):
    d = Categorical(logits=theta.masked_fill(~mask, float("-inf")))
    return d.probs[1]


def test_learned_baseline_on_masked_logits_stays_finite_and_unbiased():
    torch.manual_seed(81)
    theta = torch.tensor([0.2, -0.1, 0.4], dtype=F64)
    mask = torch.tensor([True, True, False])
    est = storch.estimator("score", plate="a", n_samples=4, baseline="learned", lr=0.05)
    for _ in range(20):  # every step after the first raised NonFiniteCostError: the weights were NaN
        with storch.Graph():
            _, th = replicate(theta, 16)
            a = est(Categorical(logits=th.masked_fill(~mask, float("-inf"))))
            storch.add_cost((a == 1).to(F64), name="c")
            storch.backward()
    assert all(bool(torch.isfinite(p).all()) for p in est.parameters())
    assert est.update_steps == 20 and est.skipped_updates == 0
    with storch.Graph():
        leaf, th = replicate(theta, 4000)
        a = est(Categorical(logits=th.masked_fill(~mask, float("-inf"))))
        storch.add_cost((a == 1).to(F64), name="c")
        g, = per_replicate_derivatives(storch.surrogate_loss(1), leaf, 1)
    assert_unbiased(g, torch.func.grad(_masked_policy_exact)(theta, mask), "learned, masked logits")


def test_nonfinite_regression_step_leaves_the_baseline_unchanged():
    theta = torch.zeros(3, requires_grad=True)  # float32: (b - f)² of a cost of 1e30 overflows
    est = storch.estimator("score", plate="a", n_samples=2, baseline="learned")

    def step(scale):
        a = est(Categorical(logits=theta))
        storch.add_cost(scale * (1.0 + (a == 1).float()), name="c")
        return storch.backward()

    torch.manual_seed(82)
    step(1.0)  # builds the head and its optimizer
    step(1.0)
    params = {k: v.detach().clone() for k, v in est.named_parameters()}
    opt = {k: v.clone() for k, v in est._optimizer.state_dict()["state"][0].items()}
    with pytest.warns(RuntimeWarning, match="not finite.*skipped.*unchanged"):
        for _ in range(5):  # finite surrogate (costs of 1e30), non-finite regression loss
            assert torch.isfinite(step(1e30))
    assert all(torch.equal(params[k], v) for k, v in est.named_parameters())
    assert all(torch.equal(opt[k], v) for k, v in est._optimizer.state_dict()["state"][0].items())
    assert est.update_steps == 2 and est.skipped_updates == 5
    assert est.state_dict()["_extra_state"]["skipped_updates"] == 5


# -- a callable baseline that depends on the node's own samples ------------------------------------------


def test_baseline_of_the_nodes_own_sample_is_refused():
    theta = torch.zeros(1, requires_grad=True)
    seen = {}
    est = storch.estimator("score", plate="z", n_samples=4, baseline=lambda node, cost: seen["z"].sum())
    with storch.Graph():
        z = seen["z"] = est(Bernoulli(logits=theta))
        storch.add_cost(z.sum(), name="c")
        with pytest.raises(storch.OptionError, match="baseline of cost 'c' depends on the samples of plate 'z'.*"
                                                     "must not depend.*leave_one_out"):
            storch.surrogate_loss()


@pytest.mark.parametrize("which", ["this step", "an earlier step", "a later step"])
def test_baseline_of_the_sequences_samples_is_refused(which):
    """A state-value V(s_t), s_t computed from the episode's own actions, at any step."""
    theta = torch.zeros(2, requires_grad=True)
    states = []
    V = torch.tensor([0.5, -1.0, 2.0])

    def value(node, cost):
        t = {"this step": node.step, "an earlier step": max(node.step - 1, 0), "a later step": -1}[which]
        return V[states[t]]

    est = storch.estimator("score", plate="ep", n_samples=4, baseline=value)
    with storch.Graph():
        s = torch.tensor(0)
        for t in range(3):
            a = est(Categorical(logits=theta))
            s = s + a
            states.append(s)
            storch.add_cost(-s.float(), name=f"r{t}")
        with pytest.raises(storch.OptionError, match="baseline of cost 'r.' depends on the samples of plate 'ep' "
                                                     "at step .*in a partition, on the sequence's samples"):
            storch.surrogate_loss()


def test_baseline_of_data_and_earlier_values_is_accepted():
    theta = torch.zeros(1, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4, baseline=lambda node, cost: seen["c"] * 0.5)
    with storch.Graph():
        seen = {"c": storch.denote_independent(DATA.float(), 0, "data")}
        z = est(Bernoulli(logits=theta + 0 * seen["c"]))
        storch.add_cost(z.sum(), name="c")
        storch.surrogate_loss().backward()


# -- inputs= at later steps of a partition ------------------------------------------------------------------


def test_inputs_at_later_steps_are_checked():
    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("score", plate="ep", n_samples=4, baseline="learned")
    with storch.Graph():
        a = est(Categorical(logits=theta), inputs=torch.zeros(2))
        with pytest.raises(storch.OptionError, match="inputs must be a tensor.*got str.*step 1 of partition 'ep'"):
            est(Categorical(logits=theta + a.float()), inputs="not a tensor at all")
    with storch.Graph():  # a state computed from the episode's own actions
        a = est(Categorical(logits=theta), inputs=torch.zeros(3))
        with pytest.raises(storch.OptionError, match="inputs at step 1 of partition 'ep' depend on its own samples"):
            est(Categorical(logits=theta + a.float()), inputs=torch.nn.functional.one_hot(a, 3).float())
    plain = storch.estimator("score", plate="ep", n_samples=2)
    with storch.Graph():  # every estimator: a step's inputs may depend only on what its distribution does
        a = plain(Categorical(logits=theta))
        other = storch.denote_independent(torch.zeros(4), 0, "other")
        with pytest.raises(storch.PlateError, match="at step 1 of its partition: inputs have plates \\['other'\\]"):
            plain(Categorical(logits=theta + a.float()), inputs=other)


class _StepBaseline(torch.nn.Module):
    """b_t: one trainable number per step of the partition; records the steps it is called with."""

    def __init__(self, steps):
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(steps, dtype=F64))
        self.calls = []

    def forward(self, node, cost):
        self.calls.append((cost.key, node.step))
        return self.v[node.step]


def test_trainable_module_baseline_is_regressed_on_its_own_steps_costs():
    # docs/partitions.md: a callable baseline gets the partition as of the cost's step; the surrogate
    # called it so, but the regression in storch.backward() called it with the last step's node for
    # every cost: b(step t < T-1) never learned and b(T-1) was fitted to all steps' costs
    torch.manual_seed(81)
    steps = 3
    baseline = _StepBaseline(steps)
    est = storch.estimator("score", plate="ep", n_samples=4, baseline=baseline, lr=0.5)
    theta = torch.zeros(steps, dtype=F64, requires_grad=True)
    for it in range(120):
        with storch.Graph():
            for t in range(steps):
                a = est(Bernoulli(logits=theta[t]))
                storch.add_cost(10.0 * (t + 1) + a, name="cost")  # E[cost_t] = 10 (t + 1) + 1/2
            if it == 0:
                storch.surrogate_loss()
                surrogate_calls = list(baseline.calls)
            storch.backward()
            if it == 0:
                regression_calls = baseline.calls[2 * len(surrogate_calls):]
    assert surrogate_calls == [("cost", 0), ("cost@1", 1), ("cost@2", 2)]
    assert regression_calls == surrogate_calls
    # the costs' std is 1/2; Adam's last steps move b by at most lr: b_t near step t's mean cost
    expected = torch.tensor([10.5, 20.5, 30.5], dtype=F64)
    assert (baseline.v.detach() - expected).abs().max() < 1.0
