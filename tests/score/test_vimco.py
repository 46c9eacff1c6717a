"""VIMCO (Mnih & Rezende, 2016): the score function of a K-draw bound with a baseline per draw.

z-tests against exact enumeration of the joint values of the K draws (2^(K·D) for Bernoulli, C^K for a
Categorical), at orders 1 and 2, with log w depending on θ directly (log w = log p - log q): K=3 draws of
D=2 Bernoullis (one set and three independent sets), a Categorical of 3 classes, a data plate of 2 points
with a second cost that gets plain score-function credit, and an upstream score node (Theorem 2's prefix).
Its gradient's variance is measured against score@1 on the same bound; then the misuse errors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from torch.distributions import Bernoulli, Binomial, Categorical, Poisson

import storch
from path_probes import Allocations
from step_checks import unreachable_after
from storch.extending import leave_one_out_log_baselines

K, D = 3, 2
THETA = torch.tensor([0.3, -0.5], dtype=torch.float64)
PRIOR = torch.tensor([0.1, 0.4], dtype=torch.float64)
LIKELIHOOD = torch.tensor([1.0, -2.0], dtype=torch.float64)  # log p(x | z) = z · LIKELIHOOD
X = torch.tensor([[0.5, -1.0], [-0.7, 0.2]], dtype=torch.float64)  # two data points

THETA_C = torch.tensor([0.2, -0.4, 0.6], dtype=torch.float64)
PRIOR_C = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)
LIKELIHOOD_C = torch.tensor([-1.0, 1.5, 0.3], dtype=torch.float64)


def bernoulli_log_w(z, logits, x=None):
    """log w_k = log p(z_k) + log p(x | z_k) - log q(z_k); z (..., K, D), logits (..., D) -> (..., K)."""
    like = LIKELIHOOD if x is None else LIKELIHOOD * x.unsqueeze(-2)
    return (Bernoulli(logits=PRIOR).log_prob(z).sum(-1) + (z * like).sum(-1)
            - Bernoulli(logits=logits.unsqueeze(-2)).log_prob(z).sum(-1))


def categorical_log_w(z, logits):
    return (Categorical(logits=PRIOR_C).log_prob(z) + Categorical(logits=LIKELIHOOD_C).log_prob(z)
            - Categorical(logits=logits.unsqueeze(-2)).log_prob(z))


def negative_bound(log_w):
    return -(torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1]))


def bernoulli_values(n):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def derivatives(f, theta0, order=2):
    """[∇f, ∇²f] at theta0 of a function computed by enumeration."""
    theta = theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(theta), theta, create_graph=True)
    out = [g.detach()]
    if order >= 2:
        out.append(torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(g.numel())]))
    return out


def exact_bernoulli(theta):
    z = bernoulli_values(K * D).view(-1, K, D)
    q = Bernoulli(logits=theta).log_prob(z).sum((-1, -2)).exp()
    return (q * negative_bound(bernoulli_log_w(z, theta))).sum()


def exact_categorical(theta):
    z = torch.tensor(list(itertools.product(range(3), repeat=K)))
    q = Categorical(logits=theta).log_prob(z).sum(-1).exp()
    return (q * negative_bound(categorical_log_w(z, theta))).sum()


def exact_data(theta):
    """Mean over the two data points of E[bound + second cost], q(z | x_i) = Bernoulli(σ(θ + x_i))."""
    z = bernoulli_values(K * D).view(-1, K, D)
    total = 0
    for x in X:
        logits = theta + x
        q = Bernoulli(logits=logits).log_prob(z).sum((-1, -2)).exp()
        second = ((z - 0.3) ** 2).sum((-1, -2)) * x.sum()
        total = total + (q * (negative_bound(bernoulli_log_w(z, logits, x)) + second)).sum()
    return total / len(X)


def exact_upstream(theta):
    """y ~ Bernoulli(σ(θ_0)) (score), then the K draws of q(z | y) = Bernoulli(σ(θ + y)); log w reads y."""
    z = bernoulli_values(K * D).view(-1, K, D)
    total = 0
    for y in (0.0, 1.0):
        p_y = Bernoulli(logits=theta[0]).log_prob(torch.tensor(y, dtype=torch.float64)).exp()
        logits = theta + y
        q = Bernoulli(logits=logits).log_prob(z).sum((-1, -2)).exp()
        total = total + p_y * (q * negative_bound(bernoulli_log_w(z, logits) + y)).sum()
    return total


def run_bernoulli(est, theta):
    z = est(Bernoulli(logits=theta))
    assert z.shape == (K, D)
    storch.add_cost(est.bound(bernoulli_log_w(z, theta)), name="negative_bound")


def run_categorical(est, theta):
    z = est(Categorical(logits=theta))
    assert z.shape == (K,)
    storch.add_cost(est.bound(categorical_log_w(z, theta)), name="negative_bound")


def run_data(est, theta):
    x = storch.denote_independent(X, 0, "data")
    logits = theta + x
    z = est(Bernoulli(logits=logits))
    storch.add_cost(est.bound(bernoulli_log_w(z, logits, x)), name="negative_bound")
    storch.add_cost(((z - 0.3) ** 2).sum() * x.sum(), name="second")  # plain score-function credit


def run_upstream(est, theta):
    y = storch.estimator("score", plate="y")(Bernoulli(logits=theta[0]))
    logits = theta + y
    z = est(Bernoulli(logits=logits))
    storch.add_cost(est.bound(bernoulli_log_w(z, logits) + y), name="negative_bound")


CASES = {
    "bernoulli": (run_bernoulli, exact_bernoulli, THETA, {}),
    "bernoulli, 3 sets": (run_bernoulli, exact_bernoulli, THETA, {"n_samples": 3}),
    "categorical": (run_categorical, exact_categorical, THETA_C, {}),
    "data plate": (run_data, exact_data, THETA, {}),
    "upstream node": (run_upstream, exact_upstream, THETA, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vimco_is_unbiased_at_orders_1_and_2(case):
    run, exact, theta0, options = CASES[case]
    replicates = 3000
    torch.manual_seed(0)
    with storch.Graph():
        leaf, theta = replicate(theta0, replicates)
        est = storch.estimator("vimco", plate="z", n_draws=K, **options)
        run(est, theta)
        got = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    want = derivatives(exact, theta0)
    first = assert_unbiased(got[0], want[0], f"vimco {case}: gradient")
    second = assert_unbiased(got[1].reshape(replicates, -1), want[1].reshape(-1), f"vimco {case}: hessian")
    print(f"\n{case}: max |z| {first.max_abs_z:.2f} (order 1), {second.max_abs_z:.2f} (order 2)")


def gradient_estimates(name: str, replicates: int) -> torch.Tensor:
    with storch.Graph():
        leaf, theta = replicate(THETA, replicates)
        if name == "vimco":
            run_bernoulli(storch.estimator("vimco", plate="z", n_draws=K), theta)
        else:  # score on the same set of K draws (tests/score/test_multi_sample_bounds.py)
            z = storch.estimator("score", plate="z")(Bernoulli(logits=theta.expand(K, D)))
            storch.add_cost(negative_bound(bernoulli_log_w(z, theta)), name="negative_bound")
        return per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]


def test_vimco_has_lower_variance_than_score_on_the_same_bound():
    torch.manual_seed(1)
    vimco = gradient_estimates("vimco", 4000)
    score = gradient_estimates("score", 4000)
    want = derivatives(exact_bernoulli, THETA, 1)[0]
    assert_unbiased(vimco, want, "vimco")
    assert_unbiased(score, want, "score")
    ratio = float(vimco.var(0).sum() / score.var(0).sum())
    print(f"\nvariance of the gradient, vimco / score@1: {ratio:.3f}")
    assert ratio < 0.5, ratio


def test_vimco_with_k_equal_draws_reduces_to_the_direct_gradient():
    """All K draws equal in log w: each baseline b_k is the bound itself, so only ∇L (direct) is left."""
    with storch.Graph():
        theta = THETA.clone().requires_grad_(True)
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=theta))
        log_w = (z * 0).sum(-1) + theta.sum()  # the same value for every draw; θ enters directly
        storch.add_cost(est.bound(log_w), name="bound")
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    torch.testing.assert_close(g, -torch.ones(D, dtype=torch.float64))


def test_vimco_is_registered_with_its_capabilities():
    info = storch.available_estimators()["vimco"]
    assert info.package == "storch-estimators-score" and info.max_order == math.inf and not info.biased
    est = storch.estimator("vimco", plate="z", n_draws=4, n_samples=2)
    assert (est.n_draws, est.n_samples) == (4, 2) and "n_draws=4" in repr(est)


# -- misuse -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_draws", [1, 0, 2.5, True])
def test_vimco_refuses_fewer_than_two_draws(n_draws):
    with pytest.raises(storch.OptionError, match="n_draws"):
        storch.estimator("vimco", plate="z", n_draws=n_draws)


def test_vimco_refuses_log_weights_of_the_wrong_shape():
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=THETA.clone().requires_grad_(True)))
        with pytest.raises(storch.CostError, match=r"per-sample shape \(3,\).*got \(3, 2\)"):
            est.bound(Bernoulli(logits=PRIOR).log_prob(z))  # not reduced over the draw's own dim


def test_a_per_draw_cost_on_a_vimco_node_is_told_to_use_the_bound():
    # a cost per draw (per-sample shape (K,)): the core's "one number per sample" error names vimco's bound
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=THETA.clone().requires_grad_(True)))
        with pytest.raises(storch.CostError, match=r"per-sample shape \(3,\).*est\.bound\(log_w\)"):
            storch.add_cost(z.sum(-1), name="fit")
    with storch.Graph():  # another estimator's node: no vimco hint
        z = storch.estimator("score", plate="z", n_samples=2)(Bernoulli(logits=THETA.clone().requires_grad_(True)))
        with pytest.raises(storch.CostError, match=r"per-sample shape \(2,\)") as e:
            storch.add_cost(z, name="fit")
        assert "bound" not in str(e.value)


def test_vimco_refuses_the_bound_of_another_node_or_step():
    theta = THETA.clone().requires_grad_(True)
    est, other = storch.estimator("vimco", plate="z", n_draws=K), storch.estimator("vimco", plate="y", n_draws=K)
    with storch.Graph():
        with pytest.raises(storch.StorchError, match="before the estimator drew"):
            est.bound(torch.zeros(K))
    with storch.Graph():
        est(Bernoulli(logits=theta))
        y = other(Bernoulli(logits=theta))
        with pytest.raises(storch.PlateError, match=r"do not come from this step's draws of plate 'z'.*\['y'\]"):
            est.bound(bernoulli_log_w(y, theta))
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        old = bernoulli_log_w(z, theta)
    with storch.Graph():
        with pytest.raises(storch.StorchError, match="before the estimator drew"):
            est.bound(old)  # this step has not drawn yet
        est(Bernoulli(logits=theta))
        with pytest.raises(storch.PlateError, match="do not come from this step's draws"):
            est.bound(old)  # the draws of the previous step


def test_vimco_refuses_log_weights_of_a_later_node():
    theta = THETA.clone().requires_grad_(True)
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=theta))
        y = storch.estimator("score", plate="y")(Bernoulli(logits=z.sum(-1)))
        with pytest.raises(storch.PlateError, match=r"nodes sampled after it \(\['y'\]\)") as info:
            est.bound(bernoulli_log_w(z, theta) + y)
    # the message names both ways out (found by porting a hierarchical IWAE, p-vi)
    assert "one torch Distribution of the joint" in str(info.value)
    assert "under 'score'" in str(info.value)


def test_vimco_refuses_a_second_bound_of_one_set():
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        theta = THETA.clone().requires_grad_(True)
        z = est(Bernoulli(logits=theta))
        est.bound(bernoulli_log_w(z, theta))
        with pytest.raises(storch.StorchError, match="already called"):
            est.bound(bernoulli_log_w(z, theta))


@pytest.mark.parametrize("how", ["not called", "not added", "scaled"])
def test_vimco_needs_the_bound_itself_as_a_cost(how):
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        theta = THETA.clone().requires_grad_(True)
        z = est(Bernoulli(logits=theta))
        log_w = bernoulli_log_w(z, theta)
        if how == "not called":
            storch.add_cost(negative_bound(log_w), name="by_hand")
        elif how == "not added":
            est.bound(log_w)
            storch.add_cost(negative_bound(log_w), name="by_hand")
        else:
            storch.add_cost(2 * est.bound(log_w), name="scaled")
        message = "was not called" if how == "not called" else "was not added as a cost"
        with pytest.raises(storch.StorchError, match=message):
            storch.surrogate_loss()


def test_vimco_refuses_a_bound_that_shares_its_name():
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        theta = THETA.clone().requires_grad_(True)
        z = est(Bernoulli(logits=theta))
        storch.add_cost(est.bound(bernoulli_log_w(z, theta)), name="loss")
        storch.add_cost(z.sum(), name="loss")
        with pytest.raises(storch.CostError, match="shares its cost name 'loss'"):
            storch.surrogate_loss()


def numpy_log_p(z):
    """log p(z) + log p(x | z) of the Bernoulli model computed outside torch (numpy), per draw: (..., D) -> (...)."""
    import numpy as np

    prior, like = PRIOR.numpy(), LIKELIHOOD.numpy()
    return (z * prior - np.logaddexp(0.0, prior)).sum(-1) + (z * like).sum(-1)


def black_box_log_w(z, theta, how):
    """log w of the Bernoulli model with log p from numpy (a black box); log q in torch, or in numpy too."""
    log_p = numpy_log_p(z.tensor.detach().numpy())
    log_q = Bernoulli(logits=theta.unsqueeze(-2)).log_prob(z).sum(-1)
    if how == "log q in torch":
        return storch.PlateTensor(torch.as_tensor(log_p), z.plates) - log_q
    return storch.PlateTensor(torch.as_tensor(log_p - log_q.tensor.detach().numpy()), z.plates)


def test_vimco_refuses_log_weights_without_gradient_while_q_is_trained():
    """log w computed outside torch (log q in numpy) loses the bound's direct term ∇L: refused, not biased
    (it was z = 15.7 off the exact gradient). Under torch.no_grad, or with a q whose parameters need no grad,
    there is no gradient to lose: accepted; log-weights of the draws alone (no log q) are accepted when
    bound() is told so (independent_of_q=True; z-tested in the Poisson test below)."""
    theta = THETA.clone().requires_grad_(True)
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=theta))
        with pytest.raises(storch.CostError, match=r"carry no gradient.*Bernoulli.*q\.log_prob\(z\)"):
            est.bound(black_box_log_w(z, theta, "all numpy"))
        storch.add_cost(est.bound(black_box_log_w(z, theta, "log q in torch")), name="bound")  # the step goes on
        storch.surrogate_loss()
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=THETA))
        storch.add_cost(est.bound(black_box_log_w(z, THETA, "all numpy")), name="bound")
    with storch.Graph(), torch.no_grad():
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=theta))
        storch.add_cost(est.bound(black_box_log_w(z, theta, "all numpy")), name="bound")
    with storch.Graph():  # log w of the draws alone, said so: no check
        est = storch.estimator("vimco", plate="z", n_draws=K)
        z = est(Bernoulli(logits=theta))
        log_w = storch.PlateTensor(torch.as_tensor(numpy_log_p(z.tensor.numpy())), z.plates)
        storch.add_cost(est.bound(log_w, independent_of_q=True), name="bound")
        storch.surrogate_loss()


def test_vimco_with_a_black_box_log_p_and_log_q_in_torch_is_unbiased():
    """The path the refusal points to: log p from numpy wrapped with z.plates, log q from torch."""
    replicates = 3000
    torch.manual_seed(2)
    with storch.Graph():
        leaf, theta = replicate(THETA, replicates)
        est = storch.estimator("vimco", plate="z", n_draws=K, n_samples=2)
        z = est(Bernoulli(logits=theta))
        storch.add_cost(est.bound(black_box_log_w(z, theta, "log q in torch")), name="negative_bound")
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    result = assert_unbiased(got, derivatives(exact_bernoulli, THETA, 1)[0], "vimco, black-box log p")
    print(f"\nvimco, black-box log p, log q in torch: max |z| {result.max_abs_z:.2f}")


class _NoExpand(Bernoulli):
    def __init__(self, logits):  # an __init__ of its own: torch's Bernoulli.expand refuses the subclass
        super().__init__(logits=logits)


class _SummedLogProb(Bernoulli):
    def log_prob(self, value):  # one value for all batch entries: no log q(z_k) per draw
        return super().log_prob(value).sum(-1)


def test_vimco_refuses_distributions_it_cannot_copy_or_score_per_draw():
    theta = THETA.clone().requires_grad_(True)
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match="_NoExpand.expand, which raised NotImplemented"):
            storch.estimator("vimco", plate="z", n_draws=K)(_NoExpand(theta))
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match="one value per batch entry"):
            storch.estimator("vimco", plate="z", n_draws=K)(_SummedLogProb(logits=theta))


class _CountOf4(Binomial):
    def __init__(self, logits):  # fixes total_count: torch's Binomial.expand cannot build it
        super().__init__(4, logits=logits)


class _CountOf4WithExpand(_CountOf4):
    def expand(self, batch_shape, _instance=None):
        return _CountOf4WithExpand(self.logits.expand(batch_shape))


def test_vimco_supports_agrees_with_its_refusal_of_a_subclass_torch_cannot_expand():
    """A Binomial subclass with an __init__ of its own (total_count fixed at 4): vimco.supports said True (its class
    has Binomial.expand), then the call failed in torch's expand ("must also define a custom .expand() method"),
    with a message that said expand was not implemented. Now supports() says False, and the refusal gives torch's
    reason and what to do: define expand, or build a Binomial itself. With an expand of its own it is supported."""
    theta = THETA.clone().requires_grad_(True)
    vimco = storch.get_estimator_class("vimco")
    assert vimco.supports(Binomial(4, logits=theta)) and not vimco.supports(_CountOf4(theta))
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError,
                                       match=r"(?s)_CountOf4.expand, which raised NotImplementedError.*custom "
                                             r"\.expand\(\) method.*define _CountOf4.expand, or.*build a Binomial itself"):
        storch.estimator("vimco", plate="z", n_draws=K)(_CountOf4(theta))
    assert vimco.supports(_CountOf4WithExpand(theta))
    with storch.Graph():
        z = storch.estimator("vimco", plate="z", n_draws=K)(_CountOf4WithExpand(theta))
        assert z.shape == (K, D)  # the K copies ahead of the batch dims


def test_a_finished_vimco_step_leaves_no_cycles():
    """Its per-node record holds the bound and a weak reference to the graph: freed by reference counting."""
    est = storch.estimator("vimco", plate="z", n_draws=K)
    theta = THETA.clone().requires_grad_(True)

    def step():
        x = storch.denote_independent(X, 0, "data")
        z = est(Bernoulli(logits=theta + x))
        storch.add_cost(est.bound(bernoulli_log_w(z, theta + x, x)), name="bound")
        storch.backward()

    n, kinds = unreachable_after(step, warmups=1)
    assert n == 0, kinds


def test_vimco_a_set_with_every_other_draw_impossible_has_a_finite_gradient():
    """Draw 0 possible, draw 1 impossible under the prior (log w_1 = -inf): the bound is finite, but draw 0's
    leave-one-out baseline is +inf, and (1 - MagicBox(l_0)) · b_0 was 0 · inf = NaN (storch.backward()
    discarded the step). Such a b_k is replaced by 0 (any function of the other draws is a baseline): the
    gradient is Σ_k (L - b_k) ∇l_k + ∇L with b_0 = 0 and b_1 = L with log w_1 replaced by log w_0."""
    theta = torch.tensor([0.2, -0.4, 0.6], dtype=torch.float64, requires_grad=True)
    prior = Categorical(logits=torch.tensor([0.0, 0.3, -math.inf], dtype=torch.float64))
    for seed in range(40):  # a seed whose set holds one possible and one impossible draw
        torch.manual_seed(seed)
        with storch.Graph():
            est = storch.estimator("vimco", plate="z", n_draws=2)
            z = est(Categorical(logits=theta))
            log_w = prior.log_prob(z) - Categorical(logits=theta).log_prob(z)
            if not (torch.isfinite(log_w.tensor).sum() == 1):
                continue
            storch.add_cost(est.bound(log_w), name="negative_iwae")
            (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
            draws = z.tensor.reshape(2)
        break
    else:
        pytest.fail("no seed drew one possible and one impossible value")
    assert torch.isfinite(g).all()
    lq = torch.log_softmax(theta, -1)[draws]  # l_k, with gradient
    lw = prior.log_prob(draws) - lq
    possible = torch.isfinite(lw.detach())
    bound = -(torch.logsumexp(lw[possible], 0) - math.log(2))  # the impossible draw adds w = 0
    mean_other = torch.where(possible, lw.detach(), lw.detach()[possible].expand(2))  # b_1: log w_1 := log w_0
    b = torch.where(possible, torch.zeros(2, dtype=torch.float64), -(torch.logsumexp(mean_other, 0) - math.log(2)))
    (want,) = torch.autograd.grad(bound + ((bound.detach() - b) * lq).sum(), theta)
    torch.testing.assert_close(g, want)


def k_by_k_baselines(log_w: torch.Tensor) -> torch.Tensor:
    """The former O(K²) baselines, the reference: row k of a K x K tensor is log w with log w_k replaced by the
    mean of the others; b_k = -(logsumexp(row k) - log K), a non-finite b_k replaced by 0."""
    k = log_w.shape[-1]
    eye = torch.eye(k, dtype=torch.bool)
    rows = log_w.unsqueeze(-2).expand(*log_w.shape[:-1], k, k)  # rows[..., k, j] = log w_j
    others = torch.where(eye, torch.zeros_like(rows), rows).sum(-1, keepdim=True) / (k - 1)
    b = -(torch.logsumexp(torch.where(eye, others, rows), -1) - math.log(k))
    return torch.where(torch.isfinite(b), b, torch.zeros_like(b))


def test_vimco_linear_baselines_equal_the_k_by_k_formula():
    """The O(K) baselines (the largest weight summed apart, the others' mean from the total) equal the K x K
    formula on 120 random sets: K from 2 to 300, spreads up to 60, -inf log-weights at rates 0 to 1 (whole
    sets of -inf, one possible draw), a dominating weight (+200), ties of the largest, and +inf / NaN."""
    gen = torch.Generator().manual_seed(0)
    for seed in range(120):
        k = int(torch.randint(2, 6 if seed % 3 == 0 else 300, (), generator=gen))
        log_w = (torch.randn(2, 3, k, generator=gen, dtype=torch.float64) * float(torch.rand((), generator=gen) * 60)
                 - float(torch.rand((), generator=gen) * 100))
        log_w[torch.rand(log_w.shape, generator=gen) < float(torch.rand((), generator=gen)) ** 2] = -math.inf
        if seed % 5 == 0:
            log_w[..., 0] += 200.0
        if seed % 7 == 0:
            log_w[..., -1] = log_w[..., 0]
        want, got = k_by_k_baselines(log_w), leave_one_out_log_baselines(log_w)
        assert torch.equal(want == 0, got == 0), (seed, log_w, want, got)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for row in ([math.inf, 1.0, 2.0], [math.inf, -math.inf, 2.0], [math.nan, 1.0, 2.0], [math.inf, math.inf, 0.0],
                [-math.inf] * 3, [math.inf, -math.inf, -math.inf], [0.0, -math.inf], [-math.inf, 5.0, -math.inf]):
        log_w = torch.tensor(row, dtype=torch.float64)
        assert torch.isfinite(leave_one_out_log_baselines(log_w)).all(), row
        torch.testing.assert_close(leave_one_out_log_baselines(log_w), k_by_k_baselines(log_w), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vimco_linear_baselines_of_a_far_dominating_draw(dtype):
    """Review (r-nine): shifted by the largest log-weight, the largest draw's own terms underflowed to 0 once every
    other draw lay ~103 nats below it in float32 (745 in float64): its b was +inf, then 0, where the K x K form
    gives 121.39 for log w [0, -120, -130, -140]; at K = 1000 with a spread of ~1000 nats the top draw was off by up
    to 3134. It is shifted by the largest of the other log-weights now."""
    far = 800.0 if dtype == torch.float64 else 120.0
    log_w = torch.tensor([0.0, -far, -far - 10, -far - 20], dtype=dtype)
    want = k_by_k_baselines(log_w.double())
    got = leave_one_out_log_baselines(log_w)
    assert float(want[0]) > far  # the reference is finite and large
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-4)
    gen = torch.Generator().manual_seed(3)
    log_w = torch.randn(8, 1000, generator=gen, dtype=torch.float64) * 300 - 60
    want = k_by_k_baselines(log_w)
    torch.testing.assert_close(leave_one_out_log_baselines(log_w.to(dtype)).double(), want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vimco_linear_baselines_keep_the_dtype_and_its_precision(dtype):
    """In float32 at K = 1000, log-weights of spread ~50 around -60: within 2e-7 (relative) of float64, as the
    K x K formula in float32 (measured: 7e-8 both; prefix sums by logcumsumexp 9e-8 to 1.3e-7). Half
    precisions are computed in float32 (K log-weights of -60 sum past float16's 65504) and rounded once."""
    gen = torch.Generator().manual_seed(1)
    log_w = torch.randn(16, 1000, generator=gen, dtype=torch.float64) * 12.5 - 60
    want = leave_one_out_log_baselines(log_w)
    got = leave_one_out_log_baselines(log_w.to(dtype))
    assert got.dtype == dtype
    rel = float(((got.double() - want).abs() / want.abs()).max())
    eps = torch.finfo(dtype).eps
    assert rel < (2e-7 if dtype == torch.float32 else eps), (dtype, rel)
    if dtype == torch.float32:
        old = float(((k_by_k_baselines(log_w.float()).double() - want).abs() / want.abs()).max())
        assert rel < 2 * old + 1e-8, (rel, old)


def test_vimco_with_many_draws_builds_no_k_by_k_tensor():
    """p-cliffs2: the baselines were built from K x K tensors per set (K = 4096, 16 data points: 2.5 s and
    2.3 GB a step). A step of K = 512 draws of 3 Bernoullis for 2 data points, surrogate and backward,
    now returns no tensor larger than a few times K x data x D (K² = 262144 elements)."""
    n = 512
    torch.manual_seed(0)
    theta = torch.zeros(D + 1, requires_grad=True)
    with Allocations() as spy, storch.Graph():
        x = storch.denote_independent(torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), 0, "data")
        est = storch.estimator("vimco", plate="z", n_draws=n)
        q = Bernoulli(logits=theta + x)
        z = est(q)
        log_w = Bernoulli(logits=torch.zeros(D + 1)).log_prob(z).sum(-1) + (z * x).sum(-1) - q.log_prob(z).sum(-1)
        storch.add_cost(est.bound(log_w), name="negative_iwae")
        storch.backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    assert spy.largest <= 8 * n * 2 * (D + 1), spy.largest


def test_vimco_names_a_data_plate_for_log_weights_with_a_batch_dim():
    est = storch.estimator("vimco", plate="z", n_draws=3)
    with storch.Graph():
        z = est(Bernoulli(logits=torch.zeros(8, 2, requires_grad=True)))
        with pytest.raises(storch.CostError, match=r"minibatch, put the batch on a data plate.*denote_independent"):
            est.bound(z.sum(-1))


def test_vimco_a_poisson_rate_of_exactly_zero_has_an_unbiased_finite_gradient():
    """q = Poisson(lam * mask) with mask 0 at one entry (a zero-inflated Poisson's rate): torch's log_prob has
    derivative 0 / 0 = NaN at rate 0 and value 0, which made every gradient NaN; through strict_support it is
    finite (-1 w.r.t. the rate, times d rate / d lam = 0). z-test of d/d lam_0 against enumeration over the
    two draws' counts (truncated at 40: the tail's mass at rate 0.9 is below 1e-40); d/d lam_1 is 0 exactly."""
    lam0 = torch.tensor([0.9, 1.3], dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def log_w(z):  # of each draw's counts (..., 2, 2) -> (..., 2)
        return -0.5 * ((z - torch.tensor([1.0, 0.0], dtype=torch.float64)) ** 2).sum(-1)

    def exact(lam):
        counts = torch.arange(41, dtype=torch.float64)
        z0 = torch.stack(torch.meshgrid(counts, counts, indexing="ij"), -1).reshape(-1, 2)  # draw k's count 0
        z = torch.stack([z0, torch.zeros_like(z0)], -1)  # (M, K=2, D=2): entry 1 is 0 at rate 0
        q = Poisson(lam[0]).log_prob(z0).sum(-1).exp()
        return (q * negative_bound(log_w(z))).sum()

    replicates = 4000
    torch.manual_seed(0)
    with storch.Graph():
        leaf, lam = replicate(lam0, replicates)
        est = storch.estimator("vimco", plate="z", n_draws=2)
        z = est(Poisson(lam * mask))
        storch.add_cost(est.bound(log_w(z), independent_of_q=True), name="negative_bound")  # f(z_k) alone
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert torch.isfinite(got).all()
    assert (got[:, 1] == 0).all()
    want = derivatives(exact, lam0, order=1)[0]
    report = assert_unbiased(got[:, :1], want[:1], "vimco, Poisson rate 0: gradient")
    print(f"\nmax |z| {report.max_abs_z:.2f}")


class _TwoLayerPosterior(torch.distributions.Distribution):
    """q(z1, z2) = q(z1) q(z2 | z1) of a 2-layer sigmoid belief net as ONE distribution (docs/estimators/vimco.md,
    "Several stochastic layers"): each draw is a path through both layers; value = cat(z1, z2)."""

    arg_constraints = {"logits1": torch.distributions.constraints.real}
    support = torch.distributions.constraints.boolean
    has_rsample = False

    def __init__(self, logits1, w2, b2, validate_args=None):  # (storch rebuilds it from its attributes)
        self.logits1, self.w2, self.b2 = logits1, w2, b2
        super().__init__(logits1.shape[:-1], torch.Size([logits1.shape[-1] + 1]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return _TwoLayerPosterior(self.logits1.expand(*batch_shape, self.logits1.shape[-1]), self.w2, self.b2)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            z1 = torch.bernoulli(torch.sigmoid(self.logits1.expand(*sample_shape, *self.logits1.shape)))
            z2 = torch.bernoulli(torch.sigmoid(z1 @ self.w2 + self.b2)).unsqueeze(-1)
        return torch.cat([z1, z2], -1)

    def log_prob(self, v):
        z1, z2 = v[..., :-1], v[..., -1]
        return (Bernoulli(logits=self.logits1, validate_args=False).log_prob(z1).sum(-1)
                + Bernoulli(logits=z1 @ self.w2 + self.b2, validate_args=False).log_prob(z2))


def test_vimco_over_two_layers_written_as_one_joint_distribution_is_unbiased():
    """Two nodes (z1, then z2 | z1) are refused (test_vimco_refuses_log_weights_of_a_later_node); the docs' way for
    the paper's multi-layer SBNs is one joint distribution, whose draws are whole paths: z-test of the gradient in
    the encoder (θ1, w2, b2) and the generative weights against enumeration of the K joint draws."""
    k, h = 2, 2
    theta0 = torch.tensor([0.3, -0.5, 0.8, -0.6, 0.2, 0.5, -1.0, 0.7], dtype=torch.float64)  # θ1 (2), w2 (2), b2, v (3)

    def parts(th):
        return th[:2], th[2:4], th[4], th[5:]

    def log_w(th, z, q):
        _, _, _, v = parts(th)
        z1, z2 = z[..., :h], z[..., h]
        log_p = (Bernoulli(logits=PRIOR).log_prob(z1).sum(-1) + Bernoulli(logits=z1 @ v[:2] + v[2]).log_prob(z2))
        return log_p - q.log_prob(z)

    def exact(th):
        t1, w2, b2, _ = parts(th)
        q = _TwoLayerPosterior(t1, w2, b2)
        z = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k * (h + 1))), dtype=th.dtype).view(-1, k, h + 1)
        lw = log_w(th, z, q)
        return (q.log_prob(z).sum(-1).exp() * -(torch.logsumexp(lw, -1) - math.log(k))).sum()

    th = theta0.clone().requires_grad_()
    want = torch.autograd.grad(exact(th), th)[0]
    torch.manual_seed(0)
    est = storch.estimator("vimco", plate="z", n_draws=k)
    grads = []
    for _ in range(400):
        th = theta0.clone().requires_grad_()
        t1, w2, b2, _ = parts(th)
        with storch.Graph():
            copies = storch.denote_independent(t1.expand(8, h), 0, "copies")
            q = _TwoLayerPosterior(copies, w2, b2)
            z = est(q)
            storch.add_cost(est.bound(log_w(th, z, q)), name="niwae")
            grads.append(torch.autograd.grad(storch.surrogate_loss(), th)[0])
    assert_unbiased(torch.stack(grads), want, "vimco, a 2-layer posterior as one distribution")


def test_an_order_error_lists_vimco_only_for_its_own_cost_form():
    """p-higher F1: the OrderError of a max_order-1 node listed vimco among the estimators to switch to for a
    Bernoulli node, but vimco does not take the node's costs as they are (only est.bound(log_w))."""
    th = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("unordered_set", plate="z", n_samples=2)(Bernoulli(logits=th))
        storch.add_cost((z - 0.3).pow(2).sum(), name="c")
        with pytest.raises(storch.OrderError) as e:
            storch.surrogate_loss(order=2)
    listed = str(e.value).split("for this node's Bernoulli: ")[1]
    assert "score, " in listed and "vimco (only for costs written its own way: see its docs)" in listed


def test_an_order_error_of_a_partition_lists_the_estimators_that_support_partitions():
    """p-seq F1: for one estimator called at several steps, the OrderError listed expect, importance and vimco as
    replacements, which each refuse a partition; they are now offered as one estimator per step."""
    th = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        est = storch.estimator("unordered_set", plate="z", n_samples=3)
        z = est(Categorical(logits=th))
        z2 = est(Categorical(logits=th + z.float()))
        storch.add_cost((z2 - 0.3).pow(2), name="c")
        with pytest.raises(storch.OrderError) as e:
            storch.surrogate_loss(order=2)
    message = str(e.value)
    together, per_step = message.split("and for a partition: ")[1].split("; or one estimator per step: ")
    assert "score" in together and "expect" not in together and "vimco" not in together
    assert "expect" in per_step and "vimco (only for costs written its own way" in per_step


def test_a_second_call_of_vimco_points_to_its_recipe_for_sequences():
    """p-seq F2: one vimco called at several steps was refused with "create one estimator per stochastic node" only;
    for a bound over a whole sequence its docs recommend one joint distribution, which the refusal now names."""
    th = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        est = storch.estimator("vimco", plate="z", n_draws=2)
        z = est(Bernoulli(logits=th))
        with pytest.raises(storch.PlateError, match=r"one estimator per stochastic node.*one joint torch Distribution.*"
                                                     r"docs/estimators/vimco.md"):
            est(Bernoulli(logits=th + z.float().mean(0)))


def test_vimco_reads_log_p_at_drawn_values_without_the_underflow_check(monkeypatch):
    """vimco reads log p only at its draws, which a Categorical's underflowed (-1e9) logit never is: it passes
    drawn_only=True to strict_support, which skips the per-call softmax and value read that the enumerating
    estimators need (33-80 us a call when every caller paid it); expect still takes that path (the control)."""
    import storch.distributions.support as support

    calls = []
    real = support._underflowed_logits
    monkeypatch.setattr(support, "_underflowed_logits", lambda *a: calls.append(1) or real(*a))
    logits = torch.tensor([0.3, -1e9, -0.2], requires_grad=True)
    for name, options in (("vimco", {"n_samples": 3}), ("expect", {})):
        calls.clear()
        with storch.Graph():
            est = storch.estimator(name, plate="z", **options)
            z = est(Categorical(logits=logits))
            log_w = -(z.float() - 0.4) ** 2 - Categorical(logits=logits).log_prob(z)
            storch.add_cost(est.bound(log_w) if name == "vimco" else -log_w)
            storch.surrogate_loss().backward()
        assert (len(calls) > 0) == (name == "expect"), (name, calls)
