"""Bias and variance of each relaxed-family estimator on the REBAR toy E[Σ_j (b_j - t)^2].

Three independent Bernoullis with logits θ = (0.3, -0.5, 1.0), t = 0.45 and 0.499; 20000
independent first-order estimates each (one graph, replicate plate). Plain score@1 is written
by hand (this family does not depend on the score family). Run:

    python packages/storch-estimators-relaxed/scripts/toy_table.py
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import per_replicate_derivatives, replicate

THETA = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
N = 20000


def exact_grad(t: float) -> torch.Tensor:
    p = torch.sigmoid(THETA)
    return p * (1 - p) * ((1 - t) ** 2 - t ** 2)


def storch_estimates(est, t: float, n: int = N) -> torch.Tensor:
    with storch.Graph():
        leaf, x = replicate(THETA, n)
        b = est(Bernoulli(logits=x))
        storch.add_cost(((b - t) ** 2).sum())
        return per_replicate_derivatives(storch.surrogate_loss(order=1), leaf, 1)[0]


def score_estimates(t: float, n: int = N) -> torch.Tensor:
    p = torch.sigmoid(THETA).expand(n, -1)
    b = torch.bernoulli(p)
    return ((b - t) ** 2).sum(-1, keepdim=True) * (b - p)  # f(b) ∇θ log p(b)


def trained(name: str, t: float, steps: int = 500, **options):
    est = storch.estimator(name, plate="b", **options)
    for _ in range(steps):
        with storch.Graph():
            _, x = replicate(THETA, 16)
            b = est(Bernoulli(logits=x))
            storch.add_cost(((b - t) ** 2).sum())
            storch.backward()
    return est


def main() -> None:
    torch.manual_seed(0)
    print(f"REBAR toy, θ = {THETA.tolist()}, {N} estimates per row; bias = |mean - exact| (max |z|), "
          "variance = Σ_j Var(ĝ_j)\n")
    print("| estimator | t | bias | max z | variance |")
    print("|---|---|---|---|---|")
    for t in (0.45, 0.499):
        rows = [("score@1 (by hand)", score_estimates(t))]
        for name in ("arm", "disarm", "go", "relax", "rebar"):
            rows.append((name, storch_estimates(storch.estimator(name, plate="b"), t)))
        rows.append(("relax, 500 steps", storch_estimates(trained("relax", t, lr=0.03), t)))
        rows.append(("rebar, 500 steps", storch_estimates(trained("rebar", t, lr=0.03), t)))
        for tau in (0.5, 2.0):
            for name in ("gumbel_softmax", "gumbel_straight_through"):
                rows.append((f"{name} τ={tau}", storch_estimates(storch.estimator(name, plate="b", temperature=tau), t)))
        exact = exact_grad(t)
        for label, g in rows:
            bias = g.mean(0) - exact
            z = bias / (g.std(0) / math.sqrt(g.shape[0]))
            print(f"| {label} | {t} | {float(bias.norm()):.3g} | {float(z.abs().max()):.1f} | {float(g.var(0).sum()):.3g} |")


if __name__ == "__main__":
    main()
