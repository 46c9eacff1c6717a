"""LOLA-DiCE and naive learners on the iterated prisoner's dilemma; ``storch-compare ipd``.

Each agent i updates θ_i by gradient descent on its own expected cost (negated discounted
return). A naive learner differentiates its DiCE objective at the current parameters. A LOLA
agent [1] first simulates one naive step of the other agent, θ_j' = θ_j - α ∇_{θ_j} J_j(θ_i, θ_j),
and differentiates its own objective at (θ_i, θ_j'(θ_i)): the gradient flows through the other
agent's step, i.e. through a first derivative of a stochastic objective, so the inner surrogate
must be correct at order 2 (DiCE [2]; storch's ``surrogate_loss(order=2)``).

The objectives are :class:`storch_bench.ipd.StorchDice` (storch) or :class:`~storch_bench.ipd.TorchDice`
(by hand); the curves report the exact average reward per step of the current policies
(:func:`storch_bench.ipd.exact_returns`), so they carry no sampling noise of their own.

References:
    [1] Learning with Opponent-Learning Awareness (Foerster et al., 2018)
    [2] DiCE: The Infinitely Differentiable Monte Carlo Estimator (Foerster et al., 2018)
    [3] A Baseline for Any Order Gradient Estimation in Stochastic Computation Graphs (Mao et al., 2019)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .ipd import N_STATES, StorchDice, TorchDice, exact_returns
from .report import header

__all__ = ["Run", "lola_gradient", "naive_gradient", "train", "second_order_estimates", "run_cli", "CONFIGS"]

Objective = Callable[..., torch.Tensor]  # (theta, agent, order) -> surrogate loss

# label -> (learner, baseline of the score estimator)
CONFIGS = {
    "LOLA-DiCE": ("lola", "none"),
    "LOLA-DiCE + baseline": ("lola", "leave_one_out"),
    "naive": ("naive", "none"),
}


def naive_gradient(objective: Objective, theta: torch.Tensor, lr_in: float = 0.3) -> torch.Tensor:
    """Each agent's gradient of its own surrogate at the current parameters, shape (2, 5)."""
    return torch.stack([torch.autograd.grad(objective(theta, i, 1), theta)[0][i] for i in (0, 1)])


def lola_gradient(objective: Objective, theta: torch.Tensor, lr_in: float = 0.3) -> torch.Tensor:
    """Each agent's LOLA-DiCE gradient (one lookahead step of the other agent), shape (2, 5)."""
    grads = []
    for i in (0, 1):
        j = 1 - i
        # the other agent's naive step, kept differentiable in θ_i: order 2
        inner = objective(theta, j, 2)
        (g_j,) = torch.autograd.grad(inner, theta, create_graph=True)
        mask = torch.zeros(2, 1, dtype=theta.dtype)
        mask[j] = 1.0  # only θ_j takes the step
        stepped = theta - lr_in * mask * g_j
        grads.append(torch.autograd.grad(objective(stepped, i, 1), theta)[0][i])
    return torch.stack(grads)


LEARNERS = {"lola": lola_gradient, "naive": naive_gradient}


@dataclass
class Run:
    label: str
    implementation: str
    seed: int = 0
    rewards: list = field(default_factory=list)  # exact average reward per step, (agent 1, agent 2)
    seconds: float = 0.0
    theta: torch.Tensor = None  # the parameters after the last update

    @property
    def final(self) -> tuple[float, float]:
        return tuple(self.rewards[-1])


def _objective(implementation: str, baseline: str, batch: int, steps: int) -> Objective:
    cls = StorchDice if implementation == "storch" else TorchDice
    return cls(batch=batch, steps=steps, baseline=baseline)


def train(label: str, implementation: str = "storch", iterations: int = 200, batch: int = 128, steps: int = 150,
          lr_out: float = 0.2, lr_in: float = 0.3, seed: int = 0, progress: bool = False) -> Run:
    """Train both agents from θ = 0 with Adam(lr_out), recording the exact average reward per step."""
    from tqdm.auto import tqdm

    learner, baseline = CONFIGS[label]
    torch.manual_seed(seed)
    objective = _objective(implementation, baseline, batch, steps)
    theta = torch.zeros(2, N_STATES, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=lr_out)
    run = Run(label, implementation, seed)
    t0 = time.perf_counter()
    for _ in tqdm(range(iterations), disable=not progress, desc=f"{label} ({implementation})", leave=False):
        with torch.no_grad():
            run.rewards.append((exact_returns(theta.double(), steps, 1.0) / steps).tolist())
        theta.grad = LEARNERS[learner](objective, theta, lr_in)
        optimizer.step()
    run.seconds = time.perf_counter() - t0
    with torch.no_grad():
        run.rewards.append((exact_returns(theta.double(), steps, 1.0) / steps).tolist())
    run.theta = theta.detach().clone()
    return run


def second_order_estimates(objective: Objective, theta: torch.Tensor, reps: int) -> torch.Tensor:
    """``reps`` independent estimates of the block ∂²J_1/∂θ_1∂θ_2 that LOLA uses, shape (reps, 5, 5)."""
    theta = theta.detach().requires_grad_(True)
    out = []
    for _ in range(reps):
        (g,) = torch.autograd.grad(objective(theta, 0, 2), theta, create_graph=True)
        out.append(torch.stack([torch.autograd.grad(g[0, k], theta, retain_graph=True)[0][1]
                                for k in range(N_STATES)]))
    return torch.stack(out)


def exact_mixed_hessian(theta: torch.Tensor, steps: int) -> torch.Tensor:
    """The exact ∂²(-J_1)/∂θ_1∂θ_2 (5, 5) from the Markov chain."""
    h = torch.autograd.functional.hessian(lambda t: -exact_returns(t, steps)[0], theta.detach().double())
    return h[0, :, 1, :]


def variance_table(batch: int, steps: int, reps: int, thetas: dict, seed: int = 0) -> list[list]:
    """Variance (trace of the covariance over ``reps`` estimates) of the mixed second-order
    estimate through storch, with and without the baseline, at each of ``thetas``."""
    rows = []
    for where, theta in thetas.items():
        exact = exact_mixed_hessian(theta, steps)
        variances = {}
        for baseline in ("none", "leave_one_out"):
            torch.manual_seed(seed)
            est = second_order_estimates(StorchDice(batch, steps, baseline), theta, reps).double()
            z = (est.mean(0) - exact) / (est.var(0) / reps).sqrt().clamp_min(1e-12)
            variances[baseline] = float(est.var(0).sum())
            rows.append([where, baseline, reps, variances[baseline], variances["none"] / variances[baseline],
                         float(exact.norm()), float(z.abs().max())])
    return rows


VARIANCE_HEADER = ["parameters", "baseline", "estimates", "variance (trace of cov.)", "variance none / this",
                   "|exact| (Frobenius)", "max |z| vs exact"]
RESULT_HEADER = ["learners", "implementation", "seeds", "iterations", "final avg reward/step agent 1", "agent 2",
                 "mean", "best 20-it. mean", "iterations at mutual cooperation", "s per iteration"]
COOPERATION = -1.1  # both agents' average reward per step above this: mutual cooperation (CC gives -1)


def _summary(runs: list[Run], iterations: int) -> list[list]:
    """Per (learners, implementation), means over seeds: the final average reward per step, the best
    20-iteration window of the two agents' mean, and the iterations both agents spent above -1.1."""
    rows = []
    for key in dict.fromkeys((r.label, r.implementation) for r in runs):
        group = [r for r in runs if (r.label, r.implementation) == key]
        curves = torch.tensor([r.rewards for r in group])  # (seeds, iterations + 1, 2)
        final = curves[:, -1]
        best = curves.mean(-1).unfold(1, min(20, curves.shape[1]), 1).mean(-1).amax(1)
        coop = (curves > COOPERATION).all(-1).sum(1).double()
        rows.append([*key, len(group), iterations, float(final[:, 0].mean()), float(final[:, 1].mean()),
                     float(final.mean()), float(best.mean()), float(coop.mean()),
                     sum(r.seconds for r in group) / (len(group) * iterations)])
    return rows


def write_curves(runs: list[Run], path) -> None:
    """Every run's curve: one row per iteration, agents' average reward per step."""
    from .report import write_csv

    write_csv(path, ["learners", "implementation", "seed", "iteration", "agent 1", "agent 2"],
              [[r.label, r.implementation, r.seed, i, a, b] for r in runs for i, (a, b) in enumerate(r.rewards)])


def plot(runs: list[Run], path) -> None:
    """Average reward per step over iterations: mean over seeds per agent (thin: single seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    keys = list(dict.fromkeys((r.label, r.implementation) for r in runs))
    for k, key in enumerate(keys):
        group = torch.tensor([r.rewards for r in runs if (r.label, r.implementation) == key])  # (seeds, it, 2)
        for agent, style in ((0, "-"), (1, "--")):
            for single in group[:, :, agent]:
                ax.plot(single, style, color=f"C{k}", lw=0.4, alpha=0.35)
            ax.plot(group[:, :, agent].mean(0), style, color=f"C{k}", lw=1.6,
                    label=f"{key[0]} ({key[1]}), agent {agent + 1}")
    ax.axhline(-1.0, color="grey", lw=0.5)
    ax.axhline(-2.0, color="grey", lw=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("average reward per step")
    ax.set_title(f"IPD: LOLA-DiCE vs naive learners ({group.shape[0]} seeds; exact value of the policies)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cli(args: argparse.Namespace) -> int:
    """``storch-compare ipd``: train, plot, and measure the second-order variance."""
    from .report import markdown_table, text_table, write_csv

    labels = [c.strip() for c in args.configs.split(",")] if args.configs else list(CONFIGS)
    implementations = [i.strip() for i in args.implementations.split(",")]
    seeds = [int(x) for x in str(args.seeds).split(",") if x.strip()] if args.seeds else [args.seed]
    runs = [train(label, impl, args.iterations, args.batch, args.steps, seed=seed, progress=not args.no_progress)
            for impl in implementations for label in labels for seed in seeds]
    rows = _summary(runs, args.iterations)
    plot(runs, args.out / "ipd.png")
    write_curves(runs, args.out / "ipd_curves.csv")
    thetas = {"θ = 0": torch.zeros(2, N_STATES)}
    trained = [r for r in runs if r.label == "LOLA-DiCE + baseline"]
    if trained:
        thetas[f"after LOLA-DiCE + baseline (seed {trained[0].seed})"] = trained[0].theta
    variance = variance_table(args.batch, args.steps, args.variance_reps, thetas, seed=args.seed) \
        if args.variance_reps else []
    write_csv(args.out / "ipd.csv", RESULT_HEADER, rows)
    setup = (f"batch {args.batch} episodes of {args.steps} steps, discount 0.96, Adam lr 0.2, lookahead lr 0.3, "
             f"seeds {','.join(map(str, seeds))}; average reward per step (undiscounted) is the exact value of the "
             "policies (Markov chain), not a sampled estimate")
    md = [f"# {header('storch-compare ipd: LOLA-DiCE on the iterated prisoner’s dilemma')}", setup + ".", "",
          markdown_table(RESULT_HEADER, rows), ""]
    if variance:
        md += ["Second-order estimate ∂²J_1/∂θ_1∂θ_2 (the block LOLA differentiates through), storch at order 2, "
               "baseline = score's leave-one-out per step (Theorem 2): variance over independent estimates "
               f"of {args.batch} episodes each, and the largest z-score of their mean against the exact block:", "",
               markdown_table(VARIANCE_HEADER, variance), ""]
    (args.out / "ipd.md").write_text("\n".join(md))
    print(text_table(RESULT_HEADER, rows))
    if variance:
        print(text_table(VARIANCE_HEADER, variance))
    print(f"\n{setup}.\nWrote {args.out / 'ipd.md'}, {args.out / 'ipd.csv'}, {args.out / 'ipd.png'}")
    return 0
