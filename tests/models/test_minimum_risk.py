"""Minimum risk training (MRT, Shen et al. 2016) of a GRU decoder, ported as an NMT user would.

MRT samples a set S of distinct sequences, renormalises Q(y) ∝ p(y)^α over S and minimises
Σ_{y∈S} Q(y) Δ(y, y*). The sampling is not differentiated: MRT's gradient is ∇ of that sum with the
set held fixed, which is *biased* for ∇E_p[Δ]. In storch it is the loss of a set drawn by
`unordered_set` (stochastic beam search: distinct sequences without replacement) from detached
logits, reduced over the plate by the user and added with `credit=False` (docs/partitions.md,
"Minimum risk training"). The unbiased estimators over the same sequences are `unordered_set` and
`sum_and_sample` with `buffer=` on the risk Δ itself.

The model: a GRU decoder, vocabulary 3, length 3 (27 sequences; with eos = 0, 15), started from a
source vector (the leaf of the derivatives: R replicates of it on an independent plate are R
independent estimates). Exact values: E_p[Δ] by enumerating the 27 sequences, and MRT's expected
loss Σ_S P(S) L(S) over every set of S sequences drawn without replacement (P(S) detached).
"""

import itertools
import math
import warnings

import pytest
import torch
from torch.distributions import Categorical

import storch
from step_checks import unreachable_after
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test

V, T, H, S, R = 3, 3, 4, 3, 2000
REF = (1, 2, 0)  # y*
SEQS = torch.tensor(list(itertools.product(range(V), repeat=T)))


def _model():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V + 1, H).double()  # token V: the start token
    cell = torch.nn.GRUCell(H, H).double()
    out = torch.nn.Linear(H, V).double()
    proj = torch.randn(H, 2, dtype=torch.float64)
    return emb, cell, out, proj


EMB, CELL, OUT, PROJ = _model()
SRC = torch.tensor([0.4, -0.7], dtype=torch.float64)


def risk(tokens):
    """Δ(y, y*) = 1 - token accuracy against the reference."""
    return 1 - sum((t == r).double() for t, r in zip(tokens, REF)) / T


DELTA = risk([SEQS[:, t] for t in range(T)])


def sequence_log_probs(src, eos=None, mask=None):
    """log p of each of the 27 sequences in plain torch (-inf: impossible)."""
    out = []
    for seq in SEQS.tolist():
        h, x, lp, done = torch.tanh(PROJ @ src), torch.tensor(V), torch.zeros((), dtype=torch.float64), False
        for t, tok in enumerate(seq):
            h = CELL(EMB(x), h)
            logits = OUT(h) if mask is None else OUT(h) + mask[t]
            if done:
                lp = lp + (0.0 if tok == eos else -math.inf)
            else:
                lp = lp + torch.log_softmax(logits, -1)[tok]
                done = eos is not None and tok == eos
            x = torch.tensor(tok)
        out.append(lp)
    return torch.stack(out)


def exact_risk(src, eos=None):
    return (sequence_log_probs(src, eos).exp() * DELTA).sum()


def exact_mrt(src, alpha=1.0, eos=None):
    """E_S[Σ_{y∈S} Q(y) Δ(y)] over sets of S distinct sequences drawn without replacement, P(S) detached."""
    lp = sequence_log_probs(src, eos)
    p = lp.detach().exp()
    combos = torch.tensor(list(itertools.combinations((p > 0).nonzero().flatten().tolist(), S)))
    p_set = torch.zeros(len(combos), dtype=torch.float64)
    for perm in itertools.permutations(range(S)):  # P(S): the sum over the orders it can be drawn in
        pr = p[combos[:, list(perm)]]
        p_set += (pr / (1 - (pr.cumsum(1) - pr))).prod(1)
    assert abs(float(p_set.sum()) - 1) < 1e-9
    return (p_set * (torch.softmax(alpha * lp[combos], 1) * DELTA[combos]).sum(1)).sum()


def mrt_loss(lp, cost, pad, alpha=1.0, plate="seq"):
    """The user's MRT loss over the sampled set: Q ∝ p^α renormalised over the set, one value per
    data point. The estimator's padding (``storch.padding``: a data point with fewer possible sequences
    than S repeats one at weight 0) is left out of Q. The raw values are read with storch.aligned, plate
    ``plate`` last (docs/partitions.md's recipe)."""
    (a, c, m), plates = storch.aligned(lp, cost, pad, plates=(..., plate))
    q = torch.softmax((alpha * a).masked_fill(m, -math.inf), -1)
    return storch.PlateTensor((q * c).sum(-1), plates[:-1])


def repeats(k):
    """By hand: the entries whose sequence (its code, raw, the plate last) repeats an earlier entry's (what
    docs/partitions.md's recipe compared before ``storch.padding``)."""
    return (k.unsqueeze(-1) == k.unsqueeze(-2)).tril(-1).any(-1)


def decode(est, src, eos=None, detach=False, mask=None, first=None):
    """Decode T tokens with one estimator call per step: (tokens, log p of the sequence).

    log p is the user's own sum of per-token log-probabilities: after eos a token's term is 0 (a live
    mask, docs/partitions.md), as the estimator's is."""
    h, x, lp, live, tokens = torch.tanh(src @ PROJ.T), torch.tensor(V), 0.0, None, []
    for t in range(T):
        h = CELL(EMB(x), h)
        logits = OUT(h) if mask is None else OUT(h) + mask[t]
        x = est(Categorical(logits=logits.detach() if detach else logits), **(first if first and t == 0 else {}))
        term = Categorical(logits=logits).log_prob(x)
        lp = lp + (term if live is None else torch.where(live, term, torch.zeros_like(term)))
        if eos is not None:
            live = (x != eos) if live is None else live & (x != eos)
        tokens.append(x)
    codes = sum(tok * V ** (T - 1 - j) for j, tok in enumerate(tokens))
    return tokens, lp, codes


def risk_estimates(name, seed, eos=None, order=1, first=None, **options):
    torch.manual_seed(seed)
    est = storch.estimator(name, plate="seq", eos=eos, **options)
    with storch.Graph():
        leaf, src = replicate(SRC, R)
        tokens, _, codes = decode(est, src, eos, first=first)
        storch.add_cost(risk(tokens), name="risk")
        return per_replicate_derivatives(storch.surrogate_loss(order), leaf, order), codes


def mrt_estimates(seed, alpha=1.0, eos=None):
    torch.manual_seed(seed)
    est = storch.estimator("unordered_set", plate="seq", n_samples=S, eos=eos)
    with storch.Graph():
        leaf, src = replicate(SRC, R)
        tokens, lp, codes = decode(est, src, eos, detach=True)
        storch.add_cost(mrt_loss(lp, risk(tokens), storch.padding(tokens[-1]), alpha), name="mrt", credit=False)
        return per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0], codes


def _grad(f):
    return torch.autograd.functional.jacobian(f, SRC)


@pytest.mark.parametrize("eos", [None, 0])
def test_unordered_set_is_unbiased_for_the_risk_gradient(eos):
    (g,), codes = risk_estimates("unordered_set", 1, eos, n_samples=S)
    assert_unbiased(g, _grad(lambda s: exact_risk(s, eos)), "∇E_p[Δ]")
    raw = codes.tensor.reshape(S, -1)
    assert all(len(set(col.tolist())) == S for col in raw.T)  # S distinct sequences per source


def test_unordered_set_without_baseline_is_unbiased_to_order_2():
    (g, hess), _ = risk_estimates("unordered_set", 2, order=2, n_samples=S, baseline=False)
    assert_unbiased(g, _grad(exact_risk), "∇E_p[Δ]")
    assert_unbiased(hess, torch.autograd.functional.hessian(exact_risk, SRC), "∇²E_p[Δ]")


def test_unordered_set_with_baseline_refuses_order_2():
    with pytest.raises(storch.OrderError):
        risk_estimates("unordered_set", 2, order=2, n_samples=S)


def test_sum_and_sample_sequences_are_unbiased_with_eos():
    # S = 2 remembered sequences summed + 3 samples; the buffer is keyed per source
    memory = torch.tensor([list(REF), [0, 0, 0]])
    first = {"memory_key": torch.arange(R)}
    (g,), _ = risk_estimates("sum_and_sample", 3, eos=0, first=first, buffer=2, n_enumerate=2, n_samples=S,
                             memory=memory, baseline="leave_one_out")
    assert_unbiased(g, _grad(lambda s: exact_risk(s, 0)), "∇E_p[Δ]")


def test_score_leave_one_out_is_unbiased_at_the_same_number_of_samples():
    (g,), _ = risk_estimates("score", 4, n_samples=S, baseline="leave_one_out")
    assert_unbiased(g, _grad(exact_risk), "∇E_p[Δ]")


@pytest.mark.parametrize("alpha,eos", [(1.0, None), (0.5, None), (1.0, 0)])
def test_mrt_matches_its_exact_expectation_and_is_biased_for_the_risk(alpha, eos):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe draws from detached logits: no UnusedSampleWarning
        g, codes = mrt_estimates(5, alpha, eos)
    g_mrt, g_risk = _grad(lambda s: exact_mrt(s, alpha, eos)), _grad(lambda s: exact_risk(s, eos))
    assert_unbiased(g, g_mrt, "E[∇ MRT]")
    # MRT is biased for ∇E_p[Δ]: the exact values differ by far more than the estimates' error
    assert not z_test(g, g_risk, "∇E_p[Δ]").ok
    assert float((g_mrt - g_risk).norm()) > 0.2 * float(g_risk.norm())
    raw = codes.tensor.reshape(S, -1)
    assert all(len(set(col.tolist())) == S for col in raw.T)


def test_mrt_as_a_per_entry_cost_on_the_plate_is_biased_for_the_risk():
    # Q(y)Δ(y) added per entry as an ordinary cost: each entry's cost reads the other entries (Q
    # normalises over them), which no estimator assumes (docs/plates.md "each entry's cost from that
    # entry alone"); the estimate is not ∇E_p[Δ] (measured z = 9)
    torch.manual_seed(6)
    est = storch.estimator("unordered_set", plate="seq", n_samples=S)
    with storch.Graph():
        leaf, src = replicate(SRC, R)
        tokens, lp, _ = decode(est, src)
        (a, c), plates = storch.aligned(lp, risk(tokens), plates=(..., "seq"))
        storch.add_cost(storch.PlateTensor(torch.softmax(a, -1) * c, plates), name="mrt")
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert not z_test(g, _grad(exact_risk), "∇E_p[Δ]").ok


def test_masked_tokens_and_tokens_after_eos_never_appear_and_padding_is_left_out_of_q():
    # two sources on a data plate: source 0 can end in only 2 sequences (token 2 masked at every step,
    # token 1 after the first), fewer than S; source 1 in any of the 15 (eos = 0)
    ninf = -math.inf
    mask0 = torch.tensor([[0.0, 0.0, ninf], [0.0, ninf, ninf], [0.0, ninf, ninf]], dtype=torch.float64)
    masks = torch.stack([mask0, torch.zeros(T, V, dtype=torch.float64)])  # (source, step, value)
    src = torch.stack([SRC, -SRC]).requires_grad_(True)
    est = storch.estimator("unordered_set", plate="seq", n_samples=S, eos=0)
    torch.manual_seed(7)
    with storch.Graph():
        s, m = storch.denote_independent((src, masks), 0, "data")
        tokens, lp, codes = decode(est, s, eos=0, detach=True, mask=[m[t] for t in range(T)])
        pad = storch.padding(tokens[-1])
        (by_storch, k), _ = storch.aligned(pad, codes, plates=("data", "seq"))
        assert torch.equal(by_storch, repeats(k))  # the padding is the repeats, nothing else
        assert by_storch.sum(-1).tolist() == [1, 0]  # source 0: 2 possible sequences in a set of 3
        assert all(pad.tensor.equal(storch.padding(tok).tensor) for tok in tokens)  # any step's value names the node
        loss = mrt_loss(lp, risk(tokens), pad)
        storch.add_cost(loss, name="mrt", credit=False)
        seqs = torch.stack(storch.aligned(*tokens, plates=("data", "seq"))[0], -1)  # (data, seq, T)
        raw_loss = loss.tensor
        storch.backward()
    for d, rows in enumerate(seqs.tolist()):
        for row in rows:
            after = row[row.index(0) + 1:] if 0 in row else []
            assert all(tok == 0 for tok in after), f"a token after eos in {row}"
            if d == 0:
                assert 2 not in row and 1 not in row[1:], f"a masked token in {row}"
    assert len({tuple(r) for r in seqs[0].tolist()}) == 2  # the whole support of source 0, padded with a repeat
    assert len({tuple(r) for r in seqs[1].tolist()}) == S
    # source 0's set is its whole support: its MRT loss is exact (padding counted twice would change it)
    lp0 = sequence_log_probs(SRC, eos=0, mask=mask0).detach()
    assert torch.allclose(raw_loss[0].detach(), (torch.softmax(lp0, 0) * DELTA).sum())
    assert src.grad is not None and torch.isfinite(src.grad).all()


def test_mrt_padding_under_storch_compile():
    # fixed-length sequences compile; the replay gives the eager step's loss and padding on the traced paths
    # (every child possible: no padding), and a masked call, whose set would be padded, is refused
    est = storch.estimator("unordered_set", plate="seq", n_samples=S)

    def step(src, mask):
        with storch.Graph():
            s, m = storch.denote_independent((src, mask), 0, "data")
            tokens, lp, _ = decode(est, s, detach=True, mask=[m[t] for t in range(T)])
            pad = storch.padding(tokens[-1])
            storch.add_cost(mrt_loss(lp, risk(tokens), pad), name="mrt", credit=False)
            return storch.surrogate_loss(), storch.aligned(pad, lp, plates=("data", "seq"))[0][0]

    compiled = storch.compile(step, backend=None)
    src, free = torch.stack([SRC, -SRC]).requires_grad_(True), torch.zeros(2, T, V, dtype=torch.float64)
    for seed in range(3):
        torch.manual_seed(seed)
        loss, pad = compiled(src, free)
        torch.manual_seed(seed)
        want_loss, want_pad = compiled.eager(src, free)
        assert torch.equal(pad, want_pad) and not pad.any()
        assert torch.allclose(loss, want_loss)
    assert compiled.traces == 1
    masked = free.clone()
    masked[0, :, 2] = -math.inf  # source 0: token 2 masked at every step
    masked[0, 1:, 1] = -math.inf  # and token 1 after the first: 2 possible sequences, fewer than S
    with pytest.raises(storch.AssumptionError, match="eagerly"):
        compiled(src, masked)


def test_padding_refuses_what_is_not_a_sample():
    est = storch.estimator("unordered_set", plate="seq", n_samples=S, eos=0)
    with storch.Graph():
        _, src = replicate(SRC, 2)
        tokens, lp, codes = decode(est, src, eos=0, detach=True)
        for bad in (codes, lp, tokens[0].tensor):
            with pytest.raises(storch.PlateError, match=r"storch.padding takes a sample.*storch.padding\(z\)"):
                storch.padding(bad)
        x = tokens[-1]
    with storch.Graph():  # a sample of another graph, which ended: refused as stale (the graph's own message)
        with pytest.raises(storch.PlateError, match="from a graph that was finished.*a stale tensor"):
            storch.padding(x)


def test_no_garbage_cycles_after_an_mrt_step():
    params = [*EMB.parameters(), *CELL.parameters(), *OUT.parameters()]
    opt = torch.optim.SGD(params, lr=0.0)
    est = storch.estimator("unordered_set", plate="seq", n_samples=S, eos=0)

    def step():
        with storch.Graph():
            _, src = replicate(SRC, 4)
            tokens, lp, _ = decode(est, src, eos=0, detach=True)
            storch.add_cost(mrt_loss(lp, risk(tokens), storch.padding(tokens[-1])), name="mrt", credit=False)
            opt.zero_grad()
            storch.backward()
            opt.step()

    # storch's garbage only (step_checks: torch.compile's own objects can become garbage during any step after
    # tests/models/test_compile.py in the same process)
    n, kinds = unreachable_after(step, warmups=1)
    assert n == 0, kinds
