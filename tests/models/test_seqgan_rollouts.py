"""SeqGAN's generator update (Yu et al., 2017) ported to storch: Monte-Carlo rollouts from every prefix.

A GRU generator draws y_0..y_{T-1} (V = 3 tokens, T = 3); a fixed discriminator D (a table of the 27 sequences)
scores the whole sequence. SeqGAN credits token t with Q(t), the mean of D over M continuations of the prefix
y_{0:t} sampled from the generator with no gradient through them: Σ_t Q(t) ∇log G(y_t | y_<t), unbiased for
∇E[D(y)]. Q(t) is a value (the expected final reward given the prefix), not a reward of step t, so what storch
computes depends on how it is written (docs/partitions.md, "Values estimated by rollouts"). Each form is z-tested
against its exact mean, by enumerating the 27 sequences: g_s = E[∇l_s D(y)] (l_s = log G(y_s | y_<s)) is step s's
part of ∇E[D] = Σ_s g_s.

- SeqGAN's term, ``Q(t) * log G(y_t | y_<t)`` added with ``credit=False``: ∇E[D];
- Q(t) - Q(t-1) as the cost of step t (causal credit telescopes it to D(y) - Q(s-1) from step s on): ∇E[D];
- Q(t) as the cost of step t: causal credit gives Σ_s ∇l_s Σ_{t>=s} Q(t), whose mean Σ_s (T - s) g_s is neither;
- rollouts drawn by storch estimators, D(rollout) the cost: each cost is differentiated through its rollout too,
  the gradient of Σ_t E[D] = T E[D];
- with ``eos=``, SeqGAN's term masked for finished sequences (``dist.log_prob`` reads the user's distribution,
  not the forced eos's log-probability 0): ∇E[D]; unmasked it is biased;
- rollouts drawn by storch under ``torch.no_grad()``: refused, and the message points at the recipe, where the
  distributions were built with grad; from distributions built under no_grad, as Q(t) as the cost of step t.
"""

import gc
import itertools

import pytest
import torch
from torch.distributions import Categorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test

V, T, H = 3, 3, 4
N, M = 2, 4  # sequences per data point, rollouts per prefix


def _problem():
    torch.manual_seed(0)
    emb, cell, out = torch.nn.Embedding(V, H), torch.nn.GRUCell(H, H), torch.nn.Linear(H, V)
    for m in (emb, cell, out):
        m.double()
    with torch.no_grad():  # sharper token distributions: gradients well above the estimates' noise
        out.weight.mul_(3)
        emb.weight.mul_(2)
    c = 2 * torch.randn(H, dtype=torch.float64)  # the initial state's input: the parameter the z-tests read
    table = 4 * torch.rand((V,) * T, dtype=torch.float64)  # the discriminator, fixed
    return emb, cell, out, c, table


EMB, CELL, OUT, C, TABLE = _problem()


def _step(y, h):
    return CELL(EMB(y), h)


def _d(tokens):
    return TABLE[tokens[0], tokens[1], tokens[2]]


def _exact(weights):
    """Σ_s weights[s] g_s by enumeration (weights (1, 1, 1): ∇E[D])."""

    def f(c):
        total = 0.0
        for seq in itertools.product(range(V), repeat=T):
            h, h_fixed, weighted, logp = torch.tanh(c), torch.tanh(c.detach()), 0.0, 0.0
            for s, y in enumerate(seq):
                weighted = weighted + weights[s] * torch.log_softmax(OUT(h), -1)[y]
                logp = logp + torch.log_softmax(OUT(h_fixed), -1)[y]
                h, h_fixed = _step(torch.tensor(y), h), _step(torch.tensor(y), h_fixed)
            total = total + logp.exp() * weighted * TABLE[seq]
        return total

    return torch.autograd.functional.jacobian(f, C)


def _rollout_value(tokens, h, y):
    """Q(t) in plain torch, outside storch: the mean of D over M continuations of each prefix, no gradient."""
    (*raw, state), on = storch.aligned(*tokens, h, plates=y.plates)  # raw, in y's plates
    with torch.no_grad():
        plates = state.shape[:-1]
        state = state.unsqueeze(0).expand(M, *state.shape).reshape(-1, H)
        seq = [x.unsqueeze(0).expand(M, *plates).reshape(-1) for x in raw]
        while len(seq) < T:
            seq.append(Categorical(logits=OUT(state)).sample())
            state = CELL(EMB(seq[-1]), state)
        value = TABLE[tuple(seq)].view(M, *plates).mean(0)
    return storch.PlateTensor(value, on)


def _estimates(form: str, replicates: int, seed: int = 1) -> torch.Tensor:
    """``replicates`` independent estimates of the gradient w.r.t. C, the generator step written in ``form``."""
    torch.manual_seed(seed)
    est = storch.estimator("score", plate="seq", n_samples=N)
    rollout_est = [storch.estimator("score", plate=f"roll{t}", n_samples=M) for t in range(T)]
    with storch.Graph():
        leaf, c = replicate(C, replicates)
        h, tokens, previous = torch.tanh(c), [], None
        for t in range(T):
            dist = Categorical(logits=OUT(h))
            y = est(dist)
            tokens.append(y)
            h = _step(y, h)
            last = t == T - 1
            if form in ("storch_rollouts", "no_grad_rollouts") and not last:
                state, continued = h, list(tokens)
                with torch.set_grad_enabled(form == "storch_rollouts"):
                    while len(continued) < T:
                        continued.append(rollout_est[t](Categorical(logits=OUT(state))))
                        state = _step(continued[-1], state)
                storch.add_cost(_d(continued), name="q")
                continue
            q = _d(tokens) if last else _rollout_value(tokens, h, y)
            if form == "seqgan":
                storch.add_cost(q * dist.log_prob(y), name="seqgan", credit=False)
            elif form == "telescoping":
                storch.add_cost(q if previous is None else q - previous, name="dq")
            else:
                storch.add_cost(q, name="q")
            previous = q
        (grad,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return grad


def _far_from(estimates, exact) -> float:
    """The largest |z| of the estimates' mean against a value they are not estimating."""
    return z_test(estimates, exact.reshape(-1), "other", 4.0, 1e-9).max_abs_z


@pytest.mark.parametrize("form", ["seqgan", "telescoping"])
def test_seqgan_forms_are_unbiased_for_the_exact_gradient(form):
    exact = _exact((1.0,) * T)
    assert float(exact.abs().max()) > 0.2
    # 20000 estimates: a gradient 15% off fails (|z| >= 4.5; at 4000 it passed, |z| 3.8)
    assert_unbiased(_estimates(form, 20000), exact.reshape(-1), form)


def _exact_hessian():
    """The Hessian of E[D] w.r.t. C, by enumeration."""

    def f(c):
        total = 0.0
        for seq in itertools.product(range(V), repeat=T):
            h, logp = torch.tanh(c), 0.0
            for y in seq:
                logp = logp + torch.log_softmax(OUT(h), -1)[y]
                h = _step(torch.tensor(y), h)
            total = total + logp.exp() * TABLE[seq]
        return total

    return torch.autograd.functional.hessian(f, C)


@pytest.mark.parametrize("form", ["seqgan", "telescoping"])
def test_only_the_telescoped_costs_give_the_hessian(form):
    """docs/partitions.md: SeqGAN's credit=False term is first order only (differentiated twice it lacks the score
    terms' cross products); the telescoped costs are credited, so storch's second derivative is unbiased."""
    torch.manual_seed(1)
    est = storch.estimator("score", plate="seq", n_samples=N)
    with storch.Graph():
        leaf, c = replicate(C, 4000)
        h, tokens, previous = torch.tanh(c), [], None
        for t in range(T):
            dist = Categorical(logits=OUT(h))
            y = est(dist)
            tokens.append(y)
            h = _step(y, h)
            q = _d(tokens) if t == T - 1 else _rollout_value(tokens, h, y)
            if form == "seqgan":
                storch.add_cost(q * dist.log_prob(y), name="seqgan", credit=False)
            else:
                storch.add_cost(q if previous is None else q - previous, name="dq")
            previous = q
        _, hessians = per_replicate_derivatives(storch.surrogate_loss(), leaf, 2)
    exact = _exact_hessian().reshape(-1)
    if form == "telescoping":
        assert_unbiased(hessians.reshape(len(hessians), -1), exact, "telescoped costs, Hessian")
    else:
        assert _far_from(hessians.reshape(len(hessians), -1), exact) > 8


@pytest.mark.parametrize("form", ["values", "no_grad_rollouts"])
def test_values_as_step_costs_get_reward_to_go_credit(form):
    # Σ_s ∇l_s Σ_{t>=s} Q(t): the mean is Σ_s (T - s) g_s, and at this size it is told from ∇E[D]. So is a
    # rollout drawn by storch from distributions built under no_grad (not refused: their parameters hold no
    # graph, as a fixed teacher's would): its cost D(rollout) is Q(t) with one continuation per rollout entry
    estimates = _estimates(form, 20000)
    assert_unbiased(estimates, _exact(tuple(float(T - s) for s in range(T))).reshape(-1), "values as costs")
    assert _far_from(estimates, _exact((1.0,) * T)) > 8


def test_rollouts_drawn_by_storch_are_differentiated():
    # each cost D(rollout) estimates E[D] and is differentiated through its rollout's draws too: ∇(T E[D])
    estimates = _estimates("storch_rollouts", 20000)
    assert_unbiased(estimates, T * _exact((1.0,) * T).reshape(-1), "storch rollouts")
    assert _far_from(estimates, _exact(tuple(float(T - s) for s in range(T)))) > 8


def test_rollouts_under_no_grad_are_refused_with_the_recipe():
    est = storch.estimator("score", plate="seq", n_samples=N)
    rollout_est = storch.estimator("score", plate="roll", n_samples=M)
    with storch.Graph():
        h = torch.tanh(C.clone().requires_grad_(True))
        y = est(Categorical(logits=OUT(h)))
        h = _step(y, h)
        tokens = [y]
        state = h
        while len(tokens) < T:
            dist = Categorical(logits=OUT(state))  # built with grad, drawn without: the node's gradient is lost
            with torch.no_grad():
                tokens.append(rollout_est(dist))
            state = _step(tokens[-1], state)
        storch.add_cost(_d(tokens), name="q")
        with pytest.raises(storch.StorchError, match=r"sampled under torch.no_grad\(\)(.|\n)*Values estimated by "
                                                     r"rollouts' in docs/partitions.md"):
            storch.surrogate_loss()


def test_a_step_leaves_nothing_to_the_cycle_collector():
    est = storch.estimator("score", plate="seq", n_samples=N)
    params = [C.clone().requires_grad_(True)]

    def step():
        with storch.Graph():
            h, tokens = torch.tanh(storch.denote_independent(params[0].expand(5, H), 0, "data")), []
            for t in range(T):
                dist = Categorical(logits=OUT(h))
                y = est(dist)
                tokens.append(y)
                h = _step(y, h)
                q = _d(tokens) if t == T - 1 else _rollout_value(tokens, h, y)
                storch.add_cost(q * dist.log_prob(y), name="seqgan", credit=False)
            storch.backward()

    step()
    gc.collect()
    step()
    assert gc.collect() == 0
    assert params[0].grad is not None and bool(torch.isfinite(params[0].grad).all())


def test_no_grad_rollout_costs_without_credit_leave_the_rollouts_out():
    # the refusal's credit=False, applied to the rollouts' costs: they have no gradient, and the generator's is
    # REINFORCE of the final D alone (computed here by hand from the same tokens)
    torch.manual_seed(2)
    est = storch.estimator("score", plate="seq", n_samples=6)
    rollout_est = [storch.estimator("score", plate=f"roll{t}", n_samples=M) for t in range(T)]
    c = C.clone().requires_grad_(True)
    with storch.Graph():
        h, tokens = torch.tanh(c), []
        for t in range(T):
            y = est(Categorical(logits=OUT(h)))
            tokens.append(y)
            h = _step(y, h)
            if t == T - 1:
                storch.add_cost(_d(tokens), name="d")
                break
            state, continued = h, list(tokens)
            while len(continued) < T:
                dist = Categorical(logits=OUT(state))
                with torch.no_grad():
                    continued.append(rollout_est[t](dist))
                state = _step(continued[-1], state)
            storch.add_cost(_d(continued), name="q", credit=False)
        (g_storch,) = torch.autograd.grad(storch.surrogate_loss(), c)
        seqs = torch.stack([x.tensor for x in tokens], -1)  # (6, T): sampling with replacement keeps entries
    h, logp = torch.tanh(c).expand(len(seqs), H), 0.0
    for t in range(T):
        logp = logp + torch.log_softmax(OUT(h), -1).gather(1, seqs[:, t:t + 1]).squeeze(1)
        h = CELL(EMB(seqs[:, t]), h)
    (g_hand,) = torch.autograd.grad((TABLE[tuple(seqs.T)] * logp).mean(), c)
    torch.testing.assert_close(g_storch, g_hand)


def test_compiled_seqgan_step_redraws_the_rollouts(forbid_storch):
    # storch.compile (replay, backend=None) of SeqGAN's step with plain-torch rollouts inside: after the trace no
    # storch code runs, and the replays draw fresh tokens and rollouts (a frozen Q would be biased): z-tested
    est = storch.estimator("score", plate="seq", n_samples=N)

    def step(copies):
        with storch.Graph():
            h, tokens = torch.tanh(storch.denote_independent(copies, 0, "replicate")), []
            for t in range(T):
                dist = Categorical(logits=OUT(h))
                y = est(dist)
                tokens.append(y)
                h = _step(y, h)
                q = _d(tokens) if t == T - 1 else _rollout_value(tokens, h, y)
                storch.add_cost(q * dist.log_prob(y), name="seqgan", credit=False)
            return storch.surrogate_loss()

    compiled, r, estimates = storch.compile(step, backend=None), 500, []
    torch.manual_seed(3)
    for i in range(8):
        leaf = C.expand(r, H).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(compiled(leaf), leaf)
        estimates.append(grad * r)
        if i == 0:
            forbid_storch()
    assert compiled.traces == 1
    assert_unbiased(torch.cat(estimates), _exact((1.0,) * T).reshape(-1), "compiled SeqGAN")


EOS = 0


def _exact_with_eos():
    """∇E[D] when token EOS ends a sequence (later tokens are EOS with probability 1), by enumeration."""

    def f(c):
        total = 0.0
        for seq in itertools.product(range(V), repeat=T):
            if any(a == EOS and b != EOS for a, b in zip(seq, seq[1:])):
                continue
            h, logp = torch.tanh(c), 0.0
            for s, y in enumerate(seq):
                if s == 0 or seq[s - 1] != EOS:
                    logp = logp + torch.log_softmax(OUT(h), -1)[y]
                h = _step(torch.tensor(y), h)
            total = total + logp.exp() * TABLE[seq]
        return total

    return torch.autograd.functional.jacobian(f, C)


def _rollout_value_with_eos(tokens, h, y):
    (*raw, state), on = storch.aligned(*tokens, h, plates=y.plates)  # raw, in y's plates
    with torch.no_grad():
        plates = state.shape[:-1]
        state = state.unsqueeze(0).expand(M, *state.shape).reshape(-1, H)
        seq = [x.unsqueeze(0).expand(M, *plates).reshape(-1) for x in raw]
        finished = torch.stack(seq).eq(EOS).any(0)
        while len(seq) < T:
            seq.append(torch.where(finished, EOS, Categorical(logits=OUT(state)).sample()))
            finished = finished | seq[-1].eq(EOS)
            state = CELL(EMB(seq[-1]), state)
        value = TABLE[tuple(seq)].view(M, *plates).mean(0)
    return storch.PlateTensor(value, on)


@pytest.mark.parametrize("masked", [True, False])
def test_seqgan_term_with_eos_needs_the_live_mask(masked):
    # with eos=, a finished sequence's later tokens are eos with log-probability 0 to the estimator, but
    # dist.log_prob(y) reads the distribution the user built: the term must be masked (|z| = 16 unmasked)
    est = storch.estimator("score", plate="seq", n_samples=N, eos=EOS)
    torch.manual_seed(4)
    with storch.Graph():
        leaf, c = replicate(C, 8000)
        h, tokens, live = torch.tanh(c), [], torch.ones((), dtype=torch.bool)
        for t in range(T):
            dist = Categorical(logits=OUT(h))
            y = est(dist)
            tokens.append(y)
            h = _step(y, h)
            q = _d(tokens) if t == T - 1 else _rollout_value_with_eos(tokens, h, y)
            term = q * dist.log_prob(y)
            if masked:
                term = torch.where(live, term, torch.zeros_like(term))
            storch.add_cost(term, name="seqgan", credit=False)
            live = live & (y != EOS)
        (estimates,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    exact = _exact_with_eos().reshape(-1)
    if masked:
        assert_unbiased(estimates, exact, "SeqGAN with eos, masked")
    else:
        assert _far_from(estimates, exact) > 8
