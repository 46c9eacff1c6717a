"""The pre-images a TransformedDistribution's caching transforms keep for the sample storch hands out
(``t.inv(z)`` of a transform with ``cache_size=1`` returns the cached u of z = t(u), log_prob(z) reads it):
a cost of them is walked for kinks and jumps as a cost of z is; and a transform of the user's that keeps its
log|det J| on itself in ``_call`` (pyro's Planar) gives log_prob(z) of the plate tensors, not of the raw draw."""

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution, constraints
from torch.distributions.transforms import AffineTransform, TanhTransform, Transform

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

D = torch.float64
R = 2000


# -- a cost of the cached pre-image: the same smoothness refusals as a cost of the sample ----------------------


def _pre_image_cost(t, cost, order):
    mu = torch.tensor(0.3, dtype=D, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(TransformedDistribution(Normal(mu, 1.0), [t]))
        x = t.inv(z)  # the cached pre-image (no inversion: storch keyed the cache to z)
        storch.add_cost(cost(x), name="c")
        return storch.surrogate_loss(order=order)


_TRANSFORMS = [lambda: AffineTransform(0.5, 1.0, cache_size=1), lambda: TanhTransform(cache_size=1)]


@pytest.mark.parametrize("make", _TRANSFORMS, ids=["affine", "tanh"])
def test_a_jump_of_the_cached_pre_image_is_refused_at_order_1(make):
    """round(t.inv(z)) + t.inv(z): its pathwise gradient was 1 where d/dmu E = 2 (accepted: the walk of the
    cost's graph started only from z, which the cached u is upstream of)."""
    with pytest.raises(storch.OrderError, match=r"pre-image u of z = t\(u\).*RoundBackward0"):
        _pre_image_cost(make(), lambda x: torch.round(x) + x, 1)


@pytest.mark.parametrize("make", _TRANSFORMS, ids=["affine", "tanh"])
@pytest.mark.parametrize("cost", [torch.relu, lambda x: torch.where(x > 0, x, 0.0)], ids=["relu", "where"])
def test_a_kink_of_the_cached_pre_image_is_refused_at_order_2(make, cost):
    """relu(t.inv(z)) had a Hessian of exactly 0 where the exact one is phi(0.3) = 0.381; the mask of
    torch.where(u > 0, u, 0) (a comparison of u, which the watch of comparisons did not count) too."""
    with pytest.raises(storch.OrderError):
        _pre_image_cost(make(), cost, 2)


def test_a_kink_of_the_cached_pre_image_at_order_1_refuses_a_second_derivative():
    """Order 1 of relu(t.inv(z)) is unbiased; its cost is hooked against a second derivative, as relu(z) is."""
    mu = torch.tensor(0.3, dtype=D, requires_grad=True)
    t = AffineTransform(0.5, 1.0, cache_size=1)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(TransformedDistribution(Normal(mu, 1.0), [t]))
        storch.add_cost(torch.relu(t.inv(z)), name="c")
        loss = storch.surrogate_loss()
        with pytest.raises(storch.OrderError, match="has a kink on the path .*ReluBackward0"):
            torch.autograd.grad(loss, mu, create_graph=True)


def test_a_smooth_cost_of_the_cached_pre_image_stays_accepted_and_unbiased():
    """E[u^3 + u^2 + 0.5 z] for u ~ N(mu, 1), z = 0.5 + u: gradient 3 mu^2 + 3 + 2 mu + 0.5, Hessian 6 mu + 2
    (z-tests over R replicates at order 2)."""
    torch.manual_seed(0)
    mu0 = torch.tensor([0.3], dtype=D)
    t = AffineTransform(0.5, 1.0, cache_size=1)
    with storch.Graph():
        leaf, mu = replicate(mu0, R)
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(
            TransformedDistribution(Normal(mu[0], 1.0), [t]))
        u = t.inv(z)
        storch.add_cost(u ** 3 + u ** 2 + 0.5 * z, name="c")
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    m = mu0.item()
    assert_unbiased(g, torch.tensor([3 * m * m + 3 + 2 * m + 0.5], dtype=D), "gradient")
    assert_unbiased(h, torch.tensor([[6 * m + 2]], dtype=D), "Hessian")


# -- a transform that keeps its log|det J| on itself (pyro's Planar, Radial, Sylvester) -------------------------


class Planar(Transform):
    """pyro's Planar flow, minimal: y = x + u tanh(w.x + b), log|det J| = log|1 + u.w (1 - tanh^2)| computed in
    _call and returned by log_abs_det_jacobian where (x, y) is the cached pair (pyro's ``_cached_logDetJ``)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, u, w, b, once=False):
        super().__init__(cache_size=1)
        self.u, self.w, self.b, self.once = u, w, b, once
        self._cached_logDetJ = None

    def _call(self, x):
        act = torch.tanh((x * self.w).sum(-1) + self.b)
        if not (self.once and self._cached_logDetJ is not None):  # (once: a cache filled at the first draw only)
            self._cached_logDetJ = torch.log((1 + (1 - act ** 2) * (self.u * self.w).sum(-1)).abs())
        return x + self.u * act.unsqueeze(-1)

    def log_abs_det_jacobian(self, x, y):
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old:
            self(x)
        return self._cached_logDetJ


def _planar_log_q(x, mu, u, w, b):
    act = torch.tanh(x * w + b)
    return Normal(mu, 1.0).log_prob(x) - torch.log(1 + (1 - act ** 2) * u * w)


def test_log_prob_of_a_planar_flow_is_the_hand_computed_one_per_sample_and_data_point():
    """q.log_prob(z) per (sample, data point) was -37.7 where the hand computation gives -3.1: the log-det
    cached by the raw draw (shape (n, 3)) was added to the plate tensors as a constant, broadcast against them."""
    torch.manual_seed(1)
    mu = torch.tensor([[0.2], [-0.5], [1.0]], dtype=D, requires_grad=True)
    u, w, b = (torch.tensor(v, dtype=D) for v in ([0.8], [1.2], 0.1))
    with storch.Graph():
        m = storch.denote_independent(mu, 0, "data")
        q = TransformedDistribution(Independent(Normal(m, 1.0), 1), [Planar(u, w, b)])
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(q)
        lq = q.log_prob(z)
        assert [p.name for p in lq.plates] == ["z", "data"] and lq.shape == ()
        x = z.tensor.detach().clone()  # (4, 3, 1): invert y = x + u tanh(w x + b) by Newton's method
        for _ in range(60):
            a = torch.tanh(w * x + b)
            x = x - (x + u * a - z.tensor.detach()) / (1 + u * w * (1 - a * a))
        hand = _planar_log_q(x, mu.detach(), u, w, b).squeeze(-1)
        torch.testing.assert_close(lq.tensor.detach(), hand)


def test_a_planar_flow_reused_in_later_steps_is_not_refused_for_its_refreshed_cache():
    """The log-det storch refreshes on the handed-out sample stays on the transform (a plate tensor of that draw): a
    flow's transform is reused from step to step, and the next step refused it ("holds plate tensors"). Each step's
    log q is the hand-computed one."""
    torch.manual_seed(2)
    mu = torch.tensor([[0.2], [-0.5], [1.0]], dtype=D, requires_grad=True)
    u, w, b = (torch.tensor(v, dtype=D) for v in ([0.8], [1.2], 0.1))
    flow = Planar(u, w, b)
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    for _ in range(3):
        with storch.Graph():
            q = TransformedDistribution(Independent(Normal(storch.denote_independent(mu, 0, "data"), 1.0), 1), [flow])
            z = est(q)
            lq = q.log_prob(z)
            x = z.tensor.detach().clone()
            for _ in range(60):
                a = torch.tanh(w * x + b)
                x = x - (x + u * a - z.tensor.detach()) / (1 + u * w * (1 - a * a))
            torch.testing.assert_close(lq.tensor.detach(), _planar_log_q(x, mu.detach(), u, w, b).squeeze(-1))
            storch.add_cost(lq + (z * z).sum(-1), name="c")
            storch.backward()


def test_a_flow_applied_by_hand_then_reused_in_a_transformed_distribution_names_its_stale_cache():
    """review r-four F4: a flow the user applied to a sample themselves (y = f(est(base))) keeps that step's log-det,
    a plate tensor, in its own attribute; the same flow object used later in a TransformedDistribution was refused
    with "holds plate tensors" and a list of fixes that do not apply. The message names the attribute and how to
    clear it; cleared, the flow is accepted and log q is the hand-computed one."""
    torch.manual_seed(3)
    mu = torch.tensor([[0.2], [-0.5], [1.0]], dtype=D, requires_grad=True)
    u, w, b = (torch.tensor(v, dtype=D) for v in ([0.8], [1.2], 0.1))
    flow = Planar(u, w, b)
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="z", n_samples=2)(
            Independent(Normal(storch.denote_independent(mu, 0, "data"), 1.0), 1))
        flow(x)  # the user's own application: _call keeps a plate tensor in flow._cached_logDetJ
    assert type(flow._cached_logDetJ) is storch.PlateTensor

    def step():
        with storch.Graph():
            q = TransformedDistribution(Independent(Normal(storch.denote_independent(mu, 0, "data"), 1.0), 1), [flow])
            z = storch.estimator("reparameterization", plate="z", n_samples=2)(q)
            return z.tensor.detach(), q.log_prob(z).tensor.detach()

    with pytest.raises(storch.UnsupportedDistributionError,
                       match=r"Planar keeps a plate tensor of a finished step in self\._cached_logDetJ.*"
                             r"t\._cached_logDetJ = None"):
        step()
    flow._cached_logDetJ = None
    z, lq = step()
    x = z.clone()
    for _ in range(60):
        a = torch.tanh(w * x + b)
        x = x - (x + u * a - z) / (1 + u * w * (1 - a * a))
    torch.testing.assert_close(lq, _planar_log_q(x, mu.detach(), u, w, b).squeeze(-1))


def test_a_planar_flow_entropy_term_is_unbiased():
    """E[log q(z) + z^2] for z = Planar(x), x ~ N(mu, 1), mu per replicate: the exact gradient in mu by
    Gauss-Hermite quadrature over x (80 nodes: the integrand is smooth)."""
    torch.manual_seed(2)
    u, w, b = (torch.tensor(v, dtype=D) for v in ([0.8], [1.2], 0.1))
    mu0 = torch.tensor([0.3], dtype=D)
    with storch.Graph():
        leaf, mu = replicate(mu0, R)
        q = TransformedDistribution(Independent(Normal(mu, 1.0), 1), [Planar(u, w, b)])
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(q)
        storch.add_cost(q.log_prob(z) + (z ** 2).sum(), name="c")
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)

    k = torch.arange(1, 80, dtype=D)  # Golub-Welsch: probabilists' Hermite nodes and weights
    nodes, v = torch.linalg.eigh(torch.diag(k.sqrt(), 1) + torch.diag(k.sqrt(), -1))
    weights = v[0] ** 2

    def exact(m):
        x = m + nodes
        zz = x + u * torch.tanh(w * x + b)
        return (weights * (_planar_log_q(x, m, u, w, b) + zz ** 2)).sum()

    assert_unbiased(g, torch.autograd.functional.jacobian(exact, mu0.clone()), "gradient")


def test_a_log_det_cached_once_is_refused_saying_why():
    """A transform whose log-det cache _call does not refresh (filled at the first draw only): after storch's
    second run of _call on the plate tensors the log-det still has no plates: refused, never broadcast."""
    mu = torch.tensor([0.3], dtype=D, requires_grad=True)
    t = Planar(torch.tensor([0.8], dtype=D), torch.tensor([1.2], dtype=D), torch.tensor(0.1, dtype=D), once=True)
    with storch.Graph():
        with pytest.raises(storch.errors.UnsupportedDistributionError,
                           match=r"transform Planar: log_abs_det_jacobian.*without plates.*still does"):
            storch.estimator("reparameterization", plate="z", n_samples=3)(
                TransformedDistribution(Independent(Normal(mu, 1.0), 1), [t]))


class Scale(Transform):
    """y = a x with log|det J| = log|a| expanded to x's shape: a tensor without plates (a constant per sample)."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True

    def __init__(self, a):
        super().__init__(cache_size=1)
        self.a = a

    def _call(self, x):
        return self.a * x

    def _inverse(self, y):
        return y / self.a

    def log_abs_det_jacobian(self, x, y):
        return torch.log(self.a.abs()).expand(x.shape)


def test_a_log_det_without_plates_that_is_constant_per_sample_is_kept():
    """log|a| of a raw parameter has no plates and no plate dims: broadcast as a constant per sample, rightly;
    not taken for a cached value (nothing refused, log_prob as torch's Normal(a mu, |a|) gives it)."""
    torch.manual_seed(3)
    mu = torch.tensor([0.2, -0.5, 1.0], dtype=D, requires_grad=True)
    a = torch.tensor(1.3, dtype=D)
    with storch.Graph():
        m = storch.denote_independent(mu, 0, "data")
        q = TransformedDistribution(Normal(m, 1.0), [Scale(a)])
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(q)
        lq = q.log_prob(z)
        torch.testing.assert_close(lq.tensor, Normal(a * mu, a).log_prob(z.tensor))


class _ScaleLogDet(Scale):
    """:class:`Scale` with log|a| kept in _call (a constant per sample whose first dim is the sample count here)."""

    def _call(self, x):
        self._ld = torch.log(self.a.abs())
        return x * self.a

    def log_abs_det_jacobian(self, x, y):
        return self._ld


class _Stats(Transform):
    """A pyro-style cached log-det and a running mean of its inputs: in place (`inplace`) or functionally."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True

    def __init__(self, inplace):
        super().__init__(cache_size=1)
        self.inplace = inplace
        self.running_mean = torch.zeros((), dtype=D)
        self.calls = 0

    def _call(self, x):
        self.calls += 1
        if self.inplace:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean())
        else:
            self.running_mean = (0.9 * self.running_mean + 0.1 * x.mean()).detach()
        self._ld = torch.zeros_like(x)
        return x * 1.0

    def _inverse(self, y):
        return y

    def log_abs_det_jacobian(self, x, y):
        return self._ld


def test_a_constant_log_det_whose_first_dim_is_the_sample_count_is_kept():
    """Found by review: the raw log-det was told by its leading dims only, so log|a| of 4 elements was refused at
    n_samples = 4 (accepted at 3). It is told by its whole shape: the plate dims, then x's."""
    a = torch.tensor([0.5, -2.0, 1.5, 3.0], dtype=D)
    mu = torch.zeros(4, dtype=D, requires_grad=True)
    for n in (3, 4):
        with storch.Graph():
            q = TransformedDistribution(Normal(mu, 1.0), [_ScaleLogDet(a)])
            z = storch.estimator("reparameterization", plate="z", n_samples=n)(q)
            x = z.tensor.detach() / a
            torch.testing.assert_close(q.log_prob(z).tensor.detach(), Normal(0.0, 1.0).log_prob(x) - a.abs().log())


def test_the_refresh_keeps_a_layers_state_as_one_draw_leaves_it():
    """Found by review: the refresh ran the user's _call again on the transform itself, so a running mean updated
    functionally became a plate tensor (one mean per sample), and one updated in place was updated twice. It runs
    on a copy now: a functional update is the draw's (a plain tensor, one update a draw); an in-place one is refused."""
    mu = torch.tensor([1.0, 2.0, 3.0], dtype=D, requires_grad=True)
    t = _Stats(inplace=False)
    for _ in range(2):
        with storch.Graph():
            q = TransformedDistribution(Normal(storch.denote_independent(mu, 0, "data"), 1.0), [t])
            z = storch.estimator("reparameterization", plate="z", n_samples=5)(q)
            assert type(t.running_mean) is torch.Tensor and t.running_mean.dim() == 0 and t.calls == 1
            assert [p.name for p in q.log_prob(z).plates] == ["z", "data"]
        t.calls = 0
    t = _Stats(inplace=True)
    with storch.Graph():
        q = TransformedDistribution(Normal(storch.denote_independent(mu, 0, "data"), 1.0), [t])
        with pytest.raises(storch.UnsupportedDistributionError, match=r"changes running_mean in place|running its _call on the plate tensor failed"):
            storch.estimator("reparameterization", plate="z", n_samples=5)(q)
