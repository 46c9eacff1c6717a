"""The plain partition step (issue 19): step t of a partition whose estimator and distribution type were found plain
(the node's decision, ``storch.estimators.first_steps._is_plain``) is made by ``storch.estimators.partition_steps._plain_step``,
without the per-step checks that come out as no-ops for it (a policy's episode: one estimator call per step). These
tests assert the path (not a time): taken from step 2 of a partition on the lean call, with the general path's
samples, gradient functions, loss and gradients bitwise; not taken at the steps that need the general path (the
first steps, ``inputs=``, a step with a new parent plate, grad disabled, a hook, a type that is not plain, eos,
storch.compile's trace); and a cast of a sampled value is one raw call where no watch asks for it."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import storch
from storch.graph.node import StepDraw
from storch.plates.tensor import PlateTensor
from path_probes import calls, hooked


class _Sequence(storch.Estimator):
    """The base class's components (the score function, sampling with replacement), called once per step."""

    name = "plain_step_sequence_for_tests"
    supports_partitions = True


def _episode(est, theta, steps=5, hook=False, make=None):
    """One episode of ``steps`` calls, each step's logits read from the last step's sample; returns the path of
    each call, the samples, the logged gradient functions, the loss and the gradient."""
    torch.manual_seed(0)
    paths, samples = [], []
    with storch.Graph():
        s = theta[0]
        for t in range(steps):
            d = make(s) if make is not None else Bernoulli(logits=s)
            a, seen = calls(lambda: est(d))
            paths.append("plain" if "_plain_step" in seen else "general")
            assert (paths[-1] == "plain") != bool(seen & {"_extend_partition", "_first_node", "_sample_node"})
            samples.append(a.tensor)
            s = theta[1] + theta[2] * a
            storch.add_cost(((a - 0.45) ** 2).sum(-1) if a.dim() else (a - 0.45) ** 2, name=f"c{t}")
        node = storch.current_graph().nodes[0]
        lps = [lp.detach() for _, lp in node.step_log]
        loss = storch.surrogate_loss(order=1)
        g, = torch.autograd.grad(loss, [theta])
    return paths, samples, lps, loss.detach(), g


def _same(a, b):
    for xs, ys in zip(a[1:], b[1:]):
        for x, y in zip(xs if isinstance(xs, list) else [xs], ys if isinstance(ys, list) else [ys]):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def test_plain_step_is_taken_from_step_two_with_the_general_paths_values():
    theta = torch.randn(3, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=6)
    first = _episode(est, theta)
    # step 0 is the first node (its type decided there), step 1 starts the partition's log (and decides the
    # class's step path): both on the general path; the later steps are plain, in every graph
    assert first[0] == ["general", "general", "plain", "plain", "plain"]
    second = _episode(est, theta)
    assert second[0] == first[0]
    # the control: a forward hook takes nn.Module.__call__ and the general path at every step; the same values
    general, heard = hooked(est, lambda: _episode(est, theta))
    assert general[0] == ["general"] * 5 and heard == 5
    _same(general, first)
    _same(general, second)


def test_plain_steps_keep_the_partitions_views_and_causal_credit():
    theta = torch.randn(3, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=4)
    _episode(est, theta)
    with storch.Graph():
        s = theta[0]
        values = []
        for t in range(4):
            a, seen = calls(lambda: est(Bernoulli(logits=s)))
            values.append(a)
            s = theta[1] + theta[2] * a
        assert "_plain_step" in seen
        node = storch.current_graph().nodes[0]
        assert node.step == 3 and len(node.step_log) == 4 and node.steps_in_place
        for t, a in enumerate(values):  # node.at(t): step t's own draw, value and plate
            view = node.at(t)
            assert torch.equal(view.sample, a.tensor) and view.value is a and a.plates[0].step == t
        assert [p.step for p, *_ in (plates for plates, _ in node.step_log)] == [0, 1, 2, 3]


def _draws_of(est, theta, steps=4):
    """One episode's user distributions, handed-out values, step paths and node (its graph left open)."""
    s, users, values, paths = theta[0], [], [], []
    for _ in range(steps):
        d = Bernoulli(logits=s)
        a, seen = calls(lambda: est(d))
        paths.append("plain" if "_plain_step" in seen else "general")
        users.append(d)
        values.append(a)
        s = theta[1] + theta[2] * a
    return users, values, paths, storch.current_graph().nodes[0]


def test_every_steps_draw_record_has_one_layout_on_each_path():
    """node.step_draws: step 0's record is made from the node's attributes (``node.distribution`` the raw
    distribution, ``node.original`` the user's), a later step's from the step's locals (``raw`` the drawn one,
    ``distribution`` the user's), on the general and the plain path. A reviewer read the two as two layouts of
    one positional tuple: they are one, named (StepDraw), and node.at(t), node.steps, storch.padding's and the
    compiled trace's readers read each field as what it is (review f-steps16)."""
    theta = torch.randn(3)
    est = _Sequence(plate="episode", n_samples=4)
    _draws_of(est, theta)  # (outside a graph of its own: the class's step path decided)
    for eos in (None, 1):
        if eos is not None:
            est = _Sequence(plate="episode", n_samples=8)
            est.eos = eos  # (every step masks the finished entries: the general path, `finished` recorded)
        torch.manual_seed(0)
        with storch.Graph():
            users, values, paths, node = _draws_of(est, theta)
            assert paths == (["general", "general", "plain", "plain"] if eos is None else ["general"] * 4)
            assert len(node.step_draws) == 4
            done = None
            for t, draw in enumerate(node.step_draws):
                assert type(draw) is StepDraw
                assert draw.original is users[t] and draw.value is values[t] and draw.sample is values[t].tensor
                # the raw distribution: plain tensors (the user's holds plate tensors from step 1 on), the one
                # the step's sample was drawn from and scored by (l_t)
                assert type(draw.distribution) is Bernoulli and type(draw.distribution.logits) is torch.Tensor
                if t:
                    assert type(draw.original.logits) is PlateTensor and draw.distribution is not draw.original
                view = node.at(t)
                assert all(x is y for x, y in zip((view.sample, view.distribution, view.original, view.value,
                                                   view.finished), draw))
                if eos is None:
                    assert draw.finished is None
                else:  # `finished` after step t: an entry drew eos at some step <= t
                    done = (draw.sample == eos) if done is None else done | (draw.sample == eos)
                    assert torch.equal(draw.finished, done)
            assert len(node.steps) == len(values[1:])
            assert all(x is v.tensor for x, v in zip(node.steps, values[1:]))
            if eos is not None:  # (the record was read where it matters: entries finished at different steps)
                assert not bool(node.step_draws[0].finished.all()) and bool(done.any())


def test_steps_that_need_the_general_path_take_it():
    theta = torch.randn(3, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=4)
    _episode(est, theta)
    with storch.Graph():
        a = est(Bernoulli(logits=theta[0]))
        a = est(Bernoulli(logits=theta[1] + theta[2] * a))
        _, seen = calls(lambda: est(Bernoulli(logits=theta[1] + theta[2] * a), inputs=a))  # inputs=: checked, kept
        assert "_plain_step" not in seen and "check_inputs" in seen
        _, seen = calls(lambda: est(Bernoulli(logits=theta[1] + theta[2] * a)))  # later steps keep the inputs log
        assert "_plain_step" not in seen
    with storch.Graph():
        a = est(Bernoulli(logits=theta[0]))
        a = est(Bernoulli(logits=theta[1] + theta[2] * a))
        x = storch.denote_independent(theta, 0, "data")  # a new parent plate: the order walk, the plates grow
        b, seen = calls(lambda: est(Bernoulli(logits=x + a)))
        assert "_plain_step" not in seen and [p.name for p in b.plates] == ["episode", "data"]
        _, seen = calls(lambda: est(Bernoulli(logits=x + b)))  # the partition's parents again: plain
        assert "_plain_step" in seen
        with torch.no_grad():  # the general path records a step sampled without grad
            _, seen = calls(lambda: est(Bernoulli(logits=x + b)))
        assert "_plain_step" not in seen and storch.current_graph().nodes[0].no_grad_step == 4


def _categorical_episode(est, table, cls, by, steps=6):
    """A policy over 4 states whose next state is the last action (an RNN decoder's or a tabular policy's
    shape): each step's categorical reads its row of ``table`` selected by the previous step's sample (its
    index, or its one-hot vector)."""
    torch.manual_seed(0)
    paths, samples = [], []
    with storch.Graph():
        s = torch.tensor(0) if cls is Categorical else torch.eye(4)[0]
        for t in range(steps):
            row = table[s] if cls is Categorical else s @ table
            d = cls(logits=row) if by == "logits" else cls(probs=row.softmax(-1))
            s, seen = calls(lambda: est(d))
            paths.append("plain" if "_plain_step" in seen else "general")
            samples.append(s.tensor)
            k = s.float() if cls is Categorical else s @ torch.arange(4.0)
            storch.add_cost((k - 1.5) ** 2, name=f"c{t}")
        lps = [lp.detach() for _, lp in storch.current_graph().nodes[0].step_log]
        loss = storch.surrogate_loss(order=1)
        g, = torch.autograd.grad(loss, [table])
    return paths, samples, lps, loss.detach(), g


@pytest.mark.parametrize("cls", [Categorical, OneHotCategorical])
@pytest.mark.parametrize("by", ["logits", "probs"])
def test_a_categorical_read_from_the_previous_sample_takes_the_plain_step(cls, by):
    # a Categorical's parameters carry a category dim that is neither a batch nor an event dim, and a
    # OneHotCategorical holds a Categorical: _as_raw once refused both, so such a policy (the GRU decoder's)
    # never took the plain step (review r-27)
    table = torch.randn(4, 4, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=5)
    first = _categorical_episode(est, table, cls, by)
    assert first[0] == ["general", "general"] + ["plain"] * 4
    assert est.__dict__["_storch_plain"] == {cls: True}
    general, heard = hooked(est, lambda: _categorical_episode(est, table, cls, by))  # the control: the general path
    assert general[0] == ["general"] * 6 and heard == 6
    _same(general, first)


def test_a_type_that_is_not_plain_and_eos_take_the_general_path():
    theta = torch.randn(3, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=4)
    # a Normal's draws are checked for their precision at every step: never plain
    paths = _episode(est, theta, make=lambda s: Normal(s, 1.0))[0]
    assert paths == ["general"] * 5
    assert est.__dict__["_storch_plain"] == {Normal: False}
    with_eos = _Sequence(plate="episode", n_samples=4)
    with_eos.eos = 0  # (the base class's end-of-sequence option: every step masks the finished entries)
    assert _episode(with_eos, theta)[0] == ["general"] * 5


def test_a_step_traced_by_storch_compile_takes_the_general_path():
    theta = torch.randn(3, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=4)
    assert _episode(est, theta)[0][2:] == ["plain"] * 3
    paths = []

    def step(theta):
        with storch.Graph():
            s = theta[0]
            for t in range(4):
                a, seen = calls(lambda: est(Bernoulli(logits=s)))
                paths.append("plain" if "_plain_step" in seen else "general")
                s = theta[1] + theta[2] * a
                storch.add_cost((a - 0.45) ** 2, name=f"c{t}")
            return storch.surrogate_loss(order=1)

    compiled = storch.compile(step, backend=None)
    torch.manual_seed(0)
    compiled(theta).backward()
    assert paths and set(paths) == {"general"}
    assert _episode(est, theta)[0][2:] == ["plain"] * 3  # eager again: the decision holds


def test_an_integer_cast_of_a_sample_is_one_raw_call_unless_watched():
    # s.long() of a score node's sample (a policy's next state): no watch asks, so the cast is the raw call (the
    # dispatcher's one-operand path), not broadcast's general branch
    theta = torch.randn(3, requires_grad=True)
    est = _Sequence(plate="episode", n_samples=4)
    with storch.Graph():
        a = est(Bernoulli(logits=theta[0]))
        y = a * 2.0 + 1.0
        s, seen = calls(lambda: y.long())
        assert "run" in seen and "broadcast" not in seen
        assert s.dtype == torch.long and s.plates is y.plates and torch.equal(s.tensor, y.tensor.long())
    # the control: a cast of a pathwise sample is watched (its watch records an integer read) and marked
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(theta[0], 1.0))
        i, seen = calls(lambda: (z * 2.0).long())
        assert {"run", "watch", "broadcast"} <= seen
        assert i.dtype == torch.long and torch.equal(i.tensor, (z.tensor * 2.0).long())
    with pytest.raises(storch.StorchError):  # the marked read still refused where it reaches a cost's gradient
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(theta[0], 1.0))
            storch.add_cost(theta[1] * (z * 2.0).long().float() + z, name="c")
            storch.surrogate_loss(order=1).backward()
