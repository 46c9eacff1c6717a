"""docs/plates.md, "Minibatches of a larger data set": a data plate averages its B data points, so a cost on it
scaled by N (the data set's size) is an unbiased estimate of the full-data sum; Pyro's N / B is not (p-svi)."""

import torch
from torch.distributions import Normal

import storch

N, B, R = 20, 5, 1500


def _gradients(scale: float) -> torch.Tensor:
    """R independent minibatch gradients in m of E_q[-log p(x, z)], q = Normal(m, 0.5), p: z ~ N(0, 1), x_i ~ N(z, 1)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(N, generator=g, dtype=torch.float64) + 1.0
    m = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = []
    for r in range(R):
        torch.manual_seed(r)
        idx = torch.randperm(N, generator=g)[:B]
        with storch.Graph():
            xb = storch.denote_independent(data[idx], 0, "data")
            z = storch.estimator("reparameterization", plate="z")(Normal(m, 0.5))
            storch.add_cost(scale * -Normal(z, 1.0).log_prob(xb), name="nll")
            storch.add_cost(-Normal(0.0, 1.0).log_prob(z), name="prior")
            (grad,) = torch.autograd.grad(storch.surrogate_loss(), m)
        out.append(grad)
    exact = -(data - m.detach()).sum() + m.detach()  # d/dm of E_q[-sum_i log N(x_i | z, 1) - log N(z | 0, 1)]
    return torch.stack(out), exact


def test_a_minibatch_cost_scaled_by_n_is_unbiased_for_the_full_data_objective():
    est, exact = _gradients(N)
    z = (est.mean() - exact) / (est.std() / R ** 0.5)
    assert abs(z) < 4, (est.mean().item(), exact.item(), z.item())
    wrong, _ = _gradients(N / B)  # Pyro's factor with storch's mean: the data term B times too small
    z_wrong = (wrong.mean() - exact) / (wrong.std() / R ** 0.5)
    assert abs(z_wrong) > 20
