"""The surrogate's fast paths are taken for the score function (issue 19).

- A single node with one cost gives the autograd graph of the DiCE objective written by hand
  (``(exp(lp - ⊥lp) * cost).mean()``, plus the leave-one-out control variate): no extra means,
  views or expands.
- The costs of the steps of a partition are stacked into one surrogate term (``_steps_surrogate``)
  for ``score`` without a baseline and with leave-one-out: ``Score`` overrides
  ``weighting_function`` (for its greedy baseline), and the stacking once refused every such
  class, so the fast path was never taken and nothing noticed.
- Uniform weights (w = 1/N) are never built as a tensor, and ``score`` without a baseline builds
  no cost frames.

Speed itself is measured by ``storch-compare overhead``; these tests check the path, not a time.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch.distributions import Bernoulli

import storch
import storch_score
from path_probes import calls, graph_ops


def magic_box(x):
    return torch.exp(x - x.detach())


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_single_node_one_cost_has_the_hand_written_graph(baseline, batch):
    n = 4
    theta = torch.linspace(-1.0, 1.0, 3).repeat(batch, 1).requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=n, baseline=baseline)
    for step in range(2):  # (the estimator's first surrogate walks the sample's paths: the general path)
        torch.manual_seed(0)
        with storch.Graph():
            x = storch.denote_independent(theta, 0, "data")
            z = est(Bernoulli(logits=x))
            storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
            loss, seen = calls(storch.surrogate_loss)
            assert "_one_node_surrogate" in seen
            if step == 0:
                assert "_one_node_loss" in seen and "_cost_surrogate" in seen  # declined: the general path
                continue
            # _one_node_loss: MagicBox(l) built there (a cost of the node's own plates: no alignment), and a finite
            # CPU loss read there (refuse_on_backward is for a loss it may hook: tests/reliability/test_nonfinite.py)
            assert "_cost_surrogate" not in seen and "align" not in seen and "gradient_values" not in seen
            assert "refuse_on_backward" not in seen
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), theta)
    # by hand: the same samples, the DiCE objective
    torch.manual_seed(0)
    d = Bernoulli(logits=theta)
    zz = d.sample((n,))
    lp = d.log_prob(zz).sum(-1)
    cost = ((zz - 0.45) ** 2).sum(-1)
    box = magic_box(lp)
    hand = box * cost
    if baseline == "leave_one_out":  # the Theorem-2 control variate (1 - MagicBox(l)) b, one MagicBox
        c = cost.detach()
        b = (c.sum(0, keepdim=True) - c) / (n - 1)
        dice = (hand + (1 - box) * b).mean()  # as written in the paper
        hand = torch.lerp(b, cost, box)  # the same function in one node: b + MagicBox(l) (C - b)
        assert sum(graph_ops(hand.mean()).values()) == sum(graph_ops(dice).values()) - 3
    else:
        dice = hand.mean()
    hand = hand.mean()
    assert graph_ops(loss) == graph_ops(hand)
    # the same value and derivatives as the paper's DiCE objective, first and second order
    (gd,) = torch.autograd.grad(dice, theta, create_graph=True)
    (hd,) = torch.autograd.grad(gd.sum(), theta)
    assert torch.equal(loss, dice.detach())  # lerp's value at weight 1 is the cost exactly
    assert torch.allclose(g, gd) and torch.allclose(h, hd)


def test_one_node_float32_node_under_a_float64_cost_is_widened_and_lerped():
    # a float64 cost widens the float32 node's l to float64 once (one cast): MagicBox(l) · C + (1 - MagicBox(l)) ⊥b
    # as two terms rounded each term's gradient to float32 and cancelled under a cost of 1e8; now one lerp
    theta = torch.zeros(2, 3, dtype=torch.float32, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        z = est(Bernoulli(logits=x))
        cost = ((z - 0.45) ** 2).sum(-1).double()
        storch.add_cost(cost, name="f")
        loss = storch.surrogate_loss()
        assert torch.equal(loss, cost.tensor.mean())
    ops = graph_ops(loss)
    assert ops["LerpBackward1"] == 1 and ops["ToCopyBackward0"] == 1 and "RsubBackward1" not in ops


def test_uniform_weights_are_not_built():
    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4)

    def step():
        with storch.Graph():
            z = est(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.45) ** 2).sum(), name="f")
            node = storch.current_graph().nodes[0]
            loss = storch.surrogate_loss()
            return node, loss

    (node, _), seen = calls(step)
    assert "weighting_function" not in seen
    assert node.frames == {}  # no baseline: no control variate, no cost frame
    assert torch.equal(node.weight_values, torch.full((4,), 0.25))  # still there when read
    greedy = storch.estimator("score", plate="z", n_samples=4, baseline="greedy")
    with storch.Graph():
        _, seen = calls(lambda: greedy(Bernoulli(logits=theta)))  # the control: w = 0 on the greedy entry
    assert "weighting_function" in seen


def _episode(est, theta, steps):
    x = storch.denote_independent(theta.expand(6, 2), 0, "data")
    a = torch.zeros_like(x[..., 0])
    for t in range(steps):
        a = est(Bernoulli(logits=x[..., 0] + a * x[..., 1]))
        storch.add_cost(-(0.9 ** t) * a, name=f"r{t}")


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_partition_costs_are_stacked(baseline):
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    est = storch.estimator("score", plate="a", n_samples=3, baseline=baseline)
    torch.manual_seed(0)
    with storch.Graph():
        _episode(est, theta, 10)
        loss, seen = calls(storch.surrogate_loss)
        assert "_steps_surrogate" in seen, "the per-step costs were not stacked"
        assert "_cost_surrogate" not in seen
        nodes = sum(graph_ops(loss).values())
    with storch.Graph():  # the surrogate's nodes grow by a few per step (stacking), not a term per cost
        _episode(est, theta, 20)
        more = sum(graph_ops(storch.surrogate_loss()).values())
    per_step = (more - nodes) / 10
    # the rollout's own nodes per step (the distribution, log-probability, cost) and ~2 for stacking
    # (10 when written; a surrogate term per cost adds ~6 more: MagicBox, product, means, sum)
    assert per_step <= 12, per_step


def test_partition_with_a_moving_average_is_not_stacked():
    # the control: a baseline per cost name and step cannot be stacked, and the probe sees it
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    est = storch.estimator("score", plate="a", n_samples=3, baseline="moving_average")
    with storch.Graph():
        _episode(est, theta, 4)
        _, seen = calls(storch.surrogate_loss)
    assert "_steps_surrogate" not in seen and "_cost_surrogate" in seen


def _per_cost_surrogate(graph) -> torch.Tensor:
    """The surrogate cost by cost (no stacking): the reference for the stacked one."""
    from storch.surrogate import _cost_surrogate, cost_nodes
    return sum(_cost_surrogate(cost, cost_nodes(graph, cost), name) for name, cost in graph.costs)


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_partition_cumulative_log_prob_is_one_cumsum(baseline):
    # L_t = l_0 + ... + l_t is not built step by step during the episode (one add per step): the
    # stacked surrogate takes one cumulative sum over the stacked l_t, as the DiCE objective by hand
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    est = storch.estimator("score", plate="a", n_samples=3, baseline=baseline)
    torch.manual_seed(0)
    with storch.Graph() as graph:
        _, seen = calls(lambda: _episode(est, theta, 10))
        assert "_extend_history" not in seen  # nothing summed during the episode
        node = graph.nodes[0]
        assert node.steps_in_place
        loss, seen = calls(storch.surrogate_loss)
        assert "_stacked_cumulative" in seen and "_extend_history" not in seen
        assert graph_ops(loss)["CumsumBackward0"] == 1
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        reference = _per_cost_surrogate(graph)  # reads node.history: L_t step by step
        (g_ref,) = torch.autograd.grad(reference, theta)
        assert torch.allclose(loss, reference) and torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)
        # Node.history and gradient_values: L_t, the log-probability of the prefix up to t
        x = theta.expand(6, 2)
        a_prev = torch.zeros(3, 6)
        total = torch.zeros(3, 6)
        for t, (plates, L) in enumerate(node.history):
            a = node.value.tensor if t == 0 else node.steps[t - 1]
            total = total + Bernoulli(logits=x[..., 0] + a_prev * x[..., 1]).log_prob(a)
            a_prev = a
            assert plates[0].step == t and torch.allclose(L, total)
        assert node.gradient_values is node.history[-1][1]


def test_partition_whose_plates_change_sums_step_by_step():
    # the control: a data plate that joins at step 1 (steps not in place) takes the general path,
    # L_t re-aligned step by step, and the stacked surrogate still equals the per-cost one
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    est = storch.estimator("score", plate="a", n_samples=3)
    torch.manual_seed(0)
    with storch.Graph() as graph:
        x = storch.denote_independent(theta.expand(6, 2), 0, "data")
        a = est(Bernoulli(logits=theta[0]))  # step 0: no data plate
        storch.add_cost(-a, name="r0")
        for t in range(1, 5):
            a = est(Bernoulli(logits=x[..., 0] + a * x[..., 1]))
            storch.add_cost(-(0.9 ** t) * a, name=f"r{t}")
        node = graph.nodes[0]
        assert not node.steps_in_place
        loss, seen = calls(storch.surrogate_loss)
        assert "_extend_history" in seen and "_stacked_cumulative" not in seen
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        reference = _per_cost_surrogate(graph)
        (g_ref,) = torch.autograd.grad(reference, theta)
        assert torch.allclose(loss, reference) and torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["every step", "odd steps", "two costs per step", "data plate first"])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_stacked_cumulative_picks_each_cost_step(layout, baseline):
    # the stacked L holds one column per cost, at its step: costs at some steps only, several
    # costs per step, and the partition's plate after a data plate in the cost
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    est = storch.estimator("score", plate="a", n_samples=3, baseline=baseline)
    torch.manual_seed(1)
    with storch.Graph() as graph:
        x = storch.denote_independent(theta.expand(4, 2), 0, "data")
        a = torch.zeros_like(x[..., 0])
        for t in range(6):
            a = est(Bernoulli(logits=x[..., 0] + a * x[..., 1]))
            cost = -(0.9 ** t) * a + 0.1 * t
            if layout == "data plate first":
                cost = cost + 0.0 * x[..., 0]  # the data plate comes first in the cost's plates
                cost = storch.PlateTensor(align_first(cost, "data"), tuple(sorted(cost.plates, key=lambda p: p.name != "data")))
            if layout != "odd steps" or t % 2:
                storch.add_cost(cost, name=f"r{t}")
            if layout == "two costs per step":
                storch.add_cost(a * 0.5 - 0.2, name=f"s{t}")
        loss, seen = calls(storch.surrogate_loss)
        assert "_stacked_cumulative" in seen
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        reference = _per_cost_surrogate(graph)
        (g_ref,) = torch.autograd.grad(reference, theta)
        assert torch.allclose(loss, reference) and torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)


def align_first(cost, name):
    """The raw tensor of ``cost`` with the plate ``name`` moved to the front."""
    i = [p.name for p in cost.plates].index(name)
    return cost.tensor.movedim(i, 0)


def _step_keeps_graph(est, theta=None) -> bool:
    """Whether storch.backward() kept the step's autograd graph (retain_graph) for the updates: a
    tensor of the step that the caller still holds can be backpropagated again only then."""
    theta = torch.linspace(-1.0, 1.0, 3).repeat(2, 1).requires_grad_(True) if theta is None else theta
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        h = torch.tanh(x)  # on the loss's graph; tanh's backward reads its saved output
        held = h.tensor
        z = est(Bernoulli(logits=h))
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        storch.backward()
    try:
        held.sum().backward()
    except RuntimeError as e:
        assert "second time" in str(e)
        return False
    return True


def test_backward_frees_the_graph_when_every_update_replays_from_detached_tensors():
    # a moving average updates from detached means (replays_update): storch.backward() must not retain
    # the graph for it (retaining held every saved tensor of the backward to the end of the pass: peak
    # memory 1.16-1.24x hand-written on the VAE). An update that may differentiate the loss (any
    # estimator without replays_update, as the protocol promises it the graph) keeps it: the control
    ma = storch.estimator("score", plate="z", n_samples=4, baseline="moving_average")
    assert ma.has_update and ma.replays_update and not ma.update_uses_loss_graph
    assert not _step_keeps_graph(ma)
    assert ma.moving_averages  # the update ran

    class Differentiates(storch.Estimator):
        name = "test_differentiates"
        has_update = True
        grads = []

        def update_parameters(self, nodes, loss):
            self.grads.append(torch.autograd.grad(loss, theta, retain_graph=True)[0])

    theta = torch.linspace(-1.0, 1.0, 3).repeat(2, 1).requires_grad_(True)
    other = Differentiates("z", n_samples=2)
    assert _step_keeps_graph(other, theta)
    assert len(other.grads) == 1 and torch.isfinite(other.grads[0]).all()


def test_one_step_sum_and_sample_has_no_update_and_frees_the_graph():
    # the one-step sum_and_sample keeps no state (its memory is chosen in every graph). Its class says
    # has_update (the registered name's capability: buffer= keeps a memory of sequences), and the
    # instance said so too: storch.backward() then kept the whole graph for an update that did nothing
    # (VAE batch 100: peak memory 1.38 MB against score's 1.00 at the same n), and storch.compile refused it
    one_step = storch.estimator("sum_and_sample", plate="z", n_samples=3, baseline="leave_one_out")
    assert type(one_step).has_update and not one_step.has_update
    assert not _step_keeps_graph(one_step)
    sequences = storch.estimator("sum_and_sample", plate="z", n_samples=3, buffer=2)
    assert sequences.has_update  # the control: the buffer is state, updated on backward


def test_backward_frees_the_graph_for_an_update_that_reads_values_only():
    # sum_and_sample with buffer= updates its buffer of sequences from the step's tokens and costs as
    # values (update_uses_loss_graph = False): storch.backward() frees the graph in its backward pass,
    # though storch.compile cannot replay that update (no replays_update). The buffer still updates
    from torch.distributions import Categorical

    est = storch.estimator("sum_and_sample", plate="seq", n_samples=3, buffer=2, baseline="leave_one_out")
    assert est.has_update and not est.replays_update and est.update_uses_loss_graph is False
    logits = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]], requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(logits, 0, "data")
        h = torch.tanh(x)  # on the loss's graph; tanh's backward reads its saved output
        held = h.tensor
        tokens = []
        for t in range(2):
            y = est(Categorical(logits=h), **({"memory_key": torch.arange(2)} if t == 0 else {}))
            tokens.append(y)
            h = h + y.unsqueeze(-1).float()
        storch.add_cost(h.sum(-1), name="f")
        storch.backward()
    with pytest.raises(RuntimeError, match="second time"):
        held.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert all(len(est._buffer.sequences(key)) > 0 for key in (0, 1))  # the update ran
    # the default (None: not said) keeps the graph unless the update replays: the control above
    # (test_backward_frees_the_graph_when_every_update_replays_from_detached_tensors)
    assert storch.Estimator.update_uses_loss_graph is None


@pytest.mark.parametrize("name, options", [("unordered_set", {}), ("sum_and_sample", {"baseline": "leave_one_out"})])
def test_set_estimators_differentiate_bernoulli_log_probs_from_the_logits(name, options):
    # beyond the budget (20 Bernoullis), the drawn values' log p is one BCE from the logits, not a gather
    # from a log-sigmoid table with gradient (VAE step: unordered_set 52 -> 46, sum_and_sample 71 -> 59
    # autograd nodes). The control: an infinite logit, where BCE would give inf - inf, keeps sum_and_sample's table
    # (the node's distribution is then strict_support's copy, whose log_prob runs BCE on the finite logits only)
    est = storch.estimator(name, plate="z", n_samples=4, **options)

    def log_prob_graph(theta):
        with storch.Graph() as graph:
            est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            return graph_ops(graph.nodes[0].gradient_values)

    theta = torch.linspace(-2.0, 2.0, 20).repeat(2, 1).requires_grad_(True)
    ops = log_prob_graph(theta)
    assert ops["BinaryCrossEntropyWithLogitsBackward0"] == 1 and not ops["GatherBackward0"], ops
    if name == "sum_and_sample":
        with torch.no_grad():
            bad = theta.clone()
            bad[0, 3] = float("inf")
        ops = log_prob_graph(bad.requires_grad_(True))
        assert ops["GatherBackward0"] and ops["WhereBackward0"], ops


# -- a chain of nodes with a cost per node: the running sums L_k are shared by the costs ----------------

def _chain(K, name="score", B=4):
    """A chain of K nodes, one estimator each (n_samples=1), a cost per node: the running sums of the
    costs' gradient functions (storch's surrogate once summed every ancestor's l again for every cost)."""
    a = torch.full((K,), 0.5, requires_grad=True)
    ests = [storch.estimator(name, plate=f"z{k}", n_samples=1) for k in range(K)]
    z = storch.denote_independent(torch.linspace(-1.0, 1.0, B), 0, "data")
    for k in range(K):
        if name == "score":
            z = ests[k](Bernoulli(logits=a[k] * z))
        else:
            z = ests[k](torch.distributions.Normal(a[k] * torch.tanh(z), 1.0))
        storch.add_cost((z - 0.3) ** 2, name=f"c{k}")
    return a


def _surrogate_aligns(monkeypatch):
    """storch.surrogate_loss(), and how many times the surrogate aligned a tensor to a cost's plates."""
    from storch.surrogate import estimates, grouped_baselines, one_node, running_sums, steps, terms  # (those that align)
    count = [0]
    align = terms.align

    def counted(*args, **kwargs):
        count[0] += 1
        return align(*args, **kwargs)
    for module in (terms, running_sums, grouped_baselines, steps, one_node, estimates):
        monkeypatch.setattr(module, "align", counted)
    out = storch.surrogate_loss()
    for module in (terms, running_sums, grouped_baselines, steps, one_node, estimates):
        monkeypatch.setattr(module, "align", align)
    return out, count[0]


def test_chain_surrogate_grows_linearly_with_the_chain(monkeypatch):
    # the DiCE objective by hand keeps one running L = l_1 + ... + l_k: ~12 autograd nodes per node of the
    # chain (482 at K=40); the per-cost sums made K²/2 additions, each l aligned to every cost's plates
    # (K=40: 11921 autograd nodes, 820 aligns of the gradient functions)
    sizes = {}
    for K in (10, 20, 40):
        torch.manual_seed(0)
        with storch.Graph():
            _chain(K)
            loss, aligns = _surrogate_aligns(monkeypatch)
            sizes[K] = sum(graph_ops(loss).values()), aligns
    (n10, a10), (n20, a20), (n40, a40) = sizes[10], sizes[20], sizes[40]
    # linear: doubling the chain adds what the first doubling added (exactly, up to a few nodes)
    assert n40 - n20 <= 2 * (n20 - n10) + 8, sizes
    assert n40 <= 15 * 40, sizes  # the hand-written DiCE graph has 482 nodes
    assert a40 - a20 <= 2 * (a20 - a10) + 8, sizes


def test_pathwise_chain_adds_no_gradient_functions(monkeypatch):
    # a reparameterised node's gradient function is the constant 0: its l - ⊥l is 0 at every order, so
    # the surrogate does not sum (or align) it; K=50 spent most of its 93 ms adding those zeros
    for K in (10, 20):
        torch.manual_seed(0)
        with storch.Graph():
            _chain(K, "reparameterization")
            loss, aligns = _surrogate_aligns(monkeypatch)
        # (the one align: the first cost's, a single node's fast path)
        assert aligns <= 1 and "ExpBackward0" not in graph_ops(loss)


def _old_cost_surrogate(cost, nodes, name, order):
    """The surrogate's term of one cost as it was written before the running sums: every node's l (zeros
    included) added again for this cost at its plates, L_{i-1} for each node (the reference)."""
    from storch.graph.cost_frame import CostFrame, magic_box
    from storch.plates.tensor import align, plates_of, raw_of
    from storch.surrogate import _BASE_CONTROL_VARIATE, _at_cost, _baseline_term, _one_node_surrogate
    plates, raw, nodes = _at_cost(plates_of(cost), raw_of(cost), nodes)
    if len(nodes) == 1:
        return _one_node_surrogate(raw, plates, nodes[0], name, order)
    prefix, total = [], None
    for node in nodes:
        prefix.append(total)
        l_i = align(node.gradient_values, node.plates, plates)
        total = l_i if total is None else total + l_i
    box = magic_box(total)
    inner = box * raw
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        est = node.estimator
        if est.has_control_variate():
            frame = CostFrame(inner.detach(), plates, node, inner, name, None, order)
            if i == len(nodes) - 1 and type(est).control_variate is _BASE_CONTROL_VARIATE:
                inner = _baseline_term(inner, est, node, frame, box, prefix[i])
            else:
                a = est.control_variate(node, frame)
                if a is not None:
                    inner = inner + (a if prefix[i] is None else magic_box(prefix[i]) * a)
        dim = plates.index(node.plate)
        if est.uniform_weights:
            inner = inner.mean(dim, keepdim=True)
        else:
            inner = (align(node.weight_values, node.plates, plates) * inner).sum(dim, keepdim=True)
    return inner.mean()


@pytest.mark.parametrize("order", [1, 2])
def test_shared_running_sums_keep_the_surrogate_and_its_derivatives(order):
    # a chain of mixed estimators (score, reparameterization, score with leave-one-out whose control
    # variate is multiplied by MagicBox(L_{i-1}), a score node downstream of a pathwise one), a cost per
    # node and one cost at two nodes of different branches: the value, the gradient and the Hessian are the
    # plain per-cost sum's
    theta = torch.tensor([0.4, -0.3, 0.7, 0.2, -0.5, 0.1], requires_grad=True)
    torch.manual_seed(3)
    with storch.Graph() as graph:
        x = storch.denote_independent(torch.linspace(-1.0, 1.0, 3), 0, "data")
        z0 = storch.estimator("score", plate="z0", n_samples=2)(Bernoulli(logits=theta[0] + x))
        z1 = storch.estimator("reparameterization", plate="z1", n_samples=1)(
            torch.distributions.Normal(theta[1] * z0, 1.0))
        z2 = storch.estimator("score", plate="z2", n_samples=3, baseline="leave_one_out")(
            Bernoulli(logits=theta[2] * torch.tanh(z1)))
        z3 = storch.estimator("score", plate="z3", n_samples=2, baseline="leave_one_out")(
            Bernoulli(logits=theta[3] * z2 + 0.5 * z1))
        z4 = storch.estimator("reparameterization", plate="z4", n_samples=1)(
            torch.distributions.Normal(theta[4] + z3, 1.0))
        w = storch.estimator("score", plate="w", n_samples=2)(Bernoulli(logits=theta[5] * z1))
        for k, z in enumerate((z0, z1, z2, z3, z4)):
            storch.add_cost((z - 0.3) ** 2, name=f"c{k}")
        storch.add_cost(z4 * w, name="both")
        storch.add_cost(torch.sin(z3 + z1) * (1 + w), name="branches")
        loss = storch.surrogate_loss(order=order)
        ref = sum(_old_cost_surrogate(c, storch.surrogate.cost_nodes(graph, c), n, order) for n, c in graph.costs)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (g_ref,) = torch.autograd.grad(ref, theta, create_graph=True)
        assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-7)
        assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-6)
        if order == 2:
            h = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(6)])
            h_ref = torch.stack([torch.autograd.grad(g_ref[i], theta, retain_graph=True)[0] for i in range(6)])
            assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-6)
            assert h.abs().sum() > 0


@pytest.mark.parametrize("name, options", [("score", {"baseline": "none"}), ("score", {"baseline": "greedy"}),
                                           ("unordered_set", {})])
def test_first_party_partition_steps_take_their_own_extend(name, options):
    # the partition estimators of this family override extend with their components written into it
    # (greedy decoding, stochastic beam search): a later step runs it, not the path made from the
    # components that an estimator without partition hooks gets (storch.estimators.partition_steps._components_step)
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    est = storch.estimator(name, plate="a", n_samples=3, **options)
    with storch.Graph():
        a = est(Bernoulli(logits=theta[0]))
        _, seen = calls(lambda: est(Bernoulli(logits=theta[1] + a)))
    assert "extend" in seen and "_components_step" not in seen and "proposal" not in seen


def test_no_first_party_partition_estimator_is_refused_or_made_from_its_components():
    # the per-component rule (each overridden component paired with its own partition hook in the same class
    # or a subclass) keeps every installed first-party estimator with partitions on its own extend
    from storch.estimators.partition_paths import _BY_EXTEND, _partition_path

    classes = {storch.get_estimator_class(name) for name in storch.available_estimators()}
    partitions = sorted((c for c in classes if c.supports_partitions), key=lambda c: c.name)
    assert {"reparameterization", "score", "unordered_set"} <= {c.name for c in partitions}
    for cls in partitions:
        assert _partition_path(cls) == _BY_EXTEND, cls.name


# what the common step's surrogate (one node, one cost downstream of it, order 1) skips once an earlier step of its
# estimator settled the checks: the general path's per-cost and per-node loops (loss._one_node_loss)
_GENERAL_SURROGATE = {"_unchecked", "_cost_surrogate", "_check_order", "_check_smooth",
                      "_check_reaches", "_guard_low_order", "_at_cost", "cost_nodes"}


def _toy_step(est, theta, seed: int, order: int = 1, extra_cost: Optional[str] = None, data_cost: bool = False):
    torch.manual_seed(seed)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        z = est(Bernoulli(logits=x))
        if data_cost:  # a cost of the data alone before the node's (a VAE's KL term), and a plain tensor after
            storch.add_cost((torch.sigmoid(x) ** 2).sum(-1), name="kl")
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        if data_cost:
            storch.add_cost(theta.sum() * 0.01, name="reg")
        if extra_cost is not None:
            storch.add_cost((0.1 * z).sum(-1), name=extra_cost)
        loss, seen = calls(lambda: storch.surrogate_loss(order=order))
        assert isinstance(loss, torch.Tensor)
        (grad,) = torch.autograd.grad(loss, theta)
    return loss, grad, seen, graph_ops(loss)


@pytest.mark.parametrize("data_cost", [False, True])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average"])
def test_common_step_surrogate_skips_the_general_loops(baseline, data_cost, monkeypatch):
    """One node and one cost downstream of it (and costs of the data alone) at order 1: after the first step (which
    settles, per estimator, that its gradient flows through no sample it hands out) the surrogate is built without
    the per-cost and per-node checks; the loss, its gradient and its autograd graph are bitwise those of the
    general path (forced below). A second cost downstream of the node of the same name (the general path may
    keep their state under per-plate names, or warns), and order 2, take the general path, and the probe sees it
    there; one of another name stays on the common path (_many_costs_loss)."""
    from storch.surrogate import loss as surrogate_module

    theta = torch.linspace(-1.0, 1.0, 3).repeat(2, 1).requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
    _, _, first, _ = _toy_step(est, theta, 0, data_cost=data_cost)
    assert "_check_reaches" in first  # the first step settles the checks on the general path
    loss, grad, seen, ops = _toy_step(est, theta, 1, data_cost=data_cost)
    assert not seen & _GENERAL_SURROGATE, sorted(seen & _GENERAL_SURROGATE)
    assert "_one_node_loss" in seen and "_one_node_surrogate" in seen
    # controls: a second cost of the same name, order 2
    with pytest.warns(UserWarning, match="two costs named 'f'"):
        _, _, seen2, _ = _toy_step(est, theta, 2, extra_cost="f")
    # (the general path: its order-1 checks are asked per node, _needy_nodes, and skipped for the settled one)
    assert {"_unchecked", "_needy_nodes", "_cost_surrogate", "_guard_low_order"} <= seen2
    _, _, seen2, _ = _toy_step(est, theta, 2, extra_cost="g")
    assert not seen2 & _GENERAL_SURROGATE and "_many_costs_loss" in seen2
    _, _, seen3, _ = _toy_step(est, theta, 3, order=2)
    assert {"_unchecked", "_check_order", "_guard_low_order"} <= seen3
    # the same step through the general path: the same loss, gradient and autograd graph
    monkeypatch.setattr(surrogate_module, "_one_node_loss", lambda graph: None)
    loss_g, grad_g, seen_g, ops_g = _toy_step(est, theta, 1, data_cost=data_cost)
    assert "_needy_nodes" in seen_g and "_cost_surrogate" in seen_g
    if baseline != "moving_average":  # (a moving average moved between the steps: values differ, graphs not)
        assert torch.equal(loss, loss_g) and torch.equal(grad, grad_g)
    assert ops == ops_g


def test_common_step_surrogate_still_refuses_what_the_general_path_refuses():
    """Where the common step's surrogate would skip a check that acts, it leaves the step to the general path:
    samples changed in place, a NaN cost (refused on backward), a node sampled under no_grad, a cost that does
    not carry the node's plate (warned: no cost is downstream of it)."""
    theta = torch.zeros(2, 3, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4)
    _toy_step(est, theta, 0)  # settles the estimator's checks: later steps may take the common path
    with storch.Graph():
        z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
        cost = ((z - 0.45) ** 2).sum(-1)
        z.mul_(2)
        storch.add_cost(cost, name="f")
        with pytest.raises(storch.StorchError, match="changed in place"):
            storch.surrogate_loss()
    with storch.Graph():
        z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
        storch.add_cost(((z - 0.45) ** 2).sum(-1) * float("nan"), name="f")
        loss = storch.surrogate_loss()
        with pytest.raises(storch.NonFiniteCostError, match="cost 'f' is not finite"):
            torch.autograd.grad(loss, theta)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        with torch.no_grad():
            z = est(Bernoulli(logits=x))
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        with pytest.raises(storch.StorchError, match="sampled under torch.no_grad"):
            storch.surrogate_loss()
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        z = est(Bernoulli(logits=x))
        storch.add_cost((x * 0.0).sum(-1) + ((z.tensor - 0.45) ** 2).sum().detach(), name="f")
        with pytest.warns(storch.UnusedSampleWarning):
            storch.surrogate_loss()


def test_a_step_the_common_path_declines_is_asked_once(monkeypatch):
    """A one-node step that the common path declines (a pathwise node: its cost's path is checked) is built by the
    general path without asking the common path a second time (surrogate_loss, then _surrogate_loss)."""
    from torch.distributions import Normal

    from storch.surrogate import loss as surrogate_module

    asked = []
    real = surrogate_module._one_node_loss
    monkeypatch.setattr(surrogate_module, "_one_node_loss", lambda graph: asked.append(1) or real(graph))
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    mu = torch.zeros(2, 3, requires_grad=True)
    for _ in range(2):
        asked.clear()
        with storch.Graph():
            z = est(Normal(storch.denote_independent(mu, 0, "data"), 1.0))
            storch.add_cost((z ** 2).sum(-1), name="f")
            loss, seen = calls(storch.surrogate_loss)
        assert asked == [1] and "_check_smooth" in seen
        assert isinstance(loss, torch.Tensor)



def _many_costs_step(est, theta, seed: int, costs: int = 4, order: int = 1, plates: bool = False,
                     same_name: bool = False, plain: bool = False):
    """One node with ``costs`` costs downstream of it (names c0, c1, ...; ``plates``: the odd ones carry a second
    data plate, so two sets of plates; ``plain``: the second added with credit=False), a cost of the data alone
    among them."""
    torch.manual_seed(seed)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        extra = storch.denote_independent(torch.linspace(1.0, 2.0, 3), 0, "extra")
        z = est(Bernoulli(logits=x))
        for i in range(costs):
            c = ((z - 0.1 * (i + 1)) ** 2 * (1.0 + x)).sum(-1)
            if plates and i % 2:
                c = c * extra
            storch.add_cost(c, name="c" if same_name else f"c{i}", credit=not (plain and i == 1))
            if i == 1:
                storch.add_cost((torch.sigmoid(x) ** 2).sum(-1), name="kl")
        loss, seen = calls(lambda: storch.surrogate_loss(order=order))
        assert isinstance(loss, torch.Tensor)
        (grad,) = torch.autograd.grad(loss, theta)
    return loss, grad, seen, graph_ops(loss)


@pytest.mark.parametrize("plates", [False, True])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average"])
def test_many_costs_of_one_node_share_its_score_term(baseline, plates, monkeypatch):
    """Several costs downstream of one node (a loss in several terms, a reward per step without a partition): after
    the first step, the common path builds them (_many_costs_loss) with one MagicBox(l) per set of plates, not one
    per cost; without a control variate the costs of one set of plates are one term, MagicBox(l) · Σ C_i (as by
    hand). The loss and gradient are those of the general path (forced below; allclose: summed in another order),
    whose costs of one node share the MagicBox too. Controls: two costs of one name, order 2, a cost with
    credit=False take the general path."""
    from storch.surrogate import loss as surrogate_module

    theta = torch.linspace(-1.0, 1.0, 3).repeat(2, 1).requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
    _many_costs_step(est, theta, 0, plates=plates)  # settles the estimator's checks
    loss, grad, seen, ops = _many_costs_step(est, theta, 1, plates=plates)
    assert "_many_costs_loss" in seen and not seen & _GENERAL_SURROGATE, sorted(seen & _GENERAL_SURROGATE)
    groups = 2 if plates else 1
    assert ops["ExpBackward0"] == groups  # one MagicBox per set of plates (4 costs)
    if baseline == "none":  # one score term per set of plates
        assert ops["MeanBackward0"] == groups + 1  # (+ the cost of the data alone)
    # controls: two costs of one name, order 2, credit=False
    with pytest.warns(UserWarning, match="two costs named 'c'"):
        _, _, seen2, _ = _many_costs_step(est, theta, 2, same_name=True)
    assert "_many_costs_loss" not in seen2 and "_cost_surrogate" in seen2
    _, _, seen3, _ = _many_costs_step(est, theta, 3, order=2)
    assert "_many_costs_loss" not in seen3 and "_check_order" in seen3
    _, _, seen4, _ = _many_costs_step(est, theta, 4, plain=True)
    assert "_many_costs_loss" not in seen4 and "_plain_surrogate" in seen4
    # the same step through the general path: one MagicBox per set of plates there too, the same loss and gradient
    monkeypatch.setattr(surrogate_module, "_one_node_loss", lambda graph: None)
    loss_g, grad_g, seen_g, ops_g = _many_costs_step(est, theta, 1, plates=plates)
    assert "_cost_surrogate" in seen_g and ops_g["ExpBackward0"] == groups
    if baseline != "moving_average":  # (a moving average moved between the steps)
        torch.testing.assert_close(loss, loss_g, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, grad_g, rtol=1e-6, atol=1e-7)
        if baseline == "leave_one_out":  # each cost keeps its term: the same values, summed in the same order
            assert torch.equal(loss, loss_g)


def test_many_costs_of_one_node_by_hand():
    """The common path's surrogate of several costs of one node without a baseline is the DiCE objective with the
    costs summed (first and second derivatives, against a hand-written one with the same samples)."""
    theta = torch.linspace(-1.0, 1.0, 3).repeat(2, 1).requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=4)
    _many_costs_step(est, theta, 0)
    _, _, seen, _ = _many_costs_step(est, theta, 1, costs=3)
    assert "_many_costs_loss" in seen
    torch.manual_seed(1)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        storch.denote_independent(torch.linspace(1.0, 2.0, 3), 0, "extra")
        z = est(Bernoulli(logits=x))
        for i in range(3):
            storch.add_cost(((z - 0.1 * (i + 1)) ** 2 * (1.0 + x)).sum(-1), name=f"c{i}")
        loss = storch.surrogate_loss()
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), theta)
    torch.manual_seed(1)
    d = Bernoulli(logits=theta)
    zz = d.sample((4,))
    box = magic_box(d.log_prob(zz).sum(-1))
    hand = sum((box * ((zz - 0.1 * (i + 1)) ** 2 * (1.0 + theta)).sum(-1)).mean() for i in range(3))
    (gh,) = torch.autograd.grad(hand, theta, create_graph=True)
    (hh,) = torch.autograd.grad(gh.sum(), theta)
    torch.testing.assert_close(loss, hand.detach())
    torch.testing.assert_close(g, gh)
    torch.testing.assert_close(h, hh)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_many_costs_of_low_precision_are_summed_in_the_magic_box_dtype(dtype, monkeypatch):
    """bf16 / fp16 costs of one node (a reward head under autocast) are promoted to MagicBox(l)'s dtype before the
    common path sums them, as the general path's MagicBox(l) · C_i promotes each: summed in bf16, 300 + 0.5 z is 300
    and the small cost's score term was lost (review r-ten: its gradient 0.0 for an exact 0.0625). Same gradient as
    the general path."""
    from storch.surrogate import loss as surrogate_module

    theta = torch.zeros(2, 3, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4)

    def grad(seed: int, small: bool = True):
        torch.manual_seed(seed)
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost((300.0 + 0.0 * z.sum(-1)).to(dtype), name="big")
            if small:
                storch.add_cost((0.5 * z[..., 0]).to(dtype), name="small")
            loss, seen = calls(storch.surrogate_loss)
            assert isinstance(loss, torch.Tensor)
            return torch.autograd.grad(loss, theta)[0], seen

    grad(0)  # settles the estimator's checks
    fast = [grad(s) for s in range(1, 9)]
    assert all("_many_costs_loss" in seen for _, seen in fast)
    small_share = torch.stack([g - grad(s, small=False)[0] for s, (g, _) in zip(range(1, 9), fast)])
    assert small_share.abs().sum() > 0  # the small cost's term is there
    monkeypatch.setattr(surrogate_module, "_one_node_loss", lambda graph: None)
    for s, (g, _) in zip(range(1, 9), fast):
        torch.testing.assert_close(g, grad(s)[0], rtol=1e-5, atol=1e-6)


def _decoder_step(est, w, seed: int, cost_at: Optional[int] = None, dtype=torch.float32, steps: int = 4):
    """A partition over a sequence (an autoregressive decoder: each token's Categorical read from the state the
    previous token updated) and one cost of the final state (its last step: a reconstruction, a terminal reward);
    ``cost_at``: the cost of the state after that step instead (earlier steps reach no cost)."""
    torch.manual_seed(seed)
    with storch.Graph():
        x = storch.denote_independent(torch.linspace(-1.0, 1.0, 6).view(2, 3), 0, "data")
        h = torch.tanh(x @ w[:3])
        states = []
        for _ in range(steps):
            tok = est(torch.distributions.OneHotCategorical(logits=h))
            h = torch.tanh(h + tok @ w[3:])
            states.append(h)
        final = states[-1 if cost_at is None else cost_at]
        storch.add_cost(((final - 0.3) ** 2).sum(-1).to(dtype), name="rec")
        loss, seen = calls(storch.surrogate_loss)
        assert isinstance(loss, torch.Tensor)
        (grad,) = torch.autograd.grad(loss, w)
    return loss, grad, seen, graph_ops(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average"])
def test_partition_with_one_cost_at_its_last_step_skips_the_general_loops(baseline, dtype, monkeypatch):
    """A partition (one estimator called at every step of a sequence) with one cost at its last step (the GRU
    decoder of `storch-compare overhead --problems rnn`): after the first step settles the estimator's checks, the
    surrogate is built without the general path's per-cost and per-node loops (one_node._last_step_loss); the loss, its
    gradient and its autograd graph are bitwise those of the general path (forced below). Controls: a cost of an
    earlier step (the last steps reach no cost: the general path, and its warning), order 2."""
    from storch.surrogate import one_node as surrogate_module

    w = (0.5 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    est = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
    _, _, first, _ = _decoder_step(est, w, 0, dtype=dtype)
    assert "_check_reaches" in first  # the first step settles the checks on the general path
    loss, grad, seen, ops = _decoder_step(est, w, 1, dtype=dtype)
    assert "_last_step_loss" in seen and "_one_node_surrogate" in seen
    assert not seen & _GENERAL_SURROGATE, sorted(seen & _GENERAL_SURROGATE)
    # controls: a cost of step 1 of 4 (steps 2-3 reach no cost: warned), order 2
    with pytest.warns(storch.UnusedSampleWarning, match="no cost carries its plate at a step after 1"):
        _, _, seen2, _ = _decoder_step(est, w, 2, cost_at=1, dtype=dtype)
    assert {"_unchecked", "_at_cost", "_cost_surrogate"} <= seen2
    with storch.Graph():
        torch.manual_seed(3)
        x = storch.denote_independent(torch.linspace(-1.0, 1.0, 6).view(2, 3), 0, "data")
        tok = est(torch.distributions.OneHotCategorical(logits=torch.tanh(x @ w[:3])))
        tok = est(torch.distributions.OneHotCategorical(logits=torch.tanh(tok @ w[3:])))
        storch.add_cost((tok ** 2).sum(-1), name="rec")
        _, seen3 = calls(lambda: storch.surrogate_loss(order=2))
    assert {"_unchecked", "_check_order", "_guard_low_order"} <= seen3
    # the same step through the general path: the same loss, gradient and autograd graph
    monkeypatch.setattr(surrogate_module, "_last_step_loss", lambda graph, node, est: None)
    loss_g, grad_g, seen_g, ops_g = _decoder_step(est, w, 1, dtype=dtype)
    assert "_last_step_loss" not in seen_g and "_at_cost" in seen_g and "_cost_surrogate" in seen_g
    if baseline != "moving_average":  # (a moving average moved between the steps: values differ, graphs not)
        assert torch.equal(loss, loss_g) and torch.equal(grad, grad_g)
    assert ops == ops_g



def _decoder_training_step(est, w, seed: int, dtype) -> tuple:
    """:func:`_decoder_step` as a training step: ``loss.backward()`` (``torch.autograd.grad`` runs no estimator update),
    so a moving average moves once per step."""
    torch.manual_seed(seed)
    w.grad = None
    with storch.Graph():
        x = storch.denote_independent(torch.linspace(-1.0, 1.0, 6).view(2, 3), 0, "data")
        h = torch.tanh(x @ w[:3])
        for _ in range(4):
            h = torch.tanh(h + est(torch.distributions.OneHotCategorical(logits=h)) @ w[3:])
        storch.add_cost(((h - 0.3) ** 2).sum(-1).to(dtype), name="rec")
        loss, seen = calls(storch.surrogate_loss)
        loss.backward()
    return loss.detach(), w.grad.clone(), seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_partition_fast_path_moves_a_moving_average_as_the_general_path_does(dtype, monkeypatch):
    """The test above compares a moving average's graph only (its estimator's baseline moves between the two steps it
    compares). Two estimators in lockstep, one stepping through one_node._last_step_loss and one through the general
    path, on the same draws: their losses and gradients equal bitwise at every step, so the baseline read and its
    update (once per step, on the backward pass) are the general path's (review r-35)."""
    from storch.surrogate import one_node

    w = (0.5 * torch.randn(6, 3, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    fast, general, frozen = (storch.estimator("score", plate="z", n_samples=4, baseline="moving_average")
                             for _ in range(3))
    real = one_node._last_step_loss
    for seed in range(4):
        loss, grad, seen = _decoder_training_step(fast, w, seed, dtype)
        assert seed == 0 or "_last_step_loss" in seen
        monkeypatch.setattr(one_node, "_last_step_loss", lambda graph, node, est: None)
        loss_g, grad_g, seen_g = _decoder_training_step(general, w, seed, dtype)
        monkeypatch.setattr(one_node, "_last_step_loss", real)
        assert "_last_step_loss" not in seen_g and "_cost_surrogate" in seen_g
        assert torch.equal(loss, loss_g) and torch.equal(grad, grad_g)
    # the control: an estimator that stepped once (its average moved once) gives another gradient at the last draw,
    # so an update too many or too few on either path shows above
    _decoder_training_step(frozen, w, 0, dtype)
    assert not torch.equal(grad, _decoder_training_step(frozen, w, seed, dtype)[1])


class _ControlVariateOverridden(storch_score.Score):
    """The base class's control variate (1 - MagicBox(l)) ⊥b through an override: the surrogate's general path."""

    reads_baseline_option = True

    def control_variate(self, node, cost):
        return storch.Estimator.control_variate(self, node, cost)


def _two_node_step(theta, first, options, order):
    """z2 in z1's plate, one baseline each (z1's estimator of class ``first``); the surrogate, its gradient (and
    Hessian), the calls it made and its autograd graph."""
    e1 = first(plate="z1", n_samples=3, **options)
    e2 = storch_score.Score(plate="z2", n_samples=2, **options)
    for step in range(2):  # the moving average's first step sets it; the second reads it
        torch.manual_seed(11 + step)
        with storch.Graph():
            x = storch.denote_independent(torch.tensor([0.0, 1.0, 1.0, 0.0]), 0, "data")
            z1 = e1(Bernoulli(logits=theta[0] + theta[1] * x))
            z2 = e2(Bernoulli(logits=theta[2] * z1 - theta[3]))
            storch.add_cost((z1 + 2 * z2 - 0.7 * x) ** 2, name="f")
            if step == 0:
                storch.backward()
                continue
            loss, seen = calls(lambda: storch.surrogate_loss(order=order))
            (g,) = torch.autograd.grad(loss, theta, create_graph=order > 1)
            h = (torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(4)])
                 if order > 1 else None)
            return loss.detach(), g.detach(), h, seen, graph_ops(loss)


@pytest.mark.parametrize("baseline", ["leave_one_out", "moving_average"])
def test_two_nodes_with_baselines_share_the_first_nodes_magic_box(baseline):
    # z2 in z1's plate, each with the base class's control variate: z2's term reads MagicBox(L_1) = MagicBox(l_1),
    # z1's own (1 - MagicBox(l_1)) ⊥b the same function of the same tensor; at order 1 built once (two MagicBoxes,
    # not three: a view, a sub and an exp fewer, forward and backward). The same values and gradients, bitwise, as
    # the general path (z1's estimator overrides control_variate with the base formula: its own MagicBox)
    theta = torch.tensor([0.3, -0.8, 1.1, 0.4], requires_grad=True)
    options = {"baseline": baseline}
    loss, g, _, seen, ops = _two_node_step(theta, storch_score.Score, options, 1)
    loss_r, g_r, _, seen_r, ops_r = _two_node_step(theta, _ControlVariateOverridden, options, 1)
    assert "_base_control_variate" in seen and "_shared_box" in seen
    assert "_base_control_variate" not in seen_r and "control_variate" in seen_r  # the control: general path
    assert ops["ExpBackward0"] == 2 and ops_r["ExpBackward0"] == 3
    assert ops_r - ops == {"ExpBackward0": 1, "SubBackward0": 1, "UnsqueezeBackward0": 1} and not ops - ops_r
    assert torch.equal(loss, loss_r) and torch.equal(g, g_r) and g.abs().sum() > 0


@pytest.mark.parametrize("baseline", ["leave_one_out", "moving_average"])
def test_two_nodes_with_baselines_at_order_2_keep_both_magic_boxes(baseline):
    # at order 2 the shared box would give the same Hessian up to the order of a sum (the last bit): the general
    # path's graph is kept, so the derivatives are those of before, bitwise
    theta = torch.tensor([0.3, -0.8, 1.1, 0.4], requires_grad=True)
    options = {"baseline": baseline}
    loss, g, h, seen, ops = _two_node_step(theta, storch_score.Score, options, 2)
    loss_r, g_r, h_r, _, ops_r = _two_node_step(theta, _ControlVariateOverridden, options, 2)
    assert "_base_control_variate" not in seen and "_shared_box" not in seen
    assert ops == ops_r and ops["ExpBackward0"] == 3
    assert torch.equal(loss, loss_r) and torch.equal(g, g_r) and torch.equal(h, h_r) and h.abs().sum() > 0


def _shaped_step(theta, first, shape, order=1):
    """The shapes of graph that reach the shared MagicBox (review r-44): three nodes with baselines in a chain, and
    z1, a pathwise node zp (passive: left out of the running sums) and z2, one cost. z1's estimator of class
    ``first``; the surrogate's gradient over 3 steps (the moving average set, then read) and the calls made."""
    e1 = first(plate="z1", n_samples=3, baseline="moving_average")
    e2 = storch_score.Score(plate="z2", n_samples=2, baseline="leave_one_out")
    e3 = (storch_score.Score(plate="z3", n_samples=2, baseline="leave_one_out") if shape == "three" else
          storch.estimator("reparameterization", plate="zp", n_samples=2))
    grads, seen = [], set()
    for step in range(3):
        torch.manual_seed(21 + step)
        with storch.Graph():
            x = storch.denote_independent(torch.tensor([0.0, 1.0, 1.0, 0.0]), 0, "data")
            z1 = e1(Bernoulli(logits=theta[0] + theta[1] * x))
            if shape == "three":
                z2 = e2(Bernoulli(logits=theta[2] * z1 - theta[3]))
                z3 = e3(Bernoulli(logits=theta[4] * z2 + theta[5] * z1))
                cost = (z1 + 2 * z2 - 0.7 * x) ** 2 + 1.5 * z3
            else:
                zp = e3(torch.distributions.Normal(theta[4] + 0 * z1, 1.0))
                z2 = e2(Bernoulli(logits=theta[2] * z1 - theta[3] + 0.1 * zp))
                cost = (z1 + 2 * z2 - 0.7 * x) ** 2 + 0.3 * zp ** 2
            storch.add_cost(cost, name="f")
            loss, s = calls(lambda: storch.surrogate_loss(order=order))
            seen |= set(s)
            (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
            grads.append(g)
            storch.backward()
    return torch.stack(grads), seen


@pytest.mark.parametrize("shape", ["three", "passive_between"])
def test_shared_magic_box_gives_the_general_paths_gradient_in_other_shapes(shape):
    # the shared box changes only the order in which l_1's uses are summed (a + (b + c), not (a + b) + c): the
    # gradient of the general path up to rounding (here not always bitwise: 1 ulp in float32, review r-44)
    theta = torch.tensor([0.3, -0.8, 1.1, 0.4, 0.2, -0.5], requires_grad=True)
    g, seen = _shaped_step(theta, storch_score.Score, shape)
    g_r, seen_r = _shaped_step(theta, _ControlVariateOverridden, shape)
    assert "_base_control_variate" in seen and "_base_control_variate" not in seen_r  # (z1's own box: general)
    assert g.abs().sum() > 0
    torch.testing.assert_close(g, g_r, rtol=1e-6, atol=1e-6)
