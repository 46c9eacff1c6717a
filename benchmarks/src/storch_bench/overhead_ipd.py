"""Overhead rows for policy gradients over episodes (``storch-compare overhead --problems ipd``).

The iterated prisoner's dilemma of :mod:`storch_bench.ipd`, 128 episodes per estimate, the
DiCE objective through storch (one ``score`` estimator as a partition, one cost per step) and
written by hand (:class:`~storch_bench.ipd.TorchDice`), with and without the leave-one-out
baseline (configs ``score`` and ``loo``):

- ``ipd reinforce T=…``: one REINFORCE update of agent 1 (rollout, surrogate, gradient, Adam step)
  with T = 50, 150, 500 steps: the cost per step must stay flat as T grows;
- ``ipd surrogate T=…``: the surrogate and its gradient alone on an already rolled-out graph
  (storch: ``storch.surrogate_loss()`` of T costs; by hand: the cumulative-sum DiCE objective);
- ``ipd lola T=150``: one LOLA-DiCE iteration (both agents' lookahead gradients, four rollouts,
  two second-order inner gradients).

Both sides draw the same samples (same seed, same sampling calls), so their gradients are
compared ("same grad"). These calls take milliseconds to seconds, so they are timed in the
calling thread's CPU time (:func:`cpu_time_pair`), not wall-clock blocks: on a shared machine a
call of 0.1-2 s is almost always descheduled for part of its wall time, its CPU time is not
(torch runs single-threaded here, and CPU autograd runs in the calling thread).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

import storch

from .ipd import N_STATES, StorchDice, TorchDice, dice_surrogate, torch_rollout
from .lola import lola_gradient
from .measure import peak_memory

__all__ = ["ipd_rows", "cpu_time_pair", "replay_pair", "STEPS", "BATCH"]

STEPS = (50, 150, 500)
BATCH = 128
BASELINES = {"score": "none", "loo": "leave_one_out"}


def _theta() -> torch.Tensor:
    torch.manual_seed(0)
    return (0.5 * torch.randn(2, N_STATES)).requires_grad_(True)


def reinforce_pair(config: str, steps: int):
    """One update of agent 1's policy (both sides own a copy of θ and an Adam optimizer)."""
    sides = []
    for cls in (StorchDice, TorchDice):
        theta = _theta()
        objective = cls(batch=BATCH, steps=steps, baseline=BASELINES[config])
        opt = torch.optim.Adam([theta], lr=1e-3)

        def step(theta=theta, objective=objective, opt=opt):
            opt.zero_grad(set_to_none=True)
            objective(theta, 0, 1).backward()
            grad = theta.grad.clone()
            opt.step()
            return grad
        sides.append(step)
    return sides


def surrogate_pair(config: str, steps: int):
    """The surrogate and its gradient on an episode batch rolled out once (retain_graph)."""
    theta = _theta()
    torch.manual_seed(1)
    objective = StorchDice(batch=BATCH, steps=steps, baseline=BASELINES[config])
    with storch.Graph() as graph:  # the episodes and their costs, rolled out once
        objective.rollout(theta, 0)
    torch.manual_seed(1)
    logp, rewards, _ = torch_rollout(theta, BATCH, steps)
    discount = 0.96 ** torch.arange(steps, dtype=rewards.dtype)
    costs = -discount * rewards[..., 0]

    def with_storch():
        return torch.autograd.grad(storch.surrogate_loss(1, graph), theta, retain_graph=True)[0]

    def by_hand():
        return torch.autograd.grad(dice_surrogate(logp, costs, BASELINES[config]), theta, retain_graph=True)[0]

    return with_storch, by_hand


def lola_pair(config: str, steps: int):
    theta_s, theta_t = _theta(), _theta()
    s = StorchDice(batch=BATCH, steps=steps, baseline=BASELINES[config])
    t = TorchDice(batch=BATCH, steps=steps, baseline=BASELINES[config])
    return (lambda: lola_gradient(s, theta_s)), (lambda: lola_gradient(t, theta_t))


def cpu_time_pair(fa: Callable, fb: Callable, min_time: float = 0.2, alternations: int = 5) -> tuple[float, float]:
    """Seconds of thread CPU time per call of ``fa`` and ``fb``: one warm-up call each, then calls
    alternating between the two until each has used ``alternations * min_time`` s (at least 3
    calls each); the fastest call of each is kept, as timeit does."""
    fa(), fb()
    best = [float("inf"), float("inf")]
    spent = [0.0, 0.0]
    calls = 0
    while calls < 3 or min(spent) < alternations * min_time:
        for k, f in enumerate((fa, fb)):
            t0 = time.thread_time()
            f()
            dt = time.thread_time() - t0
            best[k], spent[k] = min(best[k], dt), spent[k] + dt
        calls += 1
    return best[0], best[1]


PAIRS = {"reinforce": (reinforce_pair, STEPS), "surrogate": (surrogate_pair, STEPS), "lola": (lola_pair, (150,))}


def replay_pair(config: str, steps: int):
    """``--replay`` for the REINFORCE rows: the episode's surrogate loss and its gradient, storch's
    traced once by ``storch.compile(backend=None)`` and replayed, against the hand-written DiCE loss
    run eagerly; and the gradient eager storch gives from the same seed (the replay's must equal it).
    No optimizer step on either side (the replay columns of every problem time loss + gradient)."""
    theta_s, theta_t = _theta(), _theta()
    s = StorchDice(batch=BATCH, steps=steps, baseline=BASELINES[config])
    t = TorchDice(batch=BATCH, steps=steps, baseline=BASELINES[config])
    replayed = storch.compile(lambda theta: s(theta, 0, 1), backend=None)
    replayed(theta_s)  # the trace

    def with_storch():
        return torch.autograd.grad(replayed(theta_s), theta_s)[0]

    def eager():
        return torch.autograd.grad(s(theta_s, 0, 1), theta_s)[0]

    return with_storch, (lambda: torch.autograd.grad(t(theta_t, 0, 1), theta_t)[0]), eager


def add_replay_columns(row, config: str, steps: int, min_time: float) -> None:
    """Fill ``row``'s ``--replay`` columns from :func:`replay_pair` (or say in its note why it failed)."""
    try:
        with_storch, by_hand, eager = replay_pair(config, steps)
        torch.manual_seed(3)
        g_replay = with_storch().clone()
        torch.manual_seed(3)
        g_eager = eager()
        row.replay_same_grad = "yes" if torch.allclose(g_replay, g_eager, rtol=1e-5, atol=1e-6) else "NO"
        a, b = cpu_time_pair(with_storch, by_hand, min_time)
        row.replayed_storch_us, row.replay_torch_us = 1e6 * a, 1e6 * b
    except Exception as e:  # noqa: BLE001  (a row that cannot be replayed says why)
        row.note = f"{row.note}; replay failed: {type(e).__name__}: {str(e).strip()[:160]}"


def ipd_rows(row_cls, configs, min_time: float = 0.2, kinds=tuple(PAIRS), replay: bool = False) -> list:
    """Rows of :class:`storch_bench.overhead.Row` for every kind, config (score, loo) and T; with
    ``replay`` the REINFORCE rows also get the ``--replay`` columns (:func:`replay_pair`)."""
    rows = []
    for kind in kinds:
        make, steps_list = PAIRS[kind]
        for config in [c for c in configs if c in BASELINES]:
            for steps in steps_list:
                row = row_cls(f"ipd {kind} T={steps}", config, 1, BATCH)
                with_storch, by_hand = make(config, steps)
                torch.manual_seed(2)
                gs = with_storch().clone()
                torch.manual_seed(2)
                gt = by_hand().clone()
                row.same_grad = "yes" if torch.allclose(gs, gt, rtol=1e-4, atol=1e-5) else "NO"
                ts, tt = cpu_time_pair(with_storch, by_hand, min_time)
                row.storch_us, row.torch_us = 1e6 * ts, 1e6 * tt
                row.storch_mb = peak_memory(with_storch) / 2**20
                row.torch_mb = peak_memory(by_hand) / 2**20
                row.note = "thread CPU time" + (
                    f"; {1e6 * ts / steps:.0f} vs {1e6 * tt / steps:.0f} us/step" if kind != "lola" else "")
                if replay and kind == "reinforce":
                    add_replay_columns(row, config, steps, min_time)
                elif replay:  # empty replay columns say why
                    row.note += "; not replayed (--replay: the ipd reinforce rows only)"
                rows.append(row)
    return rows
