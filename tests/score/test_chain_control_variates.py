"""The control variates of a chain of score nodes with a baseline, a cost at every step: Theorem 2's
Σ_c Σ_{w upstream of c} MagicBox(L_{w-1}) (1 - MagicBox(l_w)) ⊥b_w(c) is built as one term per node (the constant
baselines summed without autograd), not one per (cost, node) pair: the surrogate's autograd graph grows linearly
in the chain's length, with the losses, gradients, frames and moving averages of the per-pair path."""

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.surrogate import terms as terms_module
from step_checks import garbage_after


def _setup(M, baseline, n):
    a = torch.linspace(-0.4, 0.6, M).requires_grad_(True)
    return a, [storch.estimator("score", plate=f"z{k}", n_samples=n, baseline=baseline) for k in range(M)]


def _chain(M, ests, a, seed=0):
    torch.manual_seed(seed)
    z = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
    for k in range(M):
        z = ests[k](Bernoulli(logits=a[k] * z + 0.1 * k))
        storch.add_cost((z - 0.3) ** 2 + 0.2 * k, name=f"c{k}")


def _branches(ests, a, seed=0):
    """z0 -> z1, z0 -> z2 (siblings), z3 <- z1; costs of different plates under each node."""
    torch.manual_seed(seed)
    x = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
    z0 = ests[0](Bernoulli(logits=a[0] * x))
    storch.add_cost((z0 - 0.2) ** 2, name="c0")
    z1 = ests[1](Bernoulli(logits=a[1] * z0 + 0.3))
    z2 = ests[2](Bernoulli(logits=a[2] * z0 - 0.2))
    storch.add_cost(z1 * z2 + 0.5, name="c12")
    storch.add_cost(z2 - 0.4, name="c2")
    z3 = ests[3](Bernoulli(logits=a[3] * z1))
    storch.add_cost((z3 + z2) ** 2, name="c3")
    storch.add_cost(z3 * x + 1.0, name="c3x")


def _nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack.extend(g for g, _ in f.next_functions)
    return len(seen)


def _per_pair(monkeypatch):
    """Force the per (cost, node) path: each cost adds its own control variates."""
    monkeypatch.setattr(terms_module, "_all_groupable", lambda nodes, order, sums: False)


def _grouped_taken(monkeypatch):
    seen = []
    f = getattr(terms_module, "_grouped_cost", None)

    def spy(*args, **kwargs):
        seen.append(1)
        assert f is not None
        return f(*args, **kwargs)
    monkeypatch.setattr(terms_module, "_grouped_cost", spy, raising=False)
    return seen


@pytest.mark.parametrize("first", ["moving_average", "leave_one_out"])
def test_autograd_graph_grows_linearly(monkeypatch, first):
    # before (per pair): moving_average 632 nodes at M = 10, 5202 at M = 30, 20307 at M = 60 (~M²); the first node
    # with leave_one_out (2 samples: a chain of them would draw 2^M entries), the others a moving average
    counts, taken = {}, {}
    for M in (10, 40):
        a, ests = _setup(M, "moving_average", 1)
        if first == "leave_one_out":
            ests[0] = storch.estimator("score", plate="z0", n_samples=2, baseline="leave_one_out")
        with storch.Graph():  # a first step: the moving averages exist (b is not None), as in training
            _chain(M, ests, a)
            storch.backward()
        with storch.Graph():
            _chain(M, ests, a, seed=1)
            seen = _grouped_taken(monkeypatch)
            counts[M] = _nodes(storch.surrogate_loss())
            monkeypatch.undo()
            taken[M] = len(seen)
    assert counts[40] <= 4 * counts[10] + 40, counts  # linear (per pair: ~14x)
    assert counts[40] <= 40 * 40, counts
    assert taken == {10: 9, 40: 39}  # (the first cost has one node: _one_node_surrogate)


def _step(monkeypatch, per_pair, order, baseline, build, M, seed):
    if per_pair:
        _per_pair(monkeypatch)
    a, ests = _setup(M, baseline, 2)
    with storch.Graph():  # a first step: the moving averages exist
        build(ests, a, seed + 100)
        storch.backward()
    with storch.Graph():
        build(ests, a, seed)
        seen = _grouped_taken(monkeypatch)
        loss = storch.surrogate_loss(order=order)
        (g,) = torch.autograd.grad(loss, a, create_graph=order == 2)
        h = torch.autograd.grad(g.sum(), a)[0] if order == 2 else None
    monkeypatch.undo()
    assert bool(seen) is not per_pair  # the path asked for was taken
    return loss.detach(), g.detach(), h


def _chain5(ests, a, seed):
    _chain(5, ests, a, seed)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("baseline", ["moving_average", "leave_one_out"])
@pytest.mark.parametrize("build,M", [(_chain5, 5), (_branches, 4)], ids=["chain", "branches"])
def test_gradients_equal_the_per_pair_path(monkeypatch, order, baseline, build, M):
    for seed in range(3):
        l0, g0, h0 = _step(monkeypatch, False, order, baseline, build, M, seed)
        l1, g1, h1 = _step(monkeypatch, True, order, baseline, build, M, seed)
        # the same terms; the costs' means and the control variates summed in another order
        torch.testing.assert_close(l0, l1, rtol=1e-6, atol=0)
        torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)
        assert g0.abs().sum() > 0
        if order == 2:
            assert h0 is not None and h1 is not None
            torch.testing.assert_close(h0, h1, rtol=1e-6, atol=1e-7)
            assert h0.abs().sum() > 0


def test_control_variates_change_the_gradient(monkeypatch):
    # (the grouped terms are not dropped: without the baselines the gradient differs)
    _, g, _ = _step(monkeypatch, False, 1, "leave_one_out", _chain5, 5, 0)
    _, g_none, _ = _step(monkeypatch, True, 1, "none", _chain5, 5, 0)
    assert not torch.allclose(g, g_none, rtol=1e-3)


@pytest.mark.parametrize("build,M", [(_chain5, 5), (_branches, 4)], ids=["chain", "branches"])
def test_moving_averages_and_frames_equal_the_per_pair_path(monkeypatch, build, M):
    states, frames = [], []
    for per_pair in (False, True):
        if per_pair:
            _per_pair(monkeypatch)
        a, ests = _setup(M, "moving_average", 2)
        opt = torch.optim.SGD([a], lr=0.1)
        for step in range(3):
            with storch.Graph():
                build(ests, a, step)
                opt.zero_grad()
                storch.backward()
                opt.step()
        with storch.Graph():
            build(ests, a, 3)
            storch.surrogate_loss()
            got = {}
            for node in storch.current_graph().nodes:
                for key, frame in node.frames.items():
                    got[(node.plate.name, key)] = (frame.tensor, frame.live().detach())
            frames.append(got)
        states.append(([dict(e.moving_averages) for e in ests], a.detach().clone()))
        monkeypatch.undo()
    (s0, a0), (s1, a1) = states
    torch.testing.assert_close(a0, a1, rtol=1e-6, atol=1e-7)
    for m0, m1 in zip(s0, s1):
        assert m0.keys() == m1.keys() and m0
        for k in m0:
            torch.testing.assert_close(m0[k], m1[k], rtol=1e-6, atol=1e-7)
    assert frames[0].keys() == frames[1].keys()
    for k, (t0, live0) in frames[0].items():
        t1, live1 = frames[1][k]
        assert t0.shape == t1.shape and torch.equal(t0, t1)  # the frames' values: bitwise
        torch.testing.assert_close(live0, live1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("live", [False, True])
def test_grouped_chain_leaves_no_cycles(monkeypatch, live):
    # the frames' live tensors (rebuilt when asked) hold no node: a finished step is freed by reference counting
    a, ests = _setup(4, "moving_average", 2)
    ests[0] = storch.estimator("score", plate="z0", n_samples=2, baseline="leave_one_out")
    seen = _grouped_taken(monkeypatch)

    def step():
        with storch.Graph():
            _chain(4, ests, a)
            storch.backward()
            if live:
                for node in storch.current_graph().nodes:
                    for frame in node.frames.values():
                        frame.live()

    n = garbage_after(step, warmups=2)
    assert seen and n == 0, n
