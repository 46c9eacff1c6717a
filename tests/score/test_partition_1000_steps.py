"""Long episodes (issue 15): one estimator for a 1000-step episode; one estimator per step hits
torch's 64-dims limit and must say so with a storch error."""

import pytest
import torch
from torch.distributions import Bernoulli

import storch


def test_1000_step_episode_batch_matches_handwritten_reward_to_go_on_the_same_samples():
    # one estimator instance, a batch of 8 episodes (data plate), 2 samples each, a cost per step;
    # the storch gradient equals hand-written causal REINFORCE on the very same actions
    torch.manual_seed(0)
    T, B, n = 1000, 8, 2
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    start = torch.bernoulli(torch.full((B,), 0.5, dtype=torch.float64))
    est = storch.estimator("score", plate="episode", n_samples=n, baseline="leave_one_out")
    actions = []
    with storch.Graph():
        prev = storch.denote_independent(start, 0, "batch")
        for t in range(T):
            a = est(Bernoulli(logits=theta[0] + (theta[1] - theta[0]) * prev))
            storch.add_cost((a - prev) ** 2 * (1.0 + 0.001 * t), name="switch")
            actions.append(a.tensor)
            prev = a
        assert a.plates[0].step == T - 1 and len(a.plates) == 2
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    acts = torch.stack(actions, -1)  # (n, B, T)
    prevs = torch.cat([start.expand(n, B).unsqueeze(-1), acts[..., :-1]], -1)
    logp = Bernoulli(logits=theta[0] + (theta[1] - theta[0]) * prevs).log_prob(acts)
    r = (acts - prevs) ** 2 * (1.0 + 0.001 * torch.arange(T, dtype=torch.float64))
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    to_go = to_go - (to_go.sum(0, keepdim=True) - to_go) / (n - 1)  # per-step leave-one-out
    (expected,) = torch.autograd.grad((logp * to_go).sum(-1).mean(), theta)
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-9)


def test_one_estimator_per_step_past_64_dims_raises_a_plate_error():
    torch.manual_seed(0)
    x = torch.zeros(())
    with storch.Graph():
        with pytest.raises(storch.PlateError, match="ONE estimator"):
            for t in range(70):
                x = storch.estimator("score", plate=f"a{t}")(Bernoulli(logits=x - 0.5))
    assert t >= 60  # it ran until torch's limit, then stopped with the storch error
