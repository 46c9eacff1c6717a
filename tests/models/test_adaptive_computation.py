"""Stochastic depth and adaptive computation time: control flow that depends on the samples (p-flow).

- Stochastic depth: a Bernoulli gate per residual block, ``h = h + b * f(h)`` (or ``torch.where(b, ...)``);
  ``if b:`` is refused with that advice.
- Halting (ACT-style): a policy samples halt/continue after each of up to T steps from the state; cost = task
  loss + ponder cost (steps taken). Finished samples are masked (``h = torch.where(done, h, f(h))``); a
  ``while not done`` loop is refused, and the loop may leave early once every sample is done with
  ``if bool(done.tensor.all()): break`` placed where the refusal says: after the masked updates that read
  ``done``, before the next draw. Right after the draw that set ``done`` the state would not carry that draw's
  plate and the gradient is biased (measured below: |z| ~ 40-75 at n_samples=1).
z-tests against enumeration of the 2^3 gate / halting sequences, one estimator per step (score, arm, disarm,
mvd, unordered_set) and one partition over the steps (score, unordered_set; the others refuse it with a clear
message); training lowers the exact expected cost; the step under ``storch.compile`` equals eager, and the early
exit (a Python read of the samples) is refused there.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Bernoulli

import storch
import storch.testing as kit
from model_checks import train_exact

F64, L, T, TARGET, PONDER = torch.float64, 3, 4, 0.9, 0.1
H0 = 0.4


def block(h, w, t):
    return torch.tanh(w * h + 0.3 * t)


# -- stochastic depth: theta = (3 gate logits, w) -----------------------------------------------------------

def build_depth(make, theta, style, partition):
    h = H0 + 0 * theta[L]
    for layer in range(L):
        b = make("gate" if partition else f"g{layer}")(Bernoulli(logits=theta[layer]))
        h = h + b * block(h, theta[L], layer) if style == "mul" else torch.where(b.bool(), h + block(h, theta[L], layer), h)
    storch.add_cost((h - TARGET) ** 2, name="task")


def exact_depth(theta):
    total = 0
    for bs in itertools.product((0.0, 1.0), repeat=L):
        h, p = torch.tensor(H0, dtype=theta.dtype), 1
        for layer, b in enumerate(bs):
            p = p * torch.sigmoid(theta[layer] if b else -theta[layer])
            h = h + b * block(h, theta[L], layer)
        total = total + p * (h - TARGET) ** 2
    return total


# -- halting: theta = (3 halting biases, w); T steps, a halting draw after each but the last -----------------

def build_halt(make, theta, style, partition):
    h, done, ponder = H0 + 0 * theta[T - 1], torch.zeros((), dtype=torch.bool), 0.0
    for t in range(T):
        h = torch.where(done, h, block(h, theta[T - 1], t))  # a finished sample keeps its state
        ponder = ponder + (~done).to(h.dtype)
        if style == "break" and bool(getattr(done, "tensor", done).all()):  # after the masked updates
            break
        if t == T - 1:
            break
        b = make("halt" if partition else f"h{t}")(Bernoulli(logits=theta[t] + h))
        done = done | b.bool()
        if style == "break-after-draw" and bool(done.tensor.all()):  # too early: h lacks this draw's plate
            break
    storch.add_cost((h - TARGET) ** 2, name="task")
    storch.add_cost(PONDER * ponder, name="ponder")


def exact_halt(theta):
    total = 0
    for bs in itertools.product((0, 1), repeat=T - 1):
        h, p, done, ponder = torch.tensor(H0, dtype=theta.dtype), 1, False, 0
        for t in range(T):
            if not done:
                h, ponder = block(h, theta[T - 1], t), ponder + 1
            if t == T - 1:
                break
            logit = theta[t] + h
            p, done = p * torch.sigmoid(logit if bs[t] else -logit), done or bs[t] == 1
        total = total + p * ((h - TARGET) ** 2 + PONDER * ponder)
    return total


DEPTH_THETA = torch.tensor([0.3, -0.4, 0.8, 0.9], dtype=F64)
HALT_THETA = torch.tensor([-0.3, 0.2, -0.1, 0.9], dtype=F64)


def depth(style, partition):
    return kit.Model(f"depth[{style},{'partition' if partition else 'per-block'}]", DEPTH_THETA,
                     lambda make, theta: build_depth(make, theta, style, partition), exact_depth,
                     lambda: [Bernoulli(logits=DEPTH_THETA[:1])])


def halt(style, partition):
    return kit.Model(f"halt[{style},{'partition' if partition else 'per-step'}]", HALT_THETA,
                     lambda make, theta: build_halt(make, theta, style, partition), exact_halt,
                     lambda: [Bernoulli(logits=HALT_THETA[:1])])


def models(partition):
    return [depth("mul", partition), depth("where", partition), halt("mask", partition), halt("break", partition)]


@pytest.mark.parametrize("name, options, orders, partition", [
    ("score", {"n_samples": 3, "baseline": "leave_one_out"}, (0, 1, 2), False),
    ("score", {"n_samples": 3, "baseline": "leave_one_out"}, (0, 1, 2), True),
    ("score", {"n_samples": 1}, (0, 1, 2), True),
    ("unordered_set", {"n_samples": 2}, (0, 1), True),
    ("arm", {}, (0, 1), False),
    ("disarm", {}, (0, 1), False),
    ("mvd", {}, (0, 1), False),
])
def test_gradients_against_enumeration(name, options, orders, partition):
    report = kit.check_against_enumeration(name, models=models(partition), options=options, orders=orders,
                                           n_replicates=1000)
    assert len(report.checks) == 4 * len(orders)


def test_gumbel_straight_through_runs_every_form():
    # biased by design: its forward value (hard samples) is checked against the exact expected cost
    report = kit.check_against_enumeration("gumbel_straight_through", models=models(False), n_replicates=1000)
    assert len(report.checks) == 4


@pytest.mark.parametrize("name", ["arm", "mvd"])
def test_a_partition_of_an_estimator_without_partitions_is_refused(name):
    est = storch.estimator(name, plate="gate")
    with storch.Graph(), pytest.raises(storch.PlateError, match="Create one estimator per stochastic node"):
        build_depth(lambda plate: est, DEPTH_THETA, "mul", partition=True)


@pytest.mark.parametrize("n", [1, 4])
def test_if_on_a_gate_is_refused_with_advice(n):
    est = storch.estimator("score", plate="gate", n_samples=n)
    with storch.Graph(), pytest.raises(storch.PlateError) as err:
        if est(Bernoulli(logits=torch.zeros(()))):
            pass
    assert "h = h + b * f(h)" in str(err.value)


def _python_loop_estimates(style, n_graphs=1500):
    """Gradients of ``n_graphs`` independent one-sample graphs (n_samples=1, no data plate: the early exit's
    Python read sees a single sample, so it fires as often as a sample halts)."""
    torch.manual_seed(0)
    est = storch.estimator("score", plate="halt", n_samples=1)
    theta = HALT_THETA.clone().requires_grad_(True)
    out = []
    for _ in range(n_graphs):
        with storch.Graph():
            build_halt(lambda plate: est, theta, style, partition=True)
            out.append(torch.autograd.grad(storch.surrogate_loss(), theta)[0])
    return torch.stack(out)


@pytest.mark.filterwarnings("ignore::storch.UnusedSampleWarning", "ignore::storch.ConstantCostWarning")
def test_early_exit_where_the_refusal_says_is_unbiased_at_one_sample():
    exact = kit.exact_derivatives(exact_halt, HALT_THETA, 1)[1]
    kit.assert_unbiased(_python_loop_estimates("break"), exact, "early exit after the masked update")
    # the exit right after the draw that finished every sample (the advice before p-flow) is biased
    assert kit.z_test(_python_loop_estimates("break-after-draw"), exact, "exit after the draw").max_abs_z > 10


@pytest.mark.parametrize("build, theta, exact", [(build_depth, DEPTH_THETA, exact_depth),
                                                 (build_halt, HALT_THETA, exact_halt)])
@pytest.mark.parametrize("name, options", [("score", {"n_samples": 4, "baseline": "leave_one_out"}),
                                           ("disarm", {})])
def test_training_lowers_the_expected_cost(build, theta, exact, name, options):
    torch.manual_seed(0)
    made: dict = {}  # one estimator per step's plate, created once (a partition for score: one plate)
    partition = name == "score"

    def make(plate):
        return made.setdefault(plate, storch.estimator(name, plate=plate, **options))

    before, after, _ = train_exact(
        theta, exact, lambda t: build(make, t, "mul" if build is build_depth else "mask", partition=partition))
    assert after < 0.8 * before, (before, after)  # (measured: 0.3x-0.5x)


@pytest.mark.usefixtures("restore_validation")
def test_compiled_step_equals_eager_and_the_early_exit_is_refused():
    theta = torch.nn.Parameter(HALT_THETA.clone())
    est = storch.estimator("score", plate="halt", n_samples=4, baseline="leave_one_out")

    def step(style):
        with storch.Graph():
            build_halt(lambda plate: est, theta, style, partition=True)
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        eager_value = step("mask")
        eager = torch.autograd.grad(eager_value, theta)[0]
        torch.manual_seed(seed)
        value = compiled("mask")
        torch.testing.assert_close(value, eager_value)
        torch.testing.assert_close(torch.autograd.grad(value, theta)[0], eager)
    with pytest.raises(storch.StorchError, match="reads a tensor's value in Python"):
        compiled("break")
