"""Variational sequential Monte Carlo (VSMC / FIVO: Naesseth et al. 2018, Maddison et al. 2017), written as a user would.

A state-space model with S discrete states and V symbols: p(z_0) = softmax(pi), p(z_t | z_{t-1}) = softmax(A[z_{t-1}]),
p(x_t | z_t) = softmax(B[z_t])[x_t]. A particle filter with N particles and a learned proposal q(z_0 | x_0) =
softmax(w0 + U[:, x_0]), q(z_t | z_{t-1}, x_t) = softmax(W[z_{t-1}] + U[:, x_t]); weights w_t = p(z_t | z_{t-1})
p(x_t | z_t) / q(z_t | .); multinomial resampling a_t ~ Categorical(softmax(log w_{t-1})), one ancestor per particle,
then z[a]. The objective is log Z-hat = Σ_t log mean_n w_t^n; its negative is added per step.

The particle dim is an ordinary per-sample dim (N particles inside ONE sample: docs/plates.md), and the proposals and
the resampling are steps of one partition drawn by one estimator chosen by name (docs/partitions.md, "Draw the
transition with the policy's own estimator"). FIVO drops the resampling term: a plain draw from detached weights,
`Categorical(logits=logw.detach()).sample()`, the documented way to take no gradient through a draw
(docs/partitions.md, "Stochastic environments and options").

The oracle: with S = 2, T = 3, N = 2, E[log Z-hat] is a sum over every proposal draw and every ancestor draw
(4^3 x 4^2 paths), its gradient and Hessian by autograd; with the ancestor probabilities detached, the same sum
gives FIVO's expected gradient. Each estimate comes from an independent replicate of the parameters
(storch.testing.replicate), z-tested against the exact values.
"""

from __future__ import annotations

import gc
import itertools
import math
import warnings

import pytest
import torch
from torch.distributions import Categorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

from model_checks import assert_per_entry, lift

S, V, N = 2, 2, 2
SHAPES = (("w0", (S,)), ("W", (S, S)), ("U", (S, V)), ("pi", (S,)), ("A", (S, S)), ("B", (S, V)))
N_Q = S + S * S + S * V  # the first coordinates of theta are the proposal's (w0, W, U), the rest the model's
THETA = (1.5 * torch.randn(N_Q + S + S * S + S * V, generator=torch.Generator().manual_seed(5))).double()
X = (0, 1, 1)  # one observed sequence, T = 3


def unpack(theta: torch.Tensor) -> dict:
    out, i = {}, 0
    for name, shape in SHAPES:
        n = torch.Size(shape).numel()
        out[name] = theta[..., i:i + n].reshape(shape)
        i += n
    return out


def enumerated_log_z(theta: torch.Tensor, resampling_term: bool = True, xs=X) -> torch.Tensor:
    """E[log Z-hat] by enumerating every proposal draw and every ancestor draw, the paths batched along dim 0 (4 after
    the first step, then 16 times more per step). Without ``resampling_term`` the ancestor probabilities are
    detached: the value is the same, the gradient is FIVO's expected gradient."""
    P = unpack(theta)
    lpi, lA, lB = (torch.log_softmax(P[k], -1) for k in ("pi", "A", "B"))
    draws = torch.tensor(list(itertools.product(range(S), repeat=N)))  # (S^N, N): the N particles' proposal draws
    ancestors = torch.tensor(list(itertools.product(range(N), repeat=N)))  # (N^N, N)
    lq0 = torch.log_softmax(P["w0"] + P["U"][:, xs[0]], -1)
    z = draws
    log_path = lq0[z].sum(-1)  # log-probability of each path
    logw = lpi[z] + lB[z, xs[0]] - lq0[z]
    log_z = torch.logsumexp(logw, -1) - math.log(N)
    for t in range(1, len(xs)):
        l_res = torch.log_softmax(logw, -1)
        l_res = l_res if resampling_term else l_res.detach()
        n_a, n_z = len(ancestors), len(draws)
        a = ancestors[None, :, None].expand(len(z), n_a, n_z, N)  # path, ancestors, draws, particle
        zp = torch.gather(z[:, None, None].expand_as(a), -1, a)
        zn = draws[None, None].expand_as(a)
        lq = torch.log_softmax(P["W"][zp] + P["U"][:, xs[t]], -1).gather(-1, zn[..., None]).squeeze(-1)
        log_path = (log_path[:, None, None] + torch.gather(l_res[:, None, None].expand(a.shape), -1, a).sum(-1)
                    + lq.sum(-1)).flatten()
        logw = (lA[zp, zn] + lB[zn, xs[t]] - lq).flatten(0, 2)
        log_z = (log_z[:, None, None] + torch.logsumexp(lA[zp, zn] + lB[zn, xs[t]] - lq, -1) - math.log(N)).flatten()
        z = zn.flatten(0, 2)
    return (log_path.exp() * log_z).sum()


def exact_grad(resampling_term: bool = True) -> torch.Tensor:
    """The gradient of the expected cost, -E[log Z-hat]."""
    return torch.autograd.functional.jacobian(lambda th: -enumerated_log_z(th, resampling_term), THETA.clone())


RESAMPLE = {  # ways a user writes z = z[a] with the sampled ancestors a (N,) of the particles z (N,)
    "z[a]": lambda z, a: z[a],
    "z[..., a]": lambda z, a: z[..., a],
    "gather": lambda z, a: torch.gather(z, -1, a),
    "index_select": lambda z, a: z.index_select(0, a),
}


def particle_filter(est, theta, xs=X, fivo: bool = False, pick=RESAMPLE["z[a]"]) -> None:
    """The user's program for ONE sample: N particles as a per-sample dim; -log mean_n w_t^n added per step."""
    P = unpack(theta)
    lpi, lA, lB = (torch.log_softmax(P[k], -1) for k in ("pi", "A", "B"))
    q = Categorical(logits=(P["w0"] + P["U"][:, xs[0]]).expand(N, S))
    z = est(q)
    logw = lpi[z] + lB[z, xs[0]] - q.log_prob(z)
    storch.add_cost(math.log(N) - torch.logsumexp(logw, 0), name="log_Z")
    for t in range(1, len(xs)):
        if fivo:  # no gradient through the resampling (the documented plain draw from detached parameters)
            a = Categorical(logits=logw.detach().expand(N, N)).sample()
        else:
            a = est(Categorical(logits=logw.expand(N, N)))  # one ancestor per particle
        zp = pick(z, a)
        q = Categorical(logits=P["W"][zp] + P["U"][:, xs[t]])
        z = est(q)
        logw = lA[zp, z] + lB[z, xs[t]] - q.log_prob(z)
        storch.add_cost(math.log(N) - torch.logsumexp(logw, 0), name="log_Z")


def estimates(est, R: int, seed: int, order: int = 1, train: bool = False, **kw):
    torch.manual_seed(seed)
    with storch.Graph():
        leaf, theta = replicate(THETA, R)
        particle_filter(est, theta, **kw)
        if train:
            storch.backward()
            return None
        return per_replicate_derivatives(storch.surrogate_loss(order), leaf, order)


def test_enumeration_matches_a_plain_torch_particle_filter():
    """The oracle itself: 20000 runs of a particle filter written in plain batched torch, z-tested against it."""
    R = 20000
    P = unpack(THETA)
    lpi, lA, lB = (torch.log_softmax(P[k], -1) for k in ("pi", "A", "B"))
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(R)[:, None]
    lq0 = torch.log_softmax(P["w0"] + P["U"][:, X[0]], -1)
    z = torch.multinomial(lq0.exp(), R * N, replacement=True, generator=gen).view(R, N)
    logw = lpi[z] + lB[z, X[0]] - lq0[z]
    log_z = torch.logsumexp(logw, -1) - math.log(N)
    for t in range(1, len(X)):
        a = torch.multinomial(torch.softmax(logw, -1), N, replacement=True, generator=gen)
        zp = z[rows, a]
        lq = torch.log_softmax(P["W"][zp] + P["U"][:, X[t]], -1)  # (R, N, S)
        z = torch.multinomial(lq.exp().view(-1, S), 1, generator=gen).view(R, N)
        logw = lA[zp, z] + lB[z, X[t]] - lq.gather(-1, z[..., None]).squeeze(-1)
        log_z = log_z + torch.logsumexp(logw, -1) - math.log(N)
    assert_unbiased(log_z, enumerated_log_z(THETA), "plain torch particle filter")
    g = exact_grad()
    assert g[:N_Q].abs().max() > 0.1 and g[N_Q:].abs().max() > 0.1  # the proposal's and the model's gradients


def test_score_with_leave_one_out():
    est = storch.estimator("score", plate="smc", n_samples=4, baseline="leave_one_out")
    g, = estimates(est, 2000, seed=1)
    assert_unbiased(g, exact_grad(), "VSMC, score, leave-one-out")


def test_score_with_moving_averages_reduces_variance():
    est = storch.estimator("score", plate="smc", n_samples=1, baseline="moving_average")
    for seed in range(4):  # warm the averages up: one per step's cost
        estimates(est, 200, seed=100 + seed, train=True)
    assert len(est.moving_averages) == len(X)
    g, = estimates(est, 2000, seed=2)
    assert_unbiased(g, exact_grad(), "VSMC, score, moving average")
    g_none, = estimates(storch.estimator("score", plate="smc", n_samples=1), 2000, seed=3)
    assert_unbiased(g_none, exact_grad(), "VSMC, score, no baseline")
    assert g.var(0).sum() < 0.5 * g_none.var(0).sum()  # measured 0.20x


def test_score_hessian():
    est = storch.estimator("score", plate="smc", n_samples=4, baseline="leave_one_out")
    g, h = estimates(est, 2000, seed=4, order=2)
    assert_unbiased(g, exact_grad(), "VSMC order 2, gradient")
    hess = torch.autograd.functional.hessian(lambda th: -enumerated_log_z(th), THETA.clone())
    assert_unbiased(h.reshape(len(h), -1), hess.reshape(-1), "VSMC, Hessian")


def test_fivo_without_the_resampling_term_is_biased():
    """FIVO's gradient (resampling drawn from detached weights: no warning) is unbiased for FIVO's expected gradient
    and biased for the gradient of E[log Z-hat] (measured: up to 0.026 off, |z| = 5-8 at 4000 estimates over 6 seeds, 8000 here)."""
    est = storch.estimator("score", plate="smc", n_samples=4, baseline="leave_one_out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", storch.UntrackedDrawWarning)
        g, = estimates(est, 8000, seed=5, fivo=True)
    fivo, exact = exact_grad(resampling_term=False), exact_grad()
    assert (fivo - exact).abs().max() > 0.02
    assert 0.025 < ((fivo - exact).norm() / exact.norm()).item() < 0.035  # docs/partitions.md: 2.9% of the norm
    assert_unbiased(g, fivo, "FIVO against its own expected gradient")
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(g, exact, "FIVO against the gradient of E[log Z-hat]")


def test_resampling_from_weights_that_need_grad_warns():
    """Forgetting the detach in FIVO's plain draw is the scheduled-sampling mistake: storch warns."""
    est = storch.estimator("score", plate="smc", n_samples=2)
    with storch.Graph():
        theta = replicate(THETA, 3)[1]
        P = unpack(theta)
        z = est(Categorical(logits=P["w0"].expand(N, S)))
        logw = torch.log_softmax(P["B"], -1)[z, 0]
        with pytest.warns(storch.UntrackedDrawWarning, match="no gradient"):
            Categorical(logits=logw.expand(N, N)).sample()


@pytest.mark.parametrize("form", [f for f in RESAMPLE if f != "z[a]"])
def test_each_way_of_writing_the_resampling_gives_the_same_estimates(form):
    est = storch.estimator("score", plate="smc", n_samples=4, baseline="leave_one_out")
    want, = estimates(est, 200, seed=6)
    got, = estimates(est, 200, seed=6, pick=RESAMPLE[form])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("form", [
    lambda h, a: h[a], lambda h, a: torch.gather(h, 0, a[:, None].expand(4, 3)), lambda h, a: h.index_select(0, a),
    lambda h, a: h.mT[..., a], lambda h, a: h.mT[:, a], lambda h, a: torch.gather(h.mT, -1, a.expand(3, 4)),
    lambda h, a: h.mT.index_select(1, a), lambda h, a: torch.take_along_dim(h, a[:, None], 0),
])
def test_resampling_particle_states_per_sample(form):
    """Particle states h (N, D) (or particles on the last dim, h.mT (D, N)) resampled by sampled ancestors a (N,)
    on a sample and a data plate, and by a plain state table: per plate entry what torch gives for that entry."""
    gen = torch.Generator().manual_seed(7)
    a = lift(torch.randint(0, 4, (3, 2, 4), generator=gen))
    assert_per_entry(form, lift(torch.randn(3, 2, 4, 3, generator=gen)), a)
    table = torch.randn(4, 3, generator=gen)
    assert_per_entry(lambda a: form(table, a), a)


def test_several_sequences_on_a_data_plate():
    xs = torch.tensor([[0, 1, 1], [1, 1, 0]])
    grad = torch.autograd.functional.jacobian(
        lambda th: -sum(enumerated_log_z(th, xs=tuple(x.tolist())) for x in xs) / len(xs), THETA.clone())
    est = storch.estimator("unordered_set", plate="smc", n_samples=4)
    torch.manual_seed(8)
    with storch.Graph():
        leaf, theta = replicate(THETA, 2000)
        x = storch.denote_independent(xs, 0, "seq")
        particle_filter(est, theta, xs=[x[t] for t in range(len(X))])
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(g, grad, "VSMC, unordered_set, 2 sequences")


def test_a_training_step_leaves_no_garbage():
    theta = torch.nn.Parameter(THETA.clone())
    est = storch.estimator("score", plate="smc", n_samples=4, baseline="leave_one_out")
    for _ in range(2):
        gc.collect()
        with storch.Graph():
            particle_filter(est, theta)
            storch.backward()
        assert gc.collect() == 0
    assert theta.grad is not None and theta.grad.abs().max() > 0
