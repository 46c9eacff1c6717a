"""The semi-supervised VAE M2 (Kingma et al., 2014): a label y observed for some data points, latent for others.

For labelled (x, y): L(x, y) = E_q(z|x,y)[-log p(x | y, z)] + KL(q(z|x,y) || N(0, I)) - alpha log q(y | x);
for unlabelled x: U(x) = E_q(y|x)[L'(x, y) + log q(y | x)], L' without the classification term. Written as
docs/plates.md recommends when a latent (z) is drawn after y: two data plates, one per sub-batch, each with its
own z estimator, y an estimator call on the unlabelled plate only, each plate scaled by its own N. What this
adds to test_gaussian_mixture.py and tests/score/test_score_data_plate_costs.py: two data plates in one step, a
discrete node feeding a reparameterised one, and the estimator of y switched by its name.
(a) under ``expect`` the value and every gradient equal the hand-written enumeration on the same z draws;
(b) score + leave-one-out is unbiased for the gradient: z-tested against enumeration (|z| < 4, seeded);
(c) three training steps with each estimator of y, the model unchanged.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Normal, OneHotCategorical, kl_divergence

import storch
from model_checks import assert_same_grads, assert_trains, grads, layout

K, Z, H, D = 3, 2, 8, 6
ALPHA, N_LAB, N_UNL = 2.0, 30.0, 50.0


class M2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, K))
        self.enc = nn.Sequential(nn.Linear(D + K, H), nn.Tanh(), nn.Linear(H, 2 * Z))
        self.dec = nn.Sequential(nn.Linear(Z + K, H), nn.Tanh(), nn.Linear(H, D))

    def qz(self, x, y):
        h = self.enc(torch.cat((x, y), -1))
        return Normal(h[..., :Z], F.softplus(h[..., Z:]) + 1e-3)

    def rec_kl(self, x, y, z, qz):
        rec = -Bernoulli(logits=self.dec(torch.cat((z, y), -1))).log_prob(x).sum(-1)
        return rec + kl_divergence(qz, Normal(torch.zeros(Z), torch.ones(Z))).sum(-1)  # prior without z's plate


def step(m, est_y, xl, yl, xu):
    """One minibatch: labelled (xl, yl) and unlabelled xu on two data plates."""
    x, y = storch.denote_independent((xl, F.one_hot(yl, K).float()), 0, "lab")
    qz = m.qz(x, y)
    z = storch.estimator("reparameterization", plate="zl")(qz)
    storch.add_cost(N_LAB * m.rec_kl(x, y, z, qz), name="labelled")
    storch.add_cost(N_LAB * ALPHA * -OneHotCategorical(logits=m.cls(x)).log_prob(y), name="classify")
    x = storch.denote_independent(xu, 0, "unl")
    qy = OneHotCategorical(logits=m.cls(x))
    y = est_y(qy)
    qz = m.qz(x, y)
    z = storch.estimator("reparameterization", plate="zu")(qz)
    storch.add_cost(N_UNL * m.rec_kl(x, y, z, qz), name="unlabelled")
    # log q(y | x) as the one-hot's dot product: the same value for a discrete y, and defined for a relaxed one
    # (torch's OneHotCategorical.log_prob refuses a relaxed sample: docs/estimators/gumbel_softmax.md)
    storch.add_cost(N_UNL * (y * qy.logits.log_softmax(-1)).sum(-1), name="log_q")


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xl = torch.bernoulli(torch.full((3, D), 0.5), generator=g)
    yl = torch.tensor([0, 2, 1])
    xu = torch.bernoulli(torch.full((4, D), 0.5), generator=g)
    return xl, yl, xu


def test_expect_equals_the_handwritten_enumeration_on_the_same_draws():
    torch.manual_seed(0)
    m, (xl, yl, xu) = M2(), data()
    params = list(m.parameters())
    with storch.Graph():
        x, y = storch.denote_independent((xl, F.one_hot(yl, K).float()), 0, "lab")
        qz = m.qz(x, y)
        zl = storch.estimator("reparameterization", plate="zl")(qz)
        eps_l = layout((zl - qz.loc) / qz.scale, ["zl", "lab"]).detach()[0]
        storch.add_cost(N_LAB * m.rec_kl(x, y, zl, qz), name="labelled")
        storch.add_cost(N_LAB * ALPHA * -OneHotCategorical(logits=m.cls(x)).log_prob(y), name="classify")
        x = storch.denote_independent(xu, 0, "unl")
        qy = OneHotCategorical(logits=m.cls(x))
        y = storch.estimator("expect", plate="y")(qy)
        qz = m.qz(x, y)
        zu = storch.estimator("reparameterization", plate="zu")(qz)
        eps_u = layout((zu - qz.loc) / qz.scale, ["zu", "y", "unl"]).detach()[0]  # (K, Bu, Z)
        ys = layout(y, ["y", "unl"]).detach()  # (K, Bu, K): the enumerated one-hot values
        storch.add_cost(N_UNL * m.rec_kl(x, y, zu, qz), name="unlabelled")
        storch.add_cost(N_UNL * (y * qy.logits.log_softmax(-1)).sum(-1), name="log_q")
        loss = storch.surrogate_loss()
        got = grads(loss, params)

    # by hand: labelled terms at the same z; the unlabelled ones summed over y, weighted by q(y | x)
    yo = F.one_hot(yl, K).float()
    h = m.enc(torch.cat((xl, yo), -1))
    mu, sd = h[..., :Z], F.softplus(h[..., Z:]) + 1e-3
    z = mu + sd * eps_l
    rec = -Bernoulli(logits=m.dec(torch.cat((z, yo), -1))).log_prob(xl).sum(-1)
    lab = rec + kl_divergence(Normal(mu, sd), Normal(0.0, 1.0)).sum(-1)
    lab = lab - ALPHA * (yo * m.cls(xl).log_softmax(-1)).sum(-1)
    xk = xu.expand(K, *xu.shape)
    h = m.enc(torch.cat((xk, ys), -1))
    mu, sd = h[..., :Z], F.softplus(h[..., Z:]) + 1e-3
    z = mu + sd * eps_u
    rec = -Bernoulli(logits=m.dec(torch.cat((z, ys), -1))).log_prob(xk).sum(-1)
    log_q = (ys * m.cls(xu).log_softmax(-1)).sum(-1)  # (K, Bu)
    unl = (log_q.exp() * (rec + kl_divergence(Normal(mu, sd), Normal(0.0, 1.0)).sum(-1) + log_q)).sum(0)
    want_loss = N_LAB * lab.mean() + N_UNL * unl.mean()
    torch.testing.assert_close(loss, want_loss)
    assert_same_grads(got, grads(want_loss, params), [n for n, _ in m.named_parameters()])


def _estimates(m, est_y, n):
    xl, yl, xu = data()
    params = list(m.cls[-1].parameters())  # the classifier's last layer: where y's estimator matters
    out = []
    for _ in range(n):
        with storch.Graph():
            step(m, est_y, xl, yl, xu)
            out.append(torch.cat([g.flatten() for g in grads(storch.surrogate_loss(), params)]))
    return torch.stack(out)


def test_score_with_leave_one_out_is_unbiased_against_enumeration():
    """Both estimates carry z's noise, so the z-test compares the two means with both standard errors."""
    torch.manual_seed(1)
    m = M2()
    n = 300
    torch.manual_seed(2)
    exact = _estimates(m, storch.estimator("expect", plate="y"), n)
    torch.manual_seed(3)
    score = _estimates(m, storch.estimator("score", plate="y", n_samples=4, baseline="leave_one_out"), n)
    se = (exact.var(0) / n + score.var(0) / n).sqrt()
    z = (score.mean(0) - exact.mean(0)) / se
    assert se.min() > 0
    assert z.abs().max() < 4, z


@pytest.mark.parametrize("name", ["expect", "score", "gumbel_softmax"])
def test_trains_with_the_label_estimator_switched_by_name(name):
    torch.manual_seed(0)
    m, (xl, yl, xu) = M2(), data()
    est_y = storch.estimator(name, plate="y")
    assert_trains(m, torch.optim.Adam(m.parameters(), lr=1e-2), lambda graph: step(m, est_y, xl, yl, xu))
