"""Simultaneous perturbation stochastic approximation (paper, appendix D.3)."""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.distributions import Distribution, Independent, constraints, transform_to
from torch.distributions.utils import lazy_property

import storch
from storch import Estimator, Node, UnsupportedDistributionError
from storch.extending import base_distribution, options, rebuild

from ._state import PrecomputedState

__all__ = ["Spsa"]

# a parameter a distribution may store in two equivalent forms: perturb the one it was built from
_PAIRS = (("logits", "probs"),)


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
    So Σ w f is an unbiased importance-sampling estimate of E_p[f] (p₊w + p₋w = p/n), and
    Σ w ∇l f is the SPSA gradient (the weights cancel), averaged over replicates.

    Deviations from appendix D.3 (follow the math): (1) the paper weights each sample by
    p/p±; with two samples that sums to 2 E_p[f], so each needs a factor ½ — here the balance
    heuristic p/(p₊ + p₋) is used instead: also unbiased, and bounded (p/p₋ is unbounded for
    a shrunk Normal scale, with infinite variance once e^{-2c} < ½). (2) The paper's second
    gradient function divides by p_{θ+cε}(x₂); it must be the proposal of x₂, p_{θ−cε}.
    (3) The paper perturbs θ itself; θ ± cε can leave the parameter space (a scale below 0,
    probs outside [0, 1]), so the perturbation is applied to the unconstrained u.

    Requires: parameters whose constraints have a ``torch.distributions.transform_to``
    (Normal, Bernoulli, Categorical, Poisson, Exponential, Gamma, Beta, LogNormal, ...) and a
    support that the perturbation does not move (not Uniform, Pareto; a Binomial with fixed total_count is fine). Only parameters that
    require grad are perturbed (integer ones and constants stay fixed). Any cost.

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
        options.number("spsa", "perturbation", perturbation, above=0, finite=True, what="a finite number > 0")
        options.flag("spsa", "coupled", coupled)
        self.perturbation = float(perturbation)
        self.coupled = coupled

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution
        base = base_distribution(d)
        free, fixed = _split_parameters(base)
        n, c = self.n_samples, self.perturbation
        if not free:
            # no parameter requires grad (e.g. a fixed prior): nothing to perturb, plain sampling
            x = d.sample((n,))
            # follow the distribution's dtype and device (issue 11: no hard-coded CPU / default dtype)
            like = next((v for v in vars(base).values() if isinstance(v, torch.Tensor) and v.is_floating_point()), x)
            dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
            node.state.weights = torch.full((n,), 1.0 / n, dtype=dtype, device=x.device)
            node.state.gradient = torch.zeros((n,), dtype=dtype, device=x.device)
            return x
        u = {k: transform_to(base.arg_constraints[k]).inv(v) for k, v in free.items()}  # with grad
        eps = {k: torch.randint(0, 2, (n,) + v.shape, device=v.device).to(v.dtype) * 2 - 1 for k, v in u.items()}

        def perturbed(sign: float) -> Distribution:
            with torch.no_grad():
                params = {k: transform_to(base.arg_constraints[k])(u[k].detach() + sign * c * eps[k]) for k in u}
                # with the constructor arguments outside arg_constraints (a Multinomial's total_count:
                # type(base)(**params) alone drew 1 trial)
                q = rebuild(base, {**params, **fixed})
            return Independent(q, d.reinterpreted_batch_ndims, validate_args=False) if d is not base else q

        # p itself, rebuilt without argument validation
        p, p_plus, p_minus = perturbed(0.0), perturbed(1.0), perturbed(-1.0)
        if constraints.is_dependent(inspect.getattr_static(type(base), "support", None)) and not (
                _same_support(p, p_plus) and _same_support(p, p_minus)):
            # appendix D.3 assumes p± have the support of p: the weights p/(p₊ + p₋) must be > 0
            # wherever p± put mass, or the weight cannot be cancelled by the gradient function. A support
            # that is a property of the distribution may still not move with the perturbed parameters
            # (Categorical's {0, ..., K-1}, a Binomial's {0, ..., total_count} with a fixed total_count)
            raise UnsupportedDistributionError(
                f"spsa does not support {type(base).__name__} with these parameters: its support depends on the "
                f"perturbed parameters {sorted(free)}, so the perturbed distributions put mass where p has none and "
                "the importance weights of appendix D.3 vanish. Use 'reparameterization' for this node (its pathwise "
                "gradient moves the samples with the support; a score-function estimator such as 'score' misses "
                "the boundary term of a moving support and refuses it too)")
        with torch.no_grad():
            device = next(iter(free.values())).device if free else torch.device("cpu")
            with _replay_rng(device, self.coupled):  # coupled: x₂ reuses x₁'s random numbers
                x1 = p_plus.sample()
            x2 = p_minus.sample()
            # balance-heuristic weight p / (n (p₊ + p₋)), joint over the node's own elements (D.2.2)
            w1, w2 = (torch.exp(node.log_prob(x, p) - torch.logaddexp(node.log_prob(x, p_plus),
                                                                   node.log_prob(x, p_minus))) / n
                      for x in (x1, x2))
        grads = []
        for w, sign in ((w1, 1.0), (w2, -1.0)):
            l = torch.zeros_like(w)
            for k, v in u.items():
                wk = w.reshape(w.shape + (1,) * (eps[k].dim() - w.dim()))
                # appendix D.3: l = ±u ⊥(1 / (2cε n w)), so w ∇l = ±∇u / (2cε n): the weight cancels;
                # detach: only u carries gradient
                coef = (sign / (2 * c * eps[k] * n * wk)).detach()
                l = l + (v * coef).reshape(w.shape + (-1,)).sum(-1)
            grads.append(l)
        node.state.weights = torch.stack([w1, w2], 1).flatten(0, 1)
        node.state.gradient = torch.stack(grads, 1).flatten(0, 1)
        return torch.stack([x1, x2], 1).flatten(0, 1)

    def weighting_function(self, node: Node) -> torch.Tensor:
        return node.state.weights

    def gradient_function(self, node: Node) -> torch.Tensor:
        return node.state.gradient

    def extra_repr(self) -> str:
        return f"plate={self.plate!r}, n_samples={self.n_samples}, perturbation={self.perturbation}, coupled={self.coupled}"


def _same_support(p: Distribution, q: Distribution) -> bool:
    """Whether the supports of ``p`` and ``q`` (same class) are the same set: the same constraint type
    with the same bounds (numbers or tensors)."""
    a, b = p.support, q.support
    if type(a) is not type(b):
        return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    for k, x in va.items():
        y = vb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not torch.equal(torch.as_tensor(x), torch.as_tensor(y).to(torch.as_tensor(x))):
                return False
        elif x != y:
            return False
    return True


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


def _split_parameters(d: Distribution) -> tuple[dict, dict]:
    """``(perturbed, fixed)`` constructor arguments of ``d``: continuous parameters that require
    grad vs the rest."""
    params = {}
    for k in d.arg_constraints:
        if k in d.__dict__:
            params[k] = d.__dict__[k]
        elif isinstance(getattr(type(d), k, None), property) and not isinstance(getattr(type(d), k), lazy_property):
            params[k] = getattr(d, k)  # e.g. LogNormal's loc and scale live on its base distribution
    for keep, drop in _PAIRS:
        if keep in params and drop in params:
            del params[drop]
    free, fixed = {}, {}
    for k, v in params.items():
        constraint = d.arg_constraints[k]
        # integer parameters cannot be perturbed; parameters nothing differentiates are held fixed,
        # since perturbing them only adds SPSA's cross-talk noise (f(x₁) − f(x₂)) ε_k / ε_j
        if (not isinstance(v, torch.Tensor) or not v.is_floating_point() or not v.requires_grad
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
