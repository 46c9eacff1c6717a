"""torch.jit.trace and torch.export are refused with storch's error that points to storch.compile.

A traced module replays the torch operations of one call without storch's Python: it skipped the estimators'
state updates and let a NaN cost's gradient through (eager raises NonFiniteCostError). torch.export failed
inside storch's validation with torch's GuardOnDataDependentSymNode. torch.jit.script fails at compile time on
storch's Python (documented, not checked here)."""

import warnings

import pytest
import torch
from torch.distributions import Normal
from torch.torch_version import TorchVersion

import storch


class _Step(torch.nn.Module):
    """One storch step as a module: a graph block (``block=True``) or the thread's default graph."""

    def __init__(self, block: bool = True, pair: bool = False) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.est = storch.estimator("reparameterization", plate="z", n_samples=4)
        self.block, self.pair = block, pair

    def body(self, x):
        if self.pair:  # one data plate for inputs and targets
            xs, ys = storch.denote_independent((x[..., :2], x[..., 2:]), 0, "data")
        else:
            xs = storch.denote_independent(x, 0, "data")
            xs, ys = xs[..., :2], xs[..., 2:]
        z = self.est(Normal(self.lin(xs), 1.0))
        storch.add_cost(((z - ys) ** 2).sum(), name="c")
        return storch.surrogate_loss()

    def forward(self, x):
        if self.block:
            with storch.Graph():
                return self.body(x)
        try:
            return self.body(x)
        finally:
            storch.reset()


def _trace(m, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation warning
        return torch.jit.trace(m, (x,), check_trace=False)


def _assert_refused(info, tracer):
    text = str(info.value)
    assert tracer in text and "storch.compile(step)" in text, text
    assert "state updates" in text and "NaN cost" in text, text


@pytest.mark.parametrize("block", [True, False], ids=["graph-block", "default-graph"])
def test_jit_trace_refused(block):
    torch.manual_seed(0)
    m, x = _Step(block=block), torch.randn(5, 3)
    with pytest.raises(storch.StorchError) as info:
        _trace(m, x)
    _assert_refused(info, "torch.jit.trace")
    # nothing of the refused call is left in the thread's graph: the eager step runs, and its checks run
    m(x).backward()
    assert m.lin.weight.grad is not None and torch.isfinite(m.lin.weight.grad).all()
    bad = x.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(storch.NonFiniteCostError):
        m(bad).backward()


def test_jit_trace_of_a_bare_estimator_call_refused():
    """The estimator call refuses too (a step with no graph block and no data plate)."""
    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    mu = torch.zeros(3, requires_grad=True)

    def step(mu):
        try:
            return est(Normal(mu, 1.0)).tensor
        finally:
            storch.reset()

    with pytest.raises(storch.StorchError) as info:
        _trace(step, mu)
    _assert_refused(info, "torch.jit.trace")
    assert "estimator 'reparameterization' (plate 'z')" in str(info.value)


def test_jit_trace_of_paired_data_plate_gives_storch_message():
    """``denote_independent((x, y), 0, "data")`` under jit.trace raised a false size mismatch; now the refusal."""
    torch.manual_seed(0)
    m, x = _Step(block=False, pair=True), torch.randn(5, 3)
    with pytest.raises(storch.StorchError) as info:
        _trace(m, x)
    _assert_refused(info, "torch.jit.trace")
    assert "storch.denote_independent (plate 'data')" in str(info.value)
    m(x).backward()  # eagerly the pair is one plate


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_refused(strict):
    torch.manual_seed(0)
    m, x = _Step(), torch.randn(5, 3)
    if strict:
        # strict export runs dynamo, which refuses storch's eager-only entry points itself (torch's Unsupported),
        # with storch's reason from torch 2.8 on (torch 2.7's dynamo ignores a disabled function's message)
        says = "storch.compile" if TorchVersion(torch.__version__) >= "2.8" else "torch.compiler.disable"
        with pytest.raises(Exception, match=says):
            torch.export.export(m, (x,), strict=True)
        return
    with pytest.raises(storch.StorchError) as info:
        torch.export.export(m, (x,), strict=False)
    _assert_refused(info, "torch.export")
    m(x).backward()


def test_eager_and_storch_compile_unaffected():
    """The check is False outside torch's tracers, also while storch.compile traces (make_fx)."""
    torch.manual_seed(0)
    m, x = _Step(), torch.randn(5, 3)
    fast = storch.compile(m.forward, backend=None)
    fast(x).backward()
    fast(x).backward()
    assert torch.isfinite(m.lin.weight.grad).all()


@pytest.mark.parametrize("grad", [True, False])
def test_jit_trace_of_a_function_of_plate_tensors_says_tracing_is_unsupported(grad):
    """torch.jit.trace of a plain function given a plate tensor made in a step (not a storch entry point): torch's
    "Cannot insert a Tensor that requires grad as a constant" (with grad) or storch's "a sparse tensor, a custom
    C++ operator" (without) read as a bug in the user's op; both now say that tracing cannot carry plate tensors
    and point to storch.compile (found by a third-party author, p-ext3)."""
    mu = torch.tensor([0.3, -0.2], requires_grad=grad)
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="x", n_samples=2)(Normal(mu, 1.0))
        if not grad:
            x = x.detach()
        with pytest.raises(storch.PlateError, match=r"ran under torch.jit.trace.*storch.compile\(step\)"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (torch's tracer warnings)
                torch.jit.trace(lambda t: t * 2, (x,))
