"""L0-ARM network sparsification (Li & Ji 2019; the L0 gates of Louizos et al. 2018) written as a storch user would.

Binary gates z_j ~ Bernoulli(σ(φ_j)) multiply the hidden units of a small classifier; the cost is the cross-entropy
of the gated network, per data point on a data plate (storch takes its mean), plus λ Σ_j σ(φ_j), the expected L0
norm in closed form. The gates are global: ONE draw per minibatch, shared by every data point, so the gate node's
sample has no data-plate dim and the estimate is of E_z[mean_i loss_i(z)] with a single z per estimate.

(a) z-tests of each unbiased estimator's gradient in φ and in the network's weights against the enumerated
gradient over the 2^4 gate configurations (the kit's replicate plate holds the independent estimates); the same
with one draw per data point (unbiased for the same gradient, but another model: its sample is on the data plate).
(b) one estimate taken by hand: the score-function gradient of a single shared draw is mean_i loss_i(z) ∇ log p(z)
plus ∇_W mean_i loss_i(z), with the same z for every data point.
(c) DisARM's variance is not above ARM's on the same noise (docs/estimators/disarm.md).
(d) hard concrete, which storch has no estimator of: ``gumbel_softmax`` at temperature β on the gate's Bernoulli,
stretched and clamped in user code; its closed-form L0 term matches storch's samples, and the clamp's kink is
refused at order 2.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

import storch
import storch.testing as kit

F64 = torch.float64
G, D, C, B = 4, 2, 2, 5  # gates (hidden units), inputs, classes, data points
LAM = 0.05
_gen = torch.Generator().manual_seed(0)
X = torch.randn(B, D, generator=_gen, dtype=F64)
Y = torch.tensor([0, 1, 1, 0, 1])
THETA = torch.cat([torch.tensor([0.5, -0.3, 1.0, -1.2], dtype=F64),  # φ, then W1, b1, W2
                   torch.randn(G * D + G + C * G, generator=_gen, dtype=F64)])


def unpack(theta):
    return (theta[:G], theta[G:G + G * D].reshape(G, D), theta[G + G * D:2 * G + G * D],
            theta[2 * G + G * D:].reshape(C, G))


def loss_per_point(x, y, z, w1, b1, w2):
    """Cross-entropy of the gated network per data point (mean over the batch where x is plain)."""
    return F.cross_entropy((torch.tanh(x @ w1.T + b1) * z) @ w2.T, y)


def plate_names(t):
    return [p.name for p in t.plates]


def build(make, theta, per_point=False):
    phi, w1, b1, w2 = unpack(theta)
    if per_point:  # one draw per data point: the logits carry the data plate
        x, y, zero = storch.denote_independent((X, Y, torch.zeros(B, 1, dtype=F64)), 0, "data")
        z = make("gates")(Bernoulli(logits=phi + zero))
        assert "data" in plate_names(z), z.plates
    else:
        x, y = storch.denote_independent((X, Y), 0, "data")
        z = make("gates")(Bernoulli(logits=phi))
        assert "data" not in plate_names(z), z.plates  # one draw shared by the batch
    cost = loss_per_point(x, y, z, w1, b1, w2)
    assert "data" in plate_names(cost) and "gates" in plate_names(cost), cost.plates
    storch.add_cost(cost, name="ce")
    storch.add_cost(LAM * torch.sigmoid(phi).sum(), name="l0")


def exact(theta):
    """E_z[mean_i loss_i(z)] + λ Σ σ(φ), enumerating the 2^G gate configurations."""
    phi, w1, b1, w2 = unpack(theta)
    p = torch.sigmoid(phi)
    total = LAM * p.sum()
    for bits in itertools.product([0.0, 1.0], repeat=G):
        z = torch.tensor(bits, dtype=F64)
        total = total + torch.where(z > 0, p, 1 - p).prod() * loss_per_point(X, Y, z, w1, b1, w2)
    return total


def gates_model(per_point=False):
    return kit.Model("l0-gates" + ("-per-point" if per_point else ""), THETA,
                     lambda make, theta: build(make, theta, per_point), exact, lambda: [Bernoulli(logits=THETA[:G])])


UNBIASED = [("arm", {}), ("disarm", {}), ("score", {"n_samples": 2, "baseline": "leave_one_out"}),
            ("rebar", {}), ("relax", {})]


@pytest.mark.parametrize("name, options", UNBIASED, ids=[n for n, _ in UNBIASED])
def test_gradients_against_enumeration(name, options):
    # order 1: all 24 components (φ and the weights); order 0: the forward value
    report = kit.check_against_enumeration(name, models=[gates_model()], options=options, orders=(0, 1),
                                           n_replicates=2000)
    assert len(report.checks) == 2


@pytest.mark.parametrize("name, options", UNBIASED[:3], ids=[n for n, _ in UNBIASED[:3]])
def test_one_draw_per_data_point_is_unbiased_for_the_same_gradient(name, options):
    report = kit.check_against_enumeration(name, models=[gates_model(per_point=True)], options=options,
                                           orders=(1,), n_replicates=2000)
    assert len(report.checks) == 1


def test_one_estimate_uses_one_draw_for_the_whole_batch():
    torch.manual_seed(1)
    theta = THETA.clone().requires_grad_()
    phi, w1, b1, w2 = unpack(theta)
    est = storch.estimator("score", plate="gates", n_samples=1, baseline="none")
    with storch.Graph():
        x, y = storch.denote_independent((X, Y), 0, "data")
        z = est(Bernoulli(logits=phi))
        assert plate_names(z) == ["gates"] and z.tensor.shape == (1, G)
        cost = loss_per_point(x, y, z, w1, b1, w2)
        assert sorted(plate_names(cost)) == ["data", "gates"] and cost.tensor.numel() == B
        storch.add_cost(cost, name="ce")
        storch.backward()
    draw = z.tensor.reshape(G).detach()
    plain = THETA.clone().requires_grad_()
    phi0, *weights = unpack(plain)
    f = loss_per_point(X, Y, draw, *weights)  # the batch mean of the losses at the ONE draw
    by_hand = torch.autograd.grad(f.detach() * Bernoulli(logits=phi0).log_prob(draw).sum() + f, plain)[0]
    torch.testing.assert_close(theta.grad, by_hand)


def test_disarm_variance_not_above_arm():
    # docs/estimators/disarm.md: DisARM is E[ARM | x, x̃], so its variance is never above ARM's (same seed:
    # the same logistic noise); measured on φ: ARM 0.0239, DisARM 0.0199 (4000 estimates)
    var = {}
    for name in ("arm", "disarm"):
        report = kit.check_against_enumeration(name, models=[gates_model()], orders=(1,), n_replicates=4000)
        var[name] = float(report.checks[0].variance[:G].sum())
    assert var["disarm"] < var["arm"], var


GAMMA, ZETA, BETA = -0.1, 1.1, 2 / 3  # Louizos et al.'s stretch (γ, ζ) and temperature β


def hard_concrete(z):
    """Stretch the binary-concrete sample to (γ, ζ) and clamp it to [0, 1]: exact zeros and ones."""
    return (z * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def test_hard_concrete_from_gumbel_softmax():
    # gumbel_softmax on a Bernoulli(logits=log α) at temperature β draws σ((log α + L) / β), Louizos et al.'s
    # binary concrete s; the user stretches and clamps it. The L0 term P(gate > 0) = σ(log α - β log(-γ/ζ))
    # in closed form must match storch's samples (z-test over 20000 draws)
    log_alpha = torch.tensor([0.5, -0.3, 1.0, -1.2], dtype=F64, requires_grad=True)
    n = 20000
    est = storch.estimator("gumbel_softmax", plate="gates", n_samples=n, temperature=BETA)
    with storch.Graph():
        gate = hard_concrete(est(Bernoulli(logits=log_alpha)))
        open_ = (gate.tensor > 0).to(F64)
        closed_form = torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).detach()
        z = (open_.mean(0) - closed_form) / (open_.std(0) / math.sqrt(n))
        assert (z.abs() < 4).all(), z
        assert ((gate.tensor == 0) | (gate.tensor == 1)).to(F64).mean() > 0.1  # exact zeros and ones occur
        storch.add_cost(((gate - 0.3) ** 2).sum(), name="fit")
        storch.add_cost(0.1 * torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA)).sum(), name="l0")
        with pytest.raises(storch.OrderError):  # the clamp is a kink: the relaxed Hessian would be wrong
            storch.surrogate_loss(order=2)
        storch.backward()  # order 1 through the kink is exact for the relaxed objective
    assert torch.isfinite(log_alpha.grad).all() and (log_alpha.grad != 0).all()
