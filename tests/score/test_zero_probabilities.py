"""Probabilities that are exactly 0 (``probs=``) are impossible values for the enumerating estimators.

torch computes ``log_prob`` of a ``Categorical``, ``OneHotCategorical`` or ``Bernoulli`` given by
``probs`` from clamped probabilities: a value of probability 0 gets log p = log(eps) (-15.9 in
float32) although ``sample`` never draws it. ``expect``, ``unordered_set`` and ``sum_and_sample``
decide from log p which values exist, so before ``storch.extending.strict_support`` they drew or
enumerated such values (``unordered_set@4`` on 2 possible categories returned [0, 1, 3, 2] with
weights 1.8e-7 for the last two) and the user's cost ran on them: a cost that is infinite there (an
action the mask forbids) raised ``NonFiniteCostError``. These tests fail on that code.

A masked policy as users write it, ``probs = softmax(x) * mask / Σ``, is the model: the values, the
loss and the gradient with respect to ``x`` are compared with exact enumeration over the possible
values (exact for ``expect`` and for a set that holds the whole support; a z-test over independent
estimates otherwise).
"""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Binomial, Categorical, Independent, OneHotCategorical, Poisson

import storch
from storch.extending import strict_support
from storch.testing import assert_unbiased, direction, exact_derivatives, per_replicate_derivatives, replicate

MASK = torch.tensor([True, False, True, True, False])  # 3 possible values of 5
COST = torch.tensor([0.3, 0.0, 1.1, -0.4, 0.0])  # the cost of each possible value


def _probs(x: torch.Tensor, mask: torch.Tensor = MASK) -> torch.Tensor:
    p = torch.softmax(x, -1) * mask
    return p / p.sum(-1, keepdim=True)


def _exact(x: torch.Tensor) -> torch.Tensor:
    return (_probs(x) * COST).sum()


def _cost(z: torch.Tensor, one_hot: bool, seen: list) -> torch.Tensor:
    """COST of the drawn value, and +inf for a value the mask forbids (the cost a user's environment
    would refuse with); records the values the cost was evaluated on."""
    idx = z.argmax(-1) if one_hot else z
    seen.append(idx.tensor.detach().reshape(-1))
    table = torch.where(MASK, COST, torch.full_like(COST, math.inf))
    return table[idx]


ESTIMATORS = {
    "expect": dict(name="expect"),
    "unordered_set@8": dict(name="unordered_set", n_samples=8),  # the whole support: exact
    "sum_and_sample@2": dict(name="sum_and_sample", n_samples=2),
    "unordered_set@2": dict(name="unordered_set", n_samples=2),
    # a memory the user lists, with masked values: summed as the entry's most probable value instead
    "sum_and_sample@2 memory=[1, 2]": dict(name="sum_and_sample", n_samples=2, memory=torch.tensor([1, 2])),
    "sum_and_sample@2 memory=[4, 1]": dict(name="sum_and_sample", n_samples=2, memory=torch.tensor([4, 1])),
}
EXACT = {"expect", "unordered_set@8"}


def _estimate(spec: dict, x: torch.Tensor, one_hot: bool, seen: list) -> tuple[float, torch.Tensor]:
    opts = {k: v for k, v in spec.items() if k != "name"}
    if one_hot and "memory" in opts:  # one-hot values
        opts["memory"] = torch.nn.functional.one_hot(opts["memory"], 5).to(x.dtype)
    est = storch.estimator(spec["name"], plate="a", **opts)
    p = _probs(x)
    with storch.Graph():
        z = est(OneHotCategorical(probs=p) if one_hot else Categorical(probs=p))
        storch.add_cost(_cost(z, one_hot, seen), name="c")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), g


@pytest.mark.parametrize("one_hot", [False, True], ids=["categorical", "one_hot"])
@pytest.mark.parametrize("which", list(ESTIMATORS))
def test_masked_probs_never_reach_the_cost_and_the_gradient_is_unbiased(which, one_hot):
    torch.manual_seed(0)
    x = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.7], dtype=torch.float64, requires_grad=True)
    exact = _exact(x)
    (want,) = torch.autograd.grad(exact, x)
    seen: list = []
    reps = 1 if which in EXACT else 1500
    values, grads = [], []
    for _ in range(reps):
        v, g = _estimate(ESTIMATORS[which], x, one_hot, seen)
        assert math.isfinite(v)
        values.append(v)
        grads.append(g)
    drawn = torch.cat(seen)
    assert bool(MASK[drawn].all()), f"evaluated on impossible values {sorted(set(drawn[~MASK[drawn]].tolist()))}"
    g = torch.stack(grads)
    if which in EXACT:
        assert values[0] == pytest.approx(float(exact.detach()), rel=1e-12)
        assert torch.allclose(g[0], want, atol=1e-12), (g[0], want)
        return
    se = g.std(0) / math.sqrt(reps)
    z = (g.mean(0) - want).abs() / se.clamp_min(1e-12)
    assert bool((z < 4).all()), (g.mean(0), want, z)
    vz = abs(sum(values) / reps - float(exact.detach())) / (torch.tensor(values).std() / math.sqrt(reps))
    assert vz < 4, vz
    assert float(g[:, ~MASK].abs().max()) < 1e-12  # a masked logit has no effect: its derivative is 0 (to rounding)


@pytest.mark.parametrize("which", ["expect", "unordered_set", "sum_and_sample"])
def test_bernoulli_probs_of_exactly_0_and_1(which):
    """Three Bernoullis given by probs (one node, 8 joint values), one saturated at 0 and one at 1 (a sigmoid of a large
    logit rounds to them): the only possible joint values have bit 0 = 0 and bit 1 = 1; a cost that is
    infinite elsewhere gives the exact expectation and gradient (the support, 2 values, fits a set of 4)."""
    torch.manual_seed(2)
    w = torch.tensor([-800.0, 800.0, 0.3], dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(w)
    assert float(p[0].detach()) == 0.0 and float(p[1].detach()) == 1.0
    opts = {} if which == "expect" else {"n_samples": 4}
    est = storch.estimator(which, plate="b", **opts)
    seen = []
    with storch.Graph():
        z = est(Bernoulli(probs=p))
        seen.append(z.tensor.detach().reshape(-1, 3))
        never = (z[0] == 1) | (z[1] == 0)
        storch.add_cost(torch.where(never, torch.full((), math.inf, dtype=w.dtype), 2.0 * z[2] - 0.5), name="c")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, w)
    v = torch.cat(seen)
    assert bool((v[:, 0] == 0).all() and (v[:, 1] == 1).all()), v
    q = torch.sigmoid(torch.tensor(0.3, dtype=torch.float64))
    assert float(loss.detach()) == pytest.approx(float(2.0 * q - 0.5), rel=1e-12)
    assert float(g[2]) == pytest.approx(float(2.0 * q * (1 - q)), rel=1e-12)
    assert bool(torch.isfinite(g).all())


@pytest.mark.parametrize("which", ["expect", "unordered_set", "sum_and_sample"])
def test_binomial_probs_of_exactly_0_and_1(which):
    """Binomial(3, probs=(0, 1)): only the counts (0, 3) are possible; a cost infinite elsewhere gives
    the exact value, and a finite gradient."""
    torch.manual_seed(6)
    p = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    opts = {} if which == "expect" else {"n_samples": 4}
    with storch.Graph():
        z = storch.estimator(which, plate="b", **opts)(Binomial(3, probs=p))
        v = z.tensor.detach().reshape(-1, 2)
        ok = (z[0] == 0) & (z[1] == 3)
        storch.add_cost(torch.where(ok, z[1] - z[0] + 0.5, torch.full((), math.inf, dtype=p.dtype)), name="c")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, p)
    assert bool((v[:, 0] == 0).all() and (v[:, 1] == 3).all()), v
    assert float(loss.detach()) == pytest.approx(3.5, rel=1e-12)
    assert bool(torch.isfinite(g).all())


# -- probabilities with exact zeros on a plate ------------------------------------------------------
# On a data plate, or computed from an upstream node's sample, a categorical's raw copy is rebuilt from
# its parameter tensors. A OneHotCategorical given by probs holds torch's logits as well (its argument
# validation reads them: log(eps) = -15.9 for a probability of exactly 0), as does a Categorical whose
# user read ``d.logits``; the copy took those logits as the given form, strict_support then left it
# alone, and expect / unordered_set / sum_and_sample handed the cost values that are never drawn
# (expect: 26 of 32 values, and a loss of inf with a cost infinite there). These tests fail on that code.

PLATE_PROBS = torch.tensor([[[0.0, 0.6, 0.0, 0.4], [0.0, 0.0, 1.0, 0.0]],  # data point 0: 2 variables
                            [[0.5, 0.0, 0.5, 0.0], [0.0, 0.3, 0.0, 0.7]]], dtype=torch.float64)
UPSTREAM_MASKS = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]],  # u = 0
                               [[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)  # u = 1
PLATED_ESTIMATORS = {  # each exact here: a set or an enumeration that covers the possible joint values
    "expect": dict(name="expect"),
    "unordered_set@16": dict(name="unordered_set", n_samples=16),
    "sum_and_sample@1+8": dict(name="sum_and_sample", n_samples=1, n_enumerate=8),
}


def _masked(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(theta, -1) * mask
    return p / p.sum(-1, keepdim=True)  # exact zeros stay zero


def _plated_node(est, p, form: str, mask, seen: list):
    """The node on probs ``p`` (zeros where ``mask`` is 0) and its cost: the index of each of its 2
    variables, +inf where a value is impossible; records whether each value the cost saw was."""
    if form == "one_hot":
        z = est(OneHotCategorical(probs=p))
    else:
        d = Categorical(probs=p)
        d.logits  # a user who read them: torch's, from clamped probabilities (cached in d)
        z = torch.nn.functional.one_hot(est(d), 4).to(p.dtype)
    impossible = (z.bool() & (mask == 0)).any(-1).any(-1)
    seen.append(impossible.tensor.reshape(-1))
    return (z * torch.arange(4.0, dtype=p.dtype)).sum((-1, -2)) + torch.where(impossible, math.inf, 0.0)


@pytest.mark.parametrize("form", ["one_hot", "categorical_logits_read"])
@pytest.mark.parametrize("where", ["data_plate", "downstream"])
@pytest.mark.parametrize("which", list(PLATED_ESTIMATORS))
def test_probs_with_zeros_on_a_plate_never_reach_the_cost_and_are_exact(which, where, form):
    """Probs with exact zeros on a data plate (2 data points) or depending on an upstream sample
    (``expect`` on a Bernoulli picks the mask): the cost never sees an impossible value, and the loss
    and gradient equal exact enumeration (deterministically, to float64 rounding)."""
    torch.manual_seed(5)
    spec = PLATED_ESTIMATORS[which]
    est = storch.estimator(spec["name"], plate="z", **{k: v for k, v in spec.items() if k != "name"})
    theta = torch.linspace(-1.0, 1.2, 16, dtype=torch.float64).reshape(2, 2, 4).requires_grad_()
    phi = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    values = torch.arange(4.0, dtype=torch.float64)
    seen: list = []
    with storch.Graph():
        if where == "data_plate":
            th, mask = storch.denote_independent((theta, PLATE_PROBS), 0, "data")
            cost = _plated_node(est, _masked(th, mask), form, mask, seen)
            storch.add_cost(cost, name="c")  # one cost per data point (the loss is their mean)
        else:
            u = storch.estimator("expect", plate="u")(Bernoulli(logits=phi))
            mask = UPSTREAM_MASKS[0] * (1 - u) + UPSTREAM_MASKS[1] * u  # exactly one of them
            storch.add_cost(_plated_node(est, _masked(theta[0], mask), form, mask, seen), name="c")
        loss = storch.surrogate_loss()
        g = torch.autograd.grad(loss, (theta, phi), allow_unused=True)
    if where == "data_plate":
        exact = (_masked(theta, PLATE_PROBS) * values).sum((-1, -2)).mean()
    else:
        q = torch.sigmoid(phi)
        exact = sum(w * (_masked(theta[0], UPSTREAM_MASKS[i]) * values).sum() for i, w in enumerate((1 - q, q)))
    want = torch.autograd.grad(exact, (theta, phi), allow_unused=True)
    drawn = torch.cat(seen)
    assert not bool(drawn.any()), f"{int(drawn.sum())} of {drawn.numel()} values handed to the cost are impossible"
    assert float(loss.detach()) == pytest.approx(float(exact.detach()), rel=1e-12)
    for a, b in zip(g, want):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_strict_support_changes_only_what_it_must():
    """``strict_support`` returns the distribution itself when nothing is exactly 0 or when it is given
    by logits (the common case: no copy); otherwise the copy draws the same samples from the same seed,
    and has torch's log-probabilities and derivatives on every value it can draw, -inf elsewhere."""
    x = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.7], dtype=torch.float64, requires_grad=True)
    for d in (Categorical(logits=x), Categorical(probs=torch.softmax(x, -1)), Bernoulli(probs=torch.sigmoid(x)),
              OneHotCategorical(logits=x), Independent(Bernoulli(logits=x), 1)):
        assert strict_support(d) is d
    for make in (Categorical, OneHotCategorical):
        d = make(probs=_probs(x))
        s = strict_support(d)
        assert s is not d and type(s) is make
        torch.manual_seed(3)
        a = d.sample((50,))
        torch.manual_seed(3)
        assert torch.equal(s.sample((50,)), a)
        support = d.enumerate_support()
        lp, ls = d.log_prob(support), s.log_prob(support)
        assert torch.equal(ls[MASK], lp[MASK]) and bool(torch.isneginf(ls[~MASK]).all())
        assert bool(torch.isfinite(lp[~MASK]).all())  # torch's own: log(eps), for a value it never draws
        ga = torch.autograd.grad(lp[MASK].sum(), x, retain_graph=True)[0]
        gb = torch.autograd.grad(ls[MASK].sum(), x)[0]
        assert torch.equal(ga, gb)
    b = Bernoulli(probs=torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64))
    s = strict_support(b)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for v, never in ((ones, 0), (zeros, 1)):  # value 1 at p = 0 and value 0 at p = 1: -inf; torch's elsewhere
        ls, lp = s.log_prob(v), b.log_prob(v)
        assert float(ls[never]) == -math.inf and math.isfinite(float(lp[never]))
        keep = [i for i in range(3) if i != never]
        assert torch.equal(ls[keep], lp[keep])
    torch.manual_seed(4)
    a = b.sample((20,))
    torch.manual_seed(4)
    assert torch.equal(s.sample((20,)), a)


def test_expect_with_masked_probs_replays_under_storch_compile():
    """Traced, ``expect`` always takes the padding path (no branch on values): the replayed loss and
    gradient are eager's and exact, with a cost that is infinite on the masked values."""
    est = storch.estimator("expect", plate="a")
    table = torch.where(MASK, COST, torch.full_like(COST, math.inf))

    def step(x):
        z = est(Categorical(probs=_probs(x)))
        storch.add_cost(table[z], name="c")
        return storch.surrogate_loss()

    x = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.7], dtype=torch.float64, requires_grad=True)
    compiled = storch.compile(step, backend=None)
    (want,) = torch.autograd.grad(_exact(x), x)
    for _ in range(2):
        loss = compiled(x)
        (g,) = torch.autograd.grad(loss, x)
        with storch.Graph():
            (eager,) = torch.autograd.grad(step(x), x)
        assert float(loss.detach()) == pytest.approx(float(_exact(x).detach()), rel=1e-12)
        assert torch.allclose(g, eager, atol=1e-14) and torch.allclose(g, want, atol=1e-12)


def test_sequences_with_masked_probs_draw_only_possible_sequences():
    """A 3-step decoder that masks visited tokens in its probabilities (4 tokens: 24 orders of 3):
    unordered_set@30 over the sequences draws each of the 24 once and is exact (value and gradient
    against enumeration), with a cost that is infinite on a sequence that repeats a token."""
    import itertools

    import torch.nn.functional as F

    k = 4
    torch.manual_seed(1)
    w = torch.randn(k, k, dtype=torch.float64)
    th = torch.randn(k, dtype=torch.float64, requires_grad=True)

    def step_probs(prev, visited):
        logits = th if prev is None else th + F.one_hot(prev, k).to(th.dtype) @ w
        p = torch.softmax(logits, -1) * (~visited).to(th.dtype)
        return p / p.sum(-1, keepdim=True)

    est = storch.estimator("unordered_set", plate="seq", n_samples=30)
    with storch.Graph():
        visited, prev, total = torch.zeros(k, dtype=torch.bool), None, 0.0
        for t in range(3):
            a = est(Categorical(probs=step_probs(prev, visited)))
            visited = visited | F.one_hot(a, k).bool()
            total = total + (t + 1) * a.to(th.dtype) * torch.where(visited.sum() == t + 1, 1.0, math.inf)
            prev = a
        storch.add_cost(total, name="c")
        assert a.plates[0].size == 24
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, th)
    exact = 0.0
    for seq in itertools.permutations(range(k), 3):
        lp, visited, prev = 0.0, torch.zeros(k, dtype=torch.bool), None
        for a in seq:
            lp = lp + torch.log(step_probs(None if prev is None else torch.tensor(prev), visited)[a])
            visited = visited | F.one_hot(torch.tensor(a), k).bool()
            prev = a
        exact = exact + lp.exp() * sum((t + 1) * a for t, a in enumerate(seq))
    (want,) = torch.autograd.grad(exact, th)
    assert float(loss.detach()) == pytest.approx(float(exact.detach()), rel=1e-10)
    assert torch.allclose(g, want, atol=1e-10), (g, want)


@pytest.mark.parametrize("masked", ["logits", "probs"])
def test_buffer_sequences_that_became_impossible_never_reach_the_cost(masked):
    """sum_and_sample's buffer (MAPO) remembers sequences; when the mask changes after they were stored
    (here token 1 is allowed while the buffer fills, banned afterwards), a remembered sequence can hold
    an impossible token. Its slot continues with its most probable token at weight 0, so the cost (+inf
    on a banned token) never sees it, and the estimates stay unbiased for the new mask (z-tests against
    enumeration). Before, the slot forced the banned token: NonFiniteCostError."""
    import itertools

    import torch.nn.functional as F

    k = 4
    torch.manual_seed(5)
    w = torch.randn(k, k, dtype=torch.float64)
    th = torch.randn(k, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def dist(prev, banned):
        logits = th if prev is None else th + F.one_hot(prev, k).to(th.dtype) @ w
        allowed = torch.ones(k, dtype=torch.bool)
        allowed[banned] = False
        if masked == "logits":
            return Categorical(logits=logits.masked_fill(~allowed, -math.inf))
        p = torch.softmax(logits, -1) * allowed
        return Categorical(probs=p / p.sum(-1, keepdim=True))

    def step(est, banned, seen):
        prev, total = None, 0.0
        for t in range(2):
            a = est(dist(prev, banned))
            seen.append(a.tensor.detach().reshape(-1))
            total = total + weights[t] * torch.where(a == banned, math.inf, a.to(th.dtype))
            prev = a
        storch.add_cost(total, name="c")

    est = storch.estimator("sum_and_sample", plate="seq", n_samples=3, buffer=6)
    for _ in range(4):  # the buffer fills while token 0 is banned (token 1 allowed)
        with storch.Graph():
            step(est, 0, [])
            storch.backward()
    exact = 0.0
    for seq in itertools.product(range(k), repeat=2):
        lp, prev = 0.0, None
        for a in seq:
            lp = lp + dist(None if prev is None else torch.tensor(prev), 1).log_prob(torch.tensor(a))
            prev = a
        if 1 not in seq:
            exact = exact + lp.exp() * sum(float(weights[t]) * a for t, a in enumerate(seq))
    (want,) = torch.autograd.grad(exact, th)
    values, grads, seen = [], [], []
    for _ in range(1200):  # token 1 banned now; autograd.grad: an evaluation pass, the buffer stays
        with storch.Graph():
            step(est, 1, seen)
            loss = storch.surrogate_loss()
            (g,) = torch.autograd.grad(loss, th)
        values.append(float(loss.detach()))
        grads.append(g)
    drawn = torch.cat(seen)
    assert not bool((drawn == 1).any())
    g = torch.stack(grads)
    z = ((g.mean(0) - want).abs() / (g.std(0) / math.sqrt(len(grads))).clamp_min(1e-12))
    assert bool((z < 4).all()), (g.mean(0), want, z)
    v = torch.tensor(values)
    vz = abs(float(v.mean()) - float(exact.detach())) / (float(v.std()) / math.sqrt(len(values)))
    assert vz < 4, vz


def test_user_memory_beyond_the_budget_never_reaches_the_cost_with_an_impossible_value():
    """Beyond its budget sum_and_sample searches the joint support variable by variable; a user memory
    value of probability 0 (here bit 1 set where its probability is exactly 0) is summed as the most
    probable joint value instead, so the cost (+inf there) never sees it; the estimate stays unbiased."""
    torch.manual_seed(7)
    p = torch.tensor([0.3, 0.0, 0.7, 0.6, 0.2, 0.5], dtype=torch.float64, requires_grad=True)
    bad = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    coef = torch.tensor([1.0, 0.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    exact = float((p * coef).sum().detach())
    seen, values = [], []
    for _ in range(600):
        est = storch.estimator("sum_and_sample", plate="z", n_samples=2, memory=bad, budget=8)  # 2^6 > 8
        with storch.Graph():
            z = est(Bernoulli(probs=p))
            seen.append(z.tensor.detach())
            storch.add_cost(torch.where(z[1] == 1, math.inf, (z * coef).sum(-1)), name="c")
            values.append(float(storch.surrogate_loss().detach()))
    drawn = torch.cat(seen)
    assert not bool((drawn[:, 1] == 1).any())
    v = torch.tensor(values)
    z = abs(float(v.mean()) - exact) / (float(v.std()) / math.sqrt(len(values)))
    assert z < 4, (float(v.mean()), exact, z)


# -- sum_and_sample beyond its budget (the beam path) where an entry's only possible value is in M ------
# torch clamps a probability of 1 to 1 - eps, so a variable whose one possible value is certain had
# log p = -1.2e-7 (float32; -2.2e-16 in float64) in the beam path's table: an entry whose only possible
# joint value was the memory looked as if it left mass outside M, and the sampler outside M forced a value
# of probability 0 there (weight ~1e-7, log p = -inf: a NaN loss, storch.backward() discarded the step).

# 2 data points of 2 categorical dims over 4 values: the first has 2 * 3 possible joint values, the
# second a single one, (2, 0)
CAT_POSSIBLE = torch.tensor([[[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]],
                             [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
CAT_COST = torch.tensor([0.7, -0.2, 1.3, 0.4], dtype=torch.float64)  # the cost of a dim's value
CAT_THETA = torch.tensor([[[0.2, -0.4, 0.1, 0.5], [-0.3, 0.6, 0.0, 0.2]],
                          [[0.1, 0.3, -0.2, 0.4], [0.5, -0.1, 0.2, 0.0]]], dtype=torch.float64)


def _cat_probs(theta: torch.Tensor, possible: torch.Tensor = CAT_POSSIBLE) -> torch.Tensor:
    p = torch.softmax(theta, -1) * possible
    return p / p.sum(-1, keepdim=True)


# 3 data points of 3 bits: free bits (probability sigmoid(theta)), bits of probability exactly 0 or 1
# (NaN: free); the second data point has a single possible joint value (0, 1, 1), the third 4
BIT_FIXED = torch.tensor([[math.nan, math.nan, math.nan], [0.0, 1.0, 1.0], [math.nan, 1.0, math.nan]],
                         dtype=torch.float64)
BIT_THETA_3 = torch.tensor([[-0.85, 0.4, 0.0], [0.3, -0.5, 0.2], [0.6, 0.1, -0.4]], dtype=torch.float64)


def _bit_probs(theta: torch.Tensor, fixed: torch.Tensor = BIT_FIXED) -> torch.Tensor:
    return torch.where(torch.isnan(fixed), torch.sigmoid(theta), fixed)


def _bit_exact(theta: torch.Tensor) -> torch.Tensor:
    """The mean over the data points of E[cost], by enumeration of the 8 joint values."""
    vals = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)  # (8, 3)
    p = _bit_probs(theta)
    prob = torch.where(vals.unsqueeze(1) > 0, p.unsqueeze(0), 1 - p.unsqueeze(0)).prod(-1)  # (8, data)
    return (prob * _bits_finite_cost(vals[:, 0], vals[:, 1], vals[:, 2]).unsqueeze(1)).sum(0).mean()


SUM_AND_SAMPLE_BEAM = {
    "k1_m1": dict(n_enumerate=1, n_samples=1),
    "k1_m2": dict(n_enumerate=1, n_samples=2),
    "k2_m2_loo": dict(n_enumerate=2, n_samples=2, baseline="leave_one_out"),
}


@pytest.mark.parametrize("opts", list(SUM_AND_SAMPLE_BEAM))
@pytest.mark.parametrize("node", ["categorical", "bernoulli"])
def test_sum_and_sample_beyond_budget_with_an_entry_whose_only_possible_value_is_in_memory(node, opts):
    """budget=1: the beam path. A data point whose only possible joint value is the memory has an empty
    remainder (weight 0; the cost never sees a value of probability 0), the others are sampled outside
    M as usual: the values handed to the cost are all possible, the loss is finite, and the loss and
    gradient are z-tested against exact enumeration (before: an impossible value and a NaN loss)."""
    torch.manual_seed(21)
    reps = 1500
    theta = CAT_THETA if node == "categorical" else BIT_THETA_3
    est = storch.estimator("sum_and_sample", plate="z", budget=1, **SUM_AND_SAMPLE_BEAM[opts])
    with storch.Graph() as graph:
        leaf, th = replicate(theta, reps)
        given = CAT_POSSIBLE if node == "categorical" else BIT_FIXED
        sel, given = storch.denote_independent((torch.eye(theta.shape[0], dtype=torch.float64), given), 0, "data")
        th = (sel.reshape((theta.shape[0],) + (1,) * (theta.dim() - 1)) * th).sum(0)  # (data, replicate) plates
        if node == "categorical":
            possible = given
            z = est(Categorical(probs=_cat_probs(th, possible)))
            never = (possible.gather(-1, z.unsqueeze(-1)) == 0).squeeze(-1).any(-1)
            cost = CAT_COST[z].sum(-1)
        else:
            fixed = given
            z = est(Bernoulli(probs=_bit_probs(th, fixed)))
            never = ((fixed == 0) & (z == 1)) | ((fixed == 1) & (z == 0))
            never = never.any(-1)
            cost = _bits_finite_cost(z[0], z[1], z[2])
        seen = never.tensor.detach()
        cost = torch.where(never, torch.full((), math.inf, dtype=torch.float64), cost)
        storch.add_cost(cost, name="c")
        loss = storch.surrogate_loss()
        assert not bool(seen.any()), f"{int(seen.sum())} impossible values handed to the cost"
        assert math.isfinite(float(loss.detach()))
        (g,) = per_replicate_derivatives(loss, leaf, 1)
        # each replicate's estimate of the value: Σ_x w(x) f(x) over the plate, the mean over the data
        nd = graph.nodes[0]
        order = [[p.name for p in cost.plates].index(p.name) for p in nd.plates]
        f = cost.tensor.detach().permute(order)
        w = nd.weight_values.detach().expand_as(f)
        data_dim = [p.name for p in nd.parents].index("data")
        values = (w * f).sum(0).mean(data_dim)  # (replicate,)
        # data point 1 has one possible joint value: it is the memory, of weight exactly 1 (its probability),
        # and the samples outside M have weight exactly 0 (before: a remainder of 1 - (1 - eps) > 0)
        w1 = w.select(data_dim + 1, 1)
        k = SUM_AND_SAMPLE_BEAM[opts]["n_enumerate"]
        assert bool((w1[:k].sum(0) == 1).all()) and bool((w1[k:] == 0).all()), w1[:, :3]
    exact = exact_derivatives(_cat_exact_value if node == "categorical" else _bit_exact, theta, 1)
    assert bool(torch.isfinite(g).all()) and bool(torch.isfinite(values).all())
    assert_unbiased(values.unsqueeze(-1), exact[0].reshape(1), f"value ({node}, {opts})")
    assert_unbiased(g, exact[1].reshape(-1), f"gradient ({node}, {opts})")


def _cat_exact_value(theta: torch.Tensor) -> torch.Tensor:
    """The mean over the data points of E[cost]: the dims are independent, the cost a sum over them."""
    return (_cat_probs(theta) * CAT_COST).sum((-1, -2)).mean()


def test_unordered_set_replayed_with_masked_probs_refuses_instead_of_drawing_masked_values():
    """A step traced while every probability was positive assumes every value possible; a replayed call
    whose probs hold an exact 0 raises (as with -inf logits) instead of sampling the masked value,
    which the clamped log_prob (log eps) let through before strict_support."""
    torch.manual_seed(8)
    x = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.7], dtype=torch.float64, requires_grad=True)
    est = storch.estimator("unordered_set", plate="a", n_samples=2)

    def step(x, mask):
        z = est(Categorical(probs=_probs(x, mask)))
        storch.add_cost(COST[z], name="c")
        return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    loss = compiled(x, torch.ones(5, dtype=torch.bool))
    assert math.isfinite(float(loss.detach()))
    with pytest.raises(RuntimeError, match="probability 0"):
        compiled(x, MASK)


def test_every_enumerating_estimator_gets_the_strict_distribution_and_no_other_does():
    """The base class passes an estimator with ``requires_enumerate_support`` (here a third party's, which
    never calls strict_support itself) its distribution with -inf log p on masked values, at the first
    call and at later steps of a partition; ``score`` (torch's own sampler) gets it unchanged."""
    seen = {}

    class Enumerating(storch.Estimator):
        name = "enumerating_probe"
        requires_enumerate_support = True
        supports_partitions = True

        def proposal(self, node):
            seen["first"] = node.distribution.log_prob(torch.arange(5)).detach()
            return node.distribution.sample((1,))

        def extend(self, node, distribution, plates):
            seen["step"] = distribution.log_prob(torch.arange(5).reshape(5, 1)).detach()
            return super().extend(node, distribution, plates)

    torch.manual_seed(9)
    x = torch.tensor([0.2, -0.3, 0.5, -1.0, 0.7], dtype=torch.float64)
    est = Enumerating("e", 1)
    with storch.Graph() as graph:
        est(Categorical(probs=_probs(x)))
        est(Categorical(probs=_probs(x)))
        score = storch.estimator("score", plate="s", n_samples=2)
        score(Categorical(probs=_probs(x)))
        score_lp = graph.nodes[-1].distribution.log_prob(torch.arange(5)).detach()
    for key in ("first", "step"):
        lp = seen[key].reshape(-1)
        assert bool(torch.isneginf(lp[~MASK]).all()) and bool(torch.isfinite(lp[MASK]).all()), (key, lp)
    assert bool(torch.isfinite(score_lp).all())  # torch's clamped log(eps): score never reads the support


# -- Bernoulli and Binomial given by infinite logits ----------------------------------------------
# torch's Bernoulli(logits=±inf).log_prob is NaN on the value such a logit always draws (inf - inf), so
# no joint value of a node with a masked bit (logits + mask, mask -inf) looked possible: unordered_set
# drew ONE value, impossible (the masked bit set), with log p = -inf and a zero gradient on both of its
# paths, expect and sum_and_sample gave NaN. strict_support now gives such a Bernoulli (and Binomial)
# log p = 0 on the value it always draws and -inf on the other.

# one node of 3 bits per row of a data plate: -inf masks a bit (never 1), +inf makes it certain (always 1);
# 8, 4, 4, 4 and 2 possible joint values, so with k = 3 the last row pads its set with a weight-0 repeat
BIT_MASKS = torch.tensor([[0.0, 0.0, 0.0], [0.0, -math.inf, 0.0], [math.inf, 0.0, 0.0], [0.0, 0.0, -math.inf],
                          [-math.inf, math.inf, 0.0]], dtype=torch.float64)
BIT_WEIGHTS = (1.0, 2.0, 3.0)
BIT_THETA = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)


def _bits_finite_cost(z0, z1, z2):
    return BIT_WEIGHTS[0] * (z0 - 0.45) ** 2 + BIT_WEIGHTS[1] * (z1 - 0.45) ** 2 + BIT_WEIGHTS[2] * (z2 - 0.45) ** 2 + 0.7 * z0 * z2


def _bits_exact(theta: torch.Tensor) -> torch.Tensor:
    """The mean over the rows of E[cost], by enumeration of the 8 joint values (float64)."""
    vals = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)  # (8, 3)
    p = torch.sigmoid(theta + BIT_MASKS)  # (rows, 3): exactly 0 or 1 on the masked bits
    prob = torch.where(vals.unsqueeze(1) > 0, p.unsqueeze(0), 1 - p.unsqueeze(0)).prod(-1)  # (8, rows)
    f = _bits_finite_cost(vals[:, 0], vals[:, 1], vals[:, 2])
    return (prob * f.unsqueeze(1)).sum(0).mean()


def _bits_estimates(given: str, dtype: torch.dtype, budget: int, baseline: bool, order: int, k: int, reps: int):
    theta = BIT_THETA.to(dtype)
    est = storch.estimator("unordered_set", plate="z", n_samples=k, budget=budget, baseline=baseline)
    with storch.Graph() as graph:
        leaf, th = replicate(theta, reps)
        mask = storch.denote_independent(BIT_MASKS.to(dtype), 0, "data")
        logits = th + mask
        z = est(Bernoulli(logits=logits) if given == "logits" else Bernoulli(probs=torch.sigmoid(logits)))
        never = ((z == 1) & (mask == -math.inf)) | ((z == 0) & (mask == math.inf))
        cost = _bits_finite_cost(z[0], z[1], z[2])
        storch.add_cost(torch.where(never.any(-1), torch.full((), math.inf, dtype=dtype), cost), name="c")
        loss = storch.surrogate_loss(order=order)
        derivs = per_replicate_derivatives(loss, leaf, order, direction(3))
        node = graph.nodes[0]
        return z.tensor.detach(), node.weight_values.detach(), loss.detach(), derivs


@pytest.mark.parametrize("given", ["logits", "probs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("budget", [4096, 1], ids=["enumeration", "beam"])
@pytest.mark.parametrize("baseline,order", [(True, 1), (False, 3)], ids=["baseline", "no_baseline"])
def test_unordered_set_on_bits_with_infinite_logits_is_unbiased(given, dtype, budget, baseline, order):
    """Bits masked by -inf or made certain by +inf logits (or probs of exactly 0 and 1), rows with
    different masks: k = 3 distinct possible joint values per row (2 and a weight-0 repeat in the row with
    2 possible values), never an impossible one, and the derivatives of every order unordered_set declares
    (1 with its baseline, up to 3 without) z-tested against enumeration, on both sampling paths."""
    torch.manual_seed(11)
    z, w, _, derivs = _bits_estimates(given, dtype, budget, baseline, order, k=3, reps=1500)
    assert z.shape[0] == 3  # (k, replicate, data, 3)
    mask = BIT_MASKS.to(dtype)
    assert not bool(((z == 1) & (mask == -math.inf)).any() | ((z == 0) & (mask == math.inf)).any())
    codes = (z * torch.tensor([4.0, 2.0, 1.0], dtype=dtype)).sum(-1)  # (k, replicate, data)
    w = w.reshape(codes.shape)
    distinct = (codes.unsqueeze(0) != codes.unsqueeze(1)) | torch.eye(3, dtype=torch.bool).reshape(3, 3, 1, 1)
    assert bool(distinct[:, :, :, :4].all())  # rows with >= 3 possible values: 3 distinct ones
    assert bool((w[:, :, :4] > 0).all())
    # the row with 2 possible values: both, and a repeat of weight 0
    assert bool((codes[0, :, 4] != codes[1, :, 4]).all() & (w[2, :, 4] == 0).all() & (w[:2, :, 4] > 0).all())
    exact = exact_derivatives(_bits_exact, BIT_THETA, order)
    for i, (d, want) in enumerate(zip(derivs, exact[1:]), start=1):
        assert bool(torch.isfinite(d).all())
        assert_unbiased(d, want, f"order {i} ({given}, {dtype}, budget {budget}, baseline {baseline})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("budget", [4096, 1], ids=["enumeration", "beam"])
def test_unordered_set_on_bits_with_infinite_logits_is_exact_with_the_whole_support(dtype, budget):
    """k = 8 >= every row's possible joint values: the set is each row's whole support (8 for the
    first row, the others padded with weight-0 repeats), and the estimate is exact."""
    torch.manual_seed(12)
    z, w, loss, derivs = _bits_estimates("logits", dtype, budget, True, 1, k=8, reps=2)
    assert z.shape[0] == 8
    codes = (z * torch.tensor([4.0, 2.0, 1.0], dtype=dtype)).sum(-1)[:, 0]  # (k, data)
    w = w.reshape(z.shape[:-1])[:, 0]
    for row, possible in enumerate((8, 4, 4, 4, 2)):
        assert len(set(codes[w[:, row] > 0, row].tolist())) == possible == int((w[:, row] > 0).sum())
    exact = exact_derivatives(_bits_exact, BIT_THETA, 1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(loss) == pytest.approx(float(exact[0]), rel=tol)
    torch.testing.assert_close(derivs[0].double(), exact[1].expand(2, 3), rtol=tol, atol=tol)


@pytest.mark.parametrize("which", ["expect", "sum_and_sample"])
def test_other_enumerating_estimators_on_bits_with_infinite_logits(which):
    """expect (exact) and sum_and_sample (z-test) on the same node: finite, only possible values, unbiased
    (before: NaN, and sum_and_sample evaluated the cost on an impossible value)."""
    torch.manual_seed(13)
    opts = {} if which == "expect" else {"n_enumerate": 2, "n_samples": 1}
    reps = 1 if which == "expect" else 3000
    with storch.Graph():
        leaf, th = replicate(BIT_THETA, reps)
        mask = storch.denote_independent(BIT_MASKS, 0, "data")
        z = storch.estimator(which, plate="z", **opts)(Bernoulli(logits=th + mask))
        never = ((z == 1) & (mask == -math.inf)) | ((z == 0) & (mask == math.inf))
        storch.add_cost(torch.where(never.any(-1), math.inf, _bits_finite_cost(z[0], z[1], z[2])), name="c")
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    exact = exact_derivatives(_bits_exact, BIT_THETA, 1)
    assert bool(torch.isfinite(g).all())
    if which == "expect":
        torch.testing.assert_close(g[0], exact[1], rtol=1e-12, atol=1e-12)
    else:
        assert_unbiased(g, exact[1], which)


@pytest.mark.parametrize("which", ["expect", "unordered_set"])
def test_binomial_with_infinite_logits(which):
    """Binomial(3, logits=(-inf, +inf, θ)): the first count is surely 0, the second surely 3 (torch's
    log_prob is NaN for every count there); exact with the whole support."""
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    logits = torch.stack([theta - math.inf, theta + math.inf, theta])
    opts = {} if which == "expect" else {"n_samples": 4}
    with storch.Graph():
        z = storch.estimator(which, plate="b", **opts)(Binomial(3, logits=logits))
        v = z.tensor.detach().reshape(-1, 3)
        ok = (z[0] == 0) & (z[1] == 3)
        storch.add_cost(torch.where(ok, z[2] ** 2, torch.full((), math.inf, dtype=theta.dtype)), name="c")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, theta)
    assert bool((v[:, 0] == 0).all() and (v[:, 1] == 3).all()), v
    want = Binomial(3, logits=theta).variance + Binomial(3, logits=theta).mean ** 2
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
    assert float(g) == pytest.approx(float(torch.autograd.grad(want, theta)[0]), rel=1e-10)


BINOMIAL_THETA = torch.tensor([0.3, -0.4, 0.1], dtype=torch.float64)


def _masked_binomial_exact(theta: torch.Tensor) -> torch.Tensor:
    """E Σ (z - 1.2)² for z ~ Binomial(3, σ(θ) on the first two counts, 0 on the third): Var + (mean - c)²."""
    p = torch.sigmoid(theta[:2])
    return (3 * p * (1 - p) + (3 * p - 1.2) ** 2).sum() + 1.2 ** 2 + 0 * theta[2]


@pytest.mark.parametrize("given", ["logits", "probs"])
@pytest.mark.parametrize("k", [1, 3])
def test_unordered_set_without_baseline_on_a_masked_binomial_at_order_2(k, given):
    """Binomial(3, logits=θ + (0, 0, -inf)) (a masked count), or probs with an exact 0: the node holds
    strict_support's _StrictBinomial, whose log p the order check did not know as torch's Binomial (a clamp
    and an abs that cancel), so unordered_set(baseline=False) at order 2 raised OrderError although the same
    node with finite logits was accepted. Now accepted, and unbiased at orders 1 and 2 (z-test against
    exact enumeration). Fails on that code (the OrderError)."""
    torch.manual_seed(31 + k)
    est = storch.estimator("unordered_set", plate="z", n_samples=k, baseline=False)
    mask = torch.tensor([0.0, 0.0, -math.inf], dtype=torch.float64)
    with storch.Graph():
        leaf, th = replicate(BINOMIAL_THETA, 3000)
        d = (Binomial(3, logits=th + mask) if given == "logits"
             else Binomial(3, probs=torch.sigmoid(th) * (mask == 0).to(th.dtype)))
        z = est(d)
        storch.add_cost(((z - 1.2) ** 2).sum())
        derivs = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    exact = exact_derivatives(_masked_binomial_exact, BINOMIAL_THETA, 2)
    for i, (g, want) in enumerate(zip(derivs, exact[1:]), start=1):
        assert bool(torch.isfinite(g).all())
        assert_unbiased(g, want, f"order {i} (k = {k}, {given})")


def test_strict_support_of_infinite_logits():
    """A Bernoulli or Binomial given by logits with an infinite entry: log p 0 on the value it always draws,
    -inf on the others, torch's values and derivatives on the finite entries, no NaN derivative; the
    same samples. Finite logits: the distribution itself."""
    x = torch.tensor([0.3, -math.inf, math.inf, -1.2], dtype=torch.float64)
    leaf = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    b = Bernoulli(logits=x + leaf)
    s = strict_support(b)
    assert s is not b and isinstance(s, Bernoulli)
    finite = torch.isfinite(x)
    for v, sure in ((torch.zeros(4, dtype=torch.float64), x < 0), (torch.ones(4, dtype=torch.float64), x > 0)):
        ls, lp = s.log_prob(v), b.log_prob(v)
        assert bool(torch.isnan(lp[~finite]).any())  # torch's own
        assert torch.equal(ls[finite], lp[finite])
        assert ls[~finite].tolist() == [0.0 if bool(t) else -math.inf for t in sure[~finite]]
        (gs,) = torch.autograd.grad(ls[torch.isfinite(ls)].sum(), leaf)
        (gt,) = torch.autograd.grad(lp[finite].sum(), leaf)
        assert torch.equal(gs, gt)
    torch.manual_seed(4)
    a = b.sample((20,))
    torch.manual_seed(4)
    assert torch.equal(s.sample((20,)), a)
    n = Binomial(2, logits=x)
    ls = strict_support(n).log_prob(torch.arange(3, dtype=torch.float64).reshape(3, 1))
    # (a Binomial's log p is torch's formula with softplus as logaddexp: the same values to rounding, and the
    # right second derivative at a logit of 0, tests/all/test_distribution_zoo.py)
    torch.testing.assert_close(ls[:, finite], n.log_prob(torch.arange(3, dtype=torch.float64).reshape(3, 1))[:, finite],
                               rtol=1e-15, atol=0)
    assert ls[:, 1].tolist() == [0.0, -math.inf, -math.inf] and ls[:, 2].tolist() == [-math.inf, -math.inf, 0.0]
    d = Bernoulli(logits=x.clamp(-800, 800))
    assert strict_support(d) is d
    d = Binomial(2, logits=torch.zeros(3))  # finite logits: a copy all the same, for its smooth log p
    assert type(strict_support(d)).__name__ == "_StrictBinomial"


# -- a Poisson whose rate is exactly 0: a zero-inflated Poisson --------------------------------------
# z ~ Bernoulli(π), k ~ Poisson(λ z): where z = 0 the rate is exactly 0 (torch allows rate >= 0; a point
# mass at 0). torch's Poisson.log_prob computes value.xlogy(rate), whose derivative value / rate is
# 0 / 0 = NaN there: the gradient of λ was NaN (no error) for score and importance, although d rate / d λ
# is 0 there. storch's log p of a node (raw_log_prob) and strict_support's copy (importance) now have
# finite derivatives there.

ZIP_THETA = torch.tensor([0.4, 0.3], dtype=torch.float64)  # π = σ(θ₀), λ = exp(θ₁)


def _zip_cost(k):
    return (k - 3.0) ** 2 + 0.4 * k ** 3


def _zip_exact(theta: torch.Tensor, top: int = 80) -> torch.Tensor:
    """E f(k) by enumeration: z in {0, 1}, k truncated at ``top`` (the tail beyond is below 1e-80)."""
    pi, lam = torch.sigmoid(theta[0]), theta[1].exp()
    k = torch.arange(top + 1, dtype=theta.dtype)
    pmf = torch.exp(k * lam.log() - lam - torch.lgamma(k + 1))
    return (1 - pi) * _zip_cost(torch.zeros((), dtype=theta.dtype)) + pi * (pmf * _zip_cost(k)).sum()


ZIP_CASES = {
    "score@2": ("score", dict(n_samples=2)),
    "score@3-leave_one_out": ("score", dict(n_samples=3, baseline="leave_one_out")),
    "importance@3-poisson": ("importance", dict(n_samples=3, proposal=Poisson(torch.tensor(2.0, dtype=torch.float64)))),
}


@pytest.mark.parametrize("upstream", ["expect", "score"])
@pytest.mark.parametrize("case", list(ZIP_CASES))
def test_zero_inflated_poisson_is_unbiased_at_orders_1_and_2(case, upstream):
    name, options = ZIP_CASES[case]
    torch.manual_seed(21)
    est = storch.estimator(name, plate="k", **options)
    with storch.Graph():
        leaf, th = replicate(ZIP_THETA, 4000)
        up = storch.estimator(upstream, plate="z", **({"n_samples": 2} if upstream == "score" else {}))
        z = up(Bernoulli(logits=th[0]))
        k = est(Poisson(th[1].exp() * z))
        storch.add_cost(_zip_cost(k))
        got = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(_zip_exact, ZIP_THETA, 2)[1:]), 1):
        assert torch.isfinite(g).all(), (case, order)
        print(assert_unbiased(g, w, f"{case} below {upstream}, zero-inflated Poisson, order {order}").table())


def test_score_on_pinned_bits_given_by_probs_is_unbiased():
    """The advice of the NonFiniteCostError for infinite Bernoulli logits under score: give the Bernoulli by probs,
    ``Bernoulli(probs=torch.sigmoid(logits + mask))``. torch clamps a probability of 0 or 1, so log p is finite;
    a pinned bit has no gradient and the free bits' gradient is unbiased (z-test against enumeration)."""
    pin = torch.tensor([0.0, -math.inf, math.inf, 0.0])
    weights = torch.tensor([1.0, 2.0, -1.5, 0.7])
    theta0 = torch.tensor([0.3, 0.0, 0.0, -0.2])

    def cost(b):
        return ((b * weights).sum(-1) - 0.4) ** 2

    theta = theta0.clone().requires_grad_(True)
    p = torch.sigmoid(theta + pin)
    exact = sum((p ** b * (1 - p) ** (1 - b)).prod() * cost(b)
                for b in (torch.tensor(bits) for bits in itertools.product([0.0, 1.0], repeat=4)))
    (want,) = torch.autograd.grad(exact, theta)
    grads = []
    for seed in range(1500):
        torch.manual_seed(seed)
        theta = theta0.clone().requires_grad_(True)
        est = storch.estimator("score", plate="b", n_samples=4, baseline="leave_one_out")
        with storch.Graph():
            b = est(Bernoulli(probs=torch.sigmoid(theta + pin)))
            assert bool((b.tensor[:, 1] == 0).all() and (b.tensor[:, 2] == 1).all())
            storch.add_cost(cost(b))
            storch.backward()
        grads.append(theta.grad.clone())
    g = torch.stack(grads)
    assert bool((g[:, 1:3] == 0).all())
    free = torch.tensor([0, 3])
    z = (g[:, free].mean(0) - want[free]) / (g[:, free].std(0) / math.sqrt(len(g)))
    assert bool((z.abs() < 4).all()), (g.mean(0), want, z)
