"""A straight-through sample inside a user's rsample is a jump, refused at order 1 (found by a porting tester,
p-struct): a Gumbel-Sinkhorn-like class whose rsample returns ``one_hot(soft.argmax(-1)) + soft - soft.detach()``
under 'reparameterization' was lowered to order 1 only (its argmax read as a comparison, a kink), so an order-1
surrogate went through with a gradient entry of +0.0046 +- 0.0006 where a common-random-numbers finite difference of
the hard objective gave about -0.040 (z ~ 70). A value piecewise constant in the parameters (argmax, argmin, sort or
topk indices, one_hot of them, a comparison or a rounding cast to float) added to one that carries gradient makes the
sample jump while autograd sees the soft part's derivative only: biased at order 1 already, as storch's own
gumbel_straight_through (``biased``) is. True kinks (relu written with a float mask, abs, clamp, sort values, max
values) stay accepted at order 1, z-tested against closed forms.

Review r-twelve: the rule needs a detached copy of a value that carries gradient beside the piecewise-constant value
(the straight-through signature): continuous piecewise-linear splines that add a bin index to a value with gradient
(an inverse histogram cdf, a fixed spline, nflows' linear spline as a user transform) were refused at order 1 by the
first version and are exact; a one_hot of a multinomial draw (OneHotCategoricalStraightThrough by hand) was accepted
with a biased gradient."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Distribution, constraints

import storch
from storch.distributions.rsample_kinks import RsampleComparisons
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test

D = torch.float64
MU = 0.3
TAU = 0.5


def Phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


class _GumbelST(Distribution):
    """A K-way Gumbel-max sample written as a straight-through value by ``hard``: soft = softmax((logits + G) / τ)."""

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, logits, validate_args=None):
        self.logits = logits
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        g = -torch.log(-torch.log(torch.rand(shape, dtype=self.logits.dtype)))
        soft = ((self.logits + g) / TAU).softmax(-1)
        return self.straight_through(soft)

    @staticmethod
    def straight_through(soft):
        raise NotImplementedError


def _one_hot_argmax(soft):
    hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


STRAIGHT_THROUGH = {
    "one_hot(argmax) + soft - soft.detach()": _one_hot_argmax,
    "(hard - soft).detach() + soft": lambda s: (F.one_hot(s.argmax(-1), s.shape[-1]).to(s.dtype) - s).detach() + s,
    "scatter of topk indices": lambda s: torch.zeros_like(s).scatter(-1, s.topk(1, -1).indices, 1.0) - s.detach() + s,
    "scatter of max indices": lambda s: s - s.detach() + torch.zeros_like(s).scatter_(-1, s.max(-1, keepdim=True)[1],
                                                                                      1.0),
    "comparison cast to float": lambda s: (s == s.max(-1, keepdim=True).values).to(s.dtype) + s - s.detach(),
    "rounded detached value": lambda s: s.detach().round() + (s - s.detach()),
    "torch's F.gumbel_softmax(hard=True) on the soft value": lambda s: F.gumbel_softmax(s.log(), tau=1.0, hard=True),
    # torch's OneHotCategoricalStraightThrough by hand: the index DRAWN from the soft value (review r-twelve: accepted
    # before with a biased gradient, z up to 76)
    "one_hot(multinomial(soft)) + soft - soft.detach()": lambda s: F.one_hot(
        torch.multinomial(s.reshape(-1, s.shape[-1]), 1).reshape(s.shape[:-1]), s.shape[-1]).to(s.dtype) + s
        - s.detach(),
}


def _st_class(case):
    return type("GumbelST", (_GumbelST,), {"straight_through": staticmethod(STRAIGHT_THROUGH[case])})


@pytest.mark.parametrize("case", sorted(STRAIGHT_THROUGH))
def test_a_straight_through_rsample_is_refused_at_order_1(case):
    logits = torch.tensor([0.4, 0.0, -0.3], dtype=D, requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    torch.manual_seed(0)
    with storch.Graph():
        x = est(_st_class(case)(logits))
        storch.add_cost((x * torch.tensor([1.0, 2.0, 4.0], dtype=D)).sum(-1), name="c")
        with pytest.raises(storch.OrderError, match=r"order-1 surrogate.*rsample of GumbelST .*piecewise constant in "
                                                    r"its parameters.*biased at order 1.*'score'.*"
                                                    r"'straight_through' estimator \(hard \+ p - ⊥p\) or 'gumbel_straight_through'"):
            storch.surrogate_loss()


def test_the_refused_straight_through_gradient_is_biased():
    """K = 2, logits (a, 0): the hard value's first entry is 1 with probability sigmoid(a), so d/da E[x_0] =
    s (1 - s) (0.2445 at a = 0.3). The straight-through gradient (autograd through the rsample, what storch accepted
    at order 1 before) is E[d soft_0 / da], another number: its z-test fails."""
    s = 1 / (1 + math.exp(-MU))
    R = 4000
    torch.manual_seed(1)
    a = torch.full((R, 1), MU, dtype=D, requires_grad=True)
    logits = torch.cat([a, torch.zeros_like(a)], -1)
    x = _st_class("one_hot(argmax) + soft - soft.detach()")(logits).rsample()
    assert torch.allclose(x.detach(), F.one_hot(x.detach().argmax(-1), 2).to(D), atol=1e-12)  # the hard sample
    g, = torch.autograd.grad(x[:, 0].sum(), a)
    assert not z_test(g, torch.tensor([s * (1 - s)], dtype=D)).ok


class _Kinked(Distribution):
    """loc + eps, eps ~ N(0, 1), through ``kink`` (a continuous, piecewise-differentiable function)."""

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc, validate_args=None):
        self.loc = loc
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        y = self.loc + torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype)
        return self.kink(y)

    @staticmethod
    def kink(y):
        raise NotImplementedError


L0, L1 = MU, -0.5
_MAX = Phi((L0 - L1) / math.sqrt(2))  # d/dl0 E[max(l0 + e0, l1 + e1)]
# name -> (the kink, the weights of the cost sum(c * x), the exact gradient of E[cost] in (l0, l1))
KINKS = {
    "relu as a float mask": (lambda y: y * (y > 0).to(y.dtype), [1.0, 1.0], [Phi(L0), Phi(L1)]),
    "relu with torch.where, plus y": (lambda y: torch.where(y > 0, y, 0.0) + y, [1.0, 1.0],
                                      [Phi(L0) + 1, Phi(L1) + 1]),
    "abs": (lambda y: y.abs(), [1.0, 1.0], [2 * Phi(L0) - 1, 2 * Phi(L1) - 1]),
    "clamp": (lambda y: y.clamp(0.0, 1.0), [1.0, 1.0], [Phi(1 - L0) - Phi(-L0), Phi(1 - L1) - Phi(-L1)]),
    "sort values": (lambda y: y.sort(-1).values, [0.0, 1.0], [_MAX, 1 - _MAX]),
    "max and min values, stacked": (lambda y: torch.stack([y.min(-1).values, y.max(-1).values], -1), [0.0, 1.0],
                                    [_MAX, 1 - _MAX]),
    "shifted by the max": (lambda y: y - y.max(-1, keepdim=True).values, [1.0, 0.0], [1 - _MAX, -(1 - _MAX)]),
}


@pytest.mark.parametrize("case", sorted(KINKS))
def test_a_kink_inside_rsample_is_accepted_and_unbiased_at_order_1(case):
    kink, c, exact = KINKS[case]
    cls = type("Kinked", (_Kinked,), {"kink": staticmethod(kink)})
    torch.manual_seed(2)
    R = 4000
    est = storch.estimator("reparameterization", plate="x", n_samples=1)
    with storch.Graph():
        leaf, m = replicate(torch.tensor([L0, L1], dtype=D), R)
        x = est(cls(m))
        storch.add_cost((x * torch.tensor(c, dtype=D)).sum(-1), name="c")
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(g, torch.tensor(exact, dtype=D), "gradient")


def test_the_watch_tells_a_straight_through_from_a_kink():
    y = torch.tensor([[0.3, -0.2, 0.1]], dtype=D, requires_grad=True) * 1
    for kink in (lambda y: y * (y > 0).to(y.dtype), lambda y: y.sort(-1).values + 1.0,
                 lambda y: y - y.max(-1, keepdim=True).values, lambda y: torch.where(y > 0, y, 0.0) + y,
                 lambda y: y.gather(-1, y.argmax(-1, keepdim=True)) + y, lambda y: y + y.detach().sum()):
        with RsampleComparisons() as watch:
            kink(y)
        assert watch.jump is None
    with RsampleComparisons() as watch:
        _one_hot_argmax(y.softmax(-1))
    assert watch.jump is not None and watch.jump.startswith("sub in ")  # (where soft.detach() comes in)


# Continuous piecewise-linear splines (review r-twelve): a piecewise-constant bin index added to a value that carries
# gradient, as a straight-through is, but with no detached copy of a value that carries gradient: the jumps of the
# terms cancel (the spline is continuous) and the pathwise gradient is exact. Refused at order 1 by the first version
# of the straight-through rule; accepted again and z-tested against exact values.
K = 4
TH0 = torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=D)
Q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
CQ = torch.cat([torch.zeros(1, dtype=D), Q.cumsum(0)[:-1]])


class _Base(Distribution):
    arg_constraints = {"th": constraints.real_vector}
    support = constraints.real
    has_rsample = True

    def __init__(self, th, validate_args=None):
        self.th = th
        super().__init__(th.shape[:-1], torch.Size(), validate_args=False)


class HistICDF(_Base):
    """The inverse cdf of a histogram density on [0, 1] with K equal bins of masses softmax(th), the bin found by
    searchsorted in the detached cdf."""

    def rsample(self, sample_shape=torch.Size()):
        u = torch.rand(self._extended_shape(sample_shape), dtype=D)
        p = self.th.softmax(-1).expand(*u.shape, K)
        cdf = p.cumsum(-1)
        idx = torch.searchsorted(cdf.detach(), u.unsqueeze(-1)).clamp(max=K - 1)
        lo = (cdf - p).gather(-1, idx).squeeze(-1)
        return (idx.squeeze(-1).to(D) + (u - lo) / p.gather(-1, idx).squeeze(-1)) / K


def _spline(y):
    """A fixed piecewise-linear cdf on [0, 1] (K uniform bins, masses Q), the bin by floor."""
    b = (y * K).floor().long().clamp(max=K - 1)
    return CQ[b] + (y * K - b) * Q[b]


class NISLinear(_Base):
    """y = sigmoid(th[0] + ε) through :func:`_spline`."""

    def rsample(self, sample_shape=torch.Size()):
        return _spline(torch.sigmoid(self.th[..., 0] + torch.randn(self._extended_shape(sample_shape), dtype=D)))


class PWLinear(torch.distributions.Transform):
    """nflows' linear spline (nflows/transforms/splines/linear.py, forward), bin masses softmax(logits)."""

    domain = constraints.unit_interval
    codomain = constraints.unit_interval
    bijective = True

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def _call(self, x):
        inputs = x
        num_bins = self.logits.shape[-1]
        pdf = torch.softmax(self.logits, -1).expand(*inputs.shape, num_bins)
        cdf = torch.cumsum(pdf, dim=-1)
        cdf[..., -1] = 1.0
        cdf = F.pad(cdf, pad=(1, 0), mode="constant", value=0.0)
        bin_pos = inputs * num_bins
        bin_idx = torch.floor(bin_pos).long()
        bin_idx[bin_idx >= num_bins] = num_bins - 1
        alpha = bin_pos - bin_idx.to(inputs.dtype)
        input_pdfs = pdf.gather(-1, bin_idx[..., None])[..., 0]
        outputs = cdf.gather(-1, bin_idx[..., None])[..., 0]
        return outputs + alpha * input_pdfs

    def log_abs_det_jacobian(self, x, y):
        return torch.zeros_like(x)


def _nflows(th):
    return torch.distributions.TransformedDistribution(
        torch.distributions.Normal(th[..., 0], torch.ones((), dtype=D)),
        [torch.distributions.transforms.SigmoidTransform(), PWLinear(th[..., 1:])])


def _expectation_by_quadrature(f, loc):
    """E[f(sigmoid(loc + ε))], ε ~ N(0, 1), on a grid of 400001 points over [-9, 9]."""
    e = torch.linspace(-9, 9, 400001, dtype=D)
    w = torch.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi) * (e[1] - e[0])
    return (f(torch.sigmoid(loc + e)) * w).sum()


def _exact_d_loc(f, loc, h=1e-5):
    """d/dloc E[f(sigmoid(loc + ε))] by a central difference of the quadrature (no pathwise derivative in it)."""
    return (_expectation_by_quadrature(f, loc + h) - _expectation_by_quadrature(f, loc - h)) / (2 * h)


def _exact_nflows():
    """(d/dloc, d/dlogits) of E[x]: in the logits by autograd through the quadrature (the bin of a point does not
    depend on them: the spline is linear in its pdf and cdf there), in loc by a central difference."""
    th = torch.cat([torch.tensor([MU], dtype=D), TH0]).requires_grad_()
    g, = torch.autograd.grad(_expectation_by_quadrature(PWLinear(th[1:]), th[0].detach()), th)
    return torch.cat([_exact_d_loc(PWLinear(TH0), MU).reshape(1), g[1:]])


def _exact(case):
    if case == "HistICDF":  # E[x] = sum_k p_k (k + 1/2) / K
        p = TH0.softmax(-1)
        mids = (torch.arange(K, dtype=D) + 0.5) / K
        return p * (mids - (p * mids).sum())
    if case == "NISLinear":
        return torch.cat([_exact_d_loc(_spline, MU).reshape(1), torch.zeros(K - 1, dtype=D)])
    return _exact_nflows()


SPLINES = {"HistICDF": (HistICDF, TH0), "NISLinear": (NISLinear, torch.cat([torch.tensor([MU], dtype=D), TH0[1:]]))}


@pytest.mark.parametrize("case", sorted(SPLINES))
def test_a_continuous_piecewise_linear_spline_is_accepted_and_unbiased_at_order_1(case):
    build, th0 = SPLINES[case]
    torch.manual_seed(3)
    R = 4000
    est = storch.estimator("reparameterization", plate="x", n_samples=1)
    with storch.Graph():
        leaf, m = replicate(th0, R)
        x = est(build(m))
        storch.add_cost(x, name="c")
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(g, _exact(case), "gradient")


def test_nflows_linear_spline_as_a_user_transform_is_accepted_and_unbiased_at_order_1():
    """TransformedDistribution(Normal(loc, 1), [SigmoidTransform(), PWLinear(logits)]): storch re-aligns no user
    transform's parameters on a plate, so 50 independent graphs of 100 samples each give the estimates."""
    torch.manual_seed(4)
    estimates = []
    for _ in range(50):
        th = torch.cat([torch.tensor([MU], dtype=D), TH0]).requires_grad_()
        est = storch.estimator("reparameterization", plate="x", n_samples=100)
        with storch.Graph():
            x = est(_nflows(th))
            storch.add_cost(x, name="c")
            g, = torch.autograd.grad(storch.surrogate_loss(), th)
        estimates.append(g)
    assert_unbiased(torch.stack(estimates), _exact("nflows"), "gradient")


def test_the_watch_needs_a_detached_copy_for_a_straight_through():
    """A bin index added to a value that carries gradient is no straight-through by itself (splines); with a detached
    copy of a value that carries gradient added too it is, in any order of the terms. A detached value that only
    makes an index (searchsorted in cdf.detach()) or is reduced first (a stabilised softmax) is no such copy."""
    y = torch.tensor([[0.3, 0.6, 0.1]], dtype=D, requires_grad=True) * 1
    splines = (lambda y: _spline(y),
               lambda y: torch.searchsorted(y.cumsum(-1).detach(), torch.full((1, 1), 0.5, dtype=D)).to(D) + y,
               lambda y: (y * K).floor().to(D) - (y - y.detach().amax(-1, keepdim=True)).softmax(-1) * K,
               lambda y: y.detach().argmax(-1, keepdim=True).to(D) + y - y.detach().logsumexp(-1, keepdim=True))
    for f in splines:
        with RsampleComparisons() as watch:
            f(y)
        assert watch.jump is None
    def hard(y):
        return F.one_hot(y.detach().argmax(-1), 3).to(D)

    straight = (lambda y: hard(y) + (y - y.detach()), lambda y: (y - y.detach()) * 2.0 + hard(y),
                lambda y: y.detach().round() + (y - y.detach()).view(1, 3), lambda y: hard(y) - y.detach() + y,
                lambda y: torch.bernoulli(y.sigmoid()) + y.sigmoid() - y.sigmoid().detach(),
                lambda y: (y.floor() - y).detach() + y)
    for f in straight:
        with RsampleComparisons() as watch:
            f(y)
        assert watch.jump is not None
