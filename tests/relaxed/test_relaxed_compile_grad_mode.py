"""storch.compile of GO on a Binomial (tests/core/test_compile_grad_mode.py has the cause): ``Binomial.sample``'s
no_grad inside storch's own was recorded grad-enabled on torch 2.7 and 2.8, and the replay's backward failed
("derivative for aten::binomial is not implemented"). On torch 2.13 it fails so on the old code only with the
trace run as those torch versions run it (tests/old_trace.py), as the first call here is."""

import torch
from torch.distributions import Binomial

import storch
from old_trace import RecordsWithoutSwitching

F64 = torch.float64


def test_go_on_a_binomial_compiles_and_its_gradient_is_unbiased():
    """GO on a Binomial, compiled: the replays' gradients of E[k^2] = n p (1 - p) + (n p)^2 in the logits match the
    closed form (z-test over independent replays, each averaging its own draws)."""
    torch.manual_seed(0)
    n = torch.tensor([3.0, 5.0], dtype=F64)
    est = storch.estimator("go", plate="k", n_samples=16)

    def step(logits):
        with storch.Graph():
            k = est(Binomial(n, logits=logits))
            storch.add_cost((k ** 2).sum(-1))
            return storch.surrogate_loss()

    logits = torch.tensor([0.3, -0.5], dtype=F64, requires_grad=True)
    compiled = storch.compile(step, backend=None)
    with RecordsWithoutSwitching():  # (the trace as torch 2.7 and 2.8 run it)
        first = compiled(logits)
    grads = torch.stack([torch.autograd.grad(first, logits)[0]]
                        + [torch.autograd.grad(compiled(logits), logits)[0] for _ in range(399)])
    p = torch.sigmoid(logits.detach())
    exact = (n * (1 - 2 * p) + 2 * n ** 2 * p) * p * (1 - p)  # d/dp E[k^2] times dp/dlogit
    z = (grads.mean(0) - exact) / (grads.std(0) / len(grads) ** 0.5)
    assert z.abs().max() < 4, (grads.mean(0), exact, z)
