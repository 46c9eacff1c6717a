"""straight_through: the plain straight-through estimator (Bengio et al. 2013; DreamerV2), x = b + (p - ⊥p).

Checked: (1) for a fixed draw its gradient is the hand-written ``hard + p - p.detach()`` step's, in float64, for
every distribution it takes, on a data plate and over a partition (one estimator at every step), and equals torch's
``OneHotCategoricalStraightThrough.rsample`` with the same seed; (2) it is declared biased, and its bias is what the
math says: none where the cost is linear in each variable on its own (a linear cost: every draw's gradient is exact;
a multilinear one: z-tested against enumeration), E[∇_b f(b)]ᵀ ∂p/∂θ where it is not (a quadratic cost: z-tested
against that expectation, enumerated, and far from the exact gradient); (3) refusals with the fix; (4) its order:
declared ∞, and the order-2 estimate is unbiased exactly where order 1 is (multilinear costs) and biased as the
math says elsewhere.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import (Bernoulli, Categorical, Distribution, Independent, Normal, OneHotCategorical,
                                 OneHotCategoricalStraightThrough, Poisson)

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test
from storch_relaxed import StraightThrough

D = torch.float64
R = 4000  # independent estimates per z-test


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    storch.reset()


def test_straight_through_is_in_the_registry_declared_biased_at_every_order():
    info = storch.available_estimators()["straight_through"]
    assert (info.package, info.family, info.max_order, info.biased) == ("storch-estimators-relaxed", "relaxed",
                                                                          math.inf, True)
    assert storch.get_estimator_class("straight_through") is StraightThrough
    assert StraightThrough.supports_partitions and not StraightThrough.pathwise


# -- (1) the gradient of a fixed draw is the hand-written step's -------------------------------------------------

_G = torch.Generator().manual_seed(3)
X = torch.randn(4, 3, generator=_G, dtype=D)  # 4 data points
W = torch.randn(3, 6, generator=_G, dtype=D)  # their parameters: logits of 6 entries per data point
V = torch.randn(6, generator=_G, dtype=D)


def _dist(case: str, h) -> Distribution:
    """The node's distribution from the logits ``h`` (shape (..., 6))."""
    if case == "bernoulli_logits":
        return Bernoulli(logits=h)
    if case == "bernoulli_probs":
        return Bernoulli(probs=torch.sigmoid(h))
    if case == "independent_bernoulli":
        return Independent(Bernoulli(logits=h), 1)
    if case == "categorical":
        return Categorical(logits=h)
    if case == "onehot":
        return OneHotCategorical(logits=h)
    if case == "onehot_unimix":  # DreamerV3's: 0.99 softmax + 0.01 uniform, 2 groups of 3 classes
        return Independent(OneHotCategorical(probs=0.99 * h.unflatten(-1, (2, 3)).softmax(-1) + 0.01 / 3), 1)
    raise ValueError(case)


def _cost(z):
    """Not linear in z (so the gradient reads the drawn value), one number per sample."""
    flat = z.flatten(-2) if z.shape[-1] == 3 else z  # (unimix: 2 groups of 3 classes)
    return torch.tanh((flat * V).sum(-1) - 0.3) ** 2 + (flat ** 2 * V.abs()).sum(-1)


CASES = ["bernoulli_logits", "bernoulli_probs", "independent_bernoulli", "categorical", "onehot", "onehot_unimix"]


@pytest.mark.parametrize("case", CASES)
def test_straight_through_gradient_is_the_hand_written_step_for_a_fixed_draw(case):
    w = W.clone().requires_grad_(True)
    est = storch.estimator("straight_through", plate="z", n_samples=3, categorical="one_hot")
    torch.manual_seed(0)
    with storch.Graph():
        x = storch.denote_independent(X, 0, "data")
        z = est(_dist(case, x @ w))
        assert [p.name for p in z.plates] == ["z", "data"]
        drawn = z.tensor.detach().clone()
        storch.add_cost(_cost(z))
        g_storch, = torch.autograd.grad(storch.surrogate_loss(), w)
    # the values handed out are exact samples: 0/1, one-hot vectors for the categoricals (a Categorical too)
    assert set(drawn.unique().tolist()) <= {0.0, 1.0}
    if case.startswith(("categorical", "onehot")):
        assert (drawn.sum(-1) == 1).all() and drawn.shape[-1] in (3, 6)
    # by hand, the same draw: x = b + (p - ⊥p), the mean over the samples and the data points
    d = _dist(case, X @ w)
    p = d.base_dist.probs if isinstance(d, Independent) else d.probs
    hand = _cost(drawn + (p - p.detach())).mean()
    g_hand, = torch.autograd.grad(hand, w)
    assert g_hand.abs().max() > 1e-3
    torch.testing.assert_close(g_storch, g_hand, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["bernoulli", "onehot"])
def test_straight_through_partition_gradient_is_the_hand_written_loop(case):
    """One estimator called at each of T steps (a world model's latent): one plate, and the gradient of the loop
    written by hand with the same draws (each step's logits read the previous step's value, so the gradient
    flows through b + (p - ⊥p) of every earlier step)."""
    steps, n = 5, 2
    w = W.clone().requires_grad_(True)
    u = (0.5 * torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=D)).requires_grad_(True)
    dist = Bernoulli if case == "bernoulli" else OneHotCategorical
    est = storch.estimator("straight_through", plate="z", n_samples=n)
    shapes = []  # the path: a later step draws one value per sequence (the draw hook, shape ()), not n per prefix
    draw = est.draw
    est.draw = lambda d, shape: (shapes.append((tuple(shape), tuple(d.batch_shape))), draw(d, shape))[1]
    torch.manual_seed(1)
    with storch.Graph():
        x = storch.denote_independent(X, 0, "data")
        prev, drawn = torch.zeros(6, dtype=D), []
        for _ in range(steps):
            prev = est(dist(logits=x @ w + prev @ u))
            drawn.append(prev.tensor.detach().clone())
            storch.add_cost(_cost(prev), name="c")
        batch = (6,) if case == "bernoulli" else ()
        assert shapes == [((n,), (4,) + batch)] + [((), (n, 4) + batch)] * (steps - 1)
        assert [(p.name, p.size, p.step) for p in prev.plates] == [("z", n, steps - 1), ("data", 4, 0)]
        loss = storch.surrogate_loss()
        g_storch = torch.autograd.grad(loss, (w, u))
    prev, hand = torch.zeros(6, dtype=D), 0.0
    for t in range(steps):
        p = dist(logits=X @ w + prev @ u).probs
        prev = drawn[t] + (p - p.detach())  # (n, 4, 6): sample i continues sample i
        hand = hand + _cost(prev).mean()
    g_hand = torch.autograd.grad(hand, (w, u))
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=1e-14)
    for a, b in zip(g_storch, g_hand):
        assert b.abs().max() > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_straight_through_equals_torchs_one_hot_categorical_straight_through_with_the_same_seed():
    """torch's OneHotCategoricalStraightThrough.rsample is this estimator: the same draws (one seed) and gradient."""
    theta = torch.tensor([[0.3, -0.2, 1.1], [0.0, 0.5, -0.7]], dtype=D, requires_grad=True)
    est = storch.estimator("straight_through", plate="z", n_samples=5)
    torch.manual_seed(2)
    with storch.Graph():
        z = est(OneHotCategorical(logits=theta))
        storch.add_cost(_cost(z))
        value = z.tensor.detach().clone()
        g_storch, = torch.autograd.grad(storch.surrogate_loss(), theta)
    torch.manual_seed(2)
    x = OneHotCategoricalStraightThrough(logits=theta).rsample((5,))
    assert torch.equal(x.detach(), value)
    g_torch, = torch.autograd.grad(_cost(x).mean(), theta)
    torch.testing.assert_close(g_storch, g_torch, rtol=1e-12, atol=1e-14)


# -- (2) and (4): its bias, at orders 1 and 2, against enumeration --------------------------------------------------

class Problem:
    """Independent discrete nodes with parameters θ and a cost of their values; the exact expectation and the
    expectation of the straight-through estimate, both by enumerating the joint support."""

    def __init__(self, theta: torch.Tensor, dists: Callable[[torch.Tensor], list], cost: Callable[[list], torch.Tensor]):
        self.theta, self.dists, self.cost = theta, dists, cost

    def model(self, x) -> None:
        ests = [storch.estimator("straight_through", plate=f"z{i}") for i in range(len(self.dists(self.theta)))]
        storch.add_cost(self.cost([e(d) for e, d in zip(ests, self.dists(x))]))

    def _joint(self, theta):
        """(probability, values) of every joint value of the nodes."""
        supports = []
        for d in self.dists(theta):
            if isinstance(d, Bernoulli):
                supports.append([theta.new_tensor(v) for v in itertools.product([0.0, 1.0], repeat=d.batch_shape[0])])
            else:
                supports.append(list(torch.eye(d.event_shape[0], dtype=theta.dtype)))
        for values in itertools.product(*supports):
            prob = torch.stack([d.log_prob(v).sum() for d, v in zip(self.dists(theta), values)]).sum().exp()
            yield prob, list(values)

    def exact(self, theta) -> torch.Tensor:
        """E[f(b)]."""
        return sum(prob * self.cost(values) for prob, values in self._joint(theta))

    def straight_through(self, theta) -> torch.Tensor:
        """A function whose derivatives at θ are the expected straight-through estimates: Σ_b ⊥p(b) f(b + p - ⊥p)."""
        total = theta.new_zeros(())
        for prob, values in self._joint(theta):
            probs = [d.probs for d in self.dists(theta)]
            total = total + prob.detach() * self.cost([b + (p - p.detach()) for b, p in zip(values, probs)])
        return total

    def derivatives(self, fn) -> list[torch.Tensor]:
        g = torch.autograd.functional.jacobian(fn, self.theta).reshape(-1)
        h = torch.autograd.functional.hessian(fn, self.theta)
        return [g, h.reshape(g.numel(), g.numel())]

    def estimates(self, order: int, n: int = R) -> list[torch.Tensor]:
        with storch.Graph():
            leaf, x = replicate(self.theta, n)  # (the replicates are a data plate)
            self.model(x)
            return per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)


TOY = torch.tensor([0.3, -0.5, 1.0], dtype=D)
VALUES = torch.arange(5, dtype=D)  # category k has value k
A = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.5, -1.0], [-0.8, 0.2, 2.0]], dtype=D)


def _bernoulli(theta):
    return [Bernoulli(logits=theta)]


def _categorical(theta):
    return [OneHotCategorical(logits=theta)]


def _two_categoricals(theta):
    return [OneHotCategorical(logits=theta[0]), OneHotCategorical(logits=theta[1])]


PROBLEMS = {
    # multilinear in b (each b_j at most once per term): E[f(b)] = f(p), the estimate unbiased at every order
    "bernoulli_multilinear": Problem(TOY, _bernoulli, lambda v: (v[0][..., 0] * v[0][..., 1] - 1.5 * v[0][..., 0] * v[0][..., 2]
                                                                  + 2 * v[0][..., 1] * v[0][..., 2]
                                                                  + 0.7 * v[0][..., 0] * v[0][..., 1] * v[0][..., 2])),
    # bilinear in two independent one-hot vectors: x1ᵀ A x2
    "categorical_bilinear": Problem(torch.tensor([[0.2, -0.4, 0.9], [0.0, 0.6, -1.1]], dtype=D), _two_categoricals,
                                    lambda v: (v[0] * (v[1].unsqueeze(-2) * A).sum(-1)).sum(-1)),
    # the REBAR toy, quadratic in b: biased, (2p - 1) p' per entry at order 1
    "bernoulli_quadratic": Problem(TOY, _bernoulli, lambda v: ((v[0] - 0.45) ** 2).sum(-1)),
    # (v·x - 1.7)², quadratic in the one-hot x
    "categorical_quadratic": Problem(torch.tensor([0.2, -0.4, 0.9, 0.0, -1.1], dtype=D), _categorical,
                                     lambda v: ((v[0] * VALUES).sum(-1) - 1.7) ** 2),
}
# the same two costs as the quadratic ones on every value of the support, written linearly (a lookup table)
LINEAR = {
    "bernoulli": Problem(TOY, _bernoulli, lambda v: (v[0] * ((1 - 0.45) ** 2 - 0.45 ** 2)).sum(-1)),
    "categorical": Problem(PROBLEMS["categorical_quadratic"].theta, _categorical,
                           lambda v: (v[0] * (VALUES - 1.7) ** 2).sum(-1)),
}


@pytest.mark.parametrize("name", sorted(LINEAR))
def test_straight_through_is_exact_for_every_draw_of_a_linear_cost(name):
    """f(b) = c·b: ∇_b f = c whatever b, so every draw's gradient is c ∂p/∂θ = ∇E[f(b)] (zero variance)."""
    problem = LINEAR[name]
    g, = problem.estimates(order=1, n=200)
    exact = problem.derivatives(problem.exact)[0]
    assert exact.abs().min() > 0.01
    torch.testing.assert_close(g, exact.expand_as(g), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["bernoulli_multilinear", "categorical_bilinear"])
def test_straight_through_is_unbiased_at_orders_1_and_2_for_a_multilinear_cost(name):
    torch.manual_seed(10)
    problem = PROBLEMS[name]
    g, h = problem.estimates(order=2)
    exact_g, exact_h = problem.derivatives(problem.exact)
    assert g.var(0).max() > 1e-3 and h.var(0).max() > 1e-3  # a z-test of random estimates, not of constants
    assert_unbiased(g, exact_g, f"{name}: gradient")
    assert_unbiased(h, exact_h, f"{name}: Hessian")


@pytest.mark.parametrize("name", ["bernoulli_quadratic", "categorical_quadratic"])
def test_straight_through_bias_of_a_quadratic_cost_is_the_maths(name):
    """E[ST] = E[∇_b f(b)]ᵀ ∂p/∂θ (enumerated): the estimates' mean is that (z-test), and that is not the exact
    gradient (|z| large), at order 1 and at order 2."""
    torch.manual_seed(11)
    problem = PROBLEMS[name]
    estimates = problem.estimates(order=2)
    for order, est, st, exact in zip((1, 2), estimates, problem.derivatives(problem.straight_through),
                                     problem.derivatives(problem.exact)):
        assert (st - exact).abs().max() > 0.02, "the math gives a bias here"
        assert_unbiased(est, st, f"{name}: order {order} against E[straight-through]")
        report = z_test(est, exact, f"{name}: order {order} against the exact derivative")
        print(report)
        assert report.max_abs_z > 10
    if name == "bernoulli_quadratic":  # the closed form at order 1: bias (2p - 1) p', of the sign of 2p - 1
        p = torch.sigmoid(TOY)
        bias = problem.derivatives(problem.straight_through)[0] - problem.derivatives(problem.exact)[0]
        torch.testing.assert_close(bias, (2 * p - 1) * p * (1 - p), rtol=1e-12, atol=1e-14)
        assert_unbiased(estimates[0] - problem.derivatives(problem.exact)[0], (2 * p - 1) * p * (1 - p), "bias")


def test_straight_through_order_2_is_accepted_as_declared():
    """max_order = ∞ (declared): an order-2 surrogate builds, where an estimator of max_order 1 (arm) is refused
    on the same node."""
    theta = TOY.clone().requires_grad_(True)
    with storch.Graph():
        PROBLEMS["bernoulli_quadratic"].model(theta)
        g, = torch.autograd.grad(storch.surrogate_loss(order=2), theta, create_graph=True)
        assert g.requires_grad
    with storch.Graph():
        b = storch.estimator("arm", plate="b")(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        with pytest.raises(storch.OrderError, match="unbiased only up to order 1"):
            storch.surrogate_loss(order=2)


# -- (3) refusals -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dist,match", [
    (Normal(torch.zeros(3), 1.0), r"does not support Normal.*Normal has rsample: its pathwise gradient is exact, use "
                                  r"'reparameterization' for this node"),
    (Independent(Normal(torch.zeros(3), 1.0), 1), r"use 'reparameterization' for this node"),
    (Poisson(torch.ones(3)), r"does not support Poisson; it needs one of Bernoulli, OneHotCategorical\. Estimators "
                             r"that support it: go\b"),  # (go, then the other families' where installed)
    (Categorical(logits=torch.zeros(3)), r"does not support a Categorical by default.*pass categorical='one_hot' to "
                                         r"'straight_through'.*estimator that hands out indices: score"),
])
def test_straight_through_refuses_what_it_cannot_take_with_the_fix(dist, match):
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match=match) as info:
        storch.estimator("straight_through", plate="z")(dist)
    if not isinstance(dist, (Normal, Independent)):
        assert "reparameterization' for this node" not in str(info.value)  # (no rsample: not suggested)


@pytest.mark.parametrize("option,match", [
    ("temperature", r"relaxes nothing.*use the estimator \"gumbel_straight_through\""),
    ("hard", r"already hard"),
    ("eos", r"eos= ends the sequences"),
    ("categorical", r"categorical=1 is not accepted; use 'refuse'"),
])
def test_straight_through_options_refused_with_what_to_do(option, match):
    with pytest.raises(storch.OptionError, match=match):
        storch.estimator("straight_through", plate="z", **{option: 1})


def test_straight_through_cost_that_reads_no_gradient_path_is_refused():
    """A cost reading b only through a comparison has no path to p: the gradient would be 0, refused."""
    theta = TOY.clone().requires_grad_(True)
    with storch.Graph():
        b = storch.estimator("straight_through", plate="b")(Bernoulli(logits=theta))
        storch.add_cost((b > 0.5).to(D).sum())
        with pytest.raises(storch.OrderError, match="'straight_through' on plate 'b'.*only through operations without "
                                                    "a derivative"):
            storch.surrogate_loss()


def test_straight_through_one_hot_of_a_categorical_index():
    """categorical="one_hot": a Categorical's node hands out one_hot(k) + (p - ⊥p), as OneHotCategorical's."""
    theta = torch.tensor([0.1, -0.3, 0.8, 0.0], dtype=D, requires_grad=True)
    est = storch.estimator("straight_through", plate="z", n_samples=6, categorical="one_hot")
    torch.manual_seed(3)
    with storch.Graph():
        z = est(Categorical(logits=theta))
        assert z.shape == (4,)
        raw = z.tensor.detach()
    torch.manual_seed(3)
    assert torch.equal(raw, F.one_hot(Categorical(logits=theta).sample((6,)), 4).to(D))


# -- review (r-49): orders 1-3 with a shared parameter; the limit of "multilinear"; the float-index hint ------------

def _p1(t):
    return torch.sigmoid(2 * t - 0.3)


def _p2(t):
    return torch.sigmoid(t ** 2 + 0.1 * t - 0.5)


def _shared_cost(b1, b2):
    return b1 * b2 - 0.7 * b1 + 1.3 * b2


@pytest.mark.parametrize("one_estimator", [False, True], ids=["two_plates", "one_partition"])
def test_straight_through_two_bernoullis_sharing_a_parameter_unbiased_at_orders_1_to_3(one_estimator):
    """b1 ~ σ(2θ - 0.3), b2 ~ σ(θ² + 0.1θ - 0.5), f = b1 b2 - 0.7 b1 + 1.3 b2 (multilinear). The surrogate's second
    derivative is p1'' x2 + 2 p1' p2' + x1 p2'' - 0.7 p1'' + 1.3 p2'' at x = b, whose expectation is p1'' p2 +
    2 p1' p2' + p1 p2'' - ..., the second derivative of E[f] = f(p1, p2); likewise at order 3."""
    theta = torch.tensor([0.4], dtype=D)

    def exact(t):
        return _shared_cost(_p1(t), _p2(t)).sum()

    want = [torch.func.grad(exact)(theta), torch.func.hessian(exact)(theta).reshape(1, 1),
            torch.func.jacfwd(torch.func.hessian(exact))(theta).reshape(1, 1)]
    torch.manual_seed(12)
    with storch.Graph():
        leaf, x = replicate(theta, 2 * R)
        e1 = storch.estimator("straight_through", plate="a", n_samples=2)
        e2 = e1 if one_estimator else storch.estimator("straight_through", plate="b", n_samples=2)
        b1, b2 = e1(Bernoulli(logits=2 * x - 0.3)), e2(Bernoulli(logits=x ** 2 + 0.1 * x - 0.5))
        storch.add_cost(_shared_cost(b1, b2).sum(-1))
        got = per_replicate_derivatives(storch.surrogate_loss(order=3), leaf, 3)
    for order, (est, exact_value) in enumerate(zip(got, want), 1):
        assert est.var(0).max() > 1e-3 and exact_value.abs().min() > 0.1
        assert_unbiased(est, exact_value, f"order {order}")


def test_straight_through_product_of_two_coordinates_of_one_one_hot_vector_is_biased():
    """Multilinear means linear in each independent variable: a Bernoulli, or a one-hot vector AS A WHOLE. x0 x1 of
    one one-hot x is linear in each coordinate but not in x (E[x0 x1] = 0, not p0 p1): E[ST] = ∇(p0 p1) ≠ 0."""
    theta = torch.tensor([0.2, -0.4, 0.9], dtype=D)
    problem = Problem(theta, _categorical, lambda v: v[0][..., 0] * v[0][..., 1])
    torch.manual_seed(13)
    g, = problem.estimates(order=1)
    exact = problem.derivatives(problem.exact)[0]
    st = problem.derivatives(problem.straight_through)[0]
    assert exact.abs().max() < 1e-12 and (st - exact).abs().max() > 0.04
    assert_unbiased(g, st, "against E[straight-through]")
    assert z_test(g, exact, "against the exact gradient 0").max_abs_z > 10


def test_straight_through_sample_used_as_an_index_names_it_in_the_hint():
    with storch.Graph():
        z = storch.estimator("straight_through", plate="z")(OneHotCategorical(logits=torch.zeros(3, requires_grad=True)))
        with pytest.raises(storch.PlateError, match=r"floating-point sample used as an index.*\bstraight_through\b"):
            torch.nn.Embedding(3, 2)(z)
