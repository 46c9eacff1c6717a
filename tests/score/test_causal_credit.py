"""Causal credit inside a partition (issue 15): a cost at step t is credited to steps <= t only.

An episode of T Bernoulli actions, a_t ~ Bernoulli(sigmoid(theta[a_{t-1}])) with a_{-1} = 0, and a
reward at every step, r_t = w_t c[a_{t-1}, a_t]. The exact expected return and its derivatives come
from a forward recursion over the two states (autograd through it). The reference is REINFORCE with
reward-to-go written by hand in torch on the same episodes.
"""

import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

C = torch.tensor([[1.0, -0.5], [0.3, 2.0]], dtype=torch.float64)  # c[previous action, action]
THETA = torch.tensor([0.4, -0.3], dtype=torch.float64)


def weights(T):
    return torch.linspace(1.0, -0.5, T, dtype=torch.float64)


def exact_return(theta, T):
    """E[Σ_t r_t] by the forward recursion over the previous action."""
    w = weights(T)
    state = torch.stack([torch.ones((), dtype=theta.dtype), torch.zeros((), dtype=theta.dtype)])
    total = 0.0
    p1 = torch.sigmoid(theta)  # P(a = 1 | previous action)
    trans = torch.stack([1 - p1, p1], 1)  # trans[previous, action]
    for t in range(T):
        joint = state.unsqueeze(1) * trans
        total = total + w[t] * (joint * C).sum()
        state = joint.sum(0)
    return total


def reward(prev, a, w_t):
    # c[prev, a] written with arithmetic, so it works on plate tensors and plain tensors alike
    return w_t * ((1 - prev) * (1 - a) * C[0, 0] + (1 - prev) * a * C[0, 1]
                  + prev * (1 - a) * C[1, 0] + prev * a * C[1, 1])


def storch_estimates(T, R, n, baseline, order=1, per_step_costs=True, seed=0, est=None, train=False):
    torch.manual_seed(seed)
    est = est or storch.estimator("score", plate="episode", n_samples=n, baseline=baseline)
    w = weights(T)
    with storch.Graph():
        leaf, th = replicate(THETA, R)
        prev = torch.zeros((), dtype=torch.float64)
        total = 0.0
        for t in range(T):
            a = est(Bernoulli(logits=th[0] + (th[1] - th[0]) * prev))
            r = reward(prev, a, w[t])
            if per_step_costs:
                storch.add_cost(r, name="reward")
            else:
                total = total + r
            prev = a
        if not per_step_costs:
            storch.add_cost(total, name="return")
        if train:  # storch.backward() runs update_parameters: the costs enter the moving averages
            storch.backward()
            return None
        return per_replicate_derivatives(storch.surrogate_loss(order), leaf, order)


def handwritten_estimates(T, R, n, leave_one_out, seed=1):
    """REINFORCE with reward-to-go in plain torch: Σ_s ∇log π(a_s) (G_s - b_s), G_s = Σ_{t>=s} r_t."""
    torch.manual_seed(seed)
    theta = THETA.expand(R, 2).clone().requires_grad_(True)
    w = weights(T)
    prev = torch.zeros(R, n, dtype=torch.float64)
    logps, rewards = [], []
    for t in range(T):
        logits = theta[:, :1] + (theta[:, 1:] - theta[:, :1]) * prev
        d = Bernoulli(logits=logits)
        a = d.sample()
        logps.append(d.log_prob(a))
        rewards.append(reward(prev, a, w[t]))
        prev = a
    logp = torch.stack(logps, -1)  # (R, n, T)
    r = torch.stack(rewards, -1)
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    if leave_one_out:
        to_go = to_go - (to_go.sum(1, keepdim=True) - to_go) / (n - 1)
    surrogate = (logp * to_go.detach()).sum(-1).mean(1).sum()
    (g,) = torch.autograd.grad(surrogate, theta)
    return g


def test_causal_credit_matches_reward_to_go_reinforce_20_steps():
    T, R = 20, 4000
    exact = torch.autograd.functional.jacobian(lambda th: exact_return(th, T), THETA)
    g_storch, = storch_estimates(T, R, 1, "none")
    g_hand = handwritten_estimates(T, R, 1, False)
    assert_unbiased(g_storch, exact, "storch causal gradient")
    assert_unbiased(g_hand, exact, "hand-written reward-to-go gradient")
    ratio = (g_storch.var(0) / g_hand.var(0)).max()
    assert ratio <= 1.1, f"variance ratio storch / hand-written causal REINFORCE = {ratio:.3f}"
    # without per-step costs (one cost for the return) every reward is credited to every action
    g_whole, = storch_estimates(T, R, 1, "none", per_step_costs=False)
    assert_unbiased(g_whole, exact, "whole-episode credit")
    assert (g_whole.var(0) / g_hand.var(0)).min() > 1.5


def test_causal_credit_with_leave_one_out_matches_handwritten():
    T, R, n = 20, 3000, 4
    exact = torch.autograd.functional.jacobian(lambda th: exact_return(th, T), THETA)
    g_storch, = storch_estimates(T, R, n, "leave_one_out")
    g_hand = handwritten_estimates(T, R, n, True)
    assert_unbiased(g_storch, exact, "storch causal gradient, leave-one-out")
    ratio = (g_storch.var(0) / g_hand.var(0)).max()
    assert ratio <= 1.1, f"variance ratio storch / hand-written causal leave-one-out = {ratio:.3f}"


def test_per_step_moving_average_baseline_is_unbiased_and_reduces_variance():
    T, R = 20, 3000
    exact = torch.autograd.functional.jacobian(lambda th: exact_return(th, T), THETA)
    est = storch.estimator("score", plate="episode", n_samples=1, baseline="moving_average", decay=0.5)
    w = weights(T)

    def run(seed, train=False):
        torch.manual_seed(seed)
        with storch.Graph():
            leaf, th = replicate(THETA, R)
            prev = torch.zeros((), dtype=torch.float64)
            for t in range(T):
                a = est(Bernoulli(logits=th[0] + (th[1] - th[0]) * prev))
                storch.add_cost(reward(prev, a, w[t]), name="reward")
                prev = a
            if train:  # storch.backward() runs update_parameters: the step's costs enter the averages
                storch.backward()
                return None
            g, = per_replicate_derivatives(storch.surrogate_loss(1), leaf, 1)
        return g

    for seed in range(3):  # warm up the per-step averages
        run(seed, train=True)
    assert len(est.moving_averages) == T  # one average per time step
    g = run(10)
    assert_unbiased(g, exact, "per-step moving average")
    g_none, = storch_estimates(T, R, 1, "none", seed=11)
    assert (g.var(0) / g_none.var(0)).max() < 0.8


def test_causal_credit_hessian_3_steps_with_baselines():
    T, R = 3, 4000
    t = THETA.clone()
    hess = torch.autograd.functional.hessian(lambda th: exact_return(th, T), t)
    grad = torch.autograd.functional.jacobian(lambda th: exact_return(th, T), t)
    for baseline, n in (("leave_one_out", 3), ("none", 2)):
        g, h = storch_estimates(T, R, n, baseline, order=2, seed=3)
        assert_unbiased(g, grad, f"{baseline} gradient")
        v = torch.tensor([0.7, -1.3], dtype=torch.float64)
        assert_unbiased(h @ v, hess @ v, f"{baseline} Hessian-vector product")
    # per-step moving averages (state from earlier graphs) at order 2
    est = storch.estimator("score", plate="episode", n_samples=1, baseline="moving_average", decay=0.5)
    for seed in range(2):
        storch_estimates(T, 500, 1, None, seed=10 + seed, est=est, train=True)
    assert len(est.moving_averages) == T
    g, h = storch_estimates(T, R, 1, None, order=2, seed=4, est=est)
    assert_unbiased(g, grad, "moving_average gradient")
    assert_unbiased(h, hess, "moving_average Hessian")


def test_cost_from_an_early_step_is_credited_to_that_step_only():
    # a cost computed from a_0 after the loop is at step 0: later actions get no credit at all
    torch.manual_seed(0)
    est = storch.estimator("score", plate="episode", n_samples=4)
    theta = torch.tensor([0.2, 0.5, -0.1], requires_grad=True)
    with storch.Graph():
        a0 = est(Bernoulli(logits=theta[0]))
        a1 = est(Bernoulli(logits=theta[1] + a0))
        a2 = est(Bernoulli(logits=theta[2] + a1))
        assert [p.step for p in a0.plates] == [0] and a2.plates[0].step == 2
        assert (a0 + a2).plates[0].step == 2
        storch.add_cost(a0 * 3.0)
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert g[1] == 0 and g[2] == 0 and g[0] != 0
