"""A partition of float32 steps under a float64 cost of 1e8: MagicBox(L_t) · C_t and (1 - MagicBox(L_t)) · ⊥b_t
are differentiated as separate terms, and autograd rounded each term's gradient to float32 before adding them, so
C and -b (both ~5e7) cancelled to 0: the gradient was exactly 0 in every estimate (found by p-docs6) while an
estimator per step (no partition) was right. A partition's per-step l_t is now widened to float64 as a single
node's l is (Node.widen_to_float64). z-tests against the exact gradient, in place (the stacked
cumulative sum) and with a step that grows a data plate (L_t re-indexed step by step)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli

import storch

OFF = 1e8


def _exact(th: torch.Tensor) -> torch.Tensor:
    """d/dθ E[Σ_t OFF/2 + 0.1 (t + 1) b_t], b_t ~ Bernoulli(logits=θ_t): 0.1 (t + 1) σ(θ_t)(1 - σ(θ_t))."""
    p = torch.sigmoid(th.detach().double())
    return 0.1 * torch.tensor([1.0, 2.0], dtype=torch.float64) * p * (1 - p)


def _grad(th: torch.Tensor, grow: bool) -> torch.Tensor:
    est = storch.estimator("score", plate="ep", n_samples=4, baseline="leave_one_out")  # one partition, two steps
    with storch.Graph():
        data = storch.denote_independent(torch.zeros(3, dtype=torch.float32), 0, "data")
        for t in range(2):
            logits = th[t] + data if grow and t == 1 else th[t]  # step 1 on the data plate: steps not in place
            b = est(Bernoulli(logits=logits))
            storch.add_cost(OFF / 2 + 0.1 * (t + 1) * b.double(), name="c")  # a float64 cost of 5e7
        return torch.autograd.grad(storch.surrogate_loss(), th)[0].double()


@pytest.mark.parametrize("grow", [False, True], ids=["in-place", "growing"])
def test_partition_of_float32_steps_under_float64_cost_is_unbiased(grow):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    th = torch.tensor([0.3, -0.5], dtype=torch.float32, requires_grad=True)  # float32 logits (whatever the default dtype)
    g = torch.stack([_grad(th, grow) for _ in range(300)])
    assert (g != 0).any(1).sum() > 250  # (it was exactly 0 in every estimate)
    exact = _exact(th)
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(g.shape[0]))
    assert z.abs().max() < 4, (g.mean(0), exact, z)


def test_widened_partition_keeps_its_values():
    # the loss's value and the gradient of a small cost (no cancellation) as in float32, up to float32's rounding
    torch.set_num_threads(1)
    th = torch.tensor([0.3, -0.5], dtype=torch.float32, requires_grad=True)
    out = {}
    for dt in (torch.float32, torch.float64):
        torch.manual_seed(1)
        est = storch.estimator("score", plate="ep", n_samples=4, baseline="leave_one_out")
        with storch.Graph():
            for t in range(2):
                b = est(Bernoulli(logits=th[t]))
                storch.add_cost((1.0 + (t + 1) * b).to(dt), name="c")
            loss = storch.surrogate_loss()
            out[dt] = (loss.detach().double(), torch.autograd.grad(loss, th)[0].double(), loss.dtype)
    assert out[torch.float64][2] is torch.float64
    torch.testing.assert_close(out[torch.float64][0], out[torch.float32][0])
    torch.testing.assert_close(out[torch.float64][1], out[torch.float32][1])


def test_a_float64_cost_per_step_widens_the_partition_once(monkeypatch):
    """Each of a partition's T float64 costs reaches its node; the surrogate widened the node once per cost,
    and each widening walked the T logged l_t: O(T²) (4.8 s of a T = 2000 surrogate, 0.08 s in float32; found
    by p-hmm15 on an HMM's ELBO per step). Now once per surrogate, and the log is float64 all the same."""
    from storch.graph.node import Node

    calls = []
    widen = Node.widen_to_float64
    monkeypatch.setattr(Node, "widen_to_float64", lambda node: (calls.append(node), widen(node))[1])
    T = 50
    est = storch.estimator("score", plate="ep", n_samples=3, baseline="leave_one_out")
    th = torch.tensor(0.3, requires_grad=True)
    with storch.Graph():
        b = torch.zeros(())
        for t in range(T):
            b = est(Bernoulli(logits=th + b))
            storch.add_cost(b.double() * (t % 3), name="c")
        loss = storch.surrogate_loss()
        node, = storch.current_graph().nodes
        assert all(l.dtype is torch.float64 for _, l in node.step_log)
    assert loss.dtype is torch.float64
    assert len(calls) == 1, f"the node was widened {len(calls)} times for {T} costs"
