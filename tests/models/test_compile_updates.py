"""storch.compile of steps whose estimators update their own state: score's moving-average baseline.

Issue 19: the most common REINFORCE set-up, ``score(baseline="moving_average")``, compiles with the
eager semantics: the baseline of step t is the average of earlier steps' mean costs, the update runs
when the returned loss is backpropagated with ``.backward()`` (not ``torch.autograd.grad``, not a
second ``retain_graph`` backward), from the replayed program's values. The averages are inputs of
the compiled program (read at every call, so ``load_state_dict`` works), and the first step (no
average yet: no baseline) traces its own program. A third-party estimator opts in with the public
protocol (``replays_update``, ``update_inputs``, ``update_from``, ``state_tensors``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Distribution

import storch
from model_checks import TrainableBaseline, assert_same_runs, sgd_run


pytestmark = pytest.mark.usefixtures("restore_validation")  # conftest


def _model():
    """A small model (an nn.Linear, captured by reference), its moving-average estimator, a step with
    two costs (two averages) and its data."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="moving_average", decay=0.8)
    target = torch.tensor([0.45, 0.2, 0.7])

    def step(x):
        with storch.Graph():
            z = est(Bernoulli(logits=encoder(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z - target) ** 2).sum(-1), name="f")
            storch.add_cost(0.5 * z[..., 0], name="g")
            return storch.surrogate_loss()

    x = torch.randn(5, 4)
    return step, encoder, est, x


def _averages(est) -> dict:
    return {k: v.clone() for k, v in est.moving_averages.items()}


def _train(step, encoder, est, x, seeds, after_trace=None):
    """Steps with ``loss.backward()`` and an SGD step between: each step's loss, gradients, averages."""
    def one(i):  # (by step 2 both programs are traced: no average yet; averages)
        loss = step(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in encoder.parameters()], _averages(est)

    return sgd_run(list(encoder.parameters()), seeds, one, after_trace)


@pytest.mark.parametrize("backend", [None, "inductor"])
def test_moving_average_steps_equal_eager(backend, monkeypatch, forbid_storch):
    # six training steps, compiled and eager from the same seeds: the same losses, gradients and
    # moving averages (inductor draws with torch's generator under fallback_random). After the two
    # traces no storch code runs: the replayed calls never enter a Graph or an estimator
    step, encoder, est, x = _model()
    want = _train(step, encoder, est, x, range(6))
    assert set(want[0][2]) == {"f", "g"} and not torch.equal(want[0][2]["f"], want[-1][2]["f"])

    step, encoder, est, x = _model()
    compiled = storch.compile(step, backend=backend)

    after_trace = forbid_storch

    with torch._inductor.config.patch(fallback_random=True):
        got = _train(compiled, encoder, est, x, range(6), after_trace)
    monkeypatch.undo()
    assert_same_runs(got, want)
    # the first step (no average: no baseline) and the later ones (two averages) are two programs
    assert compiled.traces == 2
    gm = compiled.graph_module(x)
    assert "storch" not in gm.code
    inputs = compiled.program_inputs(x)
    assert len(inputs) == 1 + 1 + 2  # x, the update probe, the two averages
    assert [t is v for t, v in zip(inputs[2:], est.moving_averages.values())] == [True, True]
    assert torch._dynamo.explain(gm)(*inputs).graph_break_count == 0


def test_costs_of_one_name_at_two_layers_compile_with_their_own_averages():
    """Costs added per layer under one name keep one average each (under the name with their plates at a
    node both reach): a compiled step replays those updates as eager storch does, step by step."""
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        encoder = torch.nn.Linear(4, 2)
        e1 = storch.estimator("score", plate="z1", n_samples=3, baseline="moving_average", decay=0.8)
        e2 = storch.estimator("score", plate="z2", n_samples=3, baseline="moving_average", decay=0.8)
        x = torch.randn(5, 4)

        def step(x, e1=e1, e2=e2, encoder=encoder):
            with storch.Graph():
                z1 = e1(Bernoulli(logits=encoder(storch.denote_independent(x, 0, "data"))))
                z2 = e2(Bernoulli(logits=z1 - 0.5))
                storch.add_cost(((z1 - 0.3) ** 2).sum(-1) + 8.0, name="nelbo")
                storch.add_cost(((z2 - 0.6) ** 2).sum(-1) - 8.0, name="nelbo")
                return storch.surrogate_loss()

        fn = storch.compile(step, backend=None) if compiled else step

        def one(i, fn=fn, e1=e1, e2=e2, encoder=encoder, x=x):
            loss = fn(x)
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in encoder.parameters()], _averages(e1), _averages(e2)

        runs.append(sgd_run(list(encoder.parameters()), range(5), one))
    want, got = runs
    assert set(want[-1][2]) == {"nelbo[data,z1]", "nelbo[data,z1,z2]"} and set(want[-1][3]) == {"nelbo"}
    assert want[-1][2]["nelbo[data,z1]"] > 8.0 and want[-1][2]["nelbo[data,z1,z2]"] < -7.0
    assert_same_runs(got, want)


def test_evaluation_calls_and_a_second_backward_do_not_update():
    # as eagerly: torch.autograd.grad and no_grad calls change no average; a retain_graph second
    # backward updates once. A no_grad call (its own trace) reads the current averages
    step, encoder, est, x = _model()
    compiled = storch.compile(step, backend=None)
    for seed in range(2):
        torch.manual_seed(seed)
        compiled(x).backward()
    before = _averages(est)
    torch.manual_seed(5)
    torch.autograd.grad(compiled(x), list(encoder.parameters()))
    with torch.no_grad():
        torch.manual_seed(6)
        value = compiled(x)
    assert _averages(est).keys() == before.keys()
    assert all(torch.equal(est.moving_averages[k], before[k]) for k in before)
    torch.manual_seed(6)
    with torch.no_grad():
        torch.testing.assert_close(value, step(x))  # eager, with the same averages
    torch.manual_seed(7)
    loss = compiled(x)
    loss.backward(retain_graph=True)
    once = _averages(est)
    loss.backward()
    assert all(torch.equal(est.moving_averages[k], once[k]) for k in once)
    assert not torch.equal(once["f"], before["f"])
    # from the same state (averages and model), one compiled and one eager step give the same averages
    step2, encoder2, est2, _ = _model()
    est2.load_state_dict(est.state_dict())
    encoder2.load_state_dict(encoder.state_dict())
    torch.manual_seed(8)
    compiled(x).backward()
    torch.manual_seed(8)
    step2(x).backward()
    for k in est.moving_averages:
        torch.testing.assert_close(est.moving_averages[k], est2.moving_averages[k])


@pytest.mark.parametrize("objective", ["gradient penalty", "maml"])
def test_second_order_objective_updates_as_eagerly(objective):
    # eagerly a second-order objective built from g = autograd.grad(loss, θ, create_graph=True) runs the
    # updates on its .backward() (a second probe in g's graph, storch.surrogate.updates._updates_on_backward); the
    # compiled loss had only the first probe, so its moving average never moved under a gradient penalty or
    # a MAML outer loss through θ - lr·g
    def run(compiled: bool) -> list:
        step, encoder, est, x = _model()
        f = storch.compile(step, backend=None) if compiled else step
        params = list(encoder.parameters())
        out = []
        for i in range(4):
            torch.manual_seed(10 + i)
            loss = f(x)
            if i == 0:
                loss.backward()  # the first average (the steps after it trace another program)
            else:
                g = torch.autograd.grad(loss, params, create_graph=True)
                if objective == "gradient penalty":
                    outer = sum((gi ** 2).sum() for gi in g)
                else:
                    adapted = [p - 0.1 * gi for p, gi in zip(params, g)]
                    outer = ((torch.sigmoid(torch.nn.functional.linear(x, *adapted)) - 0.5) ** 2).sum()
                torch.autograd.grad(outer, params, retain_graph=True)  # an evaluation: no update
                outer.backward()
            out.append(_averages(est))
        return out

    eager, compiled = run(False), run(True)
    assert not torch.equal(eager[-1]["f"], eager[0]["f"])
    for e, c in zip(eager, compiled):
        assert e.keys() == c.keys()
        for k in e:
            torch.testing.assert_close(c[k], e[k])


def test_state_dict_with_a_compiled_step():
    # a saved state_dict does not change with later compiled steps; loaded averages are read by the
    # next replay (into an estimator whose step was traced before it had any average, too)
    step, encoder, est, x = _model()
    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.manual_seed(seed)
        compiled(x).backward()
    saved = est.state_dict()
    kept = {k: v.clone() for k, v in saved["_extra_state"]["moving_averages"].items()}
    for seed in range(3, 5):
        torch.manual_seed(seed)
        compiled(x).backward()
    assert all(torch.equal(saved["_extra_state"]["moving_averages"][k], kept[k]) for k in kept)
    assert not torch.equal(est.moving_averages["f"], kept["f"])

    est.load_state_dict(saved)
    torch.manual_seed(9)
    got = compiled(x)
    step_e, encoder_e, est_e, _ = _model()
    encoder_e.load_state_dict(encoder.state_dict())
    est_e.load_state_dict(saved)
    torch.manual_seed(9)
    want = step_e(x)
    torch.testing.assert_close(got, want)
    traces = compiled.traces
    assert traces == 2  # the same structure: the loaded averages are inputs of the same program

    # a new estimator, its step traced with no average yet, then loaded: it retraces with a baseline
    step_n, encoder_n, est_n, _ = _model()
    encoder_n.load_state_dict(encoder.state_dict())
    compiled_n = storch.compile(step_n, backend=None)
    torch.manual_seed(1)
    compiled_n(x)
    est_n.load_state_dict(saved)
    torch.manual_seed(9)
    torch.testing.assert_close(compiled_n(x), want)
    assert compiled_n.traces == 2


def test_compiled_moving_average_gradient_is_unbiased_and_reduces_variance():
    """After 20 warm-up steps, the replayed gradient with the moving average (updated by every
    call's backward) estimates the exact gradient of E[Σ_j (z_j - 0.45)²] over 3 Bernoullis,
    σ'(θ_j)(0.55² - 0.45²) (z-test); its variance is far below the plain score function's."""
    from storch.testing import assert_unbiased

    theta = torch.tensor([-1.0, 0.3, 1.2], requires_grad=True)

    def step_of(est):
        def step(theta):
            with storch.Graph():
                z = est(Bernoulli(logits=theta))
                storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
                return storch.surrogate_loss()
        return step

    def grads(baseline, n):
        est = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
        compiled = storch.compile(step_of(est), backend=None)
        out = []
        for i in range(20 + n):
            theta.grad = None
            compiled(theta).backward()
            if i >= 20:
                out.append(theta.grad.clone())
        return torch.stack(out), est

    torch.manual_seed(3)
    averaged, est = grads("moving_average", 600)
    p = torch.sigmoid(theta.detach())
    exact = p * (1 - p) * (0.55 ** 2 - 0.45 ** 2)
    assert_unbiased(averaged, exact, "compiled score gradient with a moving average")
    # the average tracks the expected cost Σ_j p_j 0.55² + (1 - p_j) 0.45²
    expected_cost = float((p * 0.55 ** 2 + (1 - p) * 0.45 ** 2).sum())
    assert abs(float(est.moving_averages["f"]) - expected_cost) < 0.05
    plain, _ = grads("none", 600)
    ratio = float(averaged.var(0).sum() / plain.var(0).sum())
    assert ratio < 0.2, ratio


def test_non_finite_cost_raises_on_backward_and_keeps_the_average():
    # as eagerly (storch.NonFiniteCostError on .backward(), no update), from the replay's loss
    torch.manual_seed(0)
    est = storch.estimator("score", plate="z", n_samples=3, baseline="moving_average")

    def step(theta, scale):
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost(scale * z.sum(-1), name="f")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    theta = torch.zeros(2, 3, requires_grad=True)
    for seed in range(2):
        torch.manual_seed(seed)
        compiled(theta, torch.tensor(1.0)).backward()
    before = _averages(est)
    loss = compiled(theta, torch.tensor(math.nan))
    with pytest.raises(storch.NonFiniteCostError, match="compiled step"):
        loss.backward()
    assert all(torch.equal(est.moving_averages[k], before[k]) for k in before)
    with pytest.raises(storch.NonFiniteCostError):  # eagerly too
        step(theta, torch.tensor(math.nan)).backward()
    assert all(torch.equal(est.moving_averages[k], before[k]) for k in before)


def test_partition_per_step_averages():
    # score on a partition (one estimator called at 3 steps of a sequence, a cost per step): one
    # average per step ("f", "f@1", "f@2"); compiled steps equal eager ones
    def run(compile_it):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 3)
        est = storch.estimator("score", plate="seq", n_samples=3, baseline="moving_average")

        def step(x):
            with storch.Graph():
                h = storch.denote_independent(x, 0, "data")
                for _ in range(3):
                    y = est(torch.distributions.Categorical(logits=lin(h)))
                    h = h + torch.nn.functional.one_hot(y, 3).float()
                    storch.add_cost((h ** 2).sum(-1) * 0.1, name="f")
                return storch.surrogate_loss()

        fn = storch.compile(step, backend=None) if compile_it else step
        x = torch.randn(2, 3)
        out = []
        for seed in range(4):
            torch.manual_seed(seed)
            lin.zero_grad()
            loss = fn(x)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in lin.parameters()], _averages(est)))
        return out

    want = run(False)
    assert set(want[-1][2]) == {"f", "f@1", "f@2"}
    assert_same_runs(run(True), want)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("partition", [False, True], ids=["one_node", "partition"])
def test_two_costs_of_one_name_at_one_step_compile_as_eagerly(backend, partition):
    # two costs of one name with the same plates at one step share their moving average (warned; see
    # docs/estimators/score.md): the program reads that one state tensor twice. make_fx records a get_attr
    # node per read, and lifting the state to an input deleted the constant at the first, so the second
    # read a missing attribute (AttributeError '_tensor_constant0' at the first compiled call; in a
    # partition at the second). Compiled and eager runs agree in float64: losses, gradients, averages
    def run(compile_it):
        torch.manual_seed(0)
        theta = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
        est = storch.estimator("score", plate="ep", n_samples=4, baseline="moving_average")

        def step():
            with storch.Graph():
                for t in range(3 if partition else 1):
                    a = est(torch.distributions.Categorical(logits=theta[t]))
                    storch.add_cost((a == 2).double() + t, name="r")
                storch.add_cost((a == 1).double() * 3.0, name="r")  # the same name and plates as the last one
                return storch.surrogate_loss()

        fn = storch.compile(step, backend=backend) if compile_it else step
        out = []
        with pytest.warns(UserWarning, match="two costs named 'r'"):  # eagerly at each step, compiled at its traces
            for seed in range(5):
                torch.manual_seed(seed)
                theta.grad = None
                loss = fn()
                loss.backward()
                out.append((loss.detach(), theta.grad.clone(), _averages(est)))
        return out

    want = run(False)
    assert set(want[-1][2]) == ({"r", "r@1", "r@2"} if partition else {"r"})
    assert all(v.dtype == torch.float64 for v in want[-1][2].values())
    torch.testing.assert_close(run(True), want, rtol=0, atol=1e-12)


class _RunningMean(storch.Estimator):
    """Score function with the running mean of all earlier steps' mean costs as baseline (a test
    estimator: what a third-party estimator writes to let storch.compile replay its update).

    Components: q = n i.i.d. samples of p; w = 1/n; l = log p(x); a = (1 - MagicBox(l)) ⊥b, b the
    mean of the earlier steps' mean costs (none before the first update).

    max_order: ∞ (b comes from earlier steps only).
    """

    name = "test_running_mean"
    has_update = True
    replays_update = True

    def __init__(self, plate: str, n_samples: int = 1) -> None:
        super().__init__(plate, n_samples)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def baseline(self, node, cost):
        total = self.sums.get(cost.key)
        return None if total is None else total / self.counts[cost.key]

    def update_inputs(self, nodes):
        return [(frame.key, frame.tensor.mean()) for node in nodes for frame in node.frames.values()]

    def update_from(self, inputs):
        for key, value in inputs:
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts[key] + 1 if key in self.counts else torch.ones_like(value)

    def state_tensors(self):
        return {**{"sum:" + k: v for k, v in self.sums.items()}, **{"count:" + k: v for k, v in self.counts.items()}}


def test_a_third_party_estimator_opts_in():
    # the public protocol: replays_update, update_inputs (a pytree with strings: only its tensors are
    # outputs), update_from, state_tensors; the compiled steps equal the eager ones
    def run(compile_it):
        torch.manual_seed(0)
        encoder = torch.nn.Linear(4, 3)
        est = _RunningMean("z", n_samples=3)

        def step(x):
            with storch.Graph():
                z = est(Bernoulli(logits=encoder(storch.denote_independent(x, 0, "data"))))
                storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
                return storch.surrogate_loss()

        fn = storch.compile(step, backend=None) if compile_it else step
        x = torch.randn(5, 4)
        opt = torch.optim.SGD(encoder.parameters(), lr=0.3)
        out = []
        for seed in range(4):
            torch.manual_seed(seed)
            opt.zero_grad()
            loss = fn(x)
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in encoder.parameters()],
                        {k: v.clone() for k, v in est.sums.items()}))
            opt.step()
        assert float(est.counts["f"]) == 4
        return out, fn

    want, _ = run(False)
    got, compiled = run(True)
    assert_same_runs(got, want)
    assert compiled.traces == 2


def test_refused_updates_say_what_compiles():
    theta = torch.zeros(2, 3, requires_grad=True)

    def step_of(est):
        def step(theta):
            with storch.Graph():
                z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
                storch.add_cost(z.sum(-1), name="f")
                return storch.surrogate_loss()
        return step


    trained = storch.estimator("score", plate="z", n_samples=2, baseline=TrainableBaseline())
    assert trained.has_update and not trained.replays_update
    with pytest.raises(storch.StorchError, match="trainable baseline module.*baseline='moving_average' or 'learned'"):
        storch.compile(step_of(trained), backend=None)(theta)
    relax = storch.estimator("relax", plate="z", n_samples=2)  # a learned control variate: replayed only
    assert relax.update_uses_loss_graph and relax.replays_update  # without a compiler (test_compile_relaxed)
    with storch.Graph():  # (one eager step builds its network)
        z = relax(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
        storch.add_cost(z.sum(-1), name="f")
        storch.backward()
    with pytest.raises(storch.StorchError, match="'relax' .*only without a compiler.*backend=None"):
        storch.compile(step_of(relax), backend="aot_eager")(theta)
    averaged = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average")

    def two_surrogates(theta):
        with storch.Graph():
            z = averaged(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost(z.sum(-1), name="f")
            return storch.surrogate_loss() + storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match="more than one surrogate loss"):
        storch.compile(two_surrogates, backend=None)(theta)
    frozen = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average", update=False)
    assert not frozen.has_update and not frozen.replays_update
    storch.compile(step_of(frozen), backend=None)(theta)  # no update: compiles as before
    # a frozen average (loaded, never updated) is state the program reads at every call too
    frozen.moving_averages["f"] = torch.tensor(0.5)
    compiled = storch.compile(step_of(frozen), backend=None)
    for b in (0.5, 2.0):
        frozen.load_state_dict({"_extra_state": {"moving_averages": {"f": torch.tensor(b)}}})
        torch.manual_seed(4)
        got = torch.autograd.grad(compiled(theta), theta)[0]
        torch.manual_seed(4)
        want = torch.autograd.grad(step_of(frozen)(theta), theta)[0]
        torch.testing.assert_close(got, want)
    assert compiled.traces == 1


class _EagerRunningMean(_RunningMean):
    """_RunningMean as a third-party author first writes it: its own update_parameters, no replays_update."""

    name = "test_eager_running_mean"
    replays_update = False

    def update_parameters(self, nodes, loss):
        self.update_from(self.update_inputs(nodes))


def test_a_third_party_update_refusal_names_the_protocol():
    """Found by a third-party author: storch.compile's refusal of an estimator whose update it cannot replay
    spoke of first-party options only (a trainable baseline module, sum_and_sample's buffer=, score's options),
    which a third-party class does not have. It now names the protocol the class lacks."""
    theta = torch.zeros(2, 3, requires_grad=True)
    est = _EagerRunningMean("z", n_samples=2)

    def step(theta):
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost(z.sum(-1), name="f")
            return storch.surrogate_loss()

    with pytest.raises(storch.StorchError) as refused:
        storch.compile(step, backend=None)(theta)
    text = str(refused.value)
    assert "'test_eager_running_mean'" in text and "_EagerRunningMean" in text
    for part in ("replays_update = True", "update_inputs(nodes)", "update_from(inputs)", "state_tensors()",
                 "An update that storch.compile replays"):
        assert part in text, part
    for first_party in ("trainable baseline module", "sum_and_sample", "baseline='leave_one_out'"):
        assert first_party not in text, first_party
    # a first-party estimator is still told its options
    trained = storch.estimator("score", plate="z", n_samples=2, baseline=TrainableBaseline())
    with pytest.raises(storch.StorchError, match="trainable baseline module.*baseline='moving_average'"):
        storch.compile(lambda theta: _score_step(trained, theta), backend=None)(theta)


def _score_step(est, theta):
    with storch.Graph():
        z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
        storch.add_cost(z.sum(-1), name="f")
        return storch.surrogate_loss()


def test_overhead_benchmark_moving_average_row():
    # storch-compare overhead --configs moving_average --replay --compile: the row is measured with
    # .backward() on both sides (the update), the replayed gradient equals eager storch's, no breaks
    from storch_bench.overhead import measure

    Distribution.set_default_validate_args(True)
    row = measure("toy", "moving_average", 2, 4, min_time=0.002, clock="cpu", compile=True, replay=True)
    assert row.same_grad == "yes" and row.replay_same_grad == "yes" and row.graph_breaks == 0, row
    assert row.replayed_storch_us > 0 and row.compiled_storch_us > 0 and row.compiled_torch_us > 0, row
    assert not row.note, row


def test_update_from_skips_a_non_finite_mean_without_a_host_sync():
    # the update eager and compiled steps share (Score.update_from): the first finite mean sets the
    # average, later ones decay into it, a non-finite one (first or later) leaves it as it was
    est = storch.estimator("score", plate="z", n_samples=3, baseline="moving_average", decay=0.75)
    est.update_from({"means": {"f": torch.tensor(math.nan), "g": torch.tensor(2.0)}})
    assert list(est.moving_averages) == ["g"]  # a non-finite first value never enters
    est.update_from({"means": {"f": torch.tensor(math.inf), "g": torch.tensor(-math.inf)}})
    assert list(est.moving_averages) == ["g"] and torch.equal(est.moving_averages["g"], torch.tensor(2.0))
    est.update_from({"means": {"f": torch.tensor(1.0), "g": torch.tensor(math.nan)}})
    assert torch.equal(est.moving_averages["f"], torch.tensor(1.0))
    assert torch.equal(est.moving_averages["g"], torch.tensor(2.0))
    old = est.moving_averages["f"]
    est.update_from({"means": {"f": torch.tensor(3.0), "g": torch.tensor(6.0)}})
    assert torch.equal(est.moving_averages["f"], 0.75 * old + 0.25 * torch.tensor(3.0))  # bit for bit
    assert torch.equal(est.moving_averages["g"], torch.tensor(3.0))
    for bad in (math.nan, math.inf, -math.inf):
        means = {"f": torch.tensor(bad), "g": torch.tensor(bad)}
        # without and with the finiteness update_inputs computes with the means (a program output)
        for inputs in ({"means": means}, {"means": means, "finite": {k: torch.isfinite(v) for k, v in means.items()}}):
            before = _averages(est)
            est.update_from(inputs)
            assert all(torch.equal(est.moving_averages[k], before[k]) for k in before)
            assert all(torch.isfinite(v) for v in est.moving_averages.values())
    fresh = storch.estimator("score", plate="z", n_samples=3, baseline="moving_average")
    fresh.update_from({"means": {"f": torch.tensor(math.nan)}, "finite": {"f": torch.tensor(False)}})
    assert fresh.moving_averages == {}

