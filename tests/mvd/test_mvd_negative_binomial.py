"""mvd on NegativeBinomial(r, θ) (torch's: successes before r failures), in its probs / logits with r fixed:
the weak derivative checked pointwise against autograd of torch's pmf; gradients and forward values z-tested
(4000 replicates, 4 standard errors, several seeds) against exact values, E f(K) summed over {0, …, 300} (tail
below 1e-60 at the probs used) and differentiated by autograd, for three costs, both parametrisations, coupled and
not, alone and inside Independent; the ends (probs 0, a logit of −∞, r = 0); and the refusals (probs 1, a learned
total_count). mvd declares max_order 1 for every family: order 2 raises OrderError."""

import math

import pytest
import torch
from torch.distributions import Independent, NegativeBinomial

import storch
from storch.testing import assert_unbiased
from storch_mvd.decompositions import NegativeBinomialWeakDerivative, decomposition_for

from _helpers import estimates, exact_grad

F64 = torch.float64
R = torch.tensor([2.0, 0.7], dtype=F64)  # total_count per element (a real r too)
THETA = torch.tensor([0.3, -0.5], dtype=F64)  # logits; probs = sigmoid ≈ (0.574, 0.378)
TOP = 300
SUPPORT = torch.arange(TOP + 1, dtype=F64)


def f_pair(k):  # non-separable, bounded oscillation plus a quadratic
    return torch.sin(0.7 * k[0] * k[1] + 0.3) + 0.2 * (k[0] - 2.0 * k[1]) ** 2


def f_exp(k):  # non-separable, a decaying exponential times a linear term
    return torch.exp(-0.4 * k[0]) * (1.0 + k[1]) + 0.1 * k[0] * k[1]


def f_cube(k):  # a square root and a cubic (heavier in the tail)
    return torch.sqrt(k[0] + k[1] + 1.0) + 0.05 * k[0] ** 3 - 0.3 * k[1] ** 2


COSTS = {"pair": f_pair, "exp": f_exp, "cube": f_cube}


def _pmf(r, logit):
    return NegativeBinomial(r, logits=logit).log_prob(SUPPORT).exp()


def exact_mean(f, logits):
    """E f(K₀, K₁), K_i ~ NB(R_i, σ(logits_i)) independent, over {0, …, TOP}²: differentiable in logits."""
    p0, p1 = _pmf(R[0], logits[0]), _pmf(R[1], logits[1])
    grid = torch.stack(torch.meshgrid(SUPPORT, SUPPORT, indexing="ij"))
    return (p0[:, None] * p1[None, :] * f(grid)).sum()


def _check(g, v, grad, value, name):
    print(assert_unbiased(g, grad, f"{name} grad").table())
    print(assert_unbiased(v, value, f"{name} forward value").table())


def test_truncation_leaves_no_mass():
    """The exact values are sums over {0, …, 300}: the mass (and the cubic's weight) beyond is negligible."""
    for r, logit in zip(R, THETA):
        pmf = _pmf(r, logit)
        assert abs(float(pmf.sum()) - 1) < 1e-12
        assert float((pmf * SUPPORT ** 3)[-50:].sum()) < 1e-40


@pytest.mark.parametrize("r,p", [(2.0, 0.3), (0.7, 0.85), (3.5, 0.05), (1.0, 0.6)])
def test_negative_binomial_weak_derivative_is_dp(r, p):
    """∂_θ NB(r, θ)(x) = r/(1 − θ) [NB(r + 1, θ)(x − 1) − NB(r, θ)(x)] at every x in {0, …, 80}, against
    autograd of torch's pmf; and the module's ratio_sum is 1 + NB(r + 1, θ)(x − 1) / NB(r, θ)(x)."""
    x = torch.arange(81, dtype=F64)
    theta = torch.tensor(p, dtype=F64, requires_grad=True)
    pmf = NegativeBinomial(torch.tensor(r, dtype=F64), probs=theta).log_prob(x).exp()
    autograd = torch.stack([torch.autograd.grad(pmf[i], theta, retain_graph=True)[0] for i in range(len(x))])
    d = NegativeBinomial(torch.tensor(r, dtype=F64), probs=torch.tensor(p, dtype=F64))
    shifted = torch.where(x >= 1, NegativeBinomial(torch.tensor(r + 1, dtype=F64), probs=torch.tensor(p, dtype=F64))
                          .log_prob((x - 1).clamp_min(0)).exp(), torch.zeros_like(x))
    weak = r / (1 - p) * (shifted - d.log_prob(x).exp())
    assert torch.allclose(weak, autograd, rtol=1e-10, atol=1e-14)
    dec = decomposition_for(d)
    assert isinstance(dec, NegativeBinomialWeakDerivative)
    assert torch.allclose(dec.ratio_sum(d, x), 1 + shifted / d.log_prob(x).exp(), rtol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("param", ["probs", "logits"])
@pytest.mark.parametrize("cost", list(COSTS))
def test_negative_binomial_against_exact(cost, param, coupled, seed):
    torch.manual_seed(700 + seed)
    f = COSTS[cost]
    est = storch.estimator("mvd", plate="k", coupled=coupled)

    def model(t):
        d = NegativeBinomial(R, logits=t) if param == "logits" else NegativeBinomial(R, probs=torch.sigmoid(t))
        return f(est(d))

    g, v = estimates(THETA, model)
    value, grad = exact_grad(lambda t: exact_mean(f, t), THETA)
    _check(g, v, grad, value, f"mvd NegativeBinomial({param}), cost {cost}, coupled={coupled}, seed {seed}")


@pytest.mark.parametrize("coupled", [True, False])
@pytest.mark.parametrize("param", ["probs", "logits"])
def test_negative_binomial_inside_independent(param, coupled):
    torch.manual_seed(710)
    est = storch.estimator("mvd", plate="k", coupled=coupled)

    def model(t):
        d = NegativeBinomial(R, logits=t) if param == "logits" else NegativeBinomial(R, probs=torch.sigmoid(t))
        return f_pair(est(Independent(d, 1)))

    g, v = estimates(THETA, model)
    value, grad = exact_grad(lambda t: exact_mean(f_pair, t), THETA)
    _check(g, v, grad, value, f"mvd Independent(NegativeBinomial({param})), coupled={coupled}")


def _f_edge(k):
    return (k - 1.3) ** 2 + 0.5 * torch.sqrt(k + 2.0)


def test_negative_binomial_ends_probs_0_and_no_failures():
    """probs exactly 0 (p = δ₀): ∂_θ E f = r (f(1) − f(0)), the one-sided derivative (E f = (1 − θ)^r (f(0) +
    r θ f(1) + O(θ²))), from x⁺ = 1 where p has no mass; r = 0 (p = δ₀ whatever θ): gradient exactly 0."""
    torch.manual_seed(720)
    total = torch.tensor([2.0, 1.5, 0.0], dtype=F64)
    theta = torch.tensor([0.0, 0.4, 0.5], dtype=F64)
    est = storch.estimator("mvd", plate="k")
    g, v = estimates(theta, lambda t: _f_edge(est(NegativeBinomial(total, probs=t))).sum())
    f0, f1 = float(_f_edge(torch.tensor(0.0, dtype=F64))), float(_f_edge(torch.tensor(1.0, dtype=F64)))
    inner, inner_grad = exact_grad(
        lambda t: (NegativeBinomial(total[1], probs=t).log_prob(SUPPORT).exp() * _f_edge(SUPPORT)).sum(), theta[1])
    grad = torch.tensor([2.0 * (f1 - f0), float(inner_grad)], dtype=F64)
    value = torch.tensor(f0 + float(inner) + f0, dtype=F64)
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    assert (g[:, 2] == 0).all()  # r = 0: c = 0
    _check(g[:, :2], v, grad, value, "mvd NegativeBinomial at probs 0; r = 0")


@pytest.mark.parametrize("coupled", [True, False])
def test_negative_binomial_logit_minus_inf_is_zero_surely(coupled):
    """A logit of −∞ (p = δ₀): the cost sees 0 there at x₀ and x⁻, its logit gets gradient exactly 0
    (σ'(−∞) = 0), and the other element is unbiased."""
    torch.manual_seed(721)
    theta = torch.tensor([-math.inf, 0.2], dtype=F64)
    est = storch.estimator("mvd", plate="k", coupled=coupled)
    g, v = estimates(theta, lambda t: _f_edge(est(NegativeBinomial(R, logits=t))).sum())
    f0 = float(_f_edge(torch.tensor(0.0, dtype=F64)))
    inner, inner_grad = exact_grad(lambda t: (_pmf(R[1], t) * _f_edge(SUPPORT)).sum(), theta[1])
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    assert (g[:, 0] == 0).all()
    _check(g[:, 1:], v, inner_grad, torch.tensor(f0 + float(inner), dtype=F64), "mvd NegativeBinomial logit -inf")


def test_order_2_is_refused():
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    with storch.Graph():
        k = storch.estimator("mvd", plate="k")(NegativeBinomial(torch.tensor([2.0, 3.0]), logits=theta))
        storch.add_cost((k ** 2).sum())
        assert torch.isfinite(storch.surrogate_loss(order=1))
        with pytest.raises(storch.OrderError, match="mvd"):
            storch.surrogate_loss(order=2)


def test_plate_size_support_and_listing():
    """2 evaluation points per element (one parameter), every point a count >= 0; listed as supported."""
    torch.manual_seed(722)
    d = NegativeBinomial(torch.tensor([2.0, 0.5, 4.0]), probs=torch.full((3,), 0.4))
    assert storch.get_estimator_class("mvd").supports(d)
    assert "mvd" in storch.registry.supporting_estimators(d)
    with storch.Graph():
        x = storch.estimator("mvd", plate="x", n_samples=2)(d)
        assert x.plates[0].size == 2 * 2 * 3
        assert bool((x.tensor >= 0).all()) and bool((x.tensor == x.tensor.round()).all())


@pytest.mark.parametrize("coupled", [True, False])
def test_coupled_pairs_share_their_random_numbers(coupled):
    """coupled=True: x⁺ − x⁻ − 1 ~ NB(1, θ), so >= 0 on every draw; coupled=False breaks it on some of 200."""
    torch.manual_seed(723)
    e = 3
    est = storch.estimator("mvd", plate="x", n_samples=200, coupled=coupled)
    with storch.Graph():
        raw = est(NegativeBinomial(torch.tensor([2.0, 5.0, 0.8]), probs=torch.full((e,), 0.4))).tensor
    raw = raw.reshape(200, 1, 2, e, e)[:, 0]
    plus, minus = raw[:, 0].diagonal(0, -2, -1), raw[:, 1].diagonal(0, -2, -1)
    assert bool((plus - minus >= 1).all()) == coupled


# -- refusals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,match", [
    (lambda: NegativeBinomial(2.0, probs=torch.tensor([1.0, 0.5], dtype=F64), validate_args=False), "probs 1:"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([math.inf, 0.0], dtype=F64)), "a logit of \\+inf"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([20.0, 0.0])), r"rounds to 1 in torch.float32: above about 16\.6"),
    (lambda: NegativeBinomial(2.0, logits=torch.tensor([40.0, 0.0], dtype=F64)),
     r"rounds to 1 in torch.float64: above about 36\.7"),
    (lambda: Independent(NegativeBinomial(2.0, logits=torch.tensor([0.0, 20.0])), 1), "rounds to 1 in torch.float32"),
], ids=["probs-1", "logit-plus-inf", "logit-f32-rounds-to-1", "logit-f64-rounds-to-1", "independent"])
def test_negative_binomial_with_probs_1_is_refused_at_the_call(make, match):
    """probs 1 never fails: its sample (torch's clamp: a huge count) and c = r/(1 − θ) are infinite. Refused
    at the estimator call, naming the distribution and what to do; a logit of 16 (float32) is accepted."""
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match=match) as info:
        storch.estimator("mvd", plate="x")(make())
    message = str(info.value)
    assert message.startswith("estimator 'mvd' does not support NegativeBinomial with probs 1")
    assert "Keep probs below 1" in message
    with storch.Graph():
        storch.estimator("mvd", plate="x")(NegativeBinomial(2.0, logits=torch.tensor([16.0, 0.0])))


def test_negative_binomial_probs_1_refusal_is_an_assume_of_a_compiled_step():
    """storch.compile (backend=None): a replayed step with probs below 1 equals the eager one; with a logit of
    +inf the replayed step's assume raises the same refusal."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.5], dtype=F64))
    est = storch.estimator("mvd", plate="x")

    def step(shift):
        with storch.Graph():
            k = est(NegativeBinomial(torch.tensor(2.0, dtype=F64), logits=theta + shift))
            storch.add_cost(((k - 0.4) ** 2).sum())
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    zero = torch.zeros(2, dtype=F64)
    for _ in range(2):
        torch.manual_seed(724)
        (eager,) = torch.autograd.grad(step(zero), theta)
        torch.manual_seed(724)
        (replayed,) = torch.autograd.grad(compiled(zero), theta)
        assert torch.equal(eager, replayed)
    with pytest.raises(storch.StorchError, match="does not support NegativeBinomial with probs 1"):
        compiled(torch.tensor([math.inf, 0.0], dtype=F64))


@pytest.mark.parametrize("wrap", [False, True])
def test_negative_binomial_total_count_that_requires_grad_is_refused(wrap):
    """A learned r would get no gradient from mvd (it differentiates probs / logits only): refused, with
    storch.extending.differentiated_total_count's reason (use 'score', or detach), and not listed."""
    from storch.extending import differentiated_total_count

    total = torch.tensor(3.0, requires_grad=True)
    d = NegativeBinomial(total, probs=torch.tensor([0.3, 0.6]))
    d = Independent(d, 1) if wrap else d
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        storch.estimator("mvd", plate="x")(d)
    message = str(info.value)
    assert message.startswith("estimator 'mvd' does not support NegativeBinomial with a total_count that requires grad")
    reason = differentiated_total_count(d)
    assert reason is not None and message.endswith(reason) and "'score'" in message
    assert not storch.get_estimator_class("mvd").supports(d)
    assert "mvd" not in storch.registry.supporting_estimators(d)
    assert storch.get_estimator_class("mvd").supports(NegativeBinomial(total.detach(), probs=torch.tensor([0.3, 0.6])))
