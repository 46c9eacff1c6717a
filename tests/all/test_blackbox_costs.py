"""Costs computed outside torch (a black box: numpy from ``z.tensor``), wrapped back with ``storch.PlateTensor(r,
z.plates)`` (docs/plates.md, "A cost computed outside torch").

Found by a porting tester: a plain vector of per-sample rewards reduced with ``.sum()`` or put on a data plate (as the
shape error suggested) was accepted and credited nothing (z = 320); a black-box part beside a differentiable term
under an estimator that differentiates the cost through its sample was silently biased (reparameterization z = 658,
gumbel_straight_through z = 2993, rebar / relax z = 32); ``storch.PlateTensor(ndarray, plates)`` raised an
AttributeError.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch

T = np.array([1.3, -0.7, 2.1, 0.4])


def _ztest(one, exact: torch.Tensor, R: int, seed: int = 0) -> float:
    """max |z| of the mean of R independent estimates against the exact gradient."""
    torch.manual_seed(seed)
    G = torch.stack([one().detach().clone() for _ in range(R)]).double()
    se = G.std(0) / math.sqrt(R)
    return float(((G.mean(0) - exact.double()) / se.clamp_min(1e-12)).abs().max())


def _blackbox(z, f) -> storch.PlateTensor:
    """The documented recipe: per entry of ``z.tensor`` in numpy, wrapped back on ``z.plates``."""
    raw = z.tensor.detach().cpu().numpy()
    n = len(z.plates)
    flat = raw.reshape((-1,) + tuple(z.shape))
    vals = np.array([f(s) for s in flat], dtype=np.float64).reshape(raw.shape[:n])
    return storch.PlateTensor(torch.as_tensor(vals, dtype=torch.float32), z.plates)


# -- F1: a reward vector that carries no plate


@pytest.mark.parametrize("how", ["sum", "denote_independent"])
def test_a_reward_cut_from_the_samples_is_warned_of(how):
    """A warning (storch.ConstantCostWarning), not a refusal: terms constant by construction are common (review
    r-eight: an entropy bonus of a fixed-scale Normal, a placeholder regulariser, a frozen module's weight decay)."""
    theta = torch.zeros(4, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=4)(Categorical(logits=theta))
        storch.add_cost(0.1 * z.float(), name="length")
        r = torch.as_tensor(T[z.tensor.numpy()], dtype=torch.float32)  # plain (4,): no credit to anything
        c = r.sum() if how == "sum" else storch.denote_independent(r, 0, "rewards")
        with pytest.warns(storch.ConstantCostWarning,
                          match=r"no sample plate.*constant.*storch\.PlateTensor\(r, z\.plates\)") as w:
            storch.add_cost(c, name="reward")
        assert w[0].filename == __file__  # points at the user's add_cost
        storch.reset()


def test_a_term_constant_by_construction_is_warned_of_not_refused():
    mu = torch.zeros(3, requires_grad=True)
    frozen = torch.nn.Linear(3, 3).requires_grad_(False)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=4)(Normal(mu, 1.0))
        storch.add_cost((z ** 2).sum(), name="c")
        for name, term in [("entropy bonus", -0.01 * Normal(torch.zeros(3), 1.0).entropy().sum()),
                           ("placeholder", torch.tensor(0.0)), ("frozen decay", frozen.weight.pow(2).sum())]:
            with pytest.warns(storch.ConstantCostWarning, match=rf"cost {name!r} carries no sample plate"):
                storch.add_cost(term, name=name)
        storch.backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all()


def test_the_shape_error_of_a_reward_per_sample_says_to_wrap_it_first():
    theta = torch.zeros(4, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=4)(Categorical(logits=theta))
        r = torch.as_tensor(T[z.tensor.numpy()], dtype=torch.float32)
        with pytest.raises(storch.CostError) as e:
            storch.add_cost(r, name="reward")
    msg = str(e.value)
    assert "plates ('z',) of the sample of node 'z'" in msg
    assert msg.index("storch.PlateTensor(r, z.plates)") < msg.index("`.sum(-1)`")


def test_a_constant_cost_stays_allowed_without_grad_or_credit_and_one_that_needs_grad():
    theta = torch.zeros(4, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4)
    with torch.no_grad(), storch.Graph():  # evaluation
        est(Categorical(logits=theta))
        storch.add_cost(torch.tensor(1.0), name="c")
        assert storch.surrogate_loss().item() == 1.0
    with storch.Graph():
        z = est(Categorical(logits=theta))
        storch.add_cost(z.float(), name="r")
        storch.add_cost(torch.tensor(1.0), name="reported", credit=False)
        storch.add_cost((theta ** 2).sum(), name="plain, with grad")
        storch.backward()


def test_a_wrapped_reward_beside_a_torch_cost_is_exact():
    theta = torch.tensor([0.2, -0.3, 0.5, 0.1], requires_grad=True)
    p = torch.softmax(theta, 0)
    exact, = torch.autograd.grad((p * (torch.tensor(T, dtype=torch.float32) + 0.1 * torch.arange(4.))).sum(), theta)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")

    def one():
        theta.grad = None
        z = est(Categorical(logits=theta))
        storch.add_cost(0.1 * z.float(), name="length")
        storch.add_cost(_blackbox(z, lambda s: T[int(s)]), name="reward")
        storch.backward()
        return theta.grad

    assert _ztest(one, exact, R=300) < 4


# -- F2 / F3: a black-box part under an estimator that differentiates the cost through its sample


def _sim(a) -> float:
    return float(-np.sum((a - 1.0) ** 2))


def _f(b) -> float:
    return float((b[0] + 2 * b[1] - 0.45) ** 2)


@pytest.mark.parametrize("name,dist,n", [
    ("reparameterization", "normal", 4), ("reparameterization", "normal", 1),
    ("gumbel_straight_through", "bernoulli", 1), ("gumbel_softmax", "bernoulli", 2),
    ("rebar", "bernoulli", 1), ("relax", "bernoulli", 1),
])
def test_a_blackbox_value_on_the_plate_of_a_pathwise_node_is_refused(name, dist, n):
    theta = torch.tensor([0.3, -0.6], requires_grad=True)
    d = Normal(theta, 1.0) if dist == "normal" else Bernoulli(logits=theta)
    with storch.Graph():
        z = storch.estimator(name, plate="z", n_samples=n)(d)
        with pytest.raises(storch.OrderError, match=rf"estimator {name!r} differentiates the cost through the "
                                                    r"sample.*score-function estimator.*'score'"):
            storch.add_cost(-_blackbox(z, _sim if dist == "normal" else _f) + 0.1 * (z ** 2).sum(), name="c")


@pytest.mark.parametrize("name", ["score", "lax"])
def test_a_blackbox_reward_plus_a_penalty_is_exact_under_score_function_estimators(name):
    mu = torch.tensor([0.3, -0.6], requires_grad=True)
    exact = (2 * (mu - 1) + 0.2 * mu).detach()  # E[-sim(a) + 0.1 |a|^2], a ~ N(mu, 1)
    opt = dict(n_samples=4, baseline="leave_one_out") if name == "score" else dict(n_samples=4)
    est = storch.estimator(name, plate="z", **opt)

    def one():
        mu.grad = None
        a = est(Normal(mu, 1.0))
        storch.add_cost(-_blackbox(a, _sim) + 0.1 * (a ** 2).sum(), name="c")
        storch.backward()
        return mu.grad

    assert _ztest(one, exact, R=300) < 4


@pytest.mark.parametrize("name", ["score", "arm"])
def test_a_blackbox_bernoulli_cost_plus_a_term_is_exact_under_score_function_estimators(name):
    theta = torch.tensor([0.3, -0.6], requires_grad=True)
    pr = torch.sigmoid(theta)
    E = sum(torch.prod(torch.stack([pr[i] if v[i] else 1 - pr[i] for i in range(2)])) * (_f(np.array(v)) + 0.1 * sum(v))
            for v in itertools.product([0., 1.], repeat=2))
    exact, = torch.autograd.grad(E, theta)
    est = storch.estimator(name, plate="z", n_samples=4) if name == "score" else storch.estimator(name, plate="z")

    def one():
        theta.grad = None
        z = est(Bernoulli(logits=theta))
        storch.add_cost(_blackbox(z, _f) + 0.1 * z.sum(), name="c")
        storch.backward()
        return theta.grad

    assert _ztest(one, exact, R=400) < 4


def test_values_per_entry_that_do_not_depend_on_a_pathwise_sample_stay_allowed_and_exact():
    """Noise drawn per entry (torch.randn_like), integer ids, a value broadcast along the plate (size 1), and a
    wrapped tensor that requires grad: the pathwise gradient is the one autograd gives."""
    mu = torch.tensor([0.3, -0.6], requires_grad=True)
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    with storch.Graph():
        a = est(Normal(mu, 1.0))
        eps = 0.1 * storch.PlateTensor(torch.arange(4), a.plates)  # integer ids: not checked
        eps2 = torch.randn_like(a)
        w = storch.PlateTensor(torch.tensor([[0.5, 2.0]]), a.plates)  # size 1: one value for every entry
        s = storch.PlateTensor(a.tensor * 3.0, a.plates)  # needs grad: a function of the sample in torch
        storch.add_cost((w * (a + eps + eps2) ** 2).sum() + s.sum(), name="c")
        storch.backward()
    x = a.tensor.detach()
    expected = (w.tensor * 2 * (x + eps.tensor[:, None] + eps2.tensor.detach())).mean(0) + 3.0  # mean over entries
    assert torch.allclose(mu.grad, expected, atol=1e-5)


def test_no_grad_is_no_escape_for_a_blackbox_value_on_a_pathwise_plate():
    """The refusal's message offered `with torch.no_grad(): storch.PlateTensor(r, z.plates)` to declare a value
    that does not depend on the sample; a black-box reward so wrapped was biased (review r-eight: z = 103). The
    wrap is refused whatever the grad mode while the node's samples need grad; an evaluation (samples drawn under
    no_grad) is not refused."""
    mu = torch.tensor([0.3, -0.6], requires_grad=True)
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    with storch.Graph():
        a = est(Normal(mu, 1.0))
        with torch.no_grad(), pytest.raises(storch.OrderError, match=r"Wrapping under torch.no_grad\(\) does not"):
            storch.PlateTensor(a.tensor.detach() ** 3, a.plates)
        storch.reset()
    with torch.no_grad(), storch.Graph():
        a = est(Normal(mu, 1.0))
        storch.add_cost(storch.PlateTensor((a.tensor ** 3).sum(-1), a.plates), name="eval")
        assert torch.isfinite(storch.surrogate_loss())


def test_a_blackbox_reward_of_a_score_node_below_a_pathwise_node_stays_allowed_and_exact():
    """z1 ~ N(theta, 1) by reparameterization, z2 ~ Bernoulli(logits=z1) by score, a reward computed in numpy from
    z2 alone: its plates (z2, z1) include z1's, and the wrap was refused (review r-eight), although the gradient
    is exact: z1 gets its gradient through z2's log-probability. E[r(z2)] = sum_b r(b) E[p(b | z1)], differentiated
    by quadrature."""
    rewards = np.array([0.0, 1.5])
    theta = torch.tensor([0.4], dtype=torch.float64, requires_grad=True)
    upper = storch.estimator("reparameterization", plate="z1", n_samples=4)
    lower = storch.estimator("score", plate="z2", n_samples=2, baseline="leave_one_out")

    def one():
        theta.grad = None
        z1 = upper(Normal(theta, 1.0))
        z2 = lower(Bernoulli(logits=z1))
        r = torch.as_tensor(rewards[z2.tensor.detach().long().numpy()], dtype=torch.float64).sum(-1)
        storch.add_cost(storch.PlateTensor(r, z2.plates), name="reward")
        storch.backward()
        return theta.grad

    x, w = np.polynomial.hermite_e.hermegauss(60)  # E over z1 ~ N(theta, 1) of 1.5 * sigmoid(z1)
    t = torch.tensor(x, dtype=torch.float64) + theta
    value = (torch.tensor(w) * rewards[1] * torch.sigmoid(t)).sum() / math.sqrt(2 * math.pi)
    exact, = torch.autograd.grad(value, theta)
    assert _ztest(one, exact, R=400) < 4


def test_integer_and_bool_values_on_a_pathwise_plate_are_not_checked():
    """Entry ids and masks (review r-eight: refused) carry no gradient by their dtype: not black-box floats."""
    mu = torch.tensor([0.3, -0.6], requires_grad=True)
    with storch.Graph():
        a = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(mu, 1.0))
        ids = storch.PlateTensor(torch.arange(4), a.plates)
        valid = storch.PlateTensor(torch.tensor([True, False, True, True]), a.plates)
        assert ids.plate_names == ("z",) and valid.dtype == torch.bool


def test_a_blackbox_value_on_a_score_function_plate_stays_allowed():
    # ids / noise per entry for a score-function node: it needs only the cost's value
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=5)(Categorical(logits=theta))
        ids = storch.PlateTensor(torch.arange(5), z.plates)
        noise = storch.PlateTensor(torch.randn(5), z.plates)
        storch.add_cost((z + ids).float() + noise, name="c")
        storch.backward()
    assert theta.grad is not None


# -- F9, F10


def test_a_numpy_array_is_refused_with_the_conversion():
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=5)(Categorical(logits=theta))
        for r in (np.zeros(5), [0.0] * 5):
            with pytest.raises(storch.PlateError, match=r"needs a torch tensor, got a (ndarray|list).*torch\.as_tensor"):
                storch.PlateTensor(r, z.plates)


def test_a_nan_in_some_entries_names_the_count_and_a_finite_penalty():
    theta = torch.zeros(4, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=4)(Categorical(logits=theta))
        r = torch.tensor([1.0, float("nan"), 2.0, 3.0])  # an invalid decode in one entry
        storch.add_cost(storch.PlateTensor(r, z.plates), name="reward")
        with pytest.raises(storch.NonFiniteCostError, match=r"'reward': 1 of 4 entries.*torch\.where\(torch\.isfinite"):
            storch.backward()


def test_ancestor_index_on_a_pathwise_plate_is_no_black_box_value():
    """storch.ancestor_index built its index with the public PlateTensor constructor, which refuses a no-grad value
    per entry of a pathwise node's plate: on a reparameterization node the index (of entries that stay in place)
    is arange, not a refusal."""
    from torch.distributions import Normal

    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(
            Normal(torch.zeros(2, requires_grad=True), 1.0))
        index = storch.ancestor_index(z, "z", step=0)
        assert index.plate_names == ("z",) and index.tensor.tolist() == [0, 1, 2]
