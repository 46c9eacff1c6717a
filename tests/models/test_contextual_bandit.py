"""A contextual bandit ported as a recommender team would: a policy π_θ(a | x) over K = 5 actions (a linear
model of the context), learned on-policy and off-policy from logs of a behaviour policy μ.

- On-policy: E_{a~π}[r] with ``score`` (leave-one-out baseline) and with ``importance`` whose proposal is a
  context-dependent behaviour policy μ(a | x) on the data plate (docs/estimators/importance.md, Options). The
  gradient and a Hessian-vector product are z-tested against the exact sum over the K actions (4 standard errors).
- Off-policy: logged (x, a, μ(a | x), r) are data, not a stochastic node: the recipe of
  docs/estimators/importance.md, "A replay buffer" (the logs on a data plate, the cost -(π(a|x) / μ(a|x)) r).
  IPS is unbiased for E_π[r] at every order when μ has full support; clipping the ratio is not (z > 10 shows it).
  Doubly robust (a reward model's direct method enumerated with ``expect``, plus IPS of the residual) is unbiased
  too, with less variance.
- Learning from 20k logged interactions: the policy value of the learned π, computed exactly from the known
  reward, against μ's and the optimal policy's.
"""

import pytest
import torch
from storch.testing import assert_unbiased, z_test
from torch.distributions import Categorical

import storch

D = torch.float64
d, K, B = 3, 5, 4  # context dim, actions, contexts per estimate
_g = torch.Generator().manual_seed(0)
U = torch.randn(d, K, generator=_g, dtype=D)  # mean reward r̄(x, a) = (x U + c)[a]
C = torch.randn(K, generator=_g, dtype=D)
X = torch.randn(B, d, generator=_g, dtype=D)  # the contexts the gradients are taken at
W0 = 0.5 * torch.randn(d, K, generator=_g, dtype=D)  # π_θ(a | x) = softmax(x W)[a]
WMU = 0.5 * torch.randn(d, K, generator=_g, dtype=D)  # the behaviour policy's weights
NOISE = 0.5
V = torch.randn(d * K, generator=_g, dtype=D)  # the direction of the Hessian-vector product


def mean_reward(x, a):
    """r̄(x, a), for plate tensors or plain ones."""
    return (x @ U + C).gather(-1, a.unsqueeze(-1)).squeeze(-1)


def behaviour_probs(x):
    """μ(· | x): a softmax policy mixed with the uniform one, so every action has probability >= 0.04."""
    return 0.8 * (x @ WMU).softmax(-1) + 0.2 / K


def exact_derivatives():
    """∇ and ∇²·V of the mean over X of E_{a~π}[r] = Σ_a π(a|x) r̄(x, a) (the sum over the K actions)."""
    w = W0.clone().requires_grad_(True)
    value = ((X @ w).softmax(-1) * (X @ U + C)).sum(-1).mean()
    (g,) = torch.autograd.grad(value, w, create_graph=True)
    (hv,) = torch.autograd.grad((g.reshape(-1) * V).sum(), w)
    return g.detach().reshape(-1), hv.reshape(-1)


def estimates(step, n_estimates):
    """``n_estimates`` independent (gradient, Hessian-vector product) estimates of the reward, each
    from one graph in which ``step(w)`` adds the cost (minus the reward) for the policy weights ``w``."""
    grads, hvps = [], []
    for _ in range(n_estimates):
        w = W0.clone().requires_grad_(True)
        with storch.Graph():
            step(w)
            (g,) = torch.autograd.grad(-storch.surrogate_loss(order=2), w, create_graph=True)
        (hv,) = torch.autograd.grad((g.reshape(-1) * V).sum(), w)
        grads.append(g.detach().reshape(-1))
        hvps.append(hv.reshape(-1))
    return torch.stack(grads), torch.stack(hvps)


def _score():
    return storch.estimator("score", plate="a", n_samples=4, baseline="leave_one_out")


BEHAVIOUR = {}  # this step's μ(· | x) on the data plate, read by the importance proposal (the docs' recipe)


def _importance():
    return storch.estimator("importance", plate="a", n_samples=4, proposal=lambda p: Categorical(probs=BEHAVIOUR["probs"]))


@pytest.mark.parametrize("make", [_score, _importance], ids=["score-leave_one_out", "importance-behaviour"])
def test_on_policy_gradient_is_unbiased_at_orders_1_and_2(make):
    est = make()

    def step(w):
        x = storch.denote_independent(X, 0, "data")
        BEHAVIOUR["probs"] = behaviour_probs(x)
        a = est(Categorical(logits=x @ w))
        r = mean_reward(x, a)
        storch.add_cost(-(r + NOISE * torch.randn_like(r)), name="reward")

    torch.manual_seed(1)
    grads, hvps = estimates(step, 300)
    exact_g, exact_hv = exact_derivatives()
    assert_unbiased(grads, exact_g, "on-policy gradient")
    assert_unbiased(hvps, exact_hv, "on-policy Hessian-vector product")


def logs(n_per_context, gen):
    """Logged interactions (x, a, μ(a | x), r): each context of X ``n_per_context`` times, a ~ μ(· | x)."""
    x = X.repeat(n_per_context, 1)
    probs = behaviour_probs(x)
    a = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    propensity = probs.gather(-1, a[:, None]).squeeze(-1)
    r = mean_reward(x, a) + NOISE * torch.randn(len(a), generator=gen, dtype=D)
    return x, a, propensity, r


def ips_step(gen, clip=None):
    def step(w):
        x, a, propensity, r = storch.denote_independent(logs(2, gen), 0, "logs")
        ratio = Categorical(logits=x @ w).log_prob(a).exp() / propensity
        if clip is not None:
            ratio = ratio.clamp(max=clip)
        storch.add_cost(-ratio * r, name="reward")
    return step


def test_ips_from_logged_propensities_is_unbiased_at_orders_1_and_2():
    grads, hvps = estimates(ips_step(torch.Generator().manual_seed(2)), 300)
    exact_g, exact_hv = exact_derivatives()
    assert_unbiased(grads, exact_g, "IPS gradient")
    assert_unbiased(hvps, exact_hv, "IPS Hessian-vector product")


def test_doubly_robust_with_expect_is_unbiased_and_has_less_variance():
    """Doubly robust: the direct method Σ_a π(a|x) q̂(x, a) of an imperfect reward model q̂, enumerated by
    ``expect`` on the logs' plate, plus IPS of the residual r - q̂(x, a). Unbiased at orders 1 and 2 for any q̂,
    and (q̂ close to r̄) with a lower variance than IPS on the same logs."""
    q_hat = U + 0.3 * torch.randn(d, K, generator=torch.Generator().manual_seed(6), dtype=D)
    direct = storch.estimator("expect", plate="dm")

    def step(w):
        x, a, propensity, r = storch.denote_independent(logs(2, gen), 0, "logs")
        pi = Categorical(logits=x @ w)
        a_dm = direct(pi)
        storch.add_cost(-(x @ q_hat + C).gather(-1, a_dm.unsqueeze(-1)).squeeze(-1), name="direct")
        residual = r - (x @ q_hat + C).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        storch.add_cost(-pi.log_prob(a).exp() / propensity * residual, name="correction")

    gen = torch.Generator().manual_seed(7)
    grads, hvps = estimates(step, 300)
    exact_g, exact_hv = exact_derivatives()
    assert_unbiased(grads, exact_g, "doubly robust gradient")
    assert_unbiased(hvps, exact_hv, "doubly robust Hessian-vector product")
    ips, _ = estimates(ips_step(torch.Generator().manual_seed(7)), 300)
    assert grads.var(0).sum() < 0.5 * ips.var(0).sum()


def test_clipped_ips_is_biased():
    """Why the docs leave clipping to the user: a clip that binds changes the mean (the z-test sees it)."""
    grads, _ = estimates(ips_step(torch.Generator().manual_seed(3), clip=1.5), 300)
    exact_g, _ = exact_derivatives()
    assert z_test(grads, exact_g).max_abs_z > 10


def test_learning_from_20k_logged_interactions():
    """IPS with Adam on 20,000 logged interactions (2 epochs of minibatches of 256): the learned policy's
    exact value (mean over 10,000 test contexts of Σ_a π(a|x) r̄(x, a)) closes most of the gap from μ's
    value to the optimal policy's."""
    gen = torch.Generator().manual_seed(4)
    n = 20_000
    x_all = torch.randn(n, d, generator=gen, dtype=D)
    probs = behaviour_probs(x_all)
    a_all = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    p_all = probs.gather(-1, a_all[:, None]).squeeze(-1)
    r_all = mean_reward(x_all, a_all) + NOISE * torch.randn(n, generator=gen, dtype=D)
    x_test = torch.randn(10_000, d, generator=gen, dtype=D)

    def value(pi):
        return float((pi * (x_test @ U + C)).sum(-1).mean())

    torch.manual_seed(5)
    policy = torch.nn.Linear(d, K, dtype=D)
    opt = torch.optim.Adam(policy.parameters(), lr=0.05)
    for epoch in range(2):
        for idx in torch.randperm(n, generator=gen).split(256):
            with storch.Graph():
                x, a, propensity, r = storch.denote_independent((x_all[idx], a_all[idx], p_all[idx], r_all[idx]), 0, "logs")
                ratio = Categorical(logits=policy(x)).log_prob(a).exp() / propensity
                storch.add_cost(-ratio * r, name="reward")
                opt.zero_grad()
                storch.backward()
            opt.step()
    with torch.no_grad():
        v_pi = value(policy(x_test).softmax(-1))
    v_mu, v_opt = value(behaviour_probs(x_test)), float((x_test @ U + C).max(-1).values.mean())
    assert v_pi > v_mu + 0.9 * (v_opt - v_mu), (v_mu, v_pi, v_opt)
