"""Policy gradients over episodes with one reward per step (issue 15): one ``score`` estimator called
once per step (a partition), per-step costs, a batch of episodes as the estimator's plate.

The model: a Bernoulli policy over 3 states (start, previous action 0, previous action 1),
a_t ~ Bernoulli(σ(θ[s_t])), s_{t+1} = 1 + a_t, cost c_t = C[s_t, a_t]. Its exact expected total cost
is a 2-state Markov chain (differentiable to any order), so gradients and Hessians are z-tested
against exact values. The variance reference is textbook REINFORCE with reward-to-go,
Σ_t ∇log π(a_t) Σ_{k>=t} c_k, written by hand from the same samples: with causal credit (a cost
at step t is credited to the actions up to t only, DiCE's cumulative MagicBox) storch's estimate
is exactly that one.
"""

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

THETA = torch.tensor([0.2, -0.5, 0.8], dtype=torch.float64)
COST = torch.tensor([[0.5, -1.0], [1.5, 0.3], [-0.7, 1.2]], dtype=torch.float64)  # C[s, a]


def exact_cost(theta: torch.Tensor, steps: int) -> torch.Tensor:
    """E[Σ_t C[s_t, a_t]] by the Markov chain over s ∈ {1, 2} (after the start state 0)."""
    p = torch.sigmoid(theta)
    expected = (1 - p) * COST[:, 0] + p * COST[:, 1]  # E[c | s]
    d = torch.stack([1 - p[0], p[0]])  # P(s_1 = 1), P(s_1 = 2)
    move = torch.stack([torch.stack([1 - p[1], p[1]]), torch.stack([1 - p[2], p[2]])])
    total = expected[0]
    for _ in range(steps - 1):
        total = total + d @ expected[1:]
        d = d @ move
    return total


def rollout(est, theta_copies, steps: int):
    """The episode for one sample: per-step costs; returns the actions and states (PlateTensors)."""
    s = torch.tensor(0)
    actions, states = [], []
    for t in range(steps):
        a = est(Bernoulli(logits=theta_copies[s]))
        states.append(s)
        actions.append(a)
        c0, c1 = COST[:, 0][s], COST[:, 1][s]
        storch.add_cost(c0 + a * (c1 - c0), name=f"c{t}")
        s = (1 + a).long()
    return actions, states


def _raw(x, names):
    """Raw storage of a PlateTensor (or a plain tensor) laid out as ``names`` (broadcast)."""
    if not isinstance(x, storch.PlateTensor):
        return x.reshape((1,) * len(names))
    have = [p.name for p in x.plates]
    t = x.tensor
    for n in names:
        if n not in have:
            t, have = t.unsqueeze(-1), have + [n]
    return t.permute([have.index(n) for n in names])


def reward_to_go_gradients(leaf, actions, states, baseline="none"):
    """Per-replicate hand-written REINFORCE with reward-to-go from storch's samples, shape (R, 3)."""
    names = ["replicate", "episode"]
    a = torch.stack(torch.broadcast_tensors(*[_raw(x, names) for x in actions]), -1)  # (R, B, T)
    s = torch.stack([_raw(x, names).expand(a.shape[:2]) for x in states], -1)  # (R, B, T)
    logits = leaf.gather(1, s.flatten(1)).view_as(a)
    logp = Bernoulli(logits=logits).log_prob(a)  # (R, B, T)
    c = COST[s, a.long()]
    to_go = c.flip(-1).cumsum(-1).flip(-1)  # Σ_{k>=t} c_k
    if baseline == "leave_one_out":  # the other episodes' mean reward-to-go
        to_go = to_go - (to_go.sum(1, keepdim=True) - to_go) / (to_go.shape[1] - 1)
    surrogate = (logp * to_go).sum(-1).mean(1)  # (R,)
    return torch.autograd.grad(surrogate.sum(), leaf)[0]


def _estimates(steps, batch, reps, seed, baseline="none"):
    torch.manual_seed(seed)
    est = storch.estimator("score", plate="episode", n_samples=batch, baseline=baseline)
    with storch.Graph():
        leaf, th = replicate(THETA, reps)
        actions, states = rollout(est, th, steps)
        g = per_replicate_derivatives(storch.surrogate_loss(order=1), leaf, 1)[0]
        by_hand = reward_to_go_gradients(leaf, actions, states, baseline)
    return g.detach(), by_hand


def test_exact_cost_matches_enumeration():
    import itertools

    theta = THETA
    total = 0.0
    for acts in itertools.product([0, 1], repeat=4):
        s, pr, cost = 0, 1.0, 0.0
        for a in acts:
            p = torch.sigmoid(theta[s])
            pr = pr * (p if a else 1 - p)
            cost = cost + COST[s, a]
            s = 1 + a
        total = total + pr * cost
    torch.testing.assert_close(exact_cost(theta, 4), total)


def test_20_step_gradient_is_unbiased():
    g, by_hand = _estimates(steps=20, batch=4, reps=1500, seed=0)
    exact = torch.autograd.functional.jacobian(lambda t: exact_cost(t, 20), THETA)
    assert_unbiased(g, exact, "storch, score partition over 20 steps")
    assert_unbiased(by_hand, exact, "hand-written reward-to-go REINFORCE")


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_20_step_variance_matches_reward_to_go(baseline):
    """Causal credit: storch's variance / reward-to-go REINFORCE's, on the same samples, <= 1.1
    (without causal credit every cost is credited to all 20 actions: about 3x)."""
    g, by_hand = _estimates(steps=20, batch=4, reps=1500, seed=1, baseline=baseline)
    ratio = float(g.var(0).sum() / by_hand.var(0).sum())
    print(f"\nvariance storch / hand-written reward-to-go ({baseline}): {ratio:.3f}")
    assert ratio <= 1.1


def test_3_step_hessian_vector_product_is_unbiased():
    torch.manual_seed(2)
    est = storch.estimator("score", plate="episode", n_samples=2)
    v = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    with storch.Graph():
        leaf, th = replicate(THETA, 4000)
        rollout(est, th, 3)
        hess = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)[1]
    exact = torch.autograd.functional.hessian(lambda t: exact_cost(t, 3), THETA)
    assert_unbiased(hess @ v, exact @ v, "Hessian-vector product, 3 steps")


def test_1000_step_episodes_with_one_estimator():
    torch.manual_seed(3)
    est = storch.estimator("score", plate="episode", n_samples=8)
    with storch.Graph() as graph:
        leaf, th = replicate(THETA, 2)
        actions, states = rollout(est, th, 1000)
        assert len(graph.nodes) == 1
        g = per_replicate_derivatives(storch.surrogate_loss(order=1), leaf, 1)[0]
        by_hand = reward_to_go_gradients(leaf, actions, states)
    torch.testing.assert_close(g, by_hand)


def test_one_estimator_per_step_beyond_64_nodes_is_a_storch_error():
    torch.manual_seed(4)
    with storch.Graph():
        s = torch.tensor(0)
        with pytest.raises(storch.StorchError, match="(?i)one estimator"):
            for t in range(70):
                a = storch.estimator("score", plate=f"a{t}")(Bernoulli(logits=THETA[s]))
                storch.add_cost(a * 1.0, name=f"c{t}")
                s = (1 + a).long()
