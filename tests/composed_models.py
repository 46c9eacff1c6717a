"""Small composed models for storch.testing, over distribution types the kit's own models leave out.

The kit's models (``storch.testing.standard_models``) chain and put under a data plate only Bernoulli,
Categorical, OneHotCategorical and Normal nodes. These models compose the other families a first-party
estimator accepts (Binomial, Poisson, Geometric, NegativeBinomial, Beta, Gamma, Exponential, Laplace,
Dirichlet, MultivariateNormal, Independent, nodes of two elements) in the three shapes where single-node tests
do not reach:

- ``chain``: x1 ~ D(θ0), x2 ~ D(θ1 + c (φ(x1) − ½)) (the second node's parameter depends on the first
  sample); two costs, (φ(x2) − ½ φ(x1) − ¼ θ0)² and θ1 φ(x1) + ½ φ(x1)², the second on x1 only;
- ``data``: a global z ~ D(θ0) outside the data plate of three points, a local y_i ~ D(θ1 + 0.8 c (φ(z) − ½)
  + a_i) under it, one cost per point, (φ(y_i) − x_i + φ(z))² + θ0 x_i;
- ``chaindata``: the chain inside the data plate (x1_i ~ D(θ0 + a_i)), a cost per point of x1 and x2 and one of
  x1 only;
- ``chain3``: x1 → x2 → x3 with x3's parameter depending on both; one cost of x1 only, one of x3 and x1.

φ is a scalar feature of a sample (the value; w·x for a vector). Exact values: E[·| parent] of the last node
from the closed-form mean and variance of φ (``Distribution.mean`` / ``.variance``), the outer expectations by
enumeration (infinite supports truncated where the tail is below 1e-20) or tanh-sinh / exp-sinh quadrature
(nodes fixed, so autograd differentiates the quadrature sum: the derivatives of the integral, for integrands
smooth in θ). The couplings c keep every estimate's variance finite (a heavy-tailed estimate makes a z-test
meaningless).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.distributions import (
    Bernoulli, Beta, Binomial, Dirichlet, Distribution, Exponential, Gamma, Geometric, Independent, Laplace,
    MultivariateNormal, NegativeBinomial, Normal, Poisson,
)

import storch
import storch.testing as kit

F64 = torch.float64


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


# -- quadrature: fixed nodes, differentiable through the integrand ------------------------------------------


def _tanh_sinh(h: float = 1 / 48, tmax: float = 3.2):
    """Nodes and weights on (0, 1); exact to ~1e-12 for integrands with endpoint singularities x^(a-1), a > 0."""
    t = torch.arange(-tmax, tmax + h / 2, h, dtype=F64)
    u = math.pi / 2 * torch.sinh(t)
    x = 0.5 * (1 + torch.tanh(u))
    w = h * 0.5 * (math.pi / 2) * torch.cosh(t) / torch.cosh(u) ** 2
    keep = (x > 0) & (x < 1)
    return x[keep], w[keep]


def _exp_sinh(h: float = 1 / 64, lo: float = -3.6, hi: float = 1.75):
    """Nodes and weights on (0, ~80): the densities here are below 1e-25 beyond."""
    t = torch.arange(lo, hi + h / 2, h, dtype=F64)
    x = torch.exp(math.pi / 2 * torch.sinh(t))
    return x, h * x * math.pi / 2 * torch.cosh(t)


_UNIT, _POS = _tanh_sinh(), _exp_sinh()


def _line(center: float, nodes=_POS):
    """Nodes and weights on the real line, split at ``center`` (a kink of a Laplace density)."""
    x, w = nodes
    return torch.cat([center + x, center - x]), torch.cat([w, w])


def _grid(values: torch.Tensor, weights: torch.Tensor):
    """The product grid of two elements: values (M², 2), weights (M²,)."""
    return torch.cartesian_prod(values, values), torch.cartesian_prod(weights, weights).prod(-1)


# -- families driven by one scalar s ---------------------------------------------------------------------------


class Family:
    """x ~ make(s) for a scalar driver s; φ(x) a scalar feature; E[g(φ(x))] exactly.

    ``values``/``weights``: the support (weights 1) or quadrature nodes of one sample x, on which
    ``log_density(d, x)`` (default ``d.log_prob(x)``) is evaluated; ``mv(s)``: mean and variance of φ(x).
    ``of_values``: the values are φ itself (a vector node integrated along its feature), not samples.
    """

    def __init__(self, name: str, make: Callable[[torch.Tensor], Distribution], values: torch.Tensor,
                 weights: Optional[torch.Tensor] = None, *, coupling: float = 1.2,
                 phi: Callable = lambda x: x, mv: Optional[Callable] = None,
                 log_density: Optional[Callable] = None, element_dims: int = 0, of_values: bool = False,
                 theta: tuple[float, float] = (0.4, -0.3)) -> None:
        self.name, self.make, self.values = name, make, values
        self.weights = torch.ones(len(values), dtype=F64) if weights is None else weights
        self.coupling, self.phi, self._mv, self.theta = coupling, phi, mv, theta
        self.log_density = log_density or (lambda d, x: d.log_prob(x))
        self.element_dims = element_dims  # 1 for a node of two elements whose log_prob is per element
        self.of_values = of_values

    def mv(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mv is not None:
            return self._mv(s)
        d = self.make(s)
        return d.mean, d.variance

    def expect(self, s: torch.Tensor, g: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """E[g(φ(x))] for x ~ make(s); s may have a batch (N,): the result is (N,), g gets φ(x) shaped (M, N)."""
        d = self.make(s)
        v = self.values
        shape = (len(v),) + (1,) * s.dim() + tuple(v.shape[1:])
        lp = self.log_density(d, v.reshape(shape))
        if self.element_dims:
            lp = lp.sum(-1)
        phi = (v if self.of_values else self.phi(v)).reshape((len(v),) + (1,) * s.dim())
        w = self.weights.reshape((len(v),) + (1,) * s.dim())
        return (w * lp.exp() * g(phi)).sum(0)


_W2, _OFF2 = _t(1.0, -0.6), _t(0.0, 0.5)  # a two-element node: φ(x) = w·x, element offsets of the driver
_V, _COV, _S2 = _t(1.0, 0.7), _t(1.0, 0.3, 0.3, 0.5).reshape(2, 2), _t(0.8, 1.2)
_MVN_DIR = _t(1.0, -0.5)


def _dot(w: torch.Tensor) -> Callable:
    return lambda x: (x * w).sum(-1)


def _mv2(make: Callable, independent: bool = False) -> Callable:
    def mv(s):
        d = make(s)
        d = d.base_dist if independent else d
        return (d.mean * _W2).sum(-1), (d.variance * _W2 ** 2).sum(-1)
    return mv


def _elements(s):
    return s.unsqueeze(-1) + _OFF2


def _dirichlet(s):
    return Dirichlet(torch.stack([1 + torch.exp(s), torch.full_like(s, 1.5)], -1), validate_args=False)


def _dirichlet_mv(s):
    a0, a1 = 1 + torch.exp(s), 1.5
    m = a0 / (a0 + a1)
    return m, m * (1 - m) / (a0 + a1 + 1)


def _softplus(s):
    return torch.nn.functional.softplus(s) + 0.2


def _mvn(s):
    return MultivariateNormal(s.unsqueeze(-1) * _MVN_DIR, _COV)


def _indep_normal(s):
    return Independent(Normal(s.unsqueeze(-1) * _MVN_DIR, _S2), 1)


def _poisson2(s):
    return Poisson(_softplus(_elements(s)), validate_args=False)


def _binomial2(s):
    return Binomial(3, logits=_elements(s), validate_args=False)


def _gamma_rate2(s):
    return Gamma(_t(2.0, 1.5), torch.exp(_elements(s)), validate_args=False)


def _laplace2(s):
    return Laplace(_t(0.3, 0.3), torch.exp(0.5 * _elements(s)), validate_args=False)


def _exponential2(s):
    return Exponential(torch.exp(_elements(s)), validate_args=False)


def _normal2(s):
    return Normal(_elements(s), _t(0.8, 1.1))


_N_LINE = _line(0.0)
_POS2, _LINE2 = _exp_sinh(h=1 / 24), None


def families() -> dict[str, Family]:
    """Every family by name (see the module docstring)."""
    line2 = _line(0.3, _POS2)
    ints = lambda n: torch.arange(n, dtype=F64)  # noqa: E731
    fams = [
        Family("Binomial", lambda s: Binomial(3, logits=s, validate_args=False), ints(4)),
        Family("Poisson", lambda s: Poisson(_softplus(s), validate_args=False), ints(70), coupling=0.5),
        Family("Geometric", lambda s: Geometric(logits=s, validate_args=False), ints(90), coupling=0.5),
        Family("NegativeBinomial", lambda s: NegativeBinomial(2.0, logits=s, validate_args=False), ints(300),
               coupling=-0.5, theta=(-0.5, -0.3)),
        Family("Beta", lambda s: Beta(1 + torch.exp(s), torch.tensor(1.5, dtype=F64), validate_args=False), *_UNIT),
        Family("Gamma", lambda s: Gamma(1 + torch.exp(s), torch.tensor(1.5, dtype=F64), validate_args=False), *_POS,
               coupling=0.2),
        Family("Exponential", lambda s: Exponential(torch.exp(s), validate_args=False), *_POS, coupling=0.5),
        Family("Laplace", lambda s: Laplace(torch.tensor(0.3, dtype=F64), torch.exp(0.5 * s), validate_args=False),
               *_line(0.3), coupling=0.2),
        # Dirichlet with two components: φ(x) = x0, a Beta(a0, a1) variable, integrated on (0, 1)
        Family("Dirichlet", _dirichlet, *_UNIT, phi=lambda x: x[..., 0], mv=_dirichlet_mv, of_values=True,
               log_density=lambda d, x0: Beta(d.concentration[..., 0], d.concentration[..., 1],
                                              validate_args=False).log_prob(x0)),
        # φ(x) = v·x ~ Normal(s v·(1, -½), vᵀΣv): integrated as that Normal
        Family("MultivariateNormal", _mvn, *_N_LINE, phi=_dot(_V), coupling=0.4, of_values=True,
               mv=lambda s: (s * (_V @ _MVN_DIR), _V @ _COV @ _V + 0 * s),
               log_density=lambda d, y: Normal(d.loc @ _V, (_V @ _COV @ _V).sqrt()).log_prob(y)),
        Family("Independent[Normal]", _indep_normal, *_N_LINE, phi=_dot(_V), coupling=0.4, of_values=True,
               mv=lambda s: (s * (_V @ _MVN_DIR), (_V ** 2 * _S2 ** 2).sum() + 0 * s),
               log_density=lambda d, y: Normal(d.base_dist.loc @ _V, (_V ** 2 * _S2 ** 2).sum().sqrt()).log_prob(y)),
        # nodes of two elements (own batch dims (2,)), φ(x) = w·x, exact over the joint values / product grid
        Family("Binomial[2]", _binomial2, *_grid(ints(4), torch.ones(4, dtype=F64)), phi=_dot(_W2),
               mv=_mv2(_binomial2), element_dims=1),
        Family("Poisson[2]", _poisson2, *_grid(ints(40), torch.ones(40, dtype=F64)), phi=_dot(_W2),
               mv=_mv2(_poisson2), element_dims=1, coupling=0.5),
        Family("Independent[Poisson[2]]", lambda s: Independent(_poisson2(s), 1),
               *_grid(ints(40), torch.ones(40, dtype=F64)), phi=_dot(_W2),
               mv=_mv2(lambda s: Independent(_poisson2(s), 1), independent=True), coupling=0.5),
        Family("Exponential[2]", _exponential2, *_grid(*_POS2), phi=_dot(_W2), mv=_mv2(_exponential2),
               element_dims=1, coupling=0.3),
        Family("Gamma(rate)[2]", _gamma_rate2, *_grid(*_POS2), phi=_dot(_W2), mv=_mv2(_gamma_rate2),
               element_dims=1, coupling=0.2),
        Family("Laplace[2]", _laplace2, *_grid(*line2), phi=_dot(_W2), mv=_mv2(_laplace2), element_dims=1,
               coupling=0.2),
        Family("Normal[2]", _normal2, *_grid(*line2), phi=_dot(_W2), mv=_mv2(_normal2), element_dims=1,
               coupling=0.4),
        Family("Bernoulli", lambda s: Bernoulli(logits=s), _t(0.0, 1.0)),
    ]
    return {f.name: f for f in fams}


# -- models ----------------------------------------------------------------------------------------------------

_XD, _AD = _t(0.4, 1.0, -0.3), _t(0.25, -0.65, 0.05)  # data points x_i and offsets a_i (plate "data")


def chain(f: Family) -> kit.Model:
    c = f.coupling

    def build(make, th):
        x1 = make("x1")(f.make(th[0]))
        p1 = f.phi(x1)
        x2 = make("x2")(f.make(th[1] + c * (p1 - 0.5)))
        storch.add_cost((f.phi(x2) - 0.5 * p1 - 0.25 * th[0]) ** 2)
        storch.add_cost(th[1] * p1 + 0.5 * p1 ** 2)  # a cost of the first node only

    def exact(th):
        def g(p1):
            m2, v2 = f.mv(th[1] + c * (p1 - 0.5))
            return v2 + (m2 - 0.5 * p1 - 0.25 * th[0]) ** 2 + th[1] * p1 + 0.5 * p1 ** 2
        return f.expect(th[0], g)

    theta = _t(*f.theta)
    return kit.Model(f"chain[{f.name}]", theta, build, exact, lambda: [f.make(theta[0])])


def data(f: Family) -> kit.Model:
    c = f.coupling

    def build(make, th):
        z = make("z")(f.make(th[0]))
        pz = f.phi(z)
        a, x = storch.denote_independent((_AD, _XD), 0, "data")
        y = make("y")(f.make(th[1] + 0.8 * c * (pz - 0.5) + a))
        storch.add_cost((f.phi(y) - x + pz) ** 2 + th[0] * x)

    def exact(th):
        def g(pz):
            total = 0
            for i in range(3):
                m, v = f.mv(th[1] + 0.8 * c * (pz - 0.5) + _AD[i])
                total = total + v + (m - _XD[i] + pz) ** 2 + th[0] * _XD[i]
            return total / 3
        return f.expect(th[0], g)

    theta = _t(*f.theta)
    return kit.Model(f"data[{f.name}]", theta, build, exact, lambda: [f.make(theta[0])])


def chaindata(f: Family) -> kit.Model:
    c = f.coupling

    def build(make, th):
        a, x = storch.denote_independent((_AD, _XD), 0, "data")
        x1 = make("x1")(f.make(th[0] + a))
        p1 = f.phi(x1)
        x2 = make("x2")(f.make(th[1] + c * (p1 - 0.5)))
        storch.add_cost((f.phi(x2) - x - 0.5 * p1) ** 2)
        storch.add_cost(th[1] * p1 * x)  # a cost of the first node only

    def exact(th):
        total = 0
        for i in range(3):
            def g(p1, i=i):
                m2, v2 = f.mv(th[1] + c * (p1 - 0.5))
                return v2 + (m2 - _XD[i] - 0.5 * p1) ** 2 + th[1] * p1 * _XD[i]
            total = total + f.expect(th[0] + _AD[i], g)
        return total / 3

    theta = _t(*f.theta)
    return kit.Model(f"chaindata[{f.name}]", theta, build, exact, lambda: [f.make(theta[0])])


def chain3(f: Family) -> kit.Model:
    c = f.coupling

    def build(make, th):
        x1 = make("x1")(f.make(th[0]))
        p1 = f.phi(x1)
        x2 = make("x2")(f.make(th[1] + c * (p1 - 0.5)))
        x3 = make("x3")(f.make(th[0] + 0.5 * c * (f.phi(x2) - p1)))
        storch.add_cost((p1 - 0.3) ** 2 + th[1] * p1)  # x1 only
        storch.add_cost((f.phi(x3) - 0.5 * p1) ** 2)

    def exact(th):
        def g1(p1):  # p1: (M1, 1) for the scalar driver th[0]
            q = p1.reshape(-1)

            def g2(p2):  # p2: (M2, M1)
                m3, v3 = f.mv(th[0] + 0.5 * c * (p2 - q))
                return v3 + (m3 - 0.5 * q) ** 2
            inner = f.expect(th[1] + c * (q - 0.5), g2)  # (M1,)
            return (p1 - 0.3) ** 2 + th[1] * p1 + inner.reshape(p1.shape)
        return f.expect(th[0], g1)

    theta = _t(*f.theta)
    return kit.Model(f"chain3[{f.name}]", theta, build, exact, lambda: [f.make(theta[0])])


def mixed(fa: Family, fb: Family) -> kit.Model:
    """``chain`` with x1 of family ``fa`` and x2 of family ``fb`` (two estimators: a factory, one per node)."""
    c = fb.coupling

    def build(make, th):
        x1 = make("x1")(fa.make(th[0]))
        p1 = fa.phi(x1)
        x2 = make("x2")(fb.make(th[1] + c * (p1 - 0.5)))
        storch.add_cost((fb.phi(x2) - 0.5 * p1 - 0.25 * th[0]) ** 2)
        storch.add_cost(th[1] * p1 + 0.5 * p1 ** 2)

    def exact(th):
        def g(p1):
            m2, v2 = fb.mv(th[1] + c * (p1 - 0.5))
            return v2 + (m2 - 0.5 * p1 - 0.25 * th[0]) ** 2 + th[1] * p1 + 0.5 * p1 ** 2
        return fa.expect(th[0], g)

    theta = _t(*fa.theta)
    return kit.Model(f"mixed[{fa.name}->{fb.name}]", theta, build, exact,
                     lambda: [fa.make(theta[0]), fb.make(theta[1])])


def per_node(**estimators) -> Callable:
    """A factory for ``mixed``: ``per_node(x1=make1, x2=make2)``, each ``make(plate)``; the kit's probe gets x1's."""
    return lambda plate: estimators.get(plate, estimators["x1"])(plate)


MODELS = {"chain": chain, "data": data, "chaindata": chaindata, "chain3": chain3}


def model(shape: str, family: str) -> kit.Model:
    """``model("chain", "Poisson")``: the model of that shape over that family."""
    return MODELS[shape](families()[family])
