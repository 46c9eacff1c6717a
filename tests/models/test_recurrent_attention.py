"""The recurrent attention model (RAM, Mnih et al. 2014) ported as a user would: continuous glimpse locations.

An 8x8 digit (scikit-learn's bundled digits) is read through T = 2 glimpses of 3x3 pixels. At each step a
location l_t ~ Normal(mu(h_t), sigma) (fixed sigma) is sampled, the glimpse is cut at the *rounded* location
(``l.round().long().clamp(...)``, then advanced indexing of the image by the sampled rows and columns), a GRU
cell reads it, and after the last glimpse a linear classifier's log-loss is the cost: differentiable in the
classifier, GRU and glimpse network (backprop), while the locations get REINFORCE (``score``, one node per
glimpse, with RAM's learned baseline b_t(h_t) or leave-one-out).

Oracle: the cost is piecewise constant in l (it reads l only through the rounded cell), so
E[cost] = sum over cells of P(cell) cost(cell), with P from Normal's CDF; with T = 2 that is a sum over
36 x 36 cell pairs per digit, differentiable in every parameter (the exact gradient and Hessian-vector
product by autograd). The estimates are z-tested against it (|mean - exact| < 4 SE, seeded).
``reparameterization`` of such a node would differentiate through ``round`` (gradient 0 along the location):
it is refused, with a message that names ``score``.
"""

import gc

import pytest
import torch
import torch.nn.functional as F
from storch.testing import assert_unbiased, z_test
from torch import nn
from torch.distributions import Normal

import storch

sklearn_datasets = pytest.importorskip("sklearn.datasets")

D = torch.float64
S, G, H, T, SIGMA, CLASSES = 8, 3, 8, 2, 0.8, 10  # image side, glimpse side, state, glimpses, location noise
CELLS = S - G + 1  # a glimpse's top-left corner takes CELLS x CELLS positions
_digits = sklearn_datasets.load_digits()
IMGS = torch.tensor(_digits.images[:3] / 16.0, dtype=D)  # (3, 8, 8) in [0, 1]
LABELS = torch.tensor(_digits.target[:3])


class RAM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.glimpse_net = nn.Linear(G * G + 2, H)
        self.core = nn.GRUCell(H, H)
        self.where = nn.Linear(H, 2)  # the location network: mu_t = where(h_t)
        self.what = nn.Linear(H, CLASSES)
        with torch.no_grad():
            self.where.bias.fill_((CELLS - 1) / 2)  # start looking at the centre

    # -- the model for ONE digit ------------------------------------------------------------------

    def read(self, img, cell, h):
        """One glimpse at the integer corner ``cell`` (2,), read into the state ``h``."""
        rows, cols = cell[0] + torch.arange(G), cell[1] + torch.arange(G)
        patch = img[rows.unsqueeze(-1), cols]  # (G, G): sampled indices in both positions
        feat = torch.cat([patch.reshape(G * G), cell.to(img.dtype) / (CELLS - 1)])
        return self.core(torch.tanh(self.glimpse_net(feat)), h)

    def forward(self, ests, img, y):
        h = torch.zeros(H, dtype=img.dtype)
        for est in ests:
            loc = est(Normal(self.where(h), SIGMA), inputs=h)
            h = self.read(img, loc.round().long().clamp(0, CELLS - 1), h)
        return F.cross_entropy(self.what(h), y)

    # -- the exact expected cost (T = 2): the sum over cell pairs, weighted by Normal's CDF -----------

    def exact_cost(self):
        edges = torch.arange(1, CELLS, dtype=D) - 0.5  # round(l) = k for l in [k - 0.5, k + 0.5); clamp: open ends

        def cell_probs(mu):  # (..., 2) -> (..., CELLS * CELLS), P(row) P(col)
            cdf = Normal(mu.unsqueeze(-1), SIGMA).cdf(edges)
            p = torch.diff(F.pad(cdf, (1, 0), value=0.0), dim=-1, append=torch.ones_like(cdf[..., :1]))
            return (p[..., 0, :, None] * p[..., 1, None, :]).flatten(-2)

        grid = torch.cartesian_prod(torch.arange(CELLS), torch.arange(CELLS))  # (C2, 2) corners
        total = 0.0
        for img, y in zip(IMGS, LABELS):
            patches = img.unfold(0, G, 1).unfold(1, G, 1).reshape(CELLS * CELLS, G * G)  # (C2, G*G)
            feat = torch.tanh(self.glimpse_net(torch.cat([patches, grid.to(D) / (CELLS - 1)], -1)))  # (C2, H)
            h0 = torch.zeros(H, dtype=D)
            p1 = cell_probs(self.where(h0))  # (C2,)
            h1 = self.core(feat, h0.expand(CELLS * CELLS, H))  # (C2, H): after the first glimpse
            p2 = cell_probs(self.where(h1))  # (C2, C2)
            h2 = self.core(feat.repeat(CELLS * CELLS, 1), h1.repeat_interleave(CELLS * CELLS, 0))
            ce = F.cross_entropy(self.what(h2), y.expand(h2.shape[0]), reduction="none").view(CELLS * CELLS, -1)
            total = total + (p1[:, None] * p2 * ce).sum()
        return total / len(IMGS)  # the data plate is reduced by the mean


def _model():
    torch.manual_seed(0)
    return RAM().double()


def _directions(params):
    """The checked components of a gradient: the location network's bias (REINFORCE alone), the classifier's
    bias (backprop alone) and 4 fixed random projections of the whole gradient."""
    g = torch.Generator().manual_seed(5)
    n = sum(p.numel() for p in params)
    return torch.randn(4, n, generator=g, dtype=D)


def _components(model, grads, dirs):
    names = [k for k, _ in model.named_parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    return torch.cat([grads[names.index("where.bias")], grads[names.index("what.bias")], dirs @ flat])


def _estimators(baseline, n_samples=3):
    return [storch.estimator("score", plate=f"l{t}", n_samples=n_samples, baseline=baseline) for t in range(T)]


def _step(model, ests):
    x, y = storch.denote_independent((IMGS, LABELS), 0, "data")
    storch.add_cost(model(ests, x, y), name="classification")


def test_exact_cost_equals_a_monte_carlo_average_of_the_model():
    """The oracle is the model's expected cost: storch's value estimate over many samples agrees with it."""
    model = _model()
    ests = _estimators("none", n_samples=1)
    torch.manual_seed(1)
    with torch.no_grad():
        values = []
        for _ in range(400):
            with storch.Graph():
                _step(model, ests)
                values.append(storch.surrogate_loss())
        assert_unbiased(torch.stack(values)[:, None], model.exact_cost().reshape(1), "E[cost]")


@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "learned"])
def test_gradient_is_unbiased(baseline):
    """Order 1 against the exact gradient. The learned baseline (NVIL: b_t of the state h_t, per glimpse) is
    trained for a few steps first, then held fixed (surrogate_loss without backward does not update it)."""
    model = _model()
    ests = _estimators(baseline)
    params = list(model.parameters())
    torch.manual_seed(2)
    if baseline == "learned":
        for _ in range(5):
            with storch.Graph():
                _step(model, ests)
                storch.backward()
        model.zero_grad()
    dirs = _directions(params)
    est = []
    for _ in range(250):
        with storch.Graph():
            _step(model, ests)
            est.append(_components(model, torch.autograd.grad(storch.surrogate_loss(), params), dirs))
    exact = _components(model, torch.autograd.grad(model.exact_cost(), params), dirs)
    assert_unbiased(torch.stack(est), exact, f"RAM gradient, baseline={baseline}")


def test_hessian_vector_product_is_unbiased_at_order_2():
    """Order 2 (score declares every order): u . (Hessian v) against the exact one, leave-one-out baselines."""
    model = _model()
    ests = _estimators("leave_one_out")
    params = list(model.parameters())
    dirs = _directions(params)
    v, us = dirs[0], dirs[1:]

    def hvp(loss):
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params, create_graph=True)])
        return us @ torch.cat([x.reshape(-1) for x in torch.autograd.grad(g @ v, params)])

    torch.manual_seed(3)
    est = []
    for _ in range(250):
        with storch.Graph():
            _step(model, ests)
            est.append(hvp(storch.surrogate_loss(order=2)))
    assert_unbiased(torch.stack(est), hvp(model.exact_cost()), "RAM Hessian-vector product")


def test_a_credit_free_cost_misses_the_location_gradient():
    """The z-test can fail: without the score-function credit (backprop alone, the locations' gradient through
    round is 0) the location network's gradient is wrong by many standard errors."""
    model = _model()
    ests = _estimators("none")
    torch.manual_seed(4)
    est = []
    for _ in range(100):
        with storch.Graph():
            x, y = storch.denote_independent((IMGS, LABELS), 0, "data")
            storch.add_cost(model(ests, x, y), name="classification", credit=False)
            (g,) = torch.autograd.grad(storch.surrogate_loss(), model.where.bias, allow_unused=True)
            est.append(torch.zeros_like(model.where.bias) if g is None else g)
    (exact,) = torch.autograd.grad(model.exact_cost(), model.where.bias)
    assert exact.abs().min() > 1e-3, exact
    assert z_test(torch.stack(est), exact).max_abs_z > 10


def test_reparameterization_through_the_rounded_location_is_refused():
    """``reparameterization`` (``pathwise``) of l would differentiate the cost through ``round``: a gradient of
    exactly 0 along the location. Refused at order 1, with a message that names ``score``."""
    model = _model()
    ests = [storch.estimator("reparameterization", plate=f"l{t}") for t in range(T)]
    with storch.Graph():
        _step(model, [lambda q, inputs=None, e=e: e(q) for e in ests])
        with pytest.raises(storch.OrderError, match="score"):
            storch.surrogate_loss()


def test_reparameterization_with_the_location_also_read_smoothly_is_refused():
    """RAM's glimpse network also reads l itself: the cost then reaches the sample smoothly too, and only the
    rounded index's part of the gradient is lost. storch marks the integer read from the sample and refuses."""
    model = _model()
    est = storch.estimator("reparameterization", plate="l")
    with storch.Graph():
        x, y = storch.denote_independent((IMGS, LABELS), 0, "data")
        loc = est(Normal(model.where(torch.zeros(H, dtype=D)), SIGMA))
        h = model.read(x, loc.round().long().clamp(0, CELLS - 1), torch.zeros(H, dtype=D))
        storch.add_cost(F.cross_entropy(model.what(h + 0.1 * loc.sum()), y), name="classification")
        with pytest.raises(storch.OrderError, match="score"):
            storch.surrogate_loss()


def test_a_learned_baseline_of_the_state_in_a_partition_is_refused_with_the_fix():
    """One estimator called at every glimpse is a partition, whose baseline multiplies the log-probability of
    the whole prefix: b(h_t), h_t computed from earlier locations, would bias it. The error says what to do."""
    model = _model()
    est = storch.estimator("score", plate="l", n_samples=3, baseline="learned")
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="leave_one_out"):
            _step(model, [est] * T)


def test_a_partition_with_leave_one_out_is_unbiased():
    """The partition form (one estimator for every glimpse): per-sequence leave-one-out baselines."""
    model = _model()
    est = storch.estimator("score", plate="l", n_samples=4, baseline="leave_one_out")
    params = list(model.parameters())
    dirs = _directions(params)
    torch.manual_seed(6)
    out = []
    for _ in range(250):
        with storch.Graph():
            _step(model, [est] * T)
            out.append(_components(model, torch.autograd.grad(storch.surrogate_loss(), params), dirs))
    exact = _components(model, torch.autograd.grad(model.exact_cost(), params), dirs)
    assert_unbiased(torch.stack(out), exact, "RAM gradient, partition")


def test_a_training_step_leaves_nothing_to_the_cyclic_collector():
    model = _model()
    ests = _estimators("learned")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        with storch.Graph():
            _step(model, ests)
            storch.backward()
        opt.step()
        opt.zero_grad()
    gc.collect()
    with storch.Graph():
        _step(model, ests)
        storch.backward()
    assert gc.collect() == 0
