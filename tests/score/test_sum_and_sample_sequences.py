"""sum_and_sample (MAPO) on partitions: a buffer of the best sequences, kept across graphs.

An autoregressive model over vocabulary 3 and length 3 (27 sequences; with an end token, token 0,
the sequences can end after step 1 or 2): z-tests of the gradient and the Hessian against exact
enumeration (2000 seeded estimates each), for a seeded memory, a buffer filled by earlier graphs,
and a buffer larger than the slots summed per step (importance-sampled slot).
"""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from storch_score._sequences import _sample_match, _slot_match

torch.set_default_dtype(torch.float64)
R = 2000
_g = torch.Generator().manual_seed(0)
THETA = torch.randn(21, generator=_g) * 0.8  # logits of step 0 (3), step 1 given x0 (3x3), step 2 given x1
COST = torch.randn(27, generator=_g)  # an arbitrary cost per sequence (not separable)
STEP_COST = (torch.randn(3, generator=_g), torch.randn(9, generator=_g))  # costs at steps 0 and 1 (causal credit)


def _logits(th):
    return th[0:3], th[3:12].reshape(3, 3), th[12:21].reshape(3, 3)


def model(th, est, per_step=False, **call):
    """The same model code for every estimator: one call per token."""
    lg0, lg1, lg2 = _logits(th)
    x0 = est(Categorical(logits=lg0), **call)
    if per_step:  # a cost at step 0: credited to step 0 only (causal credit, the memory's 1-prefixes)
        storch.add_cost(F.one_hot(x0, 3).to(th.dtype) @ STEP_COST[0], name="step0")
    x1 = est(Categorical(logits=F.one_hot(x0, 3).to(th.dtype) @ lg1))
    if per_step:
        storch.add_cost(F.one_hot(x0 * 3 + x1, 9).to(th.dtype) @ STEP_COST[1], name="step1")
    x2 = est(Categorical(logits=F.one_hot(x1, 3).to(th.dtype) @ lg2))
    storch.add_cost(F.one_hot(x0 * 9 + x1 * 3 + x2, 27).to(th.dtype) @ COST)
    return x0, x1, x2


def sequences(eos):
    """The support: every sequence, with tokens after the end token equal to it."""
    out = []
    for s in itertools.product(range(3), repeat=3):
        if eos is not None and eos in s and any(v != eos for v in s[s.index(eos):]):
            continue
        out.append(s)
    return out


def exact(theta, eos=None, per_step=False):
    lg = _logits(theta)
    total = 0.0
    if per_step:
        p0 = torch.softmax(lg[0], -1)
        p1 = torch.softmax(lg[1], -1)
        if eos is not None:  # after the end token, the next token is the end token (probability 1)
            p1 = torch.cat([p1[:eos], torch.eye(3)[eos:eos + 1], p1[eos + 1:]], 0)
        total = total + p0 @ STEP_COST[0] + (p0.unsqueeze(-1) * p1).reshape(-1) @ STEP_COST[1]
    for s in sequences(eos):
        p = torch.softmax(lg[0], -1)[s[0]]
        for t in (1, 2):
            if eos is not None and s[t - 1] == eos:
                break  # finished: no more log-probabilities
            p = p * torch.softmax(lg[t][s[t - 1]], -1)[s[t]]
        total = total + p * COST[s[0] * 9 + s[1] * 3 + s[2]]
    return total


def estimate(est, order=2, warmup=0, replicates=R, per_step=False):
    """Per-replicate derivatives after ``warmup`` graphs that only fill the buffer (storch.backward())."""
    keys = torch.arange(replicates)  # one buffer per replicate (a data plate needs memory_key)
    for _ in range(warmup):
        leaf, th = replicate(THETA, replicates)
        model(th, est, per_step, memory_key=keys)
        storch.backward()
    with storch.Graph() as graph:
        leaf, th = replicate(THETA, replicates)
        toks = model(th, est, per_step, memory_key=keys)
        node = graph.nodes[0]
        loss = storch.surrogate_loss(order=order)
        out = per_replicate_derivatives(loss, leaf, order)
    return out, node, toks


CONFIGS = {
    "seeded+loo": (dict(buffer=3, n_samples=3, baseline="leave_one_out",
                        memory=torch.tensor([[1, 2, 0], [2, 2, 2], [1, 2, 0], [0, 0, 0]])), 0),
    "learned-buffer+loo": (dict(buffer=4, n_samples=2, baseline="leave_one_out"), 2),
    "buffer>slots": (dict(buffer=6, n_enumerate=2, n_samples=3), 3),
}


@pytest.mark.parametrize("eos", [None, 0], ids=["fixed-length", "eos"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_orders_1_and_2_against_enumeration(config, eos):
    options, warmup = CONFIGS[config]
    torch.manual_seed(11)
    est = storch.estimator("sum_and_sample", plate="seq", eos=eos, **options)
    (g, h), node, toks = estimate(est, warmup=warmup)
    t = THETA.clone().requires_grad_(True)
    want_g = torch.autograd.functional.jacobian(lambda th: exact(th, eos), t)
    want_h = torch.autograd.functional.hessian(lambda th: exact(th, eos), t)
    assert_unbiased(g, want_g, f"{config} eos={eos} gradient")
    assert_unbiased(h, want_h, f"{config} eos={eos} Hessian")
    _check_sets(node, toks, eos)


@pytest.mark.parametrize("eos", [None, 0], ids=["fixed-length", "eos"])
@pytest.mark.parametrize("config", ["learned-buffer+loo", "buffer>slots"])
def test_costs_at_every_step_causal_credit(config, eos):
    """Costs at steps 0, 1 and 2: each gets the memory of prefixes of its length (an eos prefix
    ends its sequence) and the cumulative gradient function of its step."""
    options, warmup = CONFIGS[config]
    torch.manual_seed(14)
    est = storch.estimator("sum_and_sample", plate="seq", eos=eos, **options)
    (g, h), node, toks = estimate(est, warmup=warmup, per_step=True)
    t = THETA.clone().requires_grad_(True)
    fn = lambda th: exact(th, eos, per_step=True)  # noqa: E731
    assert_unbiased(g, torch.autograd.functional.jacobian(fn, t), f"{config} eos={eos} per-step gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(fn, t), f"{config} eos={eos} per-step Hessian")


def _prefix_tables(c, length, eos):
    """The memory's ``length``-prefixes ``(K, P, L)`` (padded with the end token, 0 without one) and
    whether each exists (length >= L or ended by eos): the definition, L tokens compared at once."""
    mem = c.mem
    if mem.shape[-1] < length:
        pad = torch.full(mem.shape[:2] + (length - mem.shape[-1],), 0 if eos is None else eos, dtype=torch.long)
        mem = torch.cat([mem, pad], -1)
    ended = torch.zeros_like(c.mem_ok) if eos is None else (c.mem == eos).any(-1)
    return mem[:, :, :length], c.mem_ok & ((c.mem_len >= length) | ended)


def _check_sets(node, toks, eos):
    """Memory slots of one estimate are distinct sequences; accepted samples lie outside the memory;
    after the end token every token is the end token."""
    c = node.state
    s = c.n_slots
    seq = torch.stack([x.tensor for x in toks], -1).reshape(node.n, -1, 3)  # (N, R, 3)
    w = node.weight_values.detach().reshape(node.n, -1)
    assert s > 0
    slots = seq[:s]
    same = (slots.unsqueeze(0) == slots.unsqueeze(1)).all(-1)  # (S, S, R)
    live = c.slot_ok
    off_diag = ~torch.eye(s, dtype=torch.bool).unsqueeze(-1)
    assert not (same & off_diag & live.unsqueeze(0) & live.unsqueeze(1)).any()
    pre, ok = _prefix_tables(c, 3, eos)  # every buffered sequence as 3 tokens (eos-padded)
    mem_hit = (seq[s:].unsqueeze(1) == pre.unsqueeze(0)).all(-1) & ok.unsqueeze(0)
    accepted = w[s:] > 0
    assert accepted.any() and not (mem_hit.any(1) & accepted).any()
    assert (mem_hit.any(1) == ~accepted).all()
    if eos is not None:
        ended = torch.cumsum(seq == eos, -1) > 0
        assert (seq[ended] == eos).all()
        assert ended[..., 0].any()  # some sequences end after step 1


def test_buffer_keeps_the_best_sequences_found():
    """One key, fixed θ: after enough graphs every sequence was seen; the buffer holds the 3 cheapest."""
    torch.manual_seed(12)
    est = storch.estimator("mapo", plate="seq", buffer=3, n_samples=16)
    flat = torch.zeros(21)
    for _ in range(6):
        model(flat.clone().requires_grad_(True), est)
        storch.backward()
    book = est._buffer.sequences(0)
    best = sorted(range(27), key=lambda i: COST[i])[:3]
    want = {(i // 9, i // 3 % 3, i % 3) for i in best}
    assert {s for s, _, _ in book} == want
    for s, cost, _ in book:
        assert cost == pytest.approx(float(COST[s[0] * 9 + s[1] * 3 + s[2]]))
    # the buffer is state: it survives state_dict / load_state_dict
    other = storch.estimator("mapo", plate="seq", buffer=3, n_samples=16)
    other.load_state_dict(est.state_dict())
    assert {s for s, _, _ in other._buffer.sequences(0)} == want


def test_memory_keys_follow_the_data_points():
    """Two data points keyed 7 and 3: the slots hold each key's own seeded sequences, whatever the order."""
    torch.manual_seed(13)
    seeds = {7: torch.tensor([[2, 2, 2]]), 3: torch.tensor([[1, 0, 1]])}
    est = storch.estimator("mapo", plate="seq", buffer=2, n_samples=2, memory=seeds)
    for ids in ([7, 3], [3, 7]):
        with storch.Graph():
            th = storch.denote_independent(THETA.expand(2, 21), 0, "data")
            toks = model(th, est, memory_key=torch.tensor(ids))
            first = torch.stack([x.tensor[0] for x in toks], -1)  # slot 0 per data point
        for p, key in enumerate(ids):
            assert first[p].tolist() == seeds[key][0].tolist()


def test_sequence_errors():
    with pytest.raises(storch.OptionError, match=r"n_enumerate \(2\) >= buffer \(4\)"):
        storch.estimator("mapo", plate="s", buffer=4, n_enumerate=2, n_samples=2, baseline="leave_one_out")
    with pytest.raises(storch.OptionError, match="eos= is for sequences"):
        storch.estimator("mapo", plate="s", eos=0)
    with pytest.raises(storch.OptionError, match="more than buffer=1"):
        storch.estimator("mapo", plate="s", buffer=1, memory=torch.tensor([[0, 1], [1, 0]]))
    est = storch.estimator("mapo", plate="s", n_samples=2)
    with storch.Graph():
        z = est(Categorical(logits=torch.zeros(3)))
        with pytest.raises(storch.PlateError, match="needs buffer="):
            est(Categorical(logits=z.double().unsqueeze(-1) * torch.ones(3)))
    seq = storch.estimator("mapo", plate="t", buffer=2)
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match="one token per step"):
            seq(OneHotCategorical(logits=torch.zeros(2, 3)))  # two tokens in one call



@pytest.mark.parametrize("memory, sizes, token, step, n", [
    ([[0, 9]], (5, 5), 9, 1, 5),     # out of the vocabulary
    ([[0, -1]], (5, 5), -1, 1, 5),   # negative
    ([[3, 0]], (3, 3), 3, 0, 3),     # at the first step
    ([[4, 4]], (5, 3), 4, 1, 3),     # a step with fewer values than the first
], ids=["too-large", "negative", "first-step", "smaller-step"])
def test_memory_token_outside_the_support_names_the_sequence_and_step(memory, sizes, token, step, n):
    """A seeded memory with an out-of-vocabulary token crashed deep in torch ("index 9 is out of bounds for
    dimension 1 with size 5", indexing p's logits with the forced token), where the one-step estimator
    raises an OptionError. Now the sequence mode raises it too, naming the sequence, its key and the step.
    A token valid for its own step (steps of different sizes) is accepted."""
    est = storch.estimator("mapo", plate="s", buffer=2, memory=torch.tensor(memory), n_samples=2)
    with storch.Graph():
        with pytest.raises(storch.OptionError, match=(
                rf"a memory value is not in the support of the node's distribution: the memory sequence "
                rf"\[{memory[0][0]}, {memory[0][1]}\] \(memory_key 0\) has token {token} at step {step}, where the "
                rf"distribution of plate 's' has {n} values")):
            for k in sizes:
                est(Categorical(logits=torch.zeros(k)))
    grows = storch.estimator("mapo", plate="g", buffer=2, memory=torch.tensor([[1, 7]]), n_samples=2)
    with storch.Graph():  # 7 is one of the second step's 10 values
        toks = [grows(Categorical(logits=torch.zeros(k))) for k in (3, 10)]
        assert toks[1].tensor[0].item() == 7  # the memory slot


def test_buffer_with_a_data_plate_needs_memory_key():
    """Keyed by position, shuffled minibatches would hand each data point other data points'
    sequences (issue 20): with a data plate, the first call must name the data points."""
    est = storch.estimator("mapo", plate="seq", buffer=2, n_samples=2)
    with storch.Graph():
        th = storch.denote_independent(THETA.expand(4, 21), 0, "data")
        with pytest.raises(storch.OptionError, match=r"memory_key=batch_ids.*torch\.arange\(4\)"):
            model(th, est)
    with storch.Graph():  # with keys: one buffer per data point id, whatever the batch order
        th = storch.denote_independent(THETA.clone().requires_grad_(True).expand(4, 21), 0, "data")
        model(th, est, memory_key=torch.tensor([10, 11, 12, 13]))
        storch.backward()
    assert sorted(est._buffer.entries) == [10, 11, 12, 13]


def _one_hot_model(th, est, **call):
    lg0, lg1, lg2 = _logits(th)
    x0 = est(OneHotCategorical(logits=lg0), **call)
    x1 = est(OneHotCategorical(logits=x0 @ lg1))
    x2 = est(OneHotCategorical(logits=x1 @ lg2))
    idx = torch.arange(3, dtype=th.dtype)
    code = (x0 @ idx) * 9 + (x1 @ idx) * 3 + x2 @ idx
    storch.add_cost(F.one_hot(code.long(), 27).to(th.dtype) @ COST)
    return x0, x1, x2


@pytest.mark.parametrize("eos", [None, 0], ids=["fixed-length", "eos"])
def test_one_hot_tokens_give_the_categorical_estimate(eos):
    """OneHotCategorical tokens (as score and unordered_set accept) give, seed for seed, the
    estimate of the same model written with Categorical tokens."""
    options, warmup = CONFIGS["learned-buffer+loo"]
    grads = []
    for fn in (model, _one_hot_model):
        torch.manual_seed(21)
        est = storch.estimator("sum_and_sample", plate="seq", eos=eos, **options)
        keys = torch.arange(8)
        for _ in range(warmup + 1):
            with storch.Graph():
                leaf, th = replicate(THETA, 8)
                toks = fn(th, est, memory_key=keys)
                if fn is _one_hot_model:
                    assert toks[0].tensor.shape[-1] == 3 and ((toks[2].tensor == 0) | (toks[2].tensor == 1)).all()
                g, = torch.autograd.grad(storch.surrogate_loss(), leaf, retain_graph=True)
                storch.backward()  # fills the buffer
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def _offer_one_by_one(book: dict, capacity: int, seq: tuple, cost: float, logp: float) -> dict:
    """The buffer's offer as it was first written: insert, then rank and keep the best ``capacity``."""
    import math

    book[seq] = [cost, logp]
    if len(book) > capacity:
        ranked = sorted(book.items(), key=lambda kv: -math.inf if kv[1][0] is None else kv[1][0])
        book = dict(ranked[:capacity])
    return book


@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_buffer_shortcut_keeps_the_buffer_of_one_offer_at_a_time(capacity):
    """offer_many turns away a new sequence no better than the last of a full book in rank order
    without ranking; the book (its sequences, values and order) is the one the plain insert-and-rank
    gives, with ties, overwritten costs, seeds not yet evaluated and NaN costs."""
    import math
    import random

    from storch_score._sequences import SequenceBuffer

    rng = random.Random(capacity)
    buf = SequenceBuffer(capacity)
    ref: dict = {}
    buf.seed(0, [(0, 0)])
    ref[(0, 0)] = [None, None]
    for _ in range(60):
        items = [(tuple(rng.randrange(3) for _ in range(2)),
                  math.nan if rng.random() < 0.03 else float(rng.randrange(6)), rng.random()) for _ in range(8)]
        buf.offer_many(0, items)
        for item in items:
            ref = _offer_one_by_one(ref, capacity, *item)
        got = list(buf.entries[0].items())
        want = list(ref.items())
        assert [s for s, _ in got] == [s for s, _ in want]
        assert all(str(a) == str(b) for (_, a), (_, b) in zip(got, want))  # (NaN == NaN as text)
    assert buf.rejected > 0  # the shortcut was taken


def test_sequence_steps_take_the_fast_paths(monkeypatch):
    """In the first step's layout, with every slot used and no end token: no permutation, no padding
    slot, the OneHotCategorical's own Categorical; the prefix tables and w built once per graph and
    prefix length, however many read them (the surrogate, the baseline, the buffer update)."""
    from storch_score import _sequences

    built = []
    for name in ("_tables_at", "_weights"):
        def counted(*args, _f=getattr(_sequences, name), _name=name):
            built.append((_name, args[2] if _name == "_weights" else args[1]))  # (what, length)
            return _f(*args)
        monkeypatch.setattr(_sequences, name, counted)
    torch.manual_seed(22)
    est = storch.estimator("sum_and_sample", plate="seq", buffer=1, n_enumerate=1, n_samples=3,
                           baseline="leave_one_out")
    keys = torch.arange(4)
    for _ in range(2):  # the second graph has a buffered sequence for every key
        built.clear()
        with storch.Graph() as graph:
            th = storch.denote_independent(THETA.clone().requires_grad_(True).expand(4, 21), 0, "data")
            _one_hot_model(th, est, memory_key=keys)
            c = graph.nodes[0].state
            storch.backward()
    assert c.n_slots == 1 and c.slots_full and not c.any_imp
    assert list(c.orders.values()) == [([0, 1], None)]  # one layout, the first step's: nothing permuted
    # length 1: the w storch builds at the first call; length 3: the cost's (w read by the surrogate and the
    # baseline, the tables by both and by the buffer update), built once
    assert sorted(built) == [("_tables_at", 1), ("_tables_at", 3), ("_weights", 1), ("_weights", 3)]
    d = OneHotCategorical(logits=torch.zeros(2, 3))
    assert _sequences._tokens_of(d)[0] is d._categorical


class _Work(TorchDispatchMode):
    """The elements every tensor operation that is not a view reads: the work done, counted, not timed."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.elements += sum(a.numel() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [dict(buffer=4, n_enumerate=2, n_samples=3, eos=0),
                                     dict(buffer=2, n_samples=3, baseline="leave_one_out")],
                         ids=["importance-slot+eos", "loo"])
def test_a_long_episode_is_linear_in_its_steps(options):
    """Issue 19: the loop and the surrogate of a T-step episode with a cost per step do work linear in
    T. Each length's weights stacked the L tokens and compared every L-prefix of the memory and the
    slots anew, and every step with an end token stacked all earlier tokens: quadratic (T = 2000 took
    1.7 s in surrogate_loss, 0.36 s now). Prefix equality is now one cumulative AND over the steps."""
    pol, emb = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
    # a fixed memory (no storch.backward(): the buffer keeps it), shorter than the episodes: padding
    seeds = torch.tensor([[1, 2, 1, 2, 1], [2, 2, 2, 2, 2], [1, 1, 1, 0, 0], [2, 1, 0, 0, 0]])[:options["buffer"]]

    def work(steps):
        torch.manual_seed(3)
        est = storch.estimator("mapo", plate="ep", memory=seeds, **options)
        counter = _Work()
        with storch.Graph() as graph, counter:
            h = storch.denote_independent(torch.zeros(3, 4), 0, "batch")
            for t in range(steps):
                d = Categorical(logits=pol(h))
                a = est(d, memory_key=torch.arange(3)) if t == 0 else est(d)
                h = torch.tanh(h + emb(F.one_hot(a, 3).to(h.dtype)))
                storch.add_cost(h[..., 0], name="r")
            storch.surrogate_loss()
        return counter.elements, graph.nodes[0].state

    (w10, _), (w20, _), (w40, c) = work(10), work(20), work(40)
    # linear: the second 20 steps cost what the first 20 did past the first 10, twice (quadratic: 4 times)
    assert w40 - w20 <= 2.2 * (w20 - w10), (w10, w20, w40)
    # the cumulative prefix equality is the L-prefixes compared at once, at every length
    seq, s, eos = torch.stack(c.tokens, -1), c.n_slots, options.get("eos")
    assert len(c.tokens) == 40 and s == 2 and c.mem.shape[-1] == 5
    for length in range(1, 41):
        pre, _ = _prefix_tables(c, length, eos)
        assert torch.equal(_sample_match(c, length, eos), (seq[s:, :, :length].unsqueeze(1) == pre).all(-1))
        sp = pre.gather(0, c.slot.unsqueeze(-1).expand(-1, -1, length))
        assert torch.equal(_slot_match(c, length, eos), (sp.unsqueeze(1) == pre.unsqueeze(0)).all(-1))


def test_buffer_ranks_sequences_by_the_sum_of_per_step_costs_of_one_name():
    """Per-step costs under one name (the documented pattern) all count in the total the buffer stores:
    it kept only the cost of each name's last step, so (1, 1, 0) with two tokens costing 10 was stored
    at 0 and the buffer kept the wrong sequences (found by porting a seq2seq model)."""
    torch.manual_seed(0)
    theta = torch.zeros(3, 3, requires_grad=True)
    for same_name in (True, False):
        est = storch.estimator("sum_and_sample", plate="seq", buffer=8, n_samples=4)
        for _ in range(3):
            with storch.Graph():
                toks = []
                for t in range(3):
                    tok = est(Categorical(logits=theta[t]))
                    toks.append(tok)
                    storch.add_cost(10.0 * (tok == 1).float(), name="tok" if same_name else f"tok{t}")
                storch.add_cost((toks[-1] == 2).float(), name="final")
                storch.backward()
        entries = [(seq, c) for book in est.state_dict()["_extra_state"]["entries"].values()
                   for seq, (c, _) in book.items()]
        assert len(entries) >= 4
        for seq, stored in entries:
            assert stored == 10.0 * sum(x == 1 for x in seq) + (seq[-1] == 2), (same_name, seq, stored)


# -- noise drawn per plate entry between the steps (a stochastic environment, dropout in a decoder) --
NOISY_THETA = torch.tensor([0.3, -0.2, 0.5, -0.5, -1.0, 1.0])  # step-0 logits; step-1 logits per environment outcome
NOISY_COST = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # c(x0, x1)


def _noisy_model(th, est, shift, **call):
    x0 = est(Categorical(logits=th[..., 0:2]), **call)
    # the environment's transition: a fair coin per plate entry, so every slot and every sample has its own
    e = (torch.rand_like(x0.to(th.dtype)) > 0.5).long()
    lg1 = th[..., 2:6].reshape(th.shape[:-1] + (2, 2))
    lg1 = (F.one_hot(e, 2).to(th.dtype).unsqueeze(-1) * lg1).sum(-2) * (1 + x0).to(th.dtype).unsqueeze(-1)
    x1 = est(Categorical(logits=lg1))
    storch.add_cost(NOISY_COST[x0, x1] + shift, name="c")


def _noisy_exact(th, shift):
    p0, total = torch.softmax(th[0:2], -1), 0.0
    for x0 in range(2):
        for e in range(2):
            p1 = torch.softmax(th[2 + 2 * e:4 + 2 * e] * (1 + x0), -1)
            total = total + p0[x0] * 0.5 * (p1 * (NOISY_COST[x0] + shift)).sum()
    return total


@pytest.mark.parametrize("shift", [0.0, 20.0])
def test_leave_one_out_with_noise_drawn_per_plate_entry_between_the_steps(shift):
    """The step-1 distribution depends on noise drawn per plate entry: each memory slot's p(a) is
    evaluated under its own draw, so Σ_slots p(a) is not the samples' p(M). The baseline built on
    ∇log p(x ∉ M) from the slots was not zero-mean (gradient |z| ~10 over 2000 estimates, moved by a
    constant added to the cost); the one that pairs the slots' and the samples' scores is."""
    torch.manual_seed(21)
    est = storch.estimator("mapo", plate="s", buffer=2, n_samples=3, baseline="leave_one_out")
    keys = torch.arange(R)
    for _ in range(2):  # fill the buffers
        _, th = replicate(NOISY_THETA, R)
        _noisy_model(th, est, shift, memory_key=keys)
        storch.backward()
    with storch.Graph():
        leaf, th = replicate(NOISY_THETA, R)
        _noisy_model(th, est, shift, memory_key=keys)
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    t = NOISY_THETA.clone().requires_grad_(True)
    fn = lambda th: _noisy_exact(th, shift)  # noqa: E731
    assert_unbiased(g, torch.autograd.functional.jacobian(fn, t), f"shift {shift} gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(fn, t), f"shift {shift} Hessian")


def _keyed_steps(est, batches):
    """One graph per batch of memory keys, each followed by storch.backward() (which fills the buffer)."""
    theta = THETA.clone().requires_grad_(True)
    for ids in batches:
        with storch.Graph():
            th = storch.denote_independent(theta.expand(len(ids), 21), 0, "data")
            model(th, est, memory_key=torch.tensor(ids))
            storch.backward()


@pytest.mark.parametrize("fresh", [True, False])
def test_buffer_warns_once_when_no_memory_key_ever_comes_again(fresh):
    """A routing user keyed every step's new instances afresh: the buffer grew by every key's sequences and was
    never read (each step ran with an empty memory). Past FRESH_KEYS_WARNING keys none of which came again,
    one RuntimeWarning names the estimators to use instead; keys that repeat (dataset indices) never warn."""
    from storch_score._sequences import FRESH_KEYS_WARNING
    torch.manual_seed(0)
    est = storch.estimator("mapo", plate="seq", buffer=2, n_samples=2)
    half = FRESH_KEYS_WARNING // 2
    first = [list(range(i * half, (i + 1) * half)) for i in range(2)]  # FRESH_KEYS_WARNING keys, none met again
    _keyed_steps(est, first)
    assert len(est._buffer.entries) == FRESH_KEYS_WARNING
    later = [list(range(2 * half, 2 * half + 8)), list(range(2 * half + 8, 2 * half + 16))] if fresh else first[:1] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _keyed_steps(est, later)
    ours = [w for w in caught if "memory_key" in str(w.message)]
    if not fresh:
        assert not ours, [str(w.message) for w in ours]
        return
    assert len(ours) == 1, [str(w.message) for w in ours]  # once, not at every step
    message = str(ours[0].message)
    assert ours[0].category is RuntimeWarning and ours[0].filename == __file__
    assert f"{FRESH_KEYS_WARNING} memory keys" in message and "unordered_set" in message and "repeats" in message


@pytest.mark.parametrize("met", [False, True])
def test_a_resumed_buffer_keeps_whether_a_key_came_again(met):
    """state_dict round trip: a run of fresh keys saved and resumed in a new estimator still warns when more fresh
    keys come (int15 read every loaded buffer as having met its keys, so a resumed routing run never warned); a run
    that had met a key again does not."""
    from storch_score._sequences import FRESH_KEYS_WARNING
    torch.manual_seed(0)
    est = storch.estimator("mapo", plate="seq", buffer=2, n_samples=2)
    half = FRESH_KEYS_WARNING // 2
    batches = [list(range(i * half, (i + 1) * half)) for i in range(2)]
    _keyed_steps(est, batches + (batches[:1] if met else []))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = storch.estimator("mapo", plate="seq", buffer=2, n_samples=2)
        resumed.load_state_dict(est.state_dict())
        assert len(resumed._buffer.entries) == FRESH_KEYS_WARNING
        _keyed_steps(resumed, [list(range(2 * half, 2 * half + 8))])
    ours = [w for w in caught if "memory_key" in str(w.message)]
    assert len(ours) == (0 if met else 1), [str(w.message) for w in ours]
