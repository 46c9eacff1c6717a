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
