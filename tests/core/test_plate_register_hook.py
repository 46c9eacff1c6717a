"""``Tensor.register_hook`` on plate tensors (found by porting, p-torch): it failed with "cannot register a hook on
a tensor that doesn't require gradient" (the vmap treatment ran it on a per-entry slice), although docs/plates.md and
the full-backward-hook refusal recommend it. The hook is now registered on the raw tensor; it receives the gradient
as a plate tensor (per-sample shape, the tensor's plates; ``g.tensor`` is the raw gradient, plate dims first), what
it returns replaces the gradient as in torch, and torch's handle removes it."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

import storch


def _step(enc, dec, data, hook=None, seed=0):
    """One reparameterized step; returns the flat gradient of (enc, dec) and the hook's handle."""
    torch.manual_seed(seed)
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    x = storch.denote_independent(data, 0, "data")
    h = enc(x)
    handle = h.register_hook(hook) if hook is not None else None
    z = est(Normal(h, 1.0))
    storch.add_cost(((dec(z) - x) ** 2).sum(), name="rec")
    storch.backward()
    params = [*enc.parameters(), *dec.parameters()]
    g = torch.cat([p.grad.reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return g, handle


def test_register_hook_sees_the_gradient_and_its_return_replaces_it():
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
    data = torch.randn(2, 4)
    n_enc = sum(p.numel() for p in enc.parameters())
    g0, _ = _step(enc, dec, data)
    seen = []

    def keep(g):
        seen.append(g)

    g1, handle = _step(enc, dec, data, keep)
    assert torch.equal(g0, g1)
    assert isinstance(handle, torch.utils.hooks.RemovableHandle)
    (g,) = seen
    assert type(g) is storch.PlateTensor and g.shape == (3,)
    assert g.plate_names == ("data",) and g.tensor.shape == (2, 3)
    # the values: the gradient of the surrogate in h, enc's weight gradient is its outer product with the data
    torch.testing.assert_close(g.tensor.t() @ data, g0[:12].reshape(3, 4))
    g2, _ = _step(enc, dec, data, lambda g: g * 0)
    assert g2[:n_enc].abs().max() == 0  # the encoder gets no gradient
    torch.testing.assert_close(g2[n_enc:], g0[n_enc:])  # the decoder's is unchanged
    g3, _ = _step(enc, dec, data, lambda g: g.tensor * 2)  # a raw gradient (plate dims first)
    torch.testing.assert_close(g3[:n_enc], 2 * g0[:n_enc])
    g4, _ = _step(enc, dec, data, lambda g: torch.ones(3))  # plain: the same for every plate entry
    torch.testing.assert_close(g4[:12].reshape(3, 4), torch.ones(3, 1) * data.sum(0))


def test_a_removed_hook_is_not_called():
    torch.manual_seed(1)
    enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
    data = torch.randn(2, 4)
    g0, _ = _step(enc, dec, data)
    calls = []
    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    x = storch.denote_independent(data, 0, "data")
    h = enc(x)
    handle = h.register_hook(lambda g: calls.append(1) or g * 0)
    handle.remove()
    z = est(Normal(h, 1.0))
    storch.add_cost(((dec(z) - x) ** 2).sum(), name="rec")
    storch.backward()
    g = torch.cat([p.grad.reshape(-1) for p in [*enc.parameters(), *dec.parameters()]])
    assert calls == []
    torch.testing.assert_close(g, g0)


def test_a_hook_returning_a_wrong_shape_is_refused():
    enc = torch.nn.Linear(4, 3)
    x = storch.denote_independent(torch.randn(2, 4), 0, "data")
    h = enc(x)
    h.register_hook(lambda g: torch.ones(5))
    storch.add_cost((h ** 2).sum(), name="c")
    with pytest.raises(storch.PlateError, match=r"per-sample shape \(5,\).*\(3,\)"):
        storch.backward()
    storch.reset()


def test_a_hook_on_a_broadcast_plate_dim_is_refused_and_the_expanded_tensor_gets_each_entrys_gradient():
    """A plate tensor whose raw tensor has size 1 along a plate of more entries (``storch.PlateTensor(p[None],
    x.plates)``, allowed for broadcasting) handed its hook the gradient summed over the entries as every entry's
    ((5.5, 5.5, 5.5) for both data points, found by review), so per-sample clipping in the hook clipped the sum.
    Refused now, saying to expand first; the expanded tensor's hook receives each entry's gradient (the cost's mean
    over the data points: x_i / 2) and per-entry clipping gives the sum of the clipped rows."""
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    data = torch.tensor([[1.0, 1.0, 1.0], [10.0, 10.0, 10.0]])
    x = storch.denote_independent(data, 0, "data")
    h = storch.PlateTensor(p[None], x.plates)
    with pytest.raises(storch.PlateError, match=r"size 1 along plate 'data' of 2 entries.*sum over the entries.*"
                       r"t = t.expand_as\(x\)"):
        h.register_hook(lambda g: g)
    storch.reset()
    for expand in (lambda h, x: h.expand_as(x), lambda h, x: h + 0 * x):
        seen = []
        x = storch.denote_independent(data, 0, "data")
        h = expand(storch.PlateTensor(p[None], x.plates), x)
        h.register_hook(lambda g: seen.append(g.tensor.clone()) or g / torch.clamp(
            torch.linalg.vector_norm(g), min=1.0))
        storch.add_cost((h * x).sum(), name="c")
        storch.backward()
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], data / 2)
        rows = data / 2
        torch.testing.assert_close(p.grad, (rows / rows.norm(dim=1, keepdim=True).clamp(min=1.0)).sum(0))
        p.grad = None
