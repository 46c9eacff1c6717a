"""A switching linear dynamical system (SLDS), written for one sequence as a user of storch would.

The model, K = 2 regimes, T = 3 steps, a state z and observations x of 2 numbers each (z_{-1} = 0):
s_0 ~ Cat(softmax(pi)), s_t ~ Cat(softmax(Tr[s_{t-1}] (+ Rp z_{t-1}: recurrent))), z_t ~ N(A[s_t] z_{t-1} + b[s_t],
diag(sigma^2)), x_t ~ N(C z_t, diag(tau^2)). Variational inference with an amortised q: the switch
q(s_t | s_{t-1}, x_t (, z_{t-1})) = softmax(Wq[s_{t-1}] + Uq x_t + dq[t] (+ Vq z_{t-1})) (dq a per-step bias), drawn by a
score-family (or relaxed) estimator, and the state q(z_t | s_t, z_{t-1}, x_t) = N(Aq[s_t] z_{t-1} + Bq[s_t] x_t + cq[s_t],
diag(exp(2 lsq[s_t]))) reparameterised: the sampled index s_t selects the matrix Aq[s_t] (and the model's A[s_t]) that
multiplies the reparameterised z_{t-1}. Both are drawn in one Python loop, the negative ELBO added per step,
c_t = log q(s_t | .) + log q(z_t | .) - log p(s_t | .) - log p(z_t | .) - log p(x_t | z_t).

Two estimators called once a step make two partitions interleaved step by step (docs/partitions.md): z_t reads s_t,
whose partition started first, so one estimator each works where q(s_t) does not read z (and `expect`, which has no
partitions, needs one estimator per step for both). Where q(s_t) reads z_{t-1} (the recurrent form) each sequence
feeds the other: one estimator each is refused, one per step for both works.

The oracles: without the recurrence, E_q[c] is exact, the 8 regime sequences enumerated and, given them, q(z) a
linear-Gaussian chain (its means and covariances, the expected log densities of quadratic forms in closed form); its
gradient and Hessian by autograd. With it, q(s_t) depends on z_{t-1}: a reference with its own standard error, M
i.i.d. reparameterised noises with the regime sequences enumerated given each (checked against the closed form
without the recurrence). Each estimate comes from an independent replicate of the parameters
(storch.testing.replicate), z-tested. Also: a data plate of several sequences, causal credit (a cost at step t is not
credited to later switches: storch's gradient of each step's bias equals reward-to-go REINFORCE written from the same
draws, exactly), and storch.compile of the step (it failed under ``backend="aot_eager"`` before the sampled regimes
were laid out contiguously: storch.distributions.raw_sample).
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributions import Categorical, Independent, Normal, OneHotCategorical

import storch
from model_checks import assert_same_step, layout, step_value_and_grads, train_exact
from storch.testing import UnbiasednessReport, assert_unbiased, per_replicate_derivatives, replicate

K, T, D, O = 2, 3, 2, 2  # regimes, steps, state size, observation size
SHAPES = (("wq0", (K,)), ("Wq", (K, K)), ("Uq", (K, O)), ("dq", (T, K)), ("Vq", (K, D)), ("Aq", (K, D, D)),
          ("Bq", (K, D, O)), ("cq", (K, D)), ("lsq", (K, D)),  # q's
          ("pi", (K,)), ("Tr", (K, K)), ("Rp", (K, D)), ("A", (K, D, D)), ("b", (K, D)), ("lsig", (D,)),
          ("C", (O, D)), ("ltau", (O,)))  # the model's
SIZES = [torch.Size(shape).numel() for _, shape in SHAPES]
N_Q = sum(SIZES[:9])  # the first coordinates of theta are q's, the rest the model's
_gen = torch.Generator().manual_seed(0)
THETA = (0.5 * torch.randn(sum(SIZES), generator=_gen)).double()
X = torch.randn(T, O, generator=_gen).double()  # one observed sequence
XS = torch.randn(3, T, O, generator=_gen).double()  # three, for the data plate
SEQS = torch.tensor(list(itertools.product(range(K), repeat=T)))  # the 8 regime sequences, (8, T)
RECURRENT = {"Vq", "Rp"}  # read only by the recurrent form


def unpack(theta: torch.Tensor, lead: tuple = ()) -> dict:
    """The parameters as tables; ``lead`` the leading dims of a plain batch of them (the reference)."""
    out, i = {}, 0
    for (name, shape), n in zip(SHAPES, SIZES):
        out[name] = theta[..., i:i + n].reshape(*lead, *shape)
        i += n
    return out


def _coordinates(names) -> torch.Tensor:
    """A mask of theta's coordinates that belong to the tables ``names``."""
    return torch.cat([torch.full((n,), name in names) for (name, _), n in zip(SHAPES, SIZES)])


# -- the user's model ----------------------------------------------------------------------------------------


def _at(est, t):
    return est[t] if isinstance(est, list) else est


def slds(est_s, est_z, theta, x, recurrent=False, one_hot=False, per_step=True, record=None) -> None:
    """The negative ELBO of one sequence ``x`` (T, O), written for one sample. ``est_s``, ``est_z``: an estimator
    (a partition over the steps) or a list of one per step. ``one_hot``: the switch is a OneHotCategorical (the
    relaxed family's) and selects the tables by its weights. ``record``: a dict that gets each step's switch
    score (∂ log q(s_t) / ∂ dq[t]) and cost (the causal-credit test)."""
    P = unpack(theta)

    def pick(table, s):  # table[s]: the regime's row, by an index or by one-hot weights
        return (s.reshape(K, *[1] * (table.dim() - 1)) * table).sum(0) if one_hot else table[s]

    s_prev, z_prev, total = None, torch.zeros(D, dtype=theta.dtype), 0.0
    for t in range(T):
        q_logits = (P["wq0"] if t == 0 else pick(P["Wq"], s_prev)) + P["Uq"] @ x[t] + P["dq"][t]
        p_logits = P["pi"] if t == 0 else pick(P["Tr"], s_prev)
        if recurrent and t > 0:
            q_logits = q_logits + P["Vq"] @ z_prev
            p_logits = p_logits + P["Rp"] @ z_prev
        qs = (OneHotCategorical if one_hot else Categorical)(logits=q_logits)
        s = _at(est_s, t)(qs)
        qz = Independent(Normal(pick(P["Aq"], s) @ z_prev + pick(P["Bq"], s) @ x[t] + pick(P["cq"], s),
                                pick(P["lsq"], s).exp()), 1)
        z = _at(est_z, t)(qz)
        pz = Independent(Normal(pick(P["A"], s) @ z_prev + pick(P["b"], s), P["lsig"].exp()), 1)
        px = Independent(Normal(P["C"] @ z, P["ltau"].exp()), 1)
        log_qs = (qs.logits * s).sum(-1) if one_hot else qs.log_prob(s)
        log_ps = (p_logits.log_softmax(-1) * s).sum(-1) if one_hot else p_logits.log_softmax(-1)[s]
        cost = log_qs + qz.log_prob(z) - log_ps - pz.log_prob(z) - px.log_prob(x[t])
        if per_step:
            storch.add_cost(cost, name="neg_elbo")
        else:
            total = total + cost
        if record is not None:
            record.setdefault("score", []).append(F.one_hot(s, K) - qs.probs)
            record.setdefault("cost", []).append(cost)
        s_prev, z_prev = s, z
    if not per_step:
        storch.add_cost(total, name="neg_elbo")


# -- the oracles ---------------------------------------------------------------------------------------------


def _expected_log_normal(r_mean, r_cov, log_scale):
    """E log N(r; 0, diag(exp(2 log_scale))) for r ~ N(r_mean, r_cov)."""
    return (-0.5 * math.log(2 * math.pi) - log_scale
            - 0.5 * (r_mean ** 2 + r_cov.diagonal()) / (2 * log_scale).exp()).sum()


def exact_neg_elbo(theta: torch.Tensor, x: torch.Tensor = X) -> torch.Tensor:
    """E_q[Σ_t c_t] without the recurrence: the regime sequences enumerated; given them q(z) is a linear-Gaussian
    chain z_t = F_t z_{t-1} + g_t + sd_t ε_t, whose mean m and covariance S give every expectation in closed form."""
    P = unpack(theta)
    total = torch.zeros((), dtype=theta.dtype)
    for seq in SEQS.tolist():
        log_q, f = 0.0, 0.0
        m, S = torch.zeros(D, dtype=theta.dtype), torch.zeros(D, D, dtype=theta.dtype)  # of z_{t-1}
        for t, s in enumerate(seq):
            q_logits = (P["wq0"] if t == 0 else P["Wq"][seq[t - 1]]) + P["Uq"] @ x[t] + P["dq"][t]
            log_qs = q_logits.log_softmax(-1)[s]
            log_ps = (P["pi"] if t == 0 else P["Tr"][seq[t - 1]]).log_softmax(-1)[s]
            Fq, g, var = P["Aq"][s], P["Bq"][s] @ x[t] + P["cq"][s], torch.diag((2 * P["lsq"][s]).exp())
            m_t, S_t = Fq @ m + g, Fq @ S @ Fq.T + var
            e_log_qz = -0.5 * D * (math.log(2 * math.pi) + 1) - P["lsq"][s].sum()  # minus a Gaussian's entropy
            G = Fq - P["A"][s]  # z_t - A z_{t-1} - b = G z_{t-1} + g - b + sd ε_t
            e_log_pz = _expected_log_normal(G @ m + g - P["b"][s], G @ S @ G.T + var, P["lsig"])
            e_log_px = _expected_log_normal(x[t] - P["C"] @ m_t, P["C"] @ S_t @ P["C"].T, P["ltau"])
            log_q = log_q + log_qs
            f = f + log_qs + e_log_qz - log_ps - e_log_pz - e_log_px
            m, S = m_t, S_t
        total = total + log_q.exp() * f
    return total


def exact_grad(x: torch.Tensor = X) -> torch.Tensor:
    return torch.func.grad(exact_neg_elbo)(THETA, x)


@functools.lru_cache(maxsize=None)
def reference(recurrent: bool, M: int = 40000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, gradients)`` of M i.i.d. estimates of E_q[Σ_t c_t] on ``X``, the regime sequences enumerated
    given a reparameterised noise ε (T x D): Σ_s Π_t q(s_t | s_{t-1}, z_{t-1}) f(s, z), with z_t = mean_t + sd_t ε_t
    along each regime sequence s. Plain batched torch: dims (M noises, 8 sequences, ...)."""
    eps = torch.randn(M, 1, T, D, generator=torch.Generator().manual_seed(seed), dtype=THETA.dtype)
    leaf = THETA.expand(M, -1).clone().requires_grad_(True)
    P = unpack(leaf, (M,))
    n = len(SEQS)
    rows = torch.arange(n)

    def mv(matrix, v):
        return (matrix @ v.unsqueeze(-1)).squeeze(-1)

    z_prev = torch.zeros(M, n, D, dtype=THETA.dtype)
    log_q, f = 0.0, 0.0
    for t in range(T):
        s, xt = SEQS[:, t], X[t]
        if t == 0:
            q_logits, p_logits = P["wq0"][:, None], P["pi"][:, None]
        else:
            q_logits, p_logits = P["Wq"][:, SEQS[:, t - 1]], P["Tr"][:, SEQS[:, t - 1]]
        q_logits = q_logits + (P["Uq"] @ xt)[:, None] + P["dq"][:, None, t]
        if recurrent and t > 0:
            q_logits = q_logits + mv(P["Vq"][:, None], z_prev)
            p_logits = p_logits + mv(P["Rp"][:, None], z_prev)
        log_qs = q_logits.expand(M, n, K).log_softmax(-1)[:, rows, s]
        log_ps = p_logits.expand(M, n, K).log_softmax(-1)[:, rows, s]
        mean = mv(P["Aq"][:, s], z_prev) + P["Bq"][:, s] @ xt + P["cq"][:, s]
        sd = P["lsq"][:, s].exp()
        z = mean + sd * eps[:, :, t]
        log_qz = Normal(mean, sd).log_prob(z).sum(-1)
        log_pz = Normal(mv(P["A"][:, s], z_prev) + P["b"][:, s], P["lsig"].exp()[:, None]).log_prob(z).sum(-1)
        log_px = Normal(mv(P["C"][:, None], z), P["ltau"].exp()[:, None]).log_prob(xt).sum(-1)
        log_q = log_q + log_qs
        f = f + log_qs + log_qz - log_ps - log_pz - log_px
        z_prev = z
    value = (log_q.exp() * f).sum(1)
    grad, = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad


def assert_matches_reference(estimates: torch.Tensor, ref: torch.Tensor, name: str, atol: float = 1e-9) -> None:
    """z-test two independent sets of i.i.d. estimates (dim 0) of the same values: |mean - mean_ref| < 4 standard
    errors of the difference; components with no variance in either must be equal to ``atol``."""
    mean, mean_ref = estimates.mean(0), ref.mean(0)
    stderr = (estimates.var(0) / len(estimates) + ref.var(0) / len(ref)).sqrt()
    gap = mean - mean_ref
    tiny = stderr <= atol * (1 + mean_ref.abs())
    z = torch.where(tiny, torch.where(gap.abs() > atol * (1 + mean_ref.abs()), math.inf, 0.0), gap / stderr.clamp_min(1e-300))
    report = UnbiasednessReport(name, mean, stderr, mean_ref, z, len(estimates), 4.0)
    assert report.ok, "estimates differ from the reference:\n" + report.table()


# -- tests ---------------------------------------------------------------------------------------------------


def _partitions(name):
    """The switch's estimator and the state's: one each (partitions over the steps), or one per step for both
    (``expect`` has no partitions, and a partition of z would then depend on switches drawn after it started)."""
    if name == "expect":
        return ([storch.estimator("expect", plate=f"s{t}") for t in range(T)],
                [storch.estimator("reparameterization", plate=f"z{t}") for t in range(T)])
    if name == "score":
        s = storch.estimator("score", plate="s", n_samples=4, baseline="leave_one_out")
    elif name == "score per step":
        s = [storch.estimator("score", plate=f"s{t}", n_samples=2, baseline="leave_one_out") for t in range(T)]
        return s, [storch.estimator("reparameterization", plate=f"z{t}") for t in range(T)]
    else:
        s = storch.estimator("unordered_set", plate="s", n_samples=3)
    return s, storch.estimator("reparameterization", plate="z")


def estimates(name, R, seed, order=1, x=X, data=False, recurrent=False, one_hot=False, ests=None):
    """R independent estimates (one per replicate of theta) of the derivatives up to ``order``."""
    torch.manual_seed(seed)
    est_s, est_z = ests if ests is not None else _partitions(name)
    with storch.Graph():
        leaf, theta = replicate(THETA, R)
        if data:  # the sequences on a data plate: x is a plate tensor, (T, O) per data point
            x = storch.denote_independent(XS, 0, "data")
        slds(est_s, est_z, theta, x, recurrent=recurrent, one_hot=one_hot)
        return per_replicate_derivatives(storch.surrogate_loss(order), leaf, order)


def test_the_closed_form_agrees_with_the_reparameterised_reference():
    # the oracles check each other without the recurrence (value and gradient), and the recurrence changes the
    # expected cost (the recurrent tests below are not the same test)
    values, grads = reference(False)
    exact = exact_neg_elbo(THETA)
    assert_unbiased(values, exact, "reference value")
    g = exact_grad()
    assert_unbiased(grads, g, "reference gradient")
    assert g[:N_Q].abs().max() > 0.1 and g[N_Q:].abs().max() > 0.1  # q's and the model's gradients both non-trivial
    torch.testing.assert_close(g[_coordinates(RECURRENT)], torch.zeros(8, dtype=g.dtype))
    values_r, grads_r = reference(True)
    assert abs(float(values_r.mean() - exact)) > 20 * float(values_r.std()) / len(values_r) ** 0.5
    assert grads_r[:, _coordinates(RECURRENT)].mean(0).abs().max() > 0.1


@pytest.mark.parametrize("name", ["score", "unordered_set", "expect"])
def test_switch_estimator_with_a_reparameterised_state_is_unbiased(name):
    """score + leave-one-out and unordered_set (stochastic beam search: the states of earlier steps follow the
    surviving prefixes) as partitions beside a reparameterised partition of z; expect one estimator per step."""
    g, = estimates(name, 4000, seed=1)
    assert_unbiased(g, exact_grad(), f"{name} on the switch, reparameterization on z")


@pytest.mark.parametrize("name", ["score", "expect"])
def test_hessian_vector_products_are_unbiased(name):
    # both declare every order, as reparameterization does (unordered_set declares 1: tests/models/test_hidden_markov.py)
    v = torch.randn(len(THETA), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g, h = estimates(name, 2000, seed=2, order=2)
    assert_unbiased(g, exact_grad(), f"{name}: gradient")
    assert_unbiased(h @ v, torch.func.hessian(exact_neg_elbo)(THETA) @ v, f"{name}: Hessian-vector product")


@pytest.mark.parametrize("name", ["score", "unordered_set", "expect"])
def test_a_batch_of_sequences_on_a_data_plate(name):
    """Three sequences on a data plate (one beam or sample set per sequence); the loss is their mean."""
    exact = torch.func.grad(lambda th: sum(exact_neg_elbo(th, x) for x in XS) / len(XS))(THETA)
    g, = estimates(name, 2000, seed=4, data=True)
    assert_unbiased(g, exact, f"{name}, 3 sequences")


@pytest.mark.parametrize("baseline", [None, "leave_one_out"])
def test_causal_credit_a_cost_is_not_credited_to_later_switches(baseline):
    """The gradient of step u's bias dq[u] is, for every replicate, REINFORCE with reward-to-go written from the same
    draws, mean_i (onehot(s_u) - q_u)_i (1 + Σ_{t≥u} (c_t - b_t)_i) (the 1: c_u holds log q(s_u)): costs before u
    are not credited to s_u; with the whole ELBO as one cost it is the full return Σ_t (c_t - b_t) instead. Both
    are unbiased; reward-to-go has the smaller variance at the last step."""
    R, n = 2000, 4
    dq = _coordinates({"dq"})
    exact = exact_grad()[dq].view(T, K)
    got = {}
    for per_step in (True, False):
        torch.manual_seed(5)
        record: dict = {}
        options = {} if baseline is None else {"baseline": baseline}
        with storch.Graph():
            leaf, theta = replicate(THETA, R)
            slds(storch.estimator("score", plate="s", n_samples=n, **options), storch.estimator("reparameterization",
                 plate="z"), theta, X, per_step=per_step, record=record)
            g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
        names = ("s", "z", "replicate")
        last = record["cost"][-1]
        costs = torch.stack([layout(c + 0 * last, names) for c in record["cost"]])  # (T, n, 1, R)
        scores = torch.stack([layout(sc + 0 * last, names) for sc in record["score"]])  # (T, n, 1, R, K)
        if baseline is not None:  # each cost's leave-one-out mean over the other samples
            costs = costs - (costs.sum(1, keepdim=True) - costs) / (n - 1)
        credit = costs.flip(0).cumsum(0).flip(0) if per_step else costs.sum(0, keepdim=True).expand_as(costs)
        hand = (scores * (1 + credit).unsqueeze(-1)).mean((1, 2)).movedim(1, 0)  # (R, T, K)
        got[per_step] = g[:, dq].view(R, T, K)
        torch.testing.assert_close(got[per_step], hand, rtol=1e-9, atol=1e-10)
        assert_unbiased(got[per_step].flatten(1), exact.flatten(), f"per step: {per_step}")
    assert (got[True][:, :-1] - got[False][:, :-1]).abs().max() > 0.1  # the later costs, credited or not
    variance = {k: float(v[:, -1].var(0).sum()) for k, v in got.items()}
    assert variance[False] > 1.5 * variance[True], variance


def test_a_switch_that_reads_the_state_needs_estimators_per_step():
    """q(s_t) reads z_{t-1} and q(z_t) reads s_t: each sequence feeds the other, so one estimator each is refused
    (naming the fix), and one per step for both is unbiased against the reference (score + leave-one-out, expect)."""
    with storch.Graph(), pytest.raises(storch.PlateError, match=r"(?s)step 1 of partition 's' depends on node 'z'.*"
                                                                r"switching state-space model, create BOTH estimators anew per step"):
        slds(*_partitions("score"), THETA, X, recurrent=True)
    _, ref = reference(True)
    for name in ("score per step", "expect"):
        g, = estimates(name, 4000, seed=6, recurrent=True)
        assert_matches_reference(g, ref, f"{name}, recurrent switch")


@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_relaxed_control_variates_on_a_one_hot_switch(name):
    """relax and rebar (unbiased, the relaxed family; no partitions: one estimator per step, and so for z) on a
    OneHotCategorical switch that weights the regimes' tables."""
    ests = ([storch.estimator(name, plate=f"s{t}") for t in range(T)],
            [storch.estimator("reparameterization", plate=f"z{t}") for t in range(T)])
    g, = estimates(name, 2000, seed=7, one_hot=True, ests=ests)
    assert_unbiased(g, exact_grad(), f"{name} on the switch")


def test_training_lowers_the_exact_negative_elbo():
    est_s, est_z = _partitions("score")
    before, after, _ = train_exact(THETA, exact_neg_elbo, lambda theta: slds(est_s, est_z, theta, X), steps=30,
                                   lr=0.05)
    assert after < before - 1.0, (before, after)


def _compile_case(name):
    theta = torch.nn.Parameter(THETA.clone())
    est_s, est_z = _partitions(name)

    def loss(xs):
        with storch.Graph():
            slds(est_s, est_z, theta, storch.denote_independent(xs, 0, "data"))
            return storch.surrogate_loss()

    return loss, [theta], (XS,)


@pytest.mark.usefixtures("restore_validation")  # conftest
@pytest.mark.parametrize("name", ["score", "unordered_set", "expect"])
def test_compiled_step_is_one_graph_with_eager_gradients(name, forbid_storch):
    """storch.compile of the step on a data plate: one trace, one graph, no graph breaks, eager's value and gradients,
    and the replayed call runs no storch code. Under score the regime index was a transposed view (torch's
    Categorical.sample), and aot_eager's matmul after ``Aq[s]`` failed ("view size is not compatible with input
    tensor's size and stride")."""
    loss, params, args = _compile_case(name)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = storch.compile(loss, backend=counter)
    want = [step_value_and_grads(loss, params, args, seed) for seed in range(2)]
    assert_same_step(step_value_and_grads(compiled, params, args, 0), want[0])
    forbid_storch()  # (conftest) the trace is done: a replay that entered a storch.Graph or an estimator would raise
    assert_same_step(step_value_and_grads(compiled, params, args, 1), want[1])
    assert compiled.traces == 1 and counter.frame_count == 1
    gm = compiled.graph_module(*args)
    assert torch._dynamo.explain(gm)(*args).graph_break_count == 0
