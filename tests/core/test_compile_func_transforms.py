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


# Forward mode opened *inside* the step without torch.func (`with torch.autograd.forward_ad.dual_level(): make_dual
# ... unpack_dual`): the trace recorded make_dual and unpack_dual at the level's index but not the level itself, so
# the replay check ran them at a level that no longer existed and torch raised its raw "Trying to access a forward
# AD level with an invalid index" (both backends, at every call: nothing was cached). Now refused by name, before
# anything is traced, with the fix.
def _tangent_of_sin(mu):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(mu.detach(), torch.ones_like(mu))
        return fwAD.unpack_dual(torch.sin(dual)).tangent  # cos(mu)


def _dual_in_cost(mu, forward_mode=True):
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
        target = _tangent_of_sin(mu) if forward_mode else torch.cos(mu)
        storch.add_cost((z - target) ** 2, name="cost")
        return storch.surrogate_loss()


def _dual_returned(mu):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # the tangent of mu * sin(mu) along 1, differentiable in mu: sin(mu) + mu * cos(mu)
        return fwAD.unpack_dual(mu * torch.sin(fwAD.make_dual(mu, torch.ones_like(mu)))).tangent


DUAL_STEPS = {"tangent_in_a_cost": _dual_in_cost, "tangent_returned": _dual_returned}
_DUAL_REFUSAL = (r"cannot trace _dual_\w+: it opens torch.autograd.forward_ad.dual_level inside the step.*Compute that "
                 r"derivative outside the compiled step.*or run this step eagerly")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DUAL_STEPS))
def test_a_dual_level_opened_in_the_step_is_refused_by_name(case, backend):
    step = DUAL_STEPS[case]
    mu = torch.tensor(0.5, requires_grad=True)
    assert torch.isfinite(step(mu))  # eagerly: fine
    compiled = storch.compile(step, backend=backend)
    for _ in range(2):  # at the first call, and again at the next (nothing was kept)
        with pytest.raises(StorchError, match=_DUAL_REFUSAL):
            compiled(mu)
        assert compiled.traces == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dual_level_on_a_new_path_of_a_traced_step_is_refused(backend):
    """A step traced on a path without forward mode replays; the path that opens a dual level (another value of a
    Python argument: a new trace) is refused, and the traced path still replays."""
    compiled = storch.compile(_dual_in_cost, backend=backend)
    mu = torch.tensor(0.5, requires_grad=True)
    assert torch.isfinite(compiled(mu, False))
    with pytest.raises(StorchError, match=_DUAL_REFUSAL):
        compiled(mu, True)
    assert compiled.traces == 1
    assert torch.isfinite(compiled(mu, False)) and compiled.traces == 1


def test_a_jvp_opened_in_the_step_is_still_named_as_torch_func():
    """torch.func.jvp opens a dual level too: its refusal names torch.func.jvp, as before."""
    with pytest.raises(StorchError, match=r"it calls torch.func.jvp"):
        storch.compile(_step(TRANSFORMS["jvp"][1]), backend=None)(torch.tensor(0.5))


# A vectorized Jacobian of a compiled step (torch.autograd.functional.jacobian(..., vectorize=True), its
# is_grads_batched backward pass, or torch.func.vmap over torch.autograd.grad): the forward runs outside vmap, the
# backward under it. With inductor the compiled backward failed on the batched gradients with torch's raw "Cannot
# access data pointer of Tensor that doesn't have storage". Now refused by name at that backward pass (the first
# call's and a replay's); backend=None replays the traced operations through autograd, which vmap batches: the
# Jacobian is eager's (pinned below).
def _vector_step(mu):
    with storch.Graph():
        m = storch.denote_independent(mu, 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(m, 1.0))
        storch.add_cost((z - torch.sin(m)) ** 2, name="cost")
        return storch.surrogate_loss()


def _jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x, vectorize=True)


def _grads_batched(f, x):
    x = x.clone().requires_grad_()
    loss = f(x)
    return torch.autograd.grad(loss, x, torch.ones(3, *loss.shape), is_grads_batched=True)[0]


def _vmapped_grad(f, x):
    x = x.clone().requires_grad_()
    loss = f(x)
    return torch.func.vmap(lambda v: torch.autograd.grad(loss, x, v, retain_graph=True)[0])(torch.ones(3))


BATCHED = {"jacobian_vectorize": _jacobian, "is_grads_batched": _grads_batched, "func_vmap": _vmapped_grad}


@pytest.mark.parametrize("case", list(BATCHED))
def test_a_batched_backward_through_an_inductor_program_is_refused(case):
    batched = BATCHED[case]
    x = torch.tensor([0.5, 1.0, 2.0])
    compiled = storch.compile(_vector_step)
    for _ in range(2):  # the first call (traced in it) and a replay
        with pytest.raises(StorchError, match=r"_vector_step, compiled by storch.compile with inductor, is "
                                              r"differentiated with batched gradients.*Pass vectorize=False.*"
                                              r"backend=None"):
            batched(compiled, x)
        assert compiled.traces == 1
    torch.manual_seed(4)
    eager = torch.autograd.functional.jacobian(_vector_step, x)
    torch.manual_seed(4)  # what the message advises: a backward pass per row, the eager Jacobian
    torch.testing.assert_close(torch.autograd.functional.jacobian(compiled, x, vectorize=False), eager)


@pytest.mark.parametrize("case", list(BATCHED))
def test_a_batched_backward_with_backend_none_gives_the_eager_result(case):
    batched = BATCHED[case]
    x = torch.tensor([0.5, 1.0, 2.0])
    compiled = storch.compile(_vector_step, backend=None)
    compiled(x.clone().requires_grad_())  # the trace (its check runs the step again: the seed is set after it)
    torch.manual_seed(5)
    eager = batched(_vector_step, x)
    torch.manual_seed(5)
    torch.testing.assert_close(batched(compiled, x), eager)
    assert compiled.traces == 1
