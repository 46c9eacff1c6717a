"""Time of one REINFORCE update on a T-step episode: storch (one `score` estimator, a cost per step,
causal credit) vs the same code written by hand in torch (DiCE objective with the cumulative
log-probability). A batch of 16 episodes, 4 samples each, Bernoulli actions whose logit depends on
the previous action. Run: python time_long_episode.py [T ...]
"""

import sys
import timeit

import torch
from torch.distributions import Bernoulli

import storch

B, N = 16, 4
theta = torch.tensor([0.3, -0.2], requires_grad=True)
est = storch.estimator("score", plate="episode", n_samples=N)


def with_storch(T):
    with storch.Graph():
        prev = storch.denote_independent(torch.zeros(B), 0, "batch")
        for t in range(T):
            a = est(Bernoulli(logits=theta[0] + (theta[1] - theta[0]) * prev))
            storch.add_cost((a - prev) ** 2, name="switch")
            prev = a
        storch.surrogate_loss().backward()


def by_hand(T):
    prev = torch.zeros(N, B)
    logps, costs = [], []
    for t in range(T):
        d = Bernoulli(logits=theta[0] + (theta[1] - theta[0]) * prev)
        a = d.sample()
        logps.append(d.log_prob(a))
        costs.append((a - prev) ** 2)
        prev = a
    cumulative = torch.stack(logps, -1).cumsum(-1)  # DiCE: MagicBox of the log-prob up to t
    magic = torch.exp(cumulative - cumulative.detach())
    (magic * torch.stack(costs, -1)).sum(-1).mean().backward()


if __name__ == "__main__":
    torch.set_num_threads(1)
    steps = [int(a) for a in sys.argv[1:]] or [50, 150, 500, 1000]
    print(f"{'T':>6} {'storch ms':>10} {'torch ms':>10} {'ratio':>6} {'storch us/step':>15}")
    for T in steps:
        s = min(timeit.repeat(lambda: with_storch(T), number=1, repeat=5)) * 1e3
        h = min(timeit.repeat(lambda: by_hand(T), number=1, repeat=5)) * 1e3
        print(f"{T:>6} {s:>10.1f} {h:>10.1f} {s / h:>6.2f} {s / T * 1e3:>15.0f}")
