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

A pathwise estimator's gradient of the same unit-interval draws is exact for a cost bounded near 0 and 1 but
biased for one that reads log(1 - x) or log x (a Beta-Bernoulli likelihood, a sampled KL: ``Beta(1, 0.1)`` float32
gave 4.8 for the exact 10): ``unit_interval_problem(d, x, pathwise=True)`` with its own measured limits
(``LIKELY_PATHWISE``), which ``storch.estimators.checks.warn_precision`` turns into a
:class:`storch.PrecisionWarning`. ``Kumaraswamy`` has limits of its own sampler, which returns 0 and 1 exactly
(``EXACT``); :func:`exact_draws_hint` says so in a NonFiniteCostError.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.distributions import (Beta, Cauchy, Dirichlet, Distribution, Gumbel, Independent, Kumaraswamy, Laplace,
                                 Normal, StudentT)

__all__ = ["UNIT_INTERVAL", "LOCATION_SCALE", "SPREAD", "LIKELY", "LIKELY_PATHWISE", "EXACT", "precision_checked",
           "unit_interval_problem", "unit_interval_limits", "exact_draws_hint", "location_scale_problem"]

UNIT_INTERVAL = (Beta, Kumaraswamy, Dirichlet)
LOCATION_SCALE = (Normal, Laplace, Cauchy, Gumbel, StudentT)
SPREAD = 12  # float spacings per scale below which a location-scale family's draws are refused (step > scale/8)
LIKELY = 1e-3  # the mass within the float spacing of 0 or 1 (~spacing ** concentration) above which score refuses
# ... above which a pathwise estimator warns (PrecisionWarning): the pathwise gradient of a cost that reads log(1 - x)
# (log x) loses more than the mass, the tail's log weighs it. Measured (scripts/measure_unit_precision.py, z of the
# pathwise d/dlog c E[log(1 - x)] of Beta(1, c) against the digamma closed form 1/c, 6e6 draws; relative bias):
# float32: c 0.3 z 84 (3.2%), 0.4 z 16 (0.7%), 0.5 z 3.4 (0.13%), 0.6 z 2.0 (0.07%), 0.7 z 0.2, 1.0 z 0.2;
# float64: c 0.1 z 366 (11%), 0.15 z 57 (2.3%), 0.2 z 13 (0.46%), 0.25 z 1.5 (0.07%), 0.3 z 0.3. Near 0 (E[log x] of
# Beta(c, 1)): float32 c 0.03 z 211 (7%), 0.05 z 31 (1.3%), 0.08 z 3.7 (0.14%), 0.1 z 0.6, 0.15 z 0.4; float64
# c 0.005 z 75 (2.9%), 0.01 z 2.9 (0.12%), 0.02 z 0.5. 1e-4 puts the limits at 0.55 / 0.25 (near 1) and 0.11 / 0.013
# (near 0): every concentration with a bias above ~0.1% of the gradient warns, none measured clean above them does.
LIKELY_PATHWISE = 1e-4
# Kumaraswamy's own sampler, (1 - u^(1/b))^(1/a) of a uniform u, returns 1 and 0 EXACTLY (not the float next to
# them, as Beta's does): 1 - u^(1/b) rounds to 1 where u^(1/b) < eps/4, with mass (eps/4)^b (and u = 0 itself, 2^-24 of
# float32 draws: every Kumaraswamy in float32 returns 1.0 for ~6e-8 of its draws); (1 - w)^(1/a) underflows to 0
# where 1 - w is below the smallest subnormal ** a. There log p (and a cost's log(1 - x)) is infinite and
# storch.backward() raises NonFiniteCostError at random steps (Kumaraswamy(1, 0.6) float32: 14 of 100 steps at
# n_samples 4096). Measured fraction of draws equal to 1, 1e7 draws: float32 b 0.3: 5.5e-3, 0.45: 4.1e-4,
# 0.6: 3.4e-5, 0.8: 1.5e-6, 1.0: 2e-7, (2, 2): 1e-7; float64 b 0.3: 1.2e-5, 0.45 and above: 0; equal to 0: float32
# a 0.1: 3.2e-5, 0.15: 2e-7, 0.2: 0; float64: 0 from a 0.1. Its limits (score and pathwise) are where that mass
# exceeds EXACT (a crash every ~250 steps of 4096 draws): near 1 0.80 (float32) / 0.37 (float64), near 0 0.13 / 0.019
# (above the bias limits of both estimators, which they therefore include).
EXACT = 1e-6

_LIMITS: dict = {}  # (class, dtype, pathwise) -> the concentrations below which there is a problem, near 0 and near 1
_KIND = {**{c: "unit" for c in UNIT_INTERVAL}, **{c: "loc" for c in LOCATION_SCALE}}
# the measured bias of the pathwise gradient of E[log(1 - x)] (E[log x]) by (dtype, side), for the messages
_MEASURED = {("float32", 1): "concentration0 0.1: -52% (4.8 against 10), 0.3: -3.2%, 0.4: -0.7%, 0.5: -0.13%",
             ("float64", 1): "concentration0 0.1: -11%, 0.15: -2.3%, 0.2: -0.46%, 0.25: -0.07%",
             ("float32", 0): "concentration1 0.03: -7%, 0.05: -1.3%, 0.08: -0.14%",
             ("float64", 0): "concentration1 0.005: -2.9%, 0.01: -0.12%"}


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


def unit_interval_limits(cls: type, dtype: torch.dtype, pathwise: bool = False) -> tuple[float, float]:
    """The concentrations of ``cls`` (Beta, Kumaraswamy, Dirichlet) below which its draws in ``dtype`` are a
    problem for a score-function estimator (``pathwise=False``: refused) or a pathwise one (warned), near 0 and
    near 1 (Dirichlet: near 0 only; its near-1 value is not used)."""
    key = (cls, dtype, pathwise)
    limits = _LIMITS.get(key)
    if limits is None:
        info = torch.finfo(dtype)
        if cls is Kumaraswamy:  # its draws equal to 0 or 1: below the smallest subnormal ** a, (eps/4) ** b
            spacing_0, spacing_1, likely = info.tiny * info.eps, info.eps / 4, EXACT
        else:  # spacing ** c > likely, near 0 (the smallest normal float) and near 1 (eps / 2)
            spacing_0, spacing_1, likely = info.tiny, info.eps / 2, LIKELY_PATHWISE if pathwise else LIKELY
        limits = _LIMITS[key] = (math.log(likely) / math.log(spacing_0), math.log(likely) / math.log(spacing_1))
    return limits


def unit_interval_problem(d: Distribution, x: torch.Tensor, pathwise: bool = False) -> Optional[str]:
    """Why samples ``x`` of a Beta, Kumaraswamy or Dirichlet ``d`` (not wrapped) give a wrong log p (or, with
    ``pathwise``, a pathwise gradient that is wrong for a cost reading log(1 - x) or log x), or None."""
    if not x.is_floating_point():
        return None
    near_0, near_1 = unit_interval_limits(type(d), x.dtype, pathwise)
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
    for at, c, name, limit in ((1, c_high, names[1], near_1), (0, c_low, names[0], near_0)):
        if c is None:
            continue
        low = float(c.min())
        if low < limit:
            return _message(d, x.dtype, at, name, low, limit, pathwise)
    return None


def _message(d: Distribution, dtype: torch.dtype, at: int, name: str, low: float, limit: float,
             pathwise: bool) -> str:
    info = torch.finfo(dtype)
    dt = str(dtype)[6:]
    cls = type(d).__name__
    side = "1 - x" if at == 1 else "x"
    kuma = isinstance(d, Kumaraswamy)
    other = torch.float64 if dtype != torch.float64 else None
    wider = ""
    if other is not None:
        wider = (f"; or float64 with {name} kept above "
                 f"{unit_interval_limits(type(d), other, pathwise)[0 if at == 0 else 1]:.2g} there")
    floor = f"keep {name} above {limit:.2g} in {dt} (a floor in the parameterisation, e.g. softplus(...) + {limit:.2g})"
    if kuma:
        spacing = info.eps / 4 if at == 1 else info.tiny * info.eps
        what = (f"{cls} has {name} {low:.3g}, below {limit:.2g} in {dt}: torch's Kumaraswamy sampler "
                f"(1 - u^(1/concentration0))^(1/concentration1) returns exactly {at} for about {spacing ** low:.2g} of "
                f"its draws ({'1 - u^(1/concentration0) rounds to 1' if at == 1 else 'the power underflows to 0'}), "
                f"where log p(x) and log({side}) are infinite: storch.backward() would raise NonFiniteCostError at "
                "random steps")
        fix = (f"Do one of: {floor}{wider}; use the closed-form expectation (Kumaraswamy's entropy(), or the "
               "analytic KL torch.distributions.kl_divergence where one is registered) instead of a sampled "
               "log q(x)")
        if pathwise:
            what += (f" when the cost reads log({side}) or log q(x) (a cost that stays bounded as x -> {at}, "
                     "E[x] or a squared error, is not affected)")
        return f"{what}. {fix}"
    spacing = info.eps / 2 if at == 1 else info.tiny
    mass = (f"about {spacing ** low:.2g} of its mass lies closer to {at} than {dt} resolves ({side} < {spacing:.3g}), "
            f"where torch's sampler returns the float next to {at} although the true {side} is far smaller")
    expectation = ("E[log(1 - x)] = digamma(concentration0) - digamma(concentration1 + concentration0)" if at == 1
                   else "E[log x] = digamma(concentration1) - digamma(concentration1 + concentration0)")
    if isinstance(d, Dirichlet):
        expectation = "E[log x_i] = digamma(c_i) - digamma(sum(c))"
    remedies = (f"{floor}{wider}; or use the closed-form expectation ({expectation}) or the analytic KL "
                "(torch.distributions.kl_divergence(q, p)) instead of the sampled log term")
    measured = _MEASURED.get((dt, at), "")
    reads = ("Bernoulli(probs=x).log_prob(0) (a Beta-Bernoulli likelihood), log1p(-x)" if at == 1 else
             "Bernoulli(probs=x).log_prob(1), log(x)")
    bias = (f"the pathwise gradient of a cost that reads log({side}) ({reads}, a sampled entropy or KL "
            f"q.log_prob(x)) is biased (measured, d/dlog c E[log({side})] of "
            f"{'Beta(1, c)' if at == 1 else 'Beta(c, 1)'} in {dt}: {measured}); a cost that stays bounded as "
            f"x -> {at} (E[x], a squared error) is not affected")
    if pathwise:
        return (f"{cls} has {name} {low:.3g}, below {limit:.2g} in {dt}: {mass}, so {bias}. If the cost reads "
                f"log({side}), do one of: {remedies}")
    return (f"{cls} has {name} {low:.3g}, below {limit:.2g} in {dt}: {mass}, so log({side}) in log p is stuck near "
            f"{math.log(spacing):.3g} (the true values lie lower by ~1/{name}): a gradient read from log p (the "
            f"score) would be silently wrong. 'reparameterization' (its pathwise gradient does not read log p) is "
            f"no general remedy: {bias}. "
            f"Otherwise do one of: {remedies}")


def exact_draws_hint(d: Distribution, x: torch.Tensor) -> Optional[str]:
    """For a NonFiniteCostError (error path only): where draws ``x`` of a Beta, Kumaraswamy or Dirichlet ``d``
    (not wrapped) equal 0 or 1 exactly, which of its draws do and why (log p and log(1 - x) are infinite there),
    else None."""
    if not x.is_floating_point():
        return None
    x = x.detach()
    ones, zeros = int((x == 1).sum()), int((x == 0).sum())
    if not ones and not zeros:
        return None
    dt = str(x.dtype)[6:]
    cls = type(d)
    near_0, near_1 = unit_interval_limits(cls, x.dtype, False)
    if isinstance(d, Dirichlet):
        params = f"concentration min {float(d.concentration.detach().min()):.3g}"
    else:
        params = (f"concentration1 min {float(d.concentration1.detach().min()):.3g}, "  # type: ignore[attr-defined]
                  f"concentration0 min {float(d.concentration0.detach().min()):.3g}")  # type: ignore[attr-defined]
    exact = " and ".join(f"{k} equal {v} exactly" for k, v in ((ones, 1), (zeros, 0)) if k)
    exact = exact.replace(" equal", f" of the {x.numel()} draws of {cls.__name__} ({{}}; {dt}) equal", 1)
    why = ("torch's Kumaraswamy sampler (1 - u^(1/concentration0))^(1/concentration1) rounds to 1 where "
           "u^(1/concentration0) < eps/4 (and where its uniform u is 0: ~6e-8 of float32 draws, whatever the "
           "concentrations), to 0 where the power underflows" if cls is Kumaraswamy else
           f"torch's {cls.__name__} sampler rounded them")
    return (f"{exact.format(params)}: {why}; log p(x) and a cost's "
            f"log(1 - x) or log x are infinite there. Keep the concentrations above {near_1:.2g} (concentration0) "
            f"and {near_0:.2g} ({'concentration' if cls is Dirichlet else 'concentration1'}) in {dt} (a floor in "
            "the parameterisation), use float64, or use the closed-form expectation / analytic KL "
            "(torch.distributions.kl_divergence) instead of a sampled log term")


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
