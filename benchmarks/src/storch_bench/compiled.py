"""Compiled storch against compiled hand-written torch (issue 19).

For each problem of ``storch-compare overhead`` (toy, vae, cnn, rnn) the step's loss is written
twice, as in :mod:`storch_bench.overhead`: through storch (one sample, an estimator, costs,
``storch.surrogate_loss()``) and by hand (batched torch, the same surrogate). The storch loss is
compiled with :func:`storch.compile`, the hand-written one with ``torch.compile``; each row times
``torch.autograd.grad(loss(x), params)`` (forward and backward, compilation excluded by a warm-up)
for the four variants, checks that compiled storch gives eager storch's gradients with the same
seed, and counts graph breaks (``torch._dynamo.explain``: of the program ``storch.compile`` traced,
and of the hand-written loss).

    python -m storch_bench.compiled --problems toy,vae,cnn,rnn --batch-sizes 1,100 --clock cpu

Inductor draws random numbers with its own generator unless ``fallback_random`` is set; it is set
here so that both compiled sides draw what eager code draws (the gradient check needs it).
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import Bernoulli

import storch

from . import conv_vae, gru_decoder
from .data import load_binary_digits
from .models import VAE, storch_surrogate
from .overhead import CONFIGS, _hand_cost, _toy_cost, memory_key, time_pair

__all__ = ["CompiledRow", "loss_pair", "measure_compiled", "main"]

PROBLEMS = ("toy", "vae", "cnn", "rnn")


@dataclass
class CompiledRow:
    problem: str
    config: str
    batch: int
    n: int
    storch_us: float = math.nan  # compiled storch (storch.compile)
    torch_us: float = math.nan  # compiled hand-written (torch.compile)
    eager_storch_us: float = math.nan
    eager_torch_us: float = math.nan
    storch_breaks: int = -1
    torch_breaks: int = -1
    same_grad: str = "-"
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.storch_us / self.torch_us


def loss_pair(problem: str, config: str, batch: int, n: int, device: "torch.device | str" = "cpu", est=None):
    """``(storch_loss, storch_params, hand_loss, hand_params, args)`` of one problem's step: the loss
    functions of :mod:`storch_bench.overhead`'s steps (what ``storch.compile`` and ``torch.compile``
    receive), without the optimizer step."""
    if est is None:  # else the caller's (storch-compare overhead builds each row's estimator)
        name, options, _ = CONFIGS[config]
        est = storch.estimator(name, plate="z", n_samples=n, **options).to(device)
    train, _ = load_binary_digits()
    train = train.to(device)
    torch.manual_seed(0)
    if problem == "toy":
        theta = torch.linspace(-1.0, 1.0, 3, device=device).repeat(batch, 1).requires_grad_(True)

        def s_loss(theta):
            with storch.Graph():
                z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
                storch.add_cost(_toy_cost(z), name="f")
                return storch.surrogate_loss()

        def h_loss(theta):
            return _hand_cost(config, theta, n, est, _toy_cost)

        return s_loss, [theta], h_loss, [theta], (theta,)
    if problem == "vae":
        x = train[:batch]
        ms = VAE("bernoulli").to(device)
        mt = copy.deepcopy(ms)

        def s_loss(x):
            with storch.Graph():
                storch_surrogate(ms, est, x)
                return storch.surrogate_loss()

        def h_loss(x):
            q = mt.encoder(x)
            return mt.kl(q).mean() + _hand_cost(config, q, n, est, lambda z: mt.reconstruction(z, x))

        return s_loss, list(ms.parameters()), h_loss, list(mt.parameters()), (x,)
    if problem == "cnn":
        x = train[:batch].view(-1, 1, 8, 8)
        ms = conv_vae.ConvVAE().to(device)
        mt = copy.deepcopy(ms)

        def s_loss(x):
            with storch.Graph():
                conv_vae.storch_surrogate(ms, est, x)
                return storch.surrogate_loss()

        def h_loss(x):
            logits = mt.encoder(x)
            return mt.kl(logits).mean() + _hand_cost(
                config, logits, n, est, lambda z: conv_vae.batched_reconstruction(mt, z, x))

        return s_loss, list(ms.parameters()), h_loss, list(mt.parameters()), (x,)
    if problem == "rnn":
        x = train[:batch]
        ms = gru_decoder.GRUDecoder().to(device)
        mt = copy.deepcopy(ms)

        def s_loss(x):
            with storch.Graph():
                gru_decoder.storch_surrogate(ms, est, x, memory_key(est, batch, device))
                return storch.surrogate_loss()

        def h_loss(x):
            if config not in ("score", "loo"):
                raise NotImplementedError(f"{config}: no hand-written version")
            return gru_decoder.hand_surrogate(mt, x, n, leave_one_out=config == "loo")

        return s_loss, list(ms.parameters()), h_loss, list(mt.parameters()), (x,)
    raise ValueError(f"unknown problem {problem!r}; one of {', '.join(PROBLEMS)}")


def _grad_fn(loss: Callable, params: list, args: tuple) -> Callable[[], tuple]:
    return lambda: torch.autograd.grad(loss(*args), params)


def measure_compiled(problem: str, config: str, batch: int, n: int, min_time: float = 0.2,
                     clock: str = "cpu") -> CompiledRow:
    """One row: compiled and eager storch and hand-written steps, graph breaks, same gradients."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    row = CompiledRow(problem, config, batch, n)
    if n < CONFIGS[config][2]:
        row.note = f"needs n >= {CONFIGS[config][2]}"
        return row
    s_loss, sp, h_loss, hp, args = loss_pair(problem, config, batch, n)
    Distribution = torch.distributions.Distribution
    validate = Distribution._validate_args
    try:
        # eager: argument validation as it was (on, by default)
        torch.manual_seed(1)
        ge = torch.autograd.grad(s_loss(*args), sp)
        a, b = time_pair(_grad_fn(s_loss, sp, args), _grad_fn(h_loss, hp, args), min_time, clock)
        row.eager_storch_us, row.eager_torch_us = 1e6 * a, 1e6 * b
        # compiled: validation off, as torch.compile leaves it for the whole process after its first
        # compile (with it on, dynamo breaks the hand-written graph at each check of a value)
        Distribution.set_default_validate_args(False)
        with inductor_config.patch(fallback_random=True):
            cs = storch.compile(s_loss)
            ch = torch.compile(h_loss)
            torch.manual_seed(1)
            gc = torch.autograd.grad(cs(*args), sp)
            # inductor fuses and reorders float arithmetic: equal up to ~1e-4 relative (aot_eager: exactly)
            row.same_grad = "yes" if all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(gc, ge)) else "NO"
            row.storch_breaks = torch._dynamo.explain(cs.graph_module(*args))(*args).graph_break_count
            row.torch_breaks = torch._dynamo.explain(h_loss)(*args).graph_break_count
            a, b = time_pair(_grad_fn(cs, sp, args), _grad_fn(ch, hp, args), min_time, clock)
            row.storch_us, row.torch_us = 1e6 * a, 1e6 * b
    except storch.StorchError as e:  # e.g. an estimator that storch.compile refuses
        row.note = f"{type(e).__name__}: {str(e)[:160]}"
    finally:
        Distribution.set_default_validate_args(validate)
        torch._dynamo.reset()
    return row


HEADER = ["problem", "estimator", "batch", "n", "compiled storch us", "compiled torch us", "compiled ratio",
          "eager storch us", "eager torch us", "eager ratio", "graph breaks storch / torch", "same grad", "note"]


def to_markdown(rows: list[CompiledRow]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [r.problem, r.config, str(r.batch), str(r.n), f"{r.storch_us:.0f}", f"{r.torch_us:.0f}",
                 f"{r.ratio:.2f}", f"{r.eager_storch_us:.0f}", f"{r.eager_torch_us:.0f}",
                 f"{r.eager_storch_us / r.eager_torch_us:.2f}", f"{r.storch_breaks} / {r.torch_breaks}",
                 r.same_grad, r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[CompiledRow]:
    # storch-compare's argument types: a bad value is a usage error before any row (it was a traceback after the
    # rows before it, or a row of nan / inf)
    from .argtypes import choice_list, int_list, positive_float

    p = argparse.ArgumentParser(prog="python -m storch_bench.compiled", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", default="toy,vae,cnn,rnn", type=choice_list(PROBLEMS))
    p.add_argument("--configs", default="loo", type=choice_list(tuple(CONFIGS)))
    p.add_argument("--batch-sizes", default="1,100", type=int_list(1))
    p.add_argument("--n-samples", default="8", type=int_list(1))
    p.add_argument("--min-time", type=positive_float, default=0.2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    def items(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    for problem in items(args.problems):
        for config in items(args.configs):
            for batch in map(int, items(args.batch_sizes)):
                for n in map(int, items(args.n_samples)):
                    row = measure_compiled(problem, config, batch, n, args.min_time, args.clock)
                    rows.append(row)
                    print(to_markdown([row]).splitlines()[-1], flush=True)
    print()
    print(to_markdown(rows))
    return rows


if __name__ == "__main__":
    main()
