"""The iterated prisoner's dilemma (IPD) and its DiCE objective, with storch and by hand.

Two agents play the prisoner's dilemma repeatedly. Agent i's policy is tabular over 5 states
(the initial state and the 4 joint previous actions, seen from its own side): it cooperates
(action 1) with probability σ(θ_i[s]). Rewards per step (Foerster et al. 2018, LOLA):

    (C, C) -1, -1    (C, D) -3, 0    (D, C) 0, -3    (D, D) -2, -2

An agent's objective is its expected discounted return E[Σ_t γ^t r_t]; as a cost, its
negation, one cost per step. Its DiCE estimate over a batch of B episodes,

    J = 1/B Σ_b Σ_t MagicBox(Σ_{k<=t} log π(a_k)) γ^t r_t        (DiCE, Foerster et al. 2018, Eq. 6)

credits the reward at step t to the actions up to t only, and is differentiable any number of
times. Here it is written twice with the same semantics:

- :class:`StorchDice`: the rollout written for one episode with storch: one ``score`` estimator
  whose plate is the batch of episodes, called once per step (a partition), the joint action of
  both agents sampled by that node (a Bernoulli with batch shape (2,)), one
  ``storch.add_cost`` per step; ``storch.surrogate_loss(order=...)``;
- :class:`TorchDice`: the same by hand in plain torch, the floor for the overhead benchmark and
  the cross-check (equal samples give equal gradients at every order).

Why one node for both agents' actions rather than one estimator per agent: agent 1's step t+1
depends on agent 2's step t and vice versa, so two per-agent partitions would interleave, and
partitions must be topologically ordered (paper, section 3.2; storch raises a PlateError); and
two estimators with 128 samples each would pair every episode of one agent with every episode of
the other (128 x 128 plates). The joint node's gradient function log π_1(a_1) + log π_2(a_2) is
exactly DiCE's set of dependencies, and the batch of episodes is one plate shared by both agents.

:func:`exact_returns` computes the expected returns exactly (a Markov chain over the 4 joint
outcomes), for tests and for noise-free learning curves.

References:
    [1] DiCE: The Infinitely Differentiable Monte Carlo Estimator (Foerster et al., 2018)
    [2] Learning with Opponent-Learning Awareness (Foerster et al., 2018)
    [3] A Baseline for Any Order Gradient Estimation in Stochastic Computation Graphs (Mao et al., 2019)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Bernoulli

import storch

__all__ = ["N_STATES", "GAMMA", "StorchDice", "TorchDice", "exact_returns", "torch_rollout", "dice_surrogate",
           "rewards_of", "next_state"]

N_STATES = 5
GAMMA = 0.96
# Both agents' tables are read from θ.flatten() (agent 2's 5 logits after agent 1's): a state is
# kept as a flat index. With a = (a_1, a_2) ∈ {0, 1}^2 (1 = cooperate), agent i's next state is
# 1 + 2 a_i + a_j, i.e. a @ _OWN_OTHER + 1 (+ 5 for agent 2); its reward 2 a_j - a_i - 2 is
# (a @ _PAYOFF)[i] - 2. Matrix products keep the rollout at a few torch calls per step.
_OWN_OTHER = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
_OFFSET = torch.tensor([1.0, 1.0 + N_STATES])
_START = torch.tensor([0, N_STATES])  # state 0 of both agents, as flat indices
_PAYOFF = torch.tensor([[-1.0, 2.0], [2.0, -1.0]])


def next_state(a: torch.Tensor) -> torch.Tensor:
    """Flat state indices into θ.flatten() after joint action ``a`` (last dim: agents 1, 2)."""
    return (a @ _OWN_OTHER.to(a.dtype) + _OFFSET.to(a.dtype)).long()


def rewards_of(a: torch.Tensor) -> torch.Tensor:
    """Both agents' rewards for joint action ``a`` (1 = cooperate): 2·other - own - 2."""
    return a @ _PAYOFF.to(a.dtype) - 2


def _cost_weights(steps: int, gamma: float) -> list[list[tuple[torch.Tensor, float]]]:
    """Per agent and step, (w, c) with a @ w + c = -γ^t r_t: a step's cost as one product and one sum."""
    return [[(-(gamma ** t) * _PAYOFF[:, i], 2.0 * gamma ** t) for t in range(steps)] for i in (0, 1)]


class StorchDice:
    """Agent ``agent``'s DiCE surrogate loss (negated return) through storch.

    Args:
        batch: episodes per estimate (the plate of the ``score`` estimator).
        steps: episode length T.
        baseline: the ``score`` estimator's baseline option (``"none"``, ``"leave_one_out"``, or a
            callable); it is applied per cost, i.e. per step, as a Theorem-2 control variate.
        gamma: discount.

    Calling the object with ``(theta, agent, order)`` (``theta`` of shape (2, 5): both agents'
    logits) rolls out ``batch`` episodes in a fresh ``storch.Graph`` and returns the surrogate.
    """

    def __init__(self, batch: int = 128, steps: int = 150, baseline="none", gamma: float = GAMMA) -> None:
        self.steps, self.gamma = steps, gamma
        self.costs = _cost_weights(steps, gamma)
        # one estimator instance, created once: each call below is one step of its partition
        self.estimator = storch.estimator("score", plate="episode", n_samples=batch, baseline=baseline)
        self.last_actions: list[torch.Tensor] = []  # raw (batch, 2) per step, for cross-checks

    def __call__(self, theta: torch.Tensor, agent: int, order: int = 1) -> torch.Tensor:
        with storch.Graph():
            self.rollout(theta, agent)
            return storch.surrogate_loss(order=order)

    def rollout(self, theta: torch.Tensor, agent: int) -> None:
        """The episode for one sample, in the current graph: one estimator call and one cost per step."""
        flat = theta.reshape(-1)
        s = _START  # both agents start in state 0
        actions = []
        for t in range(self.steps):
            # the joint action of both agents is one node per step (its log-probability is the
            # sum of both agents' log-probabilities, as in DiCE's dependencies)
            a = self.estimator(Bernoulli(logits=flat[s]))
            actions.append(a)
            s = next_state(a)
            w, c = self.costs[agent][t]
            storch.add_cost(a @ w + c, name=f"r{t}")  # -γ^t r_t
        self.last_actions = [x.tensor for x in actions]


def torch_rollout(theta: torch.Tensor, batch: int, steps: int,
                  actions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Roll out ``batch`` episodes by hand (or replay ``actions`` of shape (batch, steps, 2)).

    Returns:
        ``(log_probs, rewards, actions)``: log π(a_t) summed over both agents ``(batch, steps)``
        (with gradient), rewards ``(batch, steps, 2)``, actions ``(batch, steps, 2)``.
    """
    flat = theta.reshape(-1)
    s = _START
    logps, taken = [], []
    for t in range(steps):
        d = Bernoulli(logits=flat[s])
        if actions is not None:
            a = actions[:, t]
        else:
            a = d.sample((batch,)) if t == 0 else d.sample()  # the same calls as storch's score: same samples
        logps.append(d.log_prob(a).sum(-1))
        taken.append(a)
        s = next_state(a)
    a = torch.stack(taken, 1)
    return torch.stack(logps, 1), rewards_of(a), a


def magic_box(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x - x.detach())  # DiCE's MagicBox, Foerster et al. 2018, Eq. 3


def dice_surrogate(log_probs: torch.Tensor, costs: torch.Tensor, baseline: str = "none",
                   causal: bool = True) -> torch.Tensor:
    """The DiCE surrogate of per-step ``costs`` ``(batch, steps)`` by hand.

    Args:
        log_probs: log π(a_t) per episode and step, with gradient.
        costs: per-step costs (here -γ^t r_t), detached or not.
        baseline: ``"none"`` or ``"leave_one_out"``: b_t = the mean cost of step t over the other
            episodes, added as the Theorem-2 control variate (1 - MagicBox(L_t)) b_t [3].
        causal: credit step t's cost to the actions up to t (L_t = cumulative log-probability,
            DiCE's dependencies), or to all actions of the episode (L_t = the episode's total).
    """
    steps = log_probs.shape[1]
    L = log_probs.cumsum(1) if causal else log_probs.sum(1, keepdim=True).expand(-1, steps)
    surrogate = magic_box(L) * costs  # DiCE, Eq. 6
    if baseline == "leave_one_out":
        c = costs.detach()
        b = (c.sum(0, keepdim=True) - c) / (c.shape[0] - 1)
        surrogate = surrogate + (1 - magic_box(L)) * b  # Theorem 2 / Mao et al. 2019
    elif baseline != "none":
        raise ValueError(f"baseline must be 'none' or 'leave_one_out', got {baseline!r}")
    return surrogate.sum(1).mean()


class TorchDice:
    """:class:`StorchDice` written by hand in plain torch (same call signature)."""

    def __init__(self, batch: int = 128, steps: int = 150, baseline: str = "none", gamma: float = GAMMA,
                 causal: bool = True) -> None:
        self.batch, self.steps, self.baseline, self.gamma, self.causal = batch, steps, baseline, gamma, causal
        self.discount = gamma ** torch.arange(steps, dtype=torch.get_default_dtype())

    def __call__(self, theta: torch.Tensor, agent: int, order: int = 1,
                 actions: Optional[torch.Tensor] = None) -> torch.Tensor:
        logp, rewards, _ = torch_rollout(theta, self.batch, self.steps, actions)
        costs = -self.discount.to(rewards) * rewards[..., agent]
        return dice_surrogate(logp, costs, self.baseline, self.causal)


def exact_returns(theta: torch.Tensor, steps: int, gamma: float = GAMMA) -> torch.Tensor:
    """Both agents' exact expected discounted returns E[Σ_{t<steps} γ^t r_t], shape (2,).

    A Markov chain over the joint outcomes (a_1, a_2) ∈ {D, C}^2 (index 2·a_1 + a_2); differentiable
    in ``theta`` (2, 5) to any order. ``gamma=1`` and dividing by ``steps`` gives the average
    reward per step.
    """
    outcomes = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=theta.dtype)
    r = rewards_of(outcomes)  # (4, 2)
    p = torch.sigmoid(theta)  # (2, 5): P(cooperate | own state)

    def joint(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:  # P(outcome) for cooperation probs
        q1, q2 = torch.stack([1 - p1, p1], -1), torch.stack([1 - p2, p2], -1)
        return (q1.unsqueeze(-1) * q2.unsqueeze(-2)).flatten(-2)

    s = next_state(outcomes)  # (4, 2): flat state indices after each outcome
    flat = p.reshape(-1)
    transition = joint(flat[s[:, 0]], flat[s[:, 1]])  # (4, 4)
    d = joint(p[0, 0], p[1, 0])  # distribution of the first outcome
    total = torch.zeros(2, dtype=theta.dtype)
    for t in range(steps):
        total = total + gamma ** t * d @ r
        d = d @ transition
    return total
