"""mvd on discrete and positive families: Bernoulli and Categorical against enumeration,
Poisson and Exponential against closed forms."""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Exponential, OneHotCategorical, Poisson

import storch
from storch.testing import assert_unbiased

from _helpers import estimates, exact_grad


def f_bern(x):  # a non-separable cost of 3 binary elements
    return (x[0] + 2 * x[1] - 3 * x[0] * x[2] - 0.45) ** 2


def enumerate_bernoulli(probs):
    total = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        x = torch.tensor(bits, dtype=torch.float64)
        p = torch.prod(torch.where(x == 1, probs, 1 - probs))
        total = total + p * f_bern(x)
    return total


@pytest.mark.parametrize("param", ["probs", "logits"])
def test_bernoulli_against_enumeration(param):
    torch.manual_seed(10)
    theta = torch.tensor([0.3, -0.8, 1.1], dtype=torch.float64)
    est = storch.estimator("mvd", plate="b")

    def dist(t):
        return Bernoulli(logits=t) if param == "logits" else Bernoulli(probs=torch.sigmoid(t))

    g, v = estimates(theta, lambda t: f_bern(est(dist(t))), 3000)
    value, grad = exact_grad(lambda t: enumerate_bernoulli(torch.sigmoid(t)), theta)
    print(assert_unbiased(g, grad, f"mvd Bernoulli({param}) grad").table())
    print(assert_unbiased(v, value, f"mvd Bernoulli({param}) forward value").table())


def f_cat(z):  # categories of 2 elements, non-separable
    return torch.sin(1.3 * z[0] * z[1] + 0.2) + 0.1 * z[0] ** 2


@pytest.mark.parametrize("onehot", [False, True])
def test_categorical_against_enumeration(onehot):
    torch.manual_seed(11)
    theta = torch.tensor([[0.2, -0.5, 0.9, 0.0], [1.0, 0.3, -1.2, 0.4]], dtype=torch.float64)
    est = storch.estimator("mvd", plate="z")
    idx = torch.arange(4, dtype=torch.float64)

    def model(t):
        if onehot:
            z = est(OneHotCategorical(logits=t))
            return f_cat((z * idx).sum(-1))
        return f_cat(est(Categorical(logits=t)).double())

    def exact(t):
        p = torch.softmax(t, -1)
        return sum(p[0, i] * p[1, j] * f_cat(torch.tensor([i, j], dtype=torch.float64))
                   for i in range(4) for j in range(4))

    g, v = estimates(theta, model, 3000)
    value, grad = exact_grad(exact, theta)
    name = "OneHotCategorical" if onehot else "Categorical"
    print(assert_unbiased(g, grad, f"mvd {name} grad (2 x 4 logits)").table())
    print(assert_unbiased(v, value, f"mvd {name} forward value").table())


def test_categorical_from_probs():
    torch.manual_seed(12)
    theta = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    est = storch.estimator("mvd", plate="z")
    g, _ = estimates(theta, lambda t: (est(Categorical(probs=t)).double() - 0.7) ** 2, 3000)
    # Categorical normalises probs: E = Σ_k t_k/Σt (k − 0.7)²
    _, grad = exact_grad(lambda t: ((t / t.sum()) * (torch.arange(3.0, dtype=t.dtype) - 0.7) ** 2).sum(), theta)
    print(assert_unbiased(g, grad, "mvd Categorical(probs) grad").table())


@pytest.mark.parametrize("coupled", [True, False])
def test_poisson_x_squared(coupled):
    torch.manual_seed(13)
    theta = torch.tensor([2.5, 0.4], dtype=torch.float64)
    est = storch.estimator("mvd", plate="k", coupled=coupled)
    g, v = estimates(theta, lambda t: (est(Poisson(t)) ** 2).sum())
    # E[x²] = λ + λ², d/dλ = 1 + 2λ
    value, grad = exact_grad(lambda t: (t + t ** 2).sum(), theta)
    print(assert_unbiased(g, grad, f"mvd Poisson x^2 grad, coupled={coupled}").table())
    print(assert_unbiased(v, value, "mvd Poisson forward value").table())


@pytest.mark.parametrize("coupled", [True, False])
def test_exponential(coupled):
    torch.manual_seed(14)
    theta = torch.tensor([1.7], dtype=torch.float64)
    est = storch.estimator("mvd", plate="t", coupled=coupled)
    g, v = estimates(theta, lambda t: est(Exponential(t[0])) ** 2)
    # E[x²] = 2/λ², d/dλ = −4/λ³
    value, grad = exact_grad(lambda t: 2 / t[0] ** 2, theta)
    print(assert_unbiased(g, grad, f"mvd Exponential x^2 grad, coupled={coupled}").table())
    print(assert_unbiased(v, value, "mvd Exponential forward value").table())


def test_mvd_gradient_is_finite_at_saturated_categorical_logits():
    """float32 softmax([100, 0, 0]) puts probability exactly 1 on category 0: the weights of the
    other categories' points underflow, and 0 · ∞ must not become a NaN gradient."""
    torch.manual_seed(0)
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, -100.0, 1.0]], requires_grad=True)
    est = storch.estimator("mvd", plate="z")
    with storch.Graph():
        z = est(torch.distributions.OneHotCategorical(logits=logits))
        storch.add_cost((z * torch.tensor([1.0, 2.0, 3.0])).sum())
        g, = torch.autograd.grad(storch.surrogate_loss(), logits)
    assert torch.isfinite(g).all(), g


# rows mask different categories; the last row has one possible category (p = 1 there)
ALLOWED = torch.tensor([[True, False, True, True], [False, True, True, False], [False, False, True, False]])


def f_masked(z):  # categories of 3 elements, non-separable
    return torch.sin(1.3 * z[0] * z[1] + 0.2) + 0.1 * z[2] ** 2 + 0.3 * z[0] * z[2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("onehot", [False, True])
@pytest.mark.parametrize("param", ["logits", "probs"])
def test_categorical_with_impossible_categories_against_enumeration(param, onehot, dtype):
    """Masked categories (logits −∞, or probs exactly 0), different per row of the batch, and a row with one
    possible category: the surrogate was NaN for −∞ logits (−∞ · coefficient 0 in l), and p⁺_k = δ_k handed
    the impossible k to the cost (also for probs 0). Now c_k = 0 slots hold draws of p with weight 0: the
    cost never sees an impossible category, and gradient and forward value match exact enumeration over
    the possible ones (the gradient of a masked logit is exactly 0)."""
    torch.manual_seed(15)
    theta = torch.tensor([[0.2, -0.5, 0.9, 0.0], [1.0, 0.3, -1.2, 0.4], [0.1, 0.7, -0.3, 0.5]], dtype=dtype)
    allowed = ALLOWED
    est = storch.estimator("mvd", plate="z")
    idx = torch.arange(4, dtype=dtype)
    seen = []

    def dist(t):
        if param == "logits":
            return (OneHotCategorical if onehot else Categorical)(logits=t.masked_fill(~allowed, -math.inf))
        p = torch.softmax(t, -1) * allowed
        return (OneHotCategorical if onehot else Categorical)(probs=p / p.sum(-1, keepdim=True))

    def model(t):
        z = est(dist(t))
        seen.append(z.tensor.detach())
        if onehot:
            return f_masked((z * idx).sum(-1))
        return f_masked(z.to(dtype))

    def exact(t):
        p = torch.softmax(t.masked_fill(~allowed, -math.inf), -1)
        return sum(p[0, i] * p[1, j] * p[2, k] * f_masked(torch.tensor([i, j, k], dtype=t.dtype))
                   for i, j, k in itertools.product(range(4), repeat=3))

    g, v = estimates(theta, model, 3000)
    for z in seen:  # (plate..., 3 rows) indices, or (plate..., 3 rows, 4) one-hot vectors
        if onehot:
            assert ((z.sum(-1) == 1) & ((z * ~allowed).sum(-1) == 0)).all()
        else:
            assert allowed.gather(-1, z.long().reshape(-1, 3).T).all(), "the cost saw an impossible category"
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    # a masked logit, and every logit of the row with one possible category, has derivative exactly 0 (probs:
    # up to the rounding of the user's softmax · mask / sum); the others are z-tested
    zero = (~allowed | (allowed.sum(-1, keepdim=True) == 1)).reshape(-1)
    assert (g[:, zero].abs() <= (0 if param == "logits" else 1e-6)).all()
    value, grad = exact_grad(exact, theta.double())
    name = f"mvd {'OneHot' if onehot else ''}Categorical({param}) masked, {dtype}"
    print(assert_unbiased(g[:, ~zero].double(), grad[~zero], f"{name} grad").table())
    print(assert_unbiased(v.double(), value, f"{name} forward value").table())


# -- a Poisson whose rate is exactly 0 ----------------------------------------------------------------
# ratio_sum was 1 + y / λ = 0 / 0 = NaN at λ = 0 (y = 0): every weight and gradient of the step was NaN.
# The weak derivative there is c = 1, p⁺ = δ₁, p⁻ = δ₀ (decompositions/poisson.py); x⁺ = 1 has weight 0
# (p has no mass there) and its term enters through the weight's derivative.

def _zip_cost(k):
    return (k - 3.0) ** 2 + 0.4 * k ** 3


def _poisson_mean_cost(lam, top: int = 80):
    """E f(k), k ~ Poisson(λ), λ > 0, by enumeration truncated at ``top``."""
    k = torch.arange(top + 1, dtype=lam.dtype)
    pmf = torch.exp(k * lam.log() - lam - torch.lgamma(k + 1))
    return (pmf * _zip_cost(k)).sum()


@pytest.mark.parametrize("upstream", ["expect", "score"])
@pytest.mark.parametrize("coupled", [True, False])
def test_zero_inflated_poisson_against_enumeration(upstream, coupled):
    """z ~ Bernoulli(π), k ~ Poisson(λ z): where z = 0 the rate is exactly 0."""
    torch.manual_seed(15)
    theta = torch.tensor([0.4, 0.3], dtype=torch.float64)  # π = σ(θ₀), λ = exp(θ₁)
    if upstream == "score":
        pytest.importorskip("storch_score")  # (not installed with this family alone)
    up = storch.estimator(upstream, plate="z", **({"n_samples": 2} if upstream == "score" else {}))
    est = storch.estimator("mvd", plate="k", coupled=coupled)

    def model(t):
        z = up(Bernoulli(logits=t[0]))
        return _zip_cost(est(Poisson(t[1].exp() * z)))

    def exact(t):
        pi = torch.sigmoid(t[0])
        return (1 - pi) * _zip_cost(torch.zeros((), dtype=t.dtype)) + pi * _poisson_mean_cost(t[1].exp())

    g, v = estimates(theta, model)
    value, grad = exact_grad(exact, theta)
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    print(assert_unbiased(g, grad, f"mvd zero-inflated Poisson grad ({upstream}, coupled={coupled})").table())
    print(assert_unbiased(v, value, "mvd zero-inflated Poisson forward value").table())


def test_poisson_derivative_at_a_rate_of_0_is_f1_minus_f0():
    """A rate that is a parameter at 0 (its boundary): ∂_λ E f = f(1) − f(0) there (E f is entire in λ), which
    needs f at x⁺ = 1, where p has no mass; a rate above 0 beside it as a check."""
    torch.manual_seed(16)
    theta = torch.tensor([0.0, 1.2], dtype=torch.float64)
    est = storch.estimator("mvd", plate="k")
    g, v = estimates(theta, lambda t: _zip_cost(est(Poisson(t))).sum())
    # the moments E k = λ, E k² = λ + λ², E k³ = λ³ + 3λ² + λ (the enumeration's derivative is 0 / 0 at λ = 0)
    value, grad = exact_grad(lambda t: (t ** 2 - 4.6 * t + 9 + 0.4 * (t ** 3 + 3 * t ** 2)).sum(), theta)
    assert abs(float(value) - float(_poisson_mean_cost(theta[1]) + 9)) < 1e-9
    assert abs(float(grad[0]) - float(_zip_cost(torch.tensor(1.0, dtype=torch.float64)) - 9.0)) < 1e-9  # f(1) - f(0)
    print(assert_unbiased(g, grad, "mvd Poisson grad at a rate of 0").table())
    print(assert_unbiased(v, value, "mvd Poisson forward value at a rate of 0").table())
