"""Per-node derivative orders: torch's gamma family has an rsample with no second derivative, so
estimators that differentiate through the sample are unbiased only to order 1 on such nodes
(``Estimator.max_order_for``, ``storch.extending.rsample_max_order``), and ``surrogate_loss(order=2)``
raises ``storch.OrderError`` instead of a wrong Hessian."""

import math

import pytest
import torch
from torch.distributions import (
    Beta,
    Chi2,
    Dirichlet,
    FisherSnedecor,
    Gamma,
    Gumbel,
    Independent,
    InverseGamma,
    Kumaraswamy,
    LogNormal,
    MultivariateNormal,
    Normal,
    StudentT,
    TransformedDistribution,
    Weibull,
    Wishart,
)
from torch.distributions.transforms import ExpTransform

import storch
from storch.extending import rsample_max_order
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate


class ScoreFunction(storch.Estimator):
    """The base class's components: the plain score function (this test runs with storch-core alone)."""

    name = "test_core_score_function"


D = torch.float64


def _p(*v):
    return torch.tensor(v, dtype=D)


# name -> (distribution from theta, theta); theta enters every parameter
CASES = {
    "Normal": (lambda t: Normal(t[0], t[1].exp()), _p(0.3, -0.2)),
    "LogNormal": (lambda t: LogNormal(t[0], t[1].exp()), _p(0.3, -0.2)),
    "Kumaraswamy": (lambda t: Kumaraswamy(t[0].exp(), t[1].exp()), _p(0.3, -0.2)),
    "Gumbel": (lambda t: Gumbel(t[0], t[1].exp()), _p(0.3, -0.2)),
    "Weibull": (lambda t: Weibull(t[0].exp(), t[1].exp() + 1), _p(0.3, -0.2)),
    "MultivariateNormal": (lambda t: MultivariateNormal(t[:2], scale_tril=torch.diag(t[2:].exp())), _p(0.3, -0.2, 0.1, 0.2)),
    "Gamma": (lambda t: Gamma(t[0].exp(), t[1].exp()), _p(0.3, -0.2)),
    "Chi2": (lambda t: Chi2(t[0].exp()), _p(0.8)),
    "Beta": (lambda t: Beta(t[0].exp(), t[1].exp()), _p(0.3, -0.2)),
    "Dirichlet": (lambda t: Dirichlet(t.exp()), _p(0.3, -0.2, 0.1)),
    "StudentT": (lambda t: StudentT(t[0].exp() + 2, t[1], 1.0), _p(0.3, -0.2)),
    "FisherSnedecor": (lambda t: FisherSnedecor(t[0].exp() + 3, t[1].exp() + 3), _p(0.3, -0.2)),
    "InverseGamma": (lambda t: InverseGamma(t[0].exp() + 2, t[1].exp()), _p(0.3, -0.2)),
    "Wishart": (lambda t: Wishart(df=t[0].exp() + 3, covariance_matrix=torch.diag(t[1:].exp())), _p(0.3, -0.2, 0.1)),
    "Independent(Beta)": (lambda t: Independent(Beta(t[:2].exp(), t[2:].exp()), 1), _p(0.3, -0.2, 0.1, 0.2)),
    "Transformed(Gamma, Exp)": (lambda t: TransformedDistribution(Gamma(t[0].exp(), t[1].exp()), [ExpTransform()]),
                                _p(0.3, -0.2)),
    # only loc carries gradient: the chi2 inside draws from a constant df, so order 2 is right
    "StudentT(df constant)": (lambda t: StudentT(_p(3.0), t[0], t[1].exp()), _p(0.3, -0.2)),
}
GAMMA_FAMILY = {"Gamma", "Chi2", "Beta", "Dirichlet", "StudentT", "FisherSnedecor", "InverseGamma", "Wishart",
                "Independent(Beta)", "Transformed(Gamma, Exp)"}


def _first_derivative(build, theta, seed):
    t = theta.clone().requires_grad_(True)
    torch.manual_seed(seed)
    x = build(t).rsample()
    g, = torch.autograd.grad((torch.sin(x) + x ** 2).sum(), t, create_graph=True)
    return t, g


def _second_derivative_is_right(build, theta) -> bool:
    """autograd's Hessian-vector product through rsample against central differences of its (exact)
    first derivative at the same noise (fixed seed): False when they differ or autograd raises."""
    v = torch.ones_like(theta)
    h = 1e-5
    for seed in range(3):
        t, g = _first_derivative(build, theta, seed)
        try:
            hv, = torch.autograd.grad(g @ v, t, allow_unused=True)
        except NotImplementedError:  # the derivative for '_standard_gamma_grad' is not implemented
            return False
        hv = torch.zeros_like(theta) if hv is None else hv
        fd = (_first_derivative(build, theta + h * v, seed)[1] - _first_derivative(build, theta - h * v, seed)[1])
        fd = fd.detach() / (2 * h)
        if ((hv - fd).abs() / (fd.abs() + 1e-3)).max() > 1e-3:
            return False
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_rsample_max_order_matches_autograd(name):
    """The helper says 1 exactly where autograd's second derivative through rsample is wrong or raises."""
    build, theta = CASES[name]
    right = _second_derivative_is_right(build, theta)
    assert right == (name not in GAMMA_FAMILY)
    expected = math.inf if right else 1
    assert rsample_max_order(build(theta.clone().requires_grad_(True))) == expected
    assert rsample_max_order(build(theta)) == math.inf  # nothing carries gradient: nothing to get wrong


# (Wishart's own rsample fails a first backward when it redraws a singular sample: torch's in-place retry)
@pytest.mark.parametrize("name", sorted(GAMMA_FAMILY - {"Wishart"}))
def test_reparameterization_on_the_gamma_family_refuses_order_2(name):
    build, theta = CASES[name]
    torch.manual_seed(0)
    th = theta.clone().requires_grad_(True)
    est = storch.estimator("reparameterization", plate="x", n_samples=3)
    with storch.Graph():
        x = est(build(th))
        storch.add_cost(x.sum())
        loss = storch.surrogate_loss(order=1)  # the first derivative is exact
        torch.autograd.grad(loss, th)
        with pytest.raises(storch.OrderError, match=r"'reparameterization' on plate 'x' is unbiased only up to "
                                                    r"order 1.*implicit reparameterisation.*'score'"):
            storch.surrogate_loss(order=2)


def test_lax_on_dirichlet_refuses_order_2():
    """LAX differentiates its control variate through rsample: the same limit (its order-2 estimate on
    Dirichlet failed a z-test before)."""
    pytest.importorskip("storch_relaxed")
    th = _p(0.3, -0.2, 0.1).requires_grad_(True)
    est = storch.estimator("lax", plate="x", n_samples=2)
    with storch.Graph():
        x = est(Dirichlet(th.exp()))
        storch.add_cost(x[0] ** 2)
        storch.surrogate_loss(order=1)
        with pytest.raises(storch.OrderError, match="'lax'.*order 1"):
            storch.surrogate_loss(order=2)


def test_a_partition_step_from_the_gamma_family_lowers_the_order():
    th = _p(0.3, -0.2).requires_grad_(True)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        x = est(Normal(th[0], 1.0))
        y = est(Gamma(th[1].exp() + x.abs(), 1.0))  # step 1 of the partition
        storch.add_cost(x + y)
        storch.surrogate_loss(order=1)
        with pytest.raises(storch.OrderError, match="order 1"):
            storch.surrogate_loss(order=2)


def test_constant_concentration_keeps_every_order_and_its_hessian_is_unbiased():
    """Gamma(a, rate=exp(t)) with a constant: x = s / rate, s drawn without gradient; E[x^2] = a(a+1) e^{-2t}."""
    torch.manual_seed(3)
    a = 2.5
    theta = _p(0.4)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, 4000)
        x = est(Gamma(torch.full((), a, dtype=D), th[0].exp()))
        storch.add_cost(x ** 2)
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def exact(t):
        return a * (a + 1) * (-2 * t[0]).exp()

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_score_keeps_every_order_on_the_gamma_family():
    th = _p(0.3, -0.2).requires_grad_(True)
    est = ScoreFunction(plate="x", n_samples=2)
    with storch.Graph():
        x = est(Beta(th[0].exp(), th[1].exp()))
        storch.add_cost(x ** 2)
        storch.surrogate_loss(order=3)


def test_a_third_party_estimator_lowers_its_order_per_distribution():
    class FirstOrderOnBeta(storch.Estimator):
        name = "first_order_on_beta_test"

        def max_order_for(self, distribution):
            return 1 if isinstance(distribution, Beta) else super().max_order_for(distribution)

    th = _p(0.3, -0.2).requires_grad_(True)
    est = FirstOrderOnBeta("x", n_samples=2)
    with storch.Graph():
        x = est(Beta(th[0].exp(), th[1].exp()))
        y = FirstOrderOnBeta("y", n_samples=2)(Normal(th[0], 1.0))
        storch.add_cost(y)
        storch.surrogate_loss(order=2)  # the Normal node keeps max_order = inf
        storch.add_cost(x)
        with pytest.raises(storch.OrderError, match="'first_order_on_beta_test' on plate 'x'.*FirstOrderOnBeta"
                                                    r"\.max_order_for"):
            storch.surrogate_loss(order=2)


class _BartlettWishart(Wishart):
    """A Wishart of integer df drawn as L Z Zᵀ Lᵀ (Z: p × df standard normal): differentiable in the scale."""

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        z = torch.randn(shape[:-1] + (int(self.df.max()),), dtype=self.df.dtype)
        lz = self._unbroadcasted_scale_tril @ z
        return lz @ lz.mT


def test_a_wishart_subclass_with_its_own_rsample_is_accepted_and_its_derivatives_are_unbiased():
    """undifferentiable_rsample refused every isinstance(d, Wishart), a subclass that draws with a differentiable
    rsample of its own too; it now reads the method (torch's Wishart.rsample, kept by a subclass: still refused).
    E[tr X] = df · tr Σ = 2 df e^θ for Σ = e^θ I (2 × 2): gradient and Hessian 2 df e^θ, z-tested."""
    class KeepsTorchs(Wishart):
        pass

    eye = torch.eye(2, dtype=D)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    assert not est.supports(Wishart(_p(4.0), covariance_matrix=eye))
    assert not est.supports(KeepsTorchs(_p(4.0), covariance_matrix=eye))
    assert est.supports(_BartlettWishart(_p(4.0), covariance_matrix=eye))
    torch.manual_seed(5)
    df, theta = 4.0, _p(0.2)
    with storch.Graph():
        leaf, th = replicate(theta, 3000)
        x = est(_BartlettWishart(torch.tensor(df, dtype=D), covariance_matrix=eye * th[0].exp()))
        storch.add_cost(x[..., 0, 0] + x[..., 1, 1])
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    exact = 2 * df * math.exp(0.2)
    assert_unbiased(g, _p(exact), "gradient")
    assert_unbiased(h, _p([exact]), "Hessian")
