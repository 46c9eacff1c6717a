"""Second-order gradients through convolutions: storch.surrogate_loss(order=2), exact comparisons.

A tiny convolutional VAE (Conv2d encoder, ConvTranspose2d decoder, 2 Bernoulli latents):
- with ``expect`` (exact enumeration of the 4 joint values), the surrogate's gradient and
  Hessian-vector products equal those of the expected cost computed by hand in batched torch;
- with ``score`` + leave-one-out, they equal those of the hand-written DiCE surrogate with
  the same samples, mean[MagicBox(l)·C + (1 - MagicBox(l))·⊥b] (Theorem 2: the baseline term
  is multiplied by MagicBox, so it also reduces the variance of second derivatives).
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli

import storch
from model_checks import assert_same_grads, layout

N_LATENT = 2


class TinyConvVAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(-3), nn.Linear(32, N_LATENT))
        self.decoder = nn.Sequential(nn.Linear(N_LATENT, 8), nn.Tanh(), nn.Unflatten(-1, (2, 2, 2)),
                                     nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1))  # 2x2 -> 4x4

    def cost(self, z, x):  # one image (1, 4, 4)
        return F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum()

    def batched_cost(self, z, x):  # z (m, B, latent), x (B, 1, 4, 4) -> (m, B)
        m, b = z.shape[:2]
        logits = self.decoder(z.reshape(m * b, N_LATENT)).view(m, b, 1, 4, 4)
        return F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(-1)


def _setup(seed):
    torch.manual_seed(seed)
    model = TinyConvVAE().double()
    x = (torch.rand(3, 1, 4, 4) < 0.5).double()
    return model, x, list(model.parameters())


def storch_loss(model, est, x):
    xs = storch.denote_independent(x, 0, "data")
    z = est(Bernoulli(logits=model.encoder(xs)))
    storch.add_cost(model.cost(z, xs), name="reconstruction")
    return z, storch.surrogate_loss(order=2)


def first_and_second(loss, params, directions):
    """Gradient and the Hessian-vector product along ``directions``."""
    g = torch.autograd.grad(loss, params, create_graph=True)
    hv = torch.autograd.grad(sum((gi * v).sum() for gi, v in zip(g, directions)), params, allow_unused=True)
    return [gi.detach() for gi in g], [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, params)]


def test_expect_order_2_through_conv_equals_the_exact_expectation():
    model, x, params = _setup(0)
    directions = [torch.randn_like(p) for p in params]
    with storch.Graph():
        _, loss = storch_loss(model, storch.estimator("expect", plate="z"), x)
        g_s, h_s = first_and_second(loss, params, directions)
    values = torch.tensor(list(itertools.product([0.0, 1.0], repeat=N_LATENT)), dtype=x.dtype)  # (4, latent)
    q = Bernoulli(logits=model.encoder(x))  # (B, latent)
    logp = q.log_prob(values.unsqueeze(1)).sum(-1)  # (4, B)
    exact = (logp.exp() * model.batched_cost(values.unsqueeze(1).expand(-1, x.shape[0], -1), x)).sum(0).mean()
    g_e, h_e = first_and_second(exact, params, directions)
    names = [k for k, _ in model.named_parameters()]
    assert_same_grads(g_s, g_e, names, atol=1e-10, rtol=1e-8)
    assert_same_grads(h_s, h_e, names, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_score_order_2_through_conv_equals_hand_written_dice(baseline):
    model, x, params = _setup(1)
    directions = [torch.randn_like(p) for p in params]
    n = 4
    with storch.Graph():
        z, loss = storch_loss(model, storch.estimator("score", plate="z", n_samples=n, baseline=baseline), x)
        g_s, h_s = first_and_second(loss, params, directions)
    zs = layout(z, ("z", "data")).detach()
    logp = Bernoulli(logits=model.encoder(x)).log_prob(zs).sum(-1)  # (n, B)
    cost = model.batched_cost(zs, x)
    box = torch.exp(logp - logp.detach())  # MagicBox (DiCE)
    surrogate = box * cost
    if baseline == "leave_one_out":
        c = cost.detach()
        b = (c.sum(0, keepdim=True) - c) / (n - 1)
        surrogate = surrogate + (1 - box) * b  # Theorem 2: the control variate under MagicBox
    g_h, h_h = first_and_second(surrogate.mean(), params, directions)
    names = [k for k, _ in model.named_parameters()]
    assert_same_grads(g_s, g_h, names, atol=1e-10, rtol=1e-8)
    assert_same_grads(h_s, h_h, names, atol=1e-10, rtol=1e-8)


def test_expect_order_2_through_vmap_functions_equals_the_exact_expectation():
    # a Gaussian cost whose per-sample precision is picked by einsum and whose normaliser uses
    # logdet (both run through the vmap fallback): -log N(x | 0, P_z^-1), z one-hot of 3
    torch.manual_seed(2)
    dt = torch.float64
    assign = nn.Linear(2, 3).double()
    factors = torch.randn(3, 2, 2, dtype=dt, requires_grad=True)
    params = [*assign.parameters(), factors]
    points = torch.randn(4, 2, dtype=dt)
    eye = torch.eye(2, dtype=dt)

    def cost(z, x):  # one point x (2,), one assignment z (3,)
        p = torch.einsum("k,kij,klj->il", z, factors, factors) + eye
        return 0.5 * torch.einsum("i,ij,j->", x, p, x) - 0.5 * torch.logdet(p)

    directions = [torch.randn_like(p) for p in params]
    with storch.Graph():
        x = storch.denote_independent(points, 0, "data")
        z = storch.estimator("expect", plate="z")(torch.distributions.OneHotCategorical(logits=assign(x)))
        storch.add_cost(cost(z, x), name="nll")
        g_s, h_s = first_and_second(storch.surrogate_loss(order=2), params, directions)
    probs = torch.softmax(assign(points), -1)  # (B, 3)
    values = torch.eye(3, dtype=dt)
    costs = torch.stack([torch.stack([cost(v, xb) for xb in points]) for v in values])  # (3, B), plain loops
    exact = (probs.T * costs).sum(0).mean()
    g_e, h_e = first_and_second(exact, params, directions)
    assert_same_grads(g_s, g_e, ["weight", "bias", "factors"], atol=1e-10, rtol=1e-8)
    assert_same_grads(h_s, h_e, ["weight", "bias", "factors"], atol=1e-10, rtol=1e-8)


def test_score_leave_one_out_is_unbiased_to_order_2_through_conv():
    # z-test: R independent estimates (replicates of one image on an independent plate) of the
    # gradient and Hessian of E_z[C(z, x)] w.r.t. the image's 16 pixels, against enumeration
    from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

    model, x, _ = _setup(3)
    image = torch.rand(1, 4, 4, dtype=x.dtype)
    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")
    with storch.Graph():
        leaf, xs = replicate(image, 3000)
        z = est(Bernoulli(logits=model.encoder(xs)))
        storch.add_cost(model.cost(z, xs), name="reconstruction")
        grad, hess = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def expected(img):  # Σ_z p(z | x) C(z, x), the 4 joint values by hand
        values = torch.tensor(list(itertools.product([0.0, 1.0], repeat=N_LATENT)), dtype=img.dtype)
        logp = Bernoulli(logits=model.encoder(img.unsqueeze(0))).log_prob(values.unsqueeze(1)).sum(-1)
        return (logp.exp() * model.batched_cost(values.unsqueeze(1), img.unsqueeze(0))).sum()

    g_exact = torch.autograd.functional.jacobian(expected, image).reshape(-1)
    h_exact = torch.autograd.functional.hessian(expected, image).reshape(16, 16)
    assert_unbiased(grad, g_exact, "gradient")
    assert_unbiased(hess, h_exact, "Hessian")
    assert float(g_exact.abs().max()) > 0.1 and float(h_exact.abs().max()) > 0.01  # not a trivial comparison
