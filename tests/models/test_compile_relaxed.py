"""storch.compile(step, backend=None) of steps with learned control variates (relax, rebar, lax).

Their update trains φ on the gradient's variance: ∂/∂φ Σ ĝ² with ĝ = ∂loss/∂(distribution
parameters), which differentiates the loss again (``update_uses_loss_graph``). The replayed program
returns the distribution parameters with their graph (``update_inputs``); after each replayed call
``loss_graph_values`` computes ∂/∂φ Σ ĝ² from them (the program's operations are in autograd's graph
with ``backend=None``), and ``update_from`` takes the Adam step on ``.backward()``, in the same code as
``storch.backward()`` runs eagerly. A compiled program is one autograd node, so other backends refuse
these estimators with a message that names ``backend=None``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch
from model_checks import assert_same_runs, sgd_run


pytestmark = pytest.mark.usefixtures("restore_validation")  # conftest

CASES = {
    "relax": (Bernoulli, {}),
    "rebar": (Bernoulli, {}),
    "lax": (Normal, {}),
}


def _model(name):
    """An encoder, the estimator, a step (one node, two costs) written for one data point, its data."""
    torch.manual_seed(0)
    dist, options = CASES[name]
    encoder = torch.nn.Linear(4, 3)
    est = storch.estimator(name, plate="z", n_samples=2, lr=0.05, **options)
    target = torch.tensor([0.45, 0.2, 0.7])

    def build(x):
        xs = storch.denote_independent(x, 0, "data")
        h = encoder(xs)
        z = est(Bernoulli(logits=h) if dist is Bernoulli else Normal(h, 1.0))
        storch.add_cost(((z - target) ** 2).sum(-1), name="f")
        storch.add_cost(0.5 * z[..., 0], name="g")

    def step(x):
        with storch.Graph():
            build(x)
            return storch.surrogate_loss()

    return build, step, encoder, est, torch.randn(5, 4)


def _phi(est) -> dict:
    return {k: v.detach().clone() for k, v in est.named_parameters()}


def _train(name, seeds, backend="eager", after_trace=None):
    """Training steps with an SGD step of the encoder between; the first eager (storch.backward(): it
    builds the control variate's network), the others eager or replayed (``loss.backward()``): each
    step's loss, encoder gradients, φ and update count."""
    build, step, encoder, est, x = _model(name)
    compiled = storch.compile(step, backend=None) if backend != "eager" else None
    def one(i):  # (traced on the second step)
        if compiled is None or i == 0:
            with storch.Graph():
                build(x)
                loss = storch.backward()
        else:
            loss = compiled(x)
            loss.backward()
        return loss.detach(), [p.grad.clone() for p in encoder.parameters()], _phi(est), est.update_steps

    return sgd_run(list(encoder.parameters()), seeds, one, after_trace), compiled


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_steps_train_the_control_variate_as_eager(name, monkeypatch, forbid_storch):
    # five steps, replayed and eager from the same seeds: the same losses, encoder gradients, φ and
    # update counts; after the trace no storch code runs; φ really moves
    want, _ = _train(name, range(5))
    first, last = want[0][2], want[-1][2]
    assert want[-1][3] == 5 and any(not torch.equal(first[k], last[k]) for k in first)
    got, compiled = _train(name, range(5), backend=None, after_trace=forbid_storch)
    monkeypatch.undo()
    assert_same_runs(got, want)
    assert compiled.traces == 1


def test_evaluation_calls_do_not_train_the_control_variate():
    # autograd.grad and no_grad calls leave φ and the step count; a retain_graph second backward
    # updates once
    build, step, encoder, est, x = _model("relax")
    compiled = storch.compile(step, backend=None)
    with storch.Graph():
        build(x)
        storch.backward()
    compiled(x).backward()
    before, steps = _phi(est), est.update_steps
    assert steps == 2
    torch.autograd.grad(compiled(x), list(encoder.parameters()))
    with torch.no_grad():
        compiled(x)
    assert est.update_steps == steps and all(torch.equal(v, before[k]) for k, v in _phi(est).items())
    loss = compiled(x)
    loss.backward(retain_graph=True)
    loss.backward()
    assert est.update_steps == steps + 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiling_refuses_and_names_the_replay(backend):
    build, step, encoder, est, x = _model("rebar")
    with storch.Graph():
        build(x)
        storch.backward()
    with pytest.raises(storch.StorchError, match="backend=None"):
        storch.compile(step, backend=backend)(x)


def test_trace_before_the_network_exists_is_refused():
    # relax's default network is built on first use, which a trace cannot record
    build, step, encoder, est, x = _model("relax")
    with pytest.raises(storch.StorchError, match="Run one step eagerly first"):
        storch.compile(step, backend=None)(x)
    with storch.Graph():  # after an eager step, it traces
        build(x)
        storch.backward()
    storch.compile(step, backend=None)(x).backward()
    assert est.update_steps == 2


def test_without_update_it_compiles_with_any_backend():
    # update=False: no update (has_update is False), so nothing to replay: inductor compiles the step
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3)
    est = storch.estimator("rebar", plate="z", n_samples=2, update=False)
    assert not est.has_update

    def step(x):
        with storch.Graph():
            z = est(Bernoulli(logits=encoder(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
            return storch.surrogate_loss()

    x = torch.randn(5, 4)
    compiled = storch.compile(step, backend="aot_eager")
    for seed in range(2):
        torch.manual_seed(seed)
        want = torch.autograd.grad(step(x), list(encoder.parameters()))
        torch.manual_seed(seed)
        got = torch.autograd.grad(compiled(x), list(encoder.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_with_a_moving_average_in_the_same_step():
    # two updates of one replayed call: relax's from loss_graph_values (computed after the call), the
    # moving average's from the program's detached means (on backward); four steps equal eager's
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 6)
    relax = storch.estimator("relax", plate="z", n_samples=2, lr=0.05)
    ma = storch.estimator("score", plate="w", n_samples=3, baseline="moving_average")
    x = torch.randn(5, 4)

    def build(x):
        h = enc(storch.denote_independent(x, 0, "data"))
        z = relax(Bernoulli(logits=h[..., :3]))
        w = ma(Bernoulli(logits=h[..., 3:]))
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        storch.add_cost((w * z).sum(-1), name="g")

    def step(x):
        with storch.Graph():
            build(x)
            return storch.surrogate_loss()

    with storch.Graph():  # builds relax's network, sets the first average
        build(x)
        storch.backward()
    start = [copy.deepcopy(m.state_dict()) for m in (enc, relax, ma)]

    def run(compiled):
        for m, s in zip((enc, relax, ma), start):
            m.load_state_dict(s)
        replay = storch.compile(step, backend=None)
        out = []
        for i in range(4):
            torch.manual_seed(10 + i)
            enc.zero_grad()
            if compiled:
                replay(x).backward()
            else:
                with storch.Graph():
                    build(x)
                    storch.backward()
            out.append(([p.grad.clone() for p in enc.parameters()], _phi(relax), dict(ma.moving_averages),
                        relax.update_steps))
        return out

    want, got = run(False), run(True)
    assert_same_runs(got, want)
    assert got[-1][3] == 5


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_non_finite_update_is_skipped_as_eager(name):
    """A replayed call whose Σ ĝ² overflows (a cost scaled by 1e20, finite) skips the update in the code an
    eager step runs (update_from): φ unchanged, skipped_updates counts it, a RuntimeWarning; the next
    replayed call with an ordinary cost trains φ again (finite)."""
    torch.manual_seed(0)
    dist, options = CASES[name]
    est = storch.estimator(name, plate="z", n_samples=2, lr=0.05, **options)
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.5, 1.0]))  # a parameter: the compiled step reads it live

    def build(scale):
        z = est(Bernoulli(logits=theta) if dist is Bernoulli else Normal(theta, 1.0))
        storch.add_cost(scale * ((z - 0.45) ** 2).sum(), name="f")

    def step(scale):
        with storch.Graph():
            build(scale)
            return storch.surrogate_loss()

    with storch.Graph():  # eager first: builds the network
        build(torch.tensor(1.0))
        storch.backward()
    compiled = storch.compile(step, backend=None)
    compiled(torch.tensor(1.0)).backward()
    assert est.update_steps == 2
    phi = _phi(est)
    with pytest.warns(RuntimeWarning, match="control variate's variance loss or gradients are not finite"):
        loss = compiled(torch.tensor(1e20))
        loss.backward()
    assert torch.isfinite(loss) and est.skipped_updates == 1 and est.update_steps == 2
    assert all(torch.equal(phi[k], v) for k, v in _phi(est).items())
    theta.grad = None
    compiled(torch.tensor(1.0)).backward()
    assert est.update_steps == 3 and torch.isfinite(theta.grad).all()
    assert all(torch.isfinite(v).all() for v in _phi(est).values())
    assert any(not torch.equal(phi[k], v) for k, v in _phi(est).items())


@pytest.mark.parametrize("chain", [("reparameterization", "rebar"), ("rebar", "rebar"), ("relax", "relax")])
def test_order_2_chains_compile(chain):
    """surrogate_loss(order=2) walks each cost's graph for kinks at every surrogate; at the relaxations'
    clamp of their probabilities it reads the saved input's dtype (``node._saved_self``), which unpacks a
    saved tensor as a backward pass does: a compiled order-2 step with a chain of two such nodes was refused
    at every call as differentiating inside the step (blaming the user's step or rebar's control variate).
    Compiled (after an eager step: relax builds its network there) it gives eager's loss, gradient and
    Hessian-vector product."""
    first, second = chain

    def make():
        torch.manual_seed(0)
        enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
        e1 = storch.estimator(first, plate="z1", n_samples=2)
        e2 = storch.estimator(second, plate="z2", n_samples=2)

        def step(x):
            with storch.Graph():
                h = enc(storch.denote_independent(x, 0, "data"))
                z1 = e1(Normal(h, 1.0) if first == "reparameterization" else Bernoulli(logits=h))
                z2 = e2(Bernoulli(logits=dec(z1)))
                storch.add_cost(((z2 - 0.3) ** 2).sum(-1), name="f")
                return storch.surrogate_loss(order=2)

        return step, [*enc.parameters(), *dec.parameters()]

    def derivatives(step, params, seed):
        torch.manual_seed(seed)
        loss = step(x)
        g = torch.autograd.grad(loss, params, create_graph=True)
        hvp = torch.autograd.grad(sum(gi.sum() for gi in g), params)
        return loss.detach(), [gi.detach() for gi in g], hvp

    x = torch.randn(3, 4)
    step, params = make()
    compiled_step, compiled_params = make()
    derivatives(step, params, 0)  # eager first steps (no estimator update: surrogate_loss only)
    derivatives(compiled_step, compiled_params, 0)
    compiled = storch.compile(compiled_step, backend=None)
    for seed in (1, 2):
        torch.testing.assert_close(derivatives(compiled, compiled_params, seed), derivatives(step, params, seed),
                                   rtol=0.0, atol=1e-12)
