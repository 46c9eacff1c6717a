"""Measure-valued derivatives: the weak derivative of each parameter (paper, appendix D.4)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch.distributions import Distribution

from storch import Estimator, Node, UnsupportedDistributionError
from storch.extending import base_distribution, check_precision, is_tracing, options, parameters, rebuild

from ._state import PrecomputedState
from .decompositions import SUPPORTED, decomposition_for

__all__ = ["Mvd"]


class Mvd(Estimator):
    """Measure-valued derivative: c_θ (f(x⁺) − f(x⁻)) for every parameter element θ (appendix D.4).

    For each parameter element θ (every batch element, every parameter, every component:
    Categorical logits have K), a weak derivative (c_θ, p⁺_θ, p⁻_θ) gives
    ∂_θ E_p[f] = c_θ (E_{p⁺}[f] − E_{p⁻}[f]). One draw x₀ ~ p is shared by all evaluation
    points; point (θ, ±) is x₀ with θ's batch element e replaced by a draw of p^±_θ.

    Components (per replicate; n replicates, E elements, G_e = all 2·(#components) proposals
    q of element e):
        q(X | x<i) = Π_θ p⁺_θ(x⁺_θ) p⁻_θ(x⁻_θ): 2 evaluation points per parameter element;
        w(x) = ⊥( p_e(x_e) / (n E Σ_{q ∈ G_e} q(x_e)) ): importance weights (balance heuristic);
            where p_e(x_e) = 0 although c_θ ≠ 0 (Poisson's x⁺ = 1 at a rate of exactly 0), w = 0 with
            the derivative ±c_θ ∇θ / n, and l = 0 there;
        l(x) = ±θ · ⊥( c_θ / (n w(x)) ), + for x⁺, − for x⁻ (parameter-valued);
        a = 0.
    Forward value Σ w f(x) is an importance-sampling estimate of E_p[f] (Σ_{q∈G_e} q w = p/(nE));
    the first derivative is Σ w ∇l f = (1/n) Σ_θ c_θ (f(x⁺_θ) − f(x⁻_θ)) ∇θ, chained into the
    rest of the graph through θ.

    Deviation from the paper (follows the math): appendix D.4 weights a p^± sample by
    p/(2p^±). That is unbiased only when p⁺ and p⁻ both cover the support of p (Normal
    scale), gives half of E_p[f] when they split it (Normal mean: x⁺ > μ > x⁻), and has
    unbounded weights (infinite variance) where p^± vanishes and p does not (1/(2r²) for
    the Normal scale at r = 0). The balance heuristic over all of an element's proposals is
    unbiased whenever their supports cover p's, and its weights are bounded for every
    family here because each family's proposals include p itself or point masses.

    Requires: one of the distributions with a decomposition (``decompositions/``): Normal,
    Bernoulli, Categorical, OneHotCategorical, Poisson, Exponential, Binomial (in probs / logits;
    total_count fixed), Geometric, NegativeBinomial (in probs / logits; total_count fixed), Laplace,
    Gamma (in its rate; also Chi2 with a fixed df) (also inside ``Independent``). A parameter that
    requires grad but has no weak derivative here (a Gamma's concentration, a Binomial's or
    NegativeBinomial's total_count) is refused, with what to use instead; so are a Geometric with
    probs 0 and a NegativeBinomial with probs 1 (no finite sample; an ``assume`` under
    ``storch.compile``). Any cost;
    no differentiability in x. A Categorical's impossible categories (−∞ logits, probs 0) and a
    Bernoulli's impossible values (probs exactly 0 or 1, logits ±∞) have c = 0 and are never handed to
    the cost (``decompositions/categorical.py``, ``decompositions/bernoulli.py``).

    max_order: 1 — the gradient function is linear in θ with a detached coefficient, so its
    second derivative is 0, and ∇l ∇l^T f has no weak-derivative meaning (appendix D.4).

    Args:
        plate: name of the node's plate (size n · 2 · Σ_params K · E).
        n_samples: number of independent replicates of the whole set of evaluation points.
        coupled: draw each pair (x⁺, x⁻) with common random numbers where the family allows it
            (Normal, Poisson, Exponential, Binomial, Geometric, NegativeBinomial, Laplace, Gamma); lowers the
            variance for smooth costs. Bernoulli's and Categorical's p⁺ are point masses: nothing to couple.

    Example:
        >>> torch.manual_seed(0)
        >>> est = storch.estimator("mvd", plate="x")
        >>> x = est(torch.distributions.Normal(mu, 1.0))   # 4 evaluation points per element

    References:
        [1] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
        [2] Monte Carlo Gradient Estimation in Machine Learning (Mohamed et al., 2020), section 6
        [3] Optimally combining sampling techniques for Monte Carlo rendering (Veach and Guibas, 1995)
    """

    name = "mvd"
    State = PrecomputedState
    max_order = 1
    distributions = SUPPORTED

    def __init__(self, plate: str, n_samples: int = 1, coupled: bool = True) -> None:
        super().__init__(plate, n_samples)
        self.coupled = self.check_option("coupled", coupled)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "coupled":
            options.flag("mvd", "coupled", value)
        return super().check_option(name, value)

    @classmethod
    def supports(cls, distribution: Distribution) -> bool:
        """The base class's check, and no parameter that requires grad without a weak derivative here
        (:meth:`WeakDerivative.unsupported`): the registry's listing agrees with :meth:`check_distribution`."""
        return super().supports(distribution) and _unsupported(distribution) is None

    def check_distribution(self, d: Distribution) -> None:
        reason = _unsupported(d)
        if reason is not None:
            # sampling on would give that parameter no gradient, silently
            raise UnsupportedDistributionError(
                f"estimator {self.name!r} does not support {type(base_distribution(d)).__name__} {reason}")
        super().check_distribution(d)

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution
        given = base_distribution(d)
        dec = decomposition_for(given)
        base, reduced = _widened(given)  # a float16 / bfloat16 distribution's parameters in float32
        n, npar = self.n_samples, len(node.parents)
        batch = tuple(base.batch_shape)
        parents, own, event = batch[:npar], batch[npar:], tuple(base.event_shape)
        e = math.prod(own)
        with torch.no_grad():
            x0 = base.sample((n,)).reshape((n, 1, 1, 1) + parents + (e,) + event)
        # a scale below 12 float spacings at loc: the points loc ± scale·w round onto loc
        check_precision(self, given, x0 if reduced is None else x0.to(reduced))
        # entry (k, s, j) replaces element j of x₀ and nothing else
        eye = torch.eye(e, dtype=torch.bool, device=x0.device)
        eye = eye.reshape((1, 1, 1, e) + (1,) * npar + (e,) + (1,) * len(event))
        samples, weights, grads, actives = [], [], [], []
        for part in dec.parts(base, n, self.coupled):
            k = part.plus.shape[1]
            xs = torch.stack([part.plus, part.minus], 2)  # (n, K, 2, *batch, *event)
            with torch.no_grad():
                ratio = dec.ratio_sum(base, xs).reshape((n, k, 2) + parents + (e,)).movedim(-1, 3)
            x = torch.where(eye, xs.reshape((n, k, 2, 1) + parents + (e,) + event), x0)
            samples.append(x.reshape((n, k * 2 * e) + batch + event))
            # balance-heuristic importance weight, detached (appendix D.2.2): Σ_{q∈G_e} q w = p/(nE)
            w = 1.0 / (n * e * ratio)  # (n, K, 2, E, *parents)
            active: Optional[torch.Tensor] = None  # (1, K, 2, E, *parents) where the part has inactive slots
            if part.active is not None:
                # a slot outside G_e (its c is 0; e.g. p⁺_k = δ_k at p_k = 0) holds a stand-in: weight 0
                active = part.active.reshape((k, 2) + parents + (e,)).movedim(-1, 2).unsqueeze(0)
                w = torch.where(active, w, torch.zeros_like(w))
            sign = torch.tensor([1.0, -1.0], dtype=w.dtype, device=w.device).reshape((1, 1, 2, 1) + (1,) * npar)
            theta = part.theta.reshape((k,) + parents + (e,)).movedim(-1, 1).unsqueeze(0).unsqueeze(2)
            c = part.c.reshape((k,) + parents + (e,)).movedim(-1, 1).unsqueeze(0).unsqueeze(2)
            # appendix D.4: l = ±θ ⊥(c / (n w)), so w ∇l = ±c ∇θ / n (the weight cancels);
            # detach: only θ carries gradient, c_θ and w are constants of the estimate
            # c / (n w) = c e ratio, computed without dividing by w: a saturated probability
            # makes w underflow to 0 (and c = 0), and 0 · ∞ must not become a NaN gradient;
            # such a term is c (f(x⁺) - f(x⁻)) with c ≈ 0, dropped (set to 0) when not finite
            coef = (sign * c * (e * ratio)).detach()
            coef = torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))
            # a point of p^± where p has no mass at all while c ≠ 0 (Poisson's p⁺ = δ₁ at a rate of exactly
            # 0, where ∂_λ p = δ₁ − δ₀: decompositions/poisson.py): its weight is exactly 0 (w ∝ p(x) = 0,
            # the ratio is infinite), so l cannot carry its term ±c f(x) ∇θ / n; the weight's derivative
            # does: w = 0 + ±c (θ − ⊥θ) / n there (value 0, so the forward estimate is unchanged; first
            # order, as the rest). A check per part (always while traced, and on the meta device: no
            # value-dependent branch, and no value to read)
            outside = torch.isinf(ratio) & (c != 0)
            if active is not None:
                outside = outside & active
            if is_tracing() or outside.is_meta or bool(outside.any()):
                term = sign * c.detach() * (theta - theta.detach()) / n
                w = w + torch.where(outside, term, torch.zeros((), dtype=term.dtype, device=term.device))
            weights.append(w.reshape((n, k * 2 * e) + parents))
            actives.append((active, k * 2 * e))
            grads.append((theta * coef).reshape((n, k * 2 * e) + parents))
        node.state.weights = torch.cat(weights, 1).flatten(0, 1)
        node.state.gradient = torch.cat(grads, 1).flatten(0, 1)
        node.state.active = actives
        out = torch.cat(samples, 1).flatten(0, 1)
        return out if reduced is None or not out.is_floating_point() else out.to(reduced)

    def weighting_function(self, node: Node) -> torch.Tensor:
        return node.state.weights

    def gradient_function(self, node: Node) -> torch.Tensor:
        return node.state.gradient

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        """The inactive slots (a p^± outside G_e: a Categorical's p⁺_k = δ_k at p_k = 0, its p⁻_k at p_k = 1, a
        Bernoulli's δ₁ at probs 0): each holds a stand-in, a possible value at weight 0 and l = 0, not a draw of
        its p^±, so a loss of the whole set written by the user must leave it out. ``None`` where no part has
        inactive slots (every family but Bernoulli and Categorical)."""
        actives = node.state.active
        if actives is None or all(a is None for a, _ in actives):
            return None
        n = self.n_samples
        # the parents' dims as the distribution's batch has them (size 1 where it broadcasts over a plate)
        parents = next(a for a, _ in actives if a is not None).shape[4:]
        device = node.sample.device
        masks = [torch.zeros((n, size) + parents, dtype=torch.bool, device=device) if a is None
                 else (~a).expand((n,) + a.shape[1:]).reshape((n, size) + parents) for a, size in actives]
        return torch.cat(masks, 1).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"plate={self.plate!r}, n_samples={self.n_samples}, coupled={self.coupled}"


_REDUCED = (torch.float16, torch.bfloat16)


def _widened(d: Distribution) -> tuple[Distribution, Optional[torch.dtype]]:
    """``d`` rebuilt from its parameters cast to float32 (differentiable casts) where they are float16 / bfloat16
    (a model under ``torch.autocast``, or ``.bfloat16()``), with that dtype; else ``d`` itself and ``None`` (one
    dtype comparison per parameter, no copy).

    In bfloat16 the weight w = ⊥(1 / (n E ratio)) and the coefficient ⊥(c E ratio) are each rounded (relative
    2^-8), so w · coef is not c / n: under a cost of 300 + 0.1 · signal the error outweighs the signal; and the
    terms +c f(x⁺) ∇θ and -c f(x⁻) ∇θ were summed into θ's bfloat16 gradient, where they cancelled to exactly 0
    (found by a tester). Computed in float32, the terms meet in float32 and only their sum is cast back to θ's
    dtype (the cast's backward)."""
    # the tensors the distribution holds first (its given parameter is always among them): a float32 / float64 one
    # then costs a scan of its attributes, not parameters()' ~3.4 us per node and step (review r-twentyone)
    if not any(isinstance(v, torch.Tensor) and v.dtype in _REDUCED for v in vars(d).values()):
        return d, None
    params = parameters(d)
    reduced = next((v.dtype for v in params.values() if isinstance(v, torch.Tensor) and v.dtype in _REDUCED), None)
    if reduced is None:
        return d, None
    wide = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in _REDUCED else v for k, v in params.items()}
    return rebuild(d, wide), reduced


def _unsupported(d: Distribution) -> Optional[str]:
    """Why the decomposition of ``d``'s family cannot differentiate ``d`` (``None``: it can, or there is none)."""
    base = base_distribution(d)
    dec = decomposition_for(base)
    return None if dec is None else dec.unsupported(base)
