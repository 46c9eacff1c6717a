"""Advantage actor-critic (A2C) on a small finite MDP, written from the docs as a user would, against the exact
gradient of the finite-horizon MDP (dynamic programming over state distributions).

The MDP: 4 states, 2 actions, stochastic transitions P[s, a, s'], rewards R[s, a], γ = 0.9, T = 6, s_0 = 0, a tabular
softmax policy θ[s] and a tabular critic V[s]. The objective is J = E[Σ_t γ^t (r_t + β H(π(·|s_t)))].

How a user gives storch a state-dependent, per-step baseline (docs/partitions.md, "Actor-critic: a critic as the
per-step baseline"):
a callable ``baseline=`` returning V(s_t) and ``baseline="learned"`` with ``inputs=`` one_hot(s_t) are refused (s_t
depends on the episode's own actions); TD residuals as the costs, ``-γ^t (r_t + γ V(s_{t+1}) - V(s_t))`` with the
critic detached, telescope to the return minus V(s_0): the critic is the baseline γ^s V(s_s) of step s (GAE with
λ = 1), unbiased for any V. The critic is trained on the same step by its own regression, added with ``credit=False``.
GAE with λ < 1 weighs δ_k by λ^(k-s) for step s, which costs cannot express (as the restarted discount); a user writes
it as the PPO recipe does (docs/tutorials/policy-gradients.md): actions from the detached policy, the ratio
π_θ / π_⊥θ times the detached advantage in the cost. Its mean is computed exactly too (a DP over the same MDP):
storch gives that mean, which is J's gradient for λ = 1 or an exact time-dependent critic, and not for λ < 1 with a
wrong critic.

Measured (4000 estimates, seeds 1-5): gradient variance (trace) of an estimate from n = 4 episodes: no baseline
2.5, leave-one-out 1.7, the critic V_0 (the exact values at t = 0, stationary) 1.5, both 1.5; a wrong critic (V = ±5)
stays unbiased but multiplies the variance by ~7 (n = 1). GAE's exact relative bias |E[ĝ] - ∇J| / |∇J| with the
wrong critic: 0 (λ = 1), 2.1% (λ = 0.95), 24% (λ = 0.5), 54% (λ = 0); with V_0: at most 0.3%; with V_t: 0. The common
A2C entropy bonus, ∇H at the visited states only (``credit=False``), misses the score term of the states'
distribution: |z| = 15 against ∇ E[Σ γ^t H]. Episodes that end early (a 5-state MDP with a terminal state and a stop
action, with and without ``eos=``): the TD cost of the last step with V(terminal) = 0 and the costs after it masked is
unbiased for a critic whose terminal value is 5; keeping that value is biased (|z| = 22, 54% of the gradient's norm).
"""

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test
from model_checks import assert_names_a_section
from torch.distributions import Categorical

import storch

D = torch.float64
S, A, T, GAMMA, BETA = 4, 2, 6, 0.9, 0.1
_g = torch.Generator().manual_seed(1)
P = torch.rand(S, A, S, generator=_g, dtype=D) ** 2
P = P / P.sum(-1, keepdim=True)  # P[s, a, s']
R = torch.randn(S, A, generator=_g, dtype=D)  # r(s, a)
THETA = 0.5 * torch.randn(S, A, generator=_g, dtype=D)  # logits of π(· | s)
WRONG_V = 5 * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)  # a critic far from the values
N_EST = 4000


def state_distributions(pi, trans=P):
    """d_t(s) = P(s_t = s) for t = 0..T-1 under policy probabilities ``pi`` (S, A) and transitions ``trans``."""
    d = torch.zeros(len(pi), dtype=D)
    d[0] = 1.0
    out = []
    for _ in range(T):
        out.append(d)
        d = torch.einsum("s,sa,sab->b", d, pi, trans)
    return out


def objective(theta, reward=1.0, beta=BETA, trans=P, rewards=R):
    """J(θ) = Σ_t γ^t Σ_s d_t(s) (Σ_a π(a|s) reward r(s, a) + β H(π(·|s))), exact and differentiable."""
    pi = theta.softmax(-1)
    entropy = -(pi * pi.log()).sum(-1)
    per_state = reward * (pi * rewards).sum(-1) + beta * entropy
    return sum(GAMMA ** t * (d @ per_state) for t, d in enumerate(state_distributions(pi, trans)))


def exact_gradient(reward=1.0, beta=BETA, theta=THETA, trans=P, rewards=R):
    """∇θ of the expected cost -J at ``theta`` (THETA)."""
    theta = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(-objective(theta, reward, beta, trans, rewards), theta)
    return g


def exact_values(theta=THETA):
    """V_t(s) for t = 0..T (V_T = 0): the finite-horizon state values of the policy at θ (rewards only)."""
    pi = theta.softmax(-1)
    values = [torch.zeros(S, dtype=D)]
    for _ in range(T):
        values.insert(0, (pi * (R + GAMMA * P @ values[0])).sum(-1))
    return values


def gae_mean(lam, critic):
    """The exact mean of the GAE(λ) gradient estimate -Σ_t γ^t ∇log π(a_t|s_t) A_t with a critic ``critic(t)`` (S,).

    Q_t(s, a) = E[A_t | s_t = s, a_t = a] = r + γ P V_{t+1} - V_t(s) + γλ P U_{t+1}, U_t(s) = Σ_a π(a|s) Q_t(s, a);
    the mean is ∇θ of -Σ_t γ^t Σ_s d_t(s) Σ_a π_θ(a|s) ⊥Q_t(s, a) (d and Q held fixed)."""
    pi = THETA.softmax(-1)
    q, u = [None] * T, torch.zeros(S, dtype=D)
    for t in reversed(range(T)):
        v_next = critic(t + 1) if t < T - 1 else torch.zeros(S, dtype=D)
        q[t] = R + GAMMA * P @ v_next - critic(t)[:, None] + GAMMA * lam * P @ u
        u = (pi * q[t]).sum(-1)
    theta = THETA.clone().requires_grad_(True)
    surrogate = sum(GAMMA ** t * (d @ (theta.softmax(-1) * q[t]).sum(-1))
                    for t, d in enumerate(state_distributions(pi)))
    (g,) = torch.autograd.grad(-surrogate, theta)
    return g


def episode(th, est, critic=None, beta=BETA, entropy_credit=True):
    """One A2C episode for one sample (the docs' form); returns the states and rewards per step.

    The entropy bonus of step t is a cost at the step of s_t (credited to the actions that led there); the rewards
    are TD residuals with the critic detached, or plain rewards without a critic."""
    s, states, rewards = torch.tensor(0), [], []
    for t in range(T):
        policy = Categorical(logits=th[s])
        if beta:
            storch.add_cost(-beta * GAMMA ** t * policy.entropy(), name="entropy", credit=entropy_credit)
        a = est(policy)
        s_next = Categorical(probs=P[s, a]).sample()  # the environment: plain torch, not a node
        if critic is None:
            storch.add_cost(-GAMMA ** t * R[s, a], name="reward")
        else:
            v = critic.detach()  # the critic is the policy's baseline only: no gradient from the policy's costs
            v_next = v[s_next] if t < T - 1 else 0.0
            storch.add_cost(-GAMMA ** t * (R[s, a] + GAMMA * v_next - v[s]), name="td")
        states.append(s)
        rewards.append(R[s, a])
        s = s_next
    return states, rewards


def estimates(baseline, n, critic=None, seed=0, est=None, **kw):
    torch.manual_seed(seed)
    est = est or storch.estimator("score", plate="ep", n_samples=n, baseline=baseline)
    with storch.Graph():
        leaf, th = replicate(THETA, N_EST)
        episode(th, est, critic, **kw)
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return g.reshape(-1, S, A)


@pytest.mark.parametrize("baseline, n, critic", [
    ("none", 1, None),
    ("none", 1, "wrong"),  # any critic: unbiased
    ("none", 2, "values"),
    ("leave_one_out", 4, None),
    ("leave_one_out", 4, "values"),
])
def test_a2c_with_the_critic_as_baseline_is_unbiased(baseline, n, critic):
    v = {None: None, "wrong": WRONG_V, "values": exact_values()[0]}[critic]
    assert_unbiased(estimates(baseline, n, v), exact_gradient(), f"A2C ({baseline}, critic {critic})")


def test_moving_average_baseline_per_step_is_unbiased():
    torch.manual_seed(0)
    est = storch.estimator("score", plate="ep", n_samples=2, baseline="moving_average", decay=0.5)
    for _ in range(5):  # the averages adapt on earlier steps (storch.backward runs the update), θ unchanged
        with storch.Graph():
            _, th = replicate(THETA, 200)
            episode(th, est)
            storch.backward()
    # one per cost name and step; the entropy of s_t is at the step of a_(t-1), and H(π(·|s_0)) reaches no node
    assert len(est.moving_averages) == 2 * T - 1, est.moving_averages.keys()
    assert_unbiased(estimates(None, 2, seed=1, est=est), exact_gradient(), "A2C (moving average)")


def entropy_estimates(credit):
    """Estimates of ∇θ E[-Σ_t γ^t H(π(·|s_t))]: the entropy of s_t as a cost (at the step of a_(t-1))."""
    torch.manual_seed(0)
    est = storch.estimator("score", plate="ep", n_samples=1)
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("ignore", storch.UnusedSampleWarning)  # the last action reaches no entropy
        leaf, th = replicate(THETA, N_EST)
        s = torch.tensor(0)
        for t in range(T):
            policy = Categorical(logits=th[s])
            storch.add_cost(-GAMMA ** t * policy.entropy(), name="entropy", credit=credit)
            s = Categorical(probs=P[s, est(policy)]).sample()
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return g.reshape(-1, S, A)


def test_entropy_bonus_gradient_is_exact_only_with_credit():
    exact = exact_gradient(reward=0.0, beta=1.0)  # closed form: H(π(·|s)) under the exact d_t
    assert_unbiased(entropy_estimates(credit=True), exact, "entropy bonus, credited")
    # ∇H at the visited states alone (the usual A2C bonus) is not the gradient of E[Σ γ^t H(π(·|s_t))]
    assert not z_test(entropy_estimates(credit=False), exact, "entropy bonus, pathwise only").ok


def test_variance_leave_one_out_below_none():
    """docs/partitions.md: per-step leave-one-out baselines of the cost-to-go lower the variance."""
    var = {b: estimates(b, 4).var(0).sum().item() for b in ("none", "leave_one_out")}
    assert var["leave_one_out"] < 0.8 * var["none"], var


@pytest.mark.parametrize("lam, critic, unbiased", [
    (1.0, "wrong", True),
    (0.5, "wrong", False),
    (0.5, "values", True),  # the exact V_t: δ has mean 0 beyond the step, any λ is unbiased
])
def test_gae_gives_its_exact_mean(lam, critic, unbiased):
    values = exact_values()
    v = (lambda t: WRONG_V) if critic == "wrong" else (lambda t: values[t])
    torch.manual_seed(0)
    est = storch.estimator("score", plate="ep", n_samples=1)
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error")
        leaf, th = replicate(THETA, N_EST)
        s, ratios, deltas = torch.tensor(0), [], []
        for t in range(T):
            a = est(Categorical(logits=th[s].detach()))  # drawn from ⊥π: the node has no gradient
            log_p = Categorical(logits=th[s]).log_prob(a)
            ratios.append((log_p - log_p.detach()).exp())  # 1 in value, ∇log π in gradient
            s_next = Categorical(probs=P[s, a]).sample()
            deltas.append(R[s, a] + GAMMA * (v(t + 1)[s_next] if t < T - 1 else 0.0) - v(t)[s])
            s = s_next
        advantage = 0.0
        for t in reversed(range(T)):
            advantage = deltas[t] + GAMMA * lam * advantage
            storch.add_cost(-GAMMA ** t * ratios[t] * advantage.detach(), name=f"a{t}")
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    g = g.reshape(-1, S, A)
    mean = gae_mean(lam, v)
    assert_unbiased(g, mean, f"GAE({lam}), critic {critic}")
    exact = exact_gradient(beta=0.0)
    bias = ((mean - exact).norm() / exact.norm()).item()
    assert (bias < 1e-12) == unbiased, bias  # λ = 1 or exact values: J's gradient; else biased (24% here)


def test_baseline_subtracted_in_the_reward_cost_is_biased():
    """The pitfall: -γ^t (r_t - V(s_t)) as the cost of step t credits V(s_t) to a_<t as well (the TD form cancels it)."""
    torch.manual_seed(0)
    est = storch.estimator("score", plate="ep", n_samples=1)
    with storch.Graph():
        leaf, th = replicate(THETA, N_EST)
        s = torch.tensor(0)
        for t in range(T):
            a = est(Categorical(logits=th[s]))
            storch.add_cost(-GAMMA ** t * (R[s, a] - WRONG_V[s]), name="reward")
            s = Categorical(probs=P[s, a]).sample()
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert not z_test(g.reshape(-1, S, A), exact_gradient(beta=0.0), "V subtracted in the cost").ok


def a2c_step(theta, critic, critic_loss=True, detach=True, seed=0, n=64):
    """One training step: policy costs and the critic's regression on the discounted return-to-go; returns the raw
    states (n, T) and returns-to-go (n, T) of the episodes."""
    torch.manual_seed(seed)
    est = storch.estimator("score", plate="ep", n_samples=n)
    with storch.Graph():
        policy_critic = critic if not detach else critic.detach()
        # `episode` detaches its critic; the non-detached variant is written out by the user
        if detach:
            states, rewards = episode(theta, est, critic)
        else:
            s, states, rewards = torch.tensor(0), [], []
            for t in range(T):
                a = est(Categorical(logits=theta[s]))
                s_next = Categorical(probs=P[s, a]).sample()
                v_next = policy_critic[s_next] if t < T - 1 else 0.0
                storch.add_cost(-GAMMA ** t * (R[s, a] + GAMMA * v_next - policy_critic[s]), name="td")
                states.append(s)
                rewards.append(R[s, a])
                s = s_next
        returns, g = [None] * T, 0.0
        for t in reversed(range(T)):
            g = rewards[t] + GAMMA * g
            returns[t] = g
        if critic_loss:
            loss = sum((critic[states[t]] - returns[t].detach()) ** 2 for t in range(T))
            storch.add_cost(loss, name="critic", credit=False)
        storch.backward()
    raw = [x.tensor if type(x) is storch.PlateTensor else x.expand(n) for x in states]
    return torch.stack(raw, 1), torch.stack([x.tensor for x in returns], 1)


def test_critic_and_policy_gradients_do_not_leak():
    theta = THETA.clone().requires_grad_(True)
    critic = torch.randn(S, dtype=D, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    states, returns = a2c_step(theta, critic)
    # the critic's gradient is its own loss's, by hand: mean over episodes of Σ_t 2 (V(s_t) - G_t) at s_t
    residual = 2 * (critic.detach()[states] - returns)
    by_hand = torch.zeros(S, dtype=D).index_add_(0, states.reshape(-1), residual.reshape(-1)) / states.shape[0]
    torch.testing.assert_close(critic.grad, by_hand, rtol=1e-12, atol=1e-12)
    # the critic's loss sends nothing to the policy: the same episodes without it give the same policy gradient
    with_critic = theta.grad.clone()
    theta.grad = None
    a2c_step(theta, critic.detach().clone().requires_grad_(True), critic_loss=False)
    torch.testing.assert_close(theta.grad, with_critic, rtol=0, atol=0)
    # the pitfall: a critic not detached in the TD costs gets their gradient as well, the telescoped
    # Σ_t ∂c_t/∂V = +1 at V(s_0) (storch differentiates the costs as written; it cannot tell a baseline from a value)
    critic.grad = None
    states, returns = a2c_step(theta, critic, detach=False)
    residual = 2 * (critic.detach()[states] - returns)
    by_hand = torch.zeros(S, dtype=D).index_add_(0, states.reshape(-1), residual.reshape(-1)) / states.shape[0]
    torch.testing.assert_close(critic.grad - by_hand, F.one_hot(torch.tensor(0), S).to(D), rtol=0, atol=1e-12)


def test_a2c_training_raises_the_exact_return_and_fits_the_critic():
    theta = THETA.clone().requires_grad_(True)
    critic = torch.zeros(S, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([theta, critic], lr=0.05)
    start = objective(THETA).item()
    for step in range(40):
        opt.zero_grad()
        a2c_step(theta, critic, seed=step, n=16)
        opt.step()
    assert objective(theta.detach()).item() > start + 0.1, (start, objective(theta.detach()).item())

    def critic_error(v):  # E[Σ_t (V(s_t) - V_t(s_t))²] under the trained policy: the regression's reducible loss
        theta_ = theta.detach()
        values = exact_values(theta_)
        return sum(d @ (v - values[t]) ** 2 for t, d in enumerate(state_distributions(theta_.softmax(-1))))

    assert critic_error(critic.detach()) < 0.5 * critic_error(torch.zeros(S, dtype=D))


def test_a_finished_step_leaves_nothing_to_the_cyclic_collector():
    theta = THETA.clone().requires_grad_(True)
    critic = torch.zeros(S, dtype=D, requires_grad=True)
    a2c_step(theta, critic, n=8)
    gc.collect()
    a2c_step(theta, critic, n=8, seed=1)
    assert gc.collect() == 0


@pytest.mark.parametrize("kind", ["callable", "learned"])
def test_a_state_value_baseline_option_is_refused_and_points_to_td_costs(kind):
    critic = torch.zeros(S, dtype=D)
    states = {}
    options = {"baseline": (lambda node, cost: critic[states[node.step]])} if kind == "callable" else {
        "baseline": "learned"}
    est = storch.estimator("score", plate="ep", n_samples=4, **options)
    with pytest.raises(storch.OptionError) as info, storch.Graph():
        th = THETA.clone().requires_grad_(True)
        s = torch.tensor(0)
        for t in range(T):
            states[t] = s
            policy = Categorical(logits=th[s])
            a = est(policy, inputs=F.one_hot(s, S).to(D)) if kind == "learned" else est(policy)
            storch.add_cost(-GAMMA ** t * R[s, a], name="reward")
            s = Categorical(probs=P[s, a]).sample()
        storch.backward()
    message = str(info.value)
    assert "r_t + gamma * V(s_{t+1})" in message and "credit=False" in message, message
    assert "terminal state" in message, message
    assert_names_a_section(message)


def test_a_callable_baseline_with_gradient_is_detached():
    """A trainable baseline b_ψ in the callable gets no gradient from the surrogate (score.md: b is detached)."""
    w = torch.tensor(0.7, dtype=D, requires_grad=True)
    theta = THETA.clone().requires_grad_(True)
    est = storch.estimator("score", plate="ep", n_samples=4, baseline=lambda node, cost: w * 2.0)
    with storch.Graph():
        a = est(Categorical(logits=theta[0]))
        storch.add_cost(-R[0, a], name="reward")
        loss = storch.surrogate_loss()
    (g,) = torch.autograd.grad(loss, [w], allow_unused=True)
    assert g is None, g


# Episodes that end early (docs/partitions.md, "Actor-critic"): state END is terminal (absorbing, reward 0) and action
# STOP goes there; the other actions reach it too, by chance. Ended at step τ (s_{τ+1} = END), the TD cost of τ must
# read V(END) = 0 and the costs after τ are masked: then the costs from step s ≤ τ sum to Σ_{t=s..τ} γ^t r_t - γ^s V(s_s)
# (the return-to-go minus the baseline). Keeping γ V(s_{τ+1}) = γ V(END) in the cost of τ adds γ^{τ+1} V(END) to every
# step's cost-to-go: a reward for ending at τ, which the actions decide, so the gradient is that of
# E[Σ γ^t r_t + γ^{τ+1} V(END)] (biased unless V(END) = 0; a critic regressed on the live steps never learns V(END)).
SE, AE, END, STOP = 5, 3, 4, 2
_ge = torch.Generator().manual_seed(2)
PE = torch.rand(SE, AE, SE, generator=_ge, dtype=D) ** 2
PE[:, STOP] = F.one_hot(torch.tensor(END), SE).to(D)
PE[END] = F.one_hot(torch.tensor(END), SE).to(D)
PE = PE / PE.sum(-1, keepdim=True)
RE = torch.randn(SE, AE, generator=_ge, dtype=D)
RE[END] = 0.0
THETA_E = 0.5 * torch.randn(SE, AE, generator=_ge, dtype=D)
CRITIC_E = 5 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=D)  # V(END) = 5: what a critic never trained there holds


def ending_estimates(end_value_zero, eos=None, seed=0, done_by_eos=False):
    """A2C estimates on the MDP with a terminal state, the TD costs with the critic detached and masked after the
    end; ``end_value_zero``: V(s_{t+1}) = 0 when s_{t+1} is terminal (the recipe), else the critic's V(END).
    ``done_by_eos``: the episode ends where eos is drawn (the docs' ``done = a == eos``), not where END is reached
    (an episode that reaches END by another action goes on there, with its TD costs: reward 0, V(END) = 5)."""
    torch.manual_seed(seed)
    est = storch.estimator("score", plate="ep", n_samples=2, **({} if eos is None else {"eos": eos}))
    with storch.Graph():
        leaf, th = replicate(THETA_E, N_EST)
        v = CRITIC_E
        s, live = torch.tensor(0), torch.ones((), dtype=torch.bool)
        for t in range(T):
            a = est(Categorical(logits=th[s]))
            s_next = Categorical(probs=PE[s, a]).sample()
            done = a == eos if done_by_eos else s_next == END
            v_next = (torch.where(done, 0.0, v[s_next]) if end_value_zero else v[s_next]) if t < T - 1 else 0.0
            storch.add_cost(-GAMMA ** t * live * (RE[s, a] + GAMMA * v_next - v[s]), name="td")
            live = live & ~done
            s = s_next
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return g.reshape(-1, SE, AE)


@pytest.mark.parametrize("eos, done_by_eos", [(None, False), (STOP, False), (STOP, True)])
def test_a2c_with_an_episode_ending_early_is_unbiased_with_a_zero_terminal_value(eos, done_by_eos):
    # (eos=STOP with done at END gives eos=None's estimates exactly: STOP always reaches END, the costs after it are
    # 0 either way; done = a == eos, the docs' eos form, is another estimate: review r-53)
    exact = exact_gradient(beta=0.0, theta=THETA_E, trans=PE, rewards=RE)
    assert exact[:END].abs().max() > 0.1 and (exact[END] == 0).all()
    assert_unbiased(ending_estimates(True, eos, done_by_eos=done_by_eos), exact,
                    f"A2C, terminal state, V(END) = 0 (eos={eos}, done by eos: {done_by_eos})")


def test_a2c_keeping_the_critics_terminal_value_is_biased():
    exact = exact_gradient(beta=0.0, theta=THETA_E, trans=PE, rewards=RE)
    assert not z_test(ending_estimates(False, seed=1), exact, "A2C, terminal state, V(END) = 5").ok
