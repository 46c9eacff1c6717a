"""storch.compile records the step's grad-mode switches as the eager step makes them.

Found when the suites ran on torch 2.7 and 2.8: their ``make_fx(pre_dispatch=True)`` records ``torch._C._set_grad_enabled``
without switching, so the trace ran with grad enabled throughout and each ``no_grad`` exit recorded the mode it read
then. A ``no_grad`` block nested in another (``Binomial.sample``'s inside storch's own sampling) left the rest of the outer
block recorded as grad-enabled: a value the step holds constant was differentiated (a silently wrong gradient), and
GO on a Binomial failed at the replay's backward ("derivative for aten::binomial is not implemented"). storch's
trace mode now switches too, as torch 2.9 and later do. On torch 2.13 the first test passes on the old code as well; on
torch 2.7.1 and 2.8.0 it fails there (by a gradient 3.3 times the exact one; the GO test by torch's RuntimeError). The
second runs the trace as those torch versions run it (tests/old_trace.py: a mode below the trace's that does not
make the switch), so it
fails on the old code on the pinned torch too. The third: a ``torch.inference_mode()`` block, which no torch records
in a trace, is refused. The GO test is in
tests/relaxed/test_relaxed_compile_grad_mode.py (GO is in the relaxed family).
"""

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from old_trace import RecordsWithoutSwitching

F64 = torch.float64


def _nested_no_grad_step(est, inner=torch.no_grad):
    def step(theta):
        with storch.Graph():  # (a step of its own: the thread's default graph is left as it was)
            z = est(Bernoulli(logits=theta)).to(theta.dtype)
            with torch.no_grad():
                with inner():
                    pass
                w = theta.exp()
            storch.add_cost((w * z).sum())
            return storch.surrogate_loss()
    return step


def _exact(theta):
    s = torch.sigmoid(theta.detach())
    return theta.detach().exp() * s * (1 - s)


def test_a_value_computed_under_nested_no_grad_is_a_constant_in_the_compiled_gradient():
    """``expect`` enumerates the Bernoulli, so the gradient is exact: w = exp(theta) is held constant by the outer
    ``no_grad`` (after an inner one closes), d/dtheta E[w z] = w sigmoid'(theta), as eagerly. Differentiating
    through w would add exp(theta) sigmoid(theta)."""
    step = _nested_no_grad_step(storch.estimator("expect", plate="z"))
    theta = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    exact = _exact(theta)
    compiled = storch.compile(step, backend=None)
    for _ in range(2):  # the trace's first call, then a replay
        torch.testing.assert_close(torch.autograd.grad(compiled(theta), theta)[0], exact)
    torch.testing.assert_close(torch.autograd.grad(step(theta), theta)[0], exact)
    assert torch.is_grad_enabled()
    assert not storch.current_graph().nodes  # (the eager call left no step in the default graph)



def test_the_trace_makes_the_switches_where_the_pre_dispatch_trace_only_records_them():
    """The test above, with the trace run as torch 2.7 and 2.8 run it (their pre-dispatch mode records each switch
    without making it), so that it fails without storch's own switch on the pinned torch too: the old trace_mode.py
    gave 1.1054, 0.1233 here (3.3 times the exact gradient), the first call and every replay."""
    theta = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    compiled = storch.compile(_nested_no_grad_step(storch.estimator("expect", plate="z")), backend=None)
    with RecordsWithoutSwitching():
        first = torch.autograd.grad(compiled(theta), theta)[0]  # the trace, then the replay check
    assert compiled.traces == 1
    torch.testing.assert_close(first, _exact(theta))
    torch.testing.assert_close(torch.autograd.grad(compiled(theta), theta)[0], _exact(theta))
    assert torch.is_grad_enabled()


def test_inference_mode_inside_a_compiled_step_is_refused_and_no_grad_as_advised_is_exact():
    """torch.inference_mode() is no torch function: the trace does not record it, and the replayed calls ran its
    block with gradients enabled (a silently wrong gradient: 1.1054, 0.1233 for the exact 0.3300, 0.0536, on the
    old trace_mode.py). Refused; torch.no_grad(), as the message advises, is recorded and exact; a compiled step
    called under inference_mode (evaluation) is fine."""
    est = storch.estimator("expect", plate="z")

    def step(theta):
        with storch.Graph():
            z = est(Bernoulli(logits=theta)).to(theta.dtype)
            with torch.inference_mode():
                w = theta.exp()
            storch.add_cost((w.clone() * z).sum())
            return storch.surrogate_loss()

    theta = torch.tensor([0.3, -1.2], dtype=F64, requires_grad=True)
    torch.testing.assert_close(torch.autograd.grad(step(theta), theta)[0], _exact(theta))  # (eagerly right)
    with pytest.raises(storch.StorchError, match=r"under torch.inference_mode\(\).*Use torch.no_grad\(\) inside"):
        storch.compile(step, backend=None)(theta)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    advised = storch.compile(_nested_no_grad_step(est, inner=torch.enable_grad), backend=None)
    for _ in range(2):
        torch.testing.assert_close(torch.autograd.grad(advised(theta), theta)[0], _exact(theta))
    with torch.inference_mode():
        loss = advised(theta)
    assert not loss.requires_grad and advised.traces == 2  # (a trace of its own, under inference mode)
