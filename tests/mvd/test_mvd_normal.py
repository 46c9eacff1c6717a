"""mvd on the Normal: unbiased first derivatives in the mean and the scale (closed forms)."""


import pytest
import torch
from torch.distributions import Independent, Normal

import storch
from storch.testing import assert_unbiased

from _helpers import estimates, exact_grad

THETA = torch.tensor([0.5, 1.3], dtype=torch.float64)  # (μ, σ)

CASES = {
    # E[x²] = μ² + σ²;  E[sin x] = sin μ · exp(−σ²/2)
    "x^2": (lambda x: x ** 2, lambda t: t[0] ** 2 + t[1] ** 2),
    "sin": (lambda x: torch.sin(x), lambda t: torch.sin(t[0]) * torch.exp(-t[1] ** 2 / 2)),
}


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_normal_mean_and_scale_unbiased(case, coupled):
    torch.manual_seed(1)
    f, exact = CASES[case]
    est = storch.estimator("mvd", plate="x", coupled=coupled)
    g, v = estimates(THETA, lambda t: f(est(Normal(t[0], t[1]))))
    value, grad = exact_grad(exact, THETA)
    print(assert_unbiased(g, grad, f"mvd grad (μ, σ), f={case}, coupled={coupled}").table())
    print(assert_unbiased(v, value, f"mvd forward value, f={case}").table())


def test_normal_batch_data_plate_and_n_samples():
    """Own batch dims (2,), a data plate of 3 points, n_samples=2, cost mixing the elements."""
    torch.manual_seed(2)
    data = torch.tensor([[0.1, -0.4], [0.7, 0.2], [-1.0, 0.3]], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 0.8], dtype=torch.float64)  # μ (2,), σ
    est = storch.estimator("mvd", plate="x", n_samples=2)

    def model(t):
        d = storch.denote_independent(data, 0, "data")
        x = est(Normal(t[:2] + d, t[2]))
        assert x.shape == (2,)
        return (x ** 2).sum() + torch.sin(x[0]) * 0.5 + x[0] * x[1]

    def exact(t):
        m, s = t[:2] + data, t[2]
        e = (m ** 2 + s ** 2).sum(-1) + 0.5 * torch.sin(m[:, 0]) * torch.exp(-s ** 2 / 2) + m[:, 0] * m[:, 1]
        return e.mean()

    g, v = estimates(theta, model, 3000)
    value, grad = exact_grad(exact, theta)
    print(assert_unbiased(g, grad, "mvd grad, batch + data plate + n_samples").table())
    print(assert_unbiased(v, value, "mvd forward value, batch + data plate").table())


def test_independent_normal():
    torch.manual_seed(3)
    theta = torch.tensor([0.2, -0.6, 0.9], dtype=torch.float64)
    est = storch.estimator("mvd", plate="x")
    g, _ = estimates(theta, lambda t: (est(Independent(Normal(t[:2], t[2]), 1)) ** 2).prod(), 3000)
    _, grad = exact_grad(lambda t: ((t[:2] ** 2 + t[2] ** 2)).prod(), theta)
    print(assert_unbiased(g, grad, "mvd grad, Independent(Normal)").table())


def test_plate_holds_the_evaluation_points():
    """4 evaluation points per element (mean ±, scale ±), n_samples replicates; common x₀ elsewhere."""
    torch.manual_seed(4)
    est = storch.estimator("mvd", plate="x", n_samples=3)
    with storch.Graph():
        x = est(Normal(torch.zeros(5), 1.0))
        assert x.plates[0].size == 3 * 2 * 2 * 5
        raw = x.tensor.reshape(3, 4, 5, 5)  # (replicate, (parameter, sign), perturbed element, element)
    for m in range(5):
        others = torch.cat([raw[:, :, :m, m], raw[:, :, m + 1:, m]], 2).reshape(3, -1)
        assert torch.equal(others, others[:, :1].expand_as(others))  # x₀ shared by all points
        assert not torch.equal(raw[:, :, m, m], others[:, :4])  # the perturbed element differs
