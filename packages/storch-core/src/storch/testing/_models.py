"""Small stochastic computation graphs whose expected cost is known exactly.

Each :class:`Model` holds a model written for ONE sample with storch (``build``) and the same
expectation computed independently in plain torch (``exact``: enumeration of every joint value,
or a closed form for Normal nodes), differentiable in θ so that exact derivatives of any order
come from autograd. :func:`standard_models` picks those whose distributions an estimator
supports (through its ``check_distribution``, i.e. its ``distributions``,
``requires_rsample`` and ``requires_enumerate_support`` class attributes).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.distributions import (
    Bernoulli, Categorical, Distribution, Independent, Laplace, Normal, OneHotCategorical, Uniform,
)

from ..errors import UnsupportedDistributionError
from ..estimators.base import Estimator
from ..graph import add_cost, denote_independent

__all__ = ["Model", "EstimatorFactory", "standard_models", "supports"]

EstimatorFactory = Callable[[str], Estimator]
"""``make(plate) -> Estimator``: a fresh estimator for the node with sample plate ``plate``."""

_F64 = torch.float64


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=_F64)


@dataclass(frozen=True)
class Model:
    """A small model with an exactly known expected total cost.

    Attributes:
        name: short name used in reports.
        theta: the parameter vector (float64, shape ``(d,)``) at which the check runs.
        build: ``build(make, theta)`` samples the model's nodes with estimators from
            ``make(plate)`` and registers its costs with ``storch.add_cost``; ``theta`` is a
            plate tensor of shape ``(d,)`` (one replicate's parameter).
        exact: ``exact(theta) -> E[total cost]`` (0-dim) in plain torch, differentiable in θ.
        distributions: example distributions of the model's nodes, used to decide whether an
            estimator supports the model (not for a factory's estimators, which may differ per node: they
            decide when the model samples).
        may_refuse: a storch refusal (``OrderError`` at an order, ``UnsupportedDistributionError``
            when sampling) is an accepted outcome: the model is one where some estimators are
            biased (a kink of log p, a moving support), so storch must refuse them; the refused
            orders are reported as skipped and the lower ones still tested.
        hint: what a failure of the model most likely means, printed under the report's table.
        hint_applies: ``hint_applies(estimator) -> bool``: whether the hint can apply to the estimator's
            declared capabilities (a hint about baselines only to one with a baseline or control variate);
            ``None``: always.
    """

    name: str
    theta: torch.Tensor
    build: Callable[[EstimatorFactory, torch.Tensor], None]
    exact: Callable[[torch.Tensor], torch.Tensor]
    distributions: Callable[[], Sequence[Distribution]]
    may_refuse: bool = False
    hint: str = ""
    hint_applies: Optional[Callable[[Estimator], bool]] = None


def has_baseline(est: Estimator) -> bool:
    """Whether ``est`` declares a baseline or a control variate (overrides either component)."""
    cls = type(est)
    return cls.baseline is not Estimator.baseline or cls.control_variate is not Estimator.control_variate


def is_pathwise(est: Estimator) -> bool:
    """Whether ``est`` differentiates the cost through its sample (``requires_rsample`` or ``pathwise``)."""
    return bool(est.requires_rsample or est.pathwise)


def may_be_undeclared_score(est: Estimator) -> bool:
    """Whether ``est`` may compute log p in a gradient function storch does not know as a score function: not
    pathwise, ``score_function`` not True, and its ``gradient_function`` its own (the base class's is known)."""
    return (not is_pathwise(est) and est.score_function is not True
            and type(est).gradient_function is not Estimator.gradient_function)


def supports(estimator: Estimator, model: Model) -> Optional[str]:
    """``None`` if ``estimator`` accepts every node of ``model``, else the reason it does not."""
    for d in model.distributions():
        try:
            estimator.check_distribution(d)
        except UnsupportedDistributionError as e:
            return str(e)
    return None


# -- single-node discrete models ---------------------------------------------------------------

_C3 = _t(1.0, -0.5, 0.8)


def _bernoulli() -> Model:
    """Three jointly sampled Bernoullis (the node's own batch dims); C = (c·x - 0.3)²."""

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x = make("x")(Bernoulli(logits=theta))
        add_cost(((x * _C3).sum() - 0.3) ** 2)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        xs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)), dtype=_F64)  # (8, 3)
        logp = (xs * torch.nn.functional.logsigmoid(theta) + (1 - xs) * torch.nn.functional.logsigmoid(-theta)).sum(-1)
        return (logp.exp() * ((xs @ _C3) - 0.3) ** 2).sum()

    theta = _t(0.3, -0.6, 1.1)
    return Model("bernoulli[3]", theta, build, exact, lambda: [Bernoulli(logits=theta)])


_LOGITS5 = _t(0.2, -0.4, 0.9, 0.0, -1.1)
_V5 = _t(1.0, -0.5, 2.0, 0.3, -1.2)


def _index(x, k: int):
    """The category index of a Categorical sample, also when an estimator hands out a one-hot
    vector for it (relaxation-based estimators do, since an integer carries no gradient)."""
    return x if x.shape == () else (x * torch.arange(k, dtype=_F64)).sum()


def _categorical() -> Model:
    """One Categorical with K = 5; C = (x - 1.3)²."""
    offset = torch.tensor(1.3, dtype=_F64)

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x = make("x")(Categorical(logits=theta))
        add_cost((_index(x, 5) - offset) ** 2)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        k = torch.arange(5, dtype=_F64)
        return (torch.softmax(theta, -1) * (k - offset) ** 2).sum()

    return Model("categorical[K=5]", _LOGITS5, build, exact, lambda: [Categorical(logits=_LOGITS5)])


def _onehot() -> Model:
    """One OneHotCategorical with K = 5; C = (v·x - 0.4)²."""

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x = make("x")(OneHotCategorical(logits=theta))
        add_cost(((x * _V5).sum() - 0.4) ** 2)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(theta, -1) * (_V5 - 0.4) ** 2).sum()

    return Model("onehot[K=5]", _LOGITS5, build, exact, lambda: [OneHotCategorical(logits=_LOGITS5)])


# -- categorical nodes with several elements -----------------------------------------------------

def _categorical_2x3() -> Model:
    """One Categorical node with own batch dims (2,) and K = 3 (9 joint values); θ = its logits (2, 3);
    C = (x0 − 1.2 x1 + 0.5)² + 0.3 x0 x1.

    The models above have one categorical element per node (or a single chosen Independent one): an
    estimator that mixes up the node's elements (every element given the first one's probabilities, the
    element dim read as the category dim) passes them. A one-hot value (relaxations hand one out) is read
    as its indices.
    """
    theta = _t(0.3, -0.5, 0.9, -0.2, 0.4, 0.1)

    def cost(i0, i1):
        return (i0 - 1.2 * i1 + 0.5) ** 2 + 0.3 * i0 * i1

    def build(make: EstimatorFactory, th: torch.Tensor) -> None:
        x = make("x")(Categorical(logits=th.reshape(2, 3)))
        idx = x.to(_F64) if x.shape == (2,) else (x * _K3).sum(-1)  # (long indices: float64, not float32)
        add_cost(cost(idx[0], idx[1]))

    def exact(th: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(th.reshape(2, 3), -1)
        joint = p[0].unsqueeze(1) * p[1].unsqueeze(0)  # (3, 3): x0 = i, x1 = j
        return (joint * cost(_K3.unsqueeze(1), _K3.unsqueeze(0))).sum()

    return Model("categorical[2x3]", theta, build, exact, lambda: [Categorical(logits=theta.reshape(2, 3))])


_V2 = _t(0.7, -1.1)


def _onehot_2x2() -> Model:
    """One OneHotCategorical node with own batch dims (2,) and K = 2 (4 joint values; K = D, so an element
    dim read as the category dim keeps the shapes right and is caught only by its values); θ = its logits
    (2, 2); with u_d = v·x_d: C = (u0 + u1 − 0.4)² + u0 u1. (A 3x3 node catches the same bugs, but costs a
    relaxation-based estimator's conformance check 6 times as long: 81 components at orders 2 and 3.)"""
    theta = _t(0.2, -0.4, -0.8, 0.7)

    def cost(u0, u1):
        return (u0 + u1 - 0.4) ** 2 + u0 * u1

    def build(make: EstimatorFactory, th: torch.Tensor) -> None:
        u = (make("x")(OneHotCategorical(logits=th.reshape(2, 2))) * _V2).sum(-1)
        add_cost(cost(u[0], u[1]))

    def exact(th: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(th.reshape(2, 2), -1)
        return (p[0].unsqueeze(1) * p[1].unsqueeze(0) * cost(_V2.unsqueeze(1), _V2.unsqueeze(0))).sum()

    return Model("onehot[2x2]", theta, build, exact, lambda: [OneHotCategorical(logits=theta.reshape(2, 2))])


# -- a two-node discrete chain -----------------------------------------------------------------

_DIR3, _OFF3 = _t(-1.0, 0.0, 1.0), _t(0.1, -0.2, 0.3)


class _Family:
    """A discrete family driven by one scalar s, with a scalar feature φ(x) of its samples."""

    def __init__(self, kind: type) -> None:
        self.kind = kind
        self.values = (0.0, 1.0) if kind is Bernoulli else (0.0, 1.0, 2.0)

    def make(self, s) -> Distribution:
        if self.kind is Bernoulli:
            return Bernoulli(logits=s)
        return self.kind(logits=s * _DIR3 + _OFF3)

    def feature(self, x):
        return x if self.kind is Bernoulli else _index(x, 3)

    def log_probs(self, s: torch.Tensor) -> torch.Tensor:
        """log p(v | s) for every support value v, as plain torch."""
        if self.kind is Bernoulli:
            return torch.stack([torch.nn.functional.logsigmoid(-s), torch.nn.functional.logsigmoid(s)])
        return torch.log_softmax(s * _DIR3 + _OFF3, -1)


def _chain(kind: type) -> Model:
    """x1 ~ D(θ0), x2 ~ D(θ1 + 1.2 φ(x1) - 0.6); costs (φ(x2) - 0.5 φ(x1) - 0.25 θ0)² and θ1 φ(x1).

    The second node's distribution depends on the first sample, and both costs depend on θ
    directly (a pathwise term), so every part of Eq. 2 is exercised.
    """
    fam = _Family(kind)

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x1 = make("x1")(fam.make(theta[0]))
        f1 = fam.feature(x1)
        x2 = make("x2")(fam.make(theta[1] + 1.2 * f1 - 0.6))
        add_cost((fam.feature(x2) - 0.5 * f1 - 0.25 * theta[0]) ** 2)
        add_cost(theta[1] * f1)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        phi = torch.tensor(fam.values, dtype=_F64)
        p1 = fam.log_probs(theta[0]).exp()
        total = theta.new_zeros(())
        for i, v1 in enumerate(phi):
            p2 = fam.log_probs(theta[1] + 1.2 * v1 - 0.6).exp()
            inner = (p2 * (phi - 0.5 * v1 - 0.25 * theta[0]) ** 2).sum()
            total = total + p1[i] * (inner + theta[1] * v1)
        return total

    theta = _t(0.4, -0.3)
    return Model(f"chain[{kind.__name__}]", theta, build, exact, lambda: [fam.make(theta[0])])


# -- a global latent over a data plate ---------------------------------------------------------

_DATA_PLATE = "data"
_XD, _AD = _t(0.4, 1.0, -0.3), _t(0.25, -0.65, 0.05)  # the data points x_i, offsets a_i (plate "data")
# (no logit of y_i is 0 or a tie of two categories for any z: a mode (a greedy baseline) is then defined)

_GLOBAL_HINT = (
    "the global latent z is NOT under the data plate 'data' of the costs (each data point i also has its own "
    "latent y_i, which is): a baseline or control variate for z that averages the costs over 'data' (a "
    "leave-one-data-point-out mean, a batch mean) uses costs that depend on z itself, so it is biased. Average "
    "over a data plate only for a node under it: `plate in {p.name for p in node.plates}` for the plate of "
    "`cost.plates` you average over (the total cost is the MEAN over the data plates)")


def _global_latent(kind: type) -> Model:
    """A global latent z over a data plate of three points, each with its own local latent y_i (a hierarchical
    model): z ~ D(θ0), y_i ~ D(θ1 + 0.8 φ(z) + a_i) on the plate ``data``; costs on that plate
    C_i = (φ(y_i) − x_i + φ(z))² + θ0 x_i, whose total is their mean over ``data``.

    Every other model's nodes are under all the plates of its costs (the kit's replicate plate): an estimator
    whose baseline averages a cost over a data plate without checking that the node is under it (a
    leave-one-data-point-out baseline applied to z too) passes them, and is biased here. The local y_i are
    under the plate, so a correct per-data-point baseline is exercised as well.
    """
    normal = kind is Normal
    fam = None if normal else _Family(kind)
    one, half = torch.tensor(1.0, dtype=_F64), torch.tensor(0.5, dtype=_F64)

    def dist(s, scale) -> Distribution:
        return Normal(s, scale) if fam is None else fam.make(s)

    def feature(v):
        return v if fam is None else fam.feature(v)

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        z = make("z")(dist(theta[0], one))
        fz = feature(z)
        a, x = denote_independent((_AD, _XD), 0, _DATA_PLATE)
        y = make("y")(dist(theta[1] + 0.8 * fz + a, half))
        add_cost((feature(y) - x + fz) ** 2 + theta[0] * x)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        if fam is None:  # y_i − x_i + z = θ1 + a_i − x_i + 1.8 z + ε/2: mean m_i, variance 1.8² + 0.5²
            m = theta[1] + _AD - _XD + 1.8 * theta[0]
            return (m ** 2 + 3.24 + 0.25 + theta[0] * _XD).mean()
        phi = torch.tensor(fam.values, dtype=_F64)
        pz = fam.log_probs(theta[0]).exp()
        total = theta.new_zeros(())
        for j, vz in enumerate(phi):
            per_point = []
            for i in range(len(_XD)):
                py = fam.log_probs(theta[1] + 0.8 * vz + _AD[i]).exp()
                per_point.append((py * (phi - _XD[i] + vz) ** 2).sum() + theta[0] * _XD[i])
            total = total + pz[j] * torch.stack(per_point).mean()
        return total

    theta = _t(0.4, -0.3)
    short = "OneHot" if kind is OneHotCategorical else kind.__name__
    return Model(f"global_latent[{short}]", theta, build, exact, lambda: [dist(theta[0], one)], hint=_GLOBAL_HINT,
                 hint_applies=has_baseline)


# -- an ELBO: two costs of the same frame on one node ---------------------------------------------

_ELBO_W, _ELBO_X = _t(0.9, -1.3), _t(0.6, -0.4)  # likelihood weights, observed x (one per element of z)
_ELBO_PRIOR = _t(-0.5, 0.8)  # prior logits p(z) (Normal: prior means)

_ELBO_HINT = (
    "this model's node has TWO costs of the same frame (an ELBO: log q(z) and -log p(x, z), both holding the same "
    "sample's value): a baseline or control variate for one cost built from another cost of the same step (the "
    "previous cost frame, a sum over the node's costs) depends on the sample itself, so it is biased. Build a "
    "baseline only from what is independent of the sample: other samples' values of the SAME cost "
    "(leave-one-out), a moving average of earlier steps, a learned function of the node's parents")


def _elbo(kind: type) -> Model:
    """An ELBO with one latent node of two elements: z ~ q = D(θ), costs log q(z) and -log p(x, z) with
    p(z) a fixed prior of the same family and p(x | z) = Normal(x; w·φ(z), 1) per element (both costs are on
    the same frame: the node's sample and the kit's replicate plate; log q also depends on θ directly).

    Every other model has at most one cost per frame (``chain[...]``'s two costs are on different frames): an
    estimator whose baseline for one cost is another cost of the same step (the previous cost frame, which
    holds this very sample's cost) passes them, and is biased here. The log-probabilities are written out
    (not ``log_prob``), so a relaxed value of z gives a finite cost too.
    """
    normal = kind is Normal
    fam = None if normal else _Family(kind)
    half = torch.tensor(0.5, dtype=_F64)

    def q(th) -> Distribution:
        if fam is None:
            return Normal(th, half.expand(2))
        if kind is Bernoulli:
            return Bernoulli(logits=th)
        return kind(logits=th.unsqueeze(-1) * _DIR3 + _OFF3)  # (2, 3): element d's logits θ_d·dir + off

    def log_p_family(th, z):
        """log D(z; θ) per element, written out: z a sample (a one-hot value for a categorical, or an index)."""
        if fam is None:
            return -0.5 * ((z - th) / half) ** 2 - torch.log(half) - 0.5 * math.log(2 * math.pi)
        if kind is Bernoulli:
            return z * torch.nn.functional.logsigmoid(th) + (1 - z) * torch.nn.functional.logsigmoid(-th)
        logits = torch.log_softmax(th.unsqueeze(-1) * _DIR3 + _OFF3, -1)  # (2, 3)
        onehot = z if z.dim() == 2 else (z.unsqueeze(-1) == _K3).to(_F64)
        return (onehot * logits).sum(-1)

    def feature(z):
        if fam is None or kind is Bernoulli:
            return z
        return (z * _K3).sum(-1) if z.dim() == 2 else z.to(_F64)

    def log_lik(z):
        return -0.5 * (_ELBO_X - _ELBO_W * feature(z)) ** 2 - 0.5 * math.log(2 * math.pi)

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        z = make("z")(q(theta))
        add_cost(log_p_family(theta, z).sum())  # log q(z)
        add_cost(-(log_p_family(_ELBO_PRIOR, z) + log_lik(z)).sum())  # -log p(x, z)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        if fam is None:  # per element (prior N(m, σ²) as q's scale σ): E log q = -log σ - ½ log 2π - ½;
            # E -log p(z) = ((θ-m)² + σ²) / 2σ² + log σ + ½ log 2π; E -log p(x|z) = ½ ((x - wθ)² + w² σ²) + ½ log 2π
            s2 = half ** 2
            per = (-torch.log(half) - 0.5 - 0.5 * math.log(2 * math.pi)
                   + 0.5 * ((theta - _ELBO_PRIOR) ** 2 + s2) / s2 + torch.log(half) + 0.5 * math.log(2 * math.pi)
                   + 0.5 * ((_ELBO_X - _ELBO_W * theta) ** 2 + _ELBO_W ** 2 * s2) + 0.5 * math.log(2 * math.pi))
            return per.sum()
        values = torch.tensor(fam.values, dtype=_F64)
        total = theta.new_zeros(())
        for d in range(2):  # the elements are independent and the costs are sums over them
            if kind is Bernoulli:
                zs = values
                lq = torch.stack([log_p_family(theta[d], v) for v in zs])
                lp = torch.stack([log_p_family(_ELBO_PRIOR[d], v) for v in zs])
            else:
                lq = torch.log_softmax(theta[d] * _DIR3 + _OFF3, -1)
                lp = torch.log_softmax(_ELBO_PRIOR[d] * _DIR3 + _OFF3, -1)
            ll = -0.5 * (_ELBO_X[d] - _ELBO_W[d] * values) ** 2 - 0.5 * math.log(2 * math.pi)
            total = total + (lq.exp() * (lq - lp - ll)).sum()
        return total

    theta = _t(0.4, -0.7) if normal else _t(1.3, -1.6)  # (|log q| differences large enough to catch a cross-cost baseline)
    short = "OneHot" if kind is OneHotCategorical else kind.__name__
    return Model(f"elbo[{short}]", theta, build, exact, lambda: [q(theta)], hint=_ELBO_HINT,
                 hint_applies=has_baseline)


# -- continuous models (closed forms) ----------------------------------------------------------

_C2, _S2 = _t(1.0, -0.7), _t(0.8, 1.2)


def _normal() -> Model:
    """x ~ Normal(μ, σ) with two own batch dims, θ = μ, σ = (0.8, 1.2); C = (c·x - 0.3)² + x0.

    Only the means are parameters: third derivatives of score-function estimates w.r.t. a scale
    are so heavy-tailed that 4000 estimates do not make their mean approximately normal.
    """

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x = make("x")(Normal(theta, _S2))
        add_cost(((x * _C2).sum() - 0.3) ** 2 + x[0])

    def exact(theta: torch.Tensor) -> torch.Tensor:
        return ((_C2 * theta).sum() - 0.3) ** 2 + (_C2 ** 2 * _S2 ** 2).sum() + theta[0]

    theta = _t(0.5, -0.2)
    return Model("normal[2]", theta, build, exact, lambda: [Normal(theta, _S2)])


def _normal_chain() -> Model:
    """x1 ~ Normal(θ0, 1), x2 ~ Normal(θ1 x1, 0.5); C = x2² + θ1 x1 (a pathwise term)."""

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x1 = make("x1")(Normal(theta[0], torch.tensor(1.0, dtype=_F64)))
        x2 = make("x2")(Normal(theta[1] * x1, torch.tensor(0.5, dtype=_F64)))
        add_cost(x2 ** 2 + theta[1] * x1)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        mu, a = theta[0], theta[1]
        return a ** 2 * (mu ** 2 + 1) + 0.25 + a * mu

    theta = _t(0.3, 0.7)
    return Model("chain[Normal]", theta, build, exact, lambda: [Normal(theta[0], torch.tensor(1.0, dtype=_F64))])


# -- models where a score function is biased: storch must refuse it -----------------------------

_SCORE_HINT = (
    "{what}, so an estimator whose gradient function is the score log p(x) is biased here; storch refuses such "
    "an estimator ({refusal}) when it knows it is one. If your gradient_function returns node.log_prob(x) (or "
    "a masked / per-step variant of it), set the class attribute score_function = True: the default (None) "
    "assumes a score function only where gradient_function is the base class's")


def _laplace() -> Model:
    """x ~ Laplace(θ, 1); C = x² + 5 (E = θ² + 7). log p = -|x - θ| has a kink in θ: a score function's
    estimate of order >= 2 misses the delta term -2 p(θ) C(θ), so it must be refused (OrderError)."""
    one = torch.tensor(1.0, dtype=_F64)

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x = make("x")(Laplace(theta[0], one))
        add_cost(x ** 2 + 5)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        return theta[0] ** 2 + 7  # E x² = θ² + 2 b², b = 1

    theta = _t(0.4)
    hint = _SCORE_HINT.format(what="log p = -|x - loc| of a Laplace has a kink in loc (its derivative jumps at x = "
                              "loc, and autograd drops the delta of the next derivative)",
                              refusal="storch.OrderError at order >= 2")
    return Model("laplace[loc]", theta, build, exact, lambda: [Laplace(theta[0], one)], True, hint,
                 may_be_undeclared_score)


def _uniform() -> Model:
    """x ~ Uniform(0, θ); C = (x - 0.3)² (E = θ²/3 - 0.3 θ + 0.09). The support moves with θ: a score
    function's estimate misses the boundary term θ⁻¹ C(θ) at order 1 already, so it must be refused
    (UnsupportedDistributionError when sampling)."""
    zero = torch.tensor(0.0, dtype=_F64)

    def build(make: EstimatorFactory, theta: torch.Tensor) -> None:
        x = make("x")(Uniform(zero, theta[0]))
        add_cost((x - 0.3) ** 2)

    def exact(theta: torch.Tensor) -> torch.Tensor:
        h = theta[0]
        return h ** 2 / 3 - 0.3 * h + 0.09

    theta = _t(1.3)
    hint = _SCORE_HINT.format(what="the support [0, high] of Uniform(0, high) moves with high (the derivative of "
                              "E C(x) has a boundary term C(high) p(high) that log p's gradient does not hold)",
                              refusal="storch.UnsupportedDistributionError when sampling")
    return Model("uniform[high]", theta, build, exact, lambda: [Uniform(zero, theta[0])], True, hint,
                 may_be_undeclared_score)


# -- an Independent-wrapped node ---------------------------------------------------------------

_C22, _V23 = _t(1.0, -0.5, 0.8, 0.6).reshape(2, 2), _t(1.0, -0.5, 2.0, 0.3, -1.2, 0.7).reshape(2, 3)
_K3 = torch.arange(3, dtype=_F64)


def _independent(kind: type) -> Model:
    """One node ``Independent(D(θ), 1)``: its parameters are on the wrapped ``base_dist``.

    An estimator's ``distributions`` are matched against ``base_distribution(d)``, so an estimator for
    D is handed the wrapper; one that reads ``node.distribution.logits`` (instead of
    ``storch.extending.base_distribution(node.distribution).logits``), or that handles the base's
    last batch dim as a batch dim when it is an event dim of the node, fails here.

    - Bernoulli: logits θ (2, 2), batch (2,), event (2,); C = (c·x − 0.3)².
    - OneHotCategorical: logits θ (2, 3), event (2, 3); C = (v·x − 0.4)².
    - Categorical: logits θ (2, 3), event (2,); C = (c·x − 0.5)² with x the two indices (a one-hot
      value, shape (2, 3), is read as its indices).
    - Normal: μ = θ (2,), σ = (0.8, 1.2), event (2,); C = (c·x − 0.3)² + x0, as ``normal[2]``.
    """
    c2 = _C22[0]
    if kind is Bernoulli:
        theta, shape = _t(0.3, -0.6, 1.1, -0.2), (2, 2)
    elif kind is Normal:
        theta, shape = _t(0.5, -0.2), (2,)
    else:
        theta, shape = _t(0.2, -0.4, 0.9, 0.0, -1.1, 0.5), (2, 3)

    def dist(th) -> Distribution:
        base = Normal(th, _S2) if issubclass(kind, Normal) else kind(logits=th.reshape(shape))
        return Independent(base, 1)

    def cost(x):
        if kind is Bernoulli:
            return ((x * _C22).sum() - 0.3) ** 2
        if kind is OneHotCategorical:
            return ((x * _V23).sum() - 0.4) ** 2
        if kind is Categorical:
            idx = x if x.shape == (2,) else (x * _K3).sum(-1)
            return ((idx * c2).sum() - 0.5) ** 2
        return ((x * _C2).sum() - 0.3) ** 2 + x[0]

    def build(make: EstimatorFactory, th: torch.Tensor) -> None:
        add_cost(cost(make("x")(dist(th))))

    def exact(th: torch.Tensor) -> torch.Tensor:
        if kind is Normal:
            return ((_C2 * th).sum() - 0.3) ** 2 + (_C2 ** 2 * _S2 ** 2).sum() + th[0]
        if kind is Bernoulli:
            xs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=4)), dtype=_F64)  # (16, 4)
            logp = (xs * torch.nn.functional.logsigmoid(th) + (1 - xs) * torch.nn.functional.logsigmoid(-th)).sum(-1)
            return (logp.exp() * ((xs @ _C22.reshape(-1)) - 0.3) ** 2).sum()
        p = torch.softmax(th.reshape(2, 3), -1)
        joint = p[0].unsqueeze(1) * p[1].unsqueeze(0)  # (3, 3): x0 = i, x1 = j
        if kind is OneHotCategorical:
            value = _V23[0].unsqueeze(1) + _V23[1].unsqueeze(0)
            return (joint * (value - 0.4) ** 2).sum()
        value = c2[0] * _K3.unsqueeze(1) + c2[1] * _K3.unsqueeze(0)
        return (joint * (value - 0.5) ** 2).sum()

    short = "OneHot" if kind is OneHotCategorical else kind.__name__
    return Model(f"independent[{short}]", theta, build, exact, lambda: [dist(theta)])


def models_to_run(estimator: Estimator, models: Optional[Sequence[Model]], factory: bool = False
                  ) -> tuple[list[Model], dict[str, str], dict[str, str]]:
    """The models a check runs, the reasons it skips others, and the errors: ``models=None``: the kit's
    :func:`standard_models` (unsupported ones skipped); a list the test names: each must run, so one that the
    estimator does not support is an error (skipped only with ``may_refuse``).

    ``factory``: ``estimator`` is only the probe ``make("probe")`` of a factory, which may make another
    estimator for each node; ``model.distributions()`` does not say which node each distribution is at, so a
    model the test names is not judged by the probe (a Bernoulli node's arm refusing the Normal of a node the
    factory gives to reparameterization) but when it samples, where a refusal names the node and estimator."""
    if models is None:
        return (*standard_models(estimator), {})
    if factory:
        return list(models), {}, {}
    skipped: dict[str, str] = {}
    errors: dict[str, str] = {}
    for m in models:
        if (r := supports(estimator, m)) is not None:
            (skipped if m.may_refuse else errors)[m.name] = r
    return [m for m in models if m.name not in skipped and m.name not in errors], skipped, errors


def standard_models(estimator: Estimator) -> tuple[list[Model], dict[str, str]]:
    """The kit's models that ``estimator`` supports, and the reasons it skips the others.

    Discrete: ``bernoulli[3]``, ``categorical[K=5]``, ``onehot[K=5]`` for each supported
    family, and one two-node chain (the first supported of Bernoulli, OneHotCategorical,
    Categorical). Continuous: ``normal[2]`` and ``chain[Normal]``. Last, one node wrapped in
    ``Independent`` (the first supported of Bernoulli, OneHotCategorical, Categorical, Normal):
    ``distributions`` match the wrapped distribution, so every estimator is handed such nodes.
    Then ``categorical[2x3]`` and ``onehot[2x2]`` (a node of several categorical elements), and one
    ``global_latent[...]`` model (the first supported of Bernoulli, OneHotCategorical, Categorical,
    Normal): a global latent z that is not under the data plate ``data`` of its costs, with a local
    latent per data point that is, so a baseline that averages over a data plate for a node not under
    it is caught (the total cost is the mean over the data plates). Then one ``elbo[...]`` model (the
    first supported of the same four): one node with two costs of the same frame, log q(z) and
    -log p(x, z), so a baseline for one cost built from another cost of the same step is caught.
    Then ``laplace[loc]`` (a kink of log p in loc) and ``uniform[high]`` (a support that moves with
    high): a score function is biased on them, so the outcome must be an unbiased estimate or a
    storch refusal (``OrderError`` at the order, ``UnsupportedDistributionError`` when sampling).
    """
    candidates = [_bernoulli(), _categorical(), _onehot()]
    chains = [_chain(k) for k in (Bernoulli, OneHotCategorical, Categorical)]
    chain = next((c for c in chains if supports(estimator, c) is None), chains[0])
    candidates += [chain, _normal(), _normal_chain()]
    wrapped = [_independent(k) for k in (Bernoulli, OneHotCategorical, Categorical, Normal)]
    candidates.append(next((m for m in wrapped if supports(estimator, m) is None), wrapped[0]))
    candidates += [_categorical_2x3(), _onehot_2x2()]
    latent = [_global_latent(k) for k in (Bernoulli, OneHotCategorical, Categorical, Normal)]
    candidates.append(next((m for m in latent if supports(estimator, m) is None), latent[0]))
    elbos = [_elbo(k) for k in (Bernoulli, OneHotCategorical, Categorical, Normal)]
    candidates.append(next((m for m in elbos if supports(estimator, m) is None), elbos[0]))
    candidates += [_laplace(), _uniform()]
    chosen, skipped = [], {}
    for m in candidates:
        reason = supports(estimator, m)
        if reason is None:
            chosen.append(m)
        else:
            skipped[m.name] = reason
    return chosen, skipped
