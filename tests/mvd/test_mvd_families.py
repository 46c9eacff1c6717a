"""mvd on Binomial, Geometric, Laplace and Gamma: gradients and forward values z-tested against exact
enumeration (a truncated support for the Geometric, whose tail beyond it is below 1e-30) or closed forms,
for every parameter, coupled and not, alone and inside Independent; and the refusals of what mvd does
not differentiate (a Gamma's concentration, a Binomial's total_count)."""

import math

import pytest
import torch
from torch.distributions import Binomial, Chi2, Gamma, Geometric, Independent, Laplace

import storch
from storch.testing import assert_unbiased

from _helpers import estimates, exact_grad


def _check(g, v, grad, value, name):
    print(assert_unbiased(g, grad, f"{name} grad").table())
    print(assert_unbiased(v, value, f"{name} forward value").table())


# -- Binomial(N, θ), N fixed: exact enumeration over the finite support -------------------------------

TOTAL = torch.tensor([3.0, 5.0], dtype=torch.float64)


def f_pair(x):  # a non-separable cost of 2 integer elements
    return torch.sin(0.7 * x[0] * x[1] + 0.3) + 0.2 * (x[0] - 2.0 * x[1]) ** 2


def binomial_pmf(total: int, p, x: int):
    return math.comb(total, x) * p ** x * (1 - p) ** (total - x)


def enumerate_binomial(probs):
    n0, n1 = int(TOTAL[0]), int(TOTAL[1])
    return sum(binomial_pmf(n0, probs[0], i) * binomial_pmf(n1, probs[1], j)
               * f_pair(torch.tensor([i, j], dtype=torch.float64))
               for i in range(n0 + 1) for j in range(n1 + 1))


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("param", ["probs", "logits"])
def test_binomial_against_enumeration(param, coupled, wrap):
    torch.manual_seed(60)
    theta = torch.tensor([0.4, -0.9], dtype=torch.float64)  # logits; probs = sigmoid
    est = storch.estimator("mvd", plate="k", coupled=coupled)

    def model(t):
        d = Binomial(TOTAL, logits=t) if param == "logits" else Binomial(TOTAL, probs=torch.sigmoid(t))
        return f_pair(est(Independent(d, 1) if wrap else d))

    g, v = estimates(theta, model)
    value, grad = exact_grad(lambda t: enumerate_binomial(torch.sigmoid(t)), theta)
    _check(g, v, grad, value, f"mvd Binomial({param}), coupled={coupled}, Independent={wrap}")


def _polynomial_binomial(total: int, f, p):
    """E f(x), x ~ Bin(N, p), as the polynomial in p it is (also evaluated at p < 0 or p > 1)."""
    return sum(math.comb(total, x) * p ** x * (1 - p) ** (total - x) * f(x) for x in range(total + 1))


def test_binomial_edges_probs_0_and_1_and_no_trials():
    """θ exactly 0 and 1 (p = δ₀, δ_N: one point of p± lies where p has no mass) and N = 0 (nothing to
    differentiate). E f is a polynomial in θ, so its derivative at the ends is the two-sided one, computed
    here by a central difference of the polynomial (error O(h²) = 1e-10)."""
    torch.manual_seed(61)
    total = torch.tensor([4.0, 3.0, 0.0], dtype=torch.float64)
    theta = torch.tensor([0.0, 1.0, 0.6], dtype=torch.float64)
    est = storch.estimator("mvd", plate="k")

    def f(x):
        return (x - 1.3) ** 2 + 0.5 * x ** 3

    g, v = estimates(theta, lambda t: f(est(Binomial(total, probs=t))).sum())
    h = 1e-5
    grad = torch.tensor([(_polynomial_binomial(int(n), f, p + h) - _polynomial_binomial(int(n), f, p - h)) / (2 * h)
                         for n, p in zip(total.tolist(), theta.tolist())], dtype=torch.float64)
    value = sum(_polynomial_binomial(int(n), f, p) for n, p in zip(total.tolist(), theta.tolist()))
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    assert (g[:, 2] == 0).all()  # N = 0: c = 0
    assert abs(float(grad[0]) - 4 * (f(1.0) - f(0.0))) < 1e-6  # N (f(1) − f(0)) at θ = 0
    _check(g[:, :2], v, grad[:2], torch.tensor(value, dtype=torch.float64), "mvd Binomial at θ = 0, 1; N = 0")


# -- Geometric(θ) on {0, 1, ...}: enumeration truncated at 160 (tail < 1e-30 for θ >= 0.35) ----------

TOP = 160


def enumerate_geometric(probs):
    x = torch.arange(TOP + 1, dtype=torch.float64)
    pmf = [p * (1 - p) ** x for p in probs]
    grid = torch.stack(torch.meshgrid(x, x, indexing="ij"))
    return (pmf[0][:, None] * pmf[1][None, :] * f_pair(grid)).sum()


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("param", ["probs", "logits"])
def test_geometric_against_enumeration(param, coupled, wrap):
    torch.manual_seed(62)
    theta = torch.tensor([0.1, -0.6], dtype=torch.float64)  # probs ≈ 0.52, 0.35
    est = storch.estimator("mvd", plate="k", coupled=coupled)

    def model(t):
        d = Geometric(logits=t) if param == "logits" else Geometric(probs=torch.sigmoid(t))
        return f_pair(est(Independent(d, 1) if wrap else d))

    g, v = estimates(theta, model)
    value, grad = exact_grad(lambda t: enumerate_geometric(torch.sigmoid(t)), theta)
    _check(g, v, grad, value, f"mvd Geometric({param}), coupled={coupled}, Independent={wrap}")


def test_geometric_at_probs_1():
    """θ = 1: p = δ₀, p⁻ = δ₁ (no mass of p there); ∂_θ E f = f(0) − f(1) (E x = q/θ, E x² = q(2 − θ)/θ²)."""
    torch.manual_seed(63)
    theta = torch.tensor([1.0, 0.45], dtype=torch.float64)
    est = storch.estimator("mvd", plate="k")
    g, v = estimates(theta, lambda t: ((est(Geometric(probs=t)) - 0.4) ** 2).sum())

    def exact(t):
        m1, m2 = (1 - t) / t, (1 - t) * (2 - t) / t ** 2
        return (m2 - 0.8 * m1 + 0.16).sum()

    value, grad = exact_grad(exact, theta)
    assert abs(float(grad[0]) - ((0 - 0.4) ** 2 - (1 - 0.4) ** 2)) < 1e-12
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    _check(g, v, grad, value, "mvd Geometric at θ = 1")


# -- Laplace(μ, b): closed forms -------------------------------------------------------------------------
# E[x²] = μ² + 2b²; E[sin x] = sin μ / (1 + b²) (the characteristic function of Laplace(0, b) is 1/(1 + b²t²))

def laplace_cost(x):
    return torch.sin(x[0]) + x[0] * x[1] + 0.3 * x[1] ** 2


def laplace_exact(t):
    mu, b = t[:2], t[2:]
    return torch.sin(mu[0]) / (1 + b[0] ** 2) + mu[0] * mu[1] + 0.3 * (mu[1] ** 2 + 2 * b[1] ** 2)


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("coupled", [True, False])
def test_laplace_loc_and_scale(coupled, wrap):
    torch.manual_seed(64)
    theta = torch.tensor([0.5, -0.3, 0.8, 1.4], dtype=torch.float64)  # μ (2,), b (2,)
    est = storch.estimator("mvd", plate="x", coupled=coupled)

    def model(t):
        d = Laplace(t[:2], t[2:])
        return laplace_cost(est(Independent(d, 1) if wrap else d))

    g, v = estimates(theta, model)
    value, grad = exact_grad(laplace_exact, theta)
    _check(g, v, grad, value, f"mvd Laplace (μ, b), coupled={coupled}, Independent={wrap}")


# -- Gamma(α, β) in its rate: closed forms ---------------------------------------------------------------
# E[x²] = α(α + 1)/β²; E[e^{−x}] = (β/(β + 1))^α; E[x y] = α₀α₁/(β₀β₁)

ALPHA = torch.tensor([0.7, 2.5], dtype=torch.float64)


def gamma_cost(x):
    return 0.5 * x[0] ** 2 + torch.exp(-x[1]) + x[0] * x[1]


def gamma_exact(beta):
    a = ALPHA
    return (0.5 * a[0] * (a[0] + 1) / beta[0] ** 2 + (beta[1] / (beta[1] + 1)) ** a[1]
            + a[0] * a[1] / (beta[0] * beta[1]))


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("coupled", [True, False])
def test_gamma_rate(coupled, wrap):
    torch.manual_seed(65)
    theta = torch.tensor([1.3, 0.9], dtype=torch.float64)
    est = storch.estimator("mvd", plate="x", coupled=coupled)

    def model(t):
        d = Gamma(ALPHA, t)
        return gamma_cost(est(Independent(d, 1) if wrap else d))

    g, v = estimates(theta, model)
    value, grad = exact_grad(gamma_exact, theta)
    _check(g, v, grad, value, f"mvd Gamma rate, coupled={coupled}, Independent={wrap}")


# -- refusals --------------------------------------------------------------------------------------------

def _refusal(d):
    est = storch.estimator("mvd", plate="x")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        est(d)
    assert not type(est).supports(d)  # the registry's listing agrees
    return str(info.value)


@pytest.mark.parametrize("wrap", [False, True])
def test_gamma_concentration_that_requires_grad_is_refused(wrap):
    """A learned concentration would get no gradient from mvd, silently: refused, naming the estimator,
    the distribution and the estimators to use instead."""
    alpha = torch.tensor([1.5, 2.0], requires_grad=True)
    d = Gamma(alpha, torch.tensor([1.0, 2.0]))
    message = _refusal(Independent(d, 1) if wrap else d)
    assert message.startswith("estimator 'mvd' does not support Gamma with a concentration that requires grad")
    assert "'reparameterization'" in message and "'score'" in message
    message = _refusal(Chi2(alpha))  # a Chi2's df is its concentration (df/2)
    assert "Chi2 with a df that requires grad" in message and "'reparameterization'" in message
    # a fixed concentration (and a Chi2 with a fixed df) is supported: only the rate is differentiated
    rate = torch.tensor(1.0, requires_grad=True)
    assert storch.get_estimator_class("mvd").supports(Gamma(alpha.detach(), rate))
    assert storch.get_estimator_class("mvd").supports(Chi2(alpha.detach()))


def test_binomial_total_count_that_requires_grad_is_refused():
    total = torch.tensor(4.0, requires_grad=True)
    message = _refusal(Binomial(total, probs=torch.tensor(0.3)))
    assert message.startswith("estimator 'mvd' does not support Binomial with a total_count that requires grad")
    assert "Detach total_count" in message
    # the reason is storch.extending.differentiated_total_count's (the words GO uses)
    from storch.extending import differentiated_total_count
    reason = differentiated_total_count(Binomial(total, probs=torch.tensor(0.3)))
    assert reason is not None and message.endswith(reason)


@pytest.mark.parametrize("make", [
    lambda: Geometric(probs=torch.tensor([0.0, 0.3], dtype=torch.float64), validate_args=False),
    lambda: Geometric(logits=torch.tensor([-math.inf, 0.3], dtype=torch.float64)),
    lambda: Geometric(logits=torch.tensor([-120.0, 0.3])),  # float32: sigmoid underflows to 0
    lambda: Independent(Geometric(logits=torch.tensor([0.3, -120.0])), 1),
], ids=["probs-0", "logit-minus-inf", "logit-f32-underflow", "independent"])
def test_geometric_with_probs_0_is_refused_at_the_call(make):
    """probs 0 never succeeds: every sample (and c = 1/θ) is infinite. Refused at the estimator call, naming the
    distribution and what to do (it failed late, with a NonFiniteCostError about the cost)."""
    d = make()
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        storch.estimator("mvd", plate="x")(d)
    dtype = (d.base_dist if isinstance(d, Independent) else d).probs.dtype
    message = str(info.value)
    assert message.startswith("estimator 'mvd' does not support Geometric with probs 0")
    assert f"underflows to 0 in {dtype}" in message and "Keep probs above 0" in message


def test_geometric_probs_0_refusal_is_an_assume_of_a_compiled_step():
    """storch.compile (backend=None): a replayed step with probs above 0 equals the eager one; with a logit of
    -inf (float64) or -120 (float32, sigmoid underflows) the replayed step's assume raises the same refusal."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.5], dtype=torch.float64))
    est = storch.estimator("mvd", plate="x")

    def step(shift):
        with storch.Graph():
            k = est(Geometric(logits=theta.to(shift.dtype) + shift))
            storch.add_cost(((k - 0.4) ** 2).sum())
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    zero = torch.zeros(2, dtype=torch.float64)
    for _ in range(2):
        torch.manual_seed(81)
        (eager,) = torch.autograd.grad(step(zero), theta)
        torch.manual_seed(81)
        (replayed,) = torch.autograd.grad(compiled(zero), theta)
        assert torch.equal(eager, replayed)
    with pytest.raises(storch.StorchError, match="does not support Geometric with probs 0"):
        compiled(torch.tensor([-math.inf, 0.0], dtype=torch.float64))
    compiled(torch.zeros(2))  # float32: traced again for the dtype
    with pytest.raises(storch.StorchError, match="underflows to 0 in torch.float32"):
        compiled(torch.tensor([-120.0, 0.0]))


def test_gamma_concentration_from_an_upstream_score_node_is_accepted():
    """A concentration computed from an upstream node's sample that carries no gradient (a score-estimated
    Bernoulli) is not differentiated by mvd: the upstream estimator accounts for it. Unbiased end to end."""
    torch.manual_seed(66)
    theta = torch.tensor([0.3, 1.2], dtype=torch.float64)  # π = σ(θ₀), β = θ₁
    up = storch.estimator("expect", plate="z")
    est = storch.estimator("mvd", plate="x")

    def model(t):
        z = up(torch.distributions.Bernoulli(logits=t[0]))
        return est(Gamma(1.5 + z, t[1])) ** 2

    def exact(t):
        pi, b = torch.sigmoid(t[0]), t[1]
        return (1 - pi) * 1.5 * 2.5 / b ** 2 + pi * 2.5 * 3.5 / b ** 2

    g, v = estimates(theta, model)
    value, grad = exact_grad(exact, theta)
    _check(g, v, grad, value, "expect -> mvd Gamma(1.5 + z, β)")


def test_plate_sizes_of_the_new_families():
    """2 evaluation points per element for Binomial, Geometric and Gamma (one parameter), 4 for Laplace."""
    torch.manual_seed(67)
    est = storch.estimator("mvd", plate="x", n_samples=2)
    for d, points in [(Binomial(torch.tensor([2.0, 5.0, 1.0]), probs=torch.full((3,), 0.3)), 2),
                      (Geometric(probs=torch.full((3,), 0.3)), 2),
                      (Gamma(torch.full((3,), 2.0), torch.ones(3)), 2),
                      (Laplace(torch.zeros(3), torch.ones(3)), 4)]:
        with storch.Graph():
            x = est(d)
            assert x.plates[0].size == 2 * points * 3, type(d).__name__
            if not isinstance(d, Laplace):  # every point in the support {0, 1, ...} resp. (0, ∞)
                assert bool((x.tensor >= 0).all()), type(d).__name__



@pytest.mark.parametrize("coupled", [True, False])
def test_coupled_pairs_share_their_random_numbers(coupled):
    """coupled=True draws each (x⁺, x⁻) from common random numbers: x⁺ = x⁻ + 1 (Binomial), x⁻ − x⁺ − 1 ~
    Geometric (so >= 0), x⁻ > x⁺ (Gamma), x⁺ − μ = μ − x⁻ (Laplace's loc), |x⁺ − μ| > |x⁻ − μ| with one sign
    (Laplace's scale); coupled=False breaks each of these on some of the 200 draws."""
    torch.manual_seed(68)
    est = storch.estimator("mvd", plate="x", n_samples=200, coupled=coupled)
    e = 3

    def pairs(d, k):  # (x⁺, x⁻) of parameter k at the perturbed element: (n, e) each
        with storch.Graph():
            raw = est(d).tensor.reshape(200, -1, 2, e, e)[:, k]
        return raw[:, 0].diagonal(0, -2, -1), raw[:, 1].diagonal(0, -2, -1)

    checks = []
    plus, minus = pairs(Binomial(torch.tensor([2.0, 5.0, 9.0]), probs=torch.full((e,), 0.4)), 0)
    checks.append(bool((plus == minus + 1).all()))
    plus, minus = pairs(Geometric(probs=torch.full((e,), 0.4)), 0)
    checks.append(bool((minus - plus >= 1).all()))
    plus, minus = pairs(Gamma(torch.full((e,), 2.0), torch.ones(e)), 0)
    checks.append(bool((minus > plus).all()))
    mu = torch.tensor([0.5, -1.0, 2.0])
    plus, minus = pairs(Laplace(mu, torch.ones(e)), 0)
    checks.append(bool(torch.allclose(plus - mu, mu - minus)))
    plus, minus = pairs(Laplace(mu, torch.ones(e)), 1)
    checks.append(bool(((plus - mu).abs() > (minus - mu).abs()).all() and ((plus - mu) * (minus - mu) > 0).all()))
    assert checks == [coupled] * len(checks)
