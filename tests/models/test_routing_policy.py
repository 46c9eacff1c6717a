"""Neural combinatorial optimisation: an attention policy that builds a travelling-salesman tour city by
city (Kool et al., 2019 "Attention, learn to solve routing problems!"; "Buy 4 REINFORCE samples", 2019;
the unordered set estimator, 2020), ported as a user writes it from docs/partitions.md.

The model is written for ONE instance and ONE tour: cities embedded by a tiny attention layer, at each
step a query from the first and the current city, a ``Categorical`` over the cities with the visited
ones masked (``-inf`` by ``masked_fill``, ``-inf`` by ``torch.where``, or ``-1e9``), one estimator for the
whole tour (one partition), cost = tour length. Two variants: the first city is drawn too (4 cities:
24 tours), or the tour starts at a depot and customers already served are masked from the start (the
depot opens once every customer is served, as in Kool et al.'s routing problems), so an instance may
have fewer feasible tours than the set size n. The gradient with respect to all the policy's parameters
(one flat vector, replicated on an independent plate: R independent estimates in one graph) is z-tested
against the gradient of the expected tour length, enumerated over every action sequence.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

D = 2  # embedding width: theta holds W_embed (2, D), b_embed (D,), W_query (2D, D)
N_THETA = 2 * D + D + 2 * D * D
MASKS = ("masked_fill", "where", "-1e9")


def _unpack(theta):
    sizes = [(2, D), (D,), (2 * D, D)]
    out, i = [], 0
    for shape in sizes:
        n = math.prod(shape)
        out.append(theta[..., i:i + n].reshape(*theta.shape[:-1], *shape))
        i += n
    return out


def _mask(logits, visited, how):
    if how == "masked_fill":
        return logits.masked_fill(visited, -math.inf)
    if how == "where":
        return torch.where(visited, torch.full_like(logits, -math.inf), logits)
    return logits.masked_fill(visited, -1e9)  # the large negative number many implementations use


def _step_logits(theta, h, first, cur):
    """Compatibility of a query (first and current city) with every city: plain torch, written for one
    instance; the enumeration below calls it on a batch of sequences."""
    _, _, w_q = _unpack(theta)
    ctx = torch.cat([h[..., first, :], h[..., cur, :]], -1) if first is not None else torch.zeros_like(
        torch.cat([h[..., 0, :], h[..., 0, :]], -1))
    q = (ctx.unsqueeze(-2) @ w_q).squeeze(-2)
    return 3 * torch.tanh((h @ q.unsqueeze(-1)).squeeze(-1))  # Kool et al. clip with C tanh


def _embed(theta, xy):
    w, b, _ = _unpack(theta)
    return torch.tanh(xy @ w + b.unsqueeze(-2))


def route(est, theta, xy, served=None, how="masked_fill", first_call=None):
    """One instance, one tour. ``served=None``: the first city is drawn, the tour is closed. Otherwise
    city 0 is the depot, ``served`` (bool per city) the customers already served: N - 1 steps, the depot
    masked until every customer is served (then it is the only action, and staying costs nothing)."""
    n = xy.shape[-2]
    h = _embed(theta, xy)
    depot = served is not None
    visited = served if depot else torch.zeros(n, dtype=torch.bool)
    first = cur = 0 if depot else None
    tours, length = [], torch.zeros(())
    for t in range(n - 1 if depot else n):
        closed = visited
        if depot:  # the depot opens once every customer is served
            closed = torch.cat([~visited[..., 1:].all(-1, keepdim=True), visited[..., 1:]], -1)
        a = est(Categorical(logits=_mask(_step_logits(theta, h, first, cur), closed, how)),
                **(first_call if t == 0 and first_call else {}))
        if cur is not None:
            length = length + (xy[a] - xy[cur]).norm(dim=-1)
        first = a if first is None else first
        visited = visited | F.one_hot(a, n).bool()
        cur = a
        tours.append(a)
    length = length + (xy[first] - xy[cur]).norm(dim=-1)
    storch.add_cost(length, name="length")
    return tours


def expected_length(theta, xy, served=None):
    """E[tour length] by enumerating every action sequence (batched plain torch; same policy)."""
    n = xy.shape[-2]
    depot = served is not None
    steps = n - 1 if depot else n
    seqs = torch.tensor(list(itertools.product(range(n), repeat=steps)))  # (P, steps)
    h = _embed(theta, xy)
    visited = served.expand(len(seqs), n).clone() if depot else torch.zeros(len(seqs), n, dtype=torch.bool)
    first = cur = torch.zeros(len(seqs), dtype=torch.long) if depot else None
    lp, length = torch.zeros(len(seqs)), torch.zeros(len(seqs))
    for t in range(steps):
        closed = visited
        if depot:
            closed = torch.cat([~visited[:, 1:].all(-1, keepdim=True), visited[:, 1:]], -1)
        logits = _step_logits(theta, h, first, cur).expand(len(seqs), n).masked_fill(closed, -math.inf)
        a = seqs[:, t]
        lp = lp + torch.log_softmax(logits, -1).gather(-1, a[:, None])[:, 0]
        if cur is not None:
            length = length + (xy[a] - xy[cur]).norm(dim=-1)
        first = a if first is None else first
        visited = visited | F.one_hot(a, n).bool()
        cur = a
    length = length + (xy[first] - xy[cur]).norm(dim=-1)
    p = lp.exp()
    return (p * torch.where(p > 0, length, torch.zeros_like(length))).sum()


def _instances(kind):
    """(xy, served, number of feasible tours per instance): 4 cities in the unit square."""
    g = torch.Generator().manual_seed(5)
    if kind == "free start":
        return torch.rand(4, 2, generator=g, dtype=torch.float64), None, [24]
    xy = torch.rand(2, 4, 2, generator=g, dtype=torch.float64)
    served = torch.tensor([[True, False, False, False], [True, False, True, False]])  # depot; customer 2 served
    return xy, served, [6, 2]


def _exact(theta, kind):
    xy, served, _ = _instances(kind)
    if served is None:
        return expected_length(theta, xy)
    return sum(expected_length(theta, xy[i], served[i]) for i in range(len(xy))) / len(xy)


def _estimates(make, kind, how, replicates, order, seed=0, keyed=False):
    """R independent estimates of the derivatives (orders 1..order) of E[length] w.r.t. theta, and every
    tour handed to the cost (rows of city indices)."""
    xy, served, _ = _instances(kind)
    theta = torch.randn(N_THETA, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    est = make()
    torch.manual_seed(seed)
    with storch.Graph():
        leaf, th = replicate(theta, replicates)
        # sum_and_sample's buffer is kept per data point: one key per replicate (and instance)
        first_call = {"memory_key": torch.arange(replicates * (1 if served is None else len(xy))).view(
            replicates, -1).squeeze(-1)} if keyed else None
        if served is None:
            tours = route(est, th, xy, None, how, first_call)
        else:
            x, s = storch.denote_independent((xy, served), 0, "instance")
            tours = route(est, th, x, s, how, first_call)
        seen = torch.stack(tours, -1).tensor
        derivs = per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)
    return theta, derivs, seen.reshape(-1, seen.shape[-1])


def _assert_feasible(seen, kind):
    """Every tour the cost saw visits each city once (free start), or serves each open customer once and
    then waits at the depot; never a masked action."""
    _, served, _ = _instances(kind)
    rows = seen.tolist()
    if served is None:
        bad = [r for r in rows if sorted(r) != [0, 1, 2, 3]]
    else:
        ok = {tuple(s) for i in range(len(served)) for s in _feasible(served[i])}
        bad = [r for r in rows if tuple(r) not in ok]
    assert not bad, f"{len(bad)} infeasible tours reached the cost, e.g. {bad[:3]}"


def _feasible(served):
    todo = [c for c in range(1, len(served)) if not served[c]]
    return [list(p) + [0] * (len(served) - 1 - len(p)) for p in itertools.permutations(todo)]


def _memory(kind):
    """A MAPO memory of two sequences, one of them through a masked action (customer 2 twice / city 1
    twice): a remembered sequence may become infeasible, and must then never reach the cost."""
    if kind == "free start":
        return torch.tensor([[0, 1, 2, 3], [2, 1, 1, 0]])
    return torch.tensor([[1, 2, 3], [3, 2, 2]])


CASES = {
    "score+loo@4": (lambda kind: storch.estimator("score", plate="tour", n_samples=4, baseline="leave_one_out"), 2),
    "unordered_set@2": (lambda kind: storch.estimator("unordered_set", plate="tour", n_samples=2), 1),
    "unordered_set@4": (lambda kind: storch.estimator("unordered_set", plate="tour", n_samples=4), 1),
    "unordered_set@4,no baseline": (
        lambda kind: storch.estimator("unordered_set", plate="tour", n_samples=4, baseline=False), 2),
    "sum_and_sample,buffer@2+4": (  # (keyed: its buffer is per data point)
        lambda kind: storch.estimator("sum_and_sample", plate="tour", buffer=2, n_samples=4,
                                      baseline="leave_one_out", memory=_memory(kind)), 2),
}


@pytest.mark.filterwarnings("ignore:storch.estimator.*created anew")  # (a fresh estimator per case, on purpose)
@pytest.mark.parametrize("how", MASKS)
@pytest.mark.parametrize("kind", ["free start", "depot"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_is_unbiased_and_every_tour_is_feasible(case, kind, how):
    """z-test (|mean - exact| < 4 SE) of 8000 seeded estimates of the gradient, and of the Hessian where
    the estimator is unbiased at order 2 (masked_fill only: the masks give the same policy), against
    enumeration; the depot instances have 6 and 2 feasible tours (fewer than some sets)."""
    make, max_order = CASES[case]
    order = max_order if how == "masked_fill" else 1
    theta, derivs, seen = _estimates(lambda: make(kind), kind, how, 8000, order, keyed=case.startswith("sum_and"))
    _assert_feasible(seen, kind)
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_exact(th, kind), th, create_graph=True)
    assert float(g.detach().abs().max()) > 1e-3
    assert_unbiased(derivs[0], g.detach(), "gradient")
    if order == 2:
        hess = torch.stack([torch.autograd.grad(g[i], th, retain_graph=True)[0] for i in range(N_THETA)])
        assert_unbiased(derivs[1], hess, "Hessian")


@pytest.mark.parametrize("how", MASKS)
@pytest.mark.parametrize("kind, k", [("free start", 24), ("free start", 32), ("depot", 8)])
def test_unordered_set_with_every_feasible_tour_is_exact(kind, k, how):
    """n >= the number of feasible tours: the set is every feasible tour (no masked action, also with a
    -1e9 mask, whose probability is exactly 0), and the estimate is the exact gradient."""
    theta, derivs, seen = _estimates(lambda: storch.estimator("unordered_set", plate="tour", n_samples=k),
                                     kind, how, 4, 1)
    _assert_feasible(seen, kind)
    th = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_exact(th, kind), th)
    torch.testing.assert_close(derivs[0], g.expand_as(derivs[0]), rtol=1e-9, atol=1e-12)
    if kind == "depot":  # the instance with 2 feasible tours pads its set with weight-0 repeats
        assert len(seen) == 4 * 2 * 6


def test_unordered_set_with_its_baseline_refuses_order_2():
    """Its built-in baseline is zero-mean at order 1 only: a Hessian of the tour length is refused, with the
    estimator named (baseline=False is unbiased at every order, tested above)."""
    xy, _, _ = _instances("free start")
    theta = torch.zeros(N_THETA, dtype=torch.float64, requires_grad=True)
    est = storch.estimator("unordered_set", plate="tour", n_samples=4)
    with storch.Graph():
        route(est, theta, xy)
        with pytest.raises(storch.OrderError, match="unordered_set"):
            storch.surrogate_loss(order=2)


def _compiled_step(name, kind, how):
    """A step for storch.compile: the tour (one estimator per city, as ``expect`` needs), its length, and a
    cost that is infinite on a tour visiting a city twice (any value handed to the cost at weight 0 there
    makes the loss NaN)."""
    xy, served, _ = _instances(kind)
    options = {"n_samples": 2} if name != "expect" else {}
    ests = [storch.estimator(name, plate=f"city{i}", **options) for i in range(xy.shape[-2])]

    def step(theta, xy):
        calls = iter(ests)
        with storch.Graph():
            if served is None:
                tours = route(lambda d: next(calls)(d), theta, xy, None, how)
            else:
                x, s = storch.denote_independent((xy, served), 0, "instance")
                tours = route(lambda d: next(calls)(d), theta, x, s, how)
            twice = (sum(F.one_hot(a, xy.shape[-2]) for a in tours) > 1).any(-1)
            storch.add_cost(torch.where(twice, torch.full((), math.inf, dtype=xy.dtype),
                                        torch.zeros((), dtype=xy.dtype)), name="visits a city twice")
            return storch.surrogate_loss()
    return step, xy


@pytest.mark.parametrize("how", MASKS)
@pytest.mark.parametrize("kind", ["free start", "depot"])
def test_compiled_expect_never_hands_the_cost_a_masked_tour(kind, how):
    """Under storch.compile a -1e9 mask is -inf as eagerly (strict_support's traced copy, its mask by tensor
    ops): expect's compiled step gives the eager loss and gradient, finite with a cost infinite on the masked
    tours (the old trace handed them to the cost at weight 0: NaN), and the exact gradient of E[length]."""
    theta = torch.randn(N_THETA, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    step, xy = _compiled_step("expect", kind, how)
    eager = step(theta, xy)
    compiled = storch.compile(step, backend=None)
    for call in range(2):  # the trace, then a replay
        loss = compiled(theta, xy)
        assert torch.isfinite(loss), f"call {call}: {loss}"
        torch.testing.assert_close(loss, eager, rtol=1e-12, atol=0)
        (g,) = torch.autograd.grad(loss, theta)
        torch.testing.assert_close(g, torch.autograd.grad(_exact(theta, kind), theta)[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", MASKS)
@pytest.mark.parametrize("name", ["unordered_set", "sum_and_sample"])
def test_compiled_sampling_without_replacement_refuses_a_masked_step_as_with_inf(name, how):
    """Which values are possible decides how many distinct samples a step without replacement has, which a
    traced program cannot depend on: a -1e9 mask is refused as a -inf one is, saying to run the step eagerly
    (the old trace ran sum_and_sample through the masked values, NaN with this cost, and refused
    unordered_set with a value-read error)."""
    theta = torch.randn(N_THETA, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    step, xy = _compiled_step(name, "free start", how)
    with pytest.raises(storch.AssumptionError, match="eagerly"):
        storch.compile(step, backend=None)(theta, xy)
