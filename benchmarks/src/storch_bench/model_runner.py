"""Running one estimator on the user's model: the probe, warm-up, estimates, timing, memory.

Helpers of :mod:`storch_bench.model_compare`: ``step(est)`` is always called inside a fresh
``storch.Graph()``; derivatives are flattened over the parameters ``step`` returns (float64, CPU).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

import storch

from .measure import peak_memory

__all__ = ["as_params", "probe", "describe", "Runner", "first_line"]

Step = Callable[[Any], Any]


def as_params(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.nn.Module):
        params = [p for p in out.parameters() if p.requires_grad]
    elif isinstance(out, torch.Tensor):
        params = [out]
    elif isinstance(out, dict):
        params = list(out.values())
    elif isinstance(out, Iterable):
        params = list(out)
    else:
        raise TypeError(f"step(est) must return the parameters whose gradient is compared (a tensor, an iterable "
                        f"of tensors or an nn.Module), got {type(out).__name__}")
    bad = [type(p).__name__ for p in params if not (isinstance(p, torch.Tensor) and p.requires_grad)]
    if bad or not params:
        raise TypeError("step(est) must return tensors that require grad (the model's parameters); got "
                        + (", ".join(bad) if bad else "none"))
    return params


def derivative(loss: torch.Tensor, params: list[torch.Tensor], order: int, v: list[torch.Tensor]) -> torch.Tensor:
    """The ``order``-th derivative of ``loss``, applied order-1 times to ``v``, flattened (float64)."""
    grads: Sequence[Optional[torch.Tensor]] = torch.autograd.grad(loss, params, allow_unused=True,
                                                                  create_graph=order > 1)
    for k in range(2, order + 1):
        s = sum(((g * d).sum() for g, d in zip(grads, v) if g is not None), torch.zeros((), device=loss.device))
        if not s.requires_grad:
            grads = [None] * len(params)
            break
        grads = torch.autograd.grad(s, params, allow_unused=True, create_graph=k < order)
    flat = [(g if g is not None else torch.zeros_like(p)).detach().reshape(-1) for g, p in zip(grads, params)]
    return torch.cat(flat).double().cpu()


def cost_evaluations(graph: storch.Graph) -> int:
    """Entries of the sampling plates of the costs (per data point): how often the cost is evaluated."""
    evals = 1
    for _, cost in graph.costs:
        plates = getattr(cost, "plates", ())
        evals = max(evals, math.prod(p.size for p in plates if not p.independent))
    return evals


class _Probe(storch.Estimator):
    """A plain score function, used once to see the model's distributions and parameters."""

    name = "probe"
    supports_partitions = True

    def __init__(self, plate: str) -> None:
        super().__init__(plate)
        self.calls = 0

    def forward(self, distribution):
        self.calls += 1
        return super().forward(distribution)


def probe(step: Step) -> tuple[list[torch.Tensor], list[torch.distributions.Distribution], bool]:
    """Run ``step`` once with a plain score function: its parameters, its nodes' distributions, and
    whether it calls ``est`` several times in one graph (a partition, paper section 3.2)."""
    est = _Probe(plate="z")
    with torch.random.fork_rng(), storch.Graph() as graph:
        try:
            out = step(est)
        except Exception as e:
            raise RuntimeError(f"step(est) failed with a plain score-function estimator ({first_line(e)}); "
                               "the model must build one graph with `z = est(q)` and storch.add_cost(...)") from e
        params = as_params(out)
        if not graph.nodes:
            raise ValueError("step(est) made no stochastic node in the graph opened for it: call "
                             "`z = est(distribution)` in it (and do not open a storch.Graph() of your own there)")
        if not graph.costs:
            raise ValueError("step(est) added no cost to the graph opened for it: call storch.add_cost(...) in it "
                             "(and do not open a storch.Graph() of your own there)")
        dists = [n.original if n.original is not None else n.distribution for n in graph.nodes]
    return params, dists, est.calls > len(graph.nodes)


def describe(d: torch.distributions.Distribution) -> str:
    return f"{type(d).__name__}(batch {tuple(d.batch_shape)}, event {tuple(d.event_shape)})"


class Runner:
    """Runs one estimator on the user's model: warm-up, estimates, timing, memory."""

    def __init__(self, step: Step, params: list[torch.Tensor], order: int, direction: list[torch.Tensor]):
        self.step, self.params, self.order, self.v = step, params, order, direction
        self.cuda = any(p.is_cuda for p in params)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def one(self, est) -> tuple[torch.Tensor, int]:
        with storch.Graph() as graph:
            params = as_params(self.step(est))
            loss = storch.surrogate_loss(order=self.order)
            g = derivative(loss, params, self.order, self.v)
            return g, cost_evaluations(graph)

    def warmup(self, est, steps: int, seed: int, tick: Callable[[], None]) -> None:
        """``steps`` training steps through ``storch.backward()``; the parameters' ``.grad`` is restored."""
        saved = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        try:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                for _ in range(steps):
                    with storch.Graph() as graph:
                        self.step(est)
                        storch.backward(graph)  # estimator updates (update_parameters) run here
                    tick()
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def estimates(self, est, n: int, seed: int, tick: Callable[[], None]) -> tuple[torch.Tensor, list[float], int]:
        out, times, evals = [], [], 0
        with torch.random.fork_rng():  # the caller's random state is left as it was
            torch.manual_seed(seed)
            for _ in range(n):
                self._sync()
                t0 = time.perf_counter()
                g, evals = self.one(est)
                self._sync()
                times.append(time.perf_counter() - t0)
                out.append(g)
                tick()
        return torch.stack(out), times, evals

    def peak_mb(self, est, seed: int) -> float:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                self.one(est)
                return (torch.cuda.max_memory_allocated() - before) / 2**20
            return peak_memory(lambda: self.one(est)) / 2**20


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
