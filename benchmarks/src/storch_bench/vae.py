"""The discrete VAE comparison: every estimator that supports the latent, one line changed.

For each model (Bernoulli / categorical latents) and each estimator: train from the same
initialisation and the same data order, and record the train and validation -ELBO after every
epoch, the variance of the encoder's gradient at fixed checkpoints (start, middle, end), the
time per training step and the peak memory of one step.

Reproducibility: each run re-seeds torch from ``seed`` (so a run's numbers do not depend on
which other estimators are installed), the data order comes from its own generator, and the
number of torch threads is fixed. Wall-clock time and memory are machine facts, kept out of
the reproducible CSVs (they are in ``vae_cost.csv`` and the Markdown table).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch

from .data import load_binary_digits
from .measure import gradient_variance, peak_memory, seed_everything
from .models import VAE, negative_elbo, storch_step, storch_surrogate
from .budget import at_budget
from .roster import Spec, build, resolve, skip_reason

__all__ = ["VAEConfig", "RunResult", "run_vae", "MODELS"]

MODELS = ("bernoulli", "categorical")


@dataclass
class VAEConfig:
    """Settings of the comparison (the defaults finish in a few minutes on 2 CPU cores)."""

    specs: list[Spec]
    models: tuple[str, ...] = MODELS
    epochs: int = 20
    batch_size: int = 50
    lr: float = 3e-3
    hidden: int = 128
    seed: int = 0
    threads: int = 1
    checkpoints: int = 3  # gradient-variance checkpoints, evenly spread from start to end
    variance_reps: int = 16
    variance_batch: int = 100
    eval_samples: int = 1
    n_valid: int = 360
    max_train: Optional[int] = None  # use only the first N training points (tests)
    measure_memory: bool = True
    budget: Optional[int] = None  # equal budget: n_samples per estimator so that cost evaluations <= budget


@dataclass
class RunResult:
    model: str
    label: str
    name: str
    n_samples: int
    biased: bool
    max_order: float
    train_curve: list[float] = field(default_factory=list)
    valid_curve: list[float] = field(default_factory=list)
    variances: list[float] = field(default_factory=list)
    checkpoint_epochs: list[int] = field(default_factory=list)
    step_ms: float = math.nan
    peak_mb: float = math.nan
    steps: int = 0
    note: str = ""

    @property
    def train(self) -> float:
        return self.train_curve[-1] if self.train_curve else math.nan

    @property
    def valid(self) -> float:
        return self.valid_curve[-1] if self.valid_curve else math.nan

    @property
    def best_valid(self) -> float:
        vals = [v for v in self.valid_curve if math.isfinite(v)]
        return min(vals) if vals else math.nan

    @property
    def variance(self) -> float:
        vals = [v for v in self.variances if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan


def _latent_example(model: str, requires_grad: bool = False) -> torch.distributions.Distribution:
    # a stand-in for q(z | x), to read which estimators support it (and, with a parameter that
    # requires grad as the encoder's does, how many cost evaluations they make)
    if model == "bernoulli":
        return Bernoulli(logits=torch.zeros(20, requires_grad=requires_grad))
    return OneHotCategorical(logits=torch.zeros(20, 10, requires_grad=requires_grad))


def _encoder_grads(vae: VAE, est, x: torch.Tensor) -> list[torch.Tensor]:
    params = list(vae.encoder.parameters())
    with storch.Graph():
        storch_surrogate(vae, est, x)
        loss = storch.surrogate_loss(order=1)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _variance(vae: VAE, est, x: torch.Tensor, reps: int, seed: int) -> float:
    # on copies, with forked RNG: measuring must not change the training run
    vae, est = copy.deepcopy(vae), copy.deepcopy(est)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        grads = [_encoder_grads(vae, est, x) for _ in range(reps)]
    return gradient_variance(grads)


def _peak_step_memory(vae: VAE, est, x: torch.Tensor, lr: float) -> float:
    vae, est = copy.deepcopy(vae), copy.deepcopy(est)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    storch_step(vae, est, x, opt)  # warm-up: optimizer state exists before the measured step
    with torch.random.fork_rng():
        return peak_memory(lambda: storch_step(vae, est, x, opt)) / 2**20


def _checkpoint_epochs(epochs: int, n: int) -> list[int]:
    if n <= 1:
        return [epochs]
    return sorted({round(i * epochs / (n - 1)) for i in range(n)})


def _train_one(cfg: VAEConfig, model: str, spec: Spec, cls: type, train: torch.Tensor,
               valid: torch.Tensor, tick: Callable[[int], None]) -> RunResult:
    res = RunResult(model, spec.label, spec.name, spec.n_samples, bool(cls.biased), cls.max_order)
    seed_everything(cfg.seed)
    vae = VAE(model, hidden=cfg.hidden)
    try:
        est = build(spec, cls)
    except (storch.UnsupportedDistributionError, storch.OptionError, TypeError, ValueError) as e:
        res.note = f"skipped: {skip_reason(e)}"
        tick(cfg.epochs)
        return res
    params = list(vae.parameters())
    if not cls.has_update:  # trainable parts without their own update (e.g. a temperature)
        params += [p for p in est.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    eval_gen = torch.Generator()
    var_x = train[: cfg.variance_batch]
    checkpoints = _checkpoint_epochs(cfg.epochs, cfg.checkpoints)
    res.checkpoint_epochs = checkpoints
    step_times: list[float] = []

    def evaluate(epoch: int) -> None:
        eval_gen.manual_seed(cfg.seed + 1)
        res.train_curve.append(negative_elbo(vae, train, eval_gen, cfg.eval_samples))
        res.valid_curve.append(negative_elbo(vae, valid, eval_gen, cfg.eval_samples))
        if epoch in checkpoints:
            res.variances.append(_variance(vae, est, var_x, cfg.variance_reps, cfg.seed + 2 + epoch))

    try:
        evaluate(0)
        for epoch in range(1, cfg.epochs + 1):
            perm = torch.randperm(len(train), generator=order)
            for i in range(0, len(train), cfg.batch_size):
                x = train[perm[i: i + cfg.batch_size]]
                t0 = time.perf_counter()
                value = storch_step(vae, est, x, opt)
                step_times.append(time.perf_counter() - t0)
                res.steps += 1
                if not torch.isfinite(value):
                    raise FloatingPointError(f"the surrogate became {value.item()} in epoch {epoch}")
            evaluate(epoch)
            tick(1)
    except storch.UnsupportedDistributionError as e:
        res.note = f"skipped: UnsupportedDistributionError: {e}"
        tick(cfg.epochs - len(res.valid_curve) + 1)
        res.train_curve, res.valid_curve, res.variances = [], [], []
        return res
    except FloatingPointError as e:
        res.note = f"diverged: {e}"
        tick(cfg.epochs - len(res.valid_curve) + 1)
    except Exception as e:  # noqa: BLE001 - one broken estimator must not end the comparison
        if not all(torch.isfinite(p).all() for p in vae.parameters()):
            res.note = f"diverged: the model's parameters became non-finite in epoch {len(res.valid_curve)}"
        else:
            res.note = f"error: {type(e).__name__}: {e}"
        tick(cfg.epochs - len(res.valid_curve) + 1)
    warm = step_times[3:] or step_times
    res.step_ms = 1e3 * sum(warm) / max(len(warm), 1)
    if cfg.measure_memory and not res.note:
        res.peak_mb = _peak_step_memory(vae, est, train[: cfg.batch_size], cfg.lr)
    return res


def run_vae(cfg: VAEConfig, progress: bool = True) -> tuple[list[RunResult], list[tuple[str, str, str]]]:
    """Run the comparison.

    Returns:
        ``(results, skipped)``: one :class:`RunResult` per (model, estimator) that ran (possibly
        with a note), and ``(model, label, reason)`` for estimators that did not take part.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    train, valid = load_binary_digits(cfg.n_valid)
    if cfg.max_train is not None:
        train = train[: cfg.max_train]
    plan, skipped = [], []
    for model in cfg.models:
        runnable, skip = resolve(cfg.specs, _latent_example(model))
        if cfg.budget is not None:  # the literature's comparison: equal cost evaluations per step
            runnable, over = at_budget(runnable, _latent_example(model, True), cfg.budget)
            skip = skip + over
        plan += [(model, spec, cls) for spec, cls in runnable]
        skipped += [(model, label, why) for label, why in skip]
    results = []
    with tqdm(total=len(plan) * cfg.epochs, disable=not progress, unit="epoch", dynamic_ncols=True) as bar:
        for model, spec, cls in plan:
            bar.set_description(f"{model[:4]} {spec.label}")
            res = _train_one(cfg, model, spec, cls, train, valid, bar.update)
            if res.note.startswith("skipped"):
                skipped.append((model, spec.label, res.note[len("skipped: "):]))
            else:
                results.append(res)
    return results, skipped
