"""A cost that carries a node's sample plate must carry every plate of that node's samples (docs/plates.md, "A cost
that mixes data points"). A data plate (or an upstream node's sample plate) reduced by hand, ``.tensor.sum(i)``
wrapped back with ``storch.PlateTensor``, used to be accepted by add_cost and fail inside the surrogate with a
PlateError naming neither the cost nor the node (p-nested); it is refused at add_cost, and the advice (the per-entry
cost scaled by the plate's size) is exact."""

import pytest
import torch
from torch.distributions import Normal

import storch

X = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9]], dtype=torch.float64)  # (time, batch): 3 x 2


def _nested(a):
    x = storch.denote_independent(storch.denote_independent(X, 0, "batch"), 0, "time")
    return x, storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(a + x, 1.0))


def _without(t, name):
    i = t.plate_names.index(name)
    return storch.PlateTensor(t.tensor.sum(i), tuple(p for p in t.plates if p.name != name))


def test_a_cost_reduced_over_a_data_plate_by_hand_is_refused_at_add_cost():
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        x, z = _nested(a)
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(_without((z - x) ** 2, "time"), name="c")
    msg = str(info.value)
    for part in ("cost 'c'", "node 'z'", "data plate ['time']", "('z', 'time', 'batch')", "size * cost",
                 "nested data plates", "per-sample dim"):
        assert part in msg, (part, msg)


def test_a_cost_reduced_over_an_upstream_sample_plate_by_hand_is_refused_at_add_cost():
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        z1 = storch.estimator("reparameterization", plate="z1", n_samples=2)(Normal(a, 1.0))
        z2 = storch.estimator("reparameterization", plate="z2", n_samples=3)(Normal(z1, 1.0))
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(_without((z2 - 1) ** 2, "z1"), name="c")
    msg = str(info.value)
    for part in ("cost 'c'", "node 'z2'", "sample plate 'z1' (of node 'z1')", "vimco"):
        assert part in msg, (part, msg)


def test_costs_that_carry_every_plate_of_their_nodes_are_accepted():
    a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        x, z = _nested(a)
        storch.add_cost((z - x) ** 2, name="per_entry")
        storch.add_cost((a * x) ** 2, name="data_alone")  # no sample plate: nothing to check
        storch.add_cost(_without((z - x) ** 2, "time"), name="plain", credit=False)  # differentiated as written
        (g,) = torch.autograd.grad(storch.surrogate_loss(), a)
    assert torch.isfinite(g)


def test_the_per_entry_cost_scaled_by_the_plate_size_is_the_summed_objective():
    """The refusal's advice: for the sum over the time plate, T * the per-entry cost. E[(z - x)^2] = a^2 + 1 per
    entry, so d/da of mean_batch sum_time E[...] = 2 a T; a z-test over R independent gradients."""
    T, R = X.shape[0], 400
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = []
    for r in range(R):
        torch.manual_seed(r)
        with storch.Graph():
            x, z = _nested(a)
            storch.add_cost(T * (z - x) ** 2, name="c")
            out.append(torch.autograd.grad(storch.surrogate_loss(), a)[0])
    g = torch.stack(out)
    exact = 2 * a.detach() * T
    zscore = (g.mean() - exact) / (g.std() / R ** 0.5)
    assert abs(zscore) < 4, (g.mean().item(), exact.item(), zscore.item())
    assert g.std() > 0
