"""Learning to rank with a Plackett-Luce policy over permutations, written as a user writes it.

The distribution is written from docs/your-own-distribution.md (not imported from tests/user_distributions.py):
scores s of n items, a sample is a permutation (a Long event of shape (n,), the item at each rank) drawn by
sorting s + Gumbel noise, log p(pi) = sum_i s_{pi_i} - logsumexp(s_{pi_i..n}). A linear scorer network scores the
items of a batch of queries (a data plate; the query with fewer items padded with a very low score and relevance
0), and the cost is minus the NDCG of the relevance labels read through the sampled permutation. At n = 4 (24
permutations) E[NDCG] and its exact derivatives w.r.t. the scores are an enumeration: the oracle of the z-tests.

Checked: every estimator that accepts the class is unbiased against enumeration (order 1; order 2 where
declared), with the moving average warmed up over earlier steps; the ways a user reads the labels through a
sampled permutation (``rel[perm]``, ``rel.gather``, ``torch.gather``, ``take_along_dim``, the inverse permutation's
``argsort``, a one-hot product) and sorts a plate tensor (the ideal DCG) agree exactly under ``expect``; the
estimators that cannot take a permutation refuse and name those that can; a class without ``enumerate_support``
is told to define it; training the scorer raises the exact E[NDCG]; at n = 8 the baselines' gradient variance.
"""

import itertools

import pytest
import torch
from torch.distributions import Distribution, constraints

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

D = torch.float64
PAD = -1e4  # the score of a padded item: exp(PAD - s) is 0, so it is always ranked last and changes no term


class PlackettLuce(Distribution):
    """Permutations of n items, ``value[i]`` the item at rank i (docs/your-own-distribution.md)."""

    arg_constraints = {"scores": constraints.real_vector}
    has_enumerate_support = True

    def __init__(self, scores, validate_args=None):
        self.scores = scores
        super().__init__(scores.shape[:-1], scores.shape[-1:], validate_args=validate_args)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():  # Gumbel-top-n: the scores perturbed by Gumbel noise, sorted
            u = torch.rand(shape, dtype=self.scores.dtype)
            return (self.scores.expand(shape) - torch.log(-torch.log(u))).argsort(-1, descending=True)

    def log_prob(self, value):
        ranked = self.scores.expand(value.shape[:-1] + self.scores.shape[-1:]).gather(-1, value)
        n = ranked.shape[-1]
        tail = torch.ones(n, n, dtype=torch.bool).triu()  # row i: ranks i..n-1
        den = ranked.unsqueeze(-2).masked_fill(~tail, float("-inf")).logsumexp(-1)
        return (ranked - den).sum(-1)

    def enumerate_support(self, expand=True):
        n = self.scores.shape[-1]
        perms = torch.tensor(list(itertools.permutations(range(n))))
        perms = perms.view((len(perms),) + (1,) * len(self.batch_shape) + (n,))
        return perms.expand((len(perms),) + self.batch_shape + (n,)) if expand else perms


class NotEnumerated(PlackettLuce):
    """The same class, written without enumerating its n! values."""

    has_enumerate_support = False


# two queries of 4 and 3 items (the second padded), 3 features per item
FEATURES = torch.tensor([[[1.0, 0.2, -0.5], [0.1, -1.0, 0.3], [0.7, 0.9, 1.2], [-0.4, 0.5, 0.0]],
                         [[0.3, -0.2, 0.8], [1.1, 0.4, -0.6], [-0.9, 0.1, 0.2], [0.0, 0.0, 0.0]]], dtype=D)
MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])
REL = torch.tensor([[3.0, 0.0, 1.0, 2.0], [1.0, 2.0, 0.0, 0.0]], dtype=D)


def discount(n):
    return 1 / torch.log2(torch.arange(n, dtype=D) + 2)


DISC = discount(4)


def scorer():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).to(D)


def item_scores(net):
    return net(FEATURES).squeeze(-1).masked_fill(~MASK, PAD)


def ndcg(rel, perm):
    """NDCG of relevance ``rel`` ranked by ``perm``; both may be plate tensors."""
    disc = discount(rel.shape[-1])
    ideal = (rel.sort(-1, descending=True).values * disc).sum(-1)
    return (rel.gather(-1, perm) * disc).sum(-1) / ideal


def exact_value(scores, rel=REL):
    """E[NDCG] averaged over the queries (storch averages a data plate), by enumerating the n! rankings."""
    perms = torch.tensor(list(itertools.permutations(range(scores.shape[-1]))))
    return torch.stack([(PlackettLuce(s).log_prob(perms).exp() * ndcg(r.expand(len(perms), -1), perms)).sum()
                        for s, r in zip(scores, rel)]).mean()


def _surrogate(est, scores, order=1, rel=REL):
    s, r = storch.denote_independent((scores, rel), -2, "query")
    perm = est(PlackettLuce(s))
    storch.add_cost(-ndcg(r, perm), name="ndcg")
    return storch.surrogate_loss(order=order)


ESTIMATORS = {  # name: (factory, orders z-tested, replicates: more without a baseline, for the same power)
    "score": (lambda: storch.estimator("score", plate="rank", n_samples=4), (1, 2), 20000),
    "score-leave_one_out": (lambda: storch.estimator("score", plate="rank", n_samples=4, baseline="leave_one_out"),
                            (1, 2), 800),
    "unordered_set": (lambda: storch.estimator("unordered_set", plate="rank", n_samples=4), (1,), 1500),
    "unordered_set-no-baseline": (lambda: storch.estimator("unordered_set", plate="rank", n_samples=4,
                                                           baseline=False), (1, 2), 6000),
    "sum_and_sample": (lambda: storch.estimator("sum_and_sample", plate="rank", n_samples=2,
                                                baseline="leave_one_out"), (1, 2), 1500),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_the_ranking_gradient_is_unbiased(name):
    make, orders, n = ESTIMATORS[name]
    scores = item_scores(scorer()).detach()
    torch.manual_seed(1)
    with storch.Graph():
        leaf, s = replicate(scores, n)
        derivs = per_replicate_derivatives(_surrogate(make(), s, max(orders)), leaf, max(orders))
    exact = [torch.autograd.functional.jacobian(lambda t: -exact_value(t), scores).reshape(-1),
             torch.autograd.functional.hessian(lambda t: -exact_value(t), scores).reshape(8, 8)]
    for order in orders:
        assert_unbiased(derivs[order - 1], exact[order - 1], f"{name}, order {order}")
    assert (derivs[0][:, 7] == 0).all()  # the padded item's score gets no gradient


def test_the_moving_average_after_earlier_steps_is_unbiased():
    """The baseline is the average of earlier steps' costs (warmed up first), independent of this step's draws."""
    scores = item_scores(scorer()).detach()
    est = storch.estimator("score", plate="rank", n_samples=4, baseline="moving_average")
    torch.manual_seed(2)
    for _ in range(20):
        with storch.Graph():
            leaf, s = replicate(scores, 1500)
            _surrogate(est, s)
            storch.backward()
    (key, average), = est.moving_averages.items()
    assert abs(average + exact_value(scores)) < 0.05  # it tracks -E[NDCG]: a baseline is in use
    with storch.Graph():
        leaf, s = replicate(scores, 1500)
        g, = per_replicate_derivatives(_surrogate(est, s), leaf, 1)
    assert_unbiased(g, torch.autograd.functional.jacobian(lambda t: -exact_value(t), scores).reshape(-1),
                    "score with the moving average")


READS = {  # ways of reading the labels through a sampled permutation (the item at each rank)
    "rel.gather": lambda rel, perm: rel.gather(-1, perm),
    "rel[perm]": lambda rel, perm: rel[perm],
    "torch.gather": lambda rel, perm: torch.gather(rel, -1, perm),
    "take_along_dim": lambda rel, perm: torch.take_along_dim(rel, perm, -1),
    "one_hot": lambda rel, perm: (torch.nn.functional.one_hot(perm, 4).to(D) @ rel.unsqueeze(-1)).squeeze(-1),
    "argsort": None,  # the rank of each item (the inverse permutation) indexing the discounts
}


@pytest.mark.parametrize("read", sorted(READS))
def test_reading_labels_through_a_permutation_is_exact_under_expect(read):
    net = scorer()
    with storch.Graph():
        s, rel = storch.denote_independent((item_scores(net), REL), 0, "query")
        perm = storch.estimator("expect", plate="rank")(PlackettLuce(s))
        ideal = (rel.sort(-1, descending=True).values * DISC).sum(-1)
        dcg = (rel * DISC[perm.argsort(-1)]).sum(-1) if read == "argsort" else (READS[read](rel, perm) * DISC).sum(-1)
        storch.add_cost(-dcg / ideal)
        loss = storch.surrogate_loss()
        got = torch.autograd.grad(loss, list(net.parameters()))
    expected = torch.autograd.grad(-exact_value(item_scores(net)), list(net.parameters()))
    assert torch.allclose(loss, -exact_value(item_scores(net)).detach())
    for g, e in zip(got, expected):
        assert torch.allclose(g, e)


def test_log_prob_of_a_sampled_permutation_on_plate_tensors_is_per_entry():
    """The user's log_prob called in the model on plate tensors (scores per query, a ranking per draw and query)
    gives each entry's own log-probability."""
    scores = item_scores(scorer()).detach()
    with storch.Graph():
        d = PlackettLuce(storch.denote_independent(scores, 0, "query"))
        perm = storch.estimator("score", plate="rank", n_samples=3)(d)
        lp = d.log_prob(perm)
        assert [p.name for p in lp.plates] == [p.name for p in perm.plates] == ["rank", "query"]
        assert torch.equal(lp.tensor, PlackettLuce(scores).log_prob(perm.tensor))


@pytest.mark.parametrize("name, n", [("score", 3), ("expect", None), ("unordered_set", 3)])
def test_padding_with_minus_infinity_is_refused(name, n):
    """Scores padded with -inf (as logits are masked) make this log_prob NaN (-inf - -inf): refused at the
    surrogate, not a NaN gradient, with a message that names the infinite parameter and the fix; a very low finite
    score (PAD) is what works."""
    scores = item_scores(scorer()).detach().masked_fill(~MASK, float("-inf")).requires_grad_()
    with storch.Graph():
        with pytest.raises(storch.NonFiniteCostError, match="the weights or gradient-function values of an estimator") \
                as info:
            _surrogate(storch.estimator(name, plate="rank", **({} if n is None else {"n_samples": n})), scores)
            storch.backward()
    assert scores.grad is None
    assert f"Infinite parameters at '{name}' (plate 'rank', a PlackettLuce: scores)" in str(info.value), str(info.value)
    assert "very low finite value" in str(info.value)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.usefixtures("restore_validation")  # aot_eager: dynamo turns validation off process-wide
def test_padding_with_minus_infinity_under_storch_compile_names_the_fix(backend):
    """A compiled step's .backward() refuses the NaN loss too; its message (which cannot read the distributions)
    names -inf padding among the causes, with the eager message's fix (it named only a Bernoulli's infinite logit)."""
    est = storch.estimator("score", plate="rank", n_samples=3)

    def step(scores):
        with storch.Graph():
            return _surrogate(est, scores)

    compiled = storch.compile(step, backend=backend)
    compiled(item_scores(scorer()).detach().requires_grad_()).backward()  # finite: no error
    scores = item_scores(scorer()).detach().masked_fill(~MASK, float("-inf")).requires_grad_()
    with pytest.raises(storch.NonFiniteCostError, match="compiled step") as info:
        compiled(scores).backward()
    assert scores.grad is None
    assert "a parameter padded or masked with -inf" in str(info.value), str(info.value)
    assert "Pad or mask with a very low finite value instead" in str(info.value)


def test_padding_with_minus_infinity_under_sum_and_sample_names_the_padding():
    """sum_and_sample draws from log_prob over the support, NaN there: its draw is refused, and the message names
    the -inf padding and its fix (it blamed diverged model outputs or NaN inputs, which a padded batch is not)."""
    scores = item_scores(scorer()).detach().masked_fill(~MASK, float("-inf")).requires_grad_()
    with storch.Graph():
        with pytest.raises(storch.NonFiniteParameterError, match=r"'scores' hold -inf and no NaN, as entries padded "
                           r"or masked with -inf") as info:
            _surrogate(storch.estimator("sum_and_sample", plate="rank", n_samples=2), scores)
    assert "very low finite value" in str(info.value) and "diverged" not in str(info.value), str(info.value)


def test_the_hessian_under_expect_is_exact():
    scores = item_scores(scorer()).detach().requires_grad_()
    with storch.Graph():
        g, = torch.autograd.grad(_surrogate(storch.estimator("expect", plate="rank"), scores, 2), scores,
                                 create_graph=True)
        h = torch.stack([torch.autograd.grad(g.reshape(-1)[i], scores, retain_graph=True)[0].reshape(-1)
                         for i in range(8)])
    assert torch.allclose(h, torch.autograd.functional.hessian(lambda t: -exact_value(t), scores.detach()).reshape(8, 8))


@pytest.mark.parametrize("name, match", [
    ("gumbel_softmax", "it needs one of Bernoulli, OneHotCategorical"),
    ("rebar", "it needs one of Bernoulli, OneHotCategorical"),
    ("relax", "it needs one of Bernoulli, OneHotCategorical"),
    ("arm", "it needs one of Bernoulli"),
    ("go", "it needs one of Bernoulli, Binomial, Categorical"),
    ("mvd", "it needs one of Normal, Bernoulli, Categorical"),
    ("lax", "it needs a distribution with rsample"),
    ("reparameterization", "it needs a distribution with rsample"),
])
def test_what_cannot_take_a_permutation_names_what_can(name, match):
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match=rf"estimator '{name}' does not support "
                           rf"PlackettLuce; {match}.*Estimators that support it: expect, importance, score, spsa, "
                           r"sum_and_sample, unordered_set\."):
            storch.estimator(name, plate="rank")(PlackettLuce(item_scores(scorer())))


def test_vimco_says_to_define_expand():
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match=r"define PlackettLuce\.expand"):
            storch.estimator("vimco", plate="rank", n_samples=3)(PlackettLuce(item_scores(scorer())))


@pytest.mark.parametrize("name", ["expect", "unordered_set", "sum_and_sample"])
def test_a_set_estimator_tells_a_class_of_ones_own_to_enumerate(name):
    """A user class without enumerate_support is told to define it (the refusal listed torch's classes only)."""
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError,
                           match=r"NotEnumerated is a class of your own: set has_enumerate_support = True and define "
                                 r"enumerate_support\(expand=True\).*Estimators that support it: importance, score, "
                                 r"spsa\."):
            storch.estimator(name, plate="rank")(NotEnumerated(item_scores(scorer())))


class _MyNormal(torch.distributions.Normal):
    """A user's subclass of a continuous torch class: it cannot enumerate, whatever it defines."""


class _ContinuousOwn(torch.distributions.Distribution):
    support = torch.distributions.constraints.real
    arg_constraints: dict = {}


@pytest.mark.parametrize("name", ["expect", "unordered_set", "sum_and_sample"])
@pytest.mark.parametrize("make", [lambda: _MyNormal(torch.zeros(()), torch.ones(())),
                                  lambda: _ContinuousOwn(validate_args=False)], ids=["subclass-of-normal", "real-support"])
def test_a_continuous_class_of_ones_own_is_not_told_to_enumerate(name, make):
    """The hint to define enumerate_support fired for any class outside torch.distributions, a subclass of Normal or a
    class declaring a continuous support included, where it cannot be followed: such classes get the plain refusal."""
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match=r"it needs a distribution whose finite support") \
                as info:
            storch.estimator(name, plate="z", **({} if name == "expect" else {"n_samples": 2}))(make())
    assert "class of your own" not in str(info.value), str(info.value)


def test_training_the_scorer_raises_the_expected_ndcg():
    net = scorer()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    est = storch.estimator("score", plate="rank", n_samples=8, baseline="leave_one_out")
    before = exact_value(item_scores(net)).item()
    torch.manual_seed(3)
    for _ in range(60):
        opt.zero_grad()
        with storch.Graph():
            _surrogate(est, item_scores(net))
            storch.backward()
        opt.step()
    after = exact_value(item_scores(net)).item()
    assert after > before + 0.05, (before, after)


def _gradient_variance(baseline, scores, rel, steps):
    """Total variance of the per-replicate gradient at the last of ``steps`` steps."""
    est = storch.estimator("score", plate="rank", n_samples=4, baseline=baseline)
    for _ in range(steps):
        with storch.Graph():
            leaf, s = replicate(scores, 1000)
            g, = per_replicate_derivatives(_surrogate(est, s, rel=rel), leaf, 1)
            if baseline == "moving_average":
                storch.backward()
    return g.var(0).sum().item()


def test_baselines_lower_the_variance_at_n8():
    """Measured at n = 8 (40320 rankings), 4 draws a query: the docs claim that a baseline lowers the variance
    (docs/estimators/score.md); leave-one-out and the warmed-up moving average are both well below none."""
    torch.manual_seed(4)
    scores = torch.randn(2, 8, dtype=D)
    rel = torch.randint(0, 4, (2, 8)).to(D)
    var = {b: _gradient_variance(b, scores, rel, 10 if b == "moving_average" else 1)
           for b in ("none", "moving_average", "leave_one_out")}
    assert var["leave_one_out"] < var["none"] / 2 and var["moving_average"] < var["none"] / 2, var
