"""A DreamerV2-style world model (RSSM with categorical latents), ported as a user of storch would.

h_t = GRU(h_{t-1}, z_{t-1}, a_{t-1}); a posterior q(z_t | h_t, x_t) and a prior p(z_t | h_t), each G groups
of C-way categoricals (``Independent(OneHotCategorical, 1)``) with "unimix" (0.99 softmax + 0.01 uniform);
costs: the reconstruction of x_t and the balanced KL, alpha KL(sg(q) || p) + (1 - alpha) KL(q || sg(p)).
The model is written for one data point and one sample. Checked: (1) the detach-in-KL pattern gives the
gradient the balanced KL means: straight-through (``gumbel_straight_through``, and DreamerV2's own,
``straight_through``: the derivative of the unimix probabilities; one estimator per step or one over the steps, a
partition) equals a hand-written batched torch step with the same draws, exactly in float64; score +
leave-one-out over the steps (one partition) is z-tested against enumerating every
latent sequence; (2) a unimix ``Independent(OneHotCategorical)`` is accepted, unbiased, by the estimators
that support it and refused, with the fix, by those that enumerate; (3) ``storch.compile`` of the step:
one graph, no graph breaks, eager's gradients.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributions import Independent, OneHotCategorical, kl_divergence

import storch
from model_checks import assert_same_step, assert_trains, layout, step_value_and_grads
from storch.testing import Model, assert_unbiased, check_against_enumeration, per_replicate_derivatives, replicate


class WorldModel(nn.Module):
    """DreamerV2's RSSM, one method per piece, for one data point (batched inputs work too)."""

    def __init__(self, x_dim=3, a_dim=1, h_dim=4, groups=2, classes=3, unimix=0.01, alpha=0.8):
        super().__init__()
        self.groups, self.classes, self.unimix, self.alpha, self.h_dim = groups, classes, unimix, alpha, h_dim
        self.gru = nn.GRUCell(groups * classes + a_dim, h_dim)
        self.posterior = nn.Linear(h_dim + x_dim, groups * classes)
        self.prior = nn.Linear(h_dim, groups * classes)
        self.decoder = nn.Linear(h_dim + groups * classes, x_dim)

    def probs(self, logits, offset=0.0):
        """Unimix: 0.99 softmax + 0.01 uniform, per group (``offset``: a test's parameter on the logits)."""
        p = (logits.unflatten(-1, (self.groups, self.classes)) + offset).softmax(-1)
        return (1 - self.unimix) * p + self.unimix / self.classes

    def dist(self, probs):
        return Independent(OneHotCategorical(probs=probs), 1)

    def step(self, h, z, a, x, q_offset=0.0, p_offset=0.0):
        """h_t and the posterior's and prior's probabilities, from h_{t-1}, z_{t-1} (one-hot (G, C)), a_{t-1}, x_t."""
        h = self.gru(torch.cat([z.flatten(-2), a], -1), h)
        return h, self.probs(self.posterior(torch.cat([h, x], -1)), q_offset), self.probs(self.prior(h), p_offset)

    def kl(self, q, p):
        """KL balancing: the prior learns towards the posterior at rate alpha, the posterior towards the prior
        at rate 1 - alpha (sg = detach)."""
        return (self.alpha * kl_divergence(self.dist(q.detach()), self.dist(p))
                + (1 - self.alpha) * kl_divergence(self.dist(q), self.dist(p.detach())))

    def reconstruction(self, h, z, x):
        return ((self.decoder(torch.cat([h, z.flatten(-2)], -1)) - x) ** 2).sum(-1)


def environment(batch, steps, x_dim=3, a_dim=1, seed=0):
    """A tiny synthetic environment: a damped walker driven by random actions, seen through tanh of a
    fixed linear map plus noise. Observations (B, T, x_dim) and actions (B, T, a_dim), float64."""
    g = torch.Generator().manual_seed(seed)
    actions = torch.randn(batch, steps, a_dim, generator=g, dtype=torch.float64)
    w = torch.randn(a_dim, x_dim, generator=g, dtype=torch.float64)
    s, xs = torch.zeros(batch, a_dim, dtype=torch.float64), []
    for t in range(steps):
        s = 0.9 * s + 0.5 * actions[:, t]
        xs.append(torch.tanh(s @ w) + 0.1 * torch.randn(batch, x_dim, generator=g, dtype=torch.float64))
    return torch.stack(xs, 1), actions


def storch_step(model, est, x, a, offsets=(0.0, 0.0), costs=None):
    """The world model's loss for a batch of sequences, with storch. ``est``: one estimator (a partition
    over the steps) or a list of one per step. Returns the posterior samples z_t (and appends the costs to
    ``costs`` if given)."""
    xs, acts = storch.denote_independent((x, a), 0, "data")
    h = torch.zeros(model.h_dim, dtype=x.dtype)
    z = torch.zeros(model.groups, model.classes, dtype=x.dtype)
    samples = []
    for t in range(x.shape[1]):
        h, q, p = model.step(h, z, acts[t], xs[t], *offsets)
        z = (est[t] if isinstance(est, list) else est)(model.dist(q))
        samples.append(z)
        kl, rec = model.kl(q, p), model.reconstruction(h, z, xs[t])
        storch.add_cost(kl, name="kl")
        storch.add_cost(rec, name="reconstruction")
        if costs is not None:
            costs += [kl, rec]
    return samples


def hand_straight_through(model, x, a, temperature=1.0):
    """The same step in batched torch, with Gumbel straight-through written out: the noise drawn as
    storch_relaxed draws it (one ``torch.rand`` per step, of the logits' shape), so one seed gives both
    the same draws. Returns the loss (batch mean of the summed costs) and the hard samples."""
    batch, steps = x.shape[:2]
    h = torch.zeros(batch, model.h_dim, dtype=x.dtype)
    z = torch.zeros(batch, model.groups, model.classes, dtype=x.dtype)
    total, samples = 0.0, []
    eps = torch.finfo(x.dtype).eps
    for t in range(steps):
        h, q, p = model.step(h, z, a[:, t], x[:, t])
        logits = OneHotCategorical(probs=q).logits
        u = torch.rand((1,) + tuple(logits.shape), dtype=x.dtype).clamp_(eps, 1 - eps)[0]
        soft = torch.softmax((logits - torch.log(-torch.log(u))) / temperature, -1)
        z = F.one_hot(soft.argmax(-1), model.classes).to(x.dtype) + (soft - soft.detach())
        samples.append(z.detach())
        total = total + model.kl(q, p) + model.reconstruction(h, z, x[:, t])
    return total.mean(), samples


def hand_plain_straight_through(model, x, a):
    """The same step with DreamerV2's straight-through written out, ``sample + probs - probs.detach()`` of the
    unimix probabilities (storch's ``straight_through``), the sample drawn as storch draws it (one
    ``sample((1,))`` per step). Returns the loss and the hard samples."""
    batch, steps = x.shape[:2]
    h = torch.zeros(batch, model.h_dim, dtype=x.dtype)
    z = torch.zeros(batch, model.groups, model.classes, dtype=x.dtype)
    total, samples = 0.0, []
    for t in range(steps):
        h, q, p = model.step(h, z, a[:, t], x[:, t])
        z = model.dist(q).sample((1,))[0] + (q - q.detach())
        samples.append(z.detach())
        total = total + model.kl(q, p) + model.reconstruction(h, z, x[:, t])
    return total.mean(), samples


def _params(model):
    return list(model.parameters())


@pytest.mark.parametrize("name", ["gumbel_straight_through", "straight_through"])
@pytest.mark.parametrize("alpha", [0.8, 0.3])
@pytest.mark.parametrize("partition", [False, True])
def test_straight_through_equals_hand_written_with_the_same_draws(alpha, partition, name):
    # one estimator per step (a plate each) or one over the steps (a partition, one plate); the Gumbel
    # straight-through or DreamerV2's own, the derivative of the unimix probabilities (straight_through)
    torch.manual_seed(0)
    model = WorldModel(alpha=alpha).double()
    x, a = environment(3, 10)
    ests = (storch.estimator(name, plate="z") if partition
            else [storch.estimator(name, plate=f"z{t}") for t in range(10)])
    hand_straight = hand_straight_through if name == "gumbel_straight_through" else hand_plain_straight_through
    torch.manual_seed(1)
    with storch.Graph():
        zs = storch_step(model, ests, x, a)
        loss = storch.surrogate_loss()
        g_storch = torch.autograd.grad(loss, _params(model))
        got = [z.tensor.reshape(3, model.groups, model.classes) for z in zs]
    torch.manual_seed(1)
    hand, want = hand_straight(model, x, a)
    g_hand = torch.autograd.grad(hand, _params(model))
    for t, (zs_, zh) in enumerate(zip(got, want)):
        assert torch.equal(zs_, zh), f"step {t}: not the same draws"
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=1e-12)
    for (name, _), gs, gh in zip(model.named_parameters(), g_storch, g_hand):
        torch.testing.assert_close(gs, gh, rtol=1e-10, atol=1e-12, msg=lambda m: f"gradient of {name}: {m}")
    # the control: KL without the stop-gradients (or with the halves swapped) has another gradient
    model.alpha = 1 - alpha
    torch.manual_seed(1)
    swapped = torch.autograd.grad(hand_straight(model, x, a)[0], _params(model))
    assert (g_hand[-3] - swapped[-3]).abs().max() > 1e-3  # the prior's bias


@pytest.mark.parametrize("name", ["gumbel_straight_through", "straight_through", "gumbel_softmax"])
def test_relaxed_partition_keeps_one_plate_and_draws_from_p(name):
    # one relaxed estimator over 64 steps (DreamerV3's sequence length): one plate of n entries at every step (one
    # estimator per step stopped at torch's 64 dims); the hard values continue each sequence with a draw from p,
    # so the estimate of E[total cost] (order 0) is unbiased: z-tested against enumerating every sequence
    torch.manual_seed(4)
    model = WorldModel(groups=1, classes=3).double()
    x, a = environment(2, 64, seed=3)
    est = storch.estimator(name, plate="z", n_samples=2)
    with storch.Graph():
        zs = storch_step(model, est, x, a)
        assert [(p.name, p.size, p.step) for p in zs[-1].plates] == [("z", 2, 63), ("data", 2, 0)]
        storch.backward()
    if name == "gumbel_softmax":
        return  # its costs are of relaxed samples: biased by design
    steps, r = 3, 4000
    x, a = environment(1, steps, seed=5)
    with storch.Graph():
        costs = []
        storch_step(model, est, x.expand(r, -1, -1), a.expand(r, -1, -1), costs=costs)
        estimates = layout(sum(costs), ("z", "data")).mean(0)  # each data point's estimate: the mean of its 2 sequences
    assert_unbiased(estimates.detach(), _exact_loss(model, x, a, (0.0, 0.0)).detach(), "E[total cost]")


def hand_relaxed(model, x, a, n, hard):
    """n sequences per data point in batched torch, Gumbel-softmax (``hard``: straight-through) written out,
    each step's noise one ``torch.rand`` of the logits' shape (n, batch, G, C): one draw per sequence given its
    own prefix. Returns the loss (mean over sequences and data of the summed costs) and the samples."""
    batch, steps = x.shape[:2]
    h = torch.zeros(n * batch, model.h_dim, dtype=x.dtype)
    z = torch.zeros(n * batch, model.groups, model.classes, dtype=x.dtype)
    total, samples, eps = 0.0, [], torch.finfo(x.dtype).eps
    for t in range(steps):
        xt = x[:, t].expand(n, -1, -1).flatten(0, 1)
        h, q, p = model.step(h, z, a[:, t].expand(n, -1, -1).flatten(0, 1), xt)
        logits = OneHotCategorical(probs=q).logits.unflatten(0, (n, batch))
        u = torch.rand(logits.shape, dtype=x.dtype).clamp_(eps, 1 - eps)
        soft = torch.softmax(logits - torch.log(-torch.log(u)), -1)
        z = F.one_hot(soft.argmax(-1), model.classes).to(x.dtype) + (soft - soft.detach()) if hard else soft
        samples.append(z.detach())
        z = z.flatten(0, 1)
        total = total + model.kl(q, p) + model.reconstruction(h, z, xt)
    return total.mean(), samples


@pytest.mark.parametrize("name", ["gumbel_straight_through", "gumbel_softmax"])
def test_relaxed_partition_of_n_sequences_equals_hand_written_with_the_same_draws(name, monkeypatch):
    # n = 3 sequences per data point over 5 steps: each step of sequence i is drawn given sequence i's own earlier
    # samples (the values and the gradients equal the hand-written loop's exactly in float64), with one draw per
    # sequence and step: the relaxations' draw hook, where the core's components path drew n per prefix (n x n)
    # and kept the diagonal
    import storch_relaxed.gumbel_softmax as module
    drawn = []
    noise = module.gumbel_noise
    monkeypatch.setattr(module, "gumbel_noise", lambda shape, like: drawn.append(tuple(shape)) or noise(shape, like))
    torch.manual_seed(0)
    model = WorldModel().double()
    n, batch, steps = 3, 2, 5
    x, a = environment(batch, steps)
    est = storch.estimator(name, plate="z", n_samples=n)
    torch.manual_seed(1)
    with storch.Graph():
        zs = storch_step(model, est, x, a)
        assert [(p.name, p.size, p.step) for p in zs[-1].plates] == [("z", n, steps - 1), ("data", batch, 0)]
        loss = storch.surrogate_loss()
        g_storch = torch.autograd.grad(loss, _params(model))
        got = [layout(z, ("z", "data")) for z in zs]
    assert drawn == [(n, batch, model.groups, model.classes)] * steps
    torch.manual_seed(1)
    hand, want = hand_relaxed(model, x, a, n, hard=name == "gumbel_straight_through")
    g_hand = torch.autograd.grad(hand, _params(model))
    for t, (zs_, zh) in enumerate(zip(got, want)):
        torch.testing.assert_close(zs_, zh, rtol=0, atol=1e-15, msg=lambda m: f"step {t}: {m}")
    # the sequences' hard samples differ (which prefix a step continues changes its logits)
    assert any(not torch.equal(z[0].argmax(-1), z[1].argmax(-1)) for z in want[:-1])
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=1e-12)
    for (pname, _), gs, gh in zip(model.named_parameters(), g_storch, g_hand):
        torch.testing.assert_close(gs, gh, rtol=1e-10, atol=1e-12, msg=lambda m: f"gradient of {pname}: {m}")


def test_a_sequence_too_long_for_one_estimator_per_step_names_the_estimators_that_take_it():
    # one estimator per step adds a plate dim per step, past torch's 64 at step 61 of a 64-step sequence. The
    # refusal said to create ONE estimator and call it at every step, which an estimator without partitions
    # (importance with one sample, gumbel_straight_through before it had them) refuses; it now names those that
    # support partitions and accept the distribution
    torch.manual_seed(0)
    model = WorldModel().double()
    x, a = environment(2, 64)
    uniform = model.dist(torch.full((2, 3), 1 / 3, dtype=torch.float64))
    ests = [storch.estimator("importance", plate=f"z{t}", proposal=uniform) for t in range(64)]
    with storch.Graph(), pytest.raises(storch.PlateError) as info:
        storch_step(model, ests, x, a)
    message = str(info.value)
    assert "'importance' does not support partitions" in message and "create ONE estimator" not in message
    assert "(gumbel_softmax, gumbel_straight_through, score, straight_through)" in message
    # and calling it again (the advice followed) names them too
    with storch.Graph(), pytest.raises(storch.PlateError, match=r"supports partitions and this distribution "
                                                               r"\(gumbel_softmax, gumbel_straight_through, score, straight_through\)"):
        storch_step(model, ests[0], x[:, :2], a[:, :2])


def _exact_loss(model, x, a, offsets):
    """E[Σ_t KL_t + reconstruction_t] by enumerating every latent sequence (G = 1), batch mean, with the
    stop-gradients as the balanced KL writes them: its gradient is the one the balanced KL means."""
    batch, steps = x.shape[:2]
    c = model.classes
    seqs = torch.tensor(list(itertools.product(range(c), repeat=steps)))  # (S, T)
    n = seqs.shape[0]
    xr, ar = x.repeat_interleave(n, 0), a.repeat_interleave(n, 0)
    seqs = seqs.repeat(batch, 1)
    h = torch.zeros(batch * n, model.h_dim, dtype=x.dtype)
    z = torch.zeros(batch * n, 1, c, dtype=x.dtype)
    log_p, cost = 0.0, 0.0
    for t in range(steps):
        h, q, p = model.step(h, z, ar[:, t], xr[:, t], *offsets)
        z = F.one_hot(seqs[:, t], c).to(x.dtype).unsqueeze(1)
        log_p = log_p + model.dist(q).log_prob(z)
        cost = cost + model.kl(q, p) + model.reconstruction(h, z, xr[:, t])
    return (log_p.exp() * cost).reshape(batch, n).sum(1).mean()


def test_score_leave_one_out_over_the_steps_is_unbiased():
    # the posterior's and the prior's logit offsets (C each), replicated: each replicate's gradient is one
    # estimate; KL balancing sends alpha of the KL's gradient to the prior and 1 - alpha to the posterior
    # (plus the score terms of the posterior's samples), which the exact enumeration holds as written
    torch.manual_seed(2)
    c, steps = 3, 3
    model = WorldModel(groups=1, classes=c).double()
    x, a = environment(2, steps, seed=1)
    theta = 0.5 * torch.randn(2 * c, dtype=torch.float64)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")
    with storch.Graph():
        leaf, th = replicate(theta, 3000)
        storch_step(model, est, x, a, offsets=(th[:c], th[c:]))
        grad, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    exact = torch.func.grad(lambda th: _exact_loss(model, x, a, (th[:c], th[c:])))(theta)
    assert_unbiased(grad, exact, "gradient")
    assert float(exact.detach().abs().min()) > 1e-3
    # the control: the prior's gradient is alpha times the unbalanced KL's (the posterior samples do not depend on it)
    model.alpha = 1.0
    full = torch.func.grad(lambda th: _exact_loss(model, x, a, (th[:c], th[c:])))(theta)
    torch.testing.assert_close(exact[c:], 0.8 * full[c:])


@pytest.mark.parametrize("estimator", ["gumbel_straight_through", "score"])
def test_trains_with_either_estimator(estimator):
    # the estimator switched by name, one instance over the steps (a partition)
    torch.manual_seed(3)
    model = WorldModel().double()
    x, a = environment(4, 6, seed=2)
    options = {"baseline": "leave_one_out"} if estimator == "score" else {}
    est = storch.estimator(estimator, plate="z", n_samples=3, **options)
    assert_trains(model, torch.optim.Adam(model.parameters(), lr=1e-2), lambda graph: storch_step(model, est, x, a))


def _unimix_model():
    """One node: a unimix Independent(OneHotCategorical) of 2 groups x 3 classes, a quadratic cost."""
    groups, classes, unimix = 2, 3, 0.01
    w = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.1, -0.7]], dtype=torch.float64)

    def dist(theta):
        p = (1 - unimix) * theta.reshape(groups, classes).softmax(-1) + unimix / classes
        return Independent(OneHotCategorical(probs=p), 1)

    def cost(z):
        return ((z * w).sum((-1, -2)) - 0.5) ** 2

    def build(make, theta):
        storch.add_cost(cost(make("z")(dist(theta))), name="f")

    def exact(theta):
        d = dist(theta)
        zs = torch.stack([F.one_hot(torch.tensor(i), classes).double()
                          for i in itertools.product(range(classes), repeat=groups)])
        return (d.log_prob(zs).exp() * cost(zs)).sum()

    theta = torch.tensor([0.2, -0.4, 0.9, -1.0, 0.5, 0.3], dtype=torch.float64)
    return Model("unimix Independent(OneHotCategorical)", theta, build, exact, lambda: [dist(theta)])


@pytest.mark.parametrize("name", ["score", "go", "mvd", "rebar", "relax"])
def test_unimix_independent_one_hot_is_unbiased(name):
    report = check_against_enumeration(name, models=[_unimix_model()], orders=[0, 1], n_replicates=2000)
    assert report.ok and len(report.checks) == 2


@pytest.mark.parametrize("name", ["expect", "sum_and_sample", "unordered_set"])
def test_unimix_independent_one_hot_refused_by_the_enumerating_estimators(name):
    report = check_against_enumeration(name, models=[_unimix_model()], orders=[0, 1], n_replicates=2000,
                                       raise_on_failure=False)
    assert "pass the OneHotCategorical itself" in report.errors[_unimix_model().name]


def _compile_case(estimator, steps=2):
    torch.manual_seed(0)
    model = WorldModel().double()
    if estimator == "gumbel_straight_through per step":
        est = [storch.estimator("gumbel_straight_through", plate=f"z{t}") for t in range(steps)]
    elif estimator in ("gumbel_straight_through", "straight_through"):
        est = storch.estimator(estimator, plate="z", n_samples=2)
    else:
        est = storch.estimator(estimator, plate="z", n_samples=3, baseline="leave_one_out")

    def loss(x, a):
        with storch.Graph():
            storch_step(model, est, x, a)
            return storch.surrogate_loss()

    return loss, _params(model), environment(4, steps)


@pytest.mark.usefixtures("restore_validation")  # conftest
@pytest.mark.parametrize("estimator", ["gumbel_straight_through per step", "gumbel_straight_through", "straight_through",
                                       "score"])
def test_compiled_step_is_one_graph_with_eager_gradients(estimator):
    loss, params, args = _compile_case(estimator)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = storch.compile(loss, backend=counter)
    for seed in range(2):
        got = step_value_and_grads(compiled, params, args, seed)
        assert_same_step(got, step_value_and_grads(loss, params, args, seed))
    assert compiled.traces == 1 and counter.frame_count == 1
    gm = compiled.graph_module(*args)
    assert torch._dynamo.explain(gm)(*args).graph_break_count == 0
    assert "storch" not in gm.code
