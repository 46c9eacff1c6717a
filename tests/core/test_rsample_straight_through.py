"""A straight-through sample inside a user's rsample is a jump, refused at order 1 (found by a porting tester,
p-struct): a Gumbel-Sinkhorn-like class whose rsample returns ``one_hot(soft.argmax(-1)) + soft - soft.detach()``
under 'reparameterization' was lowered to order 1 only (its argmax read as a comparison, a kink), so an order-1
surrogate went through with a gradient entry of +0.0046 +- 0.0006 where a common-random-numbers finite difference of
the hard objective gave about -0.040 (z ~ 70). A value piecewise constant in the parameters (argmax, argmin, sort or
topk indices, one_hot of them, a comparison or a rounding cast to float) added to one that carries gradient makes the
sample jump while autograd sees the soft part's derivative only: biased at order 1 already, as storch's own
gumbel_straight_through (``biased``) is. True kinks (relu written with a float mask, abs, clamp, sort values, max
values) stay accepted at order 1, z-tested against closed forms."""

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
                                                    r"'gumbel_straight_through'"):
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
    assert watch.jump is not None and watch.jump.startswith("add in ")
