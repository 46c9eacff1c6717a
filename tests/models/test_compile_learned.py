"""storch.compile of steps with score's learned baseline (NVIL: b = c + b_ψ(h)).

The update is replayed (``replays_update``): ``update_inputs`` returns the baseline network's
detached input h (in each cost's frame) and the detached costs, ``update_from`` evaluates b_ψ on
them and takes the Adam step of the regression, then updates the running mean c, eagerly, in the
same code as an eager step. The replayed forward reads ψ live (nn.Parameters are captured by
reference) and c as a state tensor. A network is built on its first use, so the first step runs
eagerly (or a state_dict is loaded); compiling before that is refused with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from model_checks import TrainableBaseline, assert_same_runs, sgd_run


pytestmark = pytest.mark.usefixtures("restore_validation")  # conftest


def _model():
    """An encoder, the NVIL estimator (conditioned on x), a step with two costs, its data."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="learned", lr=0.05, hidden=8)
    target = torch.tensor([0.45, 0.2, 0.7])

    def step(x):
        with storch.Graph():
            xs = storch.denote_independent(x, 0, "data")
            z = est(Bernoulli(logits=encoder(xs)), inputs=xs)
            storch.add_cost(((z - target) ** 2).sum(-1), name="f")
            storch.add_cost(0.5 * z[..., 0], name="g")
            return storch.surrogate_loss()

    x = torch.randn(5, 4)
    return step, encoder, est, x


def _state(est) -> tuple:
    return ({k: v.detach().clone() for k, v in est.baseline_fn.state_dict().items()},
            {k: v.clone() for k, v in est.moving_averages.items()}, est.update_steps)


def _train(step, encoder, est, x, seeds, compiled=None, after_trace=None):
    """Steps with ``loss.backward()`` and an SGD step between; the first eagerly (it builds b_ψ's
    networks), the others by ``compiled`` if given: each step's loss, gradients, ψ, c."""
    def one(i):  # (traced on the second step)
        loss = (compiled if compiled is not None and i > 0 else step)(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in encoder.parameters()], _state(est)

    return sgd_run(list(encoder.parameters()), seeds, one, after_trace)


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_learned_baseline_steps_equal_eager(backend, monkeypatch, forbid_storch):
    # six training steps (the first eager), compiled and eager from the same seeds: the same losses,
    # gradients, baseline parameters ψ, running means c and update counts; after the trace no
    # storch code runs, and the baseline really learns (ψ moves, b ≠ 0)
    step, encoder, est, x = _model()
    want = _train(step, encoder, est, x, range(6))
    first, last = want[0][2][0], want[-1][2][0]
    assert any(not torch.equal(first[k], last[k]) for k in first) and want[-1][2][2] == 6

    step, encoder, est, x = _model()
    compiled = storch.compile(step, backend=backend)

    after_trace = forbid_storch

    with torch._inductor.config.patch(fallback_random=True):
        got = _train(step, encoder, est, x, range(6), compiled, after_trace)
    monkeypatch.undo()
    assert_same_runs(got, want)
    assert compiled.traces == 1
    gm = compiled.graph_module(x)
    assert "storch" not in gm.code
    inputs = compiled.program_inputs(x)
    assert len(inputs) == 1 + 1 + 2  # x, the update probe, the two running means c
    assert torch._dynamo.explain(gm)(*inputs).graph_break_count == 0


def test_evaluation_calls_do_not_train_the_baseline():
    # autograd.grad and no_grad calls leave ψ, c and Adam's state; a retain_graph second backward
    # updates once
    step, encoder, est, x = _model()
    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        (step if seed == 0 else compiled)(x).backward()
    before = _state(est)
    torch.manual_seed(5)
    torch.autograd.grad(compiled(x), list(encoder.parameters()))
    with torch.no_grad():
        torch.manual_seed(6)
        compiled(x)
    after = _state(est)
    assert after[2] == before[2] == 3
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    torch.manual_seed(7)
    loss = compiled(x)
    loss.backward(retain_graph=True)
    loss.backward()
    assert est.update_steps == 4


def test_state_dict_with_a_compiled_step():
    # ψ, c and Adam's state loaded into an estimator whose step was compiled are read by the next
    # replay and trained on from there, as by an eager step from the same state
    step, encoder, est, x = _model()
    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        (step if seed == 0 else compiled)(x).backward()
    saved = copy.deepcopy(est.state_dict())
    for seed in range(3, 5):
        torch.manual_seed(seed)
        compiled(x).backward()
    est.load_state_dict(saved)
    torch.manual_seed(9)
    loss = compiled(x)
    loss.backward()
    step_e, encoder_e, est_e, _ = _model()
    encoder_e.load_state_dict(encoder.state_dict())
    est_e.load_state_dict(saved)
    torch.manual_seed(9)
    loss_e = step_e(x)
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    for k, v in est_e.baseline_fn.state_dict().items():
        torch.testing.assert_close(est.baseline_fn.state_dict()[k], v)
    assert compiled.traces == 1


def test_compiling_before_the_networks_exist_is_refused():
    step, encoder, est, x = _model()
    with pytest.raises(storch.StorchError, match="Run one step eagerly first"):
        storch.compile(step, backend=None)(x)
    # nothing was built by the refused trace: an eager step builds the networks, then it compiles
    assert len(est.baseline_fn.heads) == 0
    storch.reset()
    torch.manual_seed(0)
    step(x).backward()
    compiled = storch.compile(step, backend=None)
    compiled(x).backward()
    assert est.update_steps == 2 and compiled.traces == 1


def test_a_trainable_callable_baseline_is_still_refused():
    # its update regresses on whatever it reads (not a declared, detached input): refused

    est = storch.estimator("score", plate="z", n_samples=3, baseline=TrainableBaseline())
    assert est.has_update and not est.replays_update

    def step(theta):
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost(z.sum(-1), name="f")
            return storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match="cannot replay estimator 'score'"):
        storch.compile(step, backend=None)(torch.zeros(2, 3, requires_grad=True))
