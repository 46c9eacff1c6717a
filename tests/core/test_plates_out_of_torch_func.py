"""A plate tensor returned out of a torch.func transform (``torch.func.grad(step, has_aux=True)``'s aux).

torch unwraps the plain tensors of an aux to the level outside the transform, but not the raw tensor a
``PlateTensor`` holds: it kept torch.func's wrapper of the finished transform, so ``repr`` showed
``GradTrackingTensor(lvl=-2, ...)``, and ``torch.save`` / ``pickle`` of the plate tensor or of its ``.tensor``
failed with torch's "Cannot access storage of TensorWrapper". The raw tensor is now the value outside the
transform, as torch gives for a plain aux (task p-func).

A plate tensor among ``torch.func.vmap``'s outputs (storch's samples fed to ``vmap(functional_call)`` over stacked
ensemble members) cannot be carried out: it was refused with the generic "reached a PlateTensor below
__torch_function__: a sparse tensor, a custom C++ operator, ..." message; the refusal now says which case it is and
what works.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch.distributions import Normal
from torch.func import functional_call, stack_module_state, vmap

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


def test_samples_fed_to_a_vmapped_ensemble_are_refused_with_what_works():
    torch.manual_seed(0)
    members = [torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
               for _ in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")
    loc = torch.randn(5, 4, dtype=D)
    with storch.Graph():
        x = storch.denote_independent(loc, 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(x, 1.0))
        with pytest.raises(storch.PlateError, match=r"computed inside a torch.func transform.*among the transform's "
                           r"outputs.*Python loop \(`torch.stack\(\[m\(z\) for m in models\]\)`\)"):
            vmap(lambda p, b, h: functional_call(base, (p, b), (h,)), in_dims=(0, 0, None))(params, buffers, z)
        with pytest.raises(storch.PlateError, match=r"randomness='different' for a sampler that takes the "
                                                    r"parameters.*randomness='same' for one that fills a tensor in "
                                                    r"place \(rsample\(\) of Normal"):
            # (this step's Normal is reparameterized: the advice said randomness='different', which refuses its draw)
            vmap(lambda t: z * t)(torch.ones(2, dtype=D))
        with pytest.raises(storch.PlateError, match=r"among the transform's outputs"):
            vmap(lambda t: z * t)(torch.ones(2, dtype=D))
        looped = torch.stack([m(z) for m in members])  # what works: each member on every entry
        assert [p.name for p in looped.plates] == ["z", "data"]
        raw = z.tensor.detach()
        torch.testing.assert_close(looped.tensor[:, :, 1], members[1](raw))
