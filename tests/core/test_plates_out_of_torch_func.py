"""A plate tensor returned out of a torch.func transform (``torch.func.grad(step, has_aux=True)``'s aux).

torch unwraps the plain tensors of an aux to the level outside the transform, but not the raw tensor a
``PlateTensor`` holds: it kept torch.func's wrapper of the finished transform, so ``repr`` showed
``GradTrackingTensor(lvl=-2, ...)``, and ``torch.save`` / ``pickle`` of the plate tensor or of its ``.tensor``
failed with torch's "Cannot access storage of TensorWrapper". The raw tensor is now the value outside the
transform, as torch gives for a plain aux (task p-func).
"""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributions import Normal

import storch

D = torch.float64


def _step(w):
    def f(loc):
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(loc, 1.0))
            cost = ((z - 1.0) ** 2).sum() * w.sum()
            storch.add_cost(cost, name="c")
            return storch.surrogate_loss(), (z, cost, cost.tensor)
    return f


def test_a_plate_tensor_in_an_aux_holds_the_value_outside_the_transform():
    w = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    torch.manual_seed(0)
    _, (z, cost, plain) = torch.func.grad(_step(w), has_aux=True)(torch.zeros(2, dtype=D))
    for t in (z, cost):
        assert not torch._C._functorch.is_functorch_wrapped_tensor(t.tensor)
        assert "GradTrackingTensor" not in repr(t)
    torch.testing.assert_close(cost.tensor, plain)  # what torch gives for the plain aux
    for t in (z, cost, z.tensor):
        buffer = io.BytesIO()
        torch.save(t, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(getattr(loaded, "tensor", loaded), getattr(t, "tensor", t), check_dtype=True)
    assert [(p.name, p.size) for p in pickle.loads(pickle.dumps(z)).plates] == [("z", 3)]
    # the cost keeps its graph to w outside the transform, as the plain aux does
    (g_plate,) = torch.autograd.grad(cost.tensor.sum(), w, retain_graph=True)
    (g_plain,) = torch.autograd.grad(plain.sum(), w)
    torch.testing.assert_close(g_plate, g_plain)
