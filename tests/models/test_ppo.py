"""PPO and off-policy replay updates on a small tabular MDP, written from the docs as a user would (score family
and core only), against exact values: every trajectory of the MDP is enumerated (3 states, 2 actions, T = 4: 432
trajectories), so the mean of any estimate computed from stored episodes is an exact sum.

How a user evaluates a policy-gradient surrogate on **stored** actions (drawn earlier, by an older or another
policy): nothing is drawn in the update step, so no estimator is involved. The rollout is one step (``score`` from
the detached policy, the docs' PPO recipe), stored as plain tensors (``x.tensor.detach()``); each update is a step of
its own with the stored transitions on a data plate (``storch.denote_independent``) and the ratio
π_θ(a | s) / π_old(a | s), from the stored log-probabilities, in the cost (docs/tutorials/policy-gradients.md,
"PPO on an MDP"). Measured here:

- the first epoch's minibatch gradient (r = 1) with the cost weighted by γ^t and GAE(λ = 1) is unbiased for the
  policy gradient ∇J (any critic); the common form, unweighted with λ = 0.95 and an inexact critic, is unbiased for
  its own exact mean, which is 19% of |∇J| away from it (|z| 8.8 against ∇J; storch differentiates what was written);
- at θ ≠ θ_old (a later epoch) it is unbiased for the gradient of the clipped surrogate, which the unclipped one is
  not;
- on the same episodes, the stored update of the first epoch equals storch's on-policy surrogate (the episode drawn
  from the live policy with TD residuals as its step costs) to float precision, times T (a mean over transitions);
- off-policy: episodes drawn from a behaviour policy μ and stored (a replay buffer), with the per-decision
  importance weights Π_{k≤t} π(a_k | s_k) / μ(a_k | s_k) in the costs, are unbiased for ∇J at θ ≠ μ, at orders 1 and
  2; V-trace-lite (truncated weights ρ̄ = c̄ = 1, a critic) is unbiased for its own exact mean only, which is not ∇J;
  drawn on the fly, one ``importance`` estimator per step (``n_samples=1``) with μ as the proposal is unbiased too;
- the errors of the natural first attempts (the rollout's sample reused in the update step, a stored action passed
  to the estimator, one ``importance`` estimator called at every step) say what to write instead; the tutorial's
  generator reset (a bandit's) replays storch's draws but not an environment's plain-torch transitions.

Measured (4000 estimates per z-test): max |z| 1.4 (first minibatch against ∇J / T), 0.7 (the common form against its
mean), 0.9 (θ ≠ θ_old against the clipped surrogate; 61 against the unclipped), 2.7 and 1.7 (per-decision weights,
gradient and Hessian), 2.3 (V-trace against its mean; 9.0 against ∇J, its mean 41% of |∇J| away). Training (40
rollouts of 16 episodes, 4 epochs of 4 minibatches, Adam): J from 3.46 to 4.26, where the best tabular policy's is
4.35; the critic's error against the values fell from 31 (V = 0) to 2.6.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from model_checks import assert_names_a_section
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate, z_test
from torch.distributions import Categorical

import storch

D = torch.float64
S, A, T, GAMMA, EPS = 3, 2, 4, 0.9, 0.2
_g = torch.Generator().manual_seed(7)
P = torch.rand(S, A, S, generator=_g, dtype=D) ** 2
P = P / P.sum(-1, keepdim=True)  # P[s, a, s']
R = torch.randn(S, A, generator=_g, dtype=D)  # r(s, a)
THETA = 0.5 * torch.randn(S, A, generator=_g, dtype=D)  # θ_old: the policy that collected the rollout
CRITIC = torch.tensor([0.5, -1.0, 2.0], dtype=D)  # a tabular critic V(s), far from the values
MU = torch.tensor([[0.4, -0.4], [0.0, 0.0], [-0.5, 0.5]], dtype=D)  # a behaviour policy's logits
AWAY = THETA + torch.tensor([[0.5, -0.4], [0.0, 0.6], [-0.3, 0.2]], dtype=D)  # a θ of a later update
N_EST = 4000
ITERATIONS = 40


# -- exact values: every trajectory (s_0 = 0, a_0, s_1, ..., a_{T-1}) enumerated ---------------------------------

def _trajectories():
    rows = [((0, *nxt), acts) for acts in itertools.product(range(A), repeat=T)
            for nxt in itertools.product(range(S), repeat=T - 1)]
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


TS, TA = _trajectories()  # (432, T) states and actions
W = GAMMA ** torch.arange(T, dtype=D)  # the discount of each step, γ^t


def trajectory_probs(logits):
    """The probability of each enumerated trajectory under the policy ``logits`` (S, A)."""
    pi = logits.softmax(-1)
    return pi[TS, TA].prod(-1) * P[TS[:, :-1], TA[:, :-1], TS[:, 1:]].prod(-1)


def objective(theta):
    """J(θ) = E[Σ_t γ^t r_t], exact and differentiable."""
    return (trajectory_probs(theta) * (W * R[TS, TA]).sum(-1)).sum()


def exact_grad(fn, at):
    th = at.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(th), th)
    return g


def exact_hessian(fn, at):
    return torch.autograd.functional.hessian(fn, at.clone()).reshape(S * A, S * A)


def gae_of(states, actions, critic, lam):
    """GAE(λ) of plain (…, T) trajectories, V(s_T) = 0 (the horizon ends the episode): the enumeration's side."""
    v_next = torch.cat([critic[states[..., 1:]], torch.zeros_like(critic[states[..., :1]])], -1)
    delta = R[states, actions] + GAMMA * v_next - critic[states]
    adv, out = torch.zeros_like(delta[..., 0]), []
    for t in reversed(range(T)):
        adv = delta[..., t] + GAMMA * lam * adv
        out.insert(0, adv)
    return torch.stack(out, -1)


def ppo_objective(theta, lam, discount=True, eps=EPS, critic=CRITIC):
    """The exact mean of the user's minibatch cost (a mean over transitions) on rollouts of θ_old = THETA."""
    adv = gae_of(TS, TA, critic, lam)
    r = (theta.log_softmax(-1)[TS, TA] - THETA.log_softmax(-1)[TS, TA]).exp()
    w = W if discount else torch.ones(T, dtype=D)
    return (trajectory_probs(THETA) * -(w * torch.min(r * adv, r.clamp(1 - eps, 1 + eps) * adv)).mean(-1)).sum()


# -- the user's code (docs/tutorials/policy-gradients.md, "PPO on an MDP") --------------------------------------

def rollout(logits, critic, est, lam, td_costs=False):
    """One rollout step for one episode (per-sample code): the policy ``logits[s]`` (θ_old, detached by the caller
    for PPO), plain-torch transitions, GAE(λ) from the critic. Returns the stored batch as plain tensors, plate dims
    first: states, actions, log π_old(a | s), advantages, returns (V + A), time steps, each (episodes, T).
    ``td_costs``: also add the TD residuals as the step costs (the on-policy actor-critic recipe)."""
    s, states, actions, log_old, deltas = torch.tensor(0), [], [], [], []
    for t in range(T):
        policy = Categorical(logits=logits[s])
        a = est(policy)
        s_next = Categorical(probs=P[s, a]).sample()  # the environment: plain torch
        v_next = critic[s_next] if t < T - 1 else torch.zeros((), dtype=D)
        deltas.append(R[s, a] + GAMMA * v_next - critic[s])
        if td_costs:
            storch.add_cost(-GAMMA ** t * deltas[-1], name="td")
        states.append(s)
        actions.append(a)
        log_old.append(policy.log_prob(a).detach())
        s = s_next
    adv, advantages = 0.0, [None] * T
    for t in reversed(range(T)):
        adv = deltas[t] + GAMMA * lam * adv
        advantages[t] = adv
    batch = [torch.stack(x, -1) for x in (states, actions, log_old, advantages)]
    batch.append(batch[3] + critic[batch[0]])  # the critic's regression targets
    raw = [x.tensor.detach() for x in batch]  # plain tensors, taken before the step ends
    return (*raw, W.expand(raw[0].shape))  # and the discount γ^t of each transition


def ppo_cost(theta, minibatch, discount=True, eps=EPS, critic=None):
    """One minibatch's clipped surrogate: the stored transitions on a data plate, the ratio from the stored
    log-probabilities; weighted by γ^t for the gradient of the discounted return (``discount``). With a ``critic``,
    its regression on the stored returns too (``credit=False``). Returns the ratios."""
    s, a, log_old, adv, returns, discount_t = storch.denote_independent(minibatch, 0, "batch")
    ratio = (Categorical(logits=theta[s]).log_prob(a) - log_old).exp()
    weight = discount_t if discount else 1.0
    storch.add_cost(-weight * torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv), name="ppo")
    if critic is not None:
        storch.add_cost(0.5 * (critic[s] - returns) ** 2, name="critic", credit=False)
    return ratio


def stored_rollouts(logits, lam, episodes, critic=CRITIC, seed=0):
    torch.manual_seed(seed)
    est = storch.estimator("score", plate="ep", n_samples=episodes)
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a rollout step with no cost warns about nothing
        return rollout(logits, critic, est, lam)


def first_minibatch_estimates(theta, lam, discount=True, n=4, m=8, seed=0):
    """N_EST independent estimates, each the gradient of one minibatch of m transitions drawn at random from its
    own rollout of n episodes of θ_old (the user's ``ppo_cost``, run per replicate on a data plate)."""
    buffers = stored_rollouts(THETA.detach(), lam, N_EST * n, seed=seed)
    flat = [x.reshape(N_EST, n * T) for x in buffers]  # replicate i: episodes i*n .. i*n + n - 1, flattened
    pick = torch.rand(N_EST, n * T).argsort(-1)[:, :m]  # one shuffled minibatch per replicate
    with storch.Graph():
        leaf = theta.detach().expand(N_EST, S, A).clone().requires_grad_(True)
        th, *minibatch = storch.denote_independent((leaf, *(x.gather(1, pick) for x in flat)), 0, "replicate")
        ppo_cost(th, minibatch, discount)
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return g.reshape(-1, S, A)


def test_the_first_epoch_is_the_policy_gradient():
    """r = 1: the minibatch gradient with γ^t weights and GAE(λ = 1) has mean -∇J / T (a mean over T steps), for a
    critic far from the values (λ = 1 telescopes it to a baseline)."""
    exact = -exact_grad(objective, THETA) / T
    torch.testing.assert_close(exact, exact_grad(lambda th: ppo_objective(th, 1.0), THETA), rtol=1e-12, atol=0)
    assert_unbiased(first_minibatch_estimates(THETA, 1.0), exact, "PPO, epoch 0, γ^t weights, GAE(1)")


def test_the_common_form_has_its_own_mean_which_is_not_the_policy_gradient():
    """Without γ^t and with GAE(0.95) and an inexact critic (PPO as usually written): storch gives the form's exact
    mean, which is another vector than ∇J (the bias is PPO's, not storch's)."""
    g = first_minibatch_estimates(THETA, 0.95, discount=False, n=16, m=64, seed=1)  # whole rollouts: less variance
    assert_unbiased(g, exact_grad(lambda th: ppo_objective(th, 0.95, discount=False), THETA), "common PPO form")
    assert not z_test(g, -exact_grad(objective, THETA) / T, "common PPO form against ∇J").ok


def test_a_later_epoch_is_the_clipped_surrogates_gradient():
    r = (AWAY.log_softmax(-1) - THETA.log_softmax(-1)).exp()
    assert ((r > 1 + EPS) | (r < 1 - EPS)).any() and ((r < 1 + EPS) & (r > 1 - EPS)).any(), r  # the clip binds somewhere
    g = first_minibatch_estimates(AWAY, 0.95, seed=2)
    assert_unbiased(g, exact_grad(lambda th: ppo_objective(th, 0.95), AWAY), "PPO at θ ≠ θ_old")
    unclipped = exact_grad(lambda th: ppo_objective(th, 0.95, eps=float("inf")), AWAY)
    assert not z_test(g, unclipped, "against the unclipped surrogate").ok


def test_the_stored_update_equals_the_on_policy_surrogate_on_the_same_episodes():
    """The rollout drawn from the LIVE policy with TD residuals as the step costs (docs/partitions.md, Actor-critic)
    and, from the same episodes, the stored update of the first epoch (all transitions, GAE(1), γ^t): their gradients
    agree to float precision, times T."""
    torch.manual_seed(3)
    theta = THETA.clone().requires_grad_(True)
    est = storch.estimator("score", plate="ep", n_samples=16)
    with storch.Graph():
        buffer = rollout(theta, CRITIC, est, 1.0, td_costs=True)
        (on_policy,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    with storch.Graph():
        ppo_cost(theta, [x.reshape(-1) for x in buffer])
        (stored,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert on_policy.abs().max() > 1e-2
    torch.testing.assert_close(T * stored, on_policy, rtol=1e-12, atol=1e-12)


# -- training: the whole loop ---------------------------------------------------------------------------------------

def best_stationary_return():
    """max J over the deterministic tabular policies (one action per state, as θ[s] can express)."""
    return max(objective(torch.eye(A, dtype=D)[list(choice)] * 50).item()
               for choice in itertools.product(range(A), repeat=S))


def critic_error(theta, v):
    """E[Σ_t (V(s_t) - V_t(s_t))²] under the policy θ, V_t the finite-horizon values (the regression's targets' mean)."""
    pi, values, d = theta.softmax(-1), [torch.zeros(S, dtype=D)], torch.eye(S, dtype=D)[0]
    for _ in range(T):
        values.insert(0, (pi * (R + GAMMA * P @ values[0])).sum(-1))
    total = torch.zeros((), dtype=D)
    for t in range(T):
        total = total + d @ (v - values[t]) ** 2
        d = torch.einsum("s,sa,sab->b", d, pi, P)
    return total.item()


def test_ppo_training_raises_the_exact_return_and_fits_the_critic():
    torch.manual_seed(4)
    theta = torch.nn.Parameter(THETA.clone())
    critic = torch.nn.Parameter(torch.zeros(S, dtype=D))
    opt = torch.optim.Adam([theta, critic], lr=0.05)
    est = storch.estimator("score", plate="ep", n_samples=16)
    start, outside = objective(THETA).item(), []
    for iteration in range(ITERATIONS):
        with storch.Graph():
            buffer = rollout(theta.detach(), critic.detach(), est, 0.95)  # θ_old and the critic: fixed for the batch
        flat = [x.reshape(-1) for x in buffer]
        for epoch in range(4):
            for k, idx in enumerate(torch.randperm(len(flat[0])).split(16)):
                minibatch = [x[idx] for x in flat]
                with storch.Graph():
                    ratio = ppo_cost(theta, minibatch, critic=critic)
                    opt.zero_grad()
                    storch.backward()
                opt.step()
                if epoch == k == 0:
                    assert (ratio.tensor == 1).all()  # the first minibatch: θ = θ_old
                else:
                    outside.append(((ratio.tensor - 1).abs() > EPS).double().mean().item())
    assert max(outside) > 0.1, max(outside)  # later minibatches: the clip binds
    after, best = objective(theta.detach()).item(), best_stationary_return()
    assert after - start > 0.8 * (best - start), (start, after, best)
    # the critic's error against the exact values, on the states the trained policy visits, fell
    assert critic_error(theta.detach(), critic.detach()) < 0.5 * critic_error(theta.detach(), torch.zeros(S, dtype=D))


# -- off-policy: a replay buffer of episodes drawn from a behaviour policy μ ------------------------------------------

def per_decision_cost(theta, episodes):
    """The stored episodes on a data plate; the reward of step t weighted by Π_{k≤t} π_θ(a_k | s_k) / μ(a_k | s_k)."""
    s, a, log_mu, r = storch.denote_independent(episodes, 0, "episodes")
    ratio = (Categorical(logits=theta[s]).log_prob(a) - log_mu).exp()
    storch.add_cost(-(W * ratio.cumprod(-1) * r).sum(-1), name="return")


def vtrace_cost(theta, episodes, critic=CRITIC, rho_bar=1.0, c_bar=1.0):
    """V-trace (Espeholt et al., 2018) policy gradient on the stored episodes: truncated weights ρ_t = min(ρ̄, π/μ),
    c_t = min(c̄, π/μ), targets v_t = V(s_t) + ρ_t δ_t + γ c_t (v_{t+1} - V(s_{t+1})), and the cost
    -Σ_t γ^t ρ_t log π(a_t | s_t) (r_t + γ v_{t+1} - V(s_t)) (weights and targets detached)."""
    s, a, log_mu, r = storch.denote_independent(episodes, 0, "episodes")
    log_pi = Categorical(logits=theta[s]).log_prob(a)
    ratio = (log_pi - log_mu).exp().detach()
    rho, c = ratio.clamp(max=rho_bar), ratio.clamp(max=c_bar)
    v = critic[s]
    v_next = torch.cat([v[1:], torch.zeros(1, dtype=D)])
    delta = rho * (r + GAMMA * v_next - v)
    targets, acc = [None] * T, torch.zeros((), dtype=D)  # acc: v_{t+1} - V(s_{t+1})
    for t in reversed(range(T)):
        acc = delta[t] + (GAMMA * c[t] * acc if t < T - 1 else 0.0)
        targets[t] = v[t] + acc
    vs_next = torch.cat([torch.stack(targets[1:]), torch.zeros(1, dtype=D)])
    storch.add_cost(-(W * rho * log_pi * (r + GAMMA * vs_next - v)).sum(-1), name="vtrace")


def vtrace_exact_mean(theta, rho_bar=1.0, c_bar=1.0):
    """The exact mean of ``vtrace_cost``'s gradient over episodes of μ (the same formula on the enumeration)."""
    log_pi = theta.log_softmax(-1)[TS, TA]
    ratio = (log_pi - MU.log_softmax(-1)[TS, TA]).exp().detach()
    rho, c = ratio.clamp(max=rho_bar), ratio.clamp(max=c_bar)
    v = CRITIC[TS]
    v_next = torch.cat([v[:, 1:], torch.zeros(len(TS), 1, dtype=D)], 1)
    r = R[TS, TA]
    delta = rho * (r + GAMMA * v_next - v)
    targets, acc = [None] * T, torch.zeros(len(TS), dtype=D)
    for t in reversed(range(T)):
        acc = delta[:, t] + (GAMMA * c[:, t] * acc if t < T - 1 else 0.0)
        targets[t] = v[:, t] + acc
    vs_next = torch.cat([torch.stack(targets[1:], 1), torch.zeros(len(TS), 1, dtype=D)], 1)
    return (trajectory_probs(MU) * -(W * rho * log_pi * (r + GAMMA * vs_next - v)).sum(-1)).sum()


def replay_buffer(episodes, seed):
    """Episodes of μ stored as they were collected: states, actions, log μ(a | s), rewards, each (episodes, T)."""
    torch.manual_seed(seed)
    est = storch.estimator("score", plate="ep", n_samples=episodes)
    with storch.Graph():
        s, states, actions, log_mu, rewards = torch.tensor(0), [], [], [], []
        for _ in range(T):
            behaviour = Categorical(logits=MU[s])
            a = est(behaviour)
            states.append(s)
            actions.append(a)
            log_mu.append(behaviour.log_prob(a))
            rewards.append(R[s, a])
            s = Categorical(probs=P[s, a]).sample()
        return [torch.stack(x, -1).tensor.detach() for x in (states, actions, log_mu, rewards)]


def replay_estimates(cost, theta, order=1, n=4, seed=5, **kw):
    buffer = [x.reshape(N_EST, n, T) for x in replay_buffer(N_EST * n, seed)]
    with storch.Graph():
        leaf = theta.detach().expand(N_EST, S, A).clone().requires_grad_(True)
        th, *episodes = storch.denote_independent((leaf, *buffer), 0, "replicate")
        cost(th, episodes, **kw)
        return per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)


def test_replay_with_per_decision_importance_weights_is_unbiased_at_orders_1_and_2():
    g, h = replay_estimates(per_decision_cost, AWAY, order=2)
    assert_unbiased(g, -exact_grad(objective, AWAY).reshape(-1), "per-decision IS, gradient")
    assert_unbiased(h, exact_hessian(lambda th: -objective(th), AWAY), "per-decision IS, Hessian")


def test_vtrace_lite_has_its_own_mean_not_the_policy_gradient():
    (g,) = replay_estimates(vtrace_cost, AWAY, seed=6)
    mean = exact_grad(vtrace_exact_mean, AWAY).reshape(-1)
    assert_unbiased(g, mean, "V-trace")
    exact = -exact_grad(objective, AWAY).reshape(-1)
    assert not z_test(g, exact, "V-trace against ∇J").ok
    assert (mean - exact).norm() > 0.2 * exact.norm()  # truncation and μ's state distribution: a bias, by design


def test_importance_one_estimator_per_step_with_the_behaviour_as_proposal_is_unbiased():
    """On the fly: one ``importance`` estimator per step (plates a0..a3 of one sample each), μ(· | s_t) as the
    proposal (read from a dict set before each step's call, docs/estimators/importance.md). Each step's weight π/μ
    multiplies into the costs after it (per-decision importance sampling): unbiased at orders 1 and 2."""
    torch.manual_seed(7)
    behaviour = {}
    ests = [storch.estimator("importance", plate=f"a{t}", proposal=lambda p: Categorical(logits=behaviour["logits"]))
            for t in range(T)]
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error")
        leaf, th = replicate(AWAY, N_EST)
        s = torch.tensor(0)
        for t in range(T):
            behaviour["logits"] = MU[s]
            a = ests[t](Categorical(logits=th[s]))
            storch.add_cost(-GAMMA ** t * R[s, a], name=f"r{t}")
            s = Categorical(probs=P[s, a]).sample()
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    assert_unbiased(g, -exact_grad(objective, AWAY).reshape(-1), "importance per step, gradient")
    assert_unbiased(h, exact_hessian(lambda th: -objective(th), AWAY), "importance per step, Hessian")


# -- the natural first attempts, and what they are told ---------------------------------------------------------------

def test_the_rollouts_sample_reused_in_an_update_step_is_refused_saying_what_to_keep():
    est = storch.estimator("score", plate="ep", n_samples=4)
    with storch.Graph():
        old = Categorical(logits=THETA[0])
        a = est(old)
        log_old = old.log_prob(a)
    theta = THETA.clone().requires_grad_(True)
    with storch.Graph(), pytest.raises(storch.PlateError, match="stale") as info:
        ratio = (Categorical(logits=theta[0]).log_prob(a) - log_old).exp()
        storch.add_cost(-ratio * R[0, a], name="ppo")
    assert "t.tensor.detach()" in str(info.value), info.value  # what the stored rollout keeps


@pytest.mark.parametrize("call", ["positional", "keyword"])
def test_a_stored_action_passed_to_the_estimator_is_refused_naming_the_stored_rollout_recipe(call):
    """est(policy, a_stored) or est(policy, value=a_stored): nothing is drawn for a stored action; the refusal (which
    before named only Pyro's observed values and a log-likelihood cost, no policy-gradient update) names the recipe."""
    stored = torch.tensor([0, 1, 1, 0])
    est = storch.estimator("score", plate="ep", n_samples=4)
    with storch.Graph() as graph, pytest.raises(storch.OptionError) as info:
        policy = Categorical(logits=THETA[0].clone().requires_grad_(True))
        est(policy, stored) if call == "positional" else est(policy, value=stored)
    assert not graph.nodes
    message = str(info.value)
    assert "STORED action" in message and "storch.denote_independent" in message, message
    assert "exp(d.log_prob(a) - log_q)" in message, message
    assert_names_a_section(message[message.index("STORED"):])


def test_one_importance_estimator_called_at_every_step_names_the_off_policy_recipes():
    est = storch.estimator("importance", plate="a", proposal=lambda p: Categorical(logits=torch.zeros_like(p.logits)))
    with storch.Graph(), pytest.raises(storch.PlateError, match="already used in this graph") as info:
        s = torch.tensor(0)
        for _ in range(2):
            a = est(Categorical(logits=THETA[s]))
            s = Categorical(probs=P[s, a]).sample()
    message = str(info.value)
    assert "n_samples=1" in message and "replay buffer" in message and "per-decision ratios" in message, message
    assert_names_a_section(message)


def test_a_generator_reset_replays_storchs_draws_but_not_the_environments():
    """The tutorial's bandit recipe (storch.Graph(generator=g), g reset each epoch) replays the actions drawn by storch
    only: transitions drawn in plain torch follow the global generator, so in an MDP the later steps' states (and so
    the actions drawn there) differ between epochs. Store the rollout instead (``rollout`` above)."""
    est = storch.estimator("score", plate="ep", n_samples=64)
    g = torch.Generator().manual_seed(0)
    start = g.get_state()
    runs = []
    for epoch in range(3):
        if epoch < 2:  # the third epoch: no reset (the control)
            g.set_state(start)
        with storch.Graph(generator=g):
            s, states, actions = torch.tensor(0), [], []
            for _ in range(T):
                a = est(Categorical(logits=THETA[s]))
                states.append(s)
                actions.append(a)
                s = Categorical(probs=P[s, a]).sample()
            runs.append((torch.stack(states, -1).tensor, torch.stack(actions, -1).tensor))
    (s0, a0), (s1, a1), (_, a2) = runs
    # storch's first draws are replayed (and would differ without the reset); the environment's are not: the states
    # of step 1 differ (those of step 0 are the start state, s_0 = 0, in every run)
    assert torch.equal(a0[:, 0], a1[:, 0]) and not torch.equal(a0[:, 0], a2[:, 0])
    assert not torch.equal(s0[:, 1], s1[:, 1])


@pytest.mark.parametrize("update", ["storch.backward", "surrogate_loss().backward"])
def test_epochs_in_one_graph_fail_loudly(update):
    """A graph's surrogate holds every cost added in it, so epochs written in ONE graph would count the earlier
    epochs' costs again. Neither form passes silently: storch.backward() ends the graph (the next epoch's cost is a
    stale tensor), and a second surrogate_loss().backward() fails in torch's autograd (the first pass freed the
    first epoch's graph). One graph per update (the tutorial)."""
    torch.manual_seed(8)
    theta = torch.nn.Parameter(THETA.clone())
    opt = torch.optim.SGD([theta], lr=0.1)
    est = storch.estimator("score", plate="ep", n_samples=8)
    error = storch.PlateError if update == "storch.backward" else RuntimeError
    with storch.Graph(), pytest.raises(error, match="stale" if error is storch.PlateError else "second time"):
        old = Categorical(logits=theta.detach()[0])
        a = est(old)
        log_old = old.log_prob(a)
        for epoch in range(2):
            ratio = (Categorical(logits=theta[0]).log_prob(a) - log_old).exp()
            storch.add_cost(-ratio * R[0, a], name=f"ppo{epoch}")
            opt.zero_grad()
            storch.backward() if update == "storch.backward" else storch.surrogate_loss().backward()
            opt.step()
