"""The graph context: isolation, resets, errors for bad input, credit assignment by plates."""

import copy
import fractions
import pickle
import re
import threading
import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, ContinuousBernoulli, Normal, OneHotCategorical

import storch


def test_plate_name_reused_is_an_error():
    est1 = storch.estimator("expect", plate="z")
    est2 = storch.estimator("expect", plate="z")
    with storch.Graph():
        storch.denote_independent(torch.zeros(3, 2), 0, "data")
        with pytest.raises(storch.PlateError, match="'data' is already used"):
            storch.denote_independent(torch.zeros(3, 2), 0, "data")
        est1(Bernoulli(logits=torch.zeros(())))
        with pytest.raises(storch.PlateError, match="'z' is already used"):
            est2(Bernoulli(logits=torch.zeros(())))


def _denote_x_then_y():
    x, y = torch.zeros(3, 2), torch.zeros(3)
    storch.denote_independent(x, 0, "data")
    storch.denote_independent(y, 0, "data")  # the second tensor of the same data points, in a second call


@pytest.mark.parametrize("default", [True, False])
def test_data_plate_name_reused_says_to_denote_the_tensors_in_one_call(default):
    """The message said "give each ... data plate its own name": two names pair every x with every y
    (docs/plates.md). It now gives the documented one-call form first, and the case of a new step second
    (storch does not record where the calls came from: a stack walk per denote_independent cost ~4 us)."""
    storch.reset()
    with pytest.raises(storch.PlateError) as info:
        if default:
            _denote_x_then_y()
        else:
            with storch.Graph():
                _denote_x_then_y()
    msg = str(info.value)
    assert re.search(r"pass them in ONE call: `x, y = storch\.denote_independent\(\(x, y\), 0, 'data'\)` pairs "
                     r"x\[i\] with y\[i\]\. ", msg), msg
    # a tensor of the same data points that exists only later: the documented wrap (tester p-port2)
    assert "`y = storch.PlateTensor(raw_y, x.plates)`" in msg and "Give another name only to a genuinely" in msg, msg
    assert "its own name" not in msg and re.search(r"If this call begins a new step", msg), msg
    assert not storch.current_graph().plates  # the default graph's step was discarded (the block's too)


def test_the_wrap_the_reused_name_message_gives_pairs_the_later_tensor_with_the_plate():
    """The form the message names, `storch.PlateTensor(raw_y, x.plates)`, puts a tensor computed later on the data
    plate: entry i of it meets entry i of x (no new plate)."""
    torch.manual_seed(0)
    raw_x, raw_y = torch.randn(4, 3), torch.randn(4)
    with storch.Graph() as graph:
        x = storch.denote_independent(raw_x, 0, "data")
        y = storch.PlateTensor(raw_y, x.plates)
        both = x.sum(-1) * y
        assert both.plates == x.plates and list(graph.plates) == ["data"]
        assert torch.equal(both.tensor, raw_x.sum(-1) * raw_y)


def test_a_new_step_after_surrogate_loss_backward_says_the_step_was_not_ended():
    """surrogate_loss().backward() in the default graph, no storch.reset(): the next step's first claim
    said "if an exception interrupted the previous step", which none did."""
    storch.reset()
    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("expect", plate="z")

    def step():
        x = storch.denote_independent(torch.ones(4, 3), 0, "data")
        z = est(Bernoulli(logits=x * theta))
        storch.add_cost((z - 0.5).pow(2).sum())
        storch.surrogate_loss().backward()

    step()
    with pytest.raises(storch.PlateError) as info:
        step()
    msg = str(info.value)
    assert re.search(r"built its surrogate loss \(storch\.surrogate_loss\(\)\) and was never ended.*Call "
                     r"storch\.backward\(\) instead.*or storch\.reset\(\) after loss\.backward\(\), or build each "
                     r"step inside `with storch\.Graph\(\):`", msg), msg
    assert "exception" not in msg, msg
    step()  # the unfinished step was discarded: the next one runs
    storch.reset()


def test_the_same_denote_call_again_after_a_user_exception_says_the_step_was_interrupted():
    storch.reset()
    refused = []
    for i in range(3):
        try:
            storch.denote_independent(torch.zeros(3, 2), 0, "data")
            if i == 0:
                raise ValueError("the user's model code failed")
        except ValueError:
            pass
        except storch.PlateError as e:
            refused.append(i)
            assert re.search(r"If this call begins a new step.*never ended \(an exception in your code "
                             r"interrupted it.*storch\.reset\(\) after catching", str(e)), str(e)
    storch.reset()
    with storch.Graph(), pytest.raises(storch.PlateError, match=r"new step \(a loop inside the block\), enter a new "
                                                                r"`with storch\.Graph\(\):` block for each step"):
        for _ in range(2):  # the loop inside the block: one step
            storch.denote_independent(torch.zeros(3, 2), 0, "data")


def test_cost_with_event_shape_is_an_error():
    est = storch.estimator("expect", plate="z")
    with storch.Graph():
        z = est(Bernoulli(logits=torch.zeros(3)))
        with pytest.raises(storch.CostError, match=r"per-sample shape \(3,\).*sum\(-1\)"):
            storch.add_cost(z * 2.0)
        with pytest.raises(storch.CostError, match="floating point"):
            storch.add_cost(z.sum().long())


def test_empty_data_plate_is_an_error_not_a_nan_loss():
    """A batch of 0 data points made the surrogate a mean over nothing (NaN), reported as a non-finite
    surrogate "although every cost is" finite; denote_independent now says what is wrong."""
    theta = torch.zeros(0, 3, requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"plate 'data' would hold 0 data points.*Skip empty batches"):
            storch.denote_independent(theta, 0, "data")
        with pytest.raises(storch.PlateError, match="0 data points"):
            storch.denote_independent((theta, torch.zeros(0)), 0, "batch")
        # a batch split into labelled and unlabelled points: skip the empty branch, not the whole step
        with pytest.raises(storch.PlateError, match=r"sub-batches \(labelled and unlabelled.*skip that sub-batch"):
            storch.denote_independent(theta, 0, "labelled")
    with storch.Graph():  # the step was discarded; a non-empty batch works
        x = storch.denote_independent(torch.zeros(2, 3), 0, "data")
        assert x.plates[0].size == 2


def test_surrogate_without_costs_is_an_error():
    with storch.Graph(), pytest.raises(storch.StorchError, match="add_cost"):
        storch.surrogate_loss()


def test_exception_inside_a_graph_leaves_the_next_one_clean():
    est = storch.estimator("expect", plate="z")
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="boom"):
        with storch.Graph() as g:
            est(Bernoulli(logits=theta))
            raise RuntimeError("boom")
    assert not g.nodes and not g.plates
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        storch.add_cost(z.sum())
        assert storch.surrogate_loss().item() == pytest.approx(1.0)


def test_backward_resets_the_default_graph_even_after_an_error():
    est = storch.estimator("expect", plate="z")
    theta = torch.zeros(2, requires_grad=True)
    z = est(Bernoulli(logits=theta))
    storch.add_cost(z.sum())
    value = storch.backward()
    assert value.item() == pytest.approx(1.0) and theta.grad is not None
    assert not storch.current_graph().nodes
    est(Bernoulli(logits=theta))  # the same plate name works again: the graph was reset
    with pytest.raises(storch.StorchError):
        storch.backward()  # no costs
    assert not storch.current_graph().nodes
    storch.reset()


def test_each_thread_has_its_own_default_graph():
    est = storch.estimator("expect", plate="z")
    theta = torch.zeros(2, requires_grad=True)
    errors = []

    def work():
        try:
            for _ in range(20):
                z = est(Bernoulli(logits=theta))
                storch.add_cost(z.sum())
                storch.backward()
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []


def test_a_copied_or_unpickled_graph_guards_its_own_step_and_is_open_in_no_block():
    """Graph() makes its step guard when first asked (issue 19); a copy (copy.copy, copy.deepcopy, pickle) then
    carried the original's guard: the copy's guard discarded the original default graph's step, and pickling
    failed (a weak reference) only once a guard had been asked for. A copy made inside the original's `with` block
    is not open in it either: it can be entered from another thread, and leaving it leaves the original open."""
    default = storch.current_graph()
    assert default.is_default
    default.guard()  # (asked: the guard is made)
    est = storch.estimator("expect", plate="z")
    for make in (copy.copy, copy.deepcopy, lambda g: pickle.loads(pickle.dumps(g))):
        twin = make(default)
        assert twin.guard().graph is twin
        est(Bernoulli(logits=torch.zeros(2)))  # a step in the original default graph
        with pytest.raises(RuntimeError):
            with twin.guard():
                raise RuntimeError("in the copy's step")
        if make is not copy.copy:  # (a shallow copy shares the lists of the step: its reset clears them)
            assert len(default.nodes) == 1  # the copy's error discarded the copy's step, not the original's
        storch.reset()
    g = storch.Graph(generator=torch.Generator().manual_seed(0))
    with g:
        twins = [copy.copy(g), copy.deepcopy(g), pickle.loads(pickle.dumps(g))]
        entered = []

        def enter(twin):
            with twin:
                entered.append(storch.current_graph() is twin)

        for twin in twins:
            t = threading.Thread(target=enter, args=(twin,))
            t.start()
            t.join()
        assert entered == [True] * 3
        refused = []

        def enter_original():
            try:
                with g:
                    pass
            except storch.StorchError as e:
                refused.append(str(e))

        t = threading.Thread(target=enter_original)
        t.start()
        t.join()
        assert len(refused) == 1 and "open in another thread" in refused[0], refused  # the original is still open
        assert storch.current_graph() is g


def test_credit_assignment_by_plate_membership():
    """A cost that does not depend on a node gets no gradient through that node's estimator."""
    torch.manual_seed(0)
    a = torch.tensor(0.3, requires_grad=True)
    b = torch.tensor(-0.2, requires_grad=True)
    with storch.Graph():
        za = storch.estimator("reparameterization", plate="za", n_samples=3)(Normal(a, 1.0))
        zb = storch.estimator("expect", plate="zb")(Bernoulli(logits=b))
        storch.add_cost(za ** 2, name="only_a")
        storch.add_cost(zb * 2.0, name="only_b")
        loss = storch.surrogate_loss()
        ga, gb = torch.autograd.grad(loss, (a, b))
    s = torch.sigmoid(b).item()
    assert gb.item() == pytest.approx(2 * s * (1 - s))
    assert ga.item() == pytest.approx((2 * za.tensor).mean().item())


def test_estimator_reused_across_graphs_keeps_no_graph_state():
    est = storch.estimator("expect", plate="z")
    for _ in range(3):
        with storch.Graph():
            z = est(OneHotCategorical(logits=torch.zeros(4)))
            storch.add_cost(z[0])
            assert storch.surrogate_loss().item() == pytest.approx(0.25)


def test_unsupported_distribution_message_names_alternatives():
    est = storch.estimator("reparameterization", plate="z")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as e:
        est(Bernoulli(logits=torch.zeros(1)))
    assert "Bernoulli" in str(e.value) and "expect" in str(e.value)


def test_order_must_be_a_nonnegative_int():
    with storch.Graph():
        storch.add_cost(torch.tensor(1.0, requires_grad=True))
        with pytest.raises(storch.StorchError, match="order"):
            storch.surrogate_loss(order=-1)
        assert storch.surrogate_loss(order=0).item() == 1.0


@pytest.mark.parametrize("case", ["jump", "kink", "order-1 estimator"])
def test_the_order_0_surrogate_is_the_value_alone(case):
    # surrogate_loss(order=0) had the order-1 surrogate's grad_fn but none of its guards: a gradient through
    # round(z) came back 0 (exact 1), a Hessian through a ReLU 1 (exact 1.39), an order-1 estimator's Hessian
    # without OrderError. It is the estimate of E[cost], detached: a derivative of it is torch's error
    class OrderOne(storch.Estimator):  # the base class's score function, declared unbiased at order 1 (as ARM)
        name = "test_order_one_score"
        max_order = 1

    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    cost = {"jump": torch.round, "kink": lambda z: torch.relu(z) + z ** 2 / 2,
            "order-1 estimator": lambda z: (z - 0.45) ** 2}[case]
    if case == "order-1 estimator":
        est, dist = OrderOne(plate="z", n_samples=100), Bernoulli(logits=theta)
    else:
        est, dist = storch.estimator("reparameterization", plate="z", n_samples=100), Normal(theta, 1.0)
    torch.manual_seed(0)
    with storch.Graph():
        z = est(dist)
        storch.add_cost(cost(z).sum(), name="c")
        value = storch.surrogate_loss(order=0)
        assert value.grad_fn is None and not value.requires_grad
        torch.testing.assert_close(value, storch.cost_estimates()["c"])
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(value, theta)
        if case != "jump":  # the order-1 surrogate of the same step: its value, and its refusal of a Hessian
            loss = storch.surrogate_loss()
            torch.testing.assert_close(value, loss.detach())
            with pytest.raises(storch.OrderError):
                torch.autograd.grad(loss, theta, create_graph=True)


def test_plate_tensors_hidden_in_a_base_distribution_are_an_error_not_shared_noise():
    from torch.distributions import LogNormal, RelaxedBernoulli, TransformedDistribution
    from torch.distributions.transforms import ExpTransform

    torch.manual_seed(0)
    est = storch.estimator("reparameterization", plate="x", n_samples=3)
    with storch.Graph():
        mu = storch.denote_independent(torch.zeros(4), 0, "data")
        with pytest.raises(storch.UnsupportedDistributionError, match="temperature"):
            est(RelaxedBernoulli(mu.abs() + 0.5, logits=torch.zeros(())))  # a temperature outside arg_constraints
        x = est(LogNormal(mu, 1.0))  # parameters in arg_constraints: unwrapped, independent draws
        assert [p.name for p in x.plates] == ["x", "data"]
        assert x.tensor.shape == (3, 4) and x.tensor.unique().numel() == 12
    with storch.Graph():
        mu = storch.denote_independent(torch.zeros(4), 0, "data")
        y = est(TransformedDistribution(Normal(mu, 1.0), [ExpTransform()]))  # the base is unwrapped too
        assert [p.name for p in y.plates] == ["x", "data"]
        assert y.tensor.shape == (3, 4) and y.tensor.unique().numel() == 12


def test_replayed_update_protocol_defaults_say_what_is_missing():
    """An estimator that sets ``replays_update`` (and ``update_uses_loss_graph``) but leaves out
    ``update_inputs``, ``update_from`` or ``loss_graph_values`` got a NotImplementedError only at its first
    update, after the step's backward pass (found by a reviewer). It is refused when the class is registered or
    first instantiated (a class attribute), or when an instance sets the flag for its options, with a
    StorchError that names the methods to add."""

    class Partial(storch.Estimator):
        name = "partial_update"
        has_update = True
        replays_update = True
        update_uses_loss_graph = True

        def update_from(self, inputs):
            raise AssertionError("never reached: the inputs could not be made")

    class WithInputs(Partial):
        name = "partial_update_inputs"

        def update_inputs(self, nodes):
            return {}

    class NoFrom(storch.Estimator):
        name = "partial_update_no_from"
        has_update = True
        replays_update = True

        def update_inputs(self, nodes):
            return {}

    class PerInstance(storch.Estimator):  # replays_update from an option, as score and gumbel_softmax set it
        name = "partial_update_per_instance"

        def __init__(self, plate, n_samples=1, replay=False):
            super().__init__(plate, n_samples)
            self.has_update = self.replays_update = replay

        def update_parameters(self, nodes, loss):
            pass

    for cls, missing in ((Partial, r"update_inputs\(nodes\)"), (WithInputs, r"loss_graph_values\(loss, inputs\)"),
                         (NoFrom, r"update_from\(inputs\)"), (PerInstance, r"update_inputs\(nodes\) and "
                                                                            r"update_from\(inputs\)")):
        with pytest.raises(storch.StorchError, match=rf"{cls.__qualname__} \({cls.name}\) has replays_update = True "
                                                     rf"but does not implement {missing}.*leave replays_update False"):
            cls("z", 2, **({"replay": True} if cls is PerInstance else {}))
    theta = torch.zeros(2, requires_grad=True)
    with storch.Graph():  # the flag off: a plain estimator
        z = PerInstance("z", 2)(Bernoulli(logits=theta))
        storch.add_cost(z.sum(), name="c")
        storch.backward()


class _NoGradScoreFunction(storch.Estimator):
    """The base class's components: the plain score function (storch-core alone)."""

    name = "test_core_graph_score_function"
    supports_partitions = True


_NO_GRAD_NODES = {  # estimator, distribution from theta
    "score": (lambda: _NoGradScoreFunction(plate="a", n_samples=4), lambda t: Categorical(logits=t)),
    "expect": (lambda: storch.estimator("expect", plate="a"), lambda t: Categorical(logits=t)),
    "reparameterization": (lambda: storch.estimator("reparameterization", plate="a", n_samples=4),
                           lambda t: Normal(t, 1.0)),
}


@pytest.mark.parametrize("kind", sorted(_NO_GRAD_NODES))
def test_a_node_sampled_under_no_grad_in_a_training_step_is_refused(kind):
    # `with torch.no_grad(): a = est(pi)` (a habit from plain RL code) computed the node's gradient
    # function without grad: its score term was silently lost, and with another cost that keeps the
    # loss differentiable (an entropy bonus) the gradient was that cost's alone
    make, dist = _NO_GRAD_NODES[kind]
    theta = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 2.0])
    with storch.Graph():
        pi = dist(theta)
        with torch.no_grad():
            a = make()(pi)
        storch.add_cost(-reward[a] if kind != "reparameterization" else a.sum(-1) ** 2, name="r")
        # (Normal(t, 1.0)'s entropy is a constant, which add_cost refuses: a term that keeps the loss differentiable)
        bonus = -0.1 * pi.entropy().sum() if kind != "reparameterization" else 0.01 * (theta ** 2).sum()
        storch.add_cost(bonus, name="entropy")
        with pytest.raises(storch.StorchError, match=r"node 'a' .* sampled under torch.no_grad\(\).*outside the no_grad"):
            storch.surrogate_loss()
        with pytest.raises(storch.StorchError, match=r"sampled under torch.no_grad\(\)"):
            storch.backward()
    assert theta.grad is None


def test_a_partition_step_sampled_under_no_grad_is_refused():
    theta = torch.tensor([0.2, -0.3], requires_grad=True)
    est = _NoGradScoreFunction(plate="a", n_samples=3)
    with storch.Graph():
        x = est(Bernoulli(logits=theta[0]))
        step = Bernoulli(logits=theta[1] + x)  # built with grad, sampled without
        with torch.no_grad():
            x = est(step)
        storch.add_cost(x, name="r")
        with pytest.raises(storch.StorchError, match=r"node 'a' .*no_grad\(\).*\(step 1 of its partition\)"):
            storch.surrogate_loss()


def test_no_grad_evaluation_and_nodes_without_costs_are_fine():
    theta = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 2.0])
    est = storch.estimator("expect", plate="a")
    exact = -(torch.softmax(theta, 0) * reward).sum().item()
    with storch.Graph(), torch.no_grad():  # an evaluation step: everything under no_grad
        a = est(Categorical(logits=theta))
        storch.add_cost(-reward[a], name="r")
        assert storch.cost_estimates()["r"].item() == pytest.approx(exact)
        assert storch.surrogate_loss().item() == pytest.approx(exact)
    with storch.Graph():  # values of a no_grad node, read with grad on: no gradient asked for
        with torch.no_grad():
            a = est(Categorical(logits=theta))
        storch.add_cost(-reward[a], name="r")
        assert storch.cost_estimates()["r"].item() == pytest.approx(exact)
    with storch.Graph():  # a node without costs sampled under no_grad: the documented way to not train it
        with torch.no_grad():
            storch.estimator("expect", plate="b")(Bernoulli(logits=theta[0]))
        a = est(Categorical(logits=theta))
        storch.add_cost(-reward[a], name="r")
        storch.backward()
    assert theta.grad is not None


def test_a_credit_false_loss_on_a_no_grad_node_is_fine():
    """Model-based RL: actions of a policy (built outside the block) sampled under no_grad, a world model
    trained on them with add_cost(..., credit=False), which is differentiated as written (no score term):
    nothing of the node's is lost, so not refused; the model gets its gradient, the policy none (as
    when the actions are sampled with grad)."""
    theta = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)
    w = torch.tensor([0.5, 1.0, -1.0], requires_grad=True)
    est = storch.estimator("expect", plate="a")
    pi = Categorical(logits=theta)
    with storch.Graph():
        with torch.no_grad():
            a = est(pi)
        storch.add_cost((w[a] - 1.0) ** 2, name="model", credit=False)
        storch.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0 and theta.grad is None


def test_no_gradient_error_names_no_grad_sampling():
    # a distribution built inside the no_grad block holds no parameter that requires grad: the
    # surrogate cannot tell it from detached parameters, but backward's error names the block
    theta = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)
    reward = torch.tensor([1.0, 0.0, 2.0])
    with storch.Graph():
        with torch.no_grad():
            a = storch.estimator("expect", plate="a")(Categorical(logits=theta))
        storch.add_cost(-reward[a], name="r")
        with pytest.raises(storch.StorchError, match=r"no tensor that requires grad.*\['a'\] were sampled under "
                                                     r"torch.no_grad\(\)"):
            storch.backward()


# -- the components' result shapes (docs/writing-an-estimator.md, section 1) ----------------------------


class _UnsummedScore(storch.Estimator):
    """BUG: l = per-entry log p (distribution.log_prob, not node.log_prob): shape (N, 3), not (N,)."""

    name = "test_core_unsummed_score"

    def gradient_function(self, node):
        return node.distribution.log_prob(node.sample)


class _NoSampleDim(storch.Estimator):
    """BUG: a proposal without the sample dim (distribution.sample() instead of sample((n,)))."""

    name = "test_core_no_sample_dim"

    def proposal(self, node):
        return node.distribution.sample()


@pytest.mark.parametrize("n", [3, 4])
def test_a_gradient_function_not_summed_over_the_nodes_own_dims_is_refused(n):
    """With N equal to the node's 3 own dims the (N, 3) result was silently taken for (N, *parents) and
    broadcast (a gradient z of 80 against enumeration); with N = 4 torch raised a bare broadcasting error."""
    th = torch.tensor([0.3, -0.6, 0.9], requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.StorchError, match=r"gradient_function returned a tensor of shape \(%d, 3\).*"
                           r"\(%d,\).*node.log_prob" % (n, n)):
            _UnsummedScore("z", n_samples=n)(Bernoulli(logits=th))


def test_a_proposal_without_the_sample_dim_is_refused():
    """The node's first own batch dim became the plate (size 3, n_samples=2 ignored) without a word."""
    th = torch.tensor([0.3, -0.6, 0.9], requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.StorchError, match=r"proposal returned samples of shape \(3,\).*\(N, 3, \.\.\.\)"
                           r".*sample\(\(self.n_samples,\)\)"):
            _NoSampleDim("z", n_samples=2)(Bernoulli(logits=th))


def test_broadcastable_component_results_are_accepted():
    """What the docs allow: a gradient function of shape (1,) (pathwise), weights with fewer dims, size-1 dims."""

    class Broadcasting(storch.Estimator):
        name = "test_core_broadcasting"

        def gradient_function(self, node):
            return node.log_prob(node.sample)[:, :1]  # (N, 1) for (N, data): broadcast along the data plate

        def weighting_function(self, node):
            return torch.full((node.n,), 1.0 / node.n)  # (N,): padded to (N, 1)

        @property
        def uniform_weights(self):
            return False

    th = torch.zeros(5, requires_grad=True)
    with storch.Graph():
        logits = storch.denote_independent(th, 0, "data")
        z = Broadcasting("z", n_samples=2)(Bernoulli(logits=logits))
        storch.add_cost(z)
        g, = torch.autograd.grad(storch.surrogate_loss(), th)
    assert g.shape == (5,)


# -- baseline, control_variate and output: laid out like the cost frame / the sample ----------------------
# (found by a third-party author: they were not checked; a wrong shape failed in torch.lerp inside the
# surrogate, and one that broadcasts, (2, *frame) or (*frame, 1), widened the cost's estimate: a wrong value
# under weighted plates, and a crash or wrong frame for the nodes upstream)


def _constant_baseline(shape_of):
    class ConstantBaseline(storch.Estimator):
        """Score function with a constant baseline 0.5, laid out by ``shape_of(frame shape)``."""

        name = "test_core_constant_baseline"
        supports_partitions = True

        def baseline(self, node, cost):
            return torch.full(shape_of(tuple(cost.tensor.shape)), 0.5, dtype=cost.tensor.dtype)

    return ConstantBaseline


def _constant_control_variate(shape_of):
    class ConstantControlVariate(storch.Estimator):
        """A constant control variate 0.5 laid out by ``shape_of(frame shape)`` (it shifts the value: the
        tests compare its layouts, not its bias)."""

        name = "test_core_constant_control_variate"
        supports_partitions = True

        def control_variate(self, node, cost):
            return torch.full(shape_of(tuple(cost.tensor.shape)), 0.5, dtype=cost.tensor.dtype)

        def control_variate_stacks(self):
            return True  # it reads cost.tensor's shape only: the costs of a partition's steps stack

    return ConstantControlVariate


def _run_model(model, cls):
    """The graphs in which the surrogate calls a node's baseline / control variate: one node with a data
    plate (the hand-written DiCE surrogate), the node below a parent (the innermost node's baseline term),
    the node above a child (its control variate in the general surrogate), a partition whose per-step
    costs are stacked. Returns the loss and the gradient."""
    th = torch.tensor([0.3, -0.6, 0.9], requires_grad=True)
    torch.manual_seed(0)
    with storch.Graph():
        if model == "one_node":
            data = storch.denote_independent(torch.tensor([0.1, 0.5, 0.9, 0.2]), 0, "data")
            x = cls("z", 3)(Bernoulli(logits=th + 0 * data))
            storch.add_cost(((x - data) ** 2).sum())
        elif model == "below_a_parent":
            k = storch.estimator("expect", plate="k")(Categorical(logits=th))
            x = cls("z", 3)(Bernoulli(logits=th[k]))
            storch.add_cost((x - 0.3) ** 2 + 0.1 * k)
        elif model == "above_a_child":
            x = cls("z", 3)(Bernoulli(logits=th))
            y = storch.estimator("reparameterization", plate="y", n_samples=2)(Normal(x.sum(), 1.0))
            storch.add_cost((y - 0.5) ** 2)
        else:  # a partition of 3 steps with a cost per step (stacked where the control variate allows it)
            est = cls("z", 2)
            x = est(Bernoulli(logits=th[0]))
            for _ in range(2):
                storch.add_cost((x - 0.4) ** 2)
                x = est(Bernoulli(logits=th[0] + x))
            storch.add_cost((x - 0.4) ** 2)
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, th)
    return loss.detach(), g


_MODELS = ["one_node", "below_a_parent", "above_a_child", "partition"]


@pytest.mark.parametrize("model", _MODELS)
@pytest.mark.parametrize("make", [_constant_baseline, _constant_control_variate])
@pytest.mark.parametrize("shape_of,said", [
    (lambda s: (2,) + s, r"1 dim\(s\) more than the cost"),  # two copies stacked: broadcast silently
    (lambda s: s + (1,), r"1 dim\(s\) more than the cost"),  # keepdim=True
    (lambda s: (7,) + s[1:], r"its dim 0 has size 7 where the cost's dim 0"),  # torch's broadcasting error
], ids=["copies_stacked", "keepdim", "wrong_size"])
def test_a_baseline_or_control_variate_not_laid_out_like_the_cost_frame_is_refused(model, make, shape_of, said):
    cls = make(shape_of)
    component = "baseline" if make is _constant_baseline else "control_variate"
    with pytest.raises(storch.StorchError, match=rf"estimator '{cls.name}' \(plate 'z'\): {component} returned a "
                       rf"tensor of shape .* but it must have the cost frame's shape .*{said}.*cost.align"):
        _run_model(model, cls)


@pytest.mark.parametrize("model", _MODELS)
@pytest.mark.parametrize("make", [_constant_baseline, _constant_control_variate])
def test_a_baseline_or_control_variate_that_broadcasts_to_the_frame_gives_the_full_ones_result(model, make):
    """A scalar, size-1 dims and fewer leading dims broadcast to the frame without changing it: accepted, and
    the same loss and gradient as the frame-shaped result (same seed, same samples)."""
    want_loss, want_grad = _run_model(model, make(lambda s: s))
    for shape_of in (lambda s: (), lambda s: (1,) * len(s), lambda s: s[1:]):
        loss, g = _run_model(model, make(shape_of))
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(g, want_grad)


def test_a_baseline_that_is_not_a_plain_tensor_is_refused():
    class FloatBaseline(storch.Estimator):
        name = "test_core_float_baseline"

        def baseline(self, node, cost):
            return 0.5

    class PlateBaseline(storch.Estimator):
        name = "test_core_plate_baseline"

        def baseline(self, node, cost):
            return storch.PlateTensor(torch.zeros(cost.tensor.shape), cost.plates)

    with pytest.raises(storch.StorchError, match=r"baseline returned float 0.5, but it must return None or a "
                                                 r"torch.Tensor laid out as the cost frame's shape \(3, 4\)"):
        _run_model("one_node", FloatBaseline)
    class DataPlateBaseline(storch.Estimator):
        name = "test_core_data_plate_baseline"

        def baseline(self, node, cost):
            plates = tuple(p for p in cost.plates if p.name != self.plate)
            return storch.PlateTensor(torch.zeros(tuple(p.size for p in plates)), plates)

    with pytest.raises(storch.StorchError, match=r"baseline returned a value that depends on the samples of plate"):
        _run_model("one_node", PlateBaseline)  # (it carries the node's own plate)
    with pytest.raises(storch.StorchError, match=r"baseline returned a PlateTensor.*cost.align\(t.tensor, t.plates\)"):
        _run_model("one_node", DataPlateBaseline)


def test_an_output_not_of_the_samples_shape_is_refused():
    """A value of another shape than the sample (one sample, node.sample[0]) became a plate tensor whose
    leading dims are not the plates (torch's broadcasting error later, or a silently wrong layout)."""

    class FirstSample(storch.Estimator):
        name = "test_core_first_sample"

        def output(self, node):
            return node.sample[0]

    with storch.Graph():
        with pytest.raises(storch.StorchError, match=r"'test_core_first_sample' \(plate 'z'\): output returned a "
                           r"tensor of shape \(2, 3\).*lead with the sample's first 1 dims \(3,\)"):
            FirstSample("z", 3)(Bernoulli(logits=torch.zeros(2, 3, requires_grad=True)))


def test_an_output_that_represents_the_sample_with_more_dims_is_handed_out():
    """Only the plate dims must match: the dims after them may represent the value (a one-hot vector of a
    Categorical's index, as the proposal's own check allows); a review found the first check refused it."""

    class OneHotOut(storch.Estimator):
        name = "test_core_one_hot_out"

        def output(self, node):
            return torch.nn.functional.one_hot(node.sample, 3).to(torch.float64)

    theta = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    with storch.Graph():
        th = storch.denote_independent(theta.expand(2, 3), 0, "b")
        z = OneHotOut("x", 4)(torch.distributions.Categorical(logits=th))
        assert tuple(z.shape) == (3,) and [p.name for p in z.plates] == ["x", "b"]
        storch.add_cost(((z * c).sum(-1) - 1.0) ** 2)
        loss = storch.surrogate_loss()
    # the surrogate's value is the mean cost of the drawn classes (MagicBox = 1): the one-hot value was laid out
    assert torch.isclose(loss.detach(), (((c - 1.0) ** 2)[z.tensor.argmax(-1)]).mean(), atol=1e-12)


def test_a_storch_error_in_a_gradient_function_is_raised_as_it_is():
    """The error path that names a proposal's wrong dtype caught storch's own errors too (a PlateError or
    OptionError raised inside gradient_function came out as a StorchError about dtype)."""

    class Refusing(storch.Estimator):
        name = "test_core_refusing_gradient_function"

        def proposal(self, node):
            return node.distribution.sample((self.n_samples,)).long()

        def gradient_function(self, node):
            raise storch.OptionError("my own refusal")

    with storch.Graph():
        with pytest.raises(storch.OptionError, match="my own refusal"):
            Refusing("z", 3)(Bernoulli(logits=torch.zeros(2, requires_grad=True)))


def test_a_proposal_of_another_dtype_than_the_distributions_is_named():
    """A long tensor for a Bernoulli failed in torch's log_prob ("result type Float can't be cast to the
    desired output type Long"), naming no estimator. The error path finds the distribution's dtype from its
    support (Bernoulli) or from one draw whose random state is restored (ContinuousBernoulli); a
    Categorical's float samples still work (its log_prob takes them)."""

    class LongSamples(storch.Estimator):
        name = "test_core_long_samples"

        def proposal(self, node):
            return node.distribution.sample((self.n_samples,)).long()

    class FloatSamples(LongSamples):
        name = "test_core_float_samples"

        def proposal(self, node):
            return node.distribution.sample((self.n_samples,)).float()

    th = torch.zeros(2, 3, requires_grad=True)
    for d in (Bernoulli(logits=th), ContinuousBernoulli(logits=th)):
        torch.manual_seed(0)
        with storch.Graph():
            with pytest.raises(storch.StorchError, match=rf"'test_core_long_samples' \(plate 'z'\): proposal returned "
                               rf"samples of dtype torch.int64, but {type(d).__name__}'s samples have dtype "
                               r"torch.float32.*gradient_function failed.*x.to\(torch.float32\)"):
                LongSamples("z", 3)(d)
        after = torch.rand(4)
        torch.manual_seed(0)
        d.sample((3,))  # the proposal's own draw, and nothing else
        assert torch.equal(after, torch.rand(4))
    with storch.Graph():
        z = FloatSamples("z", 3)(Categorical(logits=torch.zeros(4, requires_grad=True)))
        storch.add_cost(z)
        storch.surrogate_loss()


def test_has_update_without_an_update_is_refused():
    """``has_update = True`` with neither an ``update_parameters`` override nor ``replays_update`` updated
    nothing, silently. A class attribute that an instance turns off (sum_and_sample's, the registered name's
    capability) is fine: the instance's value is checked, at its call."""

    class NoUpdate(storch.Estimator):
        name = "test_core_no_update"
        has_update = True

    class OffForThisInstance(NoUpdate):
        name = "test_core_update_off"

        def __init__(self, plate, n_samples=1):
            super().__init__(plate, n_samples)
            self.has_update = False

    class OnForThisInstance(storch.Estimator):
        name = "test_core_update_on"

        def __init__(self, plate, n_samples=1):
            super().__init__(plate, n_samples)
            self.has_update = True

    th = torch.zeros(3, requires_grad=True)
    for cls in (NoUpdate, OnForThisInstance):
        with storch.Graph():
            with pytest.raises(storch.StorchError, match=rf"'{cls.name}' \(plate 'z'\) has has_update = True but "
                               r"neither overrides update_parameters\(nodes, loss\) nor sets replays_update"):
                cls("z", 2)(Bernoulli(logits=th))
    with storch.Graph():
        z = OffForThisInstance("z", 2)(Bernoulli(logits=th))
        storch.add_cost(z.sum())
        storch.backward()


class _CountingScore(storch.Estimator):
    """The plain score function with a state that every update changes: the number of updates and the
    mean cost each one saw (a moving average's inputs), in storch-core alone."""

    name = "test_core_graph_counting_score"
    has_update = True

    def __init__(self, plate, n_samples):
        super().__init__(plate, n_samples)
        self.seen = []

    def update_parameters(self, nodes, loss):
        self.seen.append(round(float(loss.detach()), 12))


def _counting_steps(pattern, steps=3):
    est = _CountingScore("z", n_samples=3)
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    for i in range(steps):
        torch.manual_seed(i)
        with storch.Graph():
            z = est(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.45) ** 2).sum(), name="f")
            if pattern == "storch.backward":
                storch.backward()
            elif pattern == "sum":  # a second term built from the surrogate again, one pass
                (storch.surrogate_loss() + 0.0 * storch.surrogate_loss()).backward()
            elif pattern == "orders":  # an order-1 and an order-2 surrogate, one pass
                (storch.surrogate_loss(order=1) + 0.0 * storch.surrogate_loss(order=2)).backward()
            elif pattern == "penalty":  # the second probe reached through the gradient's graph only
                g, = torch.autograd.grad(storch.surrogate_loss(order=2), theta, create_graph=True)
                (storch.surrogate_loss() + 0.0 * g.pow(2).sum()).backward()
            elif pattern == "two_passes":  # two surrogates, two passes: gradients accumulate twice
                storch.surrogate_loss().backward(retain_graph=True)
                storch.surrogate_loss().backward()
            elif pattern == "then_storch.backward":
                storch.surrogate_loss().backward(retain_graph=True)
                storch.backward()
    return est.seen


@pytest.mark.parametrize("pattern", ["sum", "orders", "penalty", "two_passes", "then_storch.backward"])
def test_a_step_updates_its_estimators_once_however_many_of_its_surrogates_are_backpropagated(pattern):
    """Every surrogate_loss() has its own update probe, and each probe had its own once-guard: a pass
    that reached two of a step's surrogates (main + 0 * another, an order-1 and an order-2 part, a
    gradient penalty) ran the updates twice (a moving average got two updates, a temperature schedule
    advanced two steps per step), as did two passes of two surrogates or a surrogate's .backward() then
    storch.backward(). The step's probes now share one record: one update per step, as storch.backward()."""
    assert _counting_steps(pattern) == _counting_steps("storch.backward")


def test_a_surrogate_of_an_ended_step_updates_with_its_own_step():
    """The record is the step's: a loss kept from a step that was reset, backpropagated during the next
    step, runs the old step's updates and leaves the new step's to its own surrogate."""
    est = _CountingScore("z", n_samples=3)
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    losses = []
    for _ in range(2):  # the thread's default graph: one Graph object, two steps
        z = est(Bernoulli(logits=theta))
        storch.add_cost(((z - 0.45) ** 2).sum(), name="f")
        losses.append(storch.surrogate_loss())
        storch.reset()
    losses[0].backward(retain_graph=True)
    assert len(est.seen) == 1
    losses[1].backward()
    assert len(est.seen) == 2
    losses[0].backward()  # its step has updated already
    assert len(est.seen) == 2


def test_an_estimator_that_an_earlier_pass_did_not_reach_is_updated_later():
    """Found by review: the step's record was one flag, so after a surrogate_loss().backward() of the step's first
    node, a storch.backward() after a second node (another estimator) skipped every update: the second estimator
    never updated. The record holds the estimators updated; the others are updated by a later pass."""
    first, second = _CountingScore("a", n_samples=2), _CountingScore("b", n_samples=2)
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    with storch.Graph():
        a = first(Bernoulli(logits=theta))
        storch.add_cost(((a - 0.45) ** 2).sum(), name="fa")
        storch.surrogate_loss().backward(retain_graph=True)
        b = second(Bernoulli(logits=theta * 2))
        storch.add_cost(((b - 0.45) ** 2).sum(), name="fb")
        storch.backward()
    assert (len(first.seen), len(second.seen)) == (1, 1)


class _Stateless(_CountingScore):
    name = "test_core_graph_stateless_score"
    has_update = False


def _vmapped_step(est, finish=storch.surrogate_loss):
    """An ensemble's step for torch.func.vmap: one member's parameters θ (3 data points on a data plate)."""
    x = torch.tensor([[1.0, -0.5], [0.3, 0.7], [-1.0, 0.2]])

    def step(theta):
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(x, 0, "data") * theta))
            storch.add_cost(((z - 0.45) ** 2).sum(), name="f")
            return finish()
    return step


def test_a_vmapped_surrogate_refuses_the_updates_of_its_backward():
    """An ensemble under torch.func.vmap (vmap(step, randomness="different")(thetas).sum().backward()):
    inside vmap the batched loss reports requires_grad=False, so the surrogate attached no update probe and
    the pass accumulated the gradients but updated no estimator (a moving average, a schedule), silently
    (found by porting a training loop). An update there would read batched values and mix the members in one
    state: the .backward() is refused with what to do, before any gradient is accumulated. Not refused: a
    torch.autograd.grad of the vmapped surrogate (an evaluation pass: it never updates), and an estimator
    without state. storch.backward() inside vmap says so (it was torch's ".item() on a Tensor")."""
    from torch.func import vmap

    thetas = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    counting = _CountingScore("z", n_samples=3)
    members = vmap(_vmapped_step(counting), randomness="different")
    with pytest.raises(storch.StorchError, match=r"inside torch\.func\.vmap.*'test_core_graph_counting_score' "
                                                 r"\(plate 'z'\).*Nothing was backpropagated.*Python loop"):
        members(thetas).sum().backward()
    assert thetas.grad is None and counting.seen == []
    g, = torch.autograd.grad(members(thetas).sum(), thetas)  # an evaluation pass
    assert g.shape == thetas.shape and torch.isfinite(g).all() and counting.seen == []
    vmap(_vmapped_step(_Stateless("z", n_samples=3)), randomness="different")(thetas).sum().backward()
    assert thetas.grad is not None and torch.isfinite(thetas.grad).all()
    inside = vmap(_vmapped_step(_Stateless("z", n_samples=3), storch.backward), randomness="different")
    with pytest.raises(storch.StorchError, match=r"storch\.backward\(\) inside torch\.func\.vmap.*Python loop"):
        inside(thetas)


def test_denote_independent_in_a_collate_fn_names_the_cause():
    """p-tools: denote_independent in a DataLoader's collate_fn gave "plate 'data' of another graph" (in-process
    loading) and "the previous step in the thread's default graph was never ended" (a worker collates each batch in
    its own default graph), naming neither the collate_fn nor what to do: call it inside the step."""
    torch.manual_seed(0)
    hint = "call storch.denote_independent inside the step"

    def collate(batch):
        return storch.denote_independent(torch.stack(batch), 0, "data")

    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    loader = torch.utils.data.DataLoader([torch.rand(3) for _ in range(4)], batch_size=2, collate_fn=collate)
    try:
        with pytest.raises(storch.PlateError) as err:
            for xs in loader:
                with storch.Graph():
                    storch.add_cost(est(Normal(xs, 1.0)).sum(), name="c")
        assert "of another graph" in str(err.value) and hint in str(err.value) and "collate_fn" in str(err.value)
        storch.reset()
        # what a loader worker does: collate batch after batch in its default graph, with no step in between
        collate([torch.rand(3), torch.rand(3)])
        with pytest.raises(storch.PlateError) as err:
            collate([torch.rand(3), torch.rand(3)])
        assert "already used" in str(err.value) and hint in str(err.value), str(err.value)
    finally:
        storch.reset()
    # the hint is for data plates: a node's plate of another graph does not get it
    with storch.Graph():
        z = est(Normal(torch.zeros(2), 1.0))
        with storch.Graph():
            with pytest.raises(storch.PlateError) as err:
                est(Normal(z, 1.0))
    assert "of another graph" in str(err.value) and hint not in str(err.value)


def test_a_plate_tensor_from_a_loader_worker_or_unpickled_is_named_as_such():
    """p-loop t_dl3: a DataLoader(num_workers=2) whose collate_fn called denote_independent handed over an unpickled
    plate tensor, and the step refused it as "from a graph that was discarded after an error in its step
    (PlateError): a stale tensor" (no step had failed: the worker's copy carried the worker's reason) or as "of
    another graph", without the collate_fn advice. An unpickled plate tensor (a worker's batch, pickle.loads,
    torch.load) is named as such, with what to do."""
    torch.manual_seed(0)

    def collate(batch):
        return storch.denote_independent(torch.stack(batch), 0, "data")

    def check(message):
        assert "made in another process or unpickled" in message, message
        assert "collate_fn" in message and "return plain tensors from the loader" in message, message
        assert "call storch.denote_independent in the step" in message, message
        assert "stale" not in message and "discarded" not in message and "another graph" not in message, message

    est = storch.estimator("reparameterization", plate="z", n_samples=2)
    loader = torch.utils.data.DataLoader([torch.rand(3) for _ in range(4)], batch_size=2, num_workers=2,
                                         collate_fn=collate)
    xb = next(iter(loader))
    assert type(xb) is storch.PlateTensor and xb.plates[0].lineage.unpickled
    with storch.Graph():
        with pytest.raises(storch.PlateError) as err:
            est(Normal(xb, 1.0))
    check(str(err.value))
    # a plate tensor pickled in one step and unpickled in a later one: as a distribution's parameter, denoted again,
    # or mixed with the later step's own plate tensors (align)
    with storch.Graph():
        xs = storch.denote_independent(torch.rand(2, 3), 0, "data")
        back = pickle.loads(pickle.dumps(xs))
        assert not xs.plates[0].lineage.unpickled
        loc = torch.zeros(3, requires_grad=True)
        storch.add_cost(est(Normal(xs + loc, 1.0)).sum(), name="c")
        storch.backward()
    with storch.Graph():
        with pytest.raises(storch.PlateError) as err:
            est(Normal(back, 1.0))
    check(str(err.value))
    with storch.Graph():
        with pytest.raises(storch.PlateError) as err:
            storch.denote_independent(back, 0, "data2")
    check(str(err.value))
    with storch.Graph():
        xs = storch.denote_independent(torch.rand(2, 3), 0, "data")
        with pytest.raises(storch.PlateError) as err:
            storch.add_cost((xs * back).sum(), name="mixed")
    check(str(err.value))
    # a deep copy is not marked unpickled (copy.deepcopy copies the lineage as it did)
    with storch.Graph():
        xs = storch.denote_independent(torch.rand(2, 3), 0, "data")
        kept = copy.deepcopy(xs)
        assert not kept.plates[0].lineage.unpickled


def test_a_graph_open_in_another_thread_is_refused_and_each_thread_keeps_its_own_step():
    """One Graph object entered by two threads at once merged their steps: the first storch.backward()
    backpropagated the other thread's cost too, and the other then found "the graph has no costs" (p-edge s18).
    Entering a graph open in another thread is refused; after its block there ended, it may be entered again."""
    est = storch.estimator("expect", plate="z")
    a = torch.tensor([0.3], requires_grad=True)
    b = torch.tensor([-0.5], requires_grad=True)
    graph = storch.Graph()
    inside, leave, out = threading.Event(), threading.Event(), {}

    def hold():
        try:
            with graph:
                z = est(Bernoulli(logits=a))
                storch.add_cost(z.sum(), "a")
                inside.set()
                leave.wait(10)
                out["value"] = storch.backward().item()
        except BaseException as e:  # asserted below
            out["error"] = e
            inside.set()

    thread = threading.Thread(target=hold)
    thread.start()
    assert inside.wait(10)
    with pytest.raises(storch.StorchError, match=r"open in another thread.*one `with storch.Graph\(\):` per thread"):
        with graph:
            storch.add_cost(est(Bernoulli(logits=b)).sum(), "b")
    leave.set()
    thread.join()
    assert "error" not in out
    # the holder's step has its own cost only: the exact expectation sigmoid(a), and no gradient reached b
    assert out["value"] == pytest.approx(torch.sigmoid(a).item())
    assert b.grad is None
    with graph:  # its block in the other thread ended: this thread may enter it
        with graph:  # and re-enter it (nested) in one thread
            storch.add_cost(est(Bernoulli(logits=b)).sum(), "b")
            assert storch.backward().item() == pytest.approx(torch.sigmoid(b).item())
    assert b.grad is not None


@pytest.mark.parametrize("refused", ["order", "scale", "no_grad", "inference_mode"])
def test_a_refused_backward_in_the_default_graph_discards_the_step(refused):
    """docs/reliability.md: in the default graph a storch call that raises discards the step. The argument
    refusals of storch.backward() raised before it did, and the next step met "already called in the thread's
    default graph" (p-edge s4, s5)."""
    storch.reset()
    est = storch.estimator("expect", plate="z")
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    storch.add_cost(est(Bernoulli(logits=theta)).sum(), "c")
    with pytest.raises(storch.StorchError):
        if refused == "order":
            storch.backward(order=2)
        elif refused == "scale":
            storch.backward(scale="x")
        else:
            with getattr(torch, refused)():
                storch.backward()
    assert not storch.current_graph().nodes and not storch.current_graph().costs
    storch.add_cost(est(Bernoulli(logits=theta)).sum(), "c")  # the next step starts clean
    assert storch.backward().item() == pytest.approx(torch.sigmoid(theta).sum().item())
    assert torch.allclose(theta.grad, torch.sigmoid(theta) * (1 - torch.sigmoid(theta)))


@pytest.mark.parametrize("scale, said", [
    (float("nan"), r"scale=nan\): every gradient would be nan or inf"),
    (float("inf"), r"scale=inf\): every gradient would be nan or inf"),
    (-float("inf"), r"scale=-inf\): every gradient would be nan or inf"),
    (torch.tensor(float("nan")), r"scale=nan\): every gradient would be nan or inf"),
    (torch.tensor([float("inf")]), r"scale=inf\): every gradient would be nan or inf"),
    (torch.ones(3), r"scale=<tensor of shape \(3,\)>\): the loss is a scalar and is scaled by one number"),
    (False, r"scale=False\): a bool is no scale"),  # review r-twenty-two: False zeroed every gradient
    (1j, r"scale=1j\): a complex is no scale"),
    (fractions.Fraction(1, 2), r"a Fraction is no scale"),  # (torch refused it after the step's checks)
    (10 ** 400, r"every gradient would be nan or inf"),  # (math.isfinite raised OverflowError)
])
def test_backward_refuses_a_scale_that_is_not_finite_or_not_one_number(scale, said):
    """scale=nan or inf was applied: every gradient nan with no error; scale=torch.ones(3) gave torch's "grad can
    be implicitly created only for scalar outputs" (p-docs6 t2). Both are refused, saying what is accepted, and
    the step is discarded (the default graph) as for the other refusals."""
    storch.reset()
    est = storch.estimator("expect", plate="z")
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    storch.add_cost(est(Bernoulli(logits=theta)).sum(), "c")
    with pytest.raises(storch.StorchError, match=said + r".*GradScaler .*a finite number or a one-element tensor"):
        storch.backward(scale=scale)
    assert theta.grad is None
    assert not storch.current_graph().nodes and not storch.current_graph().costs


@pytest.mark.parametrize("scale", [0.0, -2.0, 3, torch.tensor(0.5), torch.tensor([2.0]), np.float32(2.0), np.int64(3)])
def test_backward_applies_a_finite_scale_zero_and_negative_included(scale):
    """A finite number or one-element tensor scales the gradient (0 skips a step's update, a negative one ascends);
    the returned loss is unscaled."""
    est = storch.estimator("expect", plate="z")
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    with storch.Graph():
        storch.add_cost(est(Bernoulli(logits=theta)).sum(), "c")
        loss = storch.backward(scale=scale)
    assert loss.item() == pytest.approx(torch.sigmoid(theta).sum().item())
    s = float(scale)
    assert torch.allclose(theta.grad, s * torch.sigmoid(theta) * (1 - torch.sigmoid(theta)))


def test_denoting_a_0d_tensor_says_it_has_no_dim():
    """A 0-d tensor was told "dim -1 is out of range ...; use a dim in [0, -1]" (an empty range; p-edge s26)."""
    said = r"no dim to denote as independent.*unsqueeze\(0\).*is not denoted"
    with storch.Graph():
        for dim in (-1, 0):
            with pytest.raises(storch.PlateError, match=r"0-d tensor \(shape \(\)\): it has " + said):
                storch.denote_independent(torch.tensor(2.0), dim, "d")
        with pytest.raises(storch.PlateError, match=r"0-d tensor \(shape \(\)\) in the tuple: it has " + said):
            storch.denote_independent((torch.tensor(2.0), torch.tensor(3.0)), 0, "d")
        x = storch.denote_independent(torch.arange(3.0), 0, "data")
        with pytest.raises(storch.PlateError, match=r"per-sample shape \(\) \(plates \('data',\)\): it has " + said):
            storch.denote_independent(x, 0, "d")


def test_a_cost_added_after_the_steps_update_is_warned():
    """p-state: a cost added after a backward pass of the step's surrogate ran the estimators' updates (once per
    step) never reached their per-cost state (a moving average), silently. It is now warned; a cost added before
    the first pass, or to a step whose estimators have no update, is not."""

    class Counting(storch.Estimator):
        name = "test_core_counting_update"
        has_update = True

        def __init__(self, plate, n_samples=1):
            super().__init__(plate, n_samples)
            self.seen = []

        def update_parameters(self, nodes, loss):
            self.seen.append(sorted(name for name, _ in storch.current_graph().costs))

    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    est = Counting("z", 2)
    with storch.Graph():
        z = est(Normal(theta, 1.0))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            storch.add_cost((z ** 2).sum(-1), name="A")
            storch.surrogate_loss().backward(retain_graph=True)
        assert est.seen == [["A"]]
        with pytest.warns(UserWarning, match=r"cost 'B' was added after a backward pass .*test_core_counting_update"
                                             r".*will not include this cost"):
            storch.add_cost(z.sum(-1), name="B")
        storch.surrogate_loss().backward()
        assert est.seen == [["A"]]  # the step updated once, as documented
    with storch.Graph():  # a step whose estimator has no update: no warning
        z = storch.estimator("reparameterization", plate="z")(Normal(theta, 1.0))
        storch.add_cost((z ** 2).sum(-1), name="A")
        storch.surrogate_loss().backward(retain_graph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            storch.add_cost(z.sum(-1), name="B")


# -- a finished step's plate tensor used in a later step ----------------------------------------------------


def _finished_step(est):
    """One step (sampled, costed, ended by storch.backward()); returns its sample, kept by the user."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    z = est(Bernoulli(logits=theta))
    storch.add_cost(z.sum(), name="c")
    storch.backward()
    return z


_STALE = r"plate 'z' from a graph that was reset .*stale tensor.*storch\.estimate\(t\).*t\.tensor\.detach\(\)"


@pytest.mark.parametrize("use", ["add_cost", "cost_estimates", "estimate", "expect", "with_new_data",
                                 "with_new_sample"])
@pytest.mark.parametrize("block", [False, True])
def test_a_finished_steps_plate_tensor_alone_in_a_later_step_is_refused_with_how_to_carry_it(use, block):
    """A sample z kept from step 1 and used alone in step 2 (no node of step 2 in it, or with step 2's data only) is
    refused where ownership is checked (add_cost, storch.estimate, an estimator's distribution), naming z's plate, and
    the message says how to carry a value across steps (also where it meets a new sample of the same plate name): a plain tensor taken in step 1 (storch.estimate(z), as
    docs/plates.md's state kept across steps, or z.tensor.detach(), as reparameterization.md's logged index).
    Before, the refusal said only to recompute the tensor in its step."""
    import contextlib

    est = storch.estimator("expect", plate="z")
    z = _finished_step(est)
    data = torch.tensor([1.0, 2.0, 3.0])
    with storch.Graph() if block else contextlib.nullcontext():
        if use == "with_new_sample":  # the same plate name, step 2's own node: refused where they meet
            z2 = est(Bernoulli(logits=torch.zeros(2)))
            with pytest.raises(storch.PlateError, match=r"plate 'z' comes from two different graphs.*"
                                                        r"storch\.estimate\(t\).*t\.tensor\.detach\(\)"):
                z + z2
        else:
            with pytest.raises(storch.PlateError, match=_STALE):
                if use == "with_new_data":  # (z * x is computed: the plates differ; the cost is refused)
                    storch.add_cost(z.sum() * storch.denote_independent(data, 0, "data"), name="late")
                elif use == "add_cost":
                    storch.add_cost(z.sum() ** 2, name="late")
                elif use == "cost_estimates":
                    storch.add_cost(z.sum() ** 2, name="late")
                    storch.cost_estimates()
                elif use == "estimate":
                    storch.estimate(z)
                else:
                    storch.estimator("expect", plate="y")(Bernoulli(logits=z))
    storch.reset()


def test_a_value_carried_across_steps_as_the_message_says_is_accepted_and_exact():
    """What the refusal recommends works: storch.estimate(z) in step 1 is the exact E[z] (expect enumerates), a plain
    tensor that step 2 uses without a refusal; z.tensor.detach() holds the samples."""
    est = storch.estimator("expect", plate="z")
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    z = est(Bernoulli(logits=theta))
    storch.add_cost(z.sum(), name="c")
    mean, samples = storch.estimate(z), z.tensor.detach()
    storch.backward()
    assert type(mean) is torch.Tensor and not mean.requires_grad
    torch.testing.assert_close(mean, torch.sigmoid(theta).detach())
    assert type(samples) is torch.Tensor and samples.shape[-1] == 2
    w = est(Bernoulli(logits=theta + mean))
    storch.add_cost((w * samples.mean(0)).sum(), name="c")
    storch.backward()
