"""storch.estimate(x, keep_data=...) and storch.cost_estimates(keep_data=...) for the score package's estimators:
per-data-point estimates (a Bayesian MLP's posterior predictive per test point, a per-example bound).

Found by porting a Bayesian MLP: ``estimate`` averaged the data plate, and the only way to get p(y | x_i) per
test point was to keep the batch off the data plate, which changes the model. The kept estimate weighs the
sampling plates exactly as the full one does (its mean over the data dims is ``estimate(x)``, for every weighting:
uniform, leave-one-out, greedy, the weighted set of ``unordered_set``, ``sum_and_sample``'s memory, importance
weights, a partition), and it is unbiased per data point (z-tests against enumeration).
"""

import itertools

import pytest
import torch
from torch.distributions import Bernoulli, Categorical

import storch

pytestmark = pytest.mark.usefixtures("float64_default")

LOGITS = torch.tensor([[1.0, 0.5, 0.0, -0.5], [-1.0, 0.0, 1.5, 0.2], [0.3, -0.8, 0.1, 0.9]],
                      dtype=torch.float64)  # 3 data points
TARGET = torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64)  # f(z) = (z - c_i)^2 + 2 g: a different answer per data point
SHIFT = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=torch.float64)  # g = 1 shifts the logits of z


def _model(est, g_est):
    """A global g (on no data plate) and a local z per data point whose distribution depends on g."""
    d, c = storch.denote_independent((LOGITS, TARGET), 0, "data")
    g = g_est(Bernoulli(logits=torch.tensor(0.4)))
    z = est(Categorical(logits=d + g * SHIFT))
    return g, z, (z.to(torch.float64) - c) ** 2 + 2.0 * g


def _exact():
    """E[f(z, g)] per data point, by enumeration of g and z."""
    pg = torch.sigmoid(torch.tensor(0.4))
    out = torch.zeros(3)
    for g, wg in ((0.0, 1 - pg), (1.0, pg)):
        pz = (LOGITS + g * SHIFT).softmax(-1)  # (3, 4)
        f = (torch.arange(4.0) - TARGET[:, None]) ** 2 + 2.0 * g
        out += wg * (pz * f).sum(-1)
    return out


CASES = {
    "score": ("score", dict(n_samples=3)),
    "leave_one_out": ("score", dict(n_samples=3, baseline="leave_one_out")),
    "greedy": ("score", dict(n_samples=3, baseline="greedy")),
    "unordered_set": ("unordered_set", dict(n_samples=3)),
    "unordered_set_padded": ("unordered_set", dict(n_samples=6)),
    "sum_and_sample": ("sum_and_sample", dict(n_samples=2)),
    "importance": ("importance", dict(n_samples=3, proposal=Categorical(logits=torch.zeros(4, dtype=torch.float64)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_mean_over_the_data_plate_is_the_full_estimate(case):
    name, options = CASES[case]
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options)
    with storch.Graph():
        _, z, f = _model(est, storch.estimator("score", plate="g", n_samples=2))
        storch.add_cost(f, name="f")
        x = torch.stack([f, z.to(torch.float64)])  # per sample (2,)
        kept = storch.estimate(x, keep_data=True)
        assert type(kept) is torch.Tensor and kept.shape == (3, 2) and not kept.requires_grad
        torch.testing.assert_close(kept.mean(0), storch.estimate(x), rtol=1e-12, atol=1e-12)
        costs = storch.cost_estimates(keep_data=True)
        assert costs["f"].shape == (3,)
        torch.testing.assert_close(costs["f"].mean(), storch.cost_estimates()["f"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(costs["f"], kept[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["score", "unordered_set"])
def test_a_partition_over_a_sequence(name):
    # two steps of one estimator: a value at step 1 (causal view) and one at step 2 (the whole sequence)
    torch.manual_seed(1)
    est = storch.estimator(name, plate="seq", n_samples=3)
    with storch.Graph():
        d = storch.denote_independent(LOGITS, 0, "data")
        a = est(Categorical(logits=d))
        b = est(Categorical(logits=d + a.to(torch.float64)))
        x1, x2 = a.to(torch.float64) ** 2, (4 * a + b).to(torch.float64)
        storch.add_cost(x1, name="x1")
        storch.add_cost(x2, name="x2")
        for x in (x1, x2):
            kept = storch.estimate(x, keep_data=True)
            assert kept.shape == (3,)
            torch.testing.assert_close(kept.mean(), storch.estimate(x), rtol=1e-12, atol=1e-12)
        full, kept = storch.cost_estimates(), storch.cost_estimates(keep_data="data")
        for n in full:
            torch.testing.assert_close(kept[n].mean(), full[n], rtol=1e-12, atol=1e-12)


R = 800


@pytest.mark.parametrize("name, options, seed", [
    ("unordered_set", dict(n_samples=2), 10),
    ("sum_and_sample", dict(n_samples=2), 11),
])
def test_the_per_data_point_estimate_is_unbiased(name, options, seed):
    # z-test per data point against the enumerated E[f] of that data point; the plain mean of the plates
    # (what a user would write by hand) is far off, so the test can fail
    torch.manual_seed(seed)
    est, g_est = storch.estimator(name, plate="z", **options), storch.estimator("score", plate="g", n_samples=2)
    kept, naive = [], []
    for _ in range(R):
        with storch.Graph():
            _, _, f = _model(est, g_est)
            kept.append(storch.estimate(f, keep_data=True))
            naive.append(f.tensor.mean((f.plate_names.index("z"), f.plate_names.index("g"))))
            # (the data plate's dim is the one left: check it is where keep_data puts it)
            assert f.plate_names.index("data") not in (f.plate_names.index("z"), f.plate_names.index("g"))
    exact = _exact()
    # the data points have different answers: a per-data-point estimate is not one number repeated
    assert min(abs(a - b) for a, b in itertools.combinations(exact.tolist(), 2)) > 0.3

    def z(samples):
        samples = torch.stack(samples)
        return (samples.mean(0) - exact) / (samples.std(0) / R ** 0.5)

    assert z(kept).abs().max() < 4, (torch.stack(kept).mean(0), exact, z(kept))
    assert z(naive).abs().max() > 8, z(naive)


def test_a_partition_over_a_sequence_per_data_point_is_the_enumerated_expectation():
    # unordered_set with k = 4 over sequences of two binary steps holds every sequence with its exact weight: the
    # per-data-point estimate at each step (step 1: its causal view; step 2: the whole sequence) is E[x | data
    # point] exactly, so a weight of the wrong data point or step shows (the mean-over-data check above cannot)
    logits = torch.tensor([[0.3, -0.5], [1.0, 0.9], [-1.2, 0.4]], dtype=torch.float64)
    est = storch.estimator("unordered_set", plate="seq", n_samples=4)
    torch.manual_seed(0)
    with storch.Graph():
        d = storch.denote_independent(logits, 0, "data")
        a = est(Categorical(logits=d))
        b = est(Categorical(logits=d + 2.0 * a.to(torch.float64)))
        first = storch.estimate(a.to(torch.float64) * 3 + 1, keep_data=True)
        both = storch.estimate((4 * a + b).to(torch.float64), keep_data=True)
    pa = logits.softmax(-1)
    exact_both = sum(pa[:, i] * (logits + 2.0 * i).softmax(-1)[:, j] * (4 * i + j)
                     for i, j in itertools.product(range(2), range(2)))
    torch.testing.assert_close(first, pa[:, 0] + 4 * pa[:, 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both, exact_both, rtol=1e-12, atol=1e-12)
