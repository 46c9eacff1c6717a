"""The kit's blind spots, closed: baselines that leak across a cost frame, learned parts tested
untrained, and infinite z-scores printed as numbers.

- ``check_leakage`` runs every replicate as its own graph with a small data plate, so a baseline
  that averages the whole frame (its own sample included) is biased as in real use;
- ``warmup=N`` trains an estimator's learned parts through ``storch.backward()`` before testing,
  so a learned baseline that sees its own sample is caught once it has learned something.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli

import storch
import storch.testing as kit
from storch.extending import base_distribution

F64 = torch.float64


class LeakyMean(storch.Estimator):
    """BUG: b = the mean cost of the whole frame, this sample (and this data point) included."""

    name = "test_leaky_mean"

    def baseline(self, node, cost):
        return cost.tensor.mean()


class PlateMean(storch.Estimator):
    """BUG: b = the mean cost of this data point's samples (cost.sum_plate), this sample included."""

    name = "test_plate_mean"

    def baseline(self, node, cost):
        return cost.sum_plate(cost.tensor) / node.n


class LeaveOneOut(storch.Estimator):
    """The correct twin: the mean cost of the OTHER samples of the same data point."""

    name = "test_leave_one_out_twin"

    def baseline(self, node, cost):
        return (cost.sum_plate(cost.tensor) - cost.tensor) / (node.n - 1)


class _Regressed(storch.Estimator):
    """Score function with a learned baseline b_ψ(h), regressed on the cost in update_parameters."""

    has_update = True
    sees_sample = False

    def __init__(self, plate: str, n_samples: int = 1) -> None:
        super().__init__(plate, n_samples)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16, dtype=F64), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 1, dtype=F64))
        torch.nn.init.zeros_(self.net[2].weight)  # b = 0 until trained
        torch.nn.init.zeros_(self.net[2].bias)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=0.05)
        self.steps = 0

    def features(self, node) -> torch.Tensor:
        if self.sees_sample:  # BUG: h = the node's own sample x
            return node.sample.to(F64)
        # h = the distribution's logits (x<i only), one row per sample for the same frame shape
        logits = node.distribution.logits.detach()
        return logits.unsqueeze(0).expand((node.n,) + tuple(logits.shape))

    def predict(self, node, cost) -> torch.Tensor:
        return cost.align(self.net(self.features(node)).squeeze(-1))

    def baseline(self, node, cost):
        return self.predict(node, cost)

    def update_parameters(self, nodes, loss):
        err = sum(((self.predict(n, f) - f.tensor) ** 2).mean() for n in nodes for f in n.frames.values())
        self.opt.zero_grad()
        err.backward()
        self.opt.step()
        self.steps += 1


class LearnedOnLogits(_Regressed):
    name = "test_learned_on_logits"


class LearnedOnOwnSample(_Regressed):
    name = "test_learned_on_own_sample"
    sees_sample = True


MODELS = {m.name: m for m in kit.standard_models(LeaveOneOut("probe"))[0]}
BERNOULLI = [MODELS["bernoulli[3]"]]


def test_leaking_mean_baseline_passes_one_graph_but_not_separate_graphs():
    models = [MODELS["onehot[K=5]"]]
    batched = kit.check_against_enumeration(LeakyMean, options={"n_samples": 2}, orders=(0, 1), models=models,
                                            raise_on_failure=False)
    separate = kit.check_leakage(LeakyMean, options={"n_samples": 2}, models=models, n_graphs=600,
                                 raise_on_failure=False)
    print("\n" + batched.table(details=False) + "\n\n" + separate.table(details=False))
    assert batched.ok  # the blind spot: R·n costs in one frame dilute the leak
    worst = max(c.max_abs_z for c in separate.checks)
    assert worst > 10.0
    assert not any(c.name.endswith("order 0") for c in separate.failures)  # the forward value is fine


def test_check_conditions_sees_a_leak_through_the_plate_but_not_one_across_the_frame():
    """docs/writing-an-estimator.md said check_conditions tells a baseline that sees its own sample; a third-party
    author's baseline averaging the whole cost frame passed it (max |z| 3.4) and check_against_enumeration, and
    only check_leakage caught it. The check's frame holds all R replicates (a parent plate of the node), so a
    frame-wide mean dilutes the leak to 1/(R·n); a leak through the node's own plate is per replicate. The docs
    now say which check catches which; this pins both sides down."""
    theta = torch.tensor([0.3, -0.7, 1.1], dtype=F64)

    def f(x):
        return ((x - 0.2) ** 2).sum() + x[0] * x[1]

    opts = {"n_samples": 2}
    frame = kit.check_conditions(LeakyMean, lambda th: Bernoulli(logits=th), theta, f, options=opts,
                                 orders=(0, 1), raise_on_failure=False)
    plate = kit.check_conditions(PlateMean, lambda th: Bernoulli(logits=th), theta, f, options=opts,
                                 orders=(0, 1), raise_on_failure=False)
    print("\n" + frame.table(details=False) + "\n\n" + plate.table(details=False))
    assert frame.ok  # the documented blind spot (check_leakage catches it: the test above)
    assert not plate.condition_ok(2) and plate.condition_ok(1) and plate.condition_ok(3)
    assert max(c.max_abs_z for c in plate.failures) > 10


def test_separate_graphs_pass_the_correct_twin():
    report = kit.check_leakage(LeaveOneOut, options={"n_samples": 2}, models=BERNOULLI, n_graphs=600)
    print("\n" + report.table())
    assert report.ok and report.checks[0].n == 600


def test_warmup_trains_through_backward_and_catches_a_learned_baseline_on_its_own_sample():
    made = []

    def own(plate):
        made.append(LearnedOnOwnSample(plate, n_samples=2))
        return made[-1]

    untrained = kit.check_against_enumeration(own, models=BERNOULLI, orders=(0, 1), raise_on_failure=False)
    trained = kit.check_against_enumeration(own, models=BERNOULLI, orders=(0, 1), warmup=150,
                                            raise_on_failure=False)
    print("\n" + untrained.table(details=False) + "\n\n" + trained.table(details=False))
    assert made[-1].steps == 150  # the estimator that was tested is the one warm-up trained
    assert untrained.ok  # at its initial weights the leak is too small to see
    assert max(c.max_abs_z for c in trained.checks) > 10.0


def test_warmup_passes_the_correct_learned_twin():
    made = []

    def twin(plate):
        made.append(LearnedOnLogits(plate, n_samples=2))
        return made[-1]

    report = kit.check_against_enumeration(twin, models=BERNOULLI, orders=(0, 1, 2), warmup=150)
    assert made[-1].steps == 150 and report.ok  # the last made: the one warm-up trained (before it: the probe, builds)
    sep = kit.check_leakage(twin, models=BERNOULLI, warmup=150, n_graphs=400)
    print("\n" + report.table(details=False) + "\n\n" + sep.table(details=False))
    assert made[-1].steps == 150 and sep.ok


def test_infinite_z_is_printed_as_inf():
    report = kit.z_test(torch.ones(10, 1, dtype=F64), torch.zeros(1, dtype=F64))
    assert math.isinf(report.max_abs_z) and math.isinf(float(report.z[0]))
    assert "inf" in report.table() and "e+308" not in report.table()
    nan = kit.z_test(torch.full((10, 1), float("nan"), dtype=F64), torch.zeros(1, dtype=F64))
    assert math.isinf(nan.max_abs_z) and "e+308" not in nan.table()


def test_leakage_check_validates_its_arguments():
    with pytest.raises(ValueError, match="data must be >= 2"):
        kit.check_leakage(LeaveOneOut, data=1)
    with pytest.raises(ValueError, match="orders"):
        kit.check_leakage(LeaveOneOut, orders=(3,))


def test_update_parameters_sees_the_frames_and_inputs_and_only_backward_runs_it():
    """The protocol: components are pure; update_parameters gets the frames and node.inputs."""
    seen = {}

    class Spy(storch.Estimator):
        name = "test_spy"
        has_update = True

        def baseline(self, node, cost):
            return cost.tensor.new_zeros(())

        def update_parameters(self, nodes, loss):
            node, = nodes
            seen["frames"] = {k: tuple(f.tensor.shape) for k, f in node.frames.items()}
            seen["inputs"] = node.inputs
            seen["grad"] = torch.autograd.grad(loss, theta, retain_graph=True)[0]  # graph still alive

    est = Spy("z", n_samples=3)
    theta = torch.tensor([0.2, -0.1], dtype=F64, requires_grad=True)
    h = torch.tensor([1.0, 2.0], dtype=F64)
    with storch.Graph():
        z = est(Bernoulli(logits=theta), inputs=h)
        storch.add_cost(z.sum(), name="c")
        storch.surrogate_loss()
        assert not seen  # an evaluation pass runs no update
        storch.backward()
    assert seen["frames"] == {"c": (3,)} and seen["inputs"] is h and torch.isfinite(seen["grad"]).all()
    with storch.Graph():
        data = storch.denote_independent(torch.zeros(4, 2, dtype=F64), 0, "data")
        with pytest.raises(storch.PlateError, match="inputs have plates"):
            est(Bernoulli(logits=theta), inputs=data)  # the distribution does not depend on the data plate


# -- check_conditions: a control variate that returned None is "not tested", and warmup= trains it --


class _LinearCritic(storch.Estimator):
    """Score function with a critic c(x) = φ·x and its exact mean φ·p as control variate:
    a = E_p[c] - MagicBox(l) c(x), zero in expectation at every order (appendix C). φ is per cost
    (``cost.key``) and unknown (``None``) until the first update, like a learned part that is built
    on its first training step."""

    has_update = True
    detach_mean = False

    def __init__(self, plate: str, n_samples: int = 1) -> None:
        super().__init__(plate, n_samples)
        self.phi: dict = {}

    def has_control_variate(self) -> bool:
        return True

    def control_variate(self, node, cost):
        phi = self.phi.get(cost.key)
        if phi is None:
            return None  # not trained yet
        c = node.sample @ phi  # (N, *parents)
        mean = base_distribution(node.distribution).probs @ phi  # E_p[c], with p's graph
        if self.detach_mean:
            mean = mean.detach()  # BUG: E_p[c] without its gradient; MagicBox(l) c keeps one
        l = cost.align(node.gradient_values)
        return cost.align(mean.unsqueeze(0).expand_as(c)) - torch.exp(l - l.detach()) * cost.align(c)

    def update_parameters(self, nodes, loss) -> None:
        for node in nodes:
            for key in node.frames:
                # a stand-in for training: any φ != 0 exercises condition 2
                self.phi.setdefault(key, torch.tensor([0.5, 1.0], dtype=F64))


class LinearCritic(_LinearCritic):
    name = "test_linear_critic"


class DetachedMeanCritic(_LinearCritic):
    name = "test_detached_mean_critic"
    detach_mean = True


def test_check_conditions_says_not_tested_and_warms_up():
    """check_conditions reported condition 2 'ok' (|z| 0.00) for a biased learned control variate:
    without a warm-up it returned None, and the check z-tested zeros. It now reports such a condition
    'not tested' (not ok), and takes warmup= as check_against_enumeration does."""
    th, f = torch.tensor([0.3, -0.7], dtype=F64), lambda x: ((x - 0.2) ** 2).sum() + x[0] * x[1]
    args = (lambda t: Bernoulli(logits=t), th, f)
    for cls in (LinearCritic, DetachedMeanCritic):
        cold = kit.check_conditions(cls, *args, n_replicates=500, raise_on_failure=False)
        print("\n" + str(cold))
        assert not cold.ok and not cold.condition_ok(2) and cold.condition_ok(1) and cold.condition_ok(3)
        assert set(cold.not_tested) == {f"condition 2, order {m}" for m in range(4)}
        assert "not tested" in str(cold) and "warmup=" in str(cold)
        with pytest.raises(AssertionError, match="leaves untested"):
            kit.check_conditions(cls, *args, n_replicates=200)
    good = kit.check_conditions(LinearCritic, *args, warmup=2)
    bad = kit.check_conditions(DetachedMeanCritic, *args, warmup=2, raise_on_failure=False)
    print("\n" + good.table() + "\n" + bad.table(details=False))
    assert good.ok and not good.not_tested and len(good.checks) == 11
    assert not bad.condition_ok(2) and "condition 2, order 1" in {c.name for c in bad.failures}
    assert bad.condition_ok(1) and bad.condition_ok(3)
    # an estimator without a control variate (a = 0) is tested as before
    assert kit.check_conditions("expect", *args, n_replicates=500).ok
