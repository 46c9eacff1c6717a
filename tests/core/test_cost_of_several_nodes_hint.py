"""A black-box cost of two nodes wrapped on one node's plates (p-bbopt): its extra leading dims are the other
node's plate, and the refusal says to wrap it on the plates of a tensor that holds both nodes (not to reduce
its event dims, which would cut the other node's credit)."""

import pytest
import torch
from torch.distributions import Normal

import storch


def test_a_cost_of_two_nodes_wrapped_on_one_nodes_plates_is_told_how_to_wrap_it():
    torch.manual_seed(0)
    a = torch.tensor(0.5)  # constants: a detached cost of a pathwise node is refused otherwise
    b = torch.tensor(0.1)
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="x", n_samples=4)(Normal(a, 1.0))
        y = storch.estimator("reparameterization", plate="y", n_samples=3)(Normal(b, 1.0))
        c = (torch.stack([x, y], -1).tensor.detach() ** 2).sum(-1)  # (4, 3): plates (x, y)
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(storch.PlateTensor(c, x.plates), name="f")
        message = str(info.value)
        assert "sample plates ('y',), which its plates ('x',) lack" in message
        assert "storch.PlateTensor(c, s.plates)" in message and "torch.stack([x, y])" in message
        # the recipe it points to works: the cost wrapped on the plates of the stack
        s = torch.stack([x, y])
        assert s.plate_names[:2] == ("x", "y")
        storch.add_cost(storch.PlateTensor(c, s.plates), name="f")  # accepted


def test_a_cost_with_event_dims_of_no_plates_size_keeps_the_plain_advice():
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="x", n_samples=4)(Normal(torch.tensor(0.5), 1.0))
        c = torch.zeros(4, 5)
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(storch.PlateTensor(c, x.plates), name="f")
        assert "lack" not in str(info.value) and "Reduce its event dims first" in str(info.value)
