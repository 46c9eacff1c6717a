"""An estimator call takes the distribution and ``inputs=`` (keyword) only. A positional argument after the
distribution was taken for ``inputs`` (read only by an input-dependent baseline or network), so an observed value
meant as Pyro's ``obs=`` (``est(Normal(0., 1.), x_obs)``) was silently ignored and the node sampled; ``obs=`` gave
Python's bare TypeError. Both are refused with what to write instead (tester p-port2)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch
from storch.estimators.base import Estimator


def _refused(call, match):
    with storch.Graph() as graph:
        with pytest.raises(storch.OptionError, match=match) as info:
            call()
        assert not graph.nodes  # refused before anything is sampled
    message = str(info.value)
    assert "storch.add_cost(-d.log_prob(x_obs)" in message
    return message


@pytest.mark.parametrize("name, dist", [("reparameterization", lambda: Normal(0.0, 1.0)),
                                        ("expect", lambda: Categorical(logits=torch.zeros(3)))])
def test_a_positional_argument_after_the_distribution_is_refused(name, dist):
    est = storch.estimator(name, plate="z")
    message = _refused(lambda: est(dist(), torch.tensor(0.3)), "1 positional argument after the distribution")
    assert f"estimator {name!r} (plate 'z')" in message and "OBSERVED" in message and "est(d, inputs=x)" in message
    _refused(lambda: est(dist(), torch.tensor(0.3), torch.tensor(1.0)), "2 positional arguments")


def test_an_unknown_keyword_is_refused_naming_it():
    est = storch.estimator("reparameterization", plate="z")
    message = _refused(lambda: est(Normal(0.0, 1.0), obs=torch.tensor(0.3)), "keyword obs=")
    assert "takes the distribution and the keyword inputs= only" in message
    _refused(lambda: est(Normal(0.0, 1.0), torch.tensor(0.3), obs=torch.tensor(0.3)), "positional")


def test_a_graph_with_a_generator_refuses_them_too():
    est = storch.estimator("reparameterization", plate="z")
    with storch.Graph(generator=torch.Generator().manual_seed(0)) as graph:
        with pytest.raises(storch.OptionError, match="positional argument"):
            est(Normal(0.0, 1.0), torch.tensor(0.3))
        assert not graph.nodes


def test_inputs_as_a_keyword_is_kept_on_the_node():
    torch.manual_seed(0)
    theta = torch.randn(4, requires_grad=True)
    est = storch.estimator("expect", plate="z")
    with storch.Graph() as graph:
        x = storch.denote_independent(theta, 0, "data")
        est(Bernoulli(logits=x), inputs=x)
        assert graph.nodes[0].inputs is x


class _OwnForward(Estimator):
    """A user's estimator whose forward takes an argument of its own after the distribution."""

    name = "own_forward_test"

    def forward(self, distribution, context=None):  # pyright: ignore[reportIncompatibleMethodOverride]
        self.seen = context
        return super().forward(distribution)


class _InputsForward(Estimator):
    """An overriding forward with the base's parameters (vimco's): a positional argument is inputs, refused."""

    name = "inputs_forward_test"

    def forward(self, distribution, inputs=None):
        return super().forward(distribution, inputs=inputs)


def test_an_overriding_forward_keeps_its_own_signature():
    est = _OwnForward(plate="z")
    with storch.Graph() as graph:
        est(Bernoulli(logits=torch.zeros(2, requires_grad=True)), "ctx")
        assert est.seen == "ctx" and len(graph.nodes) == 1
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="keyword inputs=.*context="):
            est(Bernoulli(logits=torch.zeros(2, requires_grad=True)), inputs=1)
    same = _InputsForward(plate="z")
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="positional argument"):
            same(Bernoulli(logits=torch.zeros(2, requires_grad=True)), torch.tensor(1.0))
    with storch.Graph() as graph:
        x = torch.ones(2)
        same(Bernoulli(logits=torch.zeros(2, requires_grad=True)), inputs=x)
        assert graph.nodes[0].inputs is x


def test_a_forward_set_on_the_instance_or_taking_star_args_reads_its_own_arguments():
    """Review r-25: a forward set on the instance (``est.forward = f``) and a ``forward(self, *args, **kwargs)``
    wrapper take the arguments they declare; neither is refused."""
    est = storch.estimator("reparameterization", plate="z")
    orig = est.forward
    est.forward = lambda d, extra=None: orig(d)
    with storch.Graph():
        assert est(Normal(0.0, 1.0), extra=1).plate_names == ("z",)

    class Wrapped(type(storch.estimator("reparameterization", plate="w"))):
        name = "wrapped_forward_test"

        def forward(self, *args, **kwargs):
            return super().forward(args[0])

    with storch.Graph():
        assert Wrapped(plate="w")(Normal(0.0, 1.0), torch.tensor(0.3), note=2).plate_names == ("w",)
