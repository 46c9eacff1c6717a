"""std / var of a plate tensor whose samples hold one value each: refused, not NaN.

Found by porting an RL loop: per-sample code that "normalises over the batch", ``ret / (ret.std() + 1e-8)``
with one return per data point, gave NaN on every entry and a NonFiniteCostError that did not say why (the
std of one value); ``ret - ret.mean()`` is 0 (the mean of one value: documented, not refused).
"""

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch

SPREADS = {
    "std": lambda r: r.std(),
    "var": lambda r: r.var(),
    "torch.std": lambda r: torch.std(r),
    "std_dim": lambda r: r.std(dim=-1) if r.dim() else r.std(0),
    "var_biased": lambda r: torch.var(r, correction=0),
    "std_unbiased_false": lambda r: r.std(False),
    "std_mean": lambda r: torch.std_mean(r),
    "var_mean": lambda r: torch.var_mean(r, correction=0),
    "input_kw": lambda r: torch.var(input=r),
}


def _returns(shape):
    """One return per data point (4 environments), per-sample shape ``shape``."""
    return storch.denote_independent(torch.randn((4,) + shape, dtype=torch.float64), 0, "batch")


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
@pytest.mark.parametrize("spread", list(SPREADS))
def test_a_spread_of_one_value_per_sample_is_refused(spread, shape):
    torch.manual_seed(0)
    with storch.Graph():
        r = _returns(shape)
        with pytest.raises(storch.PlateError, match=r"(?s)one value each.*ret\.tensor.*leave_one_out"):
            SPREADS[spread](r)


def test_normalising_a_sampled_return_is_refused_with_what_to_do():
    """In a graph: a pathwise sample's return, one number per sample of a data plate."""
    torch.manual_seed(0)
    mu = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        m = storch.denote_independent(mu, 0, "batch")
        x = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(m, 1.0))
        ret = (x - 1.0) ** 2
        with pytest.raises(storch.PlateError, match=r"std of a plate tensor whose samples hold one value each"):
            storch.add_cost(ret / (ret.std() + 1e-8))


def test_a_spread_over_several_values_per_sample_is_per_sample():
    torch.manual_seed(1)
    with storch.Graph():
        r = _returns((3,))
        for f in (lambda t: t.std(), lambda t: torch.var(t, correction=0), lambda t: torch.std_mean(t)[0]):
            out = f(r)
            torch.testing.assert_close(out.tensor, torch.stack([f(r.tensor[i]) for i in range(4)]))


def test_the_mean_and_sum_of_one_value_per_sample_are_that_value():
    """mean() / sum() of a 0-dim sample are the identity (a harmless habit, not refused): ret - ret.mean()
    is 0 per sample, and the cost's gradient with it (docs/plates.md)."""
    theta = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([1.5, -2.0], dtype=torch.float64)
    with storch.Graph():
        p, rr = storch.denote_independent((torch.sigmoid(theta), r), 0, "batch")
        b = storch.estimator("expect", plate="b")(Bernoulli(probs=p))
        ret = rr * b
        assert ret.shape == ()
        torch.testing.assert_close(ret.mean().tensor, ret.tensor)
        torch.testing.assert_close(torch.sum(ret).tensor, ret.tensor)
        torch.testing.assert_close((ret - ret.mean()).tensor, torch.zeros_like(ret.tensor))
        storch.add_cost(ret.mean())
        (grad,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    s = torch.sigmoid(theta.detach())
    exact = r * s * (1 - s) / 2  # d/dθ of E[r b] = r σ(θ), per data point (averaged over the data plate's 2)
    torch.testing.assert_close(grad, exact)


def test_a_spread_over_a_given_dim_without_the_correction_is_computed():
    """x.var(-1, correction=0, keepdim=True) on a feature size of 1 (a layer norm written by hand) is 0, as torch
    gives, not refused; over a given dim WITH the correction (NaN) it is still refused (review r-eighteen)."""
    with storch.Graph():
        x = storch.denote_independent(torch.randn(3, 1), 0, "data")
        v = x.var(-1, correction=0, keepdim=True)
        assert torch.equal(v.tensor, torch.zeros(3, 1))
        assert torch.equal(torch.std(x, dim=-1, unbiased=False).tensor, torch.zeros(3))
        with pytest.raises(storch.PlateError, match="one value each"):
            x.var(-1)
        with pytest.raises(storch.PlateError, match="one value each"):
            x.std(correction=0)
