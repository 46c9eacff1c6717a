"""Simultaneous perturbation stochastic approximation (paper, appendix D.3)."""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Optional

import torch
from torch.distributions import (
    Bernoulli,
    Binomial,
    Distribution,
    Independent,
    MixtureSameFamily,
    Multinomial,
    OneHotCategorical,
    Transform,
    TransformedDistribution,
    constraints,
    transform_to,
)
from torch.distributions.utils import lazy_property

import storch
from storch import Estimator, Node, StorchError, UnsupportedDistributionError
from storch.extending import (
    assume,
    given_by_probs,
    is_differentiated,
    is_tracing,
    moving_support,
    options,
    rebuild,
    same_support,
    strict_support,
)

from ._rebuild_cache import known_rebuildable, rebuild_key, remember_rebuildable
from ._state import PrecomputedState

__all__ = ["Spsa"]


class Spsa(Estimator):
    """SPSA: a randomised central finite difference over all of the distribution's parameters.

    With u the parameters in unconstrained form (u = T⁻¹(θ), T = ``transform_to`` of each
    parameter's constraint), ε ~ Rademacher over every element of u and c = ``perturbation``:
    x₁ ~ p₊ = p_{T(u + cε)}, x₂ ~ p₋ = p_{T(u − cε)}, and

        ĝ_u = (f(x₁) − f(x₂)) / (2cε)   (elementwise), chained to θ and beyond through u(θ).

    Components (per replicate, n replicates):
        q(X | x<i) = p₊(x₁) p₋(x₂): two evaluation points;
        w(x) = ⊥( p(x) / (n (p₊(x) + p₋(x))) );
        l(x₁) = u · ⊥(1 / (2cε n w(x₁))),  l(x₂) = −u · ⊥(1 / (2cε n w(x₂)));
        a = 0.
    Where w underflows (p barely overlaps p±: c many scales of a Normal's loc), 1 / w is infinite; such an
    entry has l = 0 and w = ⊥w ± Σ (u − ⊥u) / (2cε n) instead (value ⊥w, the same derivative ±∇u / (2cε n)).
    So Σ w f is an unbiased importance-sampling estimate of E_p[f] (p₊w + p₋w = p/n), and
    Σ w ∇l f is the SPSA gradient (the weights cancel), averaged over replicates.

    Deviations from appendix D.3 (follow the math): (1) the paper weights each sample by
    p/p±; with two samples that sums to 2 E_p[f], so each needs a factor ½ — here the balance
    heuristic p/(p₊ + p₋) is used instead: also unbiased, and bounded (p/p₋ is unbounded for
    a shrunk Normal scale, with infinite variance once e^{-2c} < ½). (2) The paper's second
    gradient function divides by p_{θ+cε}(x₂); it must be the proposal of x₂, p_{θ−cε}.
    (3) The paper perturbs θ itself; θ ± cε can leave the parameter space (a scale below 0,
    probs outside [0, 1]), so the perturbation is applied to the unconstrained u. (4) 2cε is the
    realised step u₊ − u₋ of the parameters p± are built from, after their dtype rounded them
    (bfloat16 near 20: a step of 0.25 for c = 0.1); see :func:`_perturb`.

    Requires: parameters whose constraints have a ``torch.distributions.transform_to``
    (Normal, Bernoulli, Categorical, Poisson, Exponential, Gamma, Beta, LogNormal, ...) and a
    support that the perturbation does not move (not Uniform, Pareto; a Binomial with fixed total_count is fine). Only parameters that
    require grad are perturbed (integer ones and constants stay fixed); a TransformedDistribution's are its
    base's, a MixtureSameFamily's its mixture's and components'. A tensor that requires grad elsewhere (a
    transform's) is refused: it would get no gradient. A −∞ logit (a masked category or bit), and a +∞ logit
    of a Bernoulli or Binomial (a bit that is 1 surely), is held fixed (its finite difference is exactly 0)
    and the finite coordinates are perturbed; a constrained parameter on its
    boundary (probs exactly 0 or 1, of a Categorical, Bernoulli, Binomial, Geometric, ...) is refused (see
    :func:`_held_coordinates`). Of probs and logits, the one the distribution was built from is perturbed.
    Any cost.

    biased: True — E[ĝ] is the gradient of a finite difference, E[ĝ] − ∇ = O(c²) for smooth
    expectations (central difference; Spall 1992). max_order: 1 (appendix D.3).

    Args:
        plate: name of the node's plate (size 2 · n_samples).
        n_samples: number of perturbations ε, each with its two evaluations.
        perturbation: the perturbation size c > 0.
        coupled: draw x₁ and x₂ with common random numbers (replaying the generator state);
            each is still an exact draw of its own distribution. Lowers the variance a lot.

    Example:
        >>> torch.manual_seed(0)
        >>> est = storch.estimator("spsa", plate="x", n_samples=4, perturbation=0.05)
        >>> x = est(torch.distributions.Normal(mu, sigma))

    References:
        [1] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
        [2] Multivariate stochastic approximation using a simultaneous perturbation gradient approximation (Spall, 1992)
    """

    name = "spsa"
    State = PrecomputedState
    max_order = 1
    biased = True

    def __init__(self, plate: str, n_samples: int = 1, perturbation: float = 0.1, coupled: bool = True) -> None:
        super().__init__(plate, n_samples)
        self.perturbation = self.check_option("perturbation", perturbation)
        self.coupled = self.check_option("coupled", coupled)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "perturbation":
            options.number("spsa", "perturbation", value, above=0, finite=True, what="a finite number > 0")
            return float(value)
        if name == "coupled":
            options.flag("spsa", "coupled", value)
        return super().check_option(name, value)

    @classmethod
    def supports(cls, distribution: Distribution) -> bool:
        """Whether spsa can perturb every tensor of ``distribution`` that requires grad (the capability
        listing of ``UnsupportedDistributionError`` asks this; see :func:`_unreachable`)."""
        try:
            # a support that moves with a learned parameter is refused by proposal() (the weights of
            # appendix D.3 vanish): not listed as supported either
            return (super().supports(distribution) and _unreachable(distribution) is None
                    and not moving_support(distribution))
        except UnsupportedDistributionError:  # a parameter without an unconstrained form
            return False

    @classmethod
    def requirements(cls) -> list[str]:
        return ["every tensor that requires grad to be an arg_constraints parameter of the distribution (under "
                "Independent, a TransformedDistribution's base, a MixtureSameFamily's mixture and components)"]

    def check_distribution(self, d: Distribution) -> None:
        moved = moving_support(d)
        if moved:
            raise UnsupportedDistributionError(
                f"spsa does not support {type(d).__name__} with a learned {', '.join(moved)}: its support moves with "
                "the perturbed parameters, so the perturbed distributions put mass where p has none and the "
                "importance weights of appendix D.3 vanish. Use 'reparameterization' for this node (its pathwise "
                "gradient moves the samples with the support; a score-function estimator such as 'score' misses "
                "the boundary term of a moving support and refuses it too)")
        reason = _unreachable(d)
        if reason is not None:
            # plain sampling would silently give those tensors no gradient
            raise UnsupportedDistributionError(
                f"spsa does not support {type(d).__name__} here: {reason}, which spsa cannot perturb, so its "
                "gradient would be silently missing. Give the trainable tensors as parameters of the distribution "
                "(e.g. TransformedDistribution(Normal(loc, scale), [TanhTransform()]) rather than in a transform), "
                f"or use another estimator.{_others(d)}")
        for leaf in _leaves(d):
            # the perturbed copies are built again from the parameters (proposal): a class storch cannot
            # rebuild (a Binomial subclass whose __init__ takes only logits) was said to be supported, then failed.
            # (torch's own classes always rebuild: not checked, no cost per step)
            if type(leaf).__module__.startswith("torch.distributions."):
                continue
            free, fixed = _split_parameters(leaf)
            if free:
                key = rebuild_key(leaf, free)
                if known_rebuildable(leaf, key):  # (a leaf of this kind was rebuilt before: not at every step)
                    continue
                try:
                    with torch.no_grad():
                        rebuild(leaf, {**{k: v.detach() for k, v in free.items()}, **fixed})
                except UnsupportedDistributionError as e:
                    raise UnsupportedDistributionError(
                        f"spsa draws from copies of {type(leaf).__name__} built again from perturbed parameters, "
                        f"but {e}.{_others(d)}") from e
                remember_rebuildable(leaf, key)
        super().check_distribution(d)

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution
        leaves = _leaves(d)
        split = [_split_parameters(leaf) for leaf in leaves]
        free = {(i, k): v for i, (f, _) in enumerate(split) for k, v in f.items()}
        n, c = self.n_samples, self.perturbation
        if not free:
            # no parameter requires grad (e.g. a fixed prior; check_distribution refused grad-requiring
            # tensors elsewhere): nothing to perturb, plain sampling
            x = d.sample((n,))
            # follow the distribution's dtype and device (issue 11: no hard-coded CPU / default dtype)
            like = next((v for leaf in leaves for v in vars(leaf).values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point()), x)
            dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
            node.state.weights = torch.full((n,), 1.0 / n, dtype=dtype, device=x.device)
            node.state.gradient = torch.zeros((n,), dtype=dtype, device=x.device)
            return x
        if self.coupled and is_tracing():
            # refused by capability, not by the replay check's comparison of values: the forward value Σ w f
            # barely depends on x₂ where c is many scales of the distribution (w ≈ 0), so eager and traced runs
            # agreed there and the step compiled with a fresh x₂ (σ ≤ 0.01 at c = 0.1: 30x the gradient's sd)
            raise StorchError(_COUPLED_TRACE)
        u = {key: transform_to(leaves[key[0]].arg_constraints[key[1]]).inv(v) for key, v in free.items()}  # with grad
        held = {key: _held_coordinates(leaves[key[0]], key[1], v, u[key]) for key, v in free.items()}
        eps = {k: torch.randint(0, 2, (n,) + v.shape, device=v.device).to(v.dtype) * 2 - 1 for k, v in u.items()}
        # the perturbed parameters θ± = T(u ± cε) as the dtype rounds them, and the realised step Δ = u₊ − u₋
        # between the points they stand for (≈ 2cε; near 20 a bfloat16 u ± 0.1 is 20.125 / 19.875)
        ends = {key: _perturb(leaves[key[0]].arg_constraints[key[1]], u[key].detach(), c, eps[key]) for key in u}
        steps = {key: _checked_step(leaves[key[0]], key[1], u[key], c, eps[key], ends[key][2], held[key])
                 for key in u}
        # the weights p / (p₊ + p₋) are computed on the distribution under the outer Independent and
        # TransformedDistribution layers, whose transforms hold nothing perturbed: their Jacobian cancels in
        # the ratio, and a squashed sample (tanh ≈ ±1) is never inverted
        core, transforms = _peel(d)

        def perturbed(sign: float) -> tuple[list[Distribution], Distribution]:
            new = []
            with torch.no_grad():
                for i, (leaf, (f, fixed)) in enumerate(zip(leaves, split)):
                    if not f:  # one per perturbation too, so that a MixtureSameFamily's parts line up
                        new.append(strict_support(leaf.expand((n,) + leaf.batch_shape), drawn_only=True))
                        continue
                    # p itself from its own parameters (T(T⁻¹(θ)) may round off θ), p± from the rounded
                    # θ± whose realised step divides the finite difference below
                    params = {k: (f[k].detach().expand((n,) + f[k].shape) if sign == 0 else
                                  ends[i, k][0 if sign > 0 else 1]) for k in f}
                    # with the constructor arguments outside arg_constraints (a Multinomial's total_count:
                    # type(leaf)(**params) alone drew 1 trial). strict_support: a Bernoulli's or Binomial's
                    # infinite (held) logit has log p = 0 on the value it always draws, where torch's is NaN
                    # (the weights p / (p₊ + p₋) of every coordinate were NaN); the same samples, and
                    # torch's log-probabilities elsewhere
                    # (n,): the perturbation dim the parameters carry ahead of the leaf's batch dims (a user's
                    # class was refused for its batch shape (n, ...) without it)
                    new.append(strict_support(rebuild(leaf, {**params, **fixed}, torch.Size((n,))), drawn_only=True))
                return new, _assemble(core, iter(new))

        # p itself, rebuilt without argument validation
        (l0, p), (lp_, p_plus), (lm, p_minus) = perturbed(0.0), perturbed(1.0), perturbed(-1.0)
        for i, leaf in enumerate(leaves):
            if split[i][0] and constraints.is_dependent(inspect.getattr_static(type(leaf), "support", None)) and not (
                    same_support(l0[i], lp_[i]) and same_support(l0[i], lm[i])):
                # appendix D.3 assumes p± have the support of p: the weights p/(p₊ + p₋) must be > 0
                # wherever p± put mass, or the weight cannot be cancelled by the gradient function. A support
                # that is a property of the distribution may still not move with the perturbed parameters
                # (Categorical's {0, ..., K-1}, a Binomial's {0, ..., total_count} with a fixed total_count)
                raise UnsupportedDistributionError(
                    f"spsa does not support {type(leaf).__name__} with these parameters: its support depends on "
                    f"the perturbed parameters {sorted(split[i][0])}, so the perturbed distributions put mass where "
                    "p has none and the importance weights of appendix D.3 vanish. Use 'reparameterization' for this "
                    "node (its pathwise gradient moves the samples with the support; a score-function estimator "
                    "such as 'score' misses the boundary term of a moving support and refuses it too)")
        own = len(node.parents) + 1  # the sample dim and the parents' plates lead core's log-probabilities

        def log_prob(x: torch.Tensor, q: Distribution) -> torch.Tensor:
            lp = q.log_prob(x)  # joint over the node's own elements (D.2.2)
            return lp.sum(tuple(range(own, lp.dim()))) if lp.dim() > own else lp

        with torch.no_grad():
            device = next(iter(free.values())).device
            with _replay_rng(device, self.coupled):  # coupled: x₂ reuses x₁'s random numbers
                x1 = p_plus.sample()
            x2 = p_minus.sample()
            # balance-heuristic weight p / (n (p₊ + p₋))
            w1, w2 = (torch.exp(log_prob(x, p) - torch.logaddexp(log_prob(x, p_plus), log_prob(x, p_minus))) / n
                      for x in (x1, x2))
        grads, weights = [], []
        for w, sign in ((w1, 1.0), (w2, -1.0)):
            # appendix D.3: l = ±u ⊥(1 / (2cε n w)), so w ∇l = ±∇u / (2cε n): the weight cancels. Where p
            # barely overlaps p± (a perturbation of ~11 scales or more in float32: c = 0.05 at σ = 0.0045) w underflows and
            # 1 / w is infinite: w ∇l f was 0 · ∞ = NaN. Such an entry carries its term in the weight instead,
            # w = ⊥w + Σ ±(u − ⊥u) / (2cε n) (value ⊥w, derivative ±∇u / (2cε n), as mvd's points outside p's
            # support), with l = 0; the others keep l (a weight below √tiny: w f and 1 / w stay normal numbers)
            small = w < math.sqrt(torch.finfo(w.dtype).tiny)
            routed = is_tracing() or small.is_meta or bool(small.any())
            l = torch.zeros_like(w)
            for k, v in u.items():
                wk = w.reshape(w.shape + (1,) * (eps[k].dim() - w.dim()))
                # detach: only u carries gradient. 2cε is the realised step Δ = u₊ − u₋ (the nominal one was
                # 25% off for a bfloat16 loc of 20), divided in the wide dtype Δ is carried in
                coef = (sign / (steps[k] * n * wk.to(steps[k].dtype))).to(v.dtype).detach()
                if held[k] is not None:
                    # a coordinate at −∞ (a masked logit) is not moved by ±cε, so its finite difference is
                    # exactly 0: it enters l as 0, with no gradient (−∞ · coef was NaN)
                    v = torch.where(held[k], torch.zeros((), dtype=v.dtype, device=v.device), v)
                if routed:  # (the underflowing entries' terms, carried in the weight: only where there are some)
                    sk, zero = small.reshape(wk.shape), torch.zeros((), dtype=v.dtype, device=v.device)
                    coef = torch.where(sk, zero, coef)
                    step = (sign / (steps[k] * n)).to(v.dtype).detach()
                    term = torch.where(sk, (v - v.detach()) * step, zero)
                    w = w + term.reshape(w.shape + (-1,)).sum(-1).to(w.dtype)
                l = l + (v * coef).reshape(w.shape + (-1,)).sum(-1)
            grads.append(l)
            weights.append(w)
        node.state.weights = torch.stack(weights, 1).flatten(0, 1)
        node.state.gradient = torch.stack(grads, 1).flatten(0, 1)
        with torch.no_grad():
            x = torch.stack([x1, x2], 1).flatten(0, 1)
            for t in transforms:  # innermost first
                x = t(x)
        return x

    def weighting_function(self, node: Node) -> torch.Tensor:
        return node.state.weights

    def gradient_function(self, node: Node) -> torch.Tensor:
        return node.state.gradient

    def extra_repr(self) -> str:
        return f"plate={self.plate!r}, n_samples={self.n_samples}, perturbation={self.perturbation}, coupled={self.coupled}"


def _perturb(constraint, u: torch.Tensor, c: float, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(θ₊, θ₋, Δ)``: the perturbed parameters θ± = T(u ± cε) in ``u``'s dtype, which rounds u ± cε and
    T's result (T = ``transform_to(constraint)``), and the realised step Δ = u₊ − u₋ between the
    unconstrained points that θ₊ and θ₋ stand for, in float64 (float32 on a device without float64).

    Δ ≠ 2cε where the dtype's spacing is not small against c (bfloat16 near 20: 0.125, so u ± 0.1 is
    20.125 / 19.875, a step of 0.25), or where T's rounding moves θ± (a bfloat16 exp(u ± c) is off by up
    to 2⁻⁹, a 2% change of the step). Still Δ = ε D with D independent of the signs ε, so the cross terms
    of SPSA keep their zero mean. For a T that is not one-to-one (softmax, whose T⁻¹ ∘ T shifts u by a
    constant) Δ adds to the nominal u ± cε only the change that rounding θ± made to T⁻¹(θ±).
    """
    transform = transform_to(constraint)
    wide = torch.float32 if u.device.type == "mps" else torch.float64  # MPS has no float64
    thetas, points = [], []
    with torch.no_grad():  # values only: u carries the gradient through l
        for sign in (1.0, -1.0):
            r = u + sign * c * eps  # rounded to u's dtype
            theta = transform(r)  # rounded again: the parameter p± is built from
            back = transform.inv(theta.to(wide))
            if not transform.bijective:
                r_wide = r.to(wide)
                back = r_wide + (back - transform.inv(transform(r_wide)))
            thetas.append(theta)
            points.append(back)
    return thetas[0], thetas[1], points[0] - points[1]


def _checked_step(d: Distribution, name: str, u: torch.Tensor, c: float, eps: torch.Tensor, step: torch.Tensor,
                  held: Optional[torch.Tensor]) -> torch.Tensor:
    """The realised step of parameter ``name`` (see :func:`_perturb`), 2cε at the held coordinates (whose
    u = ±∞ makes it NaN; their finite difference is exactly 0 and enters with no gradient).

    Raises:
        UnsupportedDistributionError: in ``u``'s dtype the perturbation does not move some coordinate
            (u ± cε rounds to u: the finite difference is 0 / 0) or moves it onto the boundary of the
            constraint (T(u ± cε) rounds to a bound: an infinite step).
    """
    if held is not None:
        step = torch.where(held.expand(step.shape), 2 * c * eps.to(step.dtype), step)
    message = (
        f"spsa cannot perturb parameter {name!r} of {type(d).__name__} in {u.dtype}: for some entries the "
        f"perturbation u ± c·ε of its unconstrained form (c = perturbation = {c}) rounds to no change, or T(u ± c·ε) "
        f"to the boundary of its constraint ({d.arg_constraints[name]}), so the finite difference has no "
        "step to divide by (bfloat16 has 8 significant bits: u ± c·ε rounds to u once |u| is about 256·c). Keep this "
        "distribution's parameters in float32 (build it from .float() tensors) or use a larger perturbation")
    if u.is_meta:  # no values to look at (a shape-only run)
        return step
    with torch.no_grad():
        good = torch.isfinite(step) & (step * eps.to(step.dtype) > 0)
        if is_tracing():  # storch.compile: no branch on values
            assume(good.all(), message)
        elif not bool(good.all()):
            raise UnsupportedDistributionError(message)
    return step


_COUPLED_TRACE = (
    "storch.compile cannot replay estimator 'spsa' with coupled=True (the default): its coupled draws give x₂ the "
    "random numbers of x₁ by saving and restoring the generator state, which a trace does not record, so every "
    "replayed call would draw x₂ afresh (a silently different, noisier gradient). Run this step eagerly")


def _replay_rng(device: torch.device, enabled: bool):
    """Context: restore the generator state of ``device`` on exit (common random numbers)."""
    generator = storch.current_generator()  # storch.Graph(generator=g): g draws, so g is replayed
    if generator is not None:
        return _replay_generator(generator, enabled)
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[], enabled=enabled)
    return torch.random.fork_rng(devices=[device.index or 0], enabled=enabled, device_type=device.type)


@contextlib.contextmanager
def _replay_generator(generator: torch.Generator, enabled: bool):
    state = generator.get_state() if enabled else None
    try:
        yield
    finally:
        if enabled:
            generator.set_state(state)


def _peel(d: Distribution) -> tuple[Distribution, list]:
    """``(core, transforms)``: ``d`` under its outer ``Independent`` and ``TransformedDistribution`` layers, and
    the transforms that map a sample of ``core`` to one of ``d``, innermost first."""
    transforms: list = []
    while isinstance(d, Independent) or type(d) is TransformedDistribution:
        if type(d) is TransformedDistribution:
            transforms = list(d.transforms) + transforms
        d = d.base_dist
    return d, transforms


def _leaves(d: Distribution) -> list[Distribution]:
    """The distributions that hold ``d``'s parameters, in a fixed order: ``d`` itself, or, under
    ``Independent``, a ``TransformedDistribution``'s base (the class itself, whose ``arg_constraints``
    are empty; LogNormal and the like have theirs) and a ``MixtureSameFamily``'s mixture and components."""
    if isinstance(d, Independent) or type(d) is TransformedDistribution:
        return _leaves(d.base_dist)
    if type(d) is MixtureSameFamily:
        return _leaves(d.mixture_distribution) + _leaves(d.component_distribution)
    return [d]


def _assemble(d: Distribution, leaves) -> Distribution:
    """``d`` built again, without argument validation, from ``leaves`` (an iterator in :func:`_leaves` order)."""
    if isinstance(d, Independent):
        return Independent(_assemble(d.base_dist, leaves), d.reinterpreted_batch_ndims, validate_args=False)
    if type(d) is TransformedDistribution:
        return TransformedDistribution(_assemble(d.base_dist, leaves), d.transforms, validate_args=False)
    if type(d) is MixtureSameFamily:
        mixture = _assemble(d.mixture_distribution, leaves)
        return MixtureSameFamily(mixture, _assemble(d.component_distribution, leaves), validate_args=False)
    return next(leaves)


def _grad_tensor(obj, depth: int = 0) -> bool:
    """Whether ``obj`` (a tensor, transform, distribution or a list of them) holds a tensor that is
    differentiated (requires grad, or carries a forward-mode tangent)."""
    if isinstance(obj, torch.Tensor):
        return is_differentiated(obj)
    if isinstance(obj, (list, tuple)):
        return any(_grad_tensor(v, depth) for v in obj)
    if isinstance(obj, (Transform, Distribution)) and depth < 8:
        return any(_grad_tensor(v, depth + 1) for v in vars(obj).values())
    return False


def _unreachable(d: Distribution) -> Optional[str]:
    """Why spsa cannot perturb every tensor of ``d`` that requires grad (``None``: it can). Those tensors
    would get no gradient: a transform's (an AffineTransform's loc), or a distribution's whose
    ``arg_constraints`` do not list them (a class with none).

    Raises:
        UnsupportedDistributionError: a parameter that requires grad has no unconstrained form.
    """
    while isinstance(d, Independent) or type(d) is TransformedDistribution:
        if type(d) is TransformedDistribution:
            for t in d.transforms:
                if _grad_tensor(t):
                    return f"its transform {type(t).__name__} holds a tensor that requires grad"
        d = d.base_dist
    if type(d) is MixtureSameFamily:
        return _unreachable(d.mixture_distribution) or _unreachable(d.component_distribution)
    free, _ = _split_parameters(d)  # raises for a parameter it cannot perturb, naming it
    if not free and _grad_tensor(d):
        return (f"{type(d).__name__} holds a tensor that requires grad outside its parameters "
                f"(arg_constraints: {sorted(type(d).arg_constraints) or 'none'})")
    return None


def _others(d: Distribution) -> str:
    """The hint of ``Estimator._unsupported_message``: the installed estimators that support ``d``."""
    # (the public registry API: a family imports only public storch names)
    others = [n for n in storch.available_estimators()
              if n != "spsa" and _supports_quietly(storch.get_estimator_class(n), d)]
    return f" Estimators that support it: {', '.join(others)}." if others else ""


def _supports_quietly(cls, d: Distribution) -> bool:
    try:
        return bool(cls.supports(d))
    except Exception:  # noqa: BLE001  (only for an error message: an estimator that cannot tell is not listed)
        return False


def _held_coordinates(d: Distribution, name: str, theta: torch.Tensor, u: torch.Tensor) -> Optional[torch.Tensor]:
    """The coordinates of ``u`` (the unconstrained form of parameter ``name``) that spsa holds fixed: those
    at −∞ where the parameter itself is −∞ (a masked logit: u = θ), and, for the logits of a Bernoulli or
    Binomial (one independent logit per element), those at +∞ too (a sure outcome: σ'(+∞) = 0 as at −∞),
    as a bool mask; ``None`` if all are finite. (A Categorical's +∞ logit normalises to NaN: refused.)

    u ± cε = −∞ there, so p± keep p's zero probabilities (the supports of p, p₊, p₋ stay equal and the
    weights of appendix D.3 stay valid), the finite coordinates get the usual SPSA estimate of the
    smoothed restriction of E_p[f] to them, and the held coordinates the exact finite difference 0 =
    lim_{θ_k → −∞} ∂_{θ_k} E_p[f] (for logits, p_k (f(k) − E_p[f]) → 0).

    Raises:
        UnsupportedDistributionError: u is infinite where the parameter is finite, or the parameter is on a
            bound of its constraint (a Bernoulli's, Binomial's or Geometric's probs exactly 0 or 1, whose u
            torch's clamped sigmoid inverse makes finite, with derivative 0): a constrained parameter on
            its boundary, whose derivative there is one-sided and needs the cost at an outcome of
            probability 0, which no sample of p± reaches (and the chain rule is 0 · ∞).
    """
    message = (
        f"spsa cannot perturb parameter {name!r} of {type(d).__name__}: it has entries on the boundary of its "
        f"constraint ({d.arg_constraints[name]}; e.g. probabilities exactly 0 or 1), where its unconstrained "
        "form is infinite. The derivative with respect to such an entry is one-sided and needs the cost at an "
        "outcome of probability 0, which no perturbed sample reaches. Mask impossible categories with -inf "
        "logits instead (Categorical(logits=logits.masked_fill(~allowed, -math.inf))): spsa holds a -inf logit "
        "fixed and perturbs the finite ones (likewise a Bernoulli's or Binomial's -inf or +inf logit)")
    if u.is_meta:  # no values to look at (a shape-only run): nothing is held
        return None
    # a Bernoulli's or Binomial's logits: elementwise, both infinities are sure outcomes (strict_support
    # gives their exact log-probabilities in the weights)
    bits = type(d) in (Bernoulli, Binomial) and name == "logits" and not given_by_probs(d)
    with torch.no_grad():
        bad = ~torch.isfinite(u)
        # probs exactly 0 or 1 of a Bernoulli, Binomial or Geometric: u = logit(clamped probs) is finite, and
        # the gradient silently 0 (the clamp's)
        edge = _on_boundary(d.arg_constraints[name], theta)
        if is_tracing():  # storch.compile: no branch on values; the mask always (all False: no change)
            if edge is not None:
                assume(~edge.any(), message)
            if u.shape == theta.shape:
                # as eagerly: an infinite logit of a bit (either sign; strict_support's traced copy gives its
                # exact log p in the weights) or a masked -inf one is held fixed, by a mask
                held = (u == theta) if bits else (u == -math.inf) & (theta == -math.inf)
                assume((~bad | held).all(), message)
                return bad
            assume(~bad.any(), message)
            return None
        if edge is not None and bool(edge.any()):
            raise UnsupportedDistributionError(message)
        if not bool(bad.any()):
            return None
        if u.shape == theta.shape and bool((u[bad] == theta[bad]).all()) and (
                bits or bool((u[bad] == -math.inf).all())):
            return bad
    raise UnsupportedDistributionError(message)


def _built_from_probs(d: Distribution) -> bool:
    """Whether ``d``, which holds both ``logits`` and ``probs``, was built from ``probs``.

    torch computes the other lazily (``d.log_prob`` or ``d.logits`` computes a probs-built Bernoulli's
    logits; a OneHotCategorical's and a Multinomial's are properties, always both there), from clamped
    probabilities: perturbing those logits chained the gradient through the clamp, 0 at a probability
    exactly 0 or 1 (or below float eps) where the derivative is not, and the boundary was never seen.
    """
    if given_by_probs(d):
        return True
    inner = d._categorical if isinstance(d, (OneHotCategorical, Multinomial)) else d
    if "_param" in inner.__dict__:
        return False
    # a class that does not record its argument (Geometric): its constructor sets it before anything
    # computes the other, and a dict keeps the order of insertion
    return next((k for k in inner.__dict__ if k in ("logits", "probs")), "logits") == "probs"


def _on_boundary(constraint, theta: torch.Tensor) -> Optional[torch.Tensor]:
    """The entries of ``theta`` on a bound of ``constraint`` (an interval's, e.g. probs' [0, 1]), as a bool
    mask; ``None`` if the constraint has no bounds. torch's ``transform_to(unit_interval).inv`` clamps, so
    such an entry's unconstrained form is finite (logit(tiny) = −87) with derivative 0 there."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    bounds = [getattr(constraint, b) for b in ("lower_bound", "upper_bound") if hasattr(constraint, b)]
    if not bounds:
        return None
    edge = torch.zeros(theta.shape, dtype=torch.bool, device=theta.device)
    for b in bounds:
        edge = edge | (theta == b)
    return edge


def _split_parameters(d: Distribution) -> tuple[dict, dict]:
    """``(perturbed, fixed)`` constructor arguments of ``d``: continuous parameters that are differentiated
    vs the rest. Differentiated: requires grad, or carries a forward-mode tangent (torch.func.jvp,
    torch.autograd.forward_ad: such a parameter does not require grad; held fixed, spsa's gradient was 0)."""
    params = {}
    for k in d.arg_constraints:
        if k in d.__dict__:
            params[k] = d.__dict__[k]
        elif isinstance(getattr(type(d), k, None), property) and not isinstance(getattr(type(d), k), lazy_property):
            params[k] = getattr(d, k)  # e.g. LogNormal's loc and scale live on its base distribution
    if "logits" in params and "probs" in params:  # two equivalent forms: perturb the one it was built from
        del params["logits" if _built_from_probs(d) else "probs"]
    free, fixed = {}, {}
    for k, v in params.items():
        constraint = d.arg_constraints[k]
        # integer parameters cannot be perturbed; parameters nothing differentiates are held fixed,
        # since perturbing them only adds SPSA's cross-talk noise (f(x₁) − f(x₂)) ε_k / ε_j
        if (not isinstance(v, torch.Tensor) or not v.is_floating_point() or not is_differentiated(v)
                or getattr(constraint, "_is_discrete", False) is True):
            fixed[k] = v
            continue
        try:
            transform_to(constraint)
        except NotImplementedError:
            raise UnsupportedDistributionError(
                f"spsa cannot perturb parameter {k!r} of {type(d).__name__}: its constraint {constraint} has no "
                "unconstrained parameterisation (torch.distributions.transform_to); use another estimator"
            ) from None
        free[k] = v
    return free, fixed
