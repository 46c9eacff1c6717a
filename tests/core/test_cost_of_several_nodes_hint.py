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


def test_a_forgotten_sum_whose_event_size_is_another_plates_size_gets_the_reduce_advice_first():
    # review r-twenty: x ** 2 of a node with 3 coordinates beside a node of 3 samples matched the other plate's
    # size, and the black-box hint came before the advice that fits (reduce the event dims)
    with storch.Graph():
        x = storch.estimator("reparameterization", plate="x", n_samples=4)(Normal(torch.zeros(3), 1.0))
        storch.estimator("reparameterization", plate="y", n_samples=3)(Normal(torch.tensor(0.1), 1.0))
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(x ** 2, name="f")
        message = str(info.value)
        assert message.index("Reduce its event dims first") < message.index("also have the sizes of the sample plates")


def test_a_plain_per_data_point_weight_is_told_to_go_on_the_data_plate():
    # p-semi: w * c with w a plain (B,) tensor and c on the data plate of size B: the advice was `.sum(-1)` first,
    # which weights every point by w.sum(); it now says to denote w with the data
    x_data = torch.randn(4, 2)
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    with storch.Graph():
        x = storch.denote_independent(x_data, 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(x.sum(-1), 1.0))
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(w * z ** 2, name="rec")
        message = str(info.value)
        assert "the size of its data plate 'data'" in message
        assert message.index("storch.denote_independent((x, w), 0, 'data')") < message.index("reduce its event dims")
