"""Custom ``torch.autograd.Function``s and storch.compile: a trace records the operations of a Function's forward, not
its backward, so the replayed program differentiated them as written. A user's Function that doubles the gradient
gave half of eager's gradient, silently; torch's ``_Dirichlet`` (the rsample of Dirichlet and Beta, an LDA's topic
proportions) failed at backward with torch's "derivative for aten::_sample_dirichlet is not implemented". Both are
refused at the trace with a StorchError that names the Function and what to do; a Dirichlet drawn as normalised
Gammas (the message's advice) compiles, with an unbiased gradient; a Function on a value that is not differentiated
(a Dirichlet's ``.sample()``) is not refused."""

import pytest
import torch
from torch.distributions import Bernoulli, Beta, Dirichlet, Gamma, Normal

import storch
from storch.errors import StorchError

BACKENDS = [None, "inductor"]


class Doubled(torch.autograd.Function):
    """The identity whose backward doubles the gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def _draw_step(make):
    est = storch.estimator("reparameterization", plate="x", n_samples=3)

    def step(c):
        with storch.Graph():
            x = est(make(c))
            storch.add_cost((x * torch.arange(1.0, 4.0)).sum(), name="cost")
            return storch.surrogate_loss()
    return step


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_users_custom_function_is_refused_at_the_trace(backend):
    w = torch.nn.Parameter(torch.tensor(1.5))

    def step(mu):
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
            storch.add_cost((z - Doubled.apply(w)) ** 2, name="cost")
            return storch.surrogate_loss()
    mu = torch.tensor(0.5, requires_grad=True)
    step(mu).backward()  # eagerly: the Function's backward runs
    assert w.grad is not None
    with pytest.raises(StorchError, match="custom torch.autograd.Function .*Doubled.*Run this step eagerly"):
        storch.compile(step, backend=backend)(mu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [lambda c: Dirichlet(c), lambda c: Beta(c[0], c[1])], ids=["Dirichlet", "Beta"])
def test_dirichlet_and_beta_rsample_is_refused_with_the_gamma_route(make, backend):
    c = torch.tensor([1.5, 0.7, 2.0], requires_grad=True)
    step = _draw_step(make)
    step(c).backward()  # eagerly fine
    with pytest.raises(StorchError, match=r"_Dirichlet \(the rsample of Dirichlet and Beta.*Gamma\(concentration, 1.0\)"):
        storch.compile(step, backend=backend)(c)


def test_a_draw_that_is_not_differentiated_is_not_refused():
    def step(c, mu):
        with storch.Graph():
            weights = Dirichlet(c).sample()  # a Function applied, no gradient through it
            z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
            storch.add_cost((weights * z).sum(), name="cost")
            return storch.surrogate_loss()
    c, mu = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    compiled = storch.compile(step, backend=None)
    for seed in range(2):
        torch.manual_seed(seed)
        eager = torch.autograd.grad(step(c, mu), mu)[0]
        torch.manual_seed(seed)
        torch.testing.assert_close(torch.autograd.grad(compiled(c, mu), mu)[0], eager)


def test_the_gamma_route_compiles_with_an_unbiased_gradient():
    """d/dc E[Σ_i i·x_i], x ~ Dirichlet(c) drawn as normalised Gammas in a compiled step, against the closed form
    (E[x_i] = c_i / Σ c): |z| < 4 over 600 seeded estimates."""
    c = torch.tensor([1.5, 0.7, 2.0], dtype=torch.float64, requires_grad=True)
    weights = torch.arange(1.0, 4.0, dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="g", n_samples=2)

    def step(c):
        with storch.Graph():
            g = est(Gamma(c, 1.0))
            storch.add_cost((g / g.sum(-1, keepdim=True) * weights).sum(), name="cost")
            return storch.surrogate_loss()
    compiled = storch.compile(step, backend=None)
    grads = []
    for seed in range(600):
        torch.manual_seed(seed)
        grads.append(torch.autograd.grad(compiled(c), c)[0])
    assert compiled.traces == 1
    g = torch.stack(grads)
    exact = torch.autograd.grad((c / c.sum() * weights).sum(), c)[0]
    z = (g.mean(0) - exact) / (g.std(0) / len(grads) ** 0.5)
    assert float(z.abs().max()) < 4, z


def _checkpointed_step(reentrant):
    lin = torch.nn.Linear(1, 1)

    def step(mu):
        with storch.Graph():
            h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(lin(t)), mu.reshape(1, 1),
                                                  use_reentrant=reentrant)
            z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(h.squeeze(), 1.0))
            storch.add_cost(z ** 2, name="cost")
            return storch.surrogate_loss()
    return step, lin


def test_a_reentrant_checkpoint_is_refused_with_use_reentrant_false_as_the_fix():
    """A reentrant checkpoint (torch's CheckpointFunction) on plain tensors: its forward runs without autograd, the
    trace would record no path to the module's weights. The message names the fix (use_reentrant=False), which
    compiles with eager's gradient."""
    mu = torch.tensor(0.5, requires_grad=True)
    step, _ = _checkpointed_step(True)
    with pytest.raises(StorchError, match=r"CheckpointFunction.*pass use_reentrant=False"):
        storch.compile(step, backend=None)(mu)
    step, lin = _checkpointed_step(False)
    compiled = storch.compile(step, backend=None)
    for seed in range(2):
        torch.manual_seed(seed)
        eager = torch.autograd.grad(step(mu), [mu, lin.weight])
        torch.manual_seed(seed)
        for a, b in zip(torch.autograd.grad(compiled(mu), [mu, lin.weight]), eager):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("where", ["credit_false", "expect_parameters"])
def test_a_function_reached_through_a_plain_cost_or_a_nodes_parameters_is_refused(where):
    """The walk follows every path to the outputs: a cost added with credit=False (its graph enters the surrogate),
    and an expect node's parameters (reached through its probability weights, not its sample; tests/core runs with
    the core's estimators only)."""
    w = torch.tensor(1.5, requires_grad=True)

    def step(mu, w):
        with storch.Graph():
            if where == "credit_false":
                z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
                storch.add_cost(Doubled.apply(w) ** 2, name="plain", credit=False)
            else:
                z = storch.estimator("expect", plate="z")(Bernoulli(logits=Doubled.apply(w)))
            storch.add_cost((z - mu) ** 2, name="cost")
            return storch.surrogate_loss()
    with pytest.raises(StorchError, match="custom torch.autograd.Function .*Doubled"):
        storch.compile(step, backend=None)(torch.tensor(0.5, requires_grad=True), w)


def test_the_walk_runs_once_per_trace(monkeypatch):
    """The walk over the autograd graph is paid at the trace, not at each call (nor in the replay check)."""
    import storch.compiled.step as step_module
    walks = []
    walk = step_module._check_custom_functions
    monkeypatch.setattr(step_module, "_check_custom_functions", lambda outs, fn: walks.append(1) or walk(outs, fn))
    est = storch.estimator("reparameterization", plate="z", n_samples=2)

    def step(mu):
        with storch.Graph():
            storch.add_cost((est(Normal(mu, 1.0)) ** 2).sum(), name="cost")
            return storch.surrogate_loss()
    compiled = storch.compile(step, backend=None)
    for _ in range(4):
        compiled(torch.tensor(0.5, requires_grad=True))
    compiled(torch.zeros(3, requires_grad=True))  # another shape: a second trace
    assert compiled.traces == 2 and len(walks) == 2, (compiled.traces, walks)


@torch.library.custom_op("storch_tests::doubled", mutates_args=())
def _doubled_op(x: torch.Tensor) -> torch.Tensor:
    """A custom op (torch.library), the identity; its registered backward doubles the gradient."""
    return x.clone()


_doubled_op.register_fake(lambda x: torch.empty_like(x))
_doubled_op.register_autograd(lambda ctx, grad: 2 * grad, setup_context=lambda ctx, inputs, output: None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_custom_op_with_a_registered_backward_compiles_with_that_backward(backend):
    """torch.library.custom_op with register_autograd applies a torch-generated autograd.Function, but its forward
    runs the op below autograd: the trace records the op, and the replay runs its registered backward again. It is
    not refused (int15 refused it), and the compiled gradient is eager's (the doubled one: 2 (w - z) d/dw)."""
    w = torch.tensor(1.5, requires_grad=True)

    def step(mu, w):
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
            storch.add_cost((z - _doubled_op(w)) ** 2, name="cost")
            return storch.surrogate_loss()
    compiled = storch.compile(step, backend=backend)
    for seed in range(2):
        mu = torch.tensor(0.5 + seed, requires_grad=True)
        torch.manual_seed(seed)
        eager = torch.autograd.grad(step(mu, w), [mu, w])
        torch.manual_seed(seed)
        for a, b in zip(torch.autograd.grad(compiled(mu, w), [mu, w]), eager):
            torch.testing.assert_close(a, b)
    assert compiled.traces == 1
    # the doubled backward is what eager gave: the gradient of w is twice that of the plain identity
    with storch.Graph():
        torch.manual_seed(0)
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(torch.tensor(0.5), 1.0))
        storch.add_cost((z - _doubled_op(w)) ** 2, name="cost")
        doubled = torch.autograd.grad(storch.surrogate_loss(), w)[0]
    with storch.Graph():
        torch.manual_seed(0)
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(torch.tensor(0.5), 1.0))
        storch.add_cost((z - w) ** 2, name="cost")
        plain = torch.autograd.grad(storch.surrogate_loss(), w)[0]
    torch.testing.assert_close(doubled, 2 * plain)
