"""A Gaussian mixture written with einsum, with amortised discrete assignments (issue 10).

For one point x (d,): q(z | x) = OneHotCategorical(logits = assign(x)); the component's mean,
precision P_k = L_k L_kᵀ and log-determinant are picked with ``einsum`` over the one-hot (or
relaxed) z; cost = -log N(x | μ_z, P_z⁻¹) (einsum Mahalanobis form) + KL(q(z | x) || π).
(a) the einsum terms on plate tensors equal a loop over plate entries; (b) three training steps
with score + leave-one-out and Gumbel-softmax; (c) gradients equal the hand-written batched
model's (its own einsum strings with batch letters) with the same samples.
"""

import math

import pytest
import torch
from torch import nn
from torch.distributions import OneHotCategorical

import storch
from model_checks import PLATES, assert_per_entry, assert_same_grads, assert_trains, grads, layout, lift
from storch_bench.handwritten import score_surrogate

K, DIM = 3, 2


class Mixture(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.assign = nn.Linear(DIM, K)
        self.means = nn.Parameter(torch.randn(K, DIM))
        self.raw_tril = nn.Parameter(0.3 * torch.randn(K, DIM, DIM))
        self.prior_logits = nn.Parameter(torch.zeros(K))

    def precision_factors(self):
        """L_k lower triangular with a positive diagonal (plain parameters, no plates)."""
        lower = torch.tril(self.raw_tril, -1)
        return lower + torch.diag_embed(torch.nn.functional.softplus(torch.diagonal(self.raw_tril, 0, -2, -1)) + 0.5)

    # -- the model for ONE point x (d,) and one assignment z (K,) ------------------------------

    def negative_log_likelihood(self, z, x):
        L = self.precision_factors()
        P = torch.einsum("kij,klj->kil", L, L)  # P_k = L_k L_kᵀ
        logdet = 2 * torch.log(torch.diagonal(L, 0, -2, -1)).sum(-1)  # log det P_k
        diff = x - torch.einsum("k,kd->d", z, self.means)
        maha = torch.einsum("i,k,kij,j->", diff, z, P, diff)
        return 0.5 * maha - 0.5 * torch.einsum("k,k->", z, logdet) + 0.5 * DIM * math.log(2 * math.pi)

    def kl(self, logits):
        logq = torch.log_softmax(logits, -1)
        return torch.einsum("k,k->", logq.exp(), logq - torch.log_softmax(self.prior_logits, -1))

    # -- by hand, batched: z (n, B, K), x (B, d) -> (n, B) --------------------------------------

    def batched_negative_log_likelihood(self, z, x):
        L = self.precision_factors()
        P = torch.einsum("kij,klj->kil", L, L)
        logdet = 2 * torch.log(torch.diagonal(L, 0, -2, -1)).sum(-1)
        diff = x - torch.einsum("nbk,kd->nbd", z, self.means)
        maha = torch.einsum("nbi,nbk,kij,nbj->nb", diff, z, P, diff)
        return 0.5 * maha - 0.5 * torch.einsum("nbk,k->nb", z, logdet) + 0.5 * DIM * math.log(2 * math.pi)


def _data(b, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], dtype=dtype)
    return centres[torch.randint(K, (b,), generator=g)] + 0.5 * torch.randn(b, DIM, generator=g, dtype=dtype)


def storch_model(model, est, points):
    x = storch.denote_independent(points, 0, "data")
    logits = model.assign(x)
    z = est(OneHotCategorical(logits=logits))
    storch.add_cost(model.kl(logits), name="kl")
    storch.add_cost(model.negative_log_likelihood(z, x), name="nll")
    return z


def test_einsum_terms_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    model = Mixture()
    z = lift(torch.softmax(torch.randn(3, 2, K), -1))
    assert_per_entry(model.negative_log_likelihood, z, lift(_data(2), PLATES[1:]))
    assert_per_entry(model.negative_log_likelihood, z, lift(torch.randn(3, 2, DIM)))
    assert_per_entry(model.kl, lift(torch.randn(2, K), PLATES[1:]))
    assert_per_entry(lambda a, b: torch.einsum("i,j->ij", a, b), lift(torch.randn(3, 2, 4)), lift(torch.randn(2, 5), PLATES[1:]))
    assert_per_entry(lambda a: torch.einsum("ii", a), lift(torch.randn(3, 2, 4, 4)))  # trace
    assert_per_entry(lambda a: torch.einsum("...ij->...ji", a), lift(torch.randn(3, 2, 4, 5)))  # ellipsis


@pytest.mark.parametrize("name, options", [("score", {"n_samples": 4, "baseline": "leave_one_out"}),
                                           ("gumbel_softmax", {"n_samples": 2, "temperature": 0.5})])
def test_three_training_steps(name, options):
    torch.manual_seed(1)
    model = Mixture()
    est = storch.estimator(name, plate="z", **options)
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    x = _data(16)
    def build(graph):
        z = storch_model(model, est, x)
        assert {p.name: p.size for p in z.plates} == {"z": options["n_samples"], "data": 16}

    assert_trains(model, opt, build)


def test_score_leave_one_out_gradient_equals_hand_written():
    torch.manual_seed(2)
    model = Mixture().double()
    x, n = _data(6, torch.float64), 4
    params = list(model.parameters())
    est = storch.estimator("score", plate="z", n_samples=n, baseline="leave_one_out")
    with storch.Graph():
        z = storch_model(model, est, x)
        g_storch = grads(storch.surrogate_loss(), params)
    zs = layout(z, ("z", "data"))
    logits = model.assign(x)
    logq = torch.log_softmax(logits, -1)
    kl = (logq.exp() * (logq - torch.log_softmax(model.prior_logits, -1))).sum(-1).mean()
    logp = OneHotCategorical(logits=logits).log_prob(zs)
    loss = kl + score_surrogate(logp, model.batched_negative_log_likelihood(zs, x), leave_one_out=True)
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_gumbel_softmax_gradient_equals_hand_written():
    torch.manual_seed(3)
    model = Mixture().double()
    x, n, tau = _data(6, torch.float64), 3, 0.5
    params = list(model.parameters())
    est = storch.estimator("gumbel_softmax", plate="z", n_samples=n, temperature=tau)
    with storch.Graph():
        z = storch_model(model, est, x)
        g_storch = grads(storch.surrogate_loss(), params)
    y = layout(z, ("z", "data")).detach()
    logits = model.assign(x)
    # storch's Gumbel noise, recovered up to a per-point constant (softmax ignores it): G = τ log y - logits
    relaxed = torch.softmax((logits - logits.detach()) / tau + torch.log(y), -1)
    torch.testing.assert_close(relaxed, y)
    logq = torch.log_softmax(logits, -1)
    kl = (logq.exp() * (logq - torch.log_softmax(model.prior_logits, -1))).sum(-1).mean()
    loss = kl + model.batched_negative_log_likelihood(relaxed, x).mean()
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)
