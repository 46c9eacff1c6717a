"""sum_and_sample (MAPO) on joint supports beyond the enumeration budget: the memory by beam
search, the samples from p(x | x ∉ M) by ancestral sampling over the memory's trie."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from score_problems import PROBLEMS, Maker, estimates, exact
from torch.distributions import Bernoulli, Categorical

import storch
from path_probes import Allocations
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from storch_score._memory import VariableTable, sample_outside, top_k_codes

torch.set_default_dtype(torch.float64)

# -- 14 Bernoullis (2^14 = 16384 joint values > budget 4096) with a closed-form expectation -------

N_BITS = 14
THETA = torch.linspace(-1.5, 1.5, N_BITS)
COEF = torch.linspace(-1.0, 2.0, N_BITS)
TARGET = 3.0


def _bits_cost(b):
    return ((b * COEF).sum() - TARGET) ** 2  # couples every bit: not separable


def _bits_exact(theta):
    p = torch.sigmoid(theta)  # E[(c·b - t)^2] = Var(c·b) + (E[c·b] - t)^2
    return (COEF ** 2 * p * (1 - p)).sum() + ((COEF * p).sum() - TARGET) ** 2


@pytest.mark.parametrize("options", [
    dict(n_enumerate=1, n_samples=3, baseline="leave_one_out"),  # the common case: components without guards
    dict(n_enumerate=4, n_samples=3),
    dict(n_enumerate=2, n_samples=3, baseline="leave_one_out"),
    dict(memory=(torch.rand(6, N_BITS, generator=torch.Generator().manual_seed(0)) > 0.5).double(), n_samples=2,
         baseline="leave_one_out"),
])
def test_fourteen_bernoullis_orders_1_and_2(options):
    torch.manual_seed(0)
    est = storch.estimator("sum_and_sample", plate="z", **options)
    with storch.Graph() as graph:
        leaf, th = replicate(THETA, 2000)
        b = est(Bernoulli(logits=th))
        node = graph.nodes[0]
        storch.add_cost(_bits_cost(b))
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    assert node.state.beam  # the beam path ran, nothing was enumerated
    t = THETA.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(_bits_exact, t), f"{options} gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(_bits_exact, t), f"{options} Hessian")


def test_memory_is_the_top_k_and_samples_stay_outside():
    """Beam memory = enumeration's k' most probable values; no sample lands in M."""
    torch.manual_seed(1)
    logits = torch.randn(5, 3, 3)  # 5 parent entries, 3 categorical variables with K = 3 (27 values)
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=6, n_samples=50, budget=8)
    with storch.Graph():
        par = storch.denote_independent(logits, 0, "data")
        z = est(Categorical(logits=par))
    raw = z.tensor  # (56, 5, 3)
    joint = torch.tensor(list(itertools.product(range(3), repeat=3)))  # (27, 3)
    lp = torch.log_softmax(logits, -1)  # (5, 3, 3)
    lp_joint = lp.unsqueeze(0).expand(27, 5, 3, 3).gather(-1, joint[:, None, :, None].expand(27, 5, 3, 1)).squeeze(-1).sum(-1)
    top = lp_joint.topk(6, 0).indices  # (6, 5)
    assert torch.equal(raw[:6], joint[top])
    mem = raw[:6].unsqueeze(0)  # (1, 6, 5, 3)
    inside = (raw[6:].unsqueeze(1) == mem).all(-1).any(1)  # (50, 5)
    assert not inside.any()


def test_conditional_frequencies_match_enumeration():
    """The trie sampler's frequencies equal p(x | x ∉ M) (z-test per joint value), for a memory with
    repeats and shared prefixes."""
    torch.manual_seed(2)
    theta = torch.tensor([0.8, -0.4, 1.5, 0.2])
    table = VariableTable(_node(Bernoulli(logits=theta), budget=2))
    mem = torch.tensor([[1, 0, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0]])
    first = torch.tensor([True, True, True, False, True]).unsqueeze(-1)
    draws = sample_outside(table.lp, mem.unsqueeze(1), first, 20000)[:, 0]  # (R, 4)
    codes = (draws * torch.tensor([8, 4, 2, 1])).sum(-1)
    p = torch.sigmoid(theta)
    joint = torch.tensor(list(itertools.product([0, 1], repeat=4)))
    prob = torch.where(joint > 0, p, 1 - p).prod(-1)
    in_mem = torch.zeros(16, dtype=torch.bool)
    in_mem[(mem * torch.tensor([8, 4, 2, 1])).sum(-1)] = True
    want = torch.where(in_mem, torch.zeros(16), prob) / prob[~in_mem].sum()
    assert not in_mem[codes].any()
    assert_unbiased(torch.nn.functional.one_hot(codes, 16).double(), want, "p(x | x not in M)")


def test_top_k_codes_of_a_flat_distribution_are_distinct():
    lp = torch.zeros(2, 1, 12).log_softmax(0)
    codes = top_k_codes(lp, 100)[:, 0]
    assert codes.shape == (100, 12) and len({tuple(c.tolist()) for c in codes}) == 100


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_small_problems_beam_path_against_enumeration(problem):
    """budget=1 forces the beam path on the score family's problems (categorical K = 5, a two-node
    chain, a data plate with a Bernoulli pair); orders 1 and 2 against exact enumeration."""
    torch.manual_seed(3)
    make = Maker("sum_and_sample", n_enumerate=2, n_samples=2, baseline="leave_one_out", budget=1)
    for order, (g, w) in enumerate(zip(estimates(problem, make, 2, replicates=3000), exact(problem, 2)), 1):
        assert_unbiased(g, w, f"beam sum_and_sample on {problem}, order {order}")


def test_beam_path_has_the_variance_of_the_enumerated_path():
    """The same estimator: gradient variances of both paths agree within sampling error."""
    var = {}
    for budget in (4096, 1):
        torch.manual_seed(4)
        g, = estimates("categorical", Maker("sum_and_sample", n_enumerate=1, n_samples=2, budget=budget), 1,
                       replicates=4000)
        var[budget] = float(g.var(0).sum())
    assert 0.85 < var[1] / var[4096] < 1.15, var


def test_extreme_logits_memory_holds_all_mass():
    torch.manual_seed(5)
    theta = torch.tensor([60.0, -60.0, 0.0] * 5, requires_grad=True)
    for n_enumerate in (2, 1):
        est = storch.estimator("sum_and_sample", plate="z", n_enumerate=n_enumerate, n_samples=3,
                               baseline="leave_one_out")
        with storch.Graph():
            b = est(Bernoulli(logits=theta))
            storch.add_cost(((b - 0.45) ** 2).sum())
            g, = torch.autograd.grad(storch.surrogate_loss(), theta)
        assert torch.isfinite(g).all()


def _beyond_budget_step(theta, seed, **options):
    """The node's state, value and gradient of one step on 20 Bernoullis (beyond the budget)."""
    est = storch.estimator("sum_and_sample", plate="z", n_samples=4, baseline="leave_one_out", **options)
    torch.manual_seed(seed)
    with storch.Graph() as graph:
        b = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
        node = graph.nodes[0]
        storch.add_cost(((b - 0.45) ** 2).sum(-1))
        loss = storch.surrogate_loss()
        return node.state, loss.detach(), torch.autograd.grad(loss, theta)[0]


def test_one_memory_value_with_mass_outside_takes_the_unguarded_path(monkeypatch):
    # k' = 1 (the default) with every value possible and p(x ∉ M) > 0 in every entry: the components
    # skip the guards for an empty remainder and repeated memory values (6 autograd nodes fewer on
    # the VAE's step; its time "vs loo" 1.5 -> 1.4), with the guarded path's values and gradients
    theta = torch.linspace(-2.0, 2.0, 20).repeat(3, 1).requires_grad_(True)
    sure, value, grad = _beyond_budget_step(theta, 0)
    assert sure.sure and sure.empty is None
    from storch_score.sum_and_sample import SumAndSample

    beyond = SumAndSample._beyond_budget

    def guarded_path(self, node, n_values):  # the same sample; the components on their general path
        out = beyond(self, node, n_values)
        node.state.sure = False
        return out

    monkeypatch.setattr(SumAndSample, "_beyond_budget", guarded_path)
    guarded, value_g, grad_g = _beyond_budget_step(theta, 0)
    monkeypatch.undo()
    assert not guarded.sure and guarded.empty is not None and not guarded.empty.any()
    torch.testing.assert_close(value, value_g)
    torch.testing.assert_close(grad, grad_g)
    # controls, on the guarded path: p(a) = 1 in an entry (every logit of row 0 far beyond float's
    # resolution: no mass outside M), and two memory values
    extreme = theta.detach().clone()
    extreme[0] = 800.0
    state, value, grad = _beyond_budget_step(extreme.requires_grad_(True), 0)
    assert not state.sure and state.empty.tolist() == [True, False, False]
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert not _beyond_budget_step(theta, 0, n_enumerate=2)[0].sure


def test_memory_value_outside_the_support_beyond_budget():
    est = storch.estimator("sum_and_sample", plate="z", memory=torch.full((1, 13), 2.0), n_samples=2)
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="not in the support"):
            est(Bernoulli(logits=torch.zeros(13)))


def _node(d, budget):
    est = storch.estimator("sum_and_sample", plate="zz", n_samples=1, budget=budget)
    with storch.Graph() as g:
        est(d)
        return g.nodes[0]


@pytest.mark.parametrize("n_cat", [2, 3])
def test_one_value_memory_frequencies_match_enumeration(n_cat):
    """The one-value sampler of p(x | x != a) (first differing variable, then its value, then the
    rest from p; raw uniform / Gumbel-max draws): z-test per joint value against enumeration, for
    Bernoullis and 3-way categoricals."""
    torch.manual_seed(3)
    logits = torch.tensor([[0.8, -0.4, 1.5], [0.2, 0.0, -1.0], [1.0, 0.3, 0.1]])[:, :n_cat]
    lp = torch.log_softmax(logits, -1).t().unsqueeze(1)  # (K, 1, n)
    a = torch.tensor([[0, 2 % n_cat, 1]])  # (1, n)
    draws = sample_outside(lp, a.unsqueeze(0), torch.ones(1, 1, dtype=torch.bool), 20000)[:, 0]  # (R, 3)
    weights = n_cat ** torch.arange(2, -1, -1)
    codes = (draws * weights).sum(-1)
    joint = torch.tensor(list(itertools.product(range(n_cat), repeat=3)))
    prob = lp[:, 0, :].t().gather(1, joint.t()).sum(0).exp()  # (K^3,)
    a_code = int((a[0] * weights).sum())
    want = prob.clone()
    want[a_code] = 0.0
    want = want / want.sum()
    assert not (codes == a_code).any()
    assert_unbiased(torch.nn.functional.one_hot(codes, n_cat ** 3).double(), want, "p(x | x != a)")


def test_one_value_memory_rejection_and_fallback():
    """p(x | x != a) with a of probability ~0.6: the one-draw rejection hits a often, the exact
    sampler replaces those draws; frequencies z-tested against enumeration, never a."""
    from storch_score._memory import _rejection_one
    torch.manual_seed(4)
    theta = torch.tensor([2.0, -2.5, 1.5, 3.0])
    lp = torch.stack([F.logsigmoid(-theta), F.logsigmoid(theta)]).unsqueeze(1)  # (2, 1, 4)
    a = torch.tensor([[1, 0, 1, 1]])
    draws = _rejection_one(lp, a, 20000)[:, 0]
    codes = (draws * torch.tensor([8, 4, 2, 1])).sum(-1)
    joint = torch.tensor(list(itertools.product([0, 1], repeat=4)))
    prob = torch.where(joint > 0, torch.sigmoid(theta), torch.sigmoid(-theta)).prod(-1)
    want = prob.clone()
    want[11] = 0.0
    want = want / want.sum()
    assert not (codes == 11).any()
    common = want * 20000 >= 30
    est = torch.nn.functional.one_hot(codes, 16).double()
    assert_unbiased(torch.cat([est[:, common], est[:, ~common].sum(1, keepdim=True)], 1),
                    torch.cat([want[common], want[~common].sum().reshape(1)]), "p(x | x != a)")


def test_spread_out_node_skips_the_exact_sampler(monkeypatch):
    """20 Bernoullis near 1/2, memory of one value: no draw hits it, so p(x | x != a) comes from the
    draws from p alone (the first-differing-variable sampler is not called)."""
    import storch_score._memory as memory_module

    def fail(*args, **kwargs):
        raise AssertionError("slow path taken")

    monkeypatch.setattr(memory_module, "_sample_outside_one", fail)
    torch.manual_seed(16)
    est = storch.estimator("sum_and_sample", plate="z", n_samples=7, n_enumerate=1)
    with storch.Graph():
        logits = storch.denote_independent(torch.randn(20, 20) * 0.3, 0, "data")
        z = est(Bernoulli(logits=logits))
        assert z.plates[0].size == 8


def test_one_variable_outside_memory_masks_p_without_the_trie_walk():
    """A node of one variable (a token of a large vocabulary): the walk over the memory's trie made
    (m, k', P, K) tensors (50257 words, batch 64, 16 x 16: 3.3 GB, torch's out of memory). Now p is
    masked at the memory's values, (P, K): the largest tensor stays far below m k' P K, and the
    frequencies are p(x | x not in M) (z-test), a repeat of a memory value counting once."""
    torch.manual_seed(3)
    theta = torch.randn(6)
    table = VariableTable(_node(Categorical(logits=theta), budget=2))
    mem = torch.tensor([[4], [1], [4], [0]])  # (k', n), a repeat of 4
    first = torch.tensor([True, True, False, True]).unsqueeze(-1)
    with Allocations() as spy:
        draws = sample_outside(table.lp, mem.unsqueeze(1), first, 20000)[:, 0, 0]  # (R,)
    assert spy.largest < 20000 * 4 * 6
    p = torch.softmax(theta, -1)
    in_mem = torch.zeros(6, dtype=torch.bool)
    in_mem[[4, 1, 0]] = True
    want = torch.where(in_mem, torch.zeros(6), p) / p[~in_mem].sum()
    assert not in_mem[draws].any()
    assert_unbiased(F.one_hot(draws, 6).double(), want, "p(x | x not in M), one variable")


def test_trie_walk_beyond_its_size_is_refused_before_allocating(monkeypatch):
    """Several variables: the (m, k', P, K) walk above _WALK_MAX_ENTRIES raises a storch error that says
    the size and what to do (lowered here; the real limit is 2^28 entries)."""
    from storch_score import _memory

    monkeypatch.setattr(_memory, "_WALK_MAX_ENTRIES", 100)
    table = VariableTable(_node(Categorical(logits=torch.randn(2, 6)), budget=2))
    mem = torch.tensor([[4, 0], [1, 2], [0, 0]]).unsqueeze(1)
    with pytest.raises(storch.OptionError, match=r"10 x 3 x 1 x 6 = 180 entries.*n_samples or n_enumerate"):
        sample_outside(table.lp, mem, torch.ones(3, 1, dtype=torch.bool), 10)
    # a node of one variable does not walk: not refused
    table = VariableTable(_node(Categorical(logits=torch.randn(6)), budget=2))
    assert sample_outside(table.lp, mem[:, :, :1], torch.ones(3, 1, dtype=torch.bool), 10).shape == (10, 1, 1)
