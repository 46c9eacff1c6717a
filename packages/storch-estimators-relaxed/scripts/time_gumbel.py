"""Time per estimate: storch's gumbel_softmax vs the same estimator written by hand in torch.

One estimate = sample, cost, backward (the gradient w.r.t. the logits). Two sizes: the REBAR toy
(3 Bernoullis) and a categorical layer (batch 64 as a data plate, 20 variables, K = 10, a
linear decoder). Prints median times over many repetitions and the ratio. Run:

    python packages/storch-estimators-relaxed/scripts/time_gumbel.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch

TAU = 0.5


def median_time(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: stabler timings on a shared machine
    # -- toy ---------------------------------------------------------------------------------
    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("gumbel_softmax", plate="b", temperature=TAU)

    def toy_storch():
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        storch.backward()

    def toy_hand():
        u = torch.rand(1, 3).clamp(1e-6, 1 - 1e-6)
        z = torch.sigmoid((theta + u.log() - (-u).log1p()) / TAU)
        ((z - 0.45) ** 2).sum(-1).mean().backward()

    # -- categorical layer ---------------------------------------------------------------------
    data = torch.randn(64, 16)
    enc = torch.nn.Linear(16, 20 * 10)
    dec = torch.nn.Linear(20 * 10, 16)
    est2 = storch.estimator("gumbel_softmax", plate="z", temperature=TAU)

    def layer_storch():
        x = storch.denote_independent(data, 0, "data")
        z = est2(OneHotCategorical(logits=enc(x).reshape(20, 10)))
        storch.add_cost(((dec(z.reshape(200)) - x) ** 2).sum())
        storch.backward()

    def layer_hand():
        logits = torch.log_softmax(enc(data).reshape(64, 20, 10), -1)
        g = -torch.log(-torch.log(torch.rand(1, 64, 20, 10).clamp(1e-6, 1 - 1e-6)))
        z = torch.softmax((logits + g) / TAU, -1)
        ((dec(z.reshape(1, 64, 200)) - data) ** 2).sum(-1).mean().backward()

    def layer_hand_distributions():  # the same by hand, but building a torch distribution as storch users do
        d = torch.distributions.RelaxedOneHotCategorical(TAU, logits=enc(data).reshape(64, 20, 10))
        z = d.rsample((1,))
        ((dec(z.reshape(1, 64, 200)) - data) ** 2).sum(-1).mean().backward()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median per estimate")
    for label, a, b, reps in (("toy (3 Bernoullis)", toy_storch, toy_hand, 2000),
                              ("categorical layer (64 x 20 x K=10)", layer_storch, layer_hand, 500),
                              ("categorical layer, vs torch.distributions by hand", layer_storch,
                               layer_hand_distributions, 500)):
        ts, th = median_time(a, reps), median_time(b, reps)
        print(f"{label}: storch {ts * 1e6:.0f} µs, by hand {th * 1e6:.0f} µs, ratio {ts / th:.2f}")


if __name__ == "__main__":
    main()
