"""A two-layer sigmoid belief network (two stochastic nodes, the second in the first's plate) for
``storch-compare overhead --problems sbn``.

The model of REBAR's, RELAX's and ARM's benchmarks (tests/models/test_sigmoid_belief_network.py checks it
against enumeration): q(z1 | x) q(z2 | z1) with Bernoulli layers of 16 units on the 64 pixels of
load_digits, prior p(z2) p(z1 | z2) and decoder p(x | z1); the cost is the negative ELBO. One estimator per
layer: z2's logits read z1, so its node lives in z1's plate (n samples of z2 for each of the n of z1: n²
cost evaluations per data point). The hand-written step is the same DiCE-style objective in plain torch:
each node's score term with its own baseline (none, leave-one-out over its plate, or the moving average of
earlier steps' mean costs) and the cost's mean over both plates; equal seeds give equal samples, so the
gradients are compared.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli

import storch

__all__ = ["SBN", "storch_surrogate", "hand_surrogate"]

H1, H2 = 16, 16


def log_bernoulli(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(z; logits) summed over a layer."""
    return -F.binary_cross_entropy_with_logits(logits, z, reduction="none").sum(-1)


def _log_bernoulli_broadcast(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """:func:`log_bernoulli` of plain tensors of different sample dims (storch aligns plates by name)."""
    return log_bernoulli(*torch.broadcast_tensors(logits, z))


class SBN(nn.Module):
    """Encoder q(z1 | x) q(z2 | z1), prior p(z2) p(z1 | z2), decoder p(x | z1); linear layers."""

    def __init__(self, n_in: int = 64) -> None:
        super().__init__()
        self.q1, self.q2 = nn.Linear(n_in, H1), nn.Linear(H1, H2)
        self.prior = nn.Parameter(torch.zeros(H2))
        self.p1, self.decoder = nn.Linear(H2, H1), nn.Linear(H1, n_in)

    def negative_elbo(self, x, l1, z1, l2, z2, log_p=log_bernoulli) -> torch.Tensor:
        """log q(z1, z2 | x) - log p(x, z1, z2), from the encoder's logits ``l1``, ``l2``."""
        return (log_p(l1, z1) + log_p(l2, z2) - log_p(self.prior.expand_as(z2), z2)
                - log_p(self.p1(z2), z1) - log_p(self.decoder(z1), x))


def storch_surrogate(model: SBN, e1, e2, x: torch.Tensor) -> None:
    """The step's nodes and cost, as a user ports the model (call inside a graph)."""
    x = storch.denote_independent(x, 0, "data")
    l1 = model.q1(x)
    z1 = e1(Bernoulli(logits=l1))
    l2 = model.q2(z1)
    z2 = e2(Bernoulli(logits=l2))  # a node in z1's plate
    storch.add_cost(model.negative_elbo(x, l1, z1, l2, z2), name="negative_elbo")


_AVERAGES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # estimator -> the hand-written average


def hand_surrogate(model: SBN, x: torch.Tensor, n: int, baseline: str, e1=None, e2=None) -> torch.Tensor:
    """The same objective by hand: mean over z2, z1 and the data of C + l2 ⊥(C - b2), plus l1 ⊥(C̄ - b1) with C̄
    the mean over z2. ``baseline``: ``"none"``, ``"leave_one_out"`` or ``"moving_average"`` (the average of
    earlier calls' mean costs per node, kept for ``e1`` and ``e2`` and updated here, after the loss is built)."""
    l1 = model.q1(x)
    d1 = Bernoulli(logits=l1)
    z1 = d1.sample((n,))  # (n1, batch, H1)
    l2 = model.q2(z1)
    d2 = Bernoulli(logits=l2)
    z2 = d2.sample((n,))  # (n2, n1, batch, H2)
    c = model.negative_elbo(x, l1, z1, l2, z2, _log_bernoulli_broadcast)  # (n2, n1, batch)
    lp1, lp2 = d1.log_prob(z1).sum(-1), d2.log_prob(z2).sum(-1)
    c2 = c.detach()
    c1 = c2.mean(0)
    a1, a2 = c1, c2
    if baseline == "leave_one_out":
        a1 = c1 - (c1.sum(0) - c1) / (n - 1)
        a2 = c2 - (c2.sum(0) - c2) / (n - 1)
    elif baseline == "moving_average":
        b1, b2 = _AVERAGES.get(e1), _AVERAGES.get(e2)
        a1 = c1 if b1 is None else c1 - b1
        a2 = c2 if b2 is None else c2 - b2
        for est, b, m in ((e1, b1, c1.mean()), (e2, b2, c2.mean())):
            _AVERAGES[est] = m if b is None else torch.lerp(b, m, 1.0 - est.decay)
    elif baseline != "none":
        raise NotImplementedError(f"baseline {baseline!r}: no hand-written version")
    return (c + lp2 * a2).mean(0).add(lp1 * a1).mean()
