"""`reparameterization`: z-tests of first and second order on Gaussian models with closed forms."""

import gc
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.distributions import Normal, Independent

import storch
from storch import magic_box
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from twice import differentiate_twice

R = 4000


def test_normal_mean_and_scale_cubic_orders_1_2():
    """E[x^3 + x] for x ~ N(mu, sigma^2): mu^3 + 3 mu sigma^2 + mu."""
    torch.manual_seed(10)
    theta = torch.tensor([0.5, -0.3], dtype=torch.float64)  # mu, log sigma
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th[0], th[1].exp()))
        storch.add_cost(x ** 3 + x)
        loss = storch.surrogate_loss(order=2)
        g, h = per_replicate_derivatives(loss, leaf, 2)

    def exact(t):
        mu, s2 = t[0], (2 * t[1]).exp()
        return mu ** 3 + 3 * mu * s2 + mu

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_diagonal_gaussian_batch_with_data_plate_orders_1_2():
    """E[||W x - y||^2] over a data plate; x ~ N(mu, diag(exp(2 s))) with batch dims summed jointly."""
    torch.manual_seed(11)
    d = 3
    theta = torch.cat([torch.tensor([0.2, -0.1, 0.4]), torch.tensor([-0.5, 0.1, 0.0])]).double()
    y = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    est = storch.estimator("pathwise", plate="x")
    with storch.Graph():
        leaf, th = replicate(theta, R)
        yy = storch.denote_independent(y, 0, "data")
        x = est(Independent(Normal(th[:d], th[d:].exp()), 1))
        storch.add_cost(((x * th[:d] - yy) ** 2).sum())
        loss = storch.surrogate_loss(order=2)
        g, h = per_replicate_derivatives(loss, leaf, 2)

    def exact(t):
        mu, var = t[:d], (2 * t[d:]).exp()
        # E[(mu_i x_i - y_i)^2] = mu_i^2 (mu_i^2 + var_i) - 2 y_i mu_i^2 + y_i^2
        per = mu ** 2 * (mu ** 2 + var) - 2 * y * mu ** 2 + y ** 2
        return per.sum(-1).mean()

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_requires_rsample():
    est = storch.estimator("reparameterization", plate="z")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="rsample"):
        est(torch.distributions.Bernoulli(logits=torch.zeros(2)))


def test_forward_value_is_monte_carlo_mean():
    torch.manual_seed(12)
    est = storch.estimator("reparameterization", plate="x", n_samples=5)
    with storch.Graph():
        x = est(Normal(torch.zeros(()), 1.0))
        storch.add_cost(x ** 2)
        loss = storch.surrogate_loss()
        assert math.isclose(loss.item(), (x.tensor ** 2).mean().item(), rel_tol=1e-6)


def test_a_kink_on_the_samples_path_is_refused_from_order_2():
    """relu(x) of a reparameterised x: autograd gives relu'' = 0 where E[relu(μ + ε)]'' = φ(μ), so the
    order-2 pathwise estimate was silently biased (0 against 0.38 here; found with REBAR's twin gap by
    porting a belief net). Refused with OrderError at order 2; order 1 is exact in expectation and runs; a
    relu of the parameters alone (off the sample's path) is fine at order 2 (z-test against the closed form)."""
    torch.manual_seed(11)
    theta = torch.tensor([0.5, -0.3], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    p = theta.clone().requires_grad_(True)
    with storch.Graph():
        x = est(Normal(p[0], p[1].exp()))
        storch.add_cost(torch.relu(x), name="act")
        with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'act'.*ReluBackward0.*'score'"):
            storch.surrogate_loss(order=2)
    with storch.Graph():
        x = est(Normal(p[0], p[1].exp()))
        storch.add_cost(torch.relu(x), name="act")
        (g,) = torch.autograd.grad(storch.surrogate_loss(order=1), p)
        assert torch.isfinite(g).all()
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th[0], th[1].exp()))
        storch.add_cost(x ** 2 * torch.relu(th[0]))
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def exact(t):
        return torch.relu(t[0]) * (t[0] ** 2 + (2 * t[1]).exp())

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_a_jump_on_the_samples_path_is_refused_at_order_1_once_per_cost(monkeypatch):
    """round(x) of a reparameterised x: the pathwise gradient is 0 almost everywhere while d/dμ E[round(μ + ε)]
    is not (found by porting a stochastic-depth gate through round / nearest grid_sample): refused with
    OrderError at order 1. The walk of the cost's graph runs at the first step of each estimator and cost
    name only (a smooth cost is not walked again), and a refused cost is checked again at the next step."""
    import storch.conditions.smoothness as smoothness

    mu = torch.zeros(3, requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    for _ in range(2):
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost(torch.round(x).sum(), name="rounded")
            with pytest.raises(storch.OrderError, match=r"'rounded'.*RoundBackward0"):
                storch.backward()
    walks = []
    walk = smoothness._nonsmooth_on_path
    monkeypatch.setattr(smoothness, "_nonsmooth_on_path", lambda *a, **k: walks.append(1) or walk(*a, **k))
    for _ in range(3):
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost(torch.tanh(x).sum(), name="smooth")
            storch.backward()
    assert len(walks) == 1 and mu.grad is not None


def _relu_step(est, mu, cost=torch.relu):
    with storch.Graph():
        x = est(Normal(mu, 1.0))
        storch.add_cost(cost(x).sum(), name="c")
        return storch.surrogate_loss()  # order 1


@pytest.mark.parametrize("how", ["hessian", "grad_of_grad"])
def test_order_1_surrogate_with_a_kink_differentiated_twice_is_refused(how):
    """relu(x) of a reparameterised x: surrogate_loss(order=2) refuses it; the default order-1 surrogate
    differentiated twice gave a Hessian of exactly 0 (exact: the normal density at μ, 0.38) without a word.
    The backward pass with create_graph=True is refused, at the first step (the walk finds the kink) and
    at later ones (the kink is remembered per estimator and cost name)."""
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    mu0 = torch.tensor([0.3], dtype=torch.float64)
    for _ in range(2):
        with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.*ReluBackward0.*order=n"):
            differentiate_twice(lambda m: _relu_step(est, m), mu0, how)



# a ReLU (and a leaky one) written with a bool mask: the comparison has no autograd history, so the walk of the
# autograd graph for kinks (storch.conditions.smoothness) does not see it; the plate dispatcher's watch does
_MASKED = {
    "where": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "mask_product": lambda x: x * (x > 0).double(),
    "leaky_where": lambda x: torch.where(x > 0, x, 0.01 * x),
    # the mask of a detached value, or one made under no_grad: no autograd graph reaches the sample from it, but it
    # carries only the sample's plate (found by review: accepted at order 2, Hessian 0.000 where exact is 0.399)
    "detached_where": lambda x: torch.where(x.detach() > 0, x, torch.zeros_like(x)),
    "no_grad_mask": lambda x: x * _no_grad_mask(x),
    "leaky_clone_detached_where": lambda x: torch.where(x.clone().detach() > 0, x, 0.01 * x),
}


def _no_grad_mask(x):
    with torch.no_grad():
        return (x > 0).double()


def _phi(z):
    return torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi)


def _Phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("form", sorted(_MASKED))
def test_a_relu_written_with_a_mask_is_refused_from_order_2(form):
    """torch.where(x > 0, x, 0), x * (x > 0) and torch.where(x > 0, x, 0.01 x) of a reparameterised x ~ N(0.3,
    0.8^2): surrogate_loss(order=2) was accepted and its Hessian came out exactly 0 (exact (H_μμ, H_μσ, H_σσ) =
    (0.465, -0.174, 0.065) for the ReLU: found by a tester) where F.relu is refused. Now refused at order 2,
    and the order-1 surrogate differentiated twice (hessian, grad of grad) is refused too, at every step, also
    for a comparison first made at a later step (the order-1 check of a cost runs at its first step), and for a
    partition's later step."""
    f = _MASKED[form]
    theta = torch.tensor([0.3, 0.8], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    for _ in range(2):
        with storch.Graph():
            x = est(Normal(theta[0].clone().requires_grad_(True), theta[1]))
            storch.add_cost(f(x), name="c")
            with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.* gt \(a comparison.*"
                                                        r"torch.where\(x > 0, x, 0\).*'score'"):
                storch.surrogate_loss(order=2)

    def step(est, t, compare=True):
        with storch.Graph():
            x = est(Normal(t[0], t[1]))
            storch.add_cost(f(x) if compare else x ** 2, name="c")
            return storch.surrogate_loss()

    for how in ("hessian", "grad_of_grad"):
        est = storch.estimator("reparameterization", plate="x", n_samples=2)
        for _ in range(2):
            with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.*comparison \(gt\).*order=n"):
                differentiate_twice(lambda t: step(est, t), theta, how)
        late = storch.estimator("reparameterization", plate="x", n_samples=2)
        differentiate_twice(lambda t: step(late, t, compare=False), theta, how)  # smooth: checked, no kink
        with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.*comparison \(gt\)"):
            differentiate_twice(lambda t: step(late, t), theta, how)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    for masked in (False, True):  # two costs of the node, one of them masked (at a later step): refused

        def two_costs(t, masked=masked):
            with storch.Graph():
                x = est(Normal(t[0], t[1]))
                storch.add_cost(f(x) if masked else x ** 2, name="a")
                storch.add_cost(x ** 3, name="b")
                return storch.surrogate_loss()

        if masked:
            with pytest.raises(storch.OrderError, match=r"comparison \(gt\)"):
                differentiate_twice(two_costs, theta, "hessian")
        else:
            differentiate_twice(two_costs, theta, "hessian")
    with storch.Graph():  # a partition whose first step's sample has no gradient (no watch was installed then)
        est = storch.estimator("reparameterization", plate="x", n_samples=2)
        x0 = est(Normal(torch.zeros((), dtype=torch.float64), 1.0))
        x1 = est(Normal(theta[0].clone().requires_grad_(True) + x0, 1.0))
        storch.add_cost(f(x1), name="c")
        with pytest.raises(storch.OrderError, match=r"'c'.* gt \(a comparison"):
            storch.surrogate_loss(order=2)


@pytest.mark.parametrize("form", sorted(_MASKED))
def test_a_relu_written_with_a_mask_is_unbiased_at_order_1(form):
    """At order 1 the masked ReLU is a ReLU: d/dμ E[relu(x)] = Φ(μ/σ), d/dσ = φ(μ/σ) for x ~ N(μ, σ²) (the leaky
    one: 0.99 of those plus (0.01, 0)). Not refused; z-test over independent replicates."""
    torch.manual_seed(5)
    theta = torch.tensor([0.3, 0.8], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th[0], th[1]))
        storch.add_cost(_MASKED[form](x), name="c")
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    z = theta[0] / theta[1]
    exact = torch.stack([_Phi(z), _phi(z)])
    if form.startswith("leaky"):
        exact = 0.99 * exact + torch.tensor([0.01, 0.0], dtype=torch.float64)
    assert_unbiased(g, exact, "gradient")


def test_comparisons_off_the_samples_path_are_not_refused_at_order_2():
    """What the mask watch does not count: the comparisons torch.distributions makes (a Normal with validate_args
    whose loc is the sample checks loc == loc), a metric on the raw tensor (x.tensor.detach() > 0), a later node's
    sample compared under no_grad (b == 1: it carries b's plate), and a comparison of a value that carries the node's plate but whose
    graph does not reach its sample (of the parameters broadcast over it). E[log N(y; x, 1)] = c - ((y - μ)² + σ²)
    / 2 and E[x² (1 + [μ > 0])] = 2 (μ² + σ²) at μ > 0: z-tests of the order-2 estimates."""
    torch.manual_seed(6)
    theta = torch.tensor([0.3, 0.8], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th[0], th[1]))
        off = th[0] + 0 * x.detach()  # carries the plate 'x' and requires grad, off the sample's path
        storch.add_cost(Normal(x, 1.0, validate_args=True).log_prob(torch.tensor(0.5, dtype=torch.float64)),
                        name="density")
        storch.add_cost(x ** 2 * torch.where(off > 0, 2.0, 1.0), name="masked_by_parameters")
        # a metric on the raw tensor (a plain tensor: storch does not see it), and a later node's discrete sample
        # compared under no_grad (it carries that node's plate: not a value of x alone)
        positive = (x.tensor.detach() > 0).double().mean()
        assert type(positive) is torch.Tensor and 0 < positive < 1
        b = storch.estimator("expect", plate="b")(torch.distributions.Bernoulli(logits=x.detach()))  # (core: CI's core env has no score)
        with torch.no_grad():
            ones = (b == 1).double()
        assert "b" in [p.name for p in ones.plates] and "x" in [p.name for p in ones.plates]
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def exact(t):
        return -0.5 * ((0.5 - t[0]) ** 2 + t[1] ** 2) + 2 * (t[0] ** 2 + t[1] ** 2)

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_a_rounding_division_is_a_jump_and_a_one_norm_a_kink():
    """torch.div(x, d, rounding_mode="floor") is floor(x / d), a jump, but its autograd node is division's
    (DivBackward2, the mode saved in it): the pathwise gradient was silently 0 (exact: sum_k phi(k/2 - mu),
    about 2). vector_norm(x - c, ord=1) (LinalgVectorNormBackward0) is ||x - c||_1, a kink: its Hessian was
    silently 0 at order 2 and through the order-1 surrogate differentiated twice (exact: 2 phi(mu - c))."""
    mu0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    c = torch.tensor([0.1, 0.4], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    for mode in ("floor", "trunc"):
        with storch.Graph():
            x = est(Normal(mu0.clone().requires_grad_(True), 1.0))
            storch.add_cost(torch.div(x, 0.5, rounding_mode=mode).sum(), name="floored")
            with pytest.raises(storch.OrderError, match=r"'floored'.*DivBackward2.*order 0"):
                storch.surrogate_loss()
    for norm in (lambda v: torch.linalg.vector_norm(v, ord=1, dim=-1), lambda v: torch.dist(v, torch.zeros(2), p=1)):
        with storch.Graph():
            x = est(Normal(mu0.clone().requires_grad_(True), 1.0))
            storch.add_cost(norm(x - c), name="l1")
            with pytest.raises(storch.OrderError, match=r"'l1'.*(Norm|Dist)Backward"):
                storch.surrogate_loss(order=2)
        for how in ("hessian", "grad_of_grad"):
            with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.*(Norm|Dist)Backward"):
                differentiate_twice(lambda m: _relu_step(est, m, lambda v: norm(v - c)), mu0, how)


def test_order_1_surrogate_with_a_kink_trains_and_a_smooth_cost_differentiates_twice():
    """First-order use of a cost with a kink is unaffected (storch.backward, autograd.grad without
    create_graph); a smooth cost's order-1 surrogate still gives its (correct) Hessian."""
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    mu = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost(torch.relu(x).sum(), name="c")
            storch.backward()
        torch.autograd.grad(_relu_step(est, mu), mu)
    assert mu.grad is not None
    torch.manual_seed(0)
    smooth = storch.estimator("reparameterization", plate="x", n_samples=4)
    h = torch.autograd.functional.hessian(lambda m: _relu_step(smooth, m, lambda x: x ** 3), mu.detach())
    assert torch.isfinite(h).all() and h.abs().sum() > 0


class _FirstOrderScore(storch.Estimator):
    """A score function declared unbiased at order 1 only (as ARM, GO, MVD are)."""

    name = "first_order_score"
    max_order = 1

    def gradient_function(self, node):
        return node.log_prob(node.sample)


@pytest.mark.parametrize("how", ["hessian", "grad_of_grad", "backward_create_graph"])
def test_order_1_surrogate_of_an_order_1_estimator_differentiated_twice_is_refused(how):
    est = _FirstOrderScore("x", n_samples=3)
    mu0 = torch.tensor([0.3], dtype=torch.float64)

    def f(m):
        with storch.Graph():
            x = est(Normal(m, 1.0))
            storch.add_cost((x ** 2).sum(), name="c")
            return storch.surrogate_loss()

    with pytest.raises(storch.OrderError, match=r"'first_order_score' on plate 'x'.*order 1.*order=n"):
        if how in ("hessian", "grad_of_grad"):
            differentiate_twice(f, mu0, how)
        else:
            f(mu0.clone().requires_grad_(True)).backward(create_graph=True)
    mu = mu0.clone().requires_grad_(True)
    f(mu).backward()  # first order: unaffected
    assert mu.grad is not None and torch.func.grad(f)(mu0).shape == (1,)
    with pytest.raises(storch.OrderError, match="first_order_score"):  # nested torch.func transforms
        torch.func.jacrev(torch.func.grad(f))(mu0)
    est.max_order = math.inf  # the same term, declared unbiased at every order: differentiated twice
    assert torch.isfinite(torch.autograd.functional.hessian(f, mu0)).all()


def _forward_over_reverse(step, theta0, v):
    """The tangent along ``v`` of the gradient of ``step`` (torch.autograd.forward_ad dual input, a backward pass
    without create_graph): a Hessian-vector product."""
    with fwAD.dual_level():
        theta = fwAD.make_dual(theta0.clone().requires_grad_(True), v)
        g, = torch.autograd.grad(step(theta), theta)
        return fwAD.unpack_dual(g).tangent


def test_forward_over_reverse_of_the_order_1_surrogate_is_refused():
    """A forward-mode dual that requires grad, then torch.autograd.grad without create_graph: the gradient's
    tangent is H·v, but the order guard only refused backward passes with grad mode on. A ReLU through
    reparameterization gave 0 (exact: the normal density at μ, 0.37); an order-1 estimator (ARM) was biased
    at z = 20-25. Both are refused now, as with create_graph=True."""
    mu0, v = torch.tensor([0.4], dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    rep = storch.estimator("reparameterization", plate="x", n_samples=4)
    with pytest.raises(storch.OrderError, match=r"'reparameterization'.*ReluBackward0.*forward-mode tangents"):
        _forward_over_reverse(lambda m: _relu_step(rep, m), mu0, v)
    est = _FirstOrderScore("x", n_samples=3)

    def f(m, tangent_in_cost=None):
        with storch.Graph():
            x = est(Normal(m, 1.0))
            c = (x ** 2).sum() if tangent_in_cost is None else ((x - tangent_in_cost) ** 2).sum()
            storch.add_cost(c, name="c")
            return storch.surrogate_loss()

    with pytest.raises(storch.OrderError, match=r"'first_order_score'.*forward-mode tangents"):
        _forward_over_reverse(f, mu0, v)
    # the tangent only in the cost (a mixed second derivative ∂²/∂μ∂θ·v through the node's term, whose own
    # tangent is 0): refused too
    mu = mu0.clone().requires_grad_(True)
    with fwAD.dual_level(), pytest.raises(storch.OrderError, match="first_order_score"):
        torch.autograd.grad(f(mu, fwAD.make_dual(torch.tensor(0.2, dtype=torch.float64), v[0])), mu)
    # plain forward mode (no reverse pass) and plain reverse mode are first derivatives: unaffected
    with fwAD.dual_level():
        assert fwAD.unpack_dual(f(fwAD.make_dual(mu0, v))).tangent is not None
    f(mu).backward()
    assert mu.grad is not None


class _ScoreWithHook(storch.Estimator):
    """The base class's score function, whose baseline runs ``during_build`` (no baseline)."""

    name = "test_core_score_with_hook"
    during_build = None

    def baseline(self, node, cost):
        self.during_build()
        return None


def test_a_surrogate_built_in_another_thread_keeps_this_builds_forward_over_reverse_refusals():
    """The refusals hooked while a surrogate is built under a forward-AD level were one list for the process,
    cleared at the start of every build: a surrogate built in another thread meanwhile dropped them, and the
    gradient's tangent (a second derivative through a ReLU) went through. They are per thread now."""
    import threading

    def other_thread_step():
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="b")(Normal(torch.tensor(0.3, requires_grad=True), 1.0))
            storch.add_cost(z * 2.0, name="c")
            storch.surrogate_loss()

    def run_other_thread():
        t = threading.Thread(target=other_thread_step)
        t.start()
        t.join()

    rep = storch.estimator("reparameterization", plate="x", n_samples=3)
    sc = _ScoreWithHook(plate="y")
    sc.during_build = run_other_thread
    mu = torch.tensor(0.4, requires_grad=True)
    with fwAD.dual_level():
        t = fwAD.make_dual(torch.tensor(0.2), torch.tensor(1.0))
        with storch.Graph():
            x = rep(Normal(mu, 1.0))
            storch.add_cost(torch.relu(x), name="a")  # a kink on the pathwise path: hooked, no tangent
            y = sc(Normal(mu, 1.0))
            storch.add_cost(y * t + x * t, name="b")  # the tangent: in this cost only
            with pytest.raises(storch.OrderError, match=r"'reparameterization'.*ReluBackward0.*forward-mode"):
                storch.surrogate_loss()


def test_forward_over_reverse_of_an_any_order_surrogate_is_the_hessian():
    """Where the order-1 surrogate is unbiased at every order (a score function), forward-over-reverse is not
    refused and equals reverse-over-reverse on the same draws."""
    est = _FirstOrderScore("x", n_samples=3)
    est.max_order = math.inf
    mu0, v = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)

    def f(m):
        with storch.Graph():
            x = est(Normal(m, 1.0))
            storch.add_cost((x ** 3).sum(), name="c")
            return storch.surrogate_loss()

    torch.manual_seed(5)
    fwd = _forward_over_reverse(f, mu0, v)
    torch.manual_seed(5)
    mu = mu0.clone().requires_grad_(True)
    g, = torch.autograd.grad(f(mu), mu, create_graph=True)
    hv, = torch.autograd.grad(g @ v, mu)
    assert torch.allclose(fwd, hv)


def _transform_result(how, f, theta):
    """The first derivative of ``f`` at ``theta`` by one torch.func transform (along 1 for jvp)."""
    if how == "jvp":
        return torch.func.jvp(f, (theta,), (torch.ones_like(theta),))[1]
    if how == "grad":
        return torch.func.grad(lambda t: f(t).sum())(theta)
    if how == "vjp":
        out, back = torch.func.vjp(f, theta)
        return back(torch.ones_like(out))[0]
    return torch.func.jacrev(f)(theta)


@pytest.mark.parametrize("how", ["jvp", "grad", "vjp", "jacrev"])
def test_reverse_over_one_torch_func_transform_of_the_order_1_surrogate_is_refused(how):
    """One torch.func transform (jvp, grad, vjp, jacrev) whose primals require grad outside it: its result
    (the jvp's tangent, the gradient) requires grad, and torch.autograd.grad of it is a second derivative.
    Under one transform the guard hooked nothing (hooks there run with grad mode on) and raised only for two
    nested transforms: ARM's Hessian through torch.func.jvp was -0.0001 for an exact -0.0149 (z 18), a ReLU
    through reparameterization gave 0 without a word. Refused when the surrogate is built now, as the
    torch.autograd.forward_ad equivalent is; so is a loss that requires grad outside only through its cost
    (a mixed second derivative through the order-1 term)."""
    mu0 = torch.tensor([0.4], dtype=torch.float64)
    rep = storch.estimator("reparameterization", plate="x", n_samples=4)
    mu = mu0.clone().requires_grad_(True)
    with pytest.raises(storch.OrderError, match=r"'reparameterization'.*ReluBackward0.*torch.func transform.*detach"):
        torch.autograd.grad(_transform_result(how, lambda m: _relu_step(rep, m), mu).sum(), mu)
    est = _FirstOrderScore("x", n_samples=3)

    def f(m, shift=0.0):
        with storch.Graph():
            x = est(Normal(m, 1.0))
            storch.add_cost(((x - shift) ** 2).sum(), name="c")
            return storch.surrogate_loss()

    with pytest.raises(storch.OrderError, match=r"'first_order_score'.*torch.func.jvp\(f, \(p.detach\(\),\), \(v,\)\)"):
        _transform_result(how, f, mu)
    theta = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)  # only in the cost, captured
    with pytest.raises(storch.OrderError, match=r"'first_order_score'.*torch.func transform"):
        _transform_result(how, lambda m: f(m, theta), mu0)
    with torch.no_grad():  # nothing takes part in an outer autograd: a first derivative
        assert _transform_result(how, f, mu).numel() == 1


@pytest.mark.parametrize("how", ["jvp", "grad", "vjp", "jacrev"])
def test_one_torch_func_transform_with_detached_primals_is_the_reverse_mode_gradient(how):
    """First derivatives by one torch.func transform of detached primals are unaffected: through a ReLU
    (reparameterization) and an order-1 estimator they equal reverse mode's gradient on the same draws."""
    mu0 = torch.tensor([0.4], dtype=torch.float64)
    rep = storch.estimator("reparameterization", plate="x", n_samples=4)
    est = _FirstOrderScore("y", n_samples=3)

    def f(m):
        with storch.Graph():
            x = rep(Normal(m, 1.0))
            y = est(Normal(m, 1.0))
            storch.add_cost(torch.relu(x).sum() + (y ** 2).sum(), name="c")
            return storch.surrogate_loss()

    if how == "jvp":  # forward mode through a pathwise node: an eager step checks its cost for jumps first
        with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.*forward mode.*eager|outside"):
            _transform_result(how, f, mu0.clone())
        f(mu0.clone().requires_grad_(True))
    for seed in range(3):
        torch.manual_seed(seed)
        d = _transform_result(how, f, mu0.clone())
        torch.manual_seed(seed)
        mu = mu0.clone().requires_grad_(True)
        g, = torch.autograd.grad(f(mu), mu)
        assert torch.allclose(d.reshape(g.shape), g)
    # and unbiased: d/dμ E[relu(x) + y²] = Φ(μ) + 2μ
    torch.manual_seed(4)
    d = torch.stack([_transform_result(how, f, mu0.clone()).reshape(()) for _ in range(800)])
    assert_unbiased(d, Normal(0.0, 1.0).cdf(mu0)[0] + 2 * mu0[0], "d/dμ E[relu(x) + y²]")


def test_reverse_over_one_torch_func_transform_of_an_any_order_surrogate_is_the_hessian():
    """Where the order-1 surrogate is unbiased at every order (a score function), a gradient of a
    torch.func.grad / jvp result is not refused and equals reverse-over-reverse on the same draws."""
    est = _FirstOrderScore("x", n_samples=3)
    est.max_order = math.inf
    mu0 = torch.tensor([0.3], dtype=torch.float64)

    def f(m):
        with storch.Graph():
            x = est(Normal(m, 1.0))
            storch.add_cost((x ** 3).sum(), name="c")
            return storch.surrogate_loss()

    for how in ("jvp", "grad"):
        torch.manual_seed(5)
        mu = mu0.clone().requires_grad_(True)
        h_over, = torch.autograd.grad(_transform_result(how, f, mu).sum(), mu)
        torch.manual_seed(5)
        mu = mu0.clone().requires_grad_(True)
        g, = torch.autograd.grad(f(mu), mu, create_graph=True)
        h, = torch.autograd.grad(g.sum(), mu)
        assert torch.allclose(h_over, h)


def test_functional_jvp_of_an_order_1_estimator_points_to_torch_func_jvp():
    """torch.autograd.functional.jvp computes a first derivative with a create_graph=True pass (the
    double-backward trick), which the order guard cannot tell from a second derivative: still refused, but
    the message now names it and points to torch.func.jvp, which gives the derivative (z-test)."""
    est = _FirstOrderScore("x", n_samples=3)

    def f(m):
        with storch.Graph():
            x = est(Normal(m, 1.0))
            storch.add_cost((x ** 2).sum(), name="c")
            return storch.surrogate_loss()

    mu0, v = torch.tensor([0.3], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    with pytest.raises(storch.OrderError, match=r"torch.autograd.functional.jvp.*torch.func.jvp"):
        torch.autograd.functional.jvp(f, mu0, v)
    torch.manual_seed(2)
    d = torch.stack([torch.func.jvp(f, (mu0,), (v,))[1] for _ in range(1000)])
    assert_unbiased(d, 0.6, "d/dμ E[x²]")


def _cubic_order_two_step():
    """A function of μ that runs a reparameterized step (E[x³], x ~ N(μ, 1)) and returns its order-2 surrogate, and
    a μ: what the torch.func / autograd.functional refusals below are shown on."""
    est = storch.estimator("reparameterization", plate="x", n_samples=4)

    def f(mu):
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost((x ** 3).sum())
            return storch.surrogate_loss(order=2)

    return f, torch.tensor([0.3, -0.2], dtype=torch.float64)


def test_torch_func_hessian_is_refused_with_what_works():
    """torch.func.hessian (jacfwd(jacrev(f))) vmaps the random draws; the message spoke of a vmap the user
    never called. It now names jacfwd / hessian and points to jacrev(jacrev(f)), which works."""
    f, mu = _cubic_order_two_step()
    with pytest.raises(storch.StorchError, match=r"torch.func.hessian.*torch.func.jacrev\(torch.func.jacrev\(f\)\)"):
        torch.func.hessian(f)(mu)
    assert torch.func.jacrev(torch.func.jacrev(f))(mu).shape == (2, 2)


@pytest.mark.parametrize("call", ["jacobian", "hessian"])
def test_vectorized_forward_mode_autograd_functional_is_refused_with_what_works(call):
    """torch.autograd.functional.jacobian(f, x, vectorize=True, strategy="forward-mode") (and hessian with
    outer_jacobian_strategy="forward-mode") run f under torch's older vmap, which refuses every random draw and
    takes no randomness option. The message said the estimator reads its samples' values or builds a learned
    part (neither is true of reparameterization) and advised a Python loop (found by p-func). It now names the
    call and what works: the reverse-mode strategy, or torch.func.jacfwd(f, randomness="same"), whose columns share
    one draw (randomness="different", advised before, fails for Normal's rsample, which fills a tensor in place:
    review r-35), equal to the reverse-mode Jacobian on the same draws."""
    f, mu = _cubic_order_two_step()
    fn, option = ((torch.autograd.functional.jacobian, "strategy") if call == "jacobian"
                  else (torch.autograd.functional.hessian, "outer_jacobian_strategy"))
    with pytest.raises(storch.StorchError, match=r"'reparameterization'.*vectorize=True.*forward-mode.*reverse-mode"
                       r".*torch.func.jacfwd\(f, randomness='same'\)") as info:
        fn(f, mu, vectorize=True, **{option: "forward-mode"})
    assert "reads the values of its samples" not in str(info.value)
    assert fn(f, mu, vectorize=True).shape == ((2,) if call == "jacobian" else (2, 2))  # reverse mode works
    # the advised forward mode runs, and differentiates the draws reverse mode does; jacfwd without randomness= is
    # refused with the same advice
    with pytest.raises(storch.StorchError, match=r"torch.func.jacfwd\(f, randomness='same'\)"):
        torch.func.jacfwd(f)(mu)
    for seed in range(3):
        torch.manual_seed(seed)
        reverse = torch.autograd.functional.jacobian(f, mu)
        torch.manual_seed(seed)
        torch.testing.assert_close(torch.func.jacfwd(f, randomness="same")(mu), reverse, rtol=1e-12, atol=0)


class ScoreFunction(storch.Estimator):
    """The base class's components: the plain score function (this test runs with storch-core alone)."""

    name = "test_core_score_function"


_CUTS = {
    "greater_float": lambda x: (x > 0).float().sum(),
    "bool": lambda x: x.bool().float().sum(),
    "long": lambda x: (x * 2).long().float().sum(),
    "argmax": lambda x: x.argmax(-1).float(),
    "where_condition": lambda x: torch.where(x > 0, torch.ones(()), -torch.ones(())).sum(),
    "detach": lambda x: torch.sigmoid(x.detach()).sum(),
}


@pytest.mark.parametrize("cut", sorted(_CUTS))
def test_a_cost_cut_from_the_sample_is_refused(cut):
    """A cost that depends on a reparameterised sample only through an operation without a derivative
    ((x > 0).float(), .bool(), .long(), argmax, torch.where's condition, detach) carries the sample's plate
    but its autograd graph never reaches the sample: the pathwise gradient was silently 0 where
    d/dμ E[1(μ + ε > 0)] = φ(μ) is not (mu.grad stayed 0). Refused with OrderError at order 1 and 2, also
    when the cost is differentiable in other parameters (w) and for a cost computed under torch.no_grad()."""
    mu = torch.zeros(3, requires_grad=True)
    w = torch.ones((), requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    for order in (1, 2):
        with storch.Graph():
            x = est(Independent(Normal(mu, 1.0), 1))
            storch.add_cost(_CUTS[cut](x) * w, name="cut")
            with pytest.raises(storch.OrderError, match=r"'reparameterization' on plate 'x': the cost 'cut' depends "
                                                        r"on the node's sample .* only through operations without"):
                storch.surrogate_loss(order=order)
    with storch.Graph():
        x = est(Independent(Normal(mu, 1.0), 1))
        with torch.no_grad():
            c = _CUTS["greater_float"](x + 1)
        storch.add_cost(c, name="under_no_grad")
        with pytest.raises(storch.OrderError, match="'under_no_grad'.*'score'.*credit=False"):
            storch.backward()


def test_credit_false_keeps_the_pathwise_gradient_and_the_refusal_says_so():
    """credit=False removes the score-function credit only: a critic's regression (V(s1) - G)^2 on a state
    s1 = s + a reached by a reparameterized action still sends its pathwise gradient to the policy (as
    written: the same gradient as autograd of the plain expression on the same noise); with s1.detach() it
    sends none. The cut refusal said "a cost that is meant to give no gradient to this node can be added with
    credit=False", which such a cost does not achieve: it now says to detach the inputs."""
    k = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=3)
    for detach in (False, True):
        torch.manual_seed(0)
        with storch.Graph():
            s0 = storch.denote_independent(s, 0, "env")
            s1 = s0 + est(Normal(k * s0, 0.5))
            v = w * (s1.detach() if detach else s1)
            storch.add_cost((v - (s1 ** 2).detach()) ** 2, name="critic", credit=False)
            got = torch.autograd.grad(storch.surrogate_loss(), k, allow_unused=True)[0]
        torch.manual_seed(0)
        a = Normal(k * s, 0.5).rsample((3,))
        s1 = s + a
        want = ((w * (s1.detach() if detach else s1) - (s1 ** 2).detach()) ** 2).mean()
        if detach:
            assert got is None or got == 0
        else:
            torch.testing.assert_close(got, torch.autograd.grad(want, k)[0])
            assert got != 0
    mu = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        x = est(Independent(Normal(mu, 1.0), 1))
        storch.add_cost(_CUTS["greater_float"](x), name="cut")
        with pytest.raises(storch.OrderError, match=r"credit=False\): that removes the score-function credit .* "
                                                    r"differentiated as written.*detached inputs \(z.detach\(\)\)"):
            storch.surrogate_loss()


def test_a_cut_is_looked_for_once_per_estimator_and_cost(monkeypatch):
    """The walk of the cost's graph to the sample runs at the first step of each estimator and cost name (at
    any order): later steps walk nothing; a refused cost is checked again at the next step. One more walk, at
    the estimator's first step only: whether the value it handed out is a path from its parameters."""
    from storch.surrogate import integer_reads, pathwise
    from storch.surrogate import reaches as reaches_module

    walks = []
    reaches = pathwise._reaches
    for module in (pathwise, reaches_module, integer_reads):  # (the modules that walk)
        monkeypatch.setattr(module, "_reaches", lambda *a: walks.append(1) or reaches(*a))
    mu = torch.zeros(3, requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    for order in (1, 1, 2, 1):
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost(torch.tanh(x).sum(), name="smooth")
            storch.surrogate_loss(order=order)
    assert len(walks) == 2  # the handed-out value to the parameters, the cost 'smooth' to the value
    for _ in range(2):
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost((x > 0).float().sum(), name="cut")
            with pytest.raises(storch.OrderError, match="'cut'"):
                storch.backward()
    assert len(walks) == 4


def test_no_cut_refused_where_the_gradient_is_right():
    """Not refused: a cost that depends on the sample differentiably as well as through a mask (x * (x > 0),
    torch.where(x > 0, x, 0)); a sample whose parameters need no gradient (fixed; drawn under torch.no_grad()
    is refused by its own check); a pathwise node downstream whose distribution depends on the sample (the walk
    goes through its rsample)."""
    mu = torch.zeros(3, requires_grad=True)
    est = storch.estimator("reparameterization", plate="x", n_samples=2)
    with storch.Graph():
        x = est(Normal(mu, 1.0))
        storch.add_cost((x * (x > 0).float()).sum() + torch.where(x > 0, x, torch.zeros(())).sum(), name="mixed")
        storch.backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    w = torch.ones((), requires_grad=True)
    with storch.Graph():
        x = est(Normal(torch.zeros(3), 1.0))  # no parameter needs a gradient through x
        storch.add_cost((x > 0).float().sum() * w, name="fixed")
        storch.backward()
    with storch.Graph():
        with torch.no_grad():
            x = est(Normal(mu, 1.0))
        storch.add_cost((x > 0).float().sum() * w, name="no_grad")
        # not this check's refusal: a node sampled under no_grad from parameters that need a gradient has
        # its own (tests/core/test_graph.py), which says what went wrong
        with pytest.raises(storch.StorchError, match="sampled under torch.no_grad"):
            storch.backward()
    with storch.Graph():
        x = est(Normal(mu, 1.0))
        y = storch.estimator("reparameterization", plate="y")(Normal(2 * x, 1.0))
        storch.add_cost((y ** 2).sum(), name="through_y")
        storch.backward()


def test_a_score_node_downstream_explains_the_dependence():
    """x reparameterised -> b ~ Bernoulli(logits=2x) with a score function -> cost b: the cost carries x's plate
    and its graph does not reach x (b is a detached sample); the surrogate credits it through b's
    log-probability, whose graph does reach x. Not refused, and unbiased: z-test against
    d/dμ E[σ(2(μ + ε))] by quadrature. A score node whose logits depend on x only through a cut
    (logits = 3 · 1[x > 0]) does not explain it: refused."""
    torch.manual_seed(13)
    theta = torch.tensor([0.3], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x")
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th, 1.0))
        b = ScoreFunction("b")(torch.distributions.Bernoulli(logits=2 * x))
        storch.add_cost(b.sum(), name="b")
        (g,) = per_replicate_derivatives(storch.surrogate_loss(order=1), leaf, 1)

    e = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    phi = torch.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi)

    def exact(t):
        return (torch.sigmoid(2 * (t[0] + e)) * phi).sum() * (e[1] - e[0])

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t).reshape(1), "gradient")
    mu = torch.zeros(1, requires_grad=True)
    with storch.Graph():
        x = est(Normal(mu, 1.0))
        b = ScoreFunction("b")(torch.distributions.Bernoulli(logits=3 * (x > 0).float()))
        storch.add_cost(b.sum(), name="b_of_cut")
        with pytest.raises(storch.OrderError, match="'reparameterization' on plate 'x': the cost 'b_of_cut'"):
            storch.surrogate_loss(order=1)


@pytest.mark.parametrize("downstream", ["score", "expect"])
def test_a_kink_or_jump_before_a_downstream_node_is_refused(downstream):
    """x reparameterised -> b ~ Bernoulli(logits=h(x)) (a score or expect node) -> cost b: the surrogate
    differentiates E_b[f(b) | x] through x along b's log-probability (or expect's weights), so a jump of h
    (round) biased order 1 (gradient 0 against 0.20) and a kink (ReLU) order 2 (z -142) with no error, where
    the same h in the cost itself was refused (found by porting mixed graphs). Now refused the same way;
    a smooth h (softplus) is unbiased at order 2 (z-test against quadrature)."""
    make = (lambda: ScoreFunction("b")) if downstream == "score" else (lambda: storch.estimator("expect", plate="b"))
    mu = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    for h, order, op in ((torch.round, 1, "Round"), (torch.relu, 2, "Relu")):
        est = storch.estimator("reparameterization", plate="x")
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            b = make()(torch.distributions.Bernoulli(logits=h(x)))
            storch.add_cost(b.sum(), name="b")
            with pytest.raises(storch.OrderError, match=rf"(log-probability|weights) of node 'b'.*{op}"):
                storch.surrogate_loss(order=order)

    torch.manual_seed(29)
    theta = torch.tensor([0.3], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x")
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th, 1.0))
        b = make()(torch.distributions.Bernoulli(logits=torch.nn.functional.softplus(x)))
        storch.add_cost(b.sum(), name="b")
        g, hess = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    e = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    phi = torch.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi)

    def exact(t):
        return (torch.sigmoid(torch.nn.functional.softplus(t[0] + e)) * phi).sum() * (e[1] - e[0])

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t).reshape(1), "gradient")
    assert_unbiased(hess, torch.autograd.functional.hessian(exact, t).reshape(1, 1), "Hessian")


_BINOMIAL_PARAMETERS = {
    "logits": lambda x, n: torch.distributions.Binomial(n, logits=x),
    "probs": lambda x, n: torch.distributions.Binomial(n, probs=torch.sigmoid(x)),
}


@pytest.mark.parametrize("parameter", sorted(_BINOMIAL_PARAMETERS))
@pytest.mark.parametrize("downstream", ["score", "expect"])
def test_a_downstream_binomial_log_p_is_not_a_kink_at_order_2(downstream, parameter):
    """x reparameterised -> k ~ Binomial(3, logits=x) (or probs=σ(x)), a score or expect node -> cost k² - 3.4 k.
    torch's Binomial.log_prob writes n · softplus(logits) as n · clamp(logits, min=0) + n · log1p(exp(-|logits|)),
    whose kinks cancel; the walk from k's log-probability (expect's weights) to x counted them and
    surrogate_loss(order=2) raised OrderError (AbsBackward0, ClampBackward1), while Bernoulli(logits=x) in the
    same place passed (found by a tester). Now the walk starts at k's parameters, its log p being smooth in
    them: unbiased at orders 1 and 2 (z-test against E_x[n p (1 - p) + n² p² - 3.4 n p], p = σ(x), x ~ N(μ, 0.7²),
    by quadrature)."""
    torch.manual_seed(31)
    n, sd = 3, 0.7
    make = (lambda: ScoreFunction("k")) if downstream == "score" else (lambda: storch.estimator("expect", plate="k"))
    theta = torch.tensor([0.2], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x")
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th, sd))
        k = make()(_BINOMIAL_PARAMETERS[parameter](x, n))
        storch.add_cost((k ** 2 - 3.4 * k).sum(), name="c")
        g, hess = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    e = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    phi = torch.exp(-e ** 2 / 2) / math.sqrt(2 * math.pi)

    def exact(t):
        p = torch.sigmoid(t[0] + sd * e)
        return ((n * p * (1 - p) + (n * p) ** 2 - 3.4 * n * p) * phi).sum() * (e[1] - e[0])

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t).reshape(1), "gradient")
    assert_unbiased(hess, torch.autograd.functional.hessian(exact, t).reshape(1, 1), "Hessian")


@pytest.mark.parametrize("downstream", ["score", "expect"])
def test_a_kink_before_a_downstream_binomial_is_refused_at_order_2(downstream):
    """The walk from a Binomial's parameters (whose log p is smooth in them) still sees the user's kinks that
    feed them: logits = relu(x), probs = clamp(σ(x), 0.2, 0.8) are refused at order 2 and named, without
    the cancelling clamp and abs inside torch's log_prob."""
    make = (lambda: ScoreFunction("k")) if downstream == "score" else (lambda: storch.estimator("expect", plate="k"))
    mu = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    for dist, op in ((lambda x: torch.distributions.Binomial(3, logits=torch.relu(x)), "ReluBackward0"),
                     (lambda x: torch.distributions.Binomial(3, probs=torch.sigmoid(x).clamp(0.2, 0.8)),
                      "ClampBackward1")):
        est = storch.estimator("reparameterization", plate="x")
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            k = make()(dist(x))
            storch.add_cost(k.sum(), name="k")
            with pytest.raises(storch.OrderError, match=rf"(log-probability|weights) of node 'k'.*{op}") as raised:
                storch.surrogate_loss(order=2)
            assert "AbsBackward0" not in str(raised.value)


def test_a_cost_cut_after_its_first_check_is_refused():
    """The cut check runs once per estimator and cost name; a cost computed softly during a warm-up
    (sigmoid(z / 0.1)) and hard afterwards ((z > 0).float(), binary codes) under the same name passed at the
    first step and then gave gradient 0 silently (found by reviewing the check). A cost without any graph
    is looked at again (one attribute read): refused."""
    mu = torch.zeros(1, requires_grad=True)
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    for epoch in range(3):
        with storch.Graph():
            z = est(Normal(mu, 1.0))
            rate = torch.sigmoid(z / 0.1) if epoch == 0 else (z > 0).float()
            storch.add_cost(rate.sum(), name="rate")
            storch.add_cost(mu.pow(2).sum() / 2, name="kl")
            if epoch == 0:
                storch.backward()
            else:
                with pytest.raises(storch.OrderError, match="the cost 'rate' depends on the node's sample"):
                    storch.backward()


class _TaylorScore(storch.Estimator):
    """MuProp-like (Gu et al. 2016), written as a third-party author would, with public names only: n score
    samples of a Bernoulli, then ONE evaluation-only entry, the mean-field point x̄ = p (weight 0, l = 0),
    handed out as a leaf that requires grad so that the control variate reads ∇f(x̄) from ``cost.live()``;
    a = E_p[h] - MagicBox(l) ⊥h(x) with h(x) = f(x̄) + ∇f(x̄)·(x - x̄). The gradient is the score function's:
    the leaf's gradient is no part of it. ``live_mean``: x̄ handed out with the graph of p instead (a path from
    the parameters: pathwise as far as the cut check can tell)."""

    name = "test_core_taylor_score"
    distributions = (torch.distributions.Bernoulli,)
    score_function = True

    def __init__(self, plate: str, n_samples: int = 2, live_mean: bool = False):
        super().__init__(plate=plate, n_samples=n_samples)
        self.live_mean = live_mean

    @property
    def uniform_weights(self):
        return False

    def proposal(self, node):
        d = node.distribution
        return torch.cat([d.sample((self.n_samples,)), d.probs.detach().unsqueeze(0)], 0)  # ⊥: a step constant

    def weighting_function(self, node):
        w = torch.full((self.n_samples + 1,), 1.0 / self.n_samples, dtype=node.sample.dtype)
        w[-1] = 0.0  # x̄ is evaluated, never averaged
        return w

    def gradient_function(self, node):
        lp = node.log_prob(node.sample[:-1])  # summed over the batch dims
        return torch.cat([lp, torch.zeros_like(lp[:1])], 0)

    def output(self, node):
        n = self.n_samples
        xbar = node.distribution.probs.unsqueeze(0) if self.live_mean else node.sample[n:].clone().requires_grad_()
        node.state = xbar
        return torch.cat([node.sample[:n], xbar], 0)

    def has_control_variate(self):
        return True

    def control_variate(self, node, cost):
        n, d, x, xbar = self.n_samples, node.distribution, node.sample, node.state
        fbar = cost.tensor.narrow(cost.dim, n, 1)  # f(x̄), detached
        live = cost.live().narrow(cost.dim, n, 1)
        g = None
        if live.requires_grad and not self.live_mean:
            (g,) = torch.autograd.grad(live.sum(), xbar, retain_graph=True, allow_unused=True)
        g = torch.zeros_like(x[n]) if g is None else g.detach()[0]  # ∇f(x̄): a constant of the step
        lin = (g * (x - x[n])).sum(-1)  # ∇f(x̄)·(x - x̄), (N, *parents)
        lin_mean = (g * (d.probs - x[n])).sum(-1)  # its mean under p, with the graph of p (value 0)
        lp = cost.align(node.gradient_values)
        return fbar + cost.align(lin_mean.expand_as(lin)) - magic_box(lp) * (fbar + cost.align(lin))


_TAYLOR_COSTS = {
    "step": lambda x: (x > 0.5).to(x.dtype).sum(-1) * 1.5,  # no derivative: ∇f(x̄) = 0
    "smooth": lambda x: (x * torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)).sum(-1) ** 2,
}


@pytest.mark.parametrize("cost", sorted(_TAYLOR_COSTS))
def test_an_evaluation_only_leaf_with_gradient_is_not_pathwise(cost, monkeypatch):
    """A score-function estimator that hands out an evaluation-only entry as a leaf of its own that requires
    grad (MuProp's x̄, for its control variate's ∇f(x̄)) was refused by the cut check for a cost without a
    derivative ((z > 0.5).float(): "only through operations without a derivative ... use 'score'") although
    its estimate is unbiased: the check took any handed-out value that requires grad for a pathwise sample.
    That value's graph reaches none of the distribution's parameters, so its gradient is not part of the
    estimate: not refused, and unbiased at orders 1 and 2 (z-test against enumeration), for a step cost and a
    smooth one (∇f(x̄) != 0). The estimator is marked never pathwise at its first step: later steps take the
    cut check's fast path (no walk). With frozen parameters it is undecided (refused, not remembered). The
    same estimator handing out x̄ with the graph of p is refused."""
    from storch.surrogate import reaches
    from storch.testing import exact_derivatives, exact_expectation, z_test

    torch.manual_seed(3)
    f = _TAYLOR_COSTS[cost]
    theta = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    exact = exact_derivatives(exact_expectation(lambda t: torch.distributions.Bernoulli(logits=t), f), theta, 2)
    for order in (1, 2):
        est = _TaylorScore("z")
        with storch.Graph():
            leaf, th = replicate(theta, R)
            storch.add_cost(f(est(torch.distributions.Bernoulli(logits=th))), name="c")
            ds = per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)
        for d, e in zip(ds, exact[1:]):
            report = z_test(d, e, f"{cost} order {order}")
            assert report.ok, report.table()
        assert est.__dict__["_storch_reach_checked"] is None
    walks = []
    monkeypatch.setattr(reaches, "_pathwise", lambda node: walks.append(1) or True)
    with storch.Graph():
        storch.add_cost(f(est(torch.distributions.Bernoulli(logits=theta.clone().requires_grad_()))), name="c")
        storch.backward()
    assert walks == []
    monkeypatch.undo()
    # parameters that show no gradient (frozen) leave it undecided: checked as pathwise (refused, as a
    # distribution that holds its parameters where storch does not look would be), not remembered
    est = _TaylorScore("z")
    for frozen in (True, False):
        with storch.Graph():
            storch.add_cost(_TAYLOR_COSTS["step"](est(torch.distributions.Bernoulli(
                logits=theta.clone().requires_grad_(not frozen)))), name="c")
            if frozen:
                with pytest.raises(storch.OrderError, match="without a derivative"):
                    storch.backward()
            else:
                storch.backward()
    with storch.Graph():
        z = _TaylorScore("z", live_mean=True)(torch.distributions.Bernoulli(logits=theta.clone().requires_grad_()))
        storch.add_cost(_TAYLOR_COSTS["step"](z), name="c")
        with pytest.raises(storch.OrderError, match="'c' depends on the node's sample .* without a derivative"):
            storch.backward()


def test_an_episode_checks_each_steps_cost_and_names_the_step(monkeypatch):
    """One reparameterization partition over T steps, one cost name for every step (docs/partitions.md): the
    order-1 jump walk ran for the first cost of the name only, so a floor() in step 3's cost gave gradient
    -0.01 against 1.0 (z -55) silently (found by porting sequence models). Now per name and step. A kink
    in the downstream node's logits at step 3 is refused naming that step. The walks of one surrogate share
    one memo per node and order (each autograd node expanded once: linear in T, was T²)."""
    from storch.conditions import smoothness

    made = []
    real = smoothness.PathMemo
    monkeypatch.setattr(smoothness, "PathMemo", lambda *a: made.append(1) or real(*a))
    for bad in ("cost", "logits"):
        mu = torch.zeros(5, requires_grad=True)
        est = storch.estimator("reparameterization", plate="z")
        with storch.Graph():
            for t in range(5):
                z = est(Normal(mu[t], 1.0))
                h = torch.relu(z) if bad == "logits" and t == 3 else torch.nn.functional.softplus(z)
                b = storch.estimator("expect", plate=f"b{t}")(torch.distributions.Bernoulli(logits=h))
                c = z ** 2 + b + (torch.floor(z + 0.5) if bad == "cost" and t == 3 else 0.0)
                storch.add_cost(c, name="c")
            order = 1 if bad == "cost" else 2
            match = "the cost 'c'.*Floor" if bad == "cost" else "node 'b3' at step 3|node 'b3'.*Relu"
            made.clear()
            with pytest.raises(storch.OrderError, match=match):
                storch.surrogate_loss(order=order)
            assert len(made) == 1  # one memo for the node at this order, shared by the five costs


def test_a_straight_through_rsample_is_not_a_reparameterisation():
    """OneHotCategoricalStraightThrough has rsample (hard + probs - ⊥probs): a pathwise estimator on it
    gave the straight-through gradient, biased (|z| 63 against enumeration); refused, also wrapped."""
    from torch.distributions import OneHotCategorical, OneHotCategoricalStraightThrough

    theta = torch.zeros(5, requires_grad=True)
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    assert not est.supports(OneHotCategoricalStraightThrough(logits=theta))
    assert not est.supports(Independent(OneHotCategoricalStraightThrough(logits=theta.expand(2, 5)), 1))
    assert est.supports(Normal(theta, 1.0))
    assert not est.supports(OneHotCategorical(logits=theta))  # no rsample at all: refused as before
    assert "reparameterization" not in storch.registry.supporting_estimators(OneHotCategoricalStraightThrough(logits=theta))
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError,
                                       match="straight-through estimator itself, 'straight_through' on it"):
        est(OneHotCategoricalStraightThrough(logits=theta))


def test_a_nested_independent_refusal_says_to_wrap_once():
    """An estimator that looks under one Independent refused Independent(Independent(Bernoulli)) saying it
    needs a Bernoulli, which it was given: the message now says to wrap once or pass the Bernoulli."""

    class BernoulliOnly(storch.Estimator):
        distributions = (torch.distributions.Bernoulli,)

    d = Independent(Independent(torch.distributions.Bernoulli(logits=torch.zeros(2, 3, 4)), 1), 1)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="Wrap once"):
        BernoulliOnly(plate="z")(d)
    assert BernoulliOnly.supports(Independent(torch.distributions.Bernoulli(logits=torch.zeros(3, 4)), 1))


def test_a_first_step_under_torch_func_jvp_does_not_clear_a_kink_for_later_steps():
    """The order-1 walk that finds a ReLU on the pathwise path runs once per estimator and cost name; under
    torch.func.jvp the wrapped tensors have no autograd graph, so a first step there found nothing and its
    cached 'smooth' verdict let a later torch.autograd.functional.hessian through the ReLU give 0 (exact: the
    normal density at μ). A walk that sees no graph is no verdict now (and without a verdict forward mode
    through a pathwise node is refused: see the test of a jump under torch.func.jvp)."""
    rep = storch.estimator("reparameterization", plate="x", n_samples=4)
    mu0 = torch.tensor([0.4], dtype=torch.float64)
    with pytest.raises(storch.OrderError, match="forward mode"):
        torch.func.jvp(lambda m: _relu_step(rep, m), (mu0,), (torch.ones_like(mu0),))
    with pytest.raises(storch.OrderError, match=r"'reparameterization'.*ReluBackward0"):
        torch.autograd.functional.hessian(lambda m: _relu_step(rep, m), mu0)


def test_a_jump_under_torch_func_jvp_with_detached_primals_is_refused():
    """round(x) of a reparameterised x: reverse mode refuses it at order 1 (the pathwise derivative is 0 where
    the expectation's is not), but torch.func.jvp of detached primals has no autograd graph for the check to
    walk, and the tangent of round came out 0 without a word. Forward mode through a pathwise node now uses the
    verdict of an eager step (per estimator and cost name) and is refused without one; a smooth cost's jvp
    after an eager step equals reverse mode's gradient on the same draws."""
    mu0, v = torch.tensor([0.3, -0.2], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    rep = storch.estimator("reparameterization", plate="x", n_samples=4)

    def f(m, cost):
        with storch.Graph():
            x = rep(Normal(m, 1.0))
            storch.add_cost(cost(x).sum() + x.sum(), name=cost.__name__)
            return storch.surrogate_loss()

    jump = lambda m: f(m, torch.round)  # noqa: E731
    with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'round'.*forward mode.*jump.*outside"):
        torch.func.jvp(jump, (mu0,), (v,))
    with pytest.raises(storch.OrderError, match="RoundBackward"):  # reverse mode: the jump itself
        jump(mu0.clone().requires_grad_(True))
    with pytest.raises(storch.OrderError, match="forward mode"):  # a refused eager step is no verdict
        torch.func.jvp(jump, (mu0,), (v,))
    with fwAD.dual_level(), pytest.raises(storch.OrderError, match="forward mode"):  # forward_ad alike
        jump(fwAD.make_dual(mu0, v))
    smooth = lambda m: f(m, torch.tanh)  # noqa: E731
    with pytest.raises(storch.OrderError, match=r"'tanh'.*forward mode"):  # no verdict yet
        torch.func.jvp(smooth, (mu0,), (v,))
    smooth(mu0.clone().requires_grad_(True))  # the eager step: smooth
    for seed in range(3):
        torch.manual_seed(seed)
        t = torch.func.jvp(smooth, (mu0,), (v,))[1]
        torch.manual_seed(seed)
        mu = mu0.clone().requires_grad_(True)
        g, = torch.autograd.grad(smooth(mu), mu)
        assert torch.allclose(t, g @ v)
    with torch.no_grad():  # a node not differentiated in forward mode (no tangent) is not refused
        with fwAD.dual_level():
            f(mu0, torch.round)


class _VmapPathwise(storch.Estimator):
    """Reparameterization with a draw torch.func.vmap(randomness="different") batches (Normal.rsample's
    in-place normal_ it refuses)."""

    name = "test_core_vmap_pathwise"
    requires_rsample = True

    def proposal(self, node):
        d = node.distribution
        return d.loc + d.scale * torch.randn((self.n_samples,) + d.loc.shape, dtype=d.loc.dtype)

    def gradient_function(self, node):
        return torch.zeros((1,), dtype=node.sample.dtype)


@pytest.mark.parametrize("how", ["hessian", "grad_of_grad"])
def test_vmap_of_the_order_1_surrogate_differentiated_twice_is_refused(how):
    """torch.func.vmap(step, randomness="different")(mu), differentiated twice outside: inside vmap the batched
    tensors report requires_grad=False and have no autograd graph, so no refusal was hooked and the order-1
    walk found no kink. An order-1 estimator's Hessian came out (1.68, 0.14) and a ReLU's 0 (exact: the normal
    density at μ) without a word; the ReLU's cached 'smooth' verdict let a later eager Hessian through too, and
    surrogate_loss(order=2) under vmap accepted the ReLU. The tensors under the batching are hooked and walked
    now; first derivatives (a backward pass without create_graph) are unaffected."""
    mu0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    est = _FirstOrderScore("x", n_samples=3)
    rep = _VmapPathwise("z", n_samples=4)

    def order_1(m):
        with storch.Graph():
            x = est(Normal(m, torch.ones_like(m)))
            storch.add_cost((x ** 2).sum(), name="c")
            return storch.surrogate_loss()

    def relu(m, order=1):
        with storch.Graph():
            z = rep(Normal(m, torch.ones_like(m)))
            storch.add_cost(torch.relu(z).sum(), name=f"relu{order}")
            return storch.surrogate_loss(order=order)

    def vmapped(step):
        return lambda m: torch.func.vmap(step, randomness="different")(m).sum()

    with pytest.raises(storch.OrderError, match=r"'first_order_score' on plate 'x'.*order 1"):
        differentiate_twice(vmapped(order_1), mu0, how)
    with pytest.raises(storch.OrderError, match=r"'test_core_vmap_pathwise'.*'relu1'.*ReluBackward0"):
        differentiate_twice(vmapped(relu), mu0, how)
    with pytest.raises(storch.OrderError, match=r"'test_core_vmap_pathwise'.*'relu1'.*ReluBackward0"):
        differentiate_twice(relu, mu0[:1], how)  # eagerly after the vmapped step
    with pytest.raises(storch.OrderError, match=r"'test_core_vmap_pathwise'.*'relu2'"):
        vmapped(lambda m: relu(m, 2))(mu0.clone().requires_grad_(True))
    for step in (order_1, relu):  # first order: backward and autograd.grad without create_graph
        mu = mu0.clone().requires_grad_(True)
        vmapped(step)(mu).backward()
        g, = torch.autograd.grad(vmapped(step)(mu), mu)
        assert torch.isfinite(mu.grad).all() and torch.isfinite(g).all() and mu.grad.abs().sum() > 0


def test_vmap_of_an_order_2_kink_in_a_downstream_log_p_is_refused():
    """A pathwise node z whose sample sets a downstream score node's logits through a ReLU: the order-2
    surrogate differentiates that node's log p twice through the kink, refused eagerly; under vmap the
    downstream log p (batched) reported requires_grad=False, so it was not walked and order 2 was accepted.
    Its weights and log p are read under the batching now."""
    mu0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    rep = _VmapPathwise("z", n_samples=3)

    class Score(storch.Estimator):
        name = "test_core_vmap_downstream_score"

    sc = Score("b", n_samples=3)

    def step(m):
        with storch.Graph():
            z = rep(Normal(m, torch.ones_like(m)))
            b = sc(torch.distributions.Bernoulli(logits=torch.relu(z)))
            storch.add_cost(b.to(m.dtype).sum(), name="down")
            return storch.surrogate_loss(order=2)

    for run in (step, torch.func.vmap(step, randomness="different")):
        with pytest.raises(storch.OrderError, match=r"log-probability of node 'b'.*ReluBackward0"):
            run(mu0.clone().requires_grad_(True))


def test_vmap_of_the_order_1_surrogate_is_unbiased_at_first_order():
    """The refusal hooked under vmap lets a first derivative through: d/dμ E[relu(z)] = Φ(μ) per member."""
    mu0 = torch.tensor([0.3, -0.2], dtype=torch.float64)
    rep = _VmapPathwise("z", n_samples=4)

    def relu(m):
        with storch.Graph():
            z = rep(Normal(m, torch.ones_like(m)))
            storch.add_cost(torch.relu(z).sum(), name="c")
            return storch.surrogate_loss()

    torch.manual_seed(3)
    gs = []
    for _ in range(400):
        mu = mu0.clone().requires_grad_(True)
        g, = torch.autograd.grad(torch.func.vmap(relu, randomness="different")(mu).sum(), mu)
        gs.append(g)
    gs = torch.stack(gs)
    exact = Normal(0.0, 1.0).cdf(mu0)
    for i in range(2):
        assert_unbiased(gs[:, i], exact[i], f"d/dμ_{i} E[relu(z)]")


_ORDER_2_KINKS = {  # first discontinuous derivative of order 2 (storch.conditions.smoothness): allowed at order 2, not at 3
    "elu": lambda x: torch.nn.functional.elu(x),
    "celu": lambda x: torch.nn.functional.celu(x),
    "huber": lambda x: torch.nn.functional.huber_loss(x, torch.zeros_like(x), reduction="none", delta=1.0),
    "smooth_l1": lambda x: torch.nn.functional.smooth_l1_loss(x, torch.zeros_like(x), reduction="none", beta=0.5),
}


@pytest.mark.parametrize("name", sorted(_ORDER_2_KINKS))
def test_an_order_2_surrogate_differentiated_three_times_is_refused(name):
    """elu(x) of a reparameterised x ~ N(μ, 1): surrogate_loss(order=3) refuses it (elu'' jumps at 0), but the
    order-2 surrogate differentiated three times was not refused: its third derivative was silently wrong (0.245
    against the exact e^(μ+1/2) Φ(-μ-1) - φ(μ) = -0.150 at μ = 0.1, z = 107; CELU alike), and huber / smooth_l1 gave
    torch's "does not require grad" (0 with allow_unused). The second create_graph pass is refused; the
    order-2 derivatives (second pass without create_graph) still run, and a smooth cost (softplus) is
    differentiated three times."""
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    mu = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    for _ in range(2):  # (the second step: nothing cached lets it through)
        with storch.Graph():
            x = est(Normal(mu, 1.0))
            storch.add_cost(_ORDER_2_KINKS[name](x).sum(), name="c")
            loss = storch.surrogate_loss(order=2)
        (g,) = torch.autograd.grad(loss, mu, create_graph=True)
        with pytest.raises(storch.OrderError, match=r"'reparameterization'.*'c'.*order 2 is discontinuous.*"
                                                    r"surrogate_loss\(order=k\)"):
            torch.autograd.grad(g.sum(), mu, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), mu)  # the order-2 derivative: fine
        assert torch.isfinite(h).all()
    with storch.Graph():
        x = est(Normal(mu, 1.0))
        storch.add_cost(torch.nn.functional.softplus(x).sum(), name="smooth")
        (g,) = torch.autograd.grad(storch.surrogate_loss(order=2), mu, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), mu, create_graph=True)
        (t,) = torch.autograd.grad(h.sum(), mu)
        assert torch.isfinite(t).all()


def test_an_order_2_surrogate_in_an_expression_is_counted_not_refused():
    """The counting hooks hold their tensors weakly; they were kept alive only as long as the Python loss, so a
    loss used in an expression (`surrogate_loss(order=2) + reg`, `hessian(lambda m: 0.5 * f(m), mu)`) was refused
    at its first create_graph pass as "freed" (found by review). Its Hessian runs, the third pass is refused."""
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    mu = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)

    def loss_of(m):
        with storch.Graph():
            storch.add_cost(torch.nn.functional.elu(est(Normal(m, 1.0))).sum(), name="c")
            return storch.surrogate_loss(order=2)

    total = loss_of(mu) + 0.01 * (mu ** 2).sum()  # (the loss itself is a temporary)
    gc.collect()
    (g,) = torch.autograd.grad(total, mu, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), mu, retain_graph=True)
    assert torch.isfinite(h).all()
    with pytest.raises(storch.OrderError, match=r"order 2 is discontinuous"):
        torch.autograd.grad(g.sum(), mu, create_graph=True)
    hess = torch.autograd.functional.hessian(lambda m: 0.5 * loss_of(m), mu)
    assert hess.shape == (2, 2) and torch.isfinite(hess).all()


def test_an_order_2_surrogate_through_elu_is_unbiased_at_order_2():
    """The counting guard of the third derivative leaves the first two alone: the gradient and Hessian of
    the order-2 surrogate of elu(x), x ~ N(μ, 1), z-tested against the closed form
    E[elu(x)] = μ Φ(μ) + φ(μ) + e^(μ+1/2) Φ(-μ-1) - Φ(-μ)."""
    torch.manual_seed(5)
    theta = torch.tensor([0.1, -0.2], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="x", n_samples=4)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x = est(Normal(th, 1.0))
        storch.add_cost(torch.nn.functional.elu(x).sum())
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def exact(m):
        ndtr, phi = torch.special.ndtr, torch.exp(-m ** 2 / 2) / math.sqrt(2 * math.pi)
        return (m * ndtr(m) + phi + torch.exp(m + 0.5) * ndtr(-m - 1) - ndtr(-m)).sum()

    t = theta.clone().requires_grad_(True)
    assert_unbiased(g, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(h, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_plate_tensors_pickle():
    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    from step_checks import pickle_round_trips

    pickle_round_trips(est, lambda loc: Normal(loc, 1.0))


def test_a_prior_built_with_zeros_like_of_the_sample_is_named_in_the_refusal():
    """A VAE's analytic KL against a prior built from the sample's shape, Normal(zeros_like(z), ones_like(z)),
    carries z's plate without reading z, so the cut check refuses it (it cannot tell a shape-only dependence from
    a thresholded one). The message named comparisons, detach() and no_grad, none of which the user wrote (seen
    porting the M2 VAE); it now names zeros_like and the fix, a prior built without the sample."""
    mu = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        q = Normal(mu, 1.0)
        z = storch.estimator("reparameterization", plate="z")(q)
        prior = Normal(torch.zeros_like(z), torch.ones_like(z))
        storch.add_cost(torch.distributions.kl_divergence(q, prior).sum(), name="kl")
        with pytest.raises(storch.OrderError, match=r"zeros_like\(z\)(.|\n)*Normal\(torch.zeros\(d\), torch.ones\(d\)\)"):
            storch.surrogate_loss()
    with storch.Graph():  # the fix the message gives: the same KL, accepted, with the exact gradient (mu = 0: 0)
        q = Normal(mu, 1.0)
        storch.estimator("reparameterization", plate="z")(q)
        storch.add_cost(torch.distributions.kl_divergence(q, Normal(torch.zeros(3), torch.ones(3))).sum(), name="kl")
        (g,) = torch.autograd.grad(storch.surrogate_loss(), mu)
    assert torch.equal(g, torch.zeros(3))
