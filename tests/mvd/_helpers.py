"""Shared helpers for the mvd family's statistical tests."""

from __future__ import annotations

import torch

import storch
from storch.testing import per_replicate_derivatives, replicate


def estimates(theta: torch.Tensor, model, replicates: int = 4000):
    """Per-replicate gradients and forward values of the first-order surrogate.

    ``model(t)`` builds the graph from the replicated parameter ``t`` (a PlateTensor shaped
    like ``theta``) and returns the cost. The forward value of each replicate is read off as
    the derivative w.r.t. an extra scale parameter (= 1) that multiplies its cost.

    Returns:
        ``(grads (R, d), values (R,))``.
    """
    ext = torch.cat([theta.reshape(-1), torch.ones(1, dtype=theta.dtype)])
    with storch.Graph():
        leaf, t = replicate(ext, replicates)
        cost = model(t[:-1].reshape(theta.shape)) * t[-1]
        storch.add_cost(cost)
        loss = storch.surrogate_loss(order=1)
        g, = per_replicate_derivatives(loss, leaf, 1)
    return g[:, :-1], g[:, -1]


def exact_grad(fn, theta: torch.Tensor):
    """(value, gradient) of a closed-form expectation ``fn(theta)``."""
    th = theta.detach().clone().requires_grad_(True)
    v = fn(th)
    g, = torch.autograd.grad(v, th)
    return v.detach(), g.reshape(-1)
