"""A chain of M score-function nodes z_1 -> ... -> z_M (a cost at each step, or one at the end): the surrogate's
Python work per step is linear in M (the per (cost, upstream node) checks and loops are asked once per node), with
the losses, gradients and refusals of the general path."""

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.surrogate import control_variates as control_variates_module
from storch.surrogate import estimates as estimates_module
from storch.surrogate import grouped_baselines as grouped_module
from storch.surrogate import integer_reads as integer_reads_module
from storch.surrogate import loss as loss_module
from storch.surrogate import one_node as one_node_module
from storch.surrogate import order as order_module
from storch.surrogate import pathwise as pathwise_module
from storch.surrogate import reaches as reaches_module
from storch.surrogate import running_sums as running_sums_module
from storch.surrogate import steps as steps_module
from storch.surrogate import terms as terms_module


def _setup(M, baseline="none", n=1):
    a = torch.linspace(-0.4, 0.6, M).requires_grad_(True)
    return a, [storch.estimator("score", plate=f"z{k}", n_samples=n, baseline=baseline) for k in range(M)]


def _chain(M, per_step, ests, a, seed=0):
    torch.manual_seed(seed)
    z = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
    for k in range(M):
        z = ests[k](Bernoulli(logits=a[k] * z + 0.1 * k))
        if per_step or k == M - 1:
            storch.add_cost((z - 0.3) ** 2, name=f"c{k}")


def _counted(monkeypatch, names):
    """Count the calls of the per (cost, node) functions of the surrogate (by wrapping them where they are used)."""
    count = {n: 0 for n in names}
    for module in (loss_module, one_node_module, estimates_module, steps_module, terms_module, running_sums_module,
                   grouped_module, control_variates_module, pathwise_module, reaches_module, integer_reads_module,
                   order_module):
        for n in names:
            f = getattr(module, n, None)
            if f is None:
                continue

            def wrapped(*args, _f=f, _n=n, **kwargs):
                count[_n] += 1
                return _f(*args, **kwargs)
            monkeypatch.setattr(module, n, wrapped)
    return count


_PER_PAIR = ["_check_order", "_check_smooth", "_check_reaches", "_at_cost", "_ensure_weights",
             "_has_control_variate", "_passive"]


@pytest.mark.parametrize("per_step", [True, False])
def test_chain_surrogate_asks_each_node_once(monkeypatch, per_step):
    # on main (before): the checks and _at_cost ran per cost, each asking every node upstream of it
    # (_has_control_variate and _ensure_weights M²/2 times); now each is asked per node, or per cost
    totals = {}
    for M in (10, 40):
        a, ests = _setup(M)
        with storch.Graph():  # a first step settles the estimators' verdicts (_check_reaches: never pathwise)
            _chain(M, per_step, ests, a)
            storch.surrogate_loss().backward()
        with storch.Graph():
            _chain(M, per_step, ests, a)
            count = _counted(monkeypatch, _PER_PAIR)
            storch.surrogate_loss()
            monkeypatch.undo()
        totals[M] = sum(count.values())
    assert totals[40] <= 4 * totals[10] + 8, totals  # linear (M²: 16x)
    assert totals[40] <= 5 * 40, totals  # (one cost: each node asked a few times)


def _general(monkeypatch):
    """Make the surrogate take the general per (cost, node) path: no settled node facts, every node checked."""
    monkeypatch.setattr(running_sums_module._Sums, "settle", lambda self, nodes: None)
    monkeypatch.setattr(loss_module, "_needy_nodes", lambda graph: {id(n) for n in graph.nodes})


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average"])
@pytest.mark.parametrize("per_step", [True, False])
def test_chain_gradients_equal_the_general_path(monkeypatch, order, baseline, per_step):
    results = []
    for general in (False, True):
        if general:
            _general(monkeypatch)
        a, ests = _setup(5, baseline, n=2)
        with storch.Graph():
            _chain(5, per_step, ests, a, seed=7)
            loss = storch.surrogate_loss(order=order)
            (g,) = torch.autograd.grad(loss, a, create_graph=order == 2)
            h = torch.autograd.grad(g.sum(), a)[0] if order == 2 else None
            results.append((loss.detach(), g.detach(), h))
        monkeypatch.undo()
    (l0, g0, h0), (l1, g1, h1) = results
    assert torch.equal(l0, l1) and torch.equal(g0, g1)  # bitwise: the same terms in the same order
    assert g0.abs().sum() > 0
    if order == 2:
        assert torch.equal(h0, h1) and h0.abs().sum() > 0


def test_chain_non_smooth_cost_still_refused():
    # a pathwise node in the chain whose cost is a jump (round): refused at order 1 as before
    from storch.errors import StorchError
    a = torch.tensor([0.3, 0.5, -0.2], requires_grad=True)
    with storch.Graph():
        z = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
        z = storch.estimator("score", plate="z0", n_samples=2)(Bernoulli(logits=a[0] * z))
        storch.add_cost((z - 0.3) ** 2, name="c0")
        x = storch.estimator("reparameterization", plate="x", n_samples=2)(torch.distributions.Normal(a[1] * z, 1.0))
        storch.add_cost(torch.round(x), name="c1")
        with pytest.raises(StorchError):
            storch.surrogate_loss()


def test_chain_cost_not_reached_still_warned():
    # a node of the chain no cost carries (its cost computed from z.tensor): UnusedSampleWarning as before
    a = torch.tensor([0.3, 0.5], requires_grad=True)
    with storch.Graph():
        z = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
        z0 = storch.estimator("score", plate="z0", n_samples=2)(Bernoulli(logits=a[0] * z))
        storch.add_cost((z0 - 0.3) ** 2, name="c0")
        z1 = storch.estimator("score", plate="z1", n_samples=2)(Bernoulli(logits=a[1] * z0))
        storch.add_cost(z1.tensor.sum() * 0 + a.sum(), name="c1")
        with pytest.warns(storch.UnusedSampleWarning):
            storch.surrogate_loss()


def test_a_jump_under_a_new_cost_name_at_a_later_step_is_refused_after_the_verdicts_settled():
    """Steps 0-1 settle every verdict (the chain's score estimators, the pathwise node's cost names); at step 2 a
    new cost name carries round(x): still refused at order 1 (the checks asked per node must not skip a pathwise
    node's new cost; review r-fourteen)."""
    a = torch.tensor([0.3, 0.5, -0.2], requires_grad=True)
    ests = [storch.estimator("score", plate=f"z{k}", n_samples=2) for k in range(2)]
    rep = storch.estimator("reparameterization", plate="x", n_samples=2)
    for step in range(3):
        with storch.Graph():
            z = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
            for k in range(2):
                z = ests[k](Bernoulli(logits=a[k] * z))
                storch.add_cost((z - 0.3) ** 2, name=f"c{k}")
            x = rep(torch.distributions.Normal(a[2] * z, 1.0))
            storch.add_cost((x - 0.1) ** 2, name="smooth")
            if step < 2:
                torch.autograd.grad(storch.surrogate_loss(), [a])
            else:
                storch.add_cost(torch.round(x), name="jump")
                with pytest.raises(storch.OrderError, match="RoundBackward"):
                    storch.surrogate_loss()


def test_align_of_a_non_contiguous_raw_keeps_unsqueezes_strides():
    """Several size-1 dims inserted into a non-contiguous raw get unsqueeze's strides (a view gives them others, and
    a later op's output another layout: its sums another order of addition; review r-fourteen)."""
    from storch.plates.tensor import Plate, align
    plates = (Plate("a", 7, False), Plate("b", 6, False))
    target = (plates[0], plates[1], Plate("c", 1, False), Plate("d", 1, False), Plate("e", 1, False))
    raw = torch.randn(7, 6, 3)[..., 1]  # strides (18, 3)
    expected = raw.unsqueeze(2).unsqueeze(3).unsqueeze(4)
    out = align(raw, plates, target)
    assert out.shape == expected.shape and out.stride() == expected.stride() and torch.equal(out, expected)
    contiguous = align(raw.contiguous(), plates, target)  # (the one-view path: the same values)
    assert torch.equal(contiguous, expected)
