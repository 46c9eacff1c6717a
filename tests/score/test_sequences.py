"""Estimators over autoregressive sequences (issue 12): one estimator called at every step makes
one partition; `unordered_set` samples whole sequences without replacement by stochastic beam
search, and tensors of earlier steps follow their prefixes without user re-indexing.

The model: vocabulary 3, length 3 (27 sequences), token t drawn from
OneHotCategorical(logits = one_hot(token t-1) @ W) (logits a for the first token). With ``eos=2``
a sequence ends at its first token 2 (later tokens are 2 with probability 1). Exact values come
from enumerating the 27 sequences.
"""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

R = 2000
THETA = torch.tensor([0.3, -0.2, 0.1, 0.5, -0.4, 0.2, -0.3, 0.6, 0.1, 0.2, 0.1, -0.5], dtype=torch.float64)
VALUES = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
SEQUENCES = list(itertools.product(range(3), repeat=3))


def logits_of(theta, prev):
    return theta[0:3] if prev is None else prev @ theta[3:12].reshape(3, 3)


def cost_of(a, b, c):
    return (a - 1.0) ** 2 + a * b - 0.7 * c + 0.3 * b * c


def sequence_log_probs(theta, eos=None):
    """log p of each of the 27 sequences (-inf for a token after eos that is not eos)."""
    out = []
    for seq in SEQUENCES:
        lp, prev, done = 0.0, None, False
        for s in seq:
            if done:
                lp = lp + (0.0 if s == eos else -math.inf)
            else:
                lp = lp + torch.log_softmax(logits_of(theta, prev), -1)[s]
                done = eos is not None and s == eos
            prev = torch.nn.functional.one_hot(torch.tensor(s), 3).to(theta.dtype)
        out.append(lp if torch.is_tensor(lp) else torch.tensor(lp, dtype=theta.dtype))
    return torch.stack(out)


def exact(theta, eos=None):
    costs = torch.tensor([cost_of(*map(float, s)) for s in SEQUENCES], dtype=theta.dtype)
    return (sequence_log_probs(theta, eos).exp() * costs).sum()


def estimates(name, k, order, seed, eos=None, r=R, per_step=False, **options):
    """Per-replicate derivatives (r independent estimates on a data plate) and the sequence codes.

    With ``per_step``, the cost is split into a cost added at step 0, one at step 1 and the rest
    at step 2 (credited causally by ``score``, moved to the last step by ``unordered_set``).
    """
    torch.manual_seed(seed)
    est = storch.estimator(name, plate="seq", n_samples=k, eos=eos, **options)
    with storch.Graph():
        leaf, th = replicate(THETA, r)
        prev, tokens = None, []
        for t in range(3):
            x = est(OneHotCategorical(logits=logits_of(th, prev)))
            tokens.append(x @ VALUES)
            prev = x
            if per_step and t == 0:
                storch.add_cost((tokens[0] - 1.0) ** 2, name="step0")
            if per_step and t == 1:
                storch.add_cost(tokens[0] * tokens[1], name="step1")
        a, b, c = tokens  # steps 0, 1, 2: a and b follow their prefixes when they meet c
        if per_step:
            storch.add_cost(cost_of(a, b, c) - (a - 1.0) ** 2 - a * b, name="step2")
        else:
            storch.add_cost(cost_of(a, b, c))
        codes = (a * 9 + b * 3 + c).tensor.detach().long()  # (k, r): the sequences of each estimate
        return per_replicate_derivatives(storch.surrogate_loss(order), leaf, order), codes


def test_partition_plate_step_and_sizes():
    # the plate of step t carries step t; the beam may change the plate's size between steps
    from torch.distributions import Categorical

    est = storch.estimator("unordered_set", plate="seq", n_samples=4)
    with storch.Graph():
        x0 = est(Categorical(logits=torch.zeros(3)))
        x1 = est(Categorical(logits=torch.zeros(3) + x0))
        assert (x0.plates[0].step, x0.plates[0].size) == (0, 3)
        assert (x1.plates[0].step, x1.plates[0].size) == (1, 4)
        pair = x0 * 3 + x1  # x0 follows its prefixes: the 4 pairs are distinct
        assert pair.plates[0].step == 1 and len(set(pair.tensor.tolist())) == 4


def exact_derivatives(eos):
    t = THETA.clone()
    return (torch.autograd.functional.jacobian(lambda th: exact(th, eos), t),
            torch.autograd.functional.hessian(lambda th: exact(th, eos), t))


@pytest.mark.parametrize("eos", [None, 2])
def test_unordered_set_over_sequences_is_unbiased_and_distinct(eos):
    grad, _ = exact_derivatives(eos)
    (g,), codes = estimates("unordered_set", 3, 1, seed=0, eos=eos)
    assert_unbiased(g, grad, f"unordered_set over sequences, eos={eos}")
    srt = codes.sort(0).values
    assert (srt[1:] != srt[:-1]).all(), "the sequences of one estimate must be distinct"
    if eos is not None:  # every sampled sequence is a valid one: nothing but eos after eos
        assert torch.isfinite(sequence_log_probs(THETA, eos)[codes]).all()


@pytest.mark.parametrize("eos", [None, 2])
def test_score_leave_one_out_over_sequences_orders_1_and_2(eos):
    grad, hess = exact_derivatives(eos)
    (g, h), _ = estimates("score", 3, 2, seed=1, eos=eos, baseline="leave_one_out")
    assert_unbiased(g, grad, f"score + leave-one-out, eos={eos}")
    assert_unbiased(h, hess, f"score + leave-one-out Hessian, eos={eos}")


def test_unordered_set_without_baseline_over_sequences_order_2():
    # detached weights and no baseline: any order (appendix D.2.3), also over whole sequences
    grad, hess = exact_derivatives(2)
    (g, h), _ = estimates("unordered_set", 3, 2, seed=6, eos=2, baseline=False)
    assert_unbiased(g, grad, "unordered_set without baseline")
    assert_unbiased(h, hess, "unordered_set without baseline, Hessian")
    with storch.Graph(), pytest.raises(storch.OrderError, match="unordered_set"):
        estimates("unordered_set", 3, 2, seed=6, eos=2, r=2)  # the built-in baseline: order 1 only


@pytest.mark.parametrize("name,options", [("unordered_set", {}), ("score", dict(baseline="leave_one_out"))])
def test_costs_at_intermediate_steps(name, options):
    # unordered_set moves costs of steps 0 and 1 to the last step (re-indexed by the parents);
    # score credits them to steps <= 0 and <= 1
    grad, _ = exact_derivatives(2)
    (g,), _ = estimates(name, 3, 1, seed=5, eos=2, per_step=True, **options)
    assert_unbiased(g, grad, f"{name} with a cost per step")


@pytest.mark.parametrize("eos,k", [(None, 27), (2, 30)])
def test_unordered_set_with_every_sequence_is_exact(eos, k):
    grad, _ = exact_derivatives(eos)
    (g,), codes = estimates("unordered_set", k, 1, seed=2, eos=eos, r=3)
    torch.testing.assert_close(g, grad.expand_as(g), rtol=1e-9, atol=1e-9)
    # the set is the whole support and nothing else: 27 sequences, or the 15 possible ones with eos
    # (k = 30 exceeds the support: the set is smaller than k, never a sequence the model cannot produce)
    possible = torch.isfinite(sequence_log_probs(THETA, eos)).nonzero().squeeze(1)
    assert codes.shape[0] == possible.shape[0] == (27 if eos is None else 15)
    assert (codes.sort(0).values == possible.unsqueeze(1)).all()


def exact_inclusion(p, k):
    """P(s ∈ S) for an ordered sample without replacement of size k (enumerating ordered draws)."""
    n = p.shape[0]
    incl = torch.zeros(n, dtype=p.dtype)
    for draw in itertools.permutations(range(n), k):
        pr, left = 1.0, 1.0
        for s in draw:
            if left <= 0:
                pr = 0.0
                break
            pr, left = pr * float(p[s]) / left, left - float(p[s])
        for s in draw:
            incl[s] += pr
    return incl


@pytest.mark.parametrize("eos", [None, 2])
def test_beam_search_inclusion_frequencies_match_exact(eos):
    p = sequence_log_probs(THETA, eos).exp()
    _, codes = estimates("unordered_set", 3, 1, seed=3, eos=eos, r=4000)
    included = torch.nn.functional.one_hot(codes, 27).sum(0).double()  # (r, 27) indicators
    assert_unbiased(included, exact_inclusion(p, 3), f"inclusion probabilities, eos={eos}")


def gru_cell(cell, x, h):
    """torch.nn.GRUCell's update written with F.linear (the same parameters and equations), so
    the test does not depend on how the plate dispatcher batches RNN cells (issue 10)."""
    gi = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)
    gh = torch.nn.functional.linear(h, cell.weight_hh, cell.bias_hh)
    n = cell.hidden_size
    r = torch.sigmoid(gi[:n] + gh[:n])
    z = torch.sigmoid(gi[n:2 * n] + gh[n:2 * n])
    new = torch.tanh(gi[2 * n:] + r * gh[2 * n:])
    return (1 - z) * new + z * h


class GRUDecoder(torch.nn.Module):
    """A GRUCell decoder over a vocabulary of 3, written for one sequence."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.cell = torch.nn.GRUCell(4, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, est, bias, cell=gru_cell):
        h = torch.zeros(5, dtype=torch.float64)
        x = torch.zeros(3, dtype=torch.float64)
        tokens = []
        for _ in range(3):
            h = cell(self.cell, self.embed(x), h)  # h of step t-1 follows its prefix at step t
            x = est(OneHotCategorical(logits=self.out(h) + bias))
            tokens.append(x @ VALUES)
        return tokens


def _gru_exact(model):
    bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    total = 0.0
    for seq in SEQUENCES:
        h, x, lp = torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0.0
        for s in seq:
            h = model.cell(model.embed(x), h)  # torch's own GRUCell: the reference
            lp = lp + torch.log_softmax(model.out(h) + bias, -1)[s]
            x = torch.nn.functional.one_hot(torch.tensor(s), 3).double()
        total = total + lp.exp() * cost_of(*map(float, seq))
    return torch.autograd.grad(total, bias)[0]


@pytest.mark.parametrize("name,options", [("unordered_set", {}), ("score", dict(baseline="leave_one_out"))])
def test_gru_decoder_loop_same_model_code_for_every_estimator(name, options):
    # the model code is the same for every estimator; only the storch.estimator(...) line changes.
    # 1000 independent estimates in one graph: an extra output bias replicated on a data plate
    torch.manual_seed(4)
    model = GRUDecoder().double()
    est = storch.estimator(name, plate="seq", n_samples=3, **options)
    with storch.Graph():
        leaf, bias = replicate(torch.zeros(3, dtype=torch.float64), 1000)
        a, b, c = model(est, bias)
        storch.add_cost(cost_of(a, b, c))
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(g, _gru_exact(model), f"GRU decoder, {name}")


def test_data_plate_that_appears_at_a_later_step():
    # step 0 does not depend on the data, step 1 does: the beam splits per data point, and the
    # cost of step 0 (no data plate) is moved to the last step of each data point's beam.
    # With k = 9 (every sequence) the estimate is the exact gradient.
    a = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.5], [0.2, 0.2, -0.1]], dtype=torch.float64,
                     requires_grad=True)
    data = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    est = storch.estimator("unordered_set", plate="seq", n_samples=9)
    with storch.Graph():
        x0 = est(OneHotCategorical(logits=a))
        d = storch.denote_independent(data, 0, "data")
        x1 = est(OneHotCategorical(logits=x0 @ w + d))
        assert [p.name for p in x1.plates] == ["seq", "data"] and x1.plates[0].size == 9
        storch.add_cost((x0 @ VALUES - 1.0) ** 2, name="first")
        storch.add_cost((x0 @ VALUES) * (x1 @ VALUES), name="second")
        g = torch.autograd.grad(storch.surrogate_loss(), (a, w))
    total = 0.0
    for i, j in itertools.product(range(3), repeat=2):
        for row in data:
            p = torch.softmax(a, -1)[i] * torch.softmax(w[i] + row, -1)[j]
            total = total + p * ((i - 1.0) ** 2 + i * j) / len(data)
    expected = torch.autograd.grad(total, (a, w))
    for got, want in zip(g, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# A discrete and a continuous action per step (RL): a_t by unordered_set over the sequence (one
# beam per data point, so the parents differ per data point), then a node that depends on a_t: a
# Normal by reparameterization (one partition, or one node per step) or a Bernoulli by expect (one
# node per step). Their gradient functions are 0: a size-1 dim on the sequence plate that the beam's
# per-data-point parents must leave broadcast (it crashed with "index 1 is out of bounds").
ACTION_DATA = torch.tensor([0.5, -1.0], dtype=torch.float64)
ACTION_PARAMS = torch.tensor([0.2, -0.3, 0.4, 0.7, -0.2], dtype=torch.float64)  # logits (3), w, mu


def _action_logits(params, prev, x):
    scale = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    return params[0:3] + (x + (0.0 if prev is None else params[3] * prev)) * scale


def _second_cost(second, params, a):
    """E[cost_t | a_t] of the node that depends on a_t (for the exact value)."""
    if second == "expect":
        return torch.sigmoid(params[4] + a) * (a - 1.0)  # b ~ Bernoulli(logits = mu + a), cost b (a - 1)
    return (params[4] + a - 1.0) ** 2 + 0.09  # u ~ Normal(mu + a, 0.3), cost (u - 1)^2


def _actions_exact(second, params):
    total = 0.0
    for x in ACTION_DATA:
        for seq in itertools.product(range(3), repeat=2):
            lp, prev, c = 0.0, None, 0.0
            for a in seq:
                lp = lp + torch.log_softmax(_action_logits(params, prev, x), -1)[a]
                c = c + _second_cost(second, params, torch.tensor(float(a), dtype=torch.float64))
                prev = float(a)
            total = total + lp.exp() * c / len(ACTION_DATA)
    return total


@pytest.mark.parametrize("second,per_step", [("reparameterization", False), ("reparameterization", True),
                                             ("expect", True)])
def test_discrete_and_continuous_action_per_step_on_a_data_plate(second, per_step):
    torch.manual_seed(8)
    est = storch.estimator("unordered_set", plate="a", n_samples=3)
    shared = storch.estimator(second, plate="u")
    with storch.Graph():
        leaf, p = replicate(ACTION_PARAMS, 3000)
        x = storch.denote_independent(ACTION_DATA, 0, "data")
        prev = None
        for t in range(2):
            a = est(Categorical(logits=_action_logits(p, prev, x))).double()
            node = storch.estimator(second, plate=f"u{t}") if per_step else shared
            if second == "expect":
                b = node(Bernoulli(logits=p[4] + a))
                storch.add_cost(b * (a - 1.0), name="r")
            else:
                u = node(Normal(p[4] + a, 0.3))
                storch.add_cost((u - 1.0) ** 2, name="r")
            prev = a
        assert a.plates[0].lineage.index_plates_of(0, 1)  # the beam chose parents per data point
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    exact_grad = torch.autograd.functional.jacobian(lambda q: _actions_exact(second, q), ACTION_PARAMS.clone())
    assert_unbiased(g, exact_grad, f"unordered_set actions with a {second} node per step")


def test_eos_accepts_a_saturated_bernoulli_step_under_unordered_set():
    """unordered_set passes each step through strict_support, which copies a Bernoulli with an infinite logit into
    storch's strict class: the eos check compared the classes and refused a binary sequence whenever one step
    saturated (review r-eighteen); the user's class is what it compares now."""
    b = torch.zeros(2, requires_grad=True)
    est = storch.estimator("unordered_set", plate="seq", eos=0, n_samples=4)
    with storch.Graph():
        est(Bernoulli(logits=b[0]))
        z = est(Bernoulli(logits=b[1].masked_fill(torch.tensor(True), float("inf"))))
        assert z.plates[0].step == 1
