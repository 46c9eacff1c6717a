"""spsa: O(c²) bias as the perturbation shrinks, unbiased forward value, batch/data plates."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    Distribution,
    Geometric,
    MixtureSameFamily,
    Multinomial,
    Normal,
    OneHotCategorical,
    TransformedDistribution,
    constraints,
)
from torch.distributions.transforms import TanhTransform

import storch
from user_distributions import UserNormal
from storch.testing import assert_unbiased

from _helpers import estimates

MU, SIGMA = 0.5, 0.1


def moment3(m, s):
    """E[x³] for x ~ N(m, s²)."""
    return m ** 3 + 3 * m * s ** 2


def test_bias_shrinks_quadratically_and_forward_value_is_unbiased():
    """Central differences have bias O(c²). Smooth problem: d/dμ E[x³], x ~ N(μ, 0.1²), σ fixed.

    Only μ is perturbed (σ does not require grad), so E[ĝ] = (m₃(μ+c) − m₃(μ−c)) / 2c
    = 3μ² + 3σ² + c²: the bias is exactly c². Measured at c = 0.8, 0.4, 0.2 (for a cubic the c² is exact at any c).
    """
    grad = 3 * MU ** 2 + 3 * SIGMA ** 2
    biases = []
    for i, c in enumerate([0.8, 0.4, 0.2]):
        torch.manual_seed(30 + i)
        est = storch.estimator("spsa", plate="x", perturbation=c)
        g, _ = estimates(torch.tensor([MU], dtype=torch.float64),
                         lambda t: est(Normal(t[0], SIGMA)) ** 3, 20000)
        report = assert_unbiased(g, grad + c ** 2, f"spsa E[ĝ] = ∇ + c² at c={c}")
        # (the forward value is checked in the tests below: with c up to 8σ here, p± barely overlap
        # p, and the importance-weighted forward value, unbiased still, is mostly ≈ 0)
        bias, stderr = float(report.mean[0]) - grad, float(report.stderr[0])
        assert bias > 4 * stderr  # the bias is really there (biased = True) ...
        biases.append(bias)
        print(f"c={c:<4} measured bias {bias:+.5f} ± {stderr:.5f}   theory c² = {c ** 2:.5f}")
    # ... and halving c divides it by 4: the log-log slope is 2
    for a, b in ((0, 1), (1, 2)):
        slope = math.log(biases[a] / biases[b]) / math.log(2.0)
        print(f"log-log slope between c={0.8 / 2 ** a} and c={0.8 / 2 ** b}: {slope:.2f} (theory 2)")
        assert 1.7 < slope < 2.3, slope


def test_two_parameters_expected_estimate():
    """Both μ and σ perturbed (σ through log σ): the mean of ĝ is the Rademacher average of the
    central differences of m₃ (exact), and the forward value is unbiased."""
    mu, sigma, c = 0.5, 0.3, 0.25
    expected = torch.zeros(2, dtype=torch.float64)
    for e1, e2 in itertools.product([1.0, -1.0], repeat=2):
        diff = moment3(mu + c * e1, sigma * math.exp(c * e2)) - moment3(mu - c * e1, sigma * math.exp(-c * e2))
        expected += torch.tensor([diff / (2 * c * e1), diff / (2 * c * e2) / sigma]) / 4  # d log σ/dσ = 1/σ
    torch.manual_seed(34)
    est = storch.estimator("spsa", plate="x", perturbation=c)
    g, v = estimates(torch.tensor([mu, sigma], dtype=torch.float64), lambda t: est(Normal(t[0], t[1])) ** 3, 20000)
    print(assert_unbiased(g, expected, f"spsa E[ĝ] (μ, σ) at c={c}").table())
    print(assert_unbiased(v, moment3(mu, sigma), "spsa forward value (μ, σ perturbed)").table())


def test_batch_data_plate_and_n_samples_against_expected_estimate():
    """Bernoulli(logits) with own batch (2,), data plate of 3, n_samples=3: E[ĝ] exactly."""
    torch.manual_seed(33)
    c = 0.3
    shift = torch.tensor([[0.0, 0.5], [-0.3, 0.2], [0.4, -0.6]], dtype=torch.float64)
    theta = torch.tensor([0.2, -0.4], dtype=torch.float64)
    est = storch.estimator("spsa", plate="b", n_samples=3, perturbation=c)

    def cost(b0, b1):
        return (b0 + 2 * b1 - 3 * b0 * b1 - 0.2) ** 2

    def model(t):
        x = est(Bernoulli(logits=t + storch.denote_independent(shift, 0, "data")))
        return cost(x[0], x[1])

    def value(logits):  # exact E[cost] for one data point
        p = torch.sigmoid(logits)
        return sum(p[0] ** a * (1 - p[0]) ** (1 - a) * p[1] ** b * (1 - p[1]) ** (1 - b) * cost(a, b)
                   for a in (0, 1) for b in (0, 1))

    expected = torch.zeros(2, dtype=torch.float64)
    for row in shift:
        for eps in itertools.product([1.0, -1.0], repeat=2):
            e = torch.tensor(eps, dtype=torch.float64)
            diff = value(theta + row + c * e) - value(theta + row - c * e)
            expected += diff / (2 * c * e) / 4 / len(shift)
    g, v = estimates(theta, model, 3000)
    exact_value = sum(value(theta + row) for row in shift) / len(shift)
    print(assert_unbiased(g, expected, "spsa E[ĝ], batch + data plate + n_samples").table())
    print(assert_unbiased(v, exact_value, "spsa forward value, batch + data plate").table())


def test_spsa_with_no_trainable_parameters_samples_plainly():
    """A node whose parameters need no gradient (a fixed prior) is sampled without perturbation."""
    torch.manual_seed(3)
    est = storch.estimator("spsa", plate="x", n_samples=4000)
    with storch.Graph():
        x = est(Normal(torch.zeros(3), 1.0))
        storch.add_cost((x ** 2).sum())
        value = storch.surrogate_loss()
    # E = 3, Var of the 4000-sample mean of a chi^2_3 is 6 / 4000
    assert abs(value.item() - 3.0) < 4 * (6 / 4000) ** 0.5


def _rademacher_average(value, theta: torch.Tensor, c: float) -> torch.Tensor:
    """E[ĝ] of spsa in closed form: the mean over ε ∈ {±1}^d of (V(θ + cε) − V(θ − cε)) / (2cε)."""
    d = theta.numel()
    out = torch.zeros(d, dtype=torch.float64)
    for eps in itertools.product([1.0, -1.0], repeat=d):
        e = torch.tensor(eps, dtype=torch.float64)
        out += (value(theta + c * e) - value(theta - c * e)) / (2 * c * e) / 2 ** d
    return out


def test_categorical_and_binomial_whose_support_does_not_move():
    """Categorical's support {0, ..., K-1} and a Binomial's {0, ..., total_count} (total_count fixed) are
    properties that do not change with the perturbed logits: spsa supports them (docs/estimators/spsa.md
    listed Categorical, yet it was refused as 'support depends on its parameters'). E[ĝ] and the forward
    value against their closed forms."""
    c = 0.3
    values = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    theta = torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64)

    def cat_value(t):
        return (torch.softmax(t, -1) * values).sum()

    torch.manual_seed(35)
    est = storch.estimator("spsa", plate="k", perturbation=c)
    g, v = estimates(theta, lambda t: values[est(Categorical(logits=t))], 4000)
    print(assert_unbiased(g, _rademacher_average(cat_value, theta, c), "spsa E[ĝ], Categorical").table())
    print(assert_unbiased(v, cat_value(theta), "spsa forward value, Categorical").table())

    def binom_value(t):  # E[(x - 1.2)²], x ~ Binomial(3, σ(t))
        p = torch.sigmoid(t[0])
        return sum(math.comb(3, k) * p ** k * (1 - p) ** (3 - k) * (k - 1.2) ** 2 for k in range(4))

    torch.manual_seed(37)
    est = storch.estimator("spsa", plate="b", perturbation=c)
    theta = torch.tensor([0.4], dtype=torch.float64)
    g, v = estimates(theta, lambda t: (est(Binomial(3, logits=t[0])) - 1.2) ** 2, 4000)
    print(assert_unbiased(g, _rademacher_average(binom_value, theta, c), "spsa E[ĝ], Binomial(3)").table())
    print(assert_unbiased(v, binom_value(theta), "spsa forward value, Binomial(3)").table())


def test_multinomial_keeps_its_total_count():
    """spsa rebuilt the perturbed distributions from their parameters alone (type(base)(**params)), so a
    Multinomial(4, ...) drew 1 trial per sample, silently (found while fixing the plate rebuild; now through
    storch.extending.rebuild). E[ĝ] and the forward value against their closed forms: a Multinomial(4)'s
    mean count is 4 softmax(θ)."""
    c = 0.3
    values = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    theta = torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64)

    def value(t):
        return 4 * (torch.softmax(t, -1) * values).sum()

    torch.manual_seed(41)
    est = storch.estimator("spsa", plate="m", perturbation=c)
    g, v = estimates(theta, lambda t: (est(Multinomial(4, logits=t)) * values).sum(-1), 4000)
    print(assert_unbiased(g, _rademacher_average(value, theta, c), "spsa E[ĝ], Multinomial(4)").table())
    print(assert_unbiased(v, value(theta), "spsa forward value, Multinomial(4)").table())


class _CountOf4(Binomial):
    def __init__(self, logits):  # fixes total_count: storch cannot call _CountOf4(logits=, total_count=)
        super().__init__(4, logits=logits)


def test_supports_agrees_with_the_refusal_of_a_class_it_cannot_rebuild():
    """A Binomial subclass whose __init__ takes only logits: spsa.supports said True, then the call failed where the
    perturbed copies are rebuilt (CountOf4(logits=..., total_count=...)). Now check_distribution rebuilds the
    distribution from its own parameters first, so supports() says False and the refusal names spsa's rebuild and
    what to do (a constructor that takes the parameters as keywords, or a Binomial itself); Binomial(4) is
    supported, and a subclass that keeps Binomial's constructor too."""
    theta = torch.tensor([0.4, -0.2], dtype=torch.float64, requires_grad=True)
    spsa = storch.get_estimator_class("spsa")
    assert spsa.supports(Binomial(4, logits=theta)) and not spsa.supports(_CountOf4(theta))

    class _SameConstructor(Binomial):
        pass

    assert spsa.supports(_SameConstructor(4, logits=theta))
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError,
                                       match=r"(?s)spsa draws from copies of _CountOf4 built again from perturbed "
                                             r"parameters, but storch cannot rebuild _CountOf4.*'total_count'.*"
                                             r"build a Binomial itself with them"):
        storch.estimator("spsa", plate="b")(_CountOf4(theta))


def _tanh_value(t: torch.Tensor) -> torch.Tensor:
    """E[(tanh x − 0.5)²], x ~ N(t₀, exp(t₁)²), by 80-point Gauss–Hermite quadrature (float64)."""
    z, w = np.polynomial.hermite_e.hermegauss(80)
    z, w = torch.from_numpy(z), torch.from_numpy(w) / math.sqrt(2 * math.pi)
    return (w * (torch.tanh(t[0] + t[1].exp() * z) - 0.5) ** 2).sum()


def _mixture_value(t: torch.Tensor) -> torch.Tensor:
    """E[(x − 0.5)²], x ~ MixtureSameFamily(Categorical(logits=t[:2]), Normal(t[2:], 0.5)), in closed form."""
    return (torch.softmax(t[:2], -1) * ((t[2:] - 0.5) ** 2 + 0.25)).sum()


def test_transformed_and_mixture_parameters_are_perturbed():
    """A tanh-squashed Normal (TransformedDistribution) and a MixtureSameFamily have empty arg_constraints: spsa
    found no parameters, sampled plainly and gave the policy NO gradient, silently (found by porting a SAC policy).
    Now the base's / the mixture's and components' parameters are perturbed: E[ĝ] against the Rademacher average
    of the exact value (quadrature / closed form), and the forward value (weights on the base, whose Jacobian
    cancels: a sample squashed to tanh = ±1 is never inverted)."""
    c = 0.3
    theta = torch.tensor([0.3, -0.5], dtype=torch.float64)
    torch.manual_seed(43)
    est = storch.estimator("spsa", plate="a", perturbation=c)

    def squashed(t):
        a = est(TransformedDistribution(Normal(t[0], t[1].exp()), [TanhTransform(cache_size=1)]))
        return (a - 0.5) ** 2

    g, v = estimates(theta, squashed, 4000)
    print(assert_unbiased(g, _rademacher_average(_tanh_value, theta, c), "spsa E[ĝ], tanh-squashed Normal").table())
    print(assert_unbiased(v, _tanh_value(theta), "spsa forward value, tanh-squashed Normal").table())

    # a MixtureSameFamily cannot hold plate tensors (storch refuses it), so no replicate plate: 100 graphs
    theta = torch.tensor([0.2, -0.3, -1.0, 1.5], dtype=torch.float64)
    torch.manual_seed(47)
    est = storch.estimator("spsa", plate="m", n_samples=40, perturbation=c)
    rows = []
    for _ in range(100):
        t = theta.clone().requires_grad_(True)
        scale = torch.ones((), dtype=torch.float64, requires_grad=True)  # d/dscale: the forward value
        with storch.Graph():
            x = est(MixtureSameFamily(Categorical(logits=t[:2]), Normal(t[2:], 0.5)))
            storch.add_cost(scale * (x - 0.5) ** 2)
            g_t, g_scale = torch.autograd.grad(storch.surrogate_loss(), (t, scale))
            rows.append(torch.cat([g_t, g_scale.reshape(1)]))
    rows = torch.stack(rows)
    g, v = rows[:, :4], rows[:, 4]
    print(assert_unbiased(g, _rademacher_average(_mixture_value, theta, c), "spsa E[ĝ], MixtureSameFamily").table())
    print(assert_unbiased(v, _mixture_value(theta), "spsa forward value, MixtureSameFamily").table())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_logits_hold_still_and_the_rest_matches_the_expected_estimate(dtype):
    """Categorical with −∞ logits, masking different categories per row: u = logits is −∞ there and
    l = u · coefficient was NaN (surrogate NaN every step). A −∞ coordinate is not moved by ±cε, so spsa
    holds it (its estimate is the exact finite difference 0) and perturbs the finite ones: E[ĝ] is the
    Rademacher average over the finite coordinates of the central differences of E_p[f] in the normalised
    logits u, chained to the user's logits (closed form below), the forward value is unbiased, and the cost
    never sees a masked category (p± keep p's zeros)."""
    c = 0.3
    allowed = torch.tensor([[True, False, True], [True, True, False]])
    table = torch.tensor([[0.5, 9.0, -1.0], [2.0, 9.0, 0.3], [9.0, 9.0, 9.0]], dtype=torch.float64)
    theta = torch.tensor([[0.2, -0.4, 0.1], [-0.3, 0.5, 0.8]], dtype=dtype)

    def value(u):  # E_p[f] from (normalised) logits, f(i, j) = table[i, j]
        p = torch.softmax(u, -1)
        return (p[0][:, None] * p[1][None, :] * table).sum()

    # E[ĝ_u]: ε over the 4 finite coordinates of u = log_softmax(θ masked); then ĝ_θ = (∂u/∂θ)ᵀ ĝ_u
    t = theta.double().requires_grad_(True)
    u = torch.log_softmax(t.masked_fill(~allowed, -math.inf), -1)
    free = allowed.reshape(-1)
    g_u = torch.zeros(6, dtype=torch.float64)
    for eps in itertools.product([1.0, -1.0], repeat=int(free.sum())):
        e = torch.zeros(6, dtype=torch.float64)
        e[free] = torch.tensor(eps, dtype=torch.float64)
        e = e.reshape(2, 3)
        diff = value(u.detach() + c * e) - value(u.detach() - c * e)
        g_u[free] += (diff / (2 * c * e)).reshape(-1)[free] / 2 ** int(free.sum())
    expected, = torch.autograd.grad(u, t, g_u.reshape(2, 3))

    torch.manual_seed(38)
    est = storch.estimator("spsa", plate="k", perturbation=c)
    seen = []

    def model(th):
        z = est(Categorical(logits=th.masked_fill(~allowed, -math.inf)))
        seen.append(z.tensor.detach())
        return table.to(dtype)[z[0], z[1]]

    g, v = estimates(theta, model, 4000)
    for z in seen:
        assert allowed.gather(-1, z.long().reshape(-1, 2).T).all(), "the cost saw a masked category"
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    assert (g[:, ~free] == 0).all()
    print(assert_unbiased(g[:, free].double(), expected.reshape(-1)[free], f"spsa E[ĝ], masked logits, {dtype}").table())
    print(assert_unbiased(v.double(), value(u.detach()), f"spsa forward value, masked logits, {dtype}").table())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loc", [5.0, 20.0])
def test_reduced_precision_divides_by_the_realised_step(dtype, loc):
    """Normal(μ, 1) with cost (x − (μ₀ − 1))² at μ = μ₀: E = (μ − μ₀ + 1)² + 1, exact gradient 2, and for a
    quadratic the O(c²) bias of the central difference is exactly 0. In bfloat16 near 20 the spacing is
    0.125, so u ± 0.1 rounds to 20.125 / 19.875, a step of 0.25, and dividing by the nominal 2c = 0.2 gave
    2.49 ± 0.02 (float16 at 20: 1.86); spsa divides by the realised step u₊ − u₋."""
    torch.manual_seed(44)
    est = storch.estimator("spsa", plate="x")  # perturbation 0.1
    g, _ = estimates(torch.tensor([loc], dtype=dtype),
                     lambda t: (est(Normal(t[0], torch.ones_like(t[0]))) - (loc - 1.0)) ** 2, 20000)
    assert g.dtype == dtype
    print(assert_unbiased(g.double(), 2.0, f"spsa E[ĝ] at loc {loc}, {dtype}").table())


def test_a_perturbation_that_the_dtype_rounds_away_is_refused():
    """bfloat16 near 40 has spacing 0.25: u ± 0.1 rounds to u, the finite difference has no step (0 / 0):
    refused, naming the dtype and the way out, where it was a silent 0 (and NaN with the realised step)."""
    est = storch.estimator("spsa", plate="x")
    theta = torch.tensor(40.0, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(storch.UnsupportedDistributionError, match="torch.bfloat16.*float32"):
        with storch.Graph():
            est(Normal(theta, torch.ones((), dtype=torch.bfloat16)))
    with storch.Graph():  # a larger perturbation moves it
        z = storch.estimator("spsa", plate="x", perturbation=0.2)(Normal(theta, torch.ones((), dtype=torch.bfloat16)))
        storch.add_cost(z ** 2)
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g)


def test_probabilities_on_the_boundary_are_refused():
    """probs exactly 0 have u = log probs = −∞ where the parameter is finite: the derivative there is one-sided
    and needs the cost at the impossible category (and the chain rule is 0 · ∞): refused, naming -inf logits."""
    probs = torch.tensor([0.5, 0.0, 0.5], requires_grad=True)
    est = storch.estimator("spsa", plate="k")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="-inf logits"):
        est(Categorical(probs=probs))


BOUNDARY = {  # a distribution given by probs with an entry on the boundary, the other entry inside
    "bernoulli-0": lambda p: Bernoulli(probs=p), "bernoulli-1": lambda p: Bernoulli(probs=p),
    "binomial-0": lambda p: Binomial(4, probs=p), "binomial-1": lambda p: Binomial(4, probs=p),
    "geometric-1": lambda p: Geometric(probs=p),
    "onehot-0": lambda p: OneHotCategorical(probs=torch.stack([p, 1 - p], -1)),
}


@pytest.mark.parametrize("touched", [False, True])
@pytest.mark.parametrize("case", sorted(BOUNDARY))
def test_bernoulli_binomial_geometric_probs_on_the_boundary_are_refused(case, touched):
    """probs exactly 0 or 1 of a Bernoulli, Binomial or Geometric: torch's sigmoid inverse clamps them, so u was
    finite (logit(tiny) = −87), no boundary was seen, and the gradient was silently 0 through the clamp
    (Bernoulli(probs=[0, .5]), f = (x − 3)²: [0, −5.9], exact [−5, −5]). With torch's lazy logits computed
    (touched: d.logits, or d.log_prob before the node) and for a OneHotCategorical (whose logits are a
    property), spsa perturbed those logits, computed from clamped probs (finite, the same zero gradient):
    now the form the distribution was built from is perturbed, and the boundary is refused."""
    edge = float(case[-1])
    probs = torch.tensor([edge, 0.5], requires_grad=True)
    d = BOUNDARY[case](probs)
    if touched:
        d.logits
    est = storch.estimator("spsa", plate="k", n_samples=8)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="boundary of its constraint"):
        est(d)


def test_probs_built_bernoulli_perturbs_probs_whether_or_not_its_logits_were_computed():
    """A Bernoulli built from probs (inside (0, 1)) whose lazy logits torch has computed gets the same estimate
    as one whose logits it has not (same seed): spsa perturbs probs, the form it was built from, in both."""
    def grad(touched):
        probs = torch.tensor([1e-9, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
        d = Bernoulli(probs=probs)
        if touched:
            d.logits
        torch.manual_seed(5)
        with storch.Graph():
            k = storch.estimator("spsa", plate="k", n_samples=200, perturbation=0.1)(d)
            storch.add_cost(((k - 3.0) ** 2 * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum())
            storch.surrogate_loss().backward()
        return probs.grad

    untouched, touched = grad(False), grad(True)
    assert torch.isfinite(untouched).all() and untouched[0] != 0
    torch.testing.assert_close(touched, untouched, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bernoulli", "binomial"])
@pytest.mark.parametrize("fill", [-math.inf, math.inf])
def test_infinite_bernoulli_and_binomial_logits_are_held(family, fill):
    """A Bernoulli / Binomial with an infinite logit (a masked bit, logits + mask): its value is sure (0 at −∞,
    the top at +∞). spsa held −∞ but its weights p / (p₊ + p₋) came from torch's log_prob, NaN on that sure
    value, so every finite coordinate's estimate was NaN; +∞ was refused. Now the weights use
    strict_support's exact log-probabilities: the held coordinate's estimate is exactly 0 and the finite ones
    match, in expectation, spsa's estimate for the same model without the masked element (the elements are
    independent: the cost at the sure value, a Rademacher average of central differences, closed form)."""
    c, top = 0.3, (1 if family == "bernoulli" else 2)
    sure = 0.0 if fill < 0 else float(top)
    theta = torch.tensor([0.4, -0.3, 0.6], dtype=torch.float64)
    mask = torch.tensor([fill, 0.0, 0.0], dtype=torch.float64)

    def dist(logits):
        return Bernoulli(logits=logits) if family == "bernoulli" else Binomial(top, logits=logits)

    def f(z0, z1, z2):
        return (z0 - 0.5) ** 2 * (1 + z1) + z1 * z2 - 0.7 * z2

    values = torch.arange(top + 1, dtype=torch.float64)

    def F(u):  # E_p[f] over the two finite elements, the masked one at its sure value
        p1, p2 = (torch.distributions.Binomial(top, logits=v).log_prob(values).exp() for v in u)
        return sum(p1[a] * p2[b] * f(sure, values[a], values[b]) for a in range(top + 1) for b in range(top + 1))

    u = theta[1:]
    expected = torch.zeros(2, dtype=torch.float64)
    for eps in itertools.product([1.0, -1.0], repeat=2):
        e = torch.tensor(eps, dtype=torch.float64)
        expected += (F(u + c * e) - F(u - c * e)) / (2 * c * e) / 4

    torch.manual_seed(61)
    est = storch.estimator("spsa", plate="z", perturbation=c)
    seen = []

    def model(t):
        z = est(dist(t + mask))
        seen.append(z.tensor.detach())
        return f(z[0], z[1], z[2])

    g, v = estimates(theta, model, 4000)
    assert all((z[..., 0] == sure).all() for z in seen), "the cost saw an impossible value of the masked element"
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    assert (g[:, 0] == 0).all()
    print(assert_unbiased(g[:, 1:], expected, f"spsa E[ĝ], {family} logit {fill}").table())
    print(assert_unbiased(v, F(u), f"spsa forward value, {family} logit {fill}").table())


def test_forward_mode_perturbs_the_parameters_it_differentiates():
    """Under forward mode (torch.autograd.forward_ad, torch.func.jvp) the parameter does not require grad: spsa
    held it fixed and its derivative was exactly 0 (exact 0.24). Bernoulli(logits=θ + data shift) on a data
    plate of 3: the mean of the tangent is spsa's expected estimate (central differences, one parameter)."""
    import torch.autograd.forward_ad as fwAD

    c, theta0 = 0.3, torch.tensor(0.2, dtype=torch.float64)
    shift = torch.tensor([0.0, -0.5, 0.7], dtype=torch.float64)
    est = storch.estimator("spsa", plate="z", n_samples=2, perturbation=c)

    def step(t):
        with storch.Graph():
            x = storch.denote_independent(shift, 0, "data")
            z = est(Bernoulli(logits=t + x))
            storch.add_cost((z - x) ** 2, name="c")
            return storch.surrogate_loss()

    def value(logits):  # exact E[cost] per data point
        p = torch.sigmoid(logits)
        return p * (1 - shift) ** 2 + (1 - p) * shift ** 2

    expected = ((value(theta0 + shift + c) - value(theta0 + shift - c)) / (2 * c)).mean()
    torch.manual_seed(41)
    with fwAD.dual_level():
        tangents = torch.stack([fwAD.unpack_dual(step(fwAD.make_dual(theta0, torch.ones(())))).tangent
                                for _ in range(1500)])
    print(assert_unbiased(tangents, expected, "spsa forward-mode derivative").table())
    torch.manual_seed(42)
    jvp = torch.func.jvp(step, (theta0,), (torch.ones(()),))[1]
    torch.manual_seed(42)
    t = theta0.clone().requires_grad_(True)
    assert torch.allclose(jvp, torch.autograd.grad(step(t), t)[0])  # the same draws: the reverse-mode derivative


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [1e-3, 1e-4])
def test_a_perturbation_of_many_scales_gives_the_finite_difference(dtype, sigma):
    """c = 0.05 is 50 and 500 scales σ of a Normal's loc: p(x₁) / (p₊ + p₋) underflows to 0 and 1 / w was
    infinite (w ∇l f = 0 · ∞: NonFiniteCostError from σ ≈ 0.0045 on). For f = (x − 1)² the central
    difference is exact: E[ĝ] = ((μ + c − 1)² − (μ − c − 1)²) / 2c = 2(μ − 1) = −1.6 at μ = 0.2."""
    torch.manual_seed(71)
    est = storch.estimator("spsa", plate="x", n_samples=2, perturbation=0.05)
    g, _ = estimates(torch.tensor([0.2], dtype=dtype), lambda t: (est(Normal(t[0], sigma)) - 1.0) ** 2, 2000)
    assert torch.isfinite(g).all()
    print(assert_unbiased(g.double(), torch.tensor([-1.6], dtype=torch.float64), f"spsa at σ={sigma}").table())


@pytest.mark.parametrize("batched", [False, True], ids=["scalar", "data-plate"])
def test_a_user_distribution_is_perturbed(batched):
    """spsa rebuilt a user's class from parameters expanded by the perturbation dim (n, ...) and compared the
    copy's batch shape with the user's as if there were no such dim: every class written outside torch was
    refused ("the copy differs from yours in batch_shape: a constructor argument took its default"; found by
    a tester). Its E[ĝ] is the smoothed gradient spsa targets: d/dμ E[x³], x ~ N(μ, 0.5²) with μ perturbed by
    ±c, (m₃(μ + c) − m₃(μ − c)) / 2c = 3μ² + 3σ² + c² (the scale, a kept constructor argument, stays)."""
    c, sigma = 0.3, 0.5
    torch.manual_seed(41)
    est = storch.estimator("spsa", plate="x", n_samples=2, perturbation=c)
    shift = torch.tensor([0.0, 0.4, -0.2], dtype=torch.float64)

    def model(t):
        if not batched:
            return est(UserNormal(t[0], sigma)) ** 3
        return est(UserNormal(t[0] + storch.denote_independent(shift, 0, "data"), sigma)) ** 3

    mu = 0.5
    locs = [mu] if not batched else [mu + float(s) for s in shift]
    expected = sum(3 * m ** 2 + 3 * sigma ** 2 + c ** 2 for m in locs) / len(locs)
    g, v = estimates(torch.tensor([mu], dtype=torch.float64), model, 4000)
    print(assert_unbiased(g, expected, f"spsa E[ĝ], user Normal ({'data plate' if batched else 'scalar'})").table())
    print(assert_unbiased(v, sum(moment3(m, sigma) for m in locs) / len(locs), "spsa forward value, user Normal").table())


def test_the_rebuild_check_of_a_users_class_is_done_once_per_kind_of_leaf(monkeypatch):
    """check_distribution rebuilt a user's leaf from its parameters at every call (~9 us of a step, to refuse a class
    storch cannot rebuild up front). Now once per kind of leaf (class, shapes, perturbed parameters, attributes as the
    rebuild compares them): a second step's leaf of the same kind is not rebuilt; a changed constructor argument is
    checked afresh, and one the rebuild refuses (a plate tensor) is still refused."""
    import storch_mvd.spsa as spsa_module

    calls = []
    real = spsa_module.rebuild

    def counting(d, *args, **kwargs):
        calls.append(type(d))
        return real(d, *args, **kwargs)

    monkeypatch.setattr(spsa_module, "rebuild", counting)

    class Fresh(UserNormal):  # (a class of this test's own: no acceptance kept from other tests)
        pass

    theta = torch.tensor([0.4, -0.2], dtype=torch.float64, requires_grad=True)
    est = storch.estimator("spsa", plate="x")
    est.check_distribution(Fresh(theta, 2.0))
    est.check_distribution(Fresh(theta * 1, 2.0))  # (another step: a new leaf of the same kind)
    assert calls == [Fresh]
    est.check_distribution(Fresh(theta, 3.0))  # a changed constructor argument: checked again
    assert calls == [Fresh, Fresh]
    with storch.Graph():
        scale = storch.denote_independent(torch.full((3, 1), 2.0, dtype=torch.float64), 0, "data")
        with pytest.raises(storch.UnsupportedDistributionError, match=r"built again from perturbed parameters.*"
                                                                      r"'scale' holds a plate tensor"):
            est.check_distribution(Fresh(theta, scale))
    assert calls == [Fresh, Fresh, Fresh]


class _DividedLoc(Distribution):
    """Keeps ``loc / temperature`` with a tensor ``temperature`` outside arg_constraints: rebuilt from its kept loc,
    the copy divides again, which is the same distribution only for a temperature of 1."""

    arg_constraints = {"loc": constraints.real}
    support = constraints.real

    def __init__(self, loc, temperature, validate_args=None):
        self.temperature = temperature
        self.loc = loc / temperature
        super().__init__(batch_shape=self.loc.shape, validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.loc.expand(self._extended_shape(sample_shape)).clone()

    def log_prob(self, x):
        return -0.5 * (x - self.loc) ** 2


def test_a_tensor_constructor_argument_is_checked_by_its_value_at_every_call():
    """Whether the rebuild divides again harmlessly depends on the temperature's value (idempotent at 1), which a
    cache key of dtypes and shapes cannot see: on int14 a leaf with temperature 0.5 hit the acceptance of one with 1
    (check_distribution and supports accepted it; only the perturbed copies' rebuild refused it)."""
    theta = torch.tensor([0.4, -0.2], dtype=torch.float64, requires_grad=True)
    est = storch.estimator("spsa", plate="x")

    def leaf(t):
        return _DividedLoc(theta, torch.tensor(t, dtype=torch.float64))

    est.check_distribution(leaf(1.0))
    assert type(est).supports(leaf(1.0))
    with pytest.raises(storch.UnsupportedDistributionError, match=r"built again from perturbed parameters.*"
                                                                  r"does not keep 'loc' as it was given"):
        est.check_distribution(leaf(0.5))
    assert not type(est).supports(leaf(0.5))
