"""A mixture-of-experts block with hard routing: each token picks ONE of E experts (a porting test).

For one sequence of T tokens ``x (T, d)``: a router's logits ``x @ W_r`` ``(T, E)``, the chosen expert
``k ~ Categorical(logits)`` per token (one node, its T elements sampled jointly), the token's output
``x_t + g_t tanh(W_{k_t} x_t)`` computed by the chosen expert only, where ``g_t = softmax(logits_t)[k_t]`` is the
Switch-Transformer gate, and a cost: squared error to a target plus a load-balancing term from the experts'
token counts (``bincount``). The routing is written the ways people write it: the chosen expert's weights
gathered by index (``W[k]``, ``index_select``), every expert's output stacked then picked (``gather``,
``take_along_dim``, ``one_hot`` weights, a ``torch.where`` loop), the tokens sorted by expert (``argsort``) and
combined back with ``index_add``, and the gate picked by ``gather``; the
relaxed estimators get the same block written for one-hot routing vectors (``z @ W``).

(a) the variants agree and equal a loop over plate entries; the data-dependent dispatch (``nonzero``,
``x[mask]``, an in-place ``index_add_`` into a plain buffer) is refused with advice that works;
(b) gradients z-tested against enumeration of the E^T routings (order 1; order 2 where declared);
gumbel straight-through (biased) runs with the right shapes; (c) a few training steps lower the loss.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

import storch
import storch.testing as kit
from model_checks import assert_per_entry, lift, train_exact

T, E, D = 2, 3, 2
F64 = torch.float64
_g = torch.Generator().manual_seed(0)
X = torch.randn(T, D, generator=_g, dtype=F64)
TARGET = torch.randn(T, D, generator=_g, dtype=F64)
THETA = 0.7 * torch.randn(D * E + E * D * D, generator=_g, dtype=F64)
BALANCE = 0.5


def unpack(theta):
    """θ -> router weights (d, E), expert weights (E, d, d)."""
    return theta[: D * E].reshape(D, E), theta[D * E:].reshape(E, D, D)


# -- the block for ONE sequence, routing by index ----------------------------------------------------------------


def expert_out(w_k, x):
    """tanh(W x) per token: w_k (T, d, d), x (T, d)."""
    return torch.tanh((w_k @ x.unsqueeze(-1)).squeeze(-1))


def all_experts(we, x):
    """Every expert's output for every token, stacked: (T, E, d)."""
    return torch.stack([torch.tanh(x @ we[e].T) for e in range(E)], 1)


ROUTES = {
    "index": lambda we, x, k: expert_out(we[k], x),
    "index_select": lambda we, x, k: expert_out(we.index_select(0, k), x),
    "gather": lambda we, x, k: all_experts(we, x).gather(1, k[:, None, None].expand(T, 1, D)).squeeze(1),
    "take_along_dim": lambda we, x, k: torch.take_along_dim(all_experts(we, x), k[:, None, None], dim=1).squeeze(1),
    "one_hot": lambda we, x, k: (F.one_hot(k, E).to(x.dtype).unsqueeze(-1) * all_experts(we, x)).sum(1),
    "where": lambda we, x, k: _where_loop(we, x, k),
    "sorted_index_add": lambda we, x, k: _sorted_dispatch(we, x, k),
}


def _where_loop(we, x, k):
    out = torch.zeros_like(x)
    for e in range(E):
        out = torch.where((k == e).unsqueeze(-1), torch.tanh(x @ we[e].T), out)
    return out


def _sorted_dispatch(we, x, k):
    """Tokens sorted by expert (grouped GEMM style), each group's outputs, combined back with index_add."""
    order = torch.argsort(k, stable=True)
    ys = expert_out(we[k[order]], x[order])
    return torch.zeros_like(x).index_add(0, order, ys)


def moe_cost(theta, k, route="index"):
    """The block's cost for one routing k (T,) of the tokens (plain or plate tensors)."""
    wr, we = unpack(theta)
    logits = X @ wr
    gate = torch.softmax(logits, -1).gather(-1, k.unsqueeze(-1)).squeeze(-1)  # (T,)
    y = X + gate.unsqueeze(-1) * ROUTES[route](we, X, k)
    load = torch.bincount(k, minlength=E).to(theta.dtype) / T  # the experts' share of the tokens
    return ((y - TARGET) ** 2).sum() + BALANCE * ((load - 1 / E) ** 2).sum()


def moe_cost_one_hot(theta, z):
    """The same block for one-hot routing vectors z (T, E) (relaxed estimators: z may be relaxed)."""
    wr, we = unpack(theta)
    logits = X @ wr
    gate = (torch.softmax(logits, -1) * z).sum(-1)
    w_k = (z @ we.reshape(E, D * D)).reshape(T, D, D)
    y = X + gate.unsqueeze(-1) * expert_out(w_k, X)
    load = z.sum(0) / T
    return ((y - TARGET) ** 2).sum() + BALANCE * ((load - 1 / E) ** 2).sum()


def router(theta):
    return X @ unpack(theta)[0]


def exact(theta):
    """E[cost] by enumeration of the E^T routings."""
    logp = torch.log_softmax(router(theta), -1)
    total = theta.new_zeros(())
    for ks in itertools.product(range(E), repeat=T):
        k = torch.tensor(ks)
        total = total + logp[torch.arange(T), k].sum().exp() * moe_cost(theta, k)
    return total


def index_model(route):
    def build(make, theta):
        k = make("route")(Categorical(logits=router(theta)))
        storch.add_cost(moe_cost(theta, k, route), name="moe")

    return kit.Model(f"moe[{route}]", THETA, build, exact, lambda: [Categorical(logits=router(THETA))])


def one_hot_model():
    def build(make, theta):
        z = make("route")(OneHotCategorical(logits=router(theta)))
        storch.add_cost(moe_cost_one_hot(theta, z), name="moe")

    return kit.Model("moe[one_hot]", THETA, build, exact, lambda: [OneHotCategorical(logits=router(THETA))])


# -- (a) it runs as written ---------------------------------------------------------------------------------------


def test_routings_agree_and_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    k = lift(torch.randint(E, (3, 2, T)))
    theta = lift(THETA.expand(3, 2, -1).clone())
    for route in ROUTES:
        assert_per_entry(lambda th, kk, r=route: moe_cost(th, kk, r), theta, k, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(moe_cost(theta, k, route).tensor, moe_cost(theta, k).tensor)
    z = lift(F.one_hot(k.tensor, E).to(F64))
    torch.testing.assert_close(moe_cost_one_hot(theta, z).tensor, moe_cost(theta, k).tensor)
    assert_per_entry(lambda kk: torch.bincount(kk, minlength=E), k)
    assert_per_entry(lambda kk: torch.zeros(E, D, dtype=F64).index_add(0, kk, X), k)
    assert_per_entry(lambda kk: torch.zeros(E, D, dtype=F64).scatter_add(0, kk[:, None].expand(T, D), X), k)


def _route(est, theta, dist=Categorical):
    return est(dist(logits=router(theta)))


def test_data_dependent_dispatch_is_refused_with_advice_that_works():
    est = storch.estimator("score", plate="route", n_samples=3)
    theta = THETA.clone()
    wr, we = unpack(theta)
    with storch.Graph():
        k = _route(est, theta)
        with pytest.raises(storch.PlateError, match=r"nonzero.*torch\.where\(mask, x, other\)"):
            (k == 0).nonzero()  # sparse dispatch: the tokens routed to expert 0
        with pytest.raises(storch.PlateError, match=r"torch\.where\(mask, x, other\)"):
            X[k == 0]
        buffer = torch.zeros(E, D, dtype=F64)
        with pytest.raises(storch.PlateError, match=r"out-of-place version \(x = x\.index_add\(\.\.\.\) instead of x\.index_add_"):
            buffer.index_add_(0, k, X)  # the usual combine into a zeros buffer
        assert not buffer.any()
        # the advice: the out-of-place call, and torch.where for the dispatch
        summed = buffer.index_add(0, k, X)
        assert summed.plates == k.plates and summed.shape == (E, D)
        torch.testing.assert_close(ROUTES["where"](we, X, k).tensor, ROUTES["index"](we, X, k).tensor)


@pytest.mark.parametrize("route", list(ROUTES))
def test_score_leave_one_out_is_unbiased_at_orders_one_and_two(route):
    kit.check_against_enumeration("score", models=[index_model(route)], orders=(0, 1, 2), n_replicates=2000,
                                  options={"n_samples": 3, "baseline": "leave_one_out"})


@pytest.mark.parametrize("name, options, model, orders, warmup", [
    ("unordered_set", {"n_samples": 3}, index_model("index"), (0, 1), 0),
    ("relax", {"control_variate": "network"}, index_model("gather"), (0, 1, 2), 10),  # takes the index
    ("rebar", {}, one_hot_model(), (0, 1, 2), 0),
    ("relax", {}, one_hot_model(), (0, 1, 2), 10),  # trained first: its residual network starts at zero (= rebar)
])
def test_other_unbiased_estimators(name, options, model, orders, warmup):
    report = kit.check_against_enumeration(name, models=[model], orders=orders, n_replicates=2000, options=options,
                                           warmup=warmup)
    assert len(report.checks) == len(orders)


@pytest.mark.parametrize("name", ["gumbel_straight_through", "gumbel_softmax"])
def test_relaxed_routing_runs_with_the_right_shapes(name):
    # biased: checked for running and shapes only (docs/estimators/gumbel_straight_through.md)
    est = storch.estimator(name, plate="route", n_samples=4)
    theta = THETA.clone().requires_grad_()
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match="OneHotCategorical"):
            _route(est, theta)  # an index cannot carry a relaxed gradient
    with storch.Graph():
        z = _route(est, theta, OneHotCategorical)
        assert [(p.name, p.size) for p in z.plates] == [("route", 4)] and z.shape == (T, E)
        if name == "gumbel_straight_through":  # hard one-hot forward values
            assert torch.equal(z.tensor.sum(-1), torch.ones(4, T, dtype=F64)) and set(z.tensor.unique().tolist()) <= {0., 1.}
        with pytest.raises(storch.OrderError, match="argmax"):
            storch.add_cost(moe_cost(theta, z.argmax(-1)), name="moe")  # the index would cut the gradient
            storch.surrogate_loss()
    with storch.Graph():
        z = _route(est, theta, OneHotCategorical)
        storch.add_cost(moe_cost_one_hot(theta, z), name="moe")
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert g.shape == theta.shape and torch.isfinite(g).all() and g[: D * E].abs().sum() > 0


@pytest.mark.parametrize("name, options, one_hot", [
    ("score", {"n_samples": 4, "baseline": "leave_one_out"}, False),
    ("unordered_set", {"n_samples": 4}, False),
    ("gumbel_straight_through", {"n_samples": 4}, True),
    ("rebar", {"n_samples": 4}, True),
])
def test_training_lowers_the_expected_cost(name, options, one_hot):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="route", **options)

    def build(theta):
        if one_hot:
            storch.add_cost(moe_cost_one_hot(theta, _route(est, theta, OneHotCategorical)), name="moe")
        else:
            storch.add_cost(moe_cost(theta, _route(est, theta)), name="moe")

    before, after, theta = train_exact(THETA, exact, build)
    assert after < 0.8 * before
    with torch.no_grad():  # inference: the router's top choice, by argmax or topk
        k = router(theta).argmax(-1)
        assert torch.equal(router(theta).topk(1, -1).indices.squeeze(-1), k)
        assert torch.isfinite(moe_cost(theta, k))
