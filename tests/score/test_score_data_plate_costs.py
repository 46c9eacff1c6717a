"""Costs and data plates under a score-function estimator (docs/plates.md, "A cost that mixes data points"): a cost
reduced over a data plate by hand is refused at add_cost; its advice (the per-entry cost scaled by the plate's size)
and the recommended form of a cost that mixes data points (the batch as a per-sample dim, no data plate) are exact
(z-tests against closed forms)."""

import pytest
import torch
from torch.distributions import Bernoulli

import storch

X = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9]], dtype=torch.float64)  # (time, batch): 3 x 2


def _z(g: torch.Tensor, exact: torch.Tensor) -> float:
    return ((g.mean() - exact) / (g.std() / len(g) ** 0.5)).item()


def _nested(a):
    x = storch.denote_independent(storch.denote_independent(X, 0, "batch"), 0, "time")
    z = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")(Bernoulli(logits=a + x))
    return x, z


def test_a_cost_reduced_over_a_data_plate_by_hand_is_refused_at_add_cost():
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        x, z = _nested(a)
        c = (z - x) ** 2
        assert isinstance(c, storch.PlateTensor)
        i = c.plate_names.index("time")
        summed = storch.PlateTensor(c.tensor.sum(i), tuple(p for p in c.plates if p.name != "time"))
        with pytest.raises(storch.CostError, match=r"cost 'c'.*node 'z' \(estimator 'score'\).*data plate \['time'\]"):
            storch.add_cost(summed, name="c")


def test_the_per_entry_cost_scaled_by_the_plate_size_is_the_summed_objective():
    """E[(z - x)^2] = x^2 + p (1 - 2x), p = sigmoid(a + x): d/da of mean_batch sum_time is
    mean_batch sum_time p (1 - p) (1 - 2x)."""
    T, R = X.shape[0], 600
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = []
    for r in range(R):
        torch.manual_seed(r)
        with storch.Graph():
            x, z = _nested(a)
            storch.add_cost(T * (z - x) ** 2, name="c")
            out.append(torch.autograd.grad(storch.surrogate_loss(), a)[0])
    p = torch.sigmoid(a.detach() + X)
    exact = (p * (1 - p) * (1 - 2 * X)).sum(0).mean()
    assert abs(_z(torch.stack(out), exact)) < 4


def test_a_cost_that_mixes_data_points_is_exact_with_the_batch_as_a_per_sample_dim():
    """The contrastive cost z[b] * z[b + 1] (cyclic) with the batch a per-sample dim of one node (no data plate):
    E = mean_b p_b p_{b+1}. With the batch on a data plate and the neighbour read through .tensor, score credited
    each data point's node with its own entry only: z = -87.6 in a porting test (p-nested)."""
    Xb = torch.tensor([0.5, 1.5, -0.7], dtype=torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    R = 800
    out = []
    for r in range(R):
        torch.manual_seed(r)
        with storch.Graph():
            z = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")(Bernoulli(logits=a + Xb))
            storch.add_cost((z * z.roll(-1, 0)).mean(), name="contrast")
            out.append(torch.autograd.grad(storch.surrogate_loss(), a)[0])
    aa = a.detach().requires_grad_()
    m = torch.sigmoid(aa + Xb)
    (exact,) = torch.autograd.grad((m * m.roll(-1)).mean(), aa)
    g = torch.stack(out)
    assert g.std() > 0
    assert abs(_z(g, exact)) < 4
