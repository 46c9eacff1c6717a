"""storch's overhead: the same estimator through storch and written by hand in plain torch.

For score@n, score with the leave-one-out baseline @n, unordered_set@n and gumbel_softmax@n, at
batch sizes 1 and 100 and n = 1, 8, 64, on two problems:

- ``toy``: REBAR's toy (3 Bernoullis, t = 0.45), one logit vector per batch row: sample,
  surrogate, gradient w.r.t. the logits;
- ``vae``: one training step of the Bernoulli VAE on load_digits (forward, backward, Adam step);
- ``cnn``: one training step of the convolutional VAE (:mod:`storch_bench.conv_vae`: Conv2d
  encoder, ConvTranspose2d decoder, 16 Bernoulli latents) on load_digits as 1x8x8 images;
- ``rnn``: one training step of the autoregressive GRU decoder (:mod:`storch_bench.gru_decoder`:
  8 steps of 8-way tokens, one estimator instance over the steps = one partition); only
  estimators that support partitions run it.
- ``ipd``: policy gradients over episodes of the iterated prisoner's dilemma (REINFORCE updates
  and the surrogate alone at T = 50, 150, 500 steps, one LOLA-DiCE iteration; score and loo
  only; see :mod:`storch_bench.overhead_ipd`).

Both sides get the same inputs and the same seed; for the score function and leave-one-out the
gradients are compared (equal samples give equal gradients). Time is measured timeit-style
(:func:`time_pair`: warm-up, alternating blocks of ~5 ms of calls, the fastest block kept, which is
robust to other load on a shared machine); peak memory is torch's CPU allocator peak of one call,
from ``torch.profiler`` (see :mod:`storch_bench.measure`).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import Bernoulli, RelaxedBernoulli

import storch

from . import conv_vae, gru_decoder
from .data import load_binary_digits
from .handwritten import gumbel_topk_bernoulli, score_surrogate, unordered_set_surrogate
from .measure import peak_memory
from .models import VAE, storch_step
from .report import header

__all__ = ["CONFIGS", "Row", "run_overhead", "run_cli", "TARGETS"]

T_TOY = 0.45
TARGETS = {"toy": 1.3, "vae": 1.10, "memory": 1.1, "cnn": 1.15, "rnn": 1.3, "ipd": 1.5}
ALTERNATIONS = 5  # seconds of timing per side: ALTERNATIONS * min_time
# config -> (registry name, options, smallest n)
CONFIGS = {
    "score": ("score", {}, 1),
    "loo": ("score", {"baseline": "leave_one_out"}, 2),
    "unordered_set": ("unordered_set", {}, 2),  # the built-in baseline needs 2 samples
    "gumbel_softmax": ("gumbel_softmax", {}, 1),
}


@dataclass
class Row:
    problem: str
    config: str
    batch: int
    n: int
    storch_us: float = math.nan
    torch_us: float = math.nan
    storch_mb: float = math.nan
    torch_mb: float = math.nan
    same_grad: str = "-"
    note: str = ""

    @property
    def time_ratio(self) -> float:
        return self.storch_us / self.torch_us

    @property
    def memory_ratio(self) -> float:
        return self.storch_mb / self.torch_mb if self.torch_mb > 0 else math.nan


def _temperature(est) -> float:
    if hasattr(est, "current_temperature"):
        return float(est.current_temperature())
    t = getattr(est, "temperature", 1.0)
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


def _hand_cost(config: str, logits: torch.Tensor, n: int, est, cost: Callable) -> torch.Tensor:
    """The hand-written surrogate for ``cost(z)`` with z of shape ``(n, batch, D)``; ``cost`` -> ``(n, batch)``."""
    if config in ("score", "loo"):
        d = Bernoulli(logits=logits)
        z = d.sample((n,))
        return score_surrogate(d.log_prob(z).sum(-1), cost(z), leave_one_out=config == "loo")
    if config == "unordered_set":
        z, logp = gumbel_topk_bernoulli(logits, n)
        return unordered_set_surrogate(logp, cost(z))
    z = RelaxedBernoulli(torch.tensor(_temperature(est), dtype=logits.dtype), logits=logits).rsample((n,))
    return cost(z).mean()


# -- the toy -----------------------------------------------------------------------------------


def _toy_cost(z: torch.Tensor) -> torch.Tensor:
    return ((z - T_TOY) ** 2).sum(-1)


def toy_pair(config: str, est, batch: int, n: int):
    theta = torch.linspace(-1.0, 1.0, 3).repeat(batch, 1).requires_grad_(True)

    def with_storch():
        with storch.Graph():
            th = storch.denote_independent(theta, 0, "data")
            z = est(Bernoulli(logits=th))
            storch.add_cost(_toy_cost(z), name="f")
            return torch.autograd.grad(storch.surrogate_loss(order=1), theta)[0]

    def by_hand():
        return torch.autograd.grad(_hand_cost(config, theta, n, est, _toy_cost), theta)[0]

    return with_storch, by_hand, lambda: None


# -- one VAE training step ---------------------------------------------------------------------


def vae_pair(config: str, est, batch: int, n: int):
    train, _ = load_binary_digits()
    x = train[:batch]
    torch.manual_seed(0)
    model_s = VAE("bernoulli")
    model_t = copy.deepcopy(model_s)
    opt_s = torch.optim.Adam(model_s.parameters(), lr=1e-3)
    opt_t = torch.optim.Adam(model_t.parameters(), lr=1e-3)

    def with_storch():
        storch_step(model_s, est, x, opt_s)
        return model_s.encoder[0].weight.grad

    def by_hand():
        opt_t.zero_grad(set_to_none=True)
        q_logits = model_t.encoder(x)
        loss = model_t.kl(q_logits).mean() + _hand_cost(
            config, q_logits, n, est, lambda z: model_t.reconstruction(z, x))
        loss.backward()
        opt_t.step()
        return model_t.encoder[0].weight.grad

    def sync():  # the same parameters on both sides before comparing gradients
        model_t.load_state_dict(model_s.state_dict())

    return with_storch, by_hand, sync


# -- one training step of the convolutional VAE and of the GRU decoder --------------------------


def _step(model, optimizer, build: Callable[[], None]):
    def with_storch():
        optimizer.zero_grad(set_to_none=True)
        with storch.Graph():
            build()
            storch.backward()
        optimizer.step()
    return with_storch


def cnn_pair(config: str, est, batch: int, n: int):
    train, _ = load_binary_digits()
    x = train[:batch].view(-1, 1, 8, 8)
    torch.manual_seed(0)
    model_s = conv_vae.ConvVAE()
    model_t = copy.deepcopy(model_s)
    opt_s = torch.optim.Adam(model_s.parameters(), lr=1e-3)
    opt_t = torch.optim.Adam(model_t.parameters(), lr=1e-3)
    step = _step(model_s, opt_s, lambda: conv_vae.storch_surrogate(model_s, est, x))

    def with_storch():
        step()
        return model_s.encoder[0].weight.grad

    def by_hand():
        opt_t.zero_grad(set_to_none=True)
        logits = model_t.encoder(x)
        loss = model_t.kl(logits).mean() + _hand_cost(
            config, logits, n, est, lambda z: conv_vae.batched_reconstruction(model_t, z, x))
        loss.backward()
        opt_t.step()
        return model_t.encoder[0].weight.grad

    return with_storch, by_hand, lambda: model_t.load_state_dict(model_s.state_dict())


def rnn_pair(config: str, est, batch: int, n: int):
    train, _ = load_binary_digits()
    x = train[:batch]
    torch.manual_seed(0)
    model_s = gru_decoder.GRUDecoder()
    model_t = copy.deepcopy(model_s)
    opt_s = torch.optim.Adam(model_s.parameters(), lr=1e-3)
    opt_t = torch.optim.Adam(model_t.parameters(), lr=1e-3)
    step = _step(model_s, opt_s, lambda: gru_decoder.storch_surrogate(model_s, est, x))

    def with_storch():
        step()
        return model_s.init.weight.grad

    def by_hand():
        opt_t.zero_grad(set_to_none=True)
        gru_decoder.hand_surrogate(model_t, x, n, leave_one_out=config == "loo").backward()
        opt_t.step()
        return model_t.init.weight.grad

    return with_storch, by_hand, lambda: model_t.load_state_dict(model_s.state_dict())


PROBLEMS = {"toy": toy_pair, "vae": vae_pair, "cnn": cnn_pair, "rnn": rnn_pair}
PARTITION_PROBLEMS = ("rnn",)  # one estimator instance called at every step


# wall: elapsed time (the default); cpu: this thread's CPU time, which leaves out the time the
# process waits for a core (more stable on a machine shared with other jobs)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _block(fn: Callable, k: int, clock: Callable[[], float] = time.perf_counter) -> float:
    t0 = clock()
    for _ in range(k):
        fn()
    return (clock() - t0) / k


def time_pair(fa: Callable, fb: Callable, min_time: float = 0.2, clock: str = "wall") -> tuple[float, float]:
    """Seconds per call of ``fa`` and ``fb``, timeit-style: warm-up, then blocks of calls of
    about 5 ms, alternating between the two, for ``ALTERNATIONS * min_time`` seconds each; the
    fastest block of each is kept (the run least disturbed by other load on the machine)."""
    for _ in range(3):
        fa(), fb()
    k = max(1, int(0.005 / max(_block(fa, 1), _block(fb, 1), 1e-7)))
    best_a = best_b = math.inf
    spent_a = spent_b = 0.0
    while spent_a < ALTERNATIONS * min_time or spent_b < ALTERNATIONS * min_time:
        a, b = _block(fa, k, CLOCKS[clock]), _block(fb, k, CLOCKS[clock])
        best_a, best_b = min(best_a, a), min(best_b, b)
        spent_a, spent_b = spent_a + a * k, spent_b + b * k
    return best_a, best_b


def measure(problem: str, config: str, batch: int, n: int, threads: int = 1, min_time: float = 0.2,
            clock: str = "wall") -> Row:
    row = Row(problem, config, batch, n)
    name, options, n_min = CONFIGS[config]
    if n < n_min:
        row.note = f"needs n >= {n_min}"
        return row
    try:
        est = storch.estimator(name, plate="z", n_samples=n, **options)
    except storch.UnknownEstimatorError:
        row.note = f"{name} not installed"
        return row
    except storch.OptionError as e:
        row.note = f"OptionError: {e}"
        return row
    if problem in PARTITION_PROBLEMS and (config not in ("score", "loo") or not est.supports_partitions):
        row.note = f"{problem}: {name} is not run on partitions here (score and leave-one-out only)"
        return row
    with_storch, by_hand, sync = PROBLEMS[problem](config, est, batch, n)
    try:
        sync()
        torch.manual_seed(1)
        gs = with_storch().clone()
        torch.manual_seed(1)
        gt = by_hand().clone()
    except storch.UnsupportedDistributionError as e:
        row.note = f"UnsupportedDistributionError: {e}"
        return row
    if config in ("score", "loo"):
        row.same_grad = "yes" if torch.allclose(gs, gt, rtol=1e-4, atol=1e-6) else "NO"
    ts, tt = time_pair(with_storch, by_hand, min_time, clock)
    row.storch_us, row.torch_us = 1e6 * ts, 1e6 * tt
    row.storch_mb = peak_memory(with_storch) / 2**20
    row.torch_mb = peak_memory(by_hand) / 2**20
    return row


def run_overhead(problems, configs, batches, ns, threads: int = 1, min_time: float = 0.2,
                 progress: bool = True, clock: str = "wall") -> list[Row]:
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    grid = [(p, c, b, n) for p in problems if p != "ipd" for c in configs for b in batches for n in ns]
    rows = [measure(*g, threads=threads, min_time=min_time, clock=clock)
            for g in tqdm(grid, disable=not progress, unit="config", dynamic_ncols=True)]
    if "ipd" in problems:  # episodes: their own sizes (storch_bench.overhead_ipd)
        from .overhead_ipd import ipd_rows

        rows += ipd_rows(Row, configs, min_time)
    return rows


HEADER = ["problem", "estimator", "batch", "n", "storch us", "torch us", "time ratio", "storch MB", "torch MB",
          "memory ratio", "same grad", "note"]


def run_cli(args: argparse.Namespace) -> int:
    from .report import markdown_table, text_table, write_csv

    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    configs = [c.strip() for c in (args.configs or ",".join(CONFIGS)).split(",") if c.strip()]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ns = [int(n) for n in args.n_samples.split(",")]
    clock = getattr(args, "clock", "wall")
    rows = run_overhead(problems, configs, batches, ns, args.threads, args.min_time, not args.no_progress, clock)
    table = [[r.problem, r.config, r.batch, r.n, r.storch_us, r.torch_us, r.time_ratio if r.torch_us == r.torch_us else math.nan,
              r.storch_mb, r.torch_mb, r.memory_ratio, r.same_grad, r.note] for r in rows]
    write_csv(args.out / "overhead.csv", HEADER, table)
    setup = (f"time ({'thread CPU time' if clock == 'cpu' else 'wall clock'}): fastest of alternating ~5 ms blocks of "
             f"calls ({ALTERNATIONS * args.min_time:.1f}s per side, after warm-up), "
             f"{args.threads} thread(s); memory: torch CPU allocator peak of one call (torch.profiler); targets: "
             f"time <= {TARGETS['toy']}x on the toy, <= {TARGETS['vae']}x per VAE step, <= {TARGETS['cnn']}x per CNN "
             f"VAE step, <= {TARGETS['rnn']}x per GRU decoder step, <= {TARGETS['ipd']}x per IPD update, "
             f"memory <= {TARGETS['memory']}x")
    md = f"# {header('storch-compare overhead: storch vs hand-written torch')}\n{setup}.\n\n{markdown_table(HEADER, table)}\n"
    (args.out / "overhead.md").write_text(md)
    print(text_table(HEADER, table))
    print(f"\n{setup}.\nWrote {args.out / 'overhead.md'}, {args.out / 'overhead.csv'}")
    return 0
