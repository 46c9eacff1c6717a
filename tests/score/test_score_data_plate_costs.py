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


def _m2_step(phi, F, labelled, y_obs, est):
    """docs/plates.md, "A variable observed for some data points": sample y for every point, then
    torch.where(observed, y_obs, y_sample); the classification loss on the labelled points, log q masked."""
    with storch.Graph():
        logits, f, lab, yo = storch.denote_independent((phi, F, labelled, y_obs), 0, "data")
        q = torch.distributions.Categorical(logits=logits)
        y_sample = est(q)
        y = torch.where(lab, yo, y_sample)
        storch.add_cost(f[y], name="elbo")
        storch.add_cost(torch.where(lab, 0.0, q.log_prob(y_sample)), name="log_q")
        storch.add_cost(torch.where(lab, -q.log_prob(yo), 0.0), name="classify")
        return torch.autograd.grad(storch.surrogate_loss(), phi)[0]


@pytest.mark.parametrize("baseline", [None, "leave_one_out"])
def test_a_variable_observed_for_some_data_points_is_exact(baseline):
    """The semi-supervised VAE (M2) pattern: the gradient is the exact one of
    mean_b [labelled_b (F_b[y_b] - log q_b(y_b)) + (1 - labelled_b) E_q_b (F_b[y] + log q_b(y))], |z| < 4 per entry."""
    g = torch.Generator().manual_seed(1)
    phi0, F = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g) * 3
    labelled, y_obs = torch.tensor([True, False, True, False]), torch.tensor([2, 0, 1, 1])
    phi = phi0.clone().requires_grad_()
    lq = phi.log_softmax(-1)
    per = torch.where(labelled, F.gather(1, y_obs[:, None])[:, 0] - lq.gather(1, y_obs[:, None])[:, 0],
                      (lq.exp() * (F + lq)).sum(-1))
    exact = torch.autograd.grad(per.mean(), phi)[0]
    torch.manual_seed(0)
    R = 400
    opts = {"baseline": baseline} if baseline else {}
    gs = torch.stack([_m2_step(phi0.clone().requires_grad_(), F, labelled, y_obs,
                               storch.estimator("score", plate="y", n_samples=4, **opts)) for _ in range(R)])
    se = gs.std(0) / R ** 0.5
    unl = ~labelled
    z = (gs.mean(0)[unl] - exact[unl]) / se[unl]
    assert z.abs().max() < 4, z
    # the labelled points' gradient is the classification loss's alone: exact, up to the score term of their
    # (unused) samples, which has mean 0 (and is 0 with a leave-one-out baseline: their costs do not vary)
    zl = (gs.mean(0)[labelled] - exact[labelled]) / se[labelled].clamp_min(1e-12)
    assert ((zl.abs() < 4) | ((gs.mean(0)[labelled] - exact[labelled]).abs() < 1e-6)).all(), zl
    assert (exact[unl].abs() > 8 * se[unl]).any()  # the test can tell a wrong gradient
