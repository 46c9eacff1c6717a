"""Time per gradient estimate of score@1 and score@8 with leave-one-out on the REBAR toy problem
(E[Σ_i (b_i - 0.45)^2], three Bernoullis, θ = (-1, 0, 1)), storch vs the same estimator written by
hand in plain torch. One run; prints microseconds per estimate and the ratio.

    python packages/storch-estimators-score/scripts/time_toy.py [--reps 3000]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.distributions import Bernoulli

import storch


def storch_step(est, theta):
    with storch.Graph():
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        return torch.autograd.grad(storch.surrogate_loss(), theta)[0]


def torch_score1(theta):
    p = Bernoulli(logits=theta)
    b = p.sample()
    lp = p.log_prob(b).sum()
    f = ((b - 0.45) ** 2).sum()
    loss = torch.exp(lp - lp.detach()) * f  # DiCE surrogate
    return torch.autograd.grad(loss, theta)[0]


def torch_loo8(theta):
    p = Bernoulli(logits=theta)
    b = p.sample((8,))
    lp = p.log_prob(b).sum(-1)
    f = ((b - 0.45) ** 2).sum(-1)
    base = ((f.sum() - f) / 7).detach()
    box = torch.exp(lp - lp.detach())
    loss = (box * f + (1 - box) * base).mean()
    return torch.autograd.grad(loss, theta)[0]


def per_call(fn, reps: int) -> float:
    for _ in range(reps // 10):  # warm-up
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spin on tiny tensors)")
    args = ap.parse_args()
    reps = args.reps
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    theta = torch.tensor([-1.0, 0.0, 1.0], requires_grad=True)
    s1 = storch.estimator("score", plate="b", n_samples=1)
    s8 = storch.estimator("score", plate="b", n_samples=8, baseline="leave_one_out")
    rows = [
        ("score@1", per_call(lambda: storch_step(s1, theta), reps), per_call(lambda: torch_score1(theta), reps)),
        ("leave_one_out@8", per_call(lambda: storch_step(s8, theta), reps), per_call(lambda: torch_loo8(theta), reps)),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} estimates each")
    print(f"{'estimator':<18}{'storch µs':>12}{'torch µs':>12}{'ratio':>8}")
    for name, a, b in rows:
        print(f"{name:<18}{a:>12.1f}{b:>12.1f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
