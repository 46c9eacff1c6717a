"""`storch.surrogate_loss().backward()` leaves every estimator as `storch.backward()` does (issue 20).

The partitions doc's loop ended with `surrogate_loss().backward()`: the moving-average baseline
never formed and sum_and_sample's buffer stayed empty, silently. Now the updates run after that
backward pass; a learned control variate (whose update differentiates the surrogate again) is
refused with a clear error; `torch.autograd.grad` stays an evaluation pass.
"""

import re

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch



@pytest.fixture(autouse=True)
def _float64():
    # this module's tests run in float64; set per test and restored, never for the whole process
    # (a module-level set_default_dtype leaked into every later test module of the run)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _bernoulli_step(est, theta):
    z = est(Bernoulli(logits=theta))
    storch.add_cost(((z - 0.45) ** 2).sum(), name="f")


def _train(make, step, pattern, steps=5, seed=0):
    torch.manual_seed(seed)
    est = make()
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    grads = []
    for _ in range(steps):
        theta.grad = None
        with storch.Graph():
            step(est, theta)
            if pattern == "backward":
                storch.backward()
            else:
                storch.surrogate_loss().backward()
        grads.append(theta.grad.clone())
    return est, torch.stack(grads)


def test_moving_average_forms_with_surrogate_loss_backward():
    make = lambda: storch.estimator("score", plate="z", n_samples=4, baseline="moving_average")  # noqa: E731
    a, ga = _train(make, _bernoulli_step, "backward")
    b, gb = _train(make, _bernoulli_step, "surrogate")
    assert a.moving_averages and set(a.moving_averages) == set(b.moving_averages)
    for k in a.moving_averages:
        torch.testing.assert_close(b.moving_averages[k], a.moving_averages[k], rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)  # the same gradients, step by step


class _TrainableBaseline(torch.nn.Module):
    """A user's baseline module with trainable parameters: b = w·logits + c."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 1)

    def forward(self, node, cost):
        return cost.align(self.net(node.distribution.logits.detach()).squeeze(-1), node.parents)


@pytest.mark.parametrize("baseline", ["learned", "trainable_callable"])
def test_learned_baseline_trains_with_surrogate_loss_backward(baseline):
    # the regression ran in the backward pass's callback, where grad mode is off: b carried no graph
    # and ψ never moved under surrogate_loss().backward() (silently); now it trains as with
    # storch.backward(), step by step
    def make():
        if baseline == "learned":
            return storch.estimator("score", plate="z", n_samples=4, baseline="learned", lr=0.05, hidden=4)
        return storch.estimator("score", plate="z", n_samples=4, baseline=_TrainableBaseline(), lr=0.05)

    a, ga = _train(make, _bernoulli_step, "backward")
    b, gb = _train(make, _bernoulli_step, "surrogate")
    assert a.update_steps == b.update_steps == 5
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys() and params_a
    for k in params_a:
        torch.testing.assert_close(params_b[k], params_a[k], rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def _sequence_step(est, theta):
    data = storch.denote_independent(torch.arange(8), 0, "data")
    x = est(Categorical(logits=theta.expand(3) + 0.0 * data.double().unsqueeze(-1)), memory_key=data)
    y = est(Categorical(logits=theta.expand(3) + x.double()))
    storch.add_cost((x - 1.0) ** 2 + 0.5 * y, name="c")


def test_sum_and_sample_buffer_fills_with_surrogate_loss_backward():
    make = lambda: storch.estimator("sum_and_sample", plate="seq", buffer=4, n_samples=4)  # noqa: E731
    a, ga = _train(make, _sequence_step, "backward")
    b, gb = _train(make, _sequence_step, "surrogate")
    filled = sum(len(v) for v in a._buffer.entries.values())
    assert filled == 32  # 8 data points x 4 sequences kept
    assert b._buffer.state() == a._buffer.state()
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def test_autograd_grad_is_an_evaluation_pass_and_a_second_backward_updates_once():
    est = storch.estimator("score", plate="z", n_samples=4, baseline="moving_average")
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    with storch.Graph():
        _bernoulli_step(est, theta)
        loss = storch.surrogate_loss()
        torch.autograd.grad(loss, theta, retain_graph=True)
        assert not est.moving_averages  # nothing changed
        loss.backward(retain_graph=True)
        first = {k: v.clone() for k, v in est.moving_averages.items()}
        assert first
        loss.backward()
        assert {k: v for k, v in est.moving_averages.items()} == first


def _normal_step(est, theta):
    z = est(Normal(theta, 1.0))
    storch.add_cost(((z - 0.45) ** 2).sum(), name="f")


@pytest.mark.parametrize("name,step", [("relax", _bernoulli_step), ("lax", _normal_step)])
def test_learned_control_variate_is_refused_before_anything_is_backpropagated(name, step):
    torch.manual_seed(1)
    est = storch.estimator(name, plate="z")
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    with storch.Graph():
        step(est, theta)
        loss = storch.surrogate_loss()
        before = {k: v.clone() for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)}
        with pytest.raises(storch.StorchError, match=r"storch\.backward\(\)"):
            loss.backward()
    assert theta.grad is None  # refused before any gradient was accumulated
    assert all(p.grad is None for p in est.parameters())
    after = {k: v for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with storch.Graph():  # storch.backward() trains it
        step(est, theta)
        storch.backward()
    assert theta.grad is not None and est.update_steps == 1


@pytest.mark.parametrize("objective", ["maml", "penalty"])
def test_learned_control_variate_reached_through_a_gradient_says_what_to_do(objective):
    """A MAML inner step with rebar (g = grad(surrogate_loss(), θ, create_graph=True)) whose adapted θ - lr·g the
    outer step uses: the outer step's storch.backward() reached the inner surrogate's update probe and was told
    "surrogate_loss().backward() cannot train ...: Call storch.backward() instead" (found by porting MAML; the
    outer step's own gradients had been accumulated, though it said "Nothing was backpropagated"). Likewise the
    .backward() of a gradient penalty, which storch.backward() cannot express. The message names the pass and
    the fix (update=False), which trains."""
    data = torch.linspace(-1, 1, 20).reshape(5, 4)

    def run(update):
        torch.manual_seed(0)
        enc, head = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)
        inner = storch.estimator("rebar", plate="z", update=update)
        with storch.Graph():
            z = inner(Bernoulli(logits=enc(storch.denote_independent(data, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum(-1), name="c")
            (g,) = torch.autograd.grad(storch.surrogate_loss(), enc.weight, create_graph=True)
            if objective == "penalty":
                (g ** 2).sum().backward()
                return enc
        outer = storch.estimator("score", plate="y", n_samples=2)
        with storch.Graph():
            x = storch.denote_independent(data, 0, "data")
            y = outer(Bernoulli(logits=head(torch.nn.functional.linear(x, enc.weight - 0.1 * g, enc.bias))))
            storch.add_cost(((y - 0.7) ** 2).sum(-1), name="c")
            storch.backward()
        return enc

    with pytest.raises(storch.StorchError) as info:
        run(update=True)
    message = str(info.value)
    assert "'rebar' (plate 'z')" in message and "No estimator state was changed" in message, message
    assert re.search(r"objective built from the surrogate's gradient \(torch\.autograd\.grad\(\.\.\., "
                     r"create_graph=True\).*MAML.*create that step's estimator with update=False", message), message
    assert torch.isfinite(run(update=False).weight.grad).all()


def test_an_estimator_whose_update_differentiates_its_own_regression_trains_with_surrogate_loss_backward():
    # a third-party update that calls .backward() on its own regression (docs/writing-an-estimator.md's
    # NVIL): the update runs with grad enabled, as under storch.backward()
    class Regressing(storch.Estimator):
        name = "regressing_test"
        has_update = True

        def __init__(self, plate, n_samples=1):
            super().__init__(plate, n_samples)
            self.b = torch.nn.Parameter(torch.zeros(()))
            self.optimizer = torch.optim.SGD([self.b], lr=0.1)

        def baseline(self, node, cost):
            return self.b.expand(())

        def update_parameters(self, nodes, loss):
            err = sum(((self.b - f.tensor) ** 2).mean() for node in nodes for f in node.frames.values())
            self.optimizer.zero_grad()
            err.backward()
            self.optimizer.step()

    a, ga = _train(lambda: Regressing("z", n_samples=3), _bernoulli_step, "backward")
    b, gb = _train(lambda: Regressing("z", n_samples=3), _bernoulli_step, "surrogate")
    assert float(a.b) != 0.0
    torch.testing.assert_close(b.b, a.b, rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["penalty", "loss_plus_penalty", "maml"])
def test_second_order_objective_runs_the_updates_once(pattern):
    """A training objective built from g = grad(surrogate_loss(order=2), θ, create_graph=True) and
    backpropagated with .backward() (a gradient penalty, a MAML outer step through θ - lr·g) never reached
    the update probe: the moving averages never formed, silently. Now they update, once per step, as after
    loss.backward(); grad(g, θ) (a Hessian) stays an evaluation."""
    est = storch.estimator("score", plate="b", n_samples=4, baseline="moving_average")
    theta = torch.tensor([0.3, -0.5, 1.0], requires_grad=True)
    seen = []
    for step in range(3):
        theta.grad = None
        torch.manual_seed(step)
        with storch.Graph():
            _bernoulli_step(est, theta)
            loss = storch.surrogate_loss(order=2)
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            torch.autograd.grad(g.sum(), theta, retain_graph=True)  # evaluation: no update
            assert len(est.moving_averages) == min(step, 1)
            if pattern == "penalty":
                objective = 0.1 * g.pow(2).sum()
            elif pattern == "loss_plus_penalty":
                objective = loss + 0.1 * g.pow(2).sum()
            else:
                objective = ((theta - 0.1 * g - 1.0) ** 2).sum()
            objective.backward()
        seen.append(est.moving_averages["f"].clone())
    assert len(est.moving_averages) == 1 and not torch.equal(seen[0], seen[1])



def test_second_probe_adds_nothing_to_the_derivatives():
    """The probes' terms are 0 with every derivative 0: the surrogate's gradient and Hessian are those of
    the same step without an estimator that updates (the same draws)."""
    theta = torch.tensor([0.3, -0.5, 1.0])

    def f(t, baseline):
        torch.manual_seed(0)
        with storch.Graph():
            _bernoulli_step(storch.estimator("score", plate="b", n_samples=4, baseline=baseline), t)
            return storch.surrogate_loss(order=2)

    for make in (torch.autograd.functional.jacobian, torch.autograd.functional.hessian):
        with_probe = make(lambda t: f(t, "moving_average"), theta)  # no average yet: the baseline is 0
        assert torch.allclose(with_probe, make(lambda t: f(t, "none"), theta))


def test_backward_with_inputs_accumulates_there_and_updates():
    """`loss.backward(inputs=[...])` (one optimizer per parameter group) never reaches the loss's update probe,
    so `surrogate_loss().backward(inputs=...)` updated nothing, silently; `storch.backward(inputs=...)`
    restricts the accumulation and runs the updates as without it."""
    torch.manual_seed(3)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="moving_average")
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    other = torch.tensor(1.0, requires_grad=True)
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        storch.add_cost(((z - 0.45) ** 2).sum() * other, name="f")
        storch.backward(inputs=[theta])
    assert theta.grad is not None and other.grad is None
    assert set(est.moving_averages) == {"f"}
