"""No reference cycles in the other forms a step takes (issue 19), for every first-party estimator of the
roster: a second-order evaluation, a step that failed midway (the graph discards it), a step refused by a
check, a step that warned, a ``storch.compile``'d step after its trace, a step of ``storch.testing``'s kit
and a step under a ``torch.func`` transform. ``tests/reliability/test_no_cycles.py`` has the plain training
and evaluation steps and the partitions. After each, with the collector off, ``gc.collect()`` finds nothing
of storch's: the step's tensors were freed by reference counting when it ended.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
from torch.distributions import Bernoulli

import storch
import storch.testing as kit

from _roster import cost, distribution, installed, options
from step_checks import distribution_validation_kept, unreachable_after  # noqa: F401 (an autouse fixture)

NAMES = installed()
# pathwise estimators: a sample no cost uses gets no UnusedSampleWarning (no score term to lose)
PATHWISE = {"reparameterization", "gumbel_softmax", "gumbel_straight_through", "straight_through"}


def _theta() -> torch.Tensor:
    return torch.tensor([0.3, -0.2, 0.5], requires_grad=True)


def _max_order(name: str) -> float:
    return storch.available_estimators()[name].max_order


def _node(est, name: str, theta: torch.Tensor):
    x = storch.denote_independent(theta.expand(4, 3), 0, "data")
    return x, est(distribution(name, x))


def _assert_none(n: int, kinds: dict, what: str) -> None:
    assert n == 0, f"{what}: gc.collect() found {n} unreachable objects after the step: {kinds}"


@pytest.mark.parametrize("name", NAMES)
def test_second_order_step_leaves_no_cycles(name):
    """surrogate_loss(order=2), differentiated twice; an estimator unbiased only to order 1 refuses it
    (OrderError): the refused step leaves nothing either."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    theta = _theta()
    order2 = _max_order(name) >= 2

    def step():
        with storch.Graph():
            _, z = _node(est, name, theta)
            storch.add_cost(cost(name, z), name="c")
            if not order2:
                with pytest.raises(storch.OrderError):
                    storch.surrogate_loss(order=2)
                return
            g, = torch.autograd.grad(storch.surrogate_loss(order=2), theta, create_graph=True)
            torch.autograd.grad(g.sum(), theta, allow_unused=True)

    _assert_none(*unreachable_after(step), f"{name} at order 2" + ("" if order2 else " (refused)"))


@pytest.mark.parametrize("where", ["with-block", "default-graph", "user-error"])
@pytest.mark.parametrize("name", NAMES)
def test_step_that_failed_midway_leaves_no_cycles(name, where):
    """A cost with a per-sample shape (CostError) in a ``with storch.Graph():`` block or in the thread's
    default graph (discarded at once), or the user's own exception leaving the block after the node: the
    discarded step's nodes and tensors are freed with it (the error's traceback is gone after ``except``)."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    theta = _theta()
    samples: list = []

    def body():
        _, z = _node(est, name, theta)
        samples[:] = [weakref.ref(z), weakref.ref(z.tensor)]
        if where == "user-error":
            raise ValueError("the user's own error")
        storch.add_cost(z, name="bad")  # one value per sample expected, (3,) given

    def step():
        expected = ValueError if where == "user-error" else storch.CostError
        with pytest.raises(expected):
            if where == "default-graph":
                body()
            else:
                with storch.Graph():
                    body()
        assert not storch.current_graph().nodes  # discarded

    _assert_none(*unreachable_after(step), f"{name}, a step that failed ({where})")
    assert len(samples) == 2 and all(r() is None for r in samples), \
        f"{name}: the failed step's sample is still held after it ({where})"


def test_refused_second_call_of_a_single_node_estimator_leaves_no_cycles():
    """A second call of an estimator that does not support partitions is refused (PlateError) and the
    default graph's step discarded."""
    name = next((n for n in NAMES if n in ("arm", "expect")), None)
    if name is None:
        pytest.skip("neither arm nor expect is installed")
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    theta = _theta()

    def step():
        _node(est, name, theta)
        with pytest.raises(storch.PlateError, match="already used"):
            _node(est, name, theta)

    _assert_none(*unreachable_after(step), f"{name}, a refused second call")


@pytest.mark.parametrize("shown", [False, True], ids=["recorded", "shown"])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in PATHWISE])
def test_step_that_warned_leaves_no_cycles(name, shown):
    """A sample no cost uses: UnusedSampleWarning, which points at the user's line (storch walks the stack
    to find it). Recorded (``catch_warnings(record=True)``) or shown (formatted with its source line)."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    theta = _theta()
    shown_text: list = []

    def step():
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if shown:
                warnings.showwarning = lambda *a, **k: shown_text.append(warnings.formatwarning(*a[:4]))
            x, _ = _node(est, name, theta)
            storch.add_cost((x ** 2).sum(), name="c")  # not z
            storch.backward()
        seen = shown_text if shown else [str(w.message) for w in rec]
        assert any("upstream of no cost" in s for s in seen), seen
        shown_text.clear()

    _assert_none(*unreachable_after(step), f"{name}, a step that warned ({'shown' if shown else 'recorded'})")


def _compile_options(name: str) -> dict:
    opts = dict(options(name))
    if name == "spsa":
        opts["coupled"] = False  # coupled draws cannot be replayed (storch.compile refuses them)
    return opts


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_leaves_no_cycles(name):
    """``storch.compile(step, backend=None)``, after one eager step (learned control variates build their
    network on first use) and the trace: the replayed steps leave nothing."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **_compile_options(name))
    theta = _theta()

    def loss(th):
        with storch.Graph():
            _, z = _node(est, name, th)
            storch.add_cost(cost(name, z), name="c")
            return storch.surrogate_loss()

    with storch.Graph():
        _, z = _node(est, name, theta)
        storch.add_cost(cost(name, z), name="c")
        storch.backward()
    compiled = storch.compile(loss, backend=None)
    _assert_none(*unreachable_after(lambda: compiled(theta).backward()), f"{name}, compiled")
    assert compiled.traces == 1


def test_step_compiled_by_a_compiler_leaves_no_cycles():
    """One step through a real ``torch.compile`` backend (aot_eager), after its compilation."""
    if "score" not in storch.available_estimators():
        pytest.skip("storch-estimators-score is not installed")
    torch.manual_seed(0)
    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")
    theta = _theta()

    def loss(th):
        with storch.Graph():
            _, z = _node(est, "score", th)
            storch.add_cost(cost("score", z), name="c")
            return storch.surrogate_loss()

    compiled = storch.compile(loss, backend="aot_eager")
    _assert_none(*unreachable_after(lambda: compiled(theta).backward()), "score, compiled with aot_eager")


@pytest.mark.parametrize("name", NAMES)
def test_kit_step_leaves_no_cycles(name):
    """storch.testing's building blocks: R replicates of the parameter, each replicate's derivatives."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    order = 2 if _max_order(name) >= 2 else 1

    def step():
        with storch.Graph():
            leaf, theta = kit.replicate(torch.tensor([0.3, -0.2, 0.5]), 5)
            z = est(distribution(name, theta))
            storch.add_cost(cost(name, z), name="c")
            derivatives = kit.per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)
            assert [tuple(d.shape) for d in derivatives][:1] == [(5, 3)]

    _assert_none(*unreachable_after(step), f"{name}, a step of the kit")


def test_kit_check_leaves_no_cycles():
    """A whole check_against_enumeration (every model of the kit, a statistical run) leaves nothing."""
    name = "score" if "score" in storch.available_estimators() else "reparameterization"

    def check():
        report = kit.check_against_enumeration(name, orders=[1], n_replicates=200, seed=0, raise_on_failure=False)
        assert report.ok, report

    _assert_none(*unreachable_after(check, warmups=1), f"check_against_enumeration({name!r})")


def _hand_written(theta: torch.Tensor) -> torch.Tensor:
    """The score-function surrogate of the roster's Bernoulli step, by hand (for torch.func's own garbage)."""
    d = Bernoulli(logits=theta.expand(4, 3))
    z = d.sample((3,))
    c = ((z - 0.45) ** 2).sum()
    return c + (d.log_prob(z).sum() * c.detach())


@pytest.mark.parametrize("name", NAMES)
def test_step_under_torch_func_grad_adds_no_cycles(name):
    """Under ``torch.func.grad`` (detached primals: a first derivative), a storch step leaves what the
    hand-written step leaves: torch.func's own per-call garbage (its pytree flattening keeps recursive
    closures, ~57 objects with torch 2.13), nothing of storch's."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", **options(name))
    with storch.Graph():  # learned control variates build their network on first use, eagerly
        _, z = _node(est, name, _theta())
        storch.add_cost(cost(name, z), name="c")
        storch.backward()

    def f(th):
        with storch.Graph():
            _, z = _node(est, name, th)
            storch.add_cost(cost(name, z), name="c")
            return storch.surrogate_loss()

    theta = _theta().detach()
    by_hand, _ = unreachable_after(lambda: torch.func.grad(_hand_written)(theta))
    n, kinds = unreachable_after(lambda: torch.func.grad(f)(theta))
    assert n == by_hand, \
        f"{name} under torch.func.grad: {n} unreachable objects, the hand-written step {by_hand}: {kinds}"
