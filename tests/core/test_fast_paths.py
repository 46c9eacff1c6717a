"""The core's fast paths are taken (issue 19; DESIGN.md, "Performance budget").

Speed is measured by ``storch-compare overhead``; these tests only check that the cheap path runs,
so that a change that silently stops taking it fails here instead of showing up months later as
a slower benchmark. Two kinds of evidence, both deterministic:

- the Python functions a call runs (``sys.setprofile``): a fast path does not reach the general
  plate machinery (``union_plates``, ``align``, the vmap fallback); each such test also runs a
  case that must take the general path and checks that the probe sees it there, so a renamed
  function cannot make the test pass vacuously;
- the autograd graph: storch's result has the graph of the same computation written by hand on
  the raw tensors (no extra permute, expand or view nodes).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, MultivariateNormal, Normal, OneHotCategorical

import storch
from path_probes import calls, graph_ops

GENERAL = {"union_plates", "align", "vmap_call", "_to_step"}  # the general plate machinery


def test_pointwise_same_plates_skips_alignment():
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        y = torch.sigmoid(x)
        for fn in (lambda: x + y, lambda: x * 2.0, lambda: torch.tanh(x)):
            fn()  # the first call decides the function's treatment (cached)
            out, seen = calls(fn)
            assert not seen & GENERAL, f"the pointwise fast path was not taken: {sorted(seen & GENERAL)}"
            assert out.plates == x.plates
        # a control: operands with different plates take the general path, and the probe sees it
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(x, 1.0))
        x + z
        _, seen = calls(lambda: x + z)
        assert "union_plates" in seen


def test_linear_and_matmul_are_one_raw_call():
    torch.manual_seed(0)
    theta = torch.randn(5, 3, requires_grad=True)
    lin = torch.nn.Linear(3, 2)
    w = torch.randn(3, 2, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        lin(x), x @ w  # the first calls decide the functions' treatments (cached)
        y, seen = calls(lambda: lin(x))
        assert not seen & GENERAL
        assert graph_ops(y.tensor) == graph_ops(lin(theta))  # addmm on the raw (5, 3), as by hand
        y, seen = calls(lambda: x @ w)
        assert not seen & GENERAL
        assert graph_ops(y.tensor) == graph_ops(theta @ w)


def test_denote_independent_dim_0_adds_no_view():
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        assert x.tensor is theta
        assert storch.denote_independent(theta, 1, "other").tensor.shape == (3, 4)  # moved: a view


def test_unwrap_uses_the_raw_parameters_without_rebuilding():
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        est = storch.estimator("expect", plate="z")
        b = Bernoulli(logits=x)
        _, seen = calls(lambda: est(b))
        raw = storch.current_graph().nodes[0].distribution
        assert raw.logits is x.tensor  # the plate tensor's own raw tensor: no expand, no copy
        assert raw.batch_shape == (4, 3)
        assert "_rebuild" not in seen, "the distribution was rebuilt"
        # the parameters' plates and layout already match: the raw distribution shares them
        loc = torch.tanh(x)
        scale = torch.exp(x)
        d = Normal(loc, scale)
        storch.estimator("reparameterization", plate="r", n_samples=2)(d)
        raw = storch.current_graph().nodes[1].distribution
        assert raw.loc is loc.tensor and raw.scale is scale.tensor
        assert graph_ops(raw.loc) == graph_ops(torch.tanh(theta))


def test_unwrap_falls_back_where_a_copy_would_be_wrong():
    # a plain tensor (to expand over the plates, here the unbatched scale_tril): rebuilt, as before
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        est = storch.estimator("reparameterization", plate="r", n_samples=2)
        _, seen = calls(lambda: est(MultivariateNormal(x, scale_tril=torch.eye(3))))
        raw = storch.current_graph().nodes[0].distribution
        assert "_rebuild" in seen  # the control: the probe sees the rebuild
        assert raw.scale_tril.shape == (4, 3, 3) and raw.batch_shape == (4,)
        q = OneHotCategorical(logits=x)
        storch.estimator("expect", plate="c")(q)
        raw = storch.current_graph().nodes[1].distribution
        assert raw.logits is q.logits.tensor  # torch's categoricals: the normalised logits, no expand


def test_torch_categoricals_on_one_layout_are_unwrapped_without_alignment():
    """OneHotCategorical / Categorical whose logits (and the probs argument validation computed)
    are plate tensors on the same plates at full size: the raw parameters are the plate tensors'
    raw tensors, without union_plates or align (the GRU decoder's tokens, once per step): copied by
    ``_as_raw`` as other torch classes are (a Categorical's category dim counted; a OneHotCategorical holds
    its Categorical's copy), ``_categorical_on_one_layout`` on the general path."""
    from storch.distributions import unwrap_distribution

    torch.manual_seed(0)
    theta = torch.randn(4, 3, 5, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        for cls in (OneHotCategorical, Categorical):
            q = cls(logits=x)
            q.probs  # what argument validation of a OneHotCategorical computes
            for within in ((), x.plates):
                (raw, plates), seen = calls(lambda: unwrap_distribution(q, within))
                assert "_as_raw" in seen and not seen & (GENERAL | {"_categorical_on_one_layout"}), sorted(seen)
                assert plates == x.plates and type(raw) is cls
                assert raw.logits is q.logits.tensor and raw.probs is q.probs.tensor
                assert raw.batch_shape == (4, 3) and raw.event_shape == q.event_shape
                # the same distribution as the general path: its draws' log-probabilities
                v = raw.sample((2,))
                torch.testing.assert_close(raw.log_prob(v), cls(logits=theta).log_prob(v), rtol=0, atol=0)
        # where _as_raw declines (an attribute it does not know: a user's note on the distribution), the
        # general path still takes the one-layout categorical without alignment, the same raw parameters
        for cls in (OneHotCategorical, Categorical):
            q = cls(logits=x)
            (q._categorical if cls is OneHotCategorical else q).note = "a user's attribute"
            (raw, plates), seen = calls(lambda: unwrap_distribution(q))
            assert "_categorical_on_one_layout" in seen and not seen & GENERAL, sorted(seen)
            assert plates == x.plates and type(raw) is cls and raw.logits is q.logits.tensor
        # the control: logits with a size-1 raw dim on the data plate (one value shared by the data
        # points) are expanded by the general path
        q = OneHotCategorical(logits=storch.PlateTensor(torch.randn(1, 3, 5), x.plates))
        (raw, plates), seen = calls(lambda: unwrap_distribution(q))
        assert "union_plates" in seen and "_categorical_on_one_layout" in seen
        assert raw.logits.shape == (4, 3, 5) and torch.equal(raw.logits, q.logits.tensor.expand(4, 3, 5))


def test_later_step_of_a_partition_lines_up_without_reindexing():
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        est = storch.estimator("reparameterization", plate="z", n_samples=2)
        z0 = est(Normal(x, 1.0))
        z1 = est(Normal(z0, 1.0))
        assert z0.plates[0].step == 0 and z1.plates[0].step == 1
        d, seen = calls(lambda: z1 - z0)
        assert not seen & GENERAL, f"the later-step fast path was not taken: {sorted(seen & GENERAL)}"
        assert d.plates == z1.plates
        # one subtraction of the two raw tensors as they are: no re-indexing or view in between
        assert type(d.tensor.grad_fn).__name__ == "SubBackward0"
        assert {g for g, _ in d.tensor.grad_fn.next_functions} == {z1.tensor.grad_fn, z0.tensor.grad_fn}


class _Plain(storch.Estimator):
    """The base class's components (the score function, sampling with replacement), no requirements."""

    name = "plain_score_for_tests"


def test_estimator_call_checks_plates_while_unwrapping():
    # the common call (a distribution of plate tensors with one set of plates, no generator): the
    # raw distribution and the plate check come from one pass (_as_raw, Graph.owns), without the
    # general unwrapping, Graph.check_call's walk over the distribution, or a generator mode
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        d = Bernoulli(logits=x)
        z, seen = calls(lambda: _Plain(plate="z", n_samples=2)(d))
        assert {"_as_raw", "owns", "_sample_node"} <= seen
        assert not seen & {"check_call", "_distribution_plates", "unwrap_distribution", "drawing_with"}
        assert "supports" not in seen  # no requirements: every distribution is supported
        assert z.plates[1:] == x.plates
    # the controls: a plain tensor to expand (the general unwrapping, with check_call) and a graph
    # with a generator (check_call, then the draws in the generator's mode) take the general path
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        _, seen = calls(lambda: storch.estimator("reparameterization", plate="r")(
            MultivariateNormal(x, scale_tril=torch.eye(3))))
        assert {"check_call", "unwrap_distribution", "supports"} <= seen  # needs rsample: asked
    with storch.Graph(generator=torch.Generator().manual_seed(0)):
        x = storch.denote_independent(theta, 0, "data")
        _, seen = calls(lambda: _Plain(plate="z")(Bernoulli(logits=x)))
        assert {"check_call", "drawing_with"} <= seen


def test_stale_plates_still_raise_on_the_lean_estimator_call():
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
    with storch.Graph():
        try:
            _Plain(plate="z")(Bernoulli(logits=x))
        except storch.PlateError as e:
            assert "stale" in str(e)
        else:
            raise AssertionError("a distribution of an ended graph's plate tensors was sampled")


def test_estimator_call_skips_module_call_machinery_without_hooks():
    # the lean call without module hooks: Estimator.__call__ calls forward itself, as nn.Module.__call__'s own
    # fast path would (without _wrapped_call_impl and _call_impl); with a hook on the estimator, or a global
    # module hook, nn.Module.__call__ runs and calls it
    theta = torch.randn(4, 3, requires_grad=True)
    est = _Plain(plate="z", n_samples=2)
    for i in range(2):  # the same samples and log-probabilities either way
        torch.manual_seed(0)
        with storch.Graph():
            x = storch.denote_independent(theta, 0, "data")
            d = Bernoulli(logits=x)
            z, seen = calls(lambda: est(d))
            assert "_storch_forward" in seen and not seen & {"forward", "_call_impl", "_wrapped_call_impl"}
            values = (z.tensor.clone(), storch.current_graph().nodes[0].gradient_values.detach().clone())
    heard = []
    for kind, register in (("hook", est.register_forward_hook), ("pre", est.register_forward_pre_hook),
                           ("global", torch.nn.modules.module.register_module_forward_hook)):
        if kind == "pre":
            handle = register(lambda m, i, kind=kind: heard.append(kind))
        else:
            handle = register(lambda m, i, o, kind=kind: heard.append(kind))
        try:
            torch.manual_seed(0)
            with storch.Graph():
                x = storch.denote_independent(theta, 0, "data")
                d = Bernoulli(logits=x)
                z, seen = calls(lambda: est(d))
                assert "_call_impl" in seen and "forward" in seen
                assert torch.equal(z.tensor, values[0])
                assert torch.equal(storch.current_graph().nodes[0].gradient_values, values[1])
        finally:
            handle.remove()
    assert heard == ["hook", "pre", "global"]  # each ran once
    # a forward set on the instance is what nn.Module.__call__ calls: so is it here
    est.forward = lambda d, *a, **k: heard.append("instance") or type(est).forward(est, d, *a, **k)
    try:
        torch.manual_seed(0)
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
            assert torch.equal(z.tensor, values[0])
    finally:
        del est.forward
    assert heard[-1] == "instance"

    class _OwnHelper(_Plain):  # a subclass's own _forward / _storch_forward is its own business (review r-twentyone)
        def _forward(self, x):
            raise AssertionError("called in place of storch's")

        def _storch_forward(self, x):
            raise AssertionError("called in place of storch's")

    torch.manual_seed(0)
    with storch.Graph():
        z = _OwnHelper(plate="z", n_samples=2)(Bernoulli(logits=storch.denote_independent(theta, 0, "data")))
        assert torch.equal(z.tensor, values[0])


def test_an_overridden_supports_is_still_asked():
    # the shortcut of check_distribution (no requirements: accept) holds for the base supports() only
    class Picky(_Plain):
        name = "picky_for_tests"

        def supports(self, distribution):
            return not isinstance(distribution, Bernoulli)

    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        try:
            Picky(plate="z")(Bernoulli(logits=x))
        except storch.UnsupportedDistributionError:
            pass
        else:
            raise AssertionError("a supports() that refuses Bernoulli was not asked")


def test_bernoulli_log_prob_of_the_raw_distribution_skips_broadcast_all():
    # the gradient function on the raw copy of Bernoulli(logits=x): -bce_with_logits with the logits
    # expanded to the sample's shape, without torch's broadcast_all; the same values and graph
    theta = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        est, d = _Plain(plate="z", n_samples=5), Bernoulli(logits=x)  # (its constructor calls broadcast_all)
        _, seen = calls(lambda: est(d))
        node = storch.current_graph().nodes[0]
        assert "raw_log_prob" in seen and "broadcast_all" not in seen
        assert "get_enum" not in seen  # torch's kernel itself, not F.binary_cross_entropy_with_logits' Python
        by_torch = Bernoulli(logits=theta, validate_args=False).log_prob(node.sample).sum(-1)
        assert torch.equal(node.gradient_values, by_torch)
        assert graph_ops(node.gradient_values) == graph_ops(by_torch)
        # the control: a Bernoulli given by its probabilities takes torch's log_prob, and the probe sees it
        est, d = _Plain(plate="p", n_samples=5), Bernoulli(probs=torch.sigmoid(x))
        _, seen = calls(lambda: est(d))
        assert "raw_log_prob" in seen and "broadcast_all" in seen and "get_enum" in seen


def test_plain_table_indexed_by_a_plate_tensor_is_one_raw_index():
    # a tabular policy or an embedding: table[s] with s sampled (plates), indexed directly as by
    # hand, without aranges over the plates and an expanded copy of the table (forward and backward)
    torch.manual_seed(0)
    table = torch.randn(5, 3, requires_grad=True)
    with storch.Graph():
        # (the core's own estimator: the core test env has no storch_score)
        s = storch.estimator("expect", plate="s")(torch.distributions.Categorical(logits=torch.zeros(5)))
        a = storch.estimator("expect", plate="a")(torch.distributions.Categorical(logits=torch.zeros(3)))
        table[s], table[s, a]  # the first calls decide the treatment (cached)
        for fn, by_hand in ((lambda: table[s], lambda: table[s.tensor]),
                            (lambda: table[s, a], lambda: table[s.tensor.unsqueeze(1), a.tensor.unsqueeze(0)])):
            out, seen = calls(fn)
            # _arange, not torch's arange: the aranges over the plates are cached per shape (an earlier test's
            # index of the same shape made them), so only the helper's call shows the general path
            assert "_arange" not in seen and "_full" not in seen, "the plain table was expanded over the plates"
            assert graph_ops(out.tensor) == graph_ops(by_hand()) and torch.equal(out.tensor, by_hand())
        assert [p.name for p in table[s, a].plates] == ["s", "a"]
        # the control: a slice first puts torch's block of the raw index in place, so the general
        # path (aranges over the plates) runs, and the probe sees it
        _, seen = calls(lambda: table[:, a])
        assert "_arange" in seen


class _PlainSequence(_Plain):
    """:class:`_Plain` called once per step: a partition (a policy over an episode)."""

    name = "plain_sequence_for_tests"
    supports_partitions = True


def test_partition_step_on_the_partitions_plates_skips_the_general_unwrapping():
    # a policy step whose parameters are computed from the last step (plate tensors on exactly the
    # partition's plates): the raw copy and the plate check in one pass (_as_raw, Graph.owns), without
    # Graph.check_call, the general unwrapping or the topological-order walk over the parents, and
    # its gradient function is torch's Bernoulli kernel without broadcast_all
    theta = torch.randn(3, requires_grad=True)
    est = _PlainSequence(plate="episode", n_samples=4)
    with storch.Graph():
        a0 = est(Bernoulli(logits=theta[0]))
        d = Bernoulli(logits=theta[1] + theta[2] * a0)
        torch.manual_seed(3)
        a1, seen = calls(lambda: est(d))
        assert {"_as_raw", "owns", "_extend_partition", "raw_sample", "raw_log_prob"} <= seen
        assert not seen & {"check_call", "_distribution_plates", "unwrap_distribution", "node_of", "broadcast_all",
                           "_extended_shape", "_components_step"}  # (torch's Bernoulli.sample)
        node = storch.current_graph().nodes[0]
        assert a1.plates == node.plates and a1.plates[0].step == 1
        # the plates the next step is matched against: those of the value, the same tuple (tensors
        # computed from the value carry it, so _as_raw compares them by identity)
        assert node.step_log[-1][0] is a1.plates and (a1 * 2.0).plates is a1.plates
        # the same draws, values and autograd graph as by hand on the raw logits
        logits = theta[1] + theta[2] * a0.tensor
        torch.manual_seed(3)
        assert torch.equal(a1.tensor, Bernoulli(logits=logits).sample())
        by_torch = Bernoulli(logits=logits, validate_args=False).log_prob(a1.tensor)
        l1 = node.step_log[1][1]
        assert torch.equal(l1, by_torch) and graph_ops(l1) == graph_ops(by_torch)
        # the controls: a step of plain tensors (expanded to the partition's plates) and a step on a
        # new data plate take the general path (check_call, unwrap_distribution, the parents' walk)
        _, seen = calls(lambda: est(Bernoulli(logits=theta[0])))
        assert {"check_call", "unwrap_distribution"} <= seen
        x = storch.denote_independent(theta, 0, "data")
        a3, seen = calls(lambda: est(Bernoulli(logits=x + node.value)))
        assert {"check_call", "unwrap_distribution", "node_of"} <= seen
        assert [p.name for p in a3.plates] == ["episode", "data"]
        # the control of the draw: a Normal step is drawn by torch's own sample
        _, seen = calls(lambda: est(Normal(a3, 1.0)))
        assert {"raw_sample", "_extended_shape"} <= seen


def test_stacked_step_costs_ask_the_estimator_once_per_node():
    # one cost per step of an episode: whether the partition's costs may be stacked is a property of
    # the node and its estimator, asked once per surrogate, not once per cost
    asked = Counter()

    class Counting(_PlainSequence):
        name = "counting_sequence_for_tests"

        def control_variate_stacks(self) -> bool:
            asked["stacks"] += 1
            return super().control_variate_stacks()

    theta = torch.randn(2, requires_grad=True)
    est = Counting(plate="episode", n_samples=3)
    with storch.Graph():
        a = est(Bernoulli(logits=theta[0]))
        for t in range(6):
            storch.add_cost(a * 1.0, name=f"c{t}")
            a = est(Bernoulli(logits=theta[1] * a))
        asked.clear()
        storch.surrogate_loss()
        assert asked["stacks"] == 1


def test_raw_bernoulli_draw_is_torchs_draw():
    # raw_sample (a partition step's draw): torch.bernoulli of the probabilities, as torch's
    # Bernoulli.sample, with the same random numbers; a graph's generator still drives it
    from storch.distributions import raw_sample

    logits = torch.randn(6, 2, requires_grad=True)
    for kw in ({"logits": logits}, {"probs": torch.sigmoid(logits)}):
        torch.manual_seed(4)
        x = raw_sample(Bernoulli(**kw, validate_args=False))
        torch.manual_seed(4)
        y = Bernoulli(**kw, validate_args=False).sample()
        assert torch.equal(x, y) and not x.requires_grad
    est = _PlainSequence(plate="g", n_samples=3)
    state, draws = torch.get_rng_state(), []
    for _ in range(2):
        with storch.Graph(generator=torch.Generator().manual_seed(7)):
            a = est(Bernoulli(logits=logits[0]))
            draws.append(est(Bernoulli(logits=logits[1] * a)).tensor)
    assert torch.equal(draws[0], draws[1]) and torch.equal(torch.get_rng_state(), state)


def test_reparameterization_partition_step_keeps_its_own_step_gradient_function():
    # the built-in pathwise estimator makes its later steps with the base class's extend and its own
    # step_gradient_function (l_t = 0, one draw per prefix), not with the components' path that an
    # estimator overriding only components gets (its proposal drawn for every prefix, then the diagonal)
    theta = torch.randn(2, requires_grad=True)
    est = storch.estimator("reparameterization", plate="walk", n_samples=3)
    with storch.Graph():
        x = est(Normal(theta[0], 1.0))
        _, seen = calls(lambda: est(Normal(x, theta[1].exp())))
    assert {"extend", "draw", "step_gradient_function"} <= seen
    assert not seen & {"_components_step", "proposal", "gradient_function", "output"}


def test_first_draw_of_a_raw_bernoulli_is_torchs_draw_without_its_python():
    # Estimator.proposal (score's first call; here the base class's components: the core env has no storch_score): torch.bernoulli of the probabilities expanded to (N, *batch), as
    # torch's Bernoulli.sample((N,)) draws it (the same random numbers), without its lazy probs and shape helpers
    theta = torch.randn(2, 3, requires_grad=True)
    for kw in ({"logits": theta}, {"probs": torch.sigmoid(theta)}):
        est = _Plain(plate="z", n_samples=5)
        with storch.Graph():
            x = storch.denote_independent(kw["logits" if "logits" in kw else "probs"], 0, "data")
            d = Bernoulli(**{next(iter(kw)): x})
            torch.manual_seed(11)
            z, seen = calls(lambda: est(d))
            assert "raw_sample" in seen and "_extended_shape" not in seen
            torch.manual_seed(11)
            by_torch = Bernoulli(**kw).sample((5,))
            assert torch.equal(z.tensor, by_torch) and not z.tensor.requires_grad
            assert z.plates[0].size == 5 and tuple(z.shape) == (3,)
    # the control: a Normal is drawn by torch's own sample (its shape helper runs)
    est = _Plain(plate="n", n_samples=5)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        _, seen = calls(lambda: est(Normal(x, 1.0)))
        assert {"raw_sample", "_extended_shape"} <= seen
    # a graph's generator still drives the lean draw, and the global generator is left alone
    state, draws = torch.get_rng_state(), []
    for _ in range(2):
        est = _Plain(plate="z", n_samples=4)
        with storch.Graph(generator=torch.Generator().manual_seed(5)):
            draws.append(est(Bernoulli(logits=storch.denote_independent(theta, 0, "data"))).tensor)
    assert torch.equal(draws[0], draws[1]) and torch.equal(torch.get_rng_state(), state)


def test_inputs_on_the_distributions_plates_are_accepted_without_comparing_names():
    # check_inputs: inputs on exactly the distribution's plates (NVIL's x) pass with one tuple comparison; inputs on
    # some of them are compared by name (the control), and inputs on another plate are still refused
    theta = torch.randn(2, 3, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        d = Bernoulli(logits=x)
        _, seen = calls(lambda: _Plain(plate="z", n_samples=2)(d, inputs=x))
        assert "check_inputs" in seen and "<setcomp>" not in seen
        z = storch.current_graph().nodes[0].value
        _, seen = calls(lambda: _Plain(plate="y", n_samples=2)(Bernoulli(logits=x + z), inputs=x))
        assert {"check_inputs", "<setcomp>"} <= seen
        other = storch.denote_independent(torch.randn(4), 0, "other")
        with pytest.raises(storch.PlateError, match="inputs have plates \\['other'\\]"):
            _Plain(plate="w", n_samples=2)(d, inputs=other)


def _pathwise_chain(m, validate, score=None):
    """m reparameterization nodes in a chain, each its own plate, a cost per layer (tanh of the sample); node
    ``score`` (an index) a score-function node on a Bernoulli instead (the base class's components: the core env
    has no storch_score)."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4) for _ in range(m)]
    ests = [_Plain(plate=f"z{i}", n_samples=2) if i == score else
            storch.estimator("reparameterization", plate=f"z{i}", n_samples=2) for i in range(m)]
    data = torch.randn(3, 4)

    def step():
        with storch.Graph():
            h = storch.denote_independent(data, 0, "data")
            for i, layer in enumerate(layers):
                if i == score:
                    h = ests[i](Bernoulli(logits=layer(h), validate_args=validate))
                else:
                    h = torch.tanh(ests[i](Normal(layer(h), 1.0, validate_args=validate)))
                storch.add_cost((h ** 2).mean(), name=f"c{i}")
            return storch.surrogate_loss()
    return layers, step


def test_many_pathwise_nodes_walk_the_frames_once_per_comparison(monkeypatch):
    """A comparison of a value carrying the plates of 12 pathwise nodes (Normal's argument validation, scale > 0)
    asks each node's watch; whether torch.distributions made it is found once per comparison (one walk of the
    frames), not once per watch (~M² walks a step: half the step's time at M 50). A user's comparison is still
    recorded on the node whose sample it reaches."""
    from storch.estimators.watch import compared
    from storch.plates import dispatch

    walks = []
    real = dispatch.distributions_caller
    monkeypatch.setattr(dispatch, "distributions_caller", lambda frame: walks.append(1) or real(frame))
    calls = []
    made = dispatch.Caller
    monkeypatch.setattr(dispatch, "Caller", lambda: calls.append(1) or made())
    _, step = _pathwise_chain(12, True)
    step()
    assert calls and len(walks) <= len(calls)  # at most one walk per watched call (each asked by up to 12 watches)
    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    with storch.Graph() as g:
        z = est(Normal(torch.zeros(3, requires_grad=True), 1.0))
        storch.add_cost(torch.where(z > 0, z, 0.0).sum())
        assert compared(g.nodes[0]) == "gt"


def test_pathwise_nodes_are_passive_in_each_costs_term_and_asked_once(monkeypatch):
    """M pathwise nodes, a cost each: a node with uniform weights, no control variate and a constant gradient
    function adds only the mean over its plate to a cost's term, decided once per node in a surrogate (not for
    each (cost, node): M²/2); the loss and its gradient are bitwise those of the full loop (a score node in the
    middle of the chain keeps its L and baseline)."""
    from storch.surrogate import running_sums, terms

    m = 8
    layers, step = _pathwise_chain(m, False, score=4)
    asked = []
    real = terms._passive
    for module in (running_sums, terms):  # (asked by the running sums' settle and by the cost's term)
        monkeypatch.setattr(module, "_passive", lambda node: asked.append(node) or real(node))
    torch.manual_seed(1)
    loss = step()
    grads = torch.autograd.grad(loss, [layers[0].weight, layers[-1].weight])
    assert len(asked) == m and len({id(n) for n in asked}) == m
    assert [real(n) for n in asked] == [i != 4 for i in range(m)]
    for module in (running_sums, terms):  # every node through the general loop
        monkeypatch.setattr(module, "_passive", lambda node: False)
    torch.manual_seed(1)
    loss_all = step()
    assert torch.equal(loss, loss_all)
    for a, b in zip(grads, torch.autograd.grad(loss_all, [layers[0].weight, layers[-1].weight])):
        assert torch.equal(a, b)


def test_pointwise_with_a_number_or_the_same_plates_is_one_raw_call():
    # the toy's cost ((z - 0.45) ** 2) and torch.distributions' argument validation (`value == value`, on every
    # distribution built from plate tensors): the dispatcher computes them itself, without the pointwise rule's
    # calls (broadcast, wrap_same), and gives what the rule gives: the raw call's values and autograd graph
    torch.manual_seed(0)
    theta = torch.randn(1, 3, requires_grad=True)
    rule = {"broadcast", "wrap_same"} | GENERAL
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(x, 1.0))
        raw = z.tensor
        cases = ((lambda: z - 0.45, lambda: raw - 0.45), (lambda: z ** 2, lambda: raw ** 2),
                 (lambda: 2 * z, lambda: 2 * raw), (lambda: 0.5 - z, lambda: 0.5 - raw),
                 (lambda: z * z, lambda: raw * raw), (lambda: x == x, lambda: theta == theta),
                 (lambda: x > 0.1, lambda: theta > 0.1))
        for fn, by_hand in cases:
            fn()  # the first call decides the function's treatment (cached)
            out, seen = calls(fn)
            assert not seen & rule, f"the dispatcher's short path was not taken: {sorted(seen & rule)}"
            expected = by_hand()
            assert type(out) is storch.PlateTensor and out.plates == (x.plates if expected.shape[0] == 1 else z.plates)
            assert torch.equal(out.tensor, expected) and out.dtype == expected.dtype
            assert graph_ops(out.tensor) == graph_ops(expected)
        # controls: other plates, a bool, a plain tensor, a keyword take the pointwise rule, and the probe sees it
        for fn in (lambda: x + z, lambda: z * True, lambda: z - torch.ones(3), lambda: torch.sub(z, 0.45, alpha=2),
                   lambda: x == z):
            fn()
            _, seen = calls(fn)
            assert "broadcast" in seen


def test_a_cost_on_a_sample_plate_skips_the_constant_cost_check():
    # the toy's cost: a score-function node's samples need no grad, nor does the cost, but it carries the node's
    # plate (first among its plates): no constant, so add_cost does not call the warning's check
    theta = torch.zeros(2, 3)
    with storch.Graph():
        x = storch.denote_independent(theta, 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(x, 1.0))
        cost = (z ** 2).sum(-1)
        assert not cost.requires_grad and not cost.plates[0].independent
        _, seen = calls(lambda: storch.add_cost(cost, name="c"))
        assert "_warn_constant" not in seen
        # a control: a cost on the data plate alone that needs no grad is a constant: checked, and warned of
        with pytest.warns(storch.ConstantCostWarning):
            _, seen = calls(lambda: storch.add_cost(x.sum(-1), name="d"))
        assert "_warn_constant" in seen
