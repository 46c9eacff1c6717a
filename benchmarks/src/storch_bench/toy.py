"""Toy problems with exact gradients: bias, variance and time per estimate of every estimator.

- REBAR's toy [1], with 3 Bernoullis: minimise E[Σ_i (b_i - t)²], b_i ~ Bernoulli(σ(θ_i)),
  at t = 0.45 and t = 0.499 (the gradient's signal shrinks as t -> 1/2, so relative variance
  grows); θ = (-1, 0, 1).
- A K = 10 categorical: E[Σ_k z_k c_k] for one-hot z ~ Cat(softmax(θ)), c_k = (k/(K-1) - 0.45)²,
  θ = linspace(-1, 1, 10).

The exact gradient comes from enumerating the support in plain torch. Each estimator gives R
independent estimates in one graph (``storch.testing.replicate``); bias is reported with its
z-score (|mean - exact| / standard error; biased estimators are expected to show z > 4). Time
per estimate is the wall time of one single-estimate graph (sample, surrogate, gradient).

References:
    [1] REBAR: Low-variance, unbiased gradient estimates for discrete latent variable models
        (Tucker et al., 2017)
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from storch.testing import per_replicate_derivatives, replicate

from .roster import Spec, bad_spec_advice, build, parse_specs, resolve, skip_reason
from .report import header

__all__ = ["ToyConfig", "ToyProblem", "PROBLEMS", "run_toy", "run_cli"]


@dataclass
class ToyProblem:
    name: str
    theta: torch.Tensor
    make: Callable[[torch.Tensor], torch.distributions.Distribution]
    cost: Callable[[torch.Tensor], torch.Tensor]
    support: Callable[[], torch.Tensor]  # every joint value, (M, *event-ish)

    def exact(self) -> tuple[float, torch.Tensor]:
        theta = self.theta.detach().clone().requires_grad_(True)
        values = self.support()
        d = self.make(theta)
        logp = d.log_prob(values)
        logp = logp.reshape(len(values), -1).sum(-1)  # joint log-prob over the node's batch dims
        expectation = (logp.exp() * self.cost(values)).sum()
        (grad,) = torch.autograd.grad(expectation, theta)
        return float(expectation.detach()), grad.reshape(-1)


def _rebar(t: float) -> ToyProblem:
    return ToyProblem(
        name=f"rebar t={t}",
        theta=torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64),
        make=lambda th: Bernoulli(logits=th),
        cost=lambda b: ((b - t) ** 2).sum(-1),
        support=lambda: torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64),
    )


def _categorical(k: int = 10, t: float = 0.45) -> ToyProblem:
    c = (torch.arange(k, dtype=torch.float64) / (k - 1) - t) ** 2
    return ToyProblem(
        name=f"categorical K={k}",
        theta=torch.linspace(-1.0, 1.0, k, dtype=torch.float64),
        make=lambda th: OneHotCategorical(logits=th),
        cost=lambda z: (z * c).sum(-1),
        support=lambda: torch.eye(k, dtype=torch.float64),
    )


PROBLEMS = {"rebar045": lambda: _rebar(0.45), "rebar0499": lambda: _rebar(0.499),
            "categorical10": lambda: _categorical(10)}


@dataclass
class ToyConfig:
    specs: list[Spec]
    problems: tuple[str, ...] = tuple(PROBLEMS)
    replicates: int = 2000
    timing_reps: int = 100
    seed: int = 0


@dataclass
class ToyRow:
    problem: str
    label: str
    biased: bool
    max_order: float
    exact: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    max_abs_bias: float = math.nan
    max_z: float = math.nan
    variance: float = math.nan
    rel_std: float = math.nan
    us_per_estimate: float = math.nan
    note: str = ""


def _estimates(problem: ToyProblem, est, r: int) -> torch.Tensor:
    with storch.Graph():
        leaf, theta = replicate(problem.theta, r)
        x = est(problem.make(theta))
        storch.add_cost(problem.cost(x), name="f")
        loss = storch.surrogate_loss(order=1)
        (g,) = per_replicate_derivatives(loss, leaf, 1)
    return g.detach()


def _time_one(problem: ToyProblem, est, reps: int) -> float:
    theta = problem.theta.detach().clone().requires_grad_(True)

    def once():
        with storch.Graph():
            x = est(problem.make(theta))
            storch.add_cost(problem.cost(x), name="f")
            torch.autograd.grad(storch.surrogate_loss(order=1), theta)

    for _ in range(5):
        once()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return 1e6 * (time.perf_counter() - t0) / reps


def run_toy(cfg: ToyConfig, progress: bool = True) -> tuple[list[ToyRow], list[tuple[str, str, str]]]:
    """Bias, variance and time of every spec on every problem; returns ``(rows, skipped)``."""
    from tqdm.auto import tqdm

    rows, skipped, plan = [], [], []
    for key in cfg.problems:
        problem = PROBLEMS[key]()
        runnable, skip = resolve(cfg.specs, problem.make(problem.theta))
        plan += [(problem, spec, cls) for spec, cls in runnable]
        skipped += [(problem.name, label, why) for label, why in skip]
    for problem, spec, cls in tqdm(plan, disable=not progress, unit="estimator", dynamic_ncols=True):
        row = ToyRow(problem.name, spec.label, bool(cls.biased), cls.max_order)
        try:
            est = build(spec, cls)
            torch.manual_seed(cfg.seed)
            g = _estimates(problem, est, cfg.replicates)
            row.us_per_estimate = _time_one(problem, est, cfg.timing_reps)
        except (storch.UnsupportedDistributionError, storch.OptionError) as e:
            skipped.append((problem.name, spec.label, skip_reason(e)))
            continue
        _, exact = problem.exact()
        mean, var = g.mean(0), g.var(0)
        se = (var / g.shape[0]).sqrt()
        bias = mean - exact
        # rounding-level bias of (near) deterministic estimators (expect, MVD on Bernoulli) is no bias
        exact_bias = bias.abs() <= 1e-12 * exact.abs().clamp_min(1e-3)
        z = torch.where(exact_bias, 0.0, bias.abs() / se.clamp_min(1e-300))
        row.exact, row.mean = exact.tolist(), mean.tolist()
        row.max_abs_bias = float(bias.abs().max())
        row.max_z = float(z.max())
        row.variance = float(var.mean())
        row.rel_std = float((var.sqrt() / exact.abs()).mean())
        if not torch.isfinite(g).all():
            row.note = "non-finite estimates"
        rows.append(row)
    return rows, skipped


HEADER = ["problem", "estimator", "biased", "max abs bias", "max z", "variance", "rel. std", "us/estimate"]


def run_cli(args: argparse.Namespace) -> int:
    from .report import markdown_table, text_table, write_csv

    torch.set_num_threads(args.threads)
    cfg = ToyConfig(parse_specs(args.estimators, args.samples or 5), replicates=args.replicates,
                    timing_reps=args.timing_reps, seed=args.seed)
    rows, skipped = run_toy(cfg, progress=not args.no_progress)
    table = [[r.problem, r.label, r.biased, r.max_abs_bias, r.max_z, r.variance, r.rel_std, r.us_per_estimate]
             for r in rows]
    write_csv(args.out / "toy.csv", HEADER + ["exact gradient", "mean estimate", "note"],
              [t + [" ".join(map(repr, r.exact)), " ".join(map(repr, r.mean)), r.note] for t, r in zip(table, rows)])
    notes = "\n".join(f"- {p}: {label}: {why}" for p, label, why in skipped)
    setup = (f"{cfg.replicates} independent estimates per row (float64); bias = mean - exact (enumeration), "
             "max over the parameter's coordinates; z = |bias| / standard error (> 4: bias detected); variance = "
             "mean per-coordinate variance; rel. std = mean std / |exact|; us/estimate = one sample-surrogate-"
             f"gradient pass, mean of {cfg.timing_reps}")
    md = (f"# {header('storch-compare toy: REBAR toy (3 Bernoullis) and a K=10 categorical')}\n{setup}.\n\n"
          f"{markdown_table(HEADER, table)}\n\n" + (f"Did not take part:\n\n{notes}\n" if notes else ""))
    (args.out / "toy.md").write_text(md)
    print(text_table(HEADER, table))
    if skipped:
        print("\nDid not take part:\n" + notes)
    print(f"\n{setup}.\nWrote {args.out / 'toy.md'}, {args.out / 'toy.csv'}")
    advice = None if rows else bad_spec_advice([(label, why) for _, label, why in skipped])
    if advice:
        print("\n" + advice)
    return 2 if advice else 0
