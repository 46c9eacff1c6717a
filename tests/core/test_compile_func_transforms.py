"""torch.func transforms opened inside a compiled step: refused with a message that names the transform.

Found by a reviewer: ``torch.func.vmap(torch.sin)(mu.reshape(1))`` in a step, ``mu`` an argument, was refused as
"reads a tensor of shape (1,) that requires grad but is neither an argument of the step nor an nn.Parameter":
``make_fx(pre_dispatch=True)`` records above functorch, so under the transform it saw vmap's batched wrapper of
``mu`` (no tensor of the program) and baked it, and the transform's result, into the program as constants cut off
from the arguments. Where nothing required grad, the replay check failed with functorch's raw "your tensor may
have escaped from inside a function being vmapped". ``jvp``, ``jacfwd`` and ``hessian`` were refused by the same
misleading check. The backward transforms (``grad``, ``vjp``, ``jacrev``) are refused before that, by the trace's
saved-tensor hooks (tests/models/test_compile.py::test_refusing_torch_func_grad_inside_the_trace_says_what_to_do).
storch's own vmapped plate operations are recorded on their own and are not refused (tests/models/test_compile.py::
test_vmap_treated_functions_compile)."""

import pytest
import torch
from torch.distributions import Normal

import storch
from storch.errors import StorchError

BACKENDS = [None, "inductor"]

TRANSFORMS = {
    "vmap": ("torch.func.vmap", lambda m: torch.func.vmap(torch.sin)(m.reshape(1)).sum()),
    "torch.vmap": ("torch.func.vmap", lambda m: torch.vmap(torch.sin)(m.reshape(1)).sum()),
    "vmap_of_a_constant": ("torch.func.vmap", lambda m: torch.func.vmap(torch.sin)(torch.arange(3.0)).sum() * m),
    "jvp": ("torch.func.jvp", lambda m: torch.func.jvp(torch.sin, (m,), (torch.ones(()),))[1]),
    "jacfwd": ("torch.func.vmap .*jacfwd", lambda m: torch.func.jacfwd(torch.sin)(m)),
    "hessian": ("torch.func.vmap .*hessian", lambda m: torch.func.hessian(torch.sin)(m)),
}


def _step(transform):
    def step(mu):
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
            storch.add_cost((z - transform(mu)) ** 2, name="cost")
            return storch.surrogate_loss()
    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires_grad", [True, False], ids=["mu_requires_grad", "mu_constant"])
@pytest.mark.parametrize("case", list(TRANSFORMS))
def test_a_transform_opened_in_the_step_is_refused_by_name(case, requires_grad, backend):
    named, transform = TRANSFORMS[case]
    step = _step(transform)
    mu = torch.tensor(0.5, requires_grad=requires_grad)
    assert torch.isfinite(step(mu))  # eagerly: fine
    with pytest.raises(StorchError, match=rf"cannot trace \S*step: it calls {named}.* inside the step\..*cut off from "
                                          r"the step's arguments.*run this step eagerly") as info:
        storch.compile(step, backend=backend)(mu)
    assert "neither an argument" not in str(info.value)


# A compiled step called inside a torch.func transform (found by a reviewer): torch.func.grad around its first call
# was refused with the message above, for a transform *inside* the step, and vmap around any call failed in the
# replay check with torch's raw "vmap over torch.allclose isn't supported yet" (both backends; the step runs under
# vmap eagerly). Now refused up front, at the first call and at a replay, saying the transform is around the step.
AROUND = {
    "grad": ("torch.func.grad", lambda f, mu: torch.func.grad(f)(mu)),
    "vmap": ("torch.func.vmap", lambda f, mu: torch.func.vmap(f, randomness="same")(mu.detach().expand(3))),
    "jvp": ("torch.func.jvp", lambda f, mu: torch.func.jvp(f, (mu.detach(),), (torch.ones(()),))),
    "jacrev": ("torch.func.grad .*jacrev", lambda f, mu: torch.func.jacrev(f)(mu)),
}


def _plain_step(mu):
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
        storch.add_cost((z - torch.sin(mu)) ** 2, name="cost")
        return storch.surrogate_loss()


@pytest.fixture(scope="module", params=BACKENDS, ids=["backend_None", "inductor"])
def traced(request):
    """A compiled step traced once outside any transform (at the argument signatures each transform calls it
    with: a 0-dim argument, requiring grad and not): what follows under a transform is a replay."""
    step = storch.compile(_plain_step, backend=request.param)
    step(torch.tensor(0.5))
    step(torch.tensor(0.5, requires_grad=True))
    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(AROUND))
def test_a_transform_around_the_compiled_steps_first_call_is_refused(case, backend):
    named, transform = AROUND[case]
    mu = torch.tensor(0.5)
    step = storch.compile(_plain_step, backend=backend)
    with pytest.raises(StorchError, match=rf"cannot run _plain_step under {named}.*: the transform is around the "
                                          r"compiled step.*Call the step eagerly under the transform.*differentiate "
                                          r"the compiled step's result with torch.autograd outside the transform") as info:
        transform(step, mu)
    assert "inside the step" not in str(info.value)
    assert step.traces == 0  # refused before the trace


@pytest.mark.parametrize("case", list(AROUND))
def test_a_transform_around_a_replayed_call_is_refused(case, traced):
    named, transform = AROUND[case]
    with pytest.raises(StorchError, match=rf"cannot run _plain_step under {named}.*: the transform is around the "
                                          r"compiled step"):
        transform(traced, torch.tensor(0.5))
    assert traced.traces == 2  # nothing traced again
    assert torch.isfinite(traced(torch.tensor(0.5)))  # and outside the transform it still runs


def test_graph_module_under_a_transform_is_refused():
    step = storch.compile(_plain_step, backend=None)

    def program_of(m):
        step.graph_module(m)
        return m

    with pytest.raises(StorchError, match="the transform is around the compiled step"):
        torch.func.vmap(program_of)(torch.ones(3))


def test_a_plain_call_checks_the_level_once_and_builds_no_message(monkeypatch):
    """The check on every call is one C call (torch's functorch level); the interpreter stack is read only to
    name the transform of a refused call."""
    import storch.compiled.step as module

    step = storch.compile(_plain_step, backend=None)
    step(torch.tensor(0.5))
    calls = []
    level = module._functorch_level
    monkeypatch.setattr(module, "_functorch_level", lambda: calls.append(1) or level())
    monkeypatch.setattr(module, "_transform_around_step_message", lambda fn: pytest.fail("message built"))
    for _ in range(3):
        step(torch.tensor(0.5))
    assert len(calls) == 3 and step.traces == 1


def test_what_the_message_advises_gives_the_eager_transforms_gradient():
    """torch.autograd.grad of the compiled step's result, outside the transform: the gradient torch.func.grad of
    the eager step gives, from the same seed (backend=None replays eager's draws)."""
    mu = torch.tensor(0.5)
    torch.manual_seed(3)
    eager = torch.func.grad(_plain_step)(mu)
    step = storch.compile(_plain_step, backend=None)
    m = mu.clone().requires_grad_()
    step(m)  # (the trace: its check runs the step again, so the seed is set for the replay below)
    torch.manual_seed(3)
    (compiled,) = torch.autograd.grad(step(m), m)
    torch.testing.assert_close(compiled, eager)


def _forward_mode_call(step):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(step(fwAD.make_dual(torch.tensor(0.5), torch.tensor(1.0)))).tangent


def test_forward_mode_around_the_compiled_step_is_refused(traced):
    """Review r-45: torch.autograd.forward_ad.dual_level (forward mode without torch.func: no functorch level) around
    a replay passed the check above; with inductor the result came back without the dual argument's tangent
    (unpack_dual(...).tangent None), with no error. Refused at the first call and at a replay, by name."""
    for step in (storch.compile(_plain_step, backend=None), traced):
        before = step.traces
        with pytest.raises(StorchError, match=r"cannot run _plain_step under torch.autograd.forward_ad.dual_level"
                                              r".*the transform is around the compiled step"):
            _forward_mode_call(step)
        assert step.traces == before  # nothing traced
