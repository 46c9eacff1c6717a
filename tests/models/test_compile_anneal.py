"""storch.compile of steps with an annealed temperature (gumbel_softmax, gumbel_straight_through).

A schedule ``step -> τ`` makes the relaxation update its state: the step counter advances when the
surrogate loss is backpropagated. The update is replayed (``replays_update``): τ at the current step
is a 0-dim tensor in ``state_tensors()``, passed to the compiled program at every call (never baked
into the trace), and ``update_from`` advances the step and evaluates the schedule in Python. So a
compiled annealed step gives eager's losses, gradients, τ and step, from one trace.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Distribution, OneHotCategorical

import storch
from model_checks import assert_same_runs, sgd_run

NAMES = ["gumbel_softmax", "gumbel_straight_through"]


def schedule(t: int) -> float:
    return max(0.3, 0.8 ** t)


pytestmark = pytest.mark.usefixtures("restore_validation")  # conftest


def _model(name: str, temperature=schedule):
    """A small model (an encoder and a cost weight, captured by reference), its annealed estimator,
    a step that returns the surrogate loss and the relaxed sample, and its data."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3)
    w = torch.nn.Parameter(torch.randn(3, 2))
    est = storch.estimator(name, plate="z", n_samples=3, temperature=temperature)

    def step(x):
        with storch.Graph():
            z = est(OneHotCategorical(logits=encoder(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z @ w) ** 2).sum(-1), name="f")
            return storch.surrogate_loss(), z.tensor

    x = torch.randn(5, 4)
    return step, [*encoder.parameters(), w], est, x


def _train(step, params, est, x, seeds, after_trace=None):
    """Steps with ``loss.backward()`` and an SGD step between: each step's loss, sample, gradients, τ, step."""
    def one(i):
        loss, z = step(x)
        tau = est.current_temperature()
        loss.backward()
        return loss.detach(), z.detach(), [p.grad.clone() for p in params], tau, est.step

    return sgd_run(params, seeds, one, after_trace, trace_at=1)  # (traced on the first call)


def _assert_same_runs(got, want):
    """Losses, samples and gradients as close as in the other compile tests; τ and the step exactly."""
    assert_same_runs([r[:3] for r in got], [r[:3] for r in want])
    assert [r[3:] for r in got] == [r[3:] for r in want]


@pytest.mark.parametrize("backend", [None, "inductor"])
@pytest.mark.parametrize("name", NAMES)
def test_annealed_steps_equal_eager(name, backend, monkeypatch, forbid_storch):
    # six training steps, compiled and eager from the same seeds: the same losses, samples, gradients,
    # temperatures and steps; one trace, and after it no storch code runs (the replay reads τ as an input)
    step, params, est, x = _model(name)
    want = _train(step, params, est, x, range(6))
    assert [w[3] for w in want] == [schedule(t) for t in range(6)] and est.step == 6

    step, params, est, x = _model(name)
    compiled = storch.compile(step, backend=backend)

    after_trace = forbid_storch

    with torch._inductor.config.patch(fallback_random=True):
        got = _train(compiled, params, est, x, range(6), after_trace)
    monkeypatch.undo()
    _assert_same_runs(got, want)
    assert compiled.traces == 1 and est.step == 6
    gm = compiled.graph_module(x)
    assert "storch" not in gm.code
    inputs = compiled.program_inputs(x)
    assert len(inputs) == 1 + 1 + 1  # x, the update probe, τ
    assert inputs[-1] is est.state_tensors()["temperature"] and float(inputs[-1]) == schedule(6)
    assert torch._dynamo.explain(gm)(*inputs).graph_break_count == 0


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_the_schedule_changes_the_compiled_sample(backend):
    # from one seed, the relaxed sample at step 0 and at step 5 differ (τ = 1 vs 0.33), and each
    # equals eager's at that step: the program reads the current τ, not the traced one
    step, params, est, x = _model("gumbel_softmax")
    compiled = storch.compile(step, backend=backend)
    samples = {}
    with torch._inductor.config.patch(fallback_random=True):
        for t in (0, 5):
            est.step = t  # as after t backward passes
            torch.manual_seed(11)
            got = compiled(x)[1]
            torch.manual_seed(11)
            with torch.no_grad():
                want = step(x)[1]
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
            samples[t] = got.detach()
    assert compiled.traces == 1
    assert (samples[0] - samples[5]).abs().max() > 0.05
    # a sharper τ puts more mass on the largest entry
    assert samples[5].max(-1).values.mean() > samples[0].max(-1).values.mean()


def test_evaluation_calls_do_not_advance_the_step():
    # as eagerly: torch.autograd.grad and no_grad calls do not count; a retain_graph second backward
    # counts once
    step, params, est, x = _model("gumbel_straight_through")
    compiled = storch.compile(step, backend=None)
    for seed in range(2):
        torch.manual_seed(seed)
        compiled(x)[0].backward()
    assert est.step == 2
    torch.manual_seed(5)
    torch.autograd.grad(compiled(x)[0], params)
    with torch.no_grad():
        torch.manual_seed(6)
        value = compiled(x)[0]
    assert est.step == 2 and est.current_temperature() == schedule(2)
    torch.manual_seed(6)
    with torch.no_grad():
        torch.testing.assert_close(value, step(x)[0])  # eager, at the same step
    torch.manual_seed(7)
    loss = compiled(x)[0]
    loss.backward(retain_graph=True)
    loss.backward()
    assert est.step == 3
    # eagerly the same
    step_e, params_e, est_e, _ = _model("gumbel_straight_through")
    for seed in range(2):
        torch.manual_seed(seed)
        step_e(x)[0].backward()
    torch.autograd.grad(step_e(x)[0], params_e)
    with torch.no_grad():
        step_e(x)
    loss = step_e(x)[0]
    loss.backward(retain_graph=True)
    loss.backward()
    assert est_e.step == 3


def test_state_dict_with_a_compiled_step():
    # the step counter is in state_dict(); loading it into an estimator whose step was compiled sets
    # the step and τ that the next replay reads (the same program), and a fresh model loads it strictly
    step, params, est, x = _model("gumbel_softmax")
    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        compiled(x)[0].backward()
    saved = est.state_dict()
    assert set(saved) == {"schedule_step"} and int(saved["schedule_step"]) == 3
    for seed in range(3, 5):
        torch.manual_seed(seed)
        compiled(x)[0].backward()
    assert int(saved["schedule_step"]) == 3 and est.step == 5  # the saved state is a copy

    est.load_state_dict(saved, strict=True)
    assert est.step == 3 and est.current_temperature() == schedule(3)
    torch.manual_seed(9)
    got = compiled(x)
    assert compiled.traces == 1
    step_e, _, est_e, _ = _model("gumbel_softmax")
    est_e.load_state_dict(saved, strict=True)
    assert est_e.step == 3
    torch.manual_seed(9)
    want = step_e(x)
    torch.testing.assert_close(got[1], want[1])
    got[0].backward()
    assert est.step == 4 and int(est.state_dict()["schedule_step"]) == 4
    # a checkpoint written before the step was saved loads strictly, keeps the step, and says so
    with pytest.warns(UserWarning, match="schedule goes on from the current step 4"):
        result = est.load_state_dict({}, strict=True)
    assert not result.missing_keys and est.step == 4
    # a constant temperature has no step to save
    constant = storch.estimator("gumbel_softmax", plate="z", temperature=0.5)
    assert not constant.has_update and constant.state_dict() == {} and constant.state_tensors() == {}


def test_a_bad_schedule_value_raises_at_the_next_call():
    # as eagerly: the update itself does not fail; the next call (compiled: before the program runs)
    # raises the OptionError that names the value and the step
    bad = lambda t: 0.5 if t < 2 else float("nan")  # noqa: E731
    step, params, est, x = _model("gumbel_softmax", temperature=bad)
    compiled = storch.compile(step, backend=None)
    for seed in range(2):
        torch.manual_seed(seed)
        compiled(x)[0].backward()
    assert est.step == 2
    with pytest.raises(storch.OptionError, match="schedule returned nan at step 2"):
        compiled(x)
    with pytest.raises(storch.OptionError, match="schedule returned nan at step 2"):
        step(x)
    # a new schedule: setting an option keys a new trace (storch.compile does not know which options a trace
    # reads as state and which it fixes), which reads it
    est.temperature = lambda t: 0.25
    torch.manual_seed(3)
    got = compiled(x)[1]
    torch.manual_seed(3)
    torch.testing.assert_close(got, step(x)[1])
    assert compiled.traces == 2


def test_bernoulli_annealed_step_compiles():
    # the binary Concrete relaxation (σ(z / τ)) reads τ the same way
    torch.manual_seed(0)
    theta = torch.randn(4, 3, requires_grad=True)
    est = storch.estimator("gumbel_softmax", plate="b", n_samples=2, temperature=schedule)

    def step(theta):
        with storch.Graph():
            b = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost(((b - 0.4) ** 2).sum(-1), name="f")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        got = torch.autograd.grad(compiled(theta), theta)[0]
        torch.manual_seed(seed)
        want = torch.autograd.grad(step(theta), theta)[0]
        torch.testing.assert_close(got, want)
        est.step += 1
    assert compiled.traces == 1


def test_overhead_benchmark_annealed_row():
    # storch-compare overhead --configs gumbel_annealed --replay --compile: the row is measured with
    # .backward() (the step advances), the replayed gradient equals eager storch's, no graph breaks
    from storch_bench.overhead import measure

    Distribution.set_default_validate_args(True)
    row = measure("toy", "gumbel_annealed", 2, 4, min_time=0.002, clock="cpu", compile=True, replay=True)
    assert row.replay_same_grad == "yes" and row.graph_breaks == 0, row
    assert row.replayed_storch_us > 0 and row.compiled_storch_us > 0 and row.compiled_torch_us > 0, row
    assert not row.note, row
