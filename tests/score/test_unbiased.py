"""Unbiasedness z-tests against exact enumeration (plain torch), 4000 seeded estimates each.

Every estimator of the family at orders 1 and 2 (the unordered set estimator with its baseline at
order 1, its max_order; without it at orders 1 and 2), score with leave-one-out also at order 3,
on three problems: one categorical node (K = 5); a two-node chain whose second distribution depends
on the first sample and whose cost depends on θ directly; a data plate with a Bernoulli node of
batch shape (2,) and two costs, one of which does not depend on the sample.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from score_problems import PROBLEMS, Maker, derivative_estimates, estimates, exact, exact_derivatives
from storch.testing import assert_unbiased
from torch.distributions import Bernoulli, Beta, Binomial, Categorical, Exponential, Normal, Poisson

import storch
from storch.extending import raw_of
from user_distributions import UserCategorical, UserNormal

# unordered set: k = 3 of 5 (categorical), 2 of 3 (chain), 3 of 4 joint values (plate)
K_SET = {"categorical": 3, "chain": 2, "plate": 3}


def _tempered(p):
    # a proposal q ≠ p that covers p's support (detached: q is only sampled from)
    return type(p)(logits=p.logits.detach() * 0.5)


def _constant_baseline(node, cost):
    return torch.tensor(1.5)


CONFIGS = {
    "score@1": ("score", dict(n_samples=1), 1),
    "score@4-leave_one_out": ("score", dict(n_samples=4, baseline="leave_one_out"), 1),
    "score@3-batch_average": ("score", dict(n_samples=3, baseline="batch_average"), 1),
    "score@2-moving_average": ("score", dict(n_samples=2, baseline="moving_average", decay=0.5), 3),
    "score@2-callable": ("score", dict(n_samples=2, baseline=_constant_baseline), 1),
    "reinforce@2": ("reinforce", dict(n_samples=2), 1),
    "importance@2": ("importance", dict(n_samples=2, proposal=_tempered), 1),
    "sum_and_sample@2+2": ("sum_and_sample", dict(n_enumerate=2, n_samples=2), 1),
    "mapo@1+3-leave_one_out": ("mapo", dict(n_enumerate=1, n_samples=3, baseline="leave_one_out"), 1),
    "unordered_set-no-baseline": ("unordered_set", dict(per_plate_n_samples=None, baseline=False), 1),
}


def _maker(name, options, problem):
    opts = dict(options)
    if "per_plate_n_samples" in opts:
        del opts["per_plate_n_samples"]
        opts["n_samples"] = K_SET[problem]
    return Maker(name, **opts)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_orders_1_and_2(problem, config):
    torch.manual_seed(1)
    name, options, steps = CONFIGS[config]
    got = estimates(problem, _maker(name, options, problem), 2, steps=steps)
    want = exact(problem, 2)
    for order, (g, w) in enumerate(zip(got, want), 1):
        assert_unbiased(g, w, f"{config} on {problem}, order {order}")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_unordered_set_with_baseline_order_1(problem):
    torch.manual_seed(2)
    got = estimates(problem, Maker("unordered_set", n_samples=K_SET[problem]), 1)
    assert_unbiased(got[0], exact(problem, 1)[0], f"unordered_set (baseline) on {problem}, order 1")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_score_leave_one_out_order_3(problem):
    torch.manual_seed(3)
    got = estimates(problem, Maker("score", n_samples=3, baseline="leave_one_out"), 3, replicates=3000)
    for order, (g, w) in enumerate(zip(got, exact(problem, 3)), 1):
        assert_unbiased(g, w, f"score@3 leave-one-out on {problem}, order {order}")


# -- importance with a proposal wider than p's support --------------------------------------------

_WIDE_X = torch.tensor([-0.5, 0.0, 0.7])  # a data plate


def _binomial_moment(th):
    p = torch.sigmoid(th[0])
    return 3 * p * (1 - p) + (3 * p) ** 2  # E[z²], z ~ Binomial(3, p)


WIDER = {  # p(θ), its proposal q (wider support), exact E[z²] + θ-free cost, in plain torch
    "exponential-normal": (lambda th: Exponential(th[0].exp()), Normal(0.5, 2.0), lambda th: 2 * (-2 * th[0]).exp()),
    "beta-normal": (lambda th: Beta(th[0].exp(), torch.tensor(1.0)), Normal(0.5, 1.0),
                    lambda th: th[0].exp() / (th[0].exp() + 2)),
    "binomial3-poisson": (lambda th: Binomial(3, logits=th[0]), Poisson(2.0), _binomial_moment),
    "binomial3-binomial6": (lambda th: Binomial(3, logits=th[0]), Binomial(6, probs=torch.tensor(0.5)),
                            _binomial_moment),
    "exponential-normal-data-plate": (
        lambda th: Exponential((th[0] + storch.denote_independent(_WIDE_X, 0, "data")).exp()), Normal(0.5, 2.0),
        lambda th: (2 * (-2 * (th[0] + _WIDE_X)).exp()).mean()),
}


@pytest.mark.parametrize("case", list(WIDER))
def test_importance_with_a_proposal_wider_than_p(case):
    """q covers p (the documented requirement) but also draws where p has no mass: a Normal for an Exponential
    or a Beta, Poisson(2) or Binomial(6) for a Binomial(3). p.log_prob on such a draw tripped torch's argument
    validation (ValueError), and on a data plate gave log p = -inf, whose MagicBox is NaN (a NaN loss and
    gradient; found by porting), or, without validation, Exponential's log λ − λx, a weight e^{λ|x|} where p has
    no mass. Now such a draw has weight 0 (p(x) = 0) and a finite gradient function: orders
    1 and 2 against the closed form."""
    mkp, q, fn = WIDER[case]
    theta = torch.tensor([0.2])

    def model(th, make):
        storch.add_cost(make("z", mkp(th)) ** 2, name="f")

    torch.manual_seed(5)
    got = derivative_estimates(model, theta, Maker("importance", proposal=q, n_samples=4), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, theta, 2)), 1):
        assert torch.isfinite(g).all()
        report = assert_unbiased(g, w, f"importance, {case}, order {order}")
        print(report.table())
        # and informative: without argument validation (a plate's raw distribution) Exponential.log_prob of
        # a negative draw is log λ − λx, a weight growing as e^{λ|x|} where p(x) = 0: a z-test that passed on
        # a standard error of 10⁷
        assert float(report.stderr.max()) < 0.25 * (1 + float(w.abs().max())), report.table()


def test_importance_wider_proposal_without_plates_keeps_torch_validation_quiet():
    """Without plates the node's distribution is the user's, with torch's argument validation: p.log_prob on a
    Normal proposal's negative draw raised ValueError ("within the support") for an Exponential p. Now those
    draws are weighed 0 (the loss: Σ w z² over the draws inside p's support only), the gradient is finite, and
    the cost gets p's mean (1/λ, strictly inside its support) in their place, never a value p cannot produce."""
    rate = torch.tensor(1.5, requires_grad=True)
    q = Normal(0.0, 2.0)
    torch.manual_seed(7)
    est = storch.estimator("importance", plate="x", proposal=q, n_samples=64)
    with storch.Graph():
        p = Exponential(rate, validate_args=True)
        z = est(p)
        storch.add_cost(z ** 2, name="f")
        loss = storch.surrogate_loss(order=1)
        g, = torch.autograd.grad(loss, rate)
    torch.manual_seed(7)
    x = q.sample((64,))  # q's draws, as the estimator drew them
    inside = x >= 0
    assert 0 < int(inside.sum()) < 64  # both kinds of draws
    assert torch.equal(raw_of(z).detach(), torch.where(inside, x, 1 / rate.detach()))
    w = torch.where(inside, (rate.log() - rate * x.clamp(min=0)) - q.log_prob(x), torch.tensor(-torch.inf)).exp() / 64
    with torch.no_grad():
        assert torch.allclose(loss, (w * x ** 2).sum())
        assert torch.allclose(g, (w * x ** 2 * (1 / rate - x)).sum())  # score: ∂ log p / ∂λ = 1/λ − x, inside


def test_importance_substitute_is_strictly_inside_a_continuous_support():
    """A draw of q where p(x) = 0 was handed to the cost as p's mode, for an Exponential p 0: on the boundary of
    its support, where a cost's log(z) (a log-likelihood term) is -inf, so storch.backward() raised
    NonFiniteCostError on about one step in six and blamed the user's log(0). A continuous p gets its mean
    (strictly inside), a Beta's too; a discrete p keeps its mode."""
    rate = torch.tensor([1.3, 0.7], requires_grad=True)
    est = storch.estimator("importance", plate="z", proposal=Normal(torch.ones(2), 1.0), n_samples=6)
    replaced = 0
    for seed in range(12):
        torch.manual_seed(seed)
        with storch.Graph():
            z = est(Exponential(rate))
            replaced += int((raw_of(z) == 1 / rate.detach()).sum())
            assert (raw_of(z) > 0).all()
            storch.add_cost(torch.log(z).sum(), name="c")
            storch.backward()
    assert replaced > 0
    alpha = torch.tensor([2.0, 0.5], requires_grad=True)
    torch.manual_seed(0)
    with storch.Graph():  # a Beta: its mode is 1 for (2, 0.5), its mean 0.8 inside (0, 1)
        z = storch.estimator("importance", plate="b", proposal=Normal(0.5, 1.0), n_samples=16)(Beta(alpha[0], alpha[1]))
        v = raw_of(z).detach()
        assert ((v > 0) & (v < 1)).all() and bool((v == 0.8).any())


# -- importance where q draws values that p masks (p(x) = 0 inside p's support) ---------------------

_MASK = torch.tensor([True, True, False, True])  # item 2 is not allowed
_MASK_W = torch.tensor([1.0, 2.0, 5.0, -1.0])
_MASK_THETA = torch.tensor([0.5, -0.3, 0.2, 1.0])


def _masked_p(th, form):
    if form == "logits":
        return Categorical(logits=th.masked_fill(~_MASK, float("-inf")))
    probs = th.softmax(-1) * _MASK  # a mask by probabilities of exactly 0
    return Categorical(probs=probs / probs.sum(-1, keepdim=True))


def _masked_cost(z):
    # NaN on an impossible value: a weight-0 entry that reached the cost would make the loss NaN (0 · NaN)
    return torch.where(_MASK[z], _MASK_W[z], torch.tensor(float("nan")))


@pytest.mark.parametrize("form", ["logits", "probs"])
def test_importance_masked_categorical_with_a_uniform_proposal(form):
    """The off-policy setup of a masked action space: a uniform behaviour policy q draws item 2, which the target
    policy p masks (-inf logits, or a probability of exactly 0). l(x) = log p(x) = -inf there made MagicBox(l) NaN:
    a NaN loss and gradient (-inf logits), and the cost was evaluated on the impossible item. Now such a draw has
    weight 0, l = 0, and the cost gets a value p can produce in its place: orders 1 and 2 against enumeration."""
    q = Categorical(probs=torch.full((4,), 0.25))

    def model(th, make):
        z = make("z", _masked_p(th, form))
        assert bool(_MASK[raw_of(z)].all())  # the cost never sees the masked item
        storch.add_cost(_masked_cost(z), name="c")

    def fn(th):
        return _masked_p(th, form).probs @ torch.where(_MASK, _MASK_W, torch.zeros(()))

    torch.manual_seed(11)
    got = derivative_estimates(model, _MASK_THETA, Maker("importance", proposal=q, n_samples=3), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, _MASK_THETA, 2)), 1):
        assert torch.isfinite(g).all()
        assert_unbiased(g, w, f"importance, masked Categorical ({form}), uniform q, order {order}")


_PTR_VAL = torch.tensor([1.0, -0.5, 2.0, 0.3])
_PTR_THETA = torch.tensor([0.4, -0.2, 0.9, -0.6])
_PTR_BEHAVIOUR = torch.tensor([0.1, 0.4, 0.3, 0.2])  # a behaviour policy that ignores the mask


def _ptr_proposal(p):
    # ε-mix of a fixed policy and uniform over all items, visited ones included
    return Categorical(probs=(0.8 * _PTR_BEHAVIOUR + 0.2 / 4).expand(p.batch_shape + (4,)))


def test_importance_per_step_pointer_network():
    """A pointer network trained off-policy: one importance estimator per step, the target policy masks the
    visited items, the behaviour policy does not. A draw of a visited item made the loss and gradient NaN;
    now it has weight 0 (and so has every later step of its sequence), and the next step's mask and the costs
    see a possible item: orders 1 and 2 against the enumeration of every ordered pair of distinct items."""
    n, steps = 4, 2

    def model(th, make):
        visited = torch.zeros(n, dtype=torch.bool)
        for t in range(steps):
            a = make(f"a{t}", Categorical(logits=th.masked_fill(visited, float("-inf"))))
            assert not bool(raw_of(visited[a]).any())  # never a visited item: the cost would see it twice
            visited = visited | F.one_hot(a, n).bool()
            storch.add_cost(_PTR_VAL[a], name=f"c{t}")

    def fn(th):
        total = th.new_zeros(())
        for i, j in itertools.permutations(range(n), 2):
            p_i = th.softmax(-1)[i]
            p_j = th.masked_fill(F.one_hot(torch.tensor(i), n).bool(), float("-inf")).softmax(-1)[j]
            total = total + p_i * p_j * (_PTR_VAL[i] + _PTR_VAL[j])
        return total

    torch.manual_seed(12)
    got = derivative_estimates(model, _PTR_THETA, Maker("importance", proposal=_ptr_proposal, n_samples=3), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, _PTR_THETA, 2)), 1):
        assert torch.isfinite(g).all()
        assert_unbiased(g, w, f"importance, pointer network of {steps} steps, order {order}")


_CAT5_W = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])


def test_importance_proposal_over_more_categories_than_p():
    """q over 7 categories for p's 5: standard importance sampling (q covers p). Categories 5 and 6 have weight 0,
    and the cost, an index into p's 5 values, gets a value p can produce in their place (it raised an index
    error: the cost saw category 6). Orders 1 and 2 against enumeration."""
    q = Categorical(logits=torch.zeros(7))
    theta = torch.tensor([0.3, -0.5, 0.8, 0.1, -1.2])

    def model(th, make):
        storch.add_cost(_CAT5_W[make("z", Categorical(logits=th))], name="c")

    torch.manual_seed(13)
    got = derivative_estimates(model, theta, Maker("importance", proposal=q, n_samples=3), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(lambda th: th.softmax(-1) @ _CAT5_W, theta, 2)), 1):
        assert_unbiased(g, w, f"importance, 7-category q for a 5-category p, order {order}")


# -- importance with a discrete proposal of another family than p ---------------------------------

_BERN_VALUES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=2)))  # the 4 joint values of 2 bits


def _bits_cost(z):
    return (z[..., 0] + 2 * z[..., 1] - 0.7) ** 2  # joint over the node's 2 bits


def _bits_exact(th):
    p, values = torch.sigmoid(th), _BERN_VALUES.to(th)
    prob = (values * p + (1 - values) * (1 - p)).prod(-1)
    return prob @ _bits_cost(values)


_CAT3_W = torch.tensor([1.0, -2.0, 0.5])

OTHER_FAMILY = {  # p(θ), its proposal q (another family), the cost of p's value, exact E[cost] in plain torch
    "bernoulli-categorical2": (lambda th: Bernoulli(logits=th), Categorical(probs=torch.tensor([0.4, 0.6])),
                               _bits_cost, _bits_exact),
    "bernoulli-categorical3": (lambda th: Bernoulli(logits=th), Categorical(logits=torch.zeros(3)),  # wider: 2
                               _bits_cost, _bits_exact),
    "categorical3-binomial2": (lambda th: Categorical(logits=th), Binomial(2, probs=torch.tensor(0.5)),
                               lambda z: _CAT3_W[z], lambda th: th.softmax(-1) @ _CAT3_W),
}


@pytest.mark.parametrize("case", list(OTHER_FAMILY))
def test_importance_discrete_proposal_of_another_family(case):
    """A Categorical proposal for a Bernoulli node (the same values {0, 1}, or wider {0, 1, 2}) crashed in
    Bernoulli.log_prob ("result type Float can't be cast to the desired output type Long": q's integer draws
    went to it as they were), and a Binomial proposal handed a Categorical node's cost float values (w[z]
    raised). q's draws now take the dtype of p's own samples; a value p cannot take (2 for a Bernoulli) keeps
    weight 0. Orders 1 and 2 against enumeration."""
    mkp, q, cost, fn = OTHER_FAMILY[case]
    theta = torch.tensor([0.4, -0.3, 0.2]) if case.startswith("categorical") else torch.tensor([0.4, -0.3])
    dtype = torch.long if case.startswith("categorical") else torch.get_default_dtype()  # p's samples'

    def model(th, make):
        z = make("z", mkp(th))
        assert z.dtype == dtype
        storch.add_cost(cost(z), name="c")

    torch.manual_seed(17)
    got = derivative_estimates(model, theta, Maker("importance", proposal=q, n_samples=3), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, theta, 2)), 1):
        assert torch.isfinite(g).all()
        assert_unbiased(g, w, f"importance, {case}, order {order}")


SAME_FAMILY = {  # p(θ) of θ's dtype, a same-family proposal of a given dtype, exact E[cost]
    "bernoulli": (lambda th: Bernoulli(logits=th), lambda dtype: Bernoulli(probs=torch.tensor(0.5, dtype=dtype)),
                  _bits_exact),
    "normal": (lambda th: Normal(th, torch.ones_like(th)),
               lambda dtype: Normal(torch.tensor(0.0, dtype=dtype), torch.tensor(2.0, dtype=dtype)),
               lambda th: (th[0] + 2 * th[1] - 0.7) ** 2 + 5),  # Var(z₀ + 2 z₁) = 1 + 4
}


@pytest.mark.parametrize("family", list(SAME_FAMILY))
def test_importance_same_family_proposal_of_another_dtype(family):
    """A proposal built in the default dtype (Bernoulli(probs=torch.tensor(0.5)): float32) handed a float64 or
    bfloat16 model its draws in float32 (the decoder's F.linear failed: "mat1 and mat2 must have the same
    dtype"), and a float64 proposal silently upcast a float32 model to float64: the draws of a same-family
    q were passed on as q drew them. They now take the dtype of p's own samples (log q is still evaluated on
    q's draws). float64: orders 1 and 2 against enumeration; bfloat16 and float32 models: the dtype."""
    mkp, q, fn = SAME_FAMILY[family]

    def model(th, make):
        z = make("z", mkp(th))
        assert z.dtype == th.dtype
        w = torch.tensor([[1.0, 2.0]], dtype=th.dtype)
        storch.add_cost(F.linear(z, w, torch.tensor([-0.7], dtype=th.dtype)).squeeze(-1) ** 2, name="c")

    theta = torch.tensor([0.4, -0.3], dtype=torch.float64)
    torch.manual_seed(18)
    got = derivative_estimates(model, theta, Maker("importance", proposal=q(torch.float32), n_samples=3), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, theta, 2)), 1):
        assert torch.isfinite(g).all()
        assert_unbiased(g, w, f"importance, float64 {family} with a float32 proposal, order {order}")
    for dtype, q_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float64)):
        th = torch.nn.Parameter(theta.to(dtype))
        with storch.Graph():
            model(th, Maker("importance", proposal=q(q_dtype), n_samples=3))
            storch.backward()
        assert th.grad is not None and th.grad.dtype == dtype and torch.isfinite(th.grad).all()


# -- importance: proposals of multi-binary / multi-discrete actions and ε-greedy mixtures -------------

_BITS3_W = torch.tensor([1.0, -2.0, 0.5])
_BITS3_VALUES = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))  # the 8 joint values of 3 bits
_CAT23_W = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, -1.0]])
_CAT23_VALUES = torch.tensor(list(itertools.product(range(3), repeat=2)))  # the 9 joint values of 2 positions


def _bits3_cost(z):
    return ((z * _BITS3_W).sum(-1) - 0.3) ** 2


def _bits3_exact(th):
    p, values = torch.sigmoid(th), _BITS3_VALUES.to(th)
    return (values * p + (1 - values) * (1 - p)).prod(-1) @ _bits3_cost(values)


def _cat23_cost(a):
    return _CAT23_W[0][a[..., 0]] * _CAT23_W[1][a[..., 1]] + _CAT23_W[0][a[..., 0]]


def _cat23_exact(th):
    lp = th.view(2, 3).log_softmax(-1)
    v = _CAT23_VALUES
    return (lp[0][v[:, 0]] + lp[1][v[:, 1]]).exp() @ _cat23_cost(v).to(th)


_GREEDY = torch.tensor([0.0, 0.0, 1.0])

# Multinomial(3) over 3 categories: its 10 count vectors, a cost on them and E[cost] by enumeration
_MULTI_VALUES = torch.tensor([[a, b, 3 - a - b] for a in range(4) for b in range(4 - a)], dtype=torch.float64)


def _multi_cost(x):
    return x[..., 0] * x[..., 1] + x[..., 2] ** 2 + torch.sin(x[..., 0])


def _multi_p(th):
    return torch.distributions.Multinomial(3, logits=torch.stack([th[..., 0], th[..., 1], th[..., 0] * 0], -1))


def _multi_exact(th):
    return _multi_p(th).log_prob(_MULTI_VALUES.to(th)).exp() @ _multi_cost(_MULTI_VALUES).to(th)


COVERING = {  # p(θ), a proposal that covers p (Independent over p's dims, or a mixture), the cost, exact E[cost]
    "independent-bernoulli": (lambda th: torch.distributions.Independent(Bernoulli(logits=th), 1),
                              lambda: torch.distributions.Independent(Bernoulli(probs=torch.tensor([0.5, 0.5, 0.9])), 1),
                              _bits3_cost, _bits3_exact, torch.tensor([0.3, -0.2, 0.5])),
    "independent-categorical": (lambda th: torch.distributions.Independent(Categorical(logits=th.view(2, 3)), 1),
                                lambda: torch.distributions.Independent(
                                    Categorical(probs=torch.tensor([[0.5, 0.4, 0.1], [1 / 3, 1 / 3, 1 / 3]])), 1),
                                _cat23_cost, _cat23_exact, torch.tensor([0.3, -0.2, 0.5, 0.1, 0.0, -0.4])),
    "epsilon-greedy-mixture": (lambda th: Categorical(logits=th),
                               lambda: torch.distributions.MixtureSameFamily(
                                   Categorical(probs=torch.tensor([0.8, 0.2])),
                                   Categorical(probs=torch.stack([_GREEDY, torch.full((3,), 1 / 3)]))),
                               lambda z: _CAT3_W[z], lambda th: th.softmax(-1) @ _CAT3_W, torch.tensor([0.3, -0.2, 0.5])),
    "mixture-of-independent-bernoulli": (
        lambda th: torch.distributions.Independent(Bernoulli(logits=th), 1),
        lambda: torch.distributions.MixtureSameFamily(  # a greedy joint action (1, 1, 0) and a uniform one
            Categorical(probs=torch.tensor([0.7, 0.3])),
            torch.distributions.Independent(Bernoulli(probs=torch.tensor([[1.0, 1.0, 0.0], [0.5, 0.5, 0.5]])), 1)),
        _bits3_cost, _bits3_exact, torch.tensor([0.3, -0.2, 0.5])),
    # a Multinomial proposal with p's total_count and positive probabilities (tests/score/test_score_errors.py
    # refuses the ones that miss p's values)
    "multinomial": (_multi_p, lambda: torch.distributions.Multinomial(3, probs=torch.tensor([0.5, 0.3, 0.2])),
                    _multi_cost, _multi_exact, torch.tensor([0.3, -0.4])),
    # a user's class whose support is constraints.integer_interval(0, 2), without enumerate_support
    "user-integer-interval": (lambda th: UserCategorical(th), lambda: Categorical(probs=torch.ones(3) / 3),
                              lambda z: _CAT3_W[z], lambda th: th.softmax(-1) @ _CAT3_W, torch.tensor([0.3, -0.2, 0.5])),
}


@pytest.mark.parametrize("case", list(COVERING))
def test_importance_independent_and_mixture_proposals_that_cover_p(case):
    """The covering versions of the proposals tests/score/test_score_errors.py refuses: an Independent over a
    multi-binary or multi-discrete action (probabilities of 0 or 1 in some elements but none that misses a
    value p can draw), an ε-greedy MixtureSameFamily with ε > 0, and a mixture whose greedy part puts mass on
    one joint action only (its uniform part covers the rest). The check on p's finite support accepts each;
    orders 1 and 2 against enumeration."""
    mkp, mkq, cost, fn, theta = COVERING[case]

    def model(th, make):
        storch.add_cost(cost(make("z", mkp(th))), name="c")

    torch.manual_seed(23)
    got = derivative_estimates(model, theta, Maker("importance", proposal=mkq(), n_samples=3), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, theta, 2)), 1):
        assert torch.isfinite(g).all()
        assert_unbiased(g, w, f"importance, {case}, order {order}")


def test_importance_with_a_user_proposal_on_the_data_plate_is_unbiased():
    # review r-twentythree: a proposal of the user's class built from plate tensors was refused ("the copy differs
    # from yours in batch_shape") because its copy's leading dims, the node's parent plates, were not declared
    shift = torch.tensor([0.0, 0.4, -0.2], dtype=torch.float64)
    gs = []
    for seed in range(600):
        torch.manual_seed(seed)
        theta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        with storch.Graph():
            s = storch.denote_independent(shift, 0, "data")
            est = storch.estimator("importance", plate="z", proposal=UserNormal(s * 0 + 0.3, 1.5), n_samples=3)
            z = est(Normal(theta + s, 1.0))
            storch.add_cost(z ** 2, name="c")
            storch.backward()
        gs.append(theta.grad)
    assert_unbiased(torch.stack(gs), 2 * (0.5 + shift.mean()), "importance, a user proposal on the data plate")
