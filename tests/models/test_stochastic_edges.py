"""A graph network with a Bernoulli per edge of a small fixed graph: which edges carry messages is sampled.

A PyG-style graph: node features ``x (N, d)``, a fixed ``edge_index (2, M)`` (source row, target row), node labels.
Each edge is kept with probability σ(θ_e) (one Bernoulli node, its M elements sampled jointly); one message-passing
layer sends ``b_e · x_src W`` along the kept edges, sums the messages at each target (``index_add``, ``scatter_add``,
``scatter_reduce``, a dense adjacency built by ``index_put``, or the kept edges' ids compacted by ``nonzero_static``
into a padded list), normalises by the sampled in-degree plus one
(``scatter_add`` / ``bincount(weights=)``), and a linear head classifies every node. Cost: the nodes' summed
cross-entropy plus 0.1 per kept edge. Written once for one sample of the edges; a batch of graphs goes on a data
plate, with edge logits scored from the features of each edge's two nodes.

(a) the aggregations agree and equal a loop over plate entries; selecting the kept edges (``edge_index[:, b.bool()]``,
``masked_select``, ``nonzero``) is refused with advice that works (the mask as a weight); (b) gradients z-tested
against enumeration of the 2^M edge sets (order 1; order 2 for score); gumbel straight-through (biased) runs with
the right shapes; (c) a few training steps lower the expected cost.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

import storch
import storch.testing as kit
from model_checks import assert_per_entry, lift, train_exact

N, D, C = 3, 2, 2
EDGE_INDEX = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 2]])
M = EDGE_INDEX.shape[1]
F64 = torch.float64
_g = torch.Generator().manual_seed(1)
X = torch.randn(N, D, generator=_g, dtype=F64)
LABELS = torch.tensor([0, 1, 1])
THETA = 0.7 * torch.randn(M + D * D + D * C, generator=_g, dtype=F64)
PRICE = 0.1


def unpack(theta):
    """θ -> edge logits (M,), message weights (d, d), head (d, C)."""
    return theta[:M], theta[M:M + D * D].reshape(D, D), theta[M + D * D:].reshape(D, C)


# -- the layer for ONE sample of the edges b (M,) -------------------------------------------------------------------


def _sum_index_add(msg, dst):
    return torch.zeros(N, D, dtype=msg.dtype).index_add(0, dst, msg)


def _sum_scatter_add(msg, dst):
    return torch.zeros(N, D, dtype=msg.dtype).scatter_add(0, dst.unsqueeze(-1).expand(M, D), msg)


def _sum_scatter_reduce(msg, dst):
    return torch.zeros(N, D, dtype=msg.dtype).scatter_reduce(0, dst.unsqueeze(-1).expand(M, D), msg, reduce="sum")


def _sum_kept_edges(msg, dst, b):
    """The kept edges compacted to a fixed-size list (nonzero_static), padded with a dummy target N."""
    kept = torch.nonzero_static(b, size=M, fill_value=M).squeeze(-1)  # kept edge ids, then M (padding)
    dst_pad = torch.cat([dst, dst.new_tensor([N])])
    msg_pad = torch.cat([msg, msg.new_zeros(1, D)])
    return torch.zeros(N + 1, D, dtype=msg.dtype).index_add(0, dst_pad[kept], msg_pad[kept])[:N]


AGGREGATE = {"index_add": _sum_index_add, "scatter_add": _sum_scatter_add, "scatter_reduce": _sum_scatter_reduce}


def node_logits(theta, b, aggregate="index_add", x=X):
    _, w, head = unpack(theta)
    src, dst = EDGE_INDEX
    h = x @ w
    if aggregate == "dense":  # A[dst, src] = b_e, then A @ h
        agg = torch.zeros(N, N, dtype=b.dtype).index_put((dst, src), b, accumulate=True) @ h
        degree = torch.bincount(dst, weights=b, minlength=N)
    elif aggregate == "kept_edges":  # the unweighted messages of the kept edges only
        agg = _sum_kept_edges(h[src], dst, b)
        degree = torch.zeros(N, dtype=b.dtype).scatter_add(0, dst, b)
    else:
        agg = AGGREGATE[aggregate](b.unsqueeze(-1) * h[src], dst)
        degree = torch.zeros(N, dtype=b.dtype).scatter_add(0, dst, b)
    return torch.tanh((h + agg) / (1 + degree).unsqueeze(-1)) @ head


def gnn_cost(theta, b, aggregate="index_add", x=X, labels=LABELS):
    return F.cross_entropy(node_logits(theta, b, aggregate, x), labels, reduction="sum") + PRICE * b.sum()


def edge_logits(theta, x):
    """θ_e plus an edge score from the features of its two nodes (a batch of graphs: each its own logits)."""
    src, dst = EDGE_INDEX
    return unpack(theta)[0] + (x[src] * x[dst]).sum(-1)


def exact(theta):
    """E[cost] by enumeration of the 2^M edge sets."""
    logits = unpack(theta)[0]
    total = theta.new_zeros(())
    for bs in itertools.product((0.0, 1.0), repeat=M):
        b = torch.tensor(bs, dtype=F64)
        total = total + Bernoulli(logits=logits).log_prob(b).sum().exp() * gnn_cost(theta, b)
    return total


def edge_model(aggregate):
    def build(make, theta):
        b = make("edges")(Bernoulli(logits=unpack(theta)[0]))
        storch.add_cost(gnn_cost(theta, b, aggregate), name="nodes")

    return kit.Model(f"gnn[{aggregate}]", THETA, build, exact, lambda: [Bernoulli(logits=unpack(THETA)[0])])


# -- (a) it runs as written ---------------------------------------------------------------------------------------


def test_aggregations_agree_and_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    b = lift(torch.bernoulli(torch.full((3, 2, M), 0.5, dtype=F64)))
    theta = lift(THETA.expand(3, 2, -1).clone())
    for aggregate in [*AGGREGATE, "dense", "kept_edges"]:
        assert_per_entry(lambda th, bb, a=aggregate: gnn_cost(th, bb, a), theta, b, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(gnn_cost(theta, b, aggregate).tensor, gnn_cost(theta, b).tensor)
    # other aggregations a user writes: a mean over the in-edges, a max over the kept messages
    dst = EDGE_INDEX[1].unsqueeze(-1).expand(M, D)
    assert_per_entry(lambda bb: torch.zeros(N, D, dtype=F64).scatter_reduce(0, dst, bb.unsqueeze(-1) * X[EDGE_INDEX[0]],
                                                                             reduce="mean", include_self=False), b)
    assert_per_entry(lambda bb: torch.zeros(N, D, dtype=F64).scatter_reduce(
        0, dst, torch.where(bb.unsqueeze(-1).bool(), X[EDGE_INDEX[0]], -9.0), reduce="amax"), b)


def test_selecting_the_kept_edges_is_refused_with_advice_that_works():
    est = storch.estimator("score", plate="edges", n_samples=3)
    theta = THETA.clone()
    with storch.Graph():
        b = est(Bernoulli(logits=unpack(theta)[0]))
        with pytest.raises(storch.PlateError, match=r"torch\.where\(mask, x, other\)"):
            EDGE_INDEX[:, b.bool()]  # PyG's subgraph by an edge mask
        with pytest.raises(storch.PlateError, match=r"keep the mask as a weight"):
            torch.masked_select(EDGE_INDEX[1], b.bool())
        with pytest.raises(storch.PlateError, match=r"torch\.where\(mask, x, other\)"):
            b.nonzero()
        buffer = torch.zeros(N, D, dtype=F64)
        with pytest.raises(storch.PlateError, match=r"x = x\.index_add\(\.\.\.\) instead of x\.index_add_"):
            buffer.index_add_(0, EDGE_INDEX[1], b.unsqueeze(-1) * X[EDGE_INDEX[0]])
        # the advice: every edge, its message weighted by b (or torch.where), out of place
        src, dst = EDGE_INDEX
        weighted = buffer.index_add(0, dst, b.unsqueeze(-1) * X[src])
        where = buffer.index_add(0, dst, torch.where(b.bool().unsqueeze(-1), X[src], 0.0))
        torch.testing.assert_close(weighted.tensor, where.tensor)
        # a fixed-size edge list padded with a dummy node N is per-sample too
        kept = torch.nonzero_static(b, size=M, fill_value=M).squeeze(-1)
        padded = torch.cat([dst, torch.tensor([N])])[kept]
        assert kept.plates == b.plates and padded.shape == (M,)


@pytest.mark.parametrize("aggregate", [*AGGREGATE, "dense", "kept_edges"])
def test_score_leave_one_out_is_unbiased_at_orders_one_and_two(aggregate):
    kit.check_against_enumeration("score", models=[edge_model(aggregate)], orders=(0, 1, 2), n_replicates=2000,
                                  options={"n_samples": 3, "baseline": "leave_one_out"})


# a batch of two graphs (same edges, their own features and labels) on a data plate, as a loader hands them
XS = torch.randn(2, N, D, generator=_g, dtype=F64)
YS = torch.tensor([[0, 1, 1], [1, 1, 0]])


def exact_batch(theta):
    total = theta.new_zeros(())
    for x, y in zip(XS, YS):
        for bs in itertools.product((0.0, 1.0), repeat=M):
            b = torch.tensor(bs, dtype=F64)
            p = Bernoulli(logits=edge_logits(theta, x)).log_prob(b).sum().exp()
            total = total + p * gnn_cost(theta, b, "index_add", x, y)
    return total / len(XS)  # a data plate is reduced by the mean


def batch_model():
    def build(make, theta):
        x, y = storch.denote_independent((XS, YS), 0, "graphs")
        b = make("edges")(Bernoulli(logits=edge_logits(theta, x)))
        storch.add_cost(gnn_cost(theta, b, "index_add", x, y), name="nodes")

    return kit.Model("gnn[batch]", THETA, build, exact_batch, lambda: [Bernoulli(logits=edge_logits(THETA, XS[0]))])


@pytest.mark.parametrize("name, options, orders", [("score", {"n_samples": 3, "baseline": "leave_one_out"}, (0, 1, 2)),
                                                   ("disarm", {}, (0, 1))])
def test_a_batch_of_graphs_on_a_data_plate(name, options, orders):
    kit.check_against_enumeration(name, models=[batch_model()], orders=orders, n_replicates=2000, options=options)


@pytest.mark.parametrize("name, options", [("arm", {}), ("disarm", {}), ("mvd", {})])
def test_other_unbiased_estimators_at_order_one(name, options):
    report = kit.check_against_enumeration(name, models=[edge_model("index_add")], orders=(0, 1), n_replicates=2000,
                                           options=options)
    assert len(report.checks) == 2


def test_gumbel_straight_through_runs_with_the_right_shapes():
    # biased: checked for running and shapes only (docs/estimators/gumbel_straight_through.md)
    est = storch.estimator("gumbel_straight_through", plate="edges", n_samples=4)
    theta = THETA.clone().requires_grad_()
    with storch.Graph():
        b = est(Bernoulli(logits=unpack(theta)[0]))
        assert [(p.name, p.size) for p in b.plates] == [("edges", 4)] and b.shape == (M,)
        assert set(b.tensor.unique().tolist()) <= {0.0, 1.0}  # hard forward values
        storch.add_cost(gnn_cost(theta, b), name="nodes")
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert g.shape == theta.shape and torch.isfinite(g).all() and g[:M].abs().sum() > 0
    with storch.Graph(), pytest.raises(storch.OrderError, match="torch.where"):
        b = est(Bernoulli(logits=unpack(theta)[0]))  # a mask through .bool() cuts the straight-through gradient
        src, dst = EDGE_INDEX
        agg = torch.zeros(N, D, dtype=F64).index_add(0, dst, torch.where(b.bool().unsqueeze(-1), X[src], 0.0))
        storch.add_cost(agg.sum(), name="nodes")
        storch.surrogate_loss()


@pytest.mark.parametrize("name, options", [("score", {"n_samples": 4, "baseline": "leave_one_out"}), ("arm", {}),
                                           ("disarm", {}), ("gumbel_straight_through", {"n_samples": 4}),
                                           ("mvd", {})])
def test_training_lowers_the_expected_cost(name, options):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="edges", **options)
    before, after, _ = train_exact(
        THETA, exact, lambda theta: storch.add_cost(gnn_cost(theta, est(Bernoulli(logits=unpack(theta)[0]))), name="nodes"))
    assert after < 0.8 * before
