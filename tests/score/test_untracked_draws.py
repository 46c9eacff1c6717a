"""A plain draw (``dist.sample()``, ``torch.multinomial``, ...) on plate tensors from a distribution whose parameters
require grad carries no gradient to them: its score-function term is missing and the gradient is biased (scheduled
sampling ported with ``q.sample()``: storch's gradient of theta[1] was 0, the exact one [-0.037, 0.074, -0.037]).
storch warns (storch.UntrackedDrawWarning); detached parameters, environment noise and pathwise rsample do not."""

import warnings

import pytest
import torch
from torch.distributions import (
    Bernoulli, Binomial, Categorical, Geometric, NegativeBinomial, Normal, OneHotCategorical, Poisson,
)

import storch

FAMILIES = {
    "Categorical": lambda h: Categorical(logits=h),
    "OneHotCategorical": lambda h: OneHotCategorical(logits=h),
    "Bernoulli logits": lambda h: Bernoulli(logits=h[0]),
    "Bernoulli probs": lambda h: Bernoulli(probs=h[0].sigmoid()),
    "Categorical probs": lambda h: Categorical(probs=h.softmax(-1)),
    "Binomial": lambda h: Binomial(5, logits=h[0]),
    "Poisson": lambda h: Poisson(h[0].exp()),
    "Geometric": lambda h: Geometric(logits=h[0]),
    "NegativeBinomial": lambda h: NegativeBinomial(3.0, logits=h[0]),
    "Normal.sample": lambda h: Normal(h[0], 1.0),
}


def _learned_plate_parameters(seed=0):
    """Logits on the plate of a score node, computed from parameters that require grad."""
    torch.manual_seed(seed)
    theta = torch.zeros(3, requires_grad=True)
    z = storch.estimator("score", plate="z", n_samples=4)(Categorical(logits=theta))
    return theta * (z == 0).float() + theta


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_of_learned_plate_parameters_warns(family):
    with storch.Graph():
        h = _learned_plate_parameters()
        with pytest.warns(storch.UntrackedDrawWarning) as record:
            s = FAMILIES[family](h).sample()
        assert isinstance(s, storch.PlateTensor)
        # the warning points at the user's .sample() line, not into torch or storch
        assert all(w.filename == __file__ for w in record)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sample_of_detached_parameters_does_not_warn(family):
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error", storch.UntrackedDrawWarning)
        h = _learned_plate_parameters()
        s = FAMILIES[family](h.detach()).sample()
        assert isinstance(s, storch.PlateTensor)


def test_environment_noise_and_fixed_probabilities_do_not_warn():
    P = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error", storch.UntrackedDrawWarning)
        h = _learned_plate_parameters()
        z = storch.estimator("score", plate="a", n_samples=3)(Categorical(logits=h))
        s = Categorical(probs=P[z]).sample()                      # an environment's transition
        u = torch.rand_like(h)                                    # noise of the plate's shape
        y = (u < h.sigmoid()).float()                             # an inverse CDF by hand (h's own gradient: none)
        storch.add_cost((s == 1).float() + y.sum(), name="c")
        storch.backward()


def test_pathwise_rsample_does_not_warn_and_sample_does():
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error", storch.UntrackedDrawWarning)
        h = _learned_plate_parameters()
        x = Normal(h, 1.0).rsample()      # pathwise: it has a gradient
        assert x.requires_grad
        with pytest.warns(storch.UntrackedDrawWarning, match="reparameterization"):
            Normal(h, 1.0).sample()       # the same distribution's .sample() has none


def test_torch_draw_functions_on_learned_probabilities_warn():
    with storch.Graph():
        p = _learned_plate_parameters().softmax(-1)
        with pytest.warns(storch.UntrackedDrawWarning, match="torch.multinomial"):
            torch.multinomial(p, 1)
        with pytest.warns(storch.UntrackedDrawWarning, match="bernoulli"):
            torch.bernoulli(p)
        with pytest.warns(storch.UntrackedDrawWarning, match="poisson"):
            torch.poisson(p)
        with warnings.catch_warnings():
            warnings.simplefilter("error", storch.UntrackedDrawWarning)
            torch.bernoulli(p, 0.5)       # p gives the shape only
            torch.bernoulli(p.detach())


def test_message_names_the_fix():
    with storch.Graph():
        h = _learned_plate_parameters()
        with pytest.warns(storch.UntrackedDrawWarning) as record:
            Categorical(logits=h).sample()
    msg = str(record[0].message)
    assert msg.startswith("Categorical(...).sample()")
    assert "biased" in msg and "score-function term" in msg
    assert 'storch.estimator("score", plate="y")(dist)' in msg           # the node, for an unbiased gradient
    assert "Categorical(logits=logits.detach()).sample()" in msg          # the detached form, no gradient wanted
    assert "docs/partitions.md" in msg


def _scheduled_step(theta, node: bool):
    est = storch.estimator("score", plate="s0", n_samples=16, baseline="leave_one_out")
    with storch.Graph():
        s0 = est(Categorical(logits=theta[0]))
        q = Categorical(logits=theta[1] * (s0 == 0))
        if node:
            s1 = storch.estimator("score", plate="s1", n_samples=4, baseline="leave_one_out")(q)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", storch.UntrackedDrawWarning)
                s1 = q.sample()
        storch.add_cost((s1 == 1).float(), name="c")
        return torch.autograd.grad(storch.surrogate_loss(), theta)[0][1]


def test_the_plain_draw_is_biased_and_the_advised_node_is_not():
    """The warning's claim, z-tested: the gradient of theta[1] through q.sample() is 0 (exact: [-1/27, 2/27, -1/27]);
    with the draw made a score node it is unbiased."""
    torch.manual_seed(0)
    theta = torch.zeros(2, 3, requires_grad=True)
    t = theta.detach().clone().requires_grad_()
    p0 = t[0].softmax(-1)
    exact = torch.autograd.grad(p0[0] * t[1].softmax(-1)[1] + (1 - p0[0]) / 3, t)[0][1]
    assert torch.equal(_scheduled_step(theta, node=False), torch.zeros(3))
    g = torch.stack([_scheduled_step(theta, node=True) for _ in range(300)])
    se = g.std(0) / 300 ** 0.5
    z = (g.mean(0) - exact) / se
    assert (z.abs() < 4).all(), (g.mean(0), exact, z)
    assert (exact.abs() > 6 * se).all()   # the test can tell the plain draw's 0 from the exact gradient
