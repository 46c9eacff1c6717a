"""The unordered set estimator on joint supports too large to enumerate: stochastic beam search."""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch
from path_probes import Allocations
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from storch_score._beam import order_gumbels, sample_without_replacement, stochastic_beam_search

torch.set_default_dtype(torch.float64)
R = 4000


def _draw(theta, k, budget, dist=Bernoulli):
    """Ordered samples of the 3-Bernoulli node, drawn with the beam (budget < 8) or by enumeration."""
    est = storch.estimator("unordered_set", plate="z", n_samples=k, budget=budget, baseline=False)
    with storch.Graph():
        _, th = replicate(theta, R)
        z = est(dist(logits=th))
        return z.tensor.detach()  # (k, R, 3)


def test_beam_draws_gumbel_top_k_like_enumeration():
    """The first draw is distributed as p; the set of k = 3 draws has the distribution of
    Gumbel-top-k over the 8 joint values (frequencies z-tested against enumeration's)."""
    torch.manual_seed(0)
    theta = torch.tensor([0.8, -0.4, 1.5])
    p = torch.sigmoid(theta)
    codes = torch.tensor([4, 2, 1], dtype=torch.float64)
    beam = (_draw(theta, 3, budget=4) * codes).sum(-1).long()  # (3, R) joint value codes
    # first draw ~ p(x): exact frequencies
    probs = torch.tensor([float(torch.prod(torch.where(torch.tensor(b) > 0, p, 1 - p)))
                          for b in itertools.product([0, 1], repeat=3)])
    onehot = torch.nn.functional.one_hot(beam[0], 8).double()
    assert_unbiased(onehot, probs, "frequency of the first beam draw vs p(x)")
    # the whole ordered sample: pair frequencies of (first, second) against enumeration's sampler
    torch.manual_seed(1)
    enum = (_draw(theta, 3, budget=4096) * codes).sum(-1).long()
    pair_beam = torch.nn.functional.one_hot(beam[0] * 8 + beam[1], 64).double()
    pair_enum = torch.nn.functional.one_hot(enum[0] * 8 + enum[1], 64).double()
    diff = pair_beam - pair_enum  # independent draws: the difference has mean 0
    assert_unbiased(diff, torch.zeros(64), "pair frequencies, beam minus enumeration")
    assert (beam[0] != beam[1]).all() and (beam[1] != beam[2]).all() and (beam[0] != beam[2]).all()


def _toy_exact(theta):
    p = torch.sigmoid(theta)
    return (p * 0.55 ** 2 + (1 - p) * 0.45 ** 2).sum()


@pytest.mark.parametrize("baseline,order", [(True, 1), (False, 2)])
def test_beam_path_is_unbiased_on_twenty_bernoullis(baseline, order):
    """20 Bernoulli latents (2^20 joint values, as in the VAE): z-tests of the gradient (and the
    Hessian without the baseline) of E[Σ (b_i - 0.45)^2] against the closed form."""
    torch.manual_seed(3)
    theta = torch.linspace(-2.0, 2.0, 20)
    est = storch.estimator("unordered_set", plate="z", n_samples=4, baseline=baseline)
    with storch.Graph():
        leaf, th = replicate(theta, 2000)
        b = est(Bernoulli(logits=th))
        storch.add_cost(((b - 0.45) ** 2).sum())
        loss = storch.surrogate_loss(order=order)
        derivs = per_replicate_derivatives(loss, leaf, order)
    t = theta.clone().requires_grad_(True)
    assert_unbiased(derivs[0], torch.autograd.functional.jacobian(_toy_exact, t), "gradient")
    if order == 2:
        assert_unbiased(derivs[1], torch.autograd.functional.hessian(_toy_exact, t), "Hessian")


def test_beam_path_onehot_with_data_plate():
    """OneHotCategorical with batch shape (3,), K = 5 (125 joint values, beam with budget 10)."""
    torch.manual_seed(4)
    logits = torch.randn(3, 5)
    y = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0, 1.0]])
    est = storch.estimator("unordered_set", plate="z", n_samples=4, budget=10)
    with storch.Graph():
        leaf, th = replicate(logits, R)
        yy = storch.denote_independent(y, 0, "data")
        z = est(OneHotCategorical(logits=th))
        storch.add_cost(((z @ yy) ** 2).sum())
        loss = storch.surrogate_loss(order=1)
        g, = per_replicate_derivatives(loss, leaf, 1)

    def exact(lg):
        p = torch.softmax(lg, -1)  # (3, 5); cost per data point: Σ_i (y·z_i)^2, independent i
        return (p @ (y.t() ** 2)).sum(0).mean()

    t = logits.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t).reshape(-1), "gradient")


def test_beam_extreme_logits_no_nan():
    torch.manual_seed(5)
    est = storch.estimator("unordered_set", plate="z", n_samples=8)
    theta = torch.tensor([80.0, -80.0, 0.0] * 7, requires_grad=True)
    with storch.Graph():
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g).all()
    values, lp, _, _ = stochastic_beam_search(_node_for(theta), 8)
    assert torch.isfinite(lp).all() and values.shape[0] == 8


def _node_for(theta):
    est = storch.estimator("unordered_set", plate="zz", n_samples=8)
    with storch.Graph() as g:
        est(Bernoulli(logits=theta))
        return g.nodes[0]


def _exact_orders(probs):
    """P(first = a), P(second = b) and P(a in S) for an ordered sample without replacement of size 3
    from ``probs`` (M joint values), by enumerating the ordered triples."""
    p = probs
    two = p[:, None] * p[None, :] / (1 - p[:, None])  # P(first = a, second = b)
    two.fill_diagonal_(0.0)
    rest = (1 - p[:, None] - p[None, :]).clamp_min(1e-300)
    three = two[:, :, None] * p[None, None, :] / rest[:, :, None]  # P(a, b, c in this order)
    idx = torch.arange(p.shape[0])
    distinct = (idx[:, None, None] != idx[None, None, :]) & (idx[None, :, None] != idx[None, None, :])
    three = torch.where(distinct, three, torch.zeros(()))
    inclusion = three.sum((1, 2)) + three.sum((0, 2)) + three.sum((0, 1))
    return p, two.sum(0), inclusion


def _beam_codes(dist_fn, theta, k, max_candidates, n_cat, sampler=None):
    """R beam-search samples of the node ``dist_fn(logits)`` (one row per replicate), as joint codes
    (``sampler(node, k)``: another sampler)."""
    est = storch.estimator("unordered_set", plate="zz", n_samples=k)
    with storch.Graph() as g:
        th = storch.denote_independent(theta.expand((R,) + theta.shape), 0, "data")
        est(dist_fn(th))
        node = g.nodes[0]
    if sampler is None:
        values, lp, _, _ = stochastic_beam_search(node, k, max_candidates)  # (k, R, n[, K])
    else:
        values, lp, _, _ = sampler(node, k)
    if values.dim() == 4:  # one-hot
        values = values.argmax(-1)
    n = values.shape[-1]
    codes = (values.long() * (n_cat ** torch.arange(n - 1, -1, -1))).sum(-1)  # (k, R)
    return codes, lp


@pytest.mark.parametrize("max_candidates", [2, 4, 8, None])
def test_chunked_beam_is_gumbel_top_k(max_candidates):
    """Beam steps over several variables at once (2^m children per prefix; max_candidates 2: one
    variable per step, None: all 5 at once for this batch) draw the same distribution: the first
    and second draws and the inclusion frequencies of a sample of 3 out of 32 joint values of 5
    Bernoullis, z-tested against exact values from the ordered triples."""
    from storch_score._beam import _chunk_plan
    torch.manual_seed(10)
    theta = torch.tensor([0.5, -0.3, 0.1, -0.5, 0.4])
    codes, lp = _beam_codes(lambda th: Bernoulli(logits=th), theta, 3, max_candidates, 2)
    bits = torch.tensor(list(itertools.product([0, 1], repeat=5)), dtype=torch.float64)
    logp = (bits * torch.nn.functional.logsigmoid(theta) + (1 - bits) * torch.nn.functional.logsigmoid(-theta)).sum(-1)
    first, second, inclusion = _exact_orders(logp.exp())
    if max_candidates is not None:
        assert len(_chunk_plan(5, 2, 3, max_candidates)) > 1  # several beam steps
    onehot = torch.nn.functional.one_hot(codes, 32).double()  # (3, R, 32)
    assert_unbiased(onehot[0], first, "first draw")
    assert_unbiased(onehot[1], second, "second draw")
    assert_unbiased(onehot.sum(0), inclusion, "inclusion")
    assert (codes[0] != codes[1]).all() and (codes[1] != codes[2]).all() and (codes[0] != codes[2]).all()
    assert torch.allclose(lp, logp[codes])  # the joint log-probabilities of the drawn values


@pytest.mark.parametrize("max_candidates", [3, 9])
def test_chunked_beam_with_impossible_values(max_candidates):
    """Three 3-way categoricals, the middle value of the first impossible (18 of 27 joint values
    possible; the -inf path of the search): first draw, second draw and inclusion z-tests, and
    never an impossible value."""
    torch.manual_seed(11)
    theta = torch.tensor([[0.0, -math.inf, 0.3], [0.2, -0.1, 0.0], [0.0, 0.4, -0.2]])
    codes, lp = _beam_codes(lambda th: OneHotCategorical(logits=th), theta, 3, max_candidates, 3)
    vals = torch.tensor(list(itertools.product(range(3), repeat=3)))
    logp = torch.log_softmax(theta, -1).gather(1, vals.t()).sum(0)  # (27,)
    p = logp.exp()
    first, second, inclusion = _exact_orders(p)
    onehot = torch.nn.functional.one_hot(codes, 27).double()
    assert (p[codes] > 0).all()
    possible = p > 0
    assert_unbiased(onehot[0][:, possible], first[possible], "first draw")
    assert_unbiased(onehot[1][:, possible], second[possible], "second draw")
    assert_unbiased(onehot.sum(0)[:, possible], inclusion[possible], "inclusion")
    assert torch.allclose(lp, logp[codes])


def _assert_frequencies(indicators, exact, name):
    """z-test of frequencies; values expected fewer than 30 times in R draws are pooled into one
    component (a value never drawn would otherwise be a zero-variance component, and a rare one has
    a poor estimated standard error)."""
    rare = exact * R < 30
    est = torch.cat([indicators[:, ~rare], indicators[:, rare].sum(1, keepdim=True)], 1)
    assert_unbiased(est, torch.cat([exact[~rare], exact[rare].sum().reshape(1)]), name)


@pytest.mark.parametrize("theta,draws", [
    ([0.5, -0.3, 0.1, -0.5, 0.4], None),  # spread out: 6 i.i.d. draws almost always give 3 distinct
    ([2.5, -3.0, 2.0, 0.3, -2.2], None),  # concentrated (p(mode) ~ 0.6): many rows complete by beam
    ([0.5, -0.3, 0.1, -0.5, 0.4], 3),  # 3 draws for 3 values: the beam completes most rows
])
def test_first_distinct_of_iid_draws_is_gumbel_top_k(theta, draws):
    """sample_without_replacement (the first distinct of i.i.d. draws, completed by a beam over the
    rest where too few are distinct): first and second draw and inclusion frequencies of 3 out of
    the 32 joint values of 5 Bernoullis, z-tested against the exact ordered-triple values."""
    torch.manual_seed(12)
    theta = torch.tensor(theta)
    codes, lp = _beam_codes(lambda th: Bernoulli(logits=th), theta, 3, None, 2,
                            sampler=lambda node, k: sample_without_replacement(node, k, draws))
    bits = torch.tensor(list(itertools.product([0, 1], repeat=5)), dtype=torch.float64)
    logp = (bits * torch.nn.functional.logsigmoid(theta) + (1 - bits) * torch.nn.functional.logsigmoid(-theta)).sum(-1)
    first, second, inclusion = _exact_orders(logp.exp())
    onehot = torch.nn.functional.one_hot(codes, 32).double()
    _assert_frequencies(onehot[0], first, "first draw")
    _assert_frequencies(onehot[1], second, "second draw")
    _assert_frequencies(onehot.sum(0), inclusion, "inclusion")
    assert (codes[0] != codes[1]).all() and (codes[1] != codes[2]).all() and (codes[0] != codes[2]).all()
    assert torch.allclose(lp, logp[codes])


def test_first_distinct_categorical_and_paths():
    """Three 4-way categoricals (64 joint values), k = 5: inclusion z-test; the i.i.d. path returns
    no Gumbels (drawn later by order_gumbels), a -inf log-probability takes the beam."""
    torch.manual_seed(13)
    theta = torch.tensor([[1.5, 0.0, -0.5, 0.2], [0.3, 2.0, 0.0, -1.0], [0.0, 0.1, 0.2, 1.8]])
    codes, lp = _beam_codes(lambda th: OneHotCategorical(logits=th), theta, 5, None, 4,
                            sampler=lambda node, k: sample_without_replacement(node, k))
    vals = torch.tensor(list(itertools.product(range(4), repeat=3)))
    logp = torch.log_softmax(theta, -1).gather(1, vals.t()).sum(0)  # (64,)
    first, _, _ = _exact_orders(logp.exp())
    onehot = torch.nn.functional.one_hot(codes, 64).double()
    _assert_frequencies(onehot[0], first, "first draw")
    assert (codes.sort(0).values.diff(dim=0) > 0).all()  # distinct
    assert torch.allclose(lp, logp[codes])
    est = storch.estimator("unordered_set", plate="zz", n_samples=3)
    with storch.Graph() as g:
        est(Bernoulli(logits=torch.zeros(20)))
        assert sample_without_replacement(g.nodes[0], 3)[2] is None  # i.i.d. path
    with storch.Graph() as g:
        est(Bernoulli(logits=torch.tensor([0.0] * 19 + [math.inf])))
        assert sample_without_replacement(g.nodes[0], 3)[2] is not None  # beam path


def test_order_gumbels_match_gumbel_top_k():
    """Perturbed values drawn given an ordered sample (order_gumbels) have the distribution of the
    Gumbel-top-k values: mean of G_1, G_2, G_3 over enumeration's Gumbel-top-3 of 6 values vs
    order_gumbels of the sample it drew."""
    torch.manual_seed(14)
    logp = torch.log_softmax(torch.tensor([0.3, -0.2, 1.0, 0.0, -1.0, 0.5]), 0)
    pert = logp + -torch.log(-torch.log(torch.rand(R, 6)))
    top = pert.topk(3, dim=1)
    drawn = order_gumbels(logp[top.indices].t())  # (3, R): given the sample's log-probabilities
    assert_unbiased(torch.cat([drawn.t(), drawn.t() ** 2], 1) - torch.cat([top.values, top.values ** 2], 1),
                    torch.zeros(6), "G and G^2, order_gumbels minus Gumbel-top-k")
    assert (drawn[0] >= drawn[1]).all() and (drawn[1] >= drawn[2]).all()


def test_vae_sized_node_takes_the_fast_paths(monkeypatch):
    """20 Bernoulli latents, 8 samples (the VAE benchmark's node): the sample comes from i.i.d. draws
    (no beam: no Gumbels recorded, every value possible) and the set probabilities from the float64
    programme (the log-space one is not called); the weights still sum to one in expectation."""
    import storch_score._beam as beam_module
    import storch_score.unordered_set as us_module

    def fail(*args, **kwargs):
        raise AssertionError("slow path taken")

    monkeypatch.setattr(beam_module, "_search", fail)
    monkeypatch.setattr(us_module, "_log_h", fail)
    torch.manual_seed(15)
    est = storch.estimator("unordered_set", plate="z", n_samples=8)
    with storch.Graph() as g:
        logits = storch.denote_independent(torch.randn(50, 20) * 0.5, 0, "data")
        est(Bernoulli(logits=logits))
        node = g.nodes[0]
        assert node.state.g is None and node.state.exact
        w = node.weight_values.sum(0)  # (50,)
    assert_unbiased(w.unsqueeze(1), 1.0, "sum of the weights")


def test_one_categorical_over_a_large_vocabulary_needs_no_budget():
    """A Categorical node without batch dims over K > budget values (a 5000-token vocabulary) is sampled
    from its K logits (nothing else is listed): it was refused at the default budget of 4096, as if K^1
    joint values had to be enumerated. The gradient z-tested against the exact one."""
    torch.manual_seed(5)
    k = 5000
    base = torch.randn(k, dtype=torch.float64) * 2
    values = torch.randn(k, dtype=torch.float64)
    est = storch.estimator("unordered_set", plate="t", n_samples=4)
    with storch.Graph():
        leaf, x = replicate(base, 2000)
        tok = est(Categorical(logits=x))
        storch.add_cost(values[tok])
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    p = torch.softmax(base, -1)
    exact = p * (values - (p * values).sum())
    top = torch.topk(exact.abs(), 8).indices  # the components with signal (the rest are ~0)
    assert_unbiased(g[:, top], exact[top], "unordered_set@4 over 5000 categories")


def test_large_vocabulary_beam_keeps_no_dense_table():
    """10 tokens of a 300-word vocabulary (one variable per step): the dense one-hot table of the chunks
    had (n K)^2 = 9M entries (1000 words, 20 tokens: 1.6 GB, torch's out of memory) and was kept for the
    process in float64 and in the step's dtype. Now above _ONEHOT_MAX_ENTRIES the chunks' log-probabilities
    are gathered: no table of more than O(n K) entries is made or kept."""
    from storch_score import _beam

    _beam._DEVICE_TABLES.clear()
    torch.manual_seed(4)
    n, n_cat, k = 10, 300, 8
    lp = torch.log_softmax(torch.randn(n_cat, 1, n), 0)
    choices, phi, _, _ = _beam._search(lp, k, _beam._max_candidates(1))
    sizes = _beam._chunk_plan(n, n_cat, k, _beam._max_candidates(1))
    held = [t for entry in _beam._DEVICE_TABLES.values() for t in entry if torch.is_tensor(t)]
    held += [t for t in _beam._chunk_tables(n_cat, sizes) if torch.is_tensor(t)]
    assert held and max(t.numel() for t in held) <= 4 * n * n_cat
    # the sample's log-probabilities are its values' (gathered, not a product with the table)
    want = lp[choices.permute(1, 0, 2), 0, torch.arange(n)].sum(-1)  # (P, m), as phi
    torch.testing.assert_close(phi, want)
    assert len({tuple(c) for c in choices[:, 0].tolist()}) == k


def test_beam_gathered_path_equals_the_table_and_the_cache_is_bounded(monkeypatch):
    """The gathered chunk log-probabilities draw the same sample as the one-hot product (same seed);
    with the cache's byte budget spent, a step's table is not kept (limits lowered here)."""
    from storch_score import _beam

    torch.manual_seed(5)
    lp = torch.log_softmax(torch.randn(3, 4, 6), 0)  # K = 3, P = 4, n = 6: chunks of several variables
    _beam._DEVICE_TABLES.clear()
    monkeypatch.setattr(_beam, "_CACHE_BYTES", 0)
    torch.manual_seed(6)
    table = _beam._search(lp, 5, 32)
    assert not _beam._DEVICE_TABLES  # its one-hot table (> 0 bytes) exceeded the budget: not kept
    monkeypatch.setattr(_beam, "_ONEHOT_MAX_ENTRIES", 0)
    torch.manual_seed(6)
    gathered = _beam._search(lp, 5, 32)
    assert torch.equal(table[0], gathered[0])
    torch.testing.assert_close(table[1], gathered[1])
    torch.testing.assert_close(table[2], gathered[2])
    assert all(entry[3] is None for entry in _beam._DEVICE_TABLES.values())  # kept: index tables only


def _comparison_count(lp, u):
    """The inverse CDF as _first_distinct computed it before: (u >= cdf).sum(-1) over a (P, draws, n, K-1)
    comparison (the reference the binary search must agree with bitwise)."""
    cdf = lp[:-1].exp().cumsum(0).permute(1, 2, 0).unsqueeze(1)  # (P, 1, n, K-1)
    return (u.unsqueeze(-1) >= cdf).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_cdf_binary_search_counts_as_the_comparison(dtype):
    """_inverse_cdf (torch.searchsorted, right=True) gives exactly the comparison's counts on 200 seeds:
    zero-probability values (equal cumulative sums), draws equal to a cumulative sum (ties, which
    count), draws of 0, K from 3 to 40, several rows and variables."""
    from storch_score._beam import _inverse_cdf

    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        n_cat, p, n, draws = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                              ((3, 41), (1, 5), (1, 4), (1, 60)))
        logits = torch.randn(n_cat, p, n, generator=g, dtype=dtype) * 3
        logits[torch.rand(n_cat, p, n, generator=g) < 0.3] = -1e4  # probability 0 (exp underflows)
        lp = logits.log_softmax(0)
        u = torch.rand(p, draws, n, generator=g, dtype=dtype)
        cdf = lp[:-1].exp().cumsum(0).permute(1, 2, 0).unsqueeze(1).expand(p, draws, n, n_cat - 1)
        at = torch.randint(0, n_cat - 1, (p, draws, n, 1), generator=g)
        pick = torch.rand(p, draws, n, generator=g)
        u = torch.where(pick < 0.3, cdf.gather(-1, at).squeeze(-1), u)  # ties u == cdf
        u = torch.where(pick > 0.95, torch.zeros_like(u), u)
        got = _inverse_cdf(lp, u)
        assert got.dtype == torch.int64 and got.is_contiguous()
        assert torch.equal(got, _comparison_count(lp, u)), seed


def test_first_distinct_draws_the_same_values_as_the_comparison(monkeypatch):
    """The same random numbers give bitwise the same sample: _first_distinct with the binary search and
    with the old comparison in its place, on 40 seeds (float32 and float64, zero-probability values)."""
    from storch_score import _beam

    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        dtype = torch.float32 if seed % 2 else torch.float64
        n_cat, p, n = 3 + seed % 9, 1 + seed % 4, 1 + seed % 3
        logits = torch.randn(n_cat, p, n, generator=g, dtype=dtype) * 2
        logits[0] = -1e4
        lp = logits.log_softmax(0)
        k = min(4, n_cat ** n - 1)
        torch.manual_seed(seed)
        new = _beam._first_distinct(lp, k, 2 * k)
        with monkeypatch.context() as m:
            m.setattr(_beam, "_inverse_cdf", _comparison_count)
            torch.manual_seed(seed)
            old = _beam._first_distinct(lp, k, 2 * k)
        assert torch.equal(new, old), seed


def test_first_distinct_over_a_large_vocabulary_makes_no_k_wide_comparison():
    """8 rows of 4 tokens of a 2000-word vocabulary, 16 draws: the inverse CDF is a binary search (the
    comparison made a (P, draws, n, K-1) = 1M-element tensor; at P 256, K 30000 it was 1.5 GB and 6x the
    step): no tensor of more than P n K elements, and torch.searchsorted ran."""
    from storch_score._beam import _first_distinct

    torch.manual_seed(6)
    n_cat, p, n, k = 2000, 8, 4, 8
    lp = torch.log_softmax(torch.randn(n_cat, p, n), 0)
    with Allocations() as spy:
        choices = _first_distinct(lp, k, 2 * k)
    assert "searchsorted" in spy.names
    assert spy.largest <= p * n * n_cat
    assert choices.shape == (k, p, n) and bool(((choices >= 0) & (choices < n_cat)).all())
