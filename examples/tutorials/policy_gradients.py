"""Tutorial 2: policy gradients with causal credit, and second-order LOLA-DiCE.

    python examples/tutorials/policy_gradients.py          # ~30 s on one CPU thread

Part 1: a tabular policy walks a corridor of 5 cells for 8 steps and earns 1 for every step it
stands on the last cell. The episode is written for ONE trajectory; one ``score`` estimator,
created once, is called at every step (its calls are one partition, docs/partitions.md). A cost
per step gives causal credit: an action is credited only with the rewards that come after it.
The script measures the gradient variance with a cost per step and with one total cost at the end
(both unbiased, same mean), then trains with causal credit through ``storch.backward()``.

Part 2: LOLA-DiCE on the iterated prisoner's dilemma (examples/lola): each agent differentiates
through the other's anticipated learning step, so the inner objective must be right at order 2
(``storch.surrogate_loss(order=2)``). The code is in the benchmarks package
(``storch_bench.ipd.StorchDice``, ``storch_bench.lola.lola_gradient``); short runs here.

``--out DIR`` saves the figure as DIR/policy_gradients.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.distributions import Categorical

import storch
from storch_bench.lola import train as train_lola

CELLS, STEPS, GOAL = 5, 8, 4


def episode(theta: torch.Tensor, est, causal: bool) -> None:
    """One trajectory from cell 0; adds -reward per step (causal credit) or -return once."""
    cell = torch.tensor(0)
    rewards = []
    for t in range(STEPS):
        action = est(Categorical(logits=theta[cell]))     # 0: left, 1: right; step t of the partition
        cell = (cell + 2 * action - 1).clamp(0, CELLS - 1)
        reward = (cell == GOAL).float()
        if causal:
            storch.add_cost(-reward, name=f"r{t}")          # credited to the actions of steps <= t
        rewards.append(reward)
    if not causal:
        storch.add_cost(-sum(rewards, torch.tensor(0.0)), name="return")  # credited to every action


def gradient_estimates(theta: torch.Tensor, est, causal: bool, reps: int) -> torch.Tensor:
    """``reps`` independent gradient estimates, shape (reps, theta.numel())."""
    grads = []
    for _ in range(reps):
        with storch.Graph():
            episode(theta, est, causal)
            (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
        grads.append(g.flatten())
    return torch.stack(grads)


def expected_return(theta: torch.Tensor) -> float:
    """The exact expected return: the distribution over cells, propagated step by step."""
    p = torch.softmax(theta.detach(), -1)
    dist, total = torch.zeros(CELLS), 0.0
    dist[0] = 1.0
    for _ in range(STEPS):
        new = torch.zeros(CELLS)
        for c in range(CELLS):
            new[max(c - 1, 0)] += dist[c] * p[c, 0]
            new[min(c + 1, CELLS - 1)] += dist[c] * p[c, 1]
        dist = new
        total += float(dist[GOAL])
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="gradient estimates per credit scheme")
    ap.add_argument("--iterations", type=int, default=60, help="training steps (part 1) and LOLA iterations")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    # Part 1a: causal credit does not change the expected gradient, only its variance.
    theta = torch.zeros(CELLS, 2, requires_grad=True)
    est = storch.estimator("score", plate="episode", n_samples=16, baseline="leave_one_out")
    print(f"Part 1: corridor of {CELLS} cells, {STEPS} steps, 16 episodes per estimate, {args.reps} estimates\n")
    print("| credit | mean of the gradient (first 4 entries) | total variance |")
    print("|---|---|---|")
    stats = {}
    for causal in (True, False):
        g = gradient_estimates(theta, est, causal, args.reps)
        stats[causal] = g
        label = "a cost per step (causal)" if causal else "one cost, the return"
        mean = ", ".join(f"{v:+.3f}" for v in g.mean(0)[:4])
        print(f"| {label} | {mean} | {g.var(0).sum():.4f} |")
    diff = stats[True].mean(0) - stats[False].mean(0)
    se = ((stats[True].var(0) + stats[False].var(0)) / args.reps).sqrt().clamp_min(1e-12)
    print(f"\nlargest |z| of the difference of the means: {(diff / se).abs().max():.2f} (same expectation)")
    print(f"variance ratio, return / causal: {stats[False].var(0).sum() / stats[True].var(0).sum():.2f}")

    # Part 1b: training with causal credit. storch.backward(): backward, baselines, reset.
    curves = {}
    for causal in (True, False):
        torch.manual_seed(1)
        theta = torch.zeros(CELLS, 2, requires_grad=True)
        optimizer = torch.optim.Adam([theta], lr=0.1)
        curve = [expected_return(theta)]
        for _ in range(args.iterations):
            episode(theta, est, causal)
            storch.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(expected_return(theta))
        curves[causal] = curve
    print(f"\nexpected return after {args.iterations} Adam steps (max {STEPS - GOAL + 1}): "
          f"causal credit {curves[True][-1]:.2f}, one return cost {curves[False][-1]:.2f}")

    # Part 2: LOLA-DiCE vs naive learners (second-order gradients through the surrogate).
    print(f"\nPart 2: iterated prisoner's dilemma, {args.iterations} iterations, 64 episodes of 50 steps\n")
    print("| learner | average reward per step (agent 1, agent 2) | seconds |")
    print("|---|---|---|")
    runs = []
    for label in ("naive", "LOLA-DiCE", "LOLA-DiCE + baseline"):
        run = train_lola(label, iterations=args.iterations, batch=64, steps=50)
        runs.append(run)
        print(f"| {label} | {run.final[0]:.2f}, {run.final[1]:.2f} | {run.seconds:.1f} |")
    print("\n(-1: both cooperate; -2: both defect)")

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        a.plot(curves[True], label="a cost per step (causal credit)")
        a.plot(curves[False], label="one cost: the return")
        a.set_xlabel("training step")
        a.set_ylabel("expected return")
        a.set_title("corridor, score + leave-one-out @16", fontsize=10)
        a.legend(fontsize=8)
        for run in runs:
            b.plot([sum(r) / 2 for r in run.rewards], label=run.label)
        b.set_xlabel("iteration")
        b.set_ylabel("average reward per step")
        b.set_title("iterated prisoner's dilemma", fontsize=10)
        b.legend(fontsize=8)
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "policy_gradients.png", dpi=90)


if __name__ == "__main__":
    main()
