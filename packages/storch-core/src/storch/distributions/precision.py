"""Samples the floating-point format cannot resolve, where an estimator's gradient reads them (found by a porting
tester: silent wrong gradients from the precision of the samples, float64 included).

Two failures, both of estimators that read the sample's position relative to the distribution (the score
log p(x) of ``score``, ``importance``, LAX, VIMCO; mvd's pair of points), not of the pathwise gradient:

- A distribution on (0, 1) with a concentration near 0 (``Beta(1, 1e-3)``, ``Beta(0.01, 0.01)``,
  ``Beta(1000, 0.01)``; ``Kumaraswamy``; a ``Dirichlet``'s components, near 0 only: its log p reads
  ``xlogy(c - 1, x)``, never ``log(1 - x)``, unlike Beta's, which stacks ``(x, 1 - x)``, and Kumaraswamy's,
  whose transforms read ``log(1 - x^a)``) puts most of its mass closer to 0 or 1 than the dtype resolves: torch's sampler returns ``x`` at the float spacing next to 1 (``1 - eps/2``, also
  in float64) or at the smallest normal float where the true ``1 - x`` or ``x`` is ~1e-300, so ``log(1 - x)``
  in log p is stuck near ``log(eps/2)`` (-37 in float64) and the score is wrong for almost every sample
  (z 3021 for ``Beta(1, 1e-3)``'s concentration0 in float64). :func:`unit_interval_problem` compares the
  concentrations (not the sample: a refusal that depends on the draw would come at random steps near the limit):
  the mass within the float spacing of a side, ~``spacing ** c`` for the concentration c of that side, above
  1e-3 is refused, i.e. ``c < log(1e3) / log(1 / spacing)`` (near 1: 0.19 in float64, 0.42 in float32, where
  the spacing below 1 is eps/2; near 0: 0.0098 and 0.079, the smallest normal float). ``Beta(0.5, 0.5)`` in
  float32 is accepted (2e-4 of its mass beyond the spacing: that bias is below any test's reach);
  a concentration far from 0 whose mass sits near 1 through the other one (``Beta(1e6, 1)``) is not looked at.
  ``ContinuousBernoulli`` is not checked: its density is bounded, log p is smooth on [0, 1].
- A location-scale distribution (``Normal``, ``Laplace``, ``Cauchy``, ``Gumbel``, ``StudentT``) whose scale
  is near the spacing of the floats at its location (``Normal(0.5, 1e-8)`` in float32: 93% of the draws
  equal loc exactly, so (x - loc) / scale² is 0; ``Normal(1e8, 1)`` in float32: mvd's points loc ± scale·w
  both round to loc and its gradient is exactly 0). :func:`location_scale_problem` compares the parameters
  (not the sample: a draw that rounds onto loc happens by chance at any ratio, a refusal must not):
  ``scale < SPREAD * spacing(loc)``, the draws on fewer than SPREAD floats per scale. SPREAD = 12 is measured
  (z of the score gradient of E[(x - loc - 2 scale)²], float32, 1e7 draws, by scale / spacing: 4: z 7-8
  (bias 0.5%); 6: z 4-5; 8: z 2-4 (0.16%); 10: z 3 (0.22%); 12: z 0.8 (0.06%); 16: |z| < 1): the bias
  shrinks like (spacing / scale)², and the threshold refuses where it exceeds about 1e-3 of the gradient. In
  eps·|loc| it is 6 to 12 (the spacing at |loc| is between eps·|loc|/2 and eps·|loc|): ``Normal(1000, 1e-3)``
  (16 spacings) is accepted, ``Normal(1000, 3e-4)`` refused.

Both return the reason in words (``None``: nothing found); the estimator base class and mvd raise
:class:`storch.UnsupportedDistributionError` with it (``storch.estimators.checks.check_precision``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.distributions import (Beta, Cauchy, Dirichlet, Distribution, Gumbel, Independent, Kumaraswamy, Laplace,
                                 Normal, StudentT)

__all__ = ["UNIT_INTERVAL", "LOCATION_SCALE", "SPREAD", "LIKELY", "precision_checked", "unit_interval_problem",
           "location_scale_problem"]

UNIT_INTERVAL = (Beta, Kumaraswamy, Dirichlet)
LOCATION_SCALE = (Normal, Laplace, Cauchy, Gumbel, StudentT)
SPREAD = 12  # float spacings per scale below which a location-scale family's draws are refused (step > scale/8)
LIKELY = 1e-3  # the mass within the float spacing of 0 or 1 (~spacing ** concentration) above which it is refused

_LIMITS: dict = {}  # dtype -> the concentrations below which unit_interval_problem refuses, near 0 and near 1
_KIND = {**{c: "unit" for c in UNIT_INTERVAL}, **{c: "loc" for c in LOCATION_SCALE}}


def precision_checked(d: Distribution) -> Optional[tuple[str, Distribution]]:
    """``("unit" | "loc", the distribution under one Independent)`` for a distribution whose samples are checked,
    else None (one dict lookup for any other class)."""
    kind = _KIND.get(type(d))
    if kind is not None:
        return kind, d
    if type(d) is Independent:
        kind = _KIND.get(type(d.base_dist))
        if kind is not None:
            return kind, d.base_dist
    return None


def unit_interval_problem(d: Distribution, x: torch.Tensor) -> Optional[str]:
    """Why samples ``x`` of a Beta, Kumaraswamy or Dirichlet ``d`` (not wrapped) give a wrong log p, or None."""
    if not x.is_floating_point():
        return None
    info = torch.finfo(x.dtype)
    limits = _LIMITS.get(x.dtype)
    if limits is None:  # spacing ** c > LIKELY, near 0 (the smallest normal float) and near 1 (eps / 2)
        limits = _LIMITS[x.dtype] = (math.log(1 / LIKELY) / math.log(1 / info.tiny),
                                     math.log(1 / LIKELY) / math.log(2 / info.eps))
    near_0, near_1 = limits
    if isinstance(d, Dirichlet):
        # near 0 only: Dirichlet.log_prob reads xlogy(c - 1, x), never log(1 - x) (a component near 1 is exact
        # enough; the others, near 0, are checked on their own). Measured, score of E[x0], 1e7 draws:
        # Dirichlet(0.1·ones(3)) float32 z 1.6 (accepted), Dirichlet(0.05·ones(3)) float32 z 25 (refused)
        c_low = d.concentration.detach()
        c_high: Optional[torch.Tensor] = None
        names = ("concentration", "")
    else:
        c_low = d.concentration1.detach()  # type: ignore[attr-defined]  # (Beta's and Kumaraswamy's a, b)
        c_high = d.concentration0.detach()  # type: ignore[attr-defined]
        names = ("concentration1", "concentration0")
    low = c_low < near_0 if c_high is None else (c_low < near_0) | (c_high < near_1)
    if not bool(low.any()):  # the common case: three kernels and one read
        return None
    dt = str(x.dtype)[6:]
    for at, side, spacing, c, name, limit in ((1, "1 - x", info.eps / 2, c_high, names[1], near_1),
                                              (0, "x", info.tiny, c_low, names[0], near_0)):
        if c is None:
            continue
        low = float(c.min())
        if low >= limit:
            continue
        if at == 1:
            wider = ("float64 does not help: its spacing below 1 is still 1.1e-16" if x.dtype == torch.float64 else
                     f"float64 helps only where {name} is above "
                     f"{math.log(1 / LIKELY) / math.log(2 / torch.finfo(torch.float64).eps):.2g} (its spacing below 1"
                     " is still 1.1e-16)")
        else:
            wider = ("float64 does not help: it resolves values down to 2.2e-308" if x.dtype == torch.float64 else
                     f"float64 helps only where {name} is above "
                     f"{math.log(1 / LIKELY) / math.log(1 / torch.finfo(torch.float64).tiny):.2g} (it resolves values "
                     "down to 2.2e-308)")
        return (f"{type(d).__name__} has {name} {low:.3g}, below {limit:.2g} in {dt}: about {spacing ** low:.2g} of "
                f"its mass lies closer to {at} than {dt} resolves ({side} < {spacing:.3g}), where torch's sampler "
                f"returns the float next to {at} although the true {side} is far smaller, so log({side}) in log p is "
                f"stuck near {math.log(spacing):.3g} (the true values lie lower by ~1/{name}): a gradient read from "
                "log p (the score) would be silently wrong. Use 'reparameterization' for this node (the pathwise "
                f"gradient of {type(d).__name__}'s rsample does not read log p), or keep {name} away from 0 "
                f"(e.g. softplus(...) + 0.5); {wider}")
    return None


def location_scale_problem(d: Distribution, x: torch.Tensor) -> Optional[str]:
    """Why samples ``x`` of a location-scale ``d`` (not wrapped) round onto a few floats around its location, or
    None: ``scale < SPREAD * spacing(loc)``, the float spacing at ``|loc|`` (``eps·2^floor(log2 |loc|)``, between
    ``eps·|loc|/2`` and ``eps·|loc|``)."""
    if not x.is_floating_point():
        return None
    loc, scale = d.loc.detach(), d.scale.detach()  # type: ignore[attr-defined]
    eps = torch.finfo(x.dtype).eps
    # the common case: three kernels and one read (the spacing is at most eps·|loc|)
    if not bool((scale * (1.0 / (SPREAD * eps)) < loc.abs()).any()):
        return None
    loc, scale = torch.broadcast_tensors(loc, scale)
    exponent = torch.frexp(loc.abs()).exponent  # |loc| = m·2^exponent, m in [0.5, 1)
    spacing = torch.where(loc == 0, 0.0, torch.ldexp(torch.full_like(loc, eps / 2), exponent))
    collapsed = scale < SPREAD * spacing
    if not bool(collapsed.any()):
        return None
    n = int(collapsed.sum())
    i = int(torch.argmax((spacing / scale).flatten()))  # the worst entry, for the message
    lv, sv, uv = float(loc.flatten()[i]), float(scale.flatten()[i]), float(spacing.flatten()[i])
    dt = str(x.dtype)[6:]
    better = ("" if x.dtype == torch.float64 else
              f"use float64 (its spacing at {lv:.6g} is {uv * 2.220446049250313e-16 / eps:.3g}), ")
    return (f"{type(d).__name__} has scale below {SPREAD} float spacings at loc in {dt} at {n} of "
            f"{collapsed.numel()} entries (e.g. loc {lv:.6g}, scale {sv:.3g}; the {dt} spacing at that loc is "
            f"{uv:.3g}): its draws loc + scale·ε round onto a grid coarser than scale/{SPREAD}, so what this "
            "estimator's gradient reads of them (the score (x - loc)/scale², mvd's difference of the points "
            "loc ± scale·w) is biased by rounding and the gradient would be silently wrong. Do one of: "
            f"{better}center the variable (draw the offset {type(d).__name__}(0, scale) with this estimator and "
            "add loc outside the node), or use 'reparameterization' for this node (its pathwise gradient does not "
            "read x - loc)")
