"""Partitions (paper, section 3.2): one estimator called in a loop makes one node with one plate."""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

R = 4000


class SequenceScore(storch.Estimator):
    """Score function over whole sequences (a test estimator built on the base protocol)."""

    name = "test_sequence_score"
    supports_partitions = True


def _cost(b1, b2, b3):
    return (b1 + 2 * b2 - 0.5 * b3 - 1.2) ** 2


def exact(theta):
    total = 0.0
    for b1, b2, b3 in itertools.product([0.0, 1.0], repeat=3):
        p1 = torch.sigmoid(theta[0])
        p2 = torch.sigmoid(theta[1] + theta[2] * b1)
        p3 = torch.sigmoid(theta[1] - theta[2] * b2)
        pr = (p1 if b1 else 1 - p1) * (p2 if b2 else 1 - p2) * (p3 if b3 else 1 - p3)
        total = total + pr * _cost(b1, b2, b3)
    return total


def test_autoregressive_bernoulli_sequence_is_unbiased_to_order_2():
    torch.manual_seed(5)
    theta = torch.tensor([0.3, -0.4, 1.1], dtype=torch.float64)
    est = SequenceScore(plate="seq", n_samples=3)
    with storch.Graph() as g:
        leaf, th = replicate(theta, R)
        b1 = est(Bernoulli(logits=th[0]))
        b2 = est(Bernoulli(logits=th[1] + th[2] * b1))
        b3 = est(Bernoulli(logits=th[1] - th[2] * b2))
        assert len(g.nodes) == 1 and b3.plates[0].name == "seq"
        storch.add_cost(_cost(b1, b2, b3))
        loss = storch.surrogate_loss(order=2)
        grad, hess = per_replicate_derivatives(loss, leaf, 2)
    t = theta.clone().requires_grad_(True)
    assert_unbiased(grad, torch.autograd.functional.jacobian(exact, t), "gradient")
    assert_unbiased(hess, torch.autograd.functional.hessian(exact, t), "Hessian")


def test_gaussian_random_walk_with_reparameterization():
    torch.manual_seed(6)
    mu = torch.tensor([0.7], dtype=torch.float64)
    est = storch.estimator("reparameterization", plate="walk", n_samples=2)
    with storch.Graph():
        leaf, m = replicate(mu, R)
        x = est(Normal(m[0], 1.0))
        for _ in range(3):
            x = est(Normal(x, 1.0))
        storch.add_cost(x ** 2)  # E = mu^2 + 4
        loss = storch.surrogate_loss(order=2)
        grad, hess = per_replicate_derivatives(loss, leaf, 2)
    assert_unbiased(grad, 2 * mu, "gradient")
    assert_unbiased(hess, torch.tensor([[2.0]]), "Hessian")


def test_partition_needs_support():
    est = storch.estimator("expect", plate="z")
    with storch.Graph():
        z = est(Bernoulli(logits=torch.zeros(())))
        with pytest.raises(storch.PlateError, match="partition"):
            est(Bernoulli(logits=z))


def test_partition_step_may_not_depend_on_a_later_node():
    est = SequenceScore(plate="seq")
    other = storch.estimator("expect", plate="other")
    with storch.Graph():
        est(Bernoulli(logits=torch.zeros(())))
        o = other(Bernoulli(logits=torch.zeros(())))
        with pytest.raises(storch.PlateError, match="topologically"):
            est(Bernoulli(logits=o))



# -- a node sampled after a partition started: what the refusal says, and that it works -------------
# (found by porting an RL loop: the refusal said to create "the less frequent" estimator anew per call,
# which is what a transition node made per step already is; it was refused with the same advice)

_ENV_P = torch.tensor([[[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]], [[0.1, 0.1, 0.8], [0.3, 0.4, 0.3]],
                       [[0.5, 0.25, 0.25], [0.05, 0.9, 0.05]]], dtype=torch.float64)  # P[s, a, s']
_ENV_R = torch.tensor([[1.0, -0.5], [0.3, 0.7], [-1.2, 0.4]], dtype=torch.float64)       # reward r(s, a)
_OPT_C = torch.tensor([[0.0, 1.0, 4.0], [1.0, 0.0, 2.0]], dtype=torch.float64)            # cost c(o, a)


def _renew_advice(partition: str, node: str) -> str:
    return (rf"step \d+ of partition '{partition}' depends on node '{node}', which was sampled after the "
            rf"partition started.*creating the estimator of '{node}' anew for each of its calls does not help"
            rf".*create the estimator of '{partition}' anew for each segment.*plate=f'{partition}\{{k\}}'"
            rf".*draw '{node}' with the estimator of '{partition}' itself.*plain torch.*rand_like")


def test_a_step_after_a_transition_node_says_to_renew_the_partition():
    """A policy partition whose next step depends on an environment transition drawn by a node made anew
    per step: the refusal says to create the policy's estimator anew per segment (not the transition's)."""
    est = SequenceScore(plate="ep", n_samples=2)
    with storch.Graph():
        s = torch.tensor(0)
        a = est(Categorical(logits=torch.zeros(3, 2)[s]))
        s = storch.estimator("expect", plate="env0")(Categorical(probs=_ENV_P[s, a]))
        with pytest.raises(storch.PlateError, match=_renew_advice("ep", "env0")) as info:
            est(Categorical(logits=torch.zeros(3, 2)[s]))
    assert "less frequent" not in str(info.value) and "partition too" not in str(info.value)


def test_a_step_after_an_option_made_anew_per_call_says_to_renew_the_partition():
    """An option every 2 steps, its estimator created anew per call, and one action partition: refused at
    the second option with the advice to create the action's estimator anew per option segment."""
    act = SequenceScore(plate="ep", n_samples=2)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=_renew_advice("ep", "opt1")):
            for t in range(4):
                if t % 2 == 0:
                    o = SequenceScore(plate=f"opt{t // 2}", n_samples=2)(Categorical(logits=torch.zeros(2)))
                act(Categorical(logits=torch.zeros(2, 3)[o]))


def _options_episode(pattern, theta, n=2, segments=2, k=2):
    """Options every k steps (logits theta[:2]); each segment's actions (logits theta[2:] per option)
    cost c(o, a)."""
    th_o, th_a = theta[:2], theta[2:].reshape(2, 3)
    one = SequenceScore(plate="ep", n_samples=n)
    for t in range(segments * k):
        if t % k == 0:
            if pattern == "renewed partition":  # the advice: the action partition anew per option segment
                o = SequenceScore(plate=f"opt{t // k}", n_samples=n)(Categorical(logits=th_o))
                act = SequenceScore(plate=f"ep{t // k}", n_samples=n)
            else:  # "one estimator": the option drawn by the action's estimator (one partition)
                act = one
                o = one(Categorical(logits=th_o))
        a = act(Categorical(logits=th_a[o]))
        storch.add_cost(_OPT_C[o, a], name="c")


def _options_exact(theta, segments=2, k=2):
    po, pa = torch.softmax(theta[:2], -1), torch.softmax(theta[2:].reshape(2, 3), -1)
    return segments * k * (po[:, None] * pa * _OPT_C).sum()


def _env_episode(pattern, theta, n=2, steps=3):
    """A tabular policy in a 3-state MDP with random transitions: the reward r(s, a) per step."""
    est = SequenceScore(plate="ep", n_samples=n)
    s = torch.tensor(0)
    for t in range(steps):
        if pattern == "one estimator per step":
            est = SequenceScore(plate=f"ep{t}", n_samples=n)
        a = est(Categorical(logits=theta[s]))
        storch.add_cost(-_ENV_R[s, a], name="r")
        if pattern == "plain torch":  # not a node: per entry (Categorical's sample reads the expanded probs)
            s = Categorical(probs=_ENV_P[s, a]).sample()
        elif pattern == "policy's estimator":
            s = est(Categorical(probs=_ENV_P[s, a]))
        else:  # exact transitions, one node per step
            s = storch.estimator("expect", plate=f"env{t}")(Categorical(probs=_ENV_P[s, a]))


def _env_exact(theta, steps=3):
    pi, d, total = torch.softmax(theta, -1), torch.zeros(3, dtype=theta.dtype), 0.0
    d[0] = 1.0
    for _ in range(steps):
        total = total - (d * (pi * _ENV_R).sum(-1)).sum()
        d = torch.einsum("s,sa,sak->k", d, pi, _ENV_P)
    return total


@pytest.mark.parametrize("case", [("options", "renewed partition"), ("options", "one estimator"),
                                  ("env", "one estimator per step"), ("env", "policy's estimator"),
                                  ("env", "plain torch")])
def test_what_the_refusal_advises_is_unbiased(case):
    """Each way the refusal names gives the exact gradient (z-test against enumeration)."""
    kind, pattern = case
    torch.manual_seed(11)
    if kind == "options":
        theta = torch.tensor([0.4, -0.3, 0.2, -0.5, 0.1, 0.6, 0.0, -0.4], dtype=torch.float64)
    else:
        theta = torch.tensor([[0.5, -0.2], [-0.3, 0.4], [0.1, 0.7]], dtype=torch.float64)
    with storch.Graph():
        leaf, th = replicate(theta, 2000)
        (_options_episode if kind == "options" else _env_episode)(pattern, th)
        grad, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    t = theta.clone().requires_grad_(True)
    exact = (_options_exact if kind == "options" else _env_exact)(t)
    assert_unbiased(grad, torch.autograd.grad(exact, t)[0].reshape(-1), "gradient")


def test_lineage_composes_per_entry_parents_over_steps():
    # one beam per data point: parents differ per entry of the data plate; a tensor of step 0
    # re-indexed to step 2 follows each entry's own ancestry
    from storch.extending import align

    lin = storch.Lineage()
    data = storch.Plate("data", 2, True, 0, storch.Lineage())
    p1 = torch.tensor([[1, 0], [1, 1], [0, 0]])  # (size at step 1, data): parent at step 0
    p2 = torch.tensor([[2, 0], [0, 2]])  # (size at step 2, data): parent at step 1
    lin.set_parents(1, p1, (data,))
    lin.set_parents(2, p2, (data,))
    s0, s2 = storch.Plate("z", 2, False, 0, lin), storch.Plate("z", 2, False, 2, lin)
    h0 = torch.tensor([10.0, 11.0])  # step 0, no data plate: expanded along it
    out = align(h0.unsqueeze(1), (s0, data), (s2, data))
    expected = torch.tensor([[h0[p1[p2[j, d], d]] for d in range(2)] for j in range(2)])
    assert torch.equal(out, expected)
    # the same index from either end (cached from the last step back) and with the plates swapped
    assert torch.equal(lin.index(0, 2), lin.index(0, 2)) and lin.index_plates_of(0, 2) == (data,)
    swapped = align(h0.unsqueeze(0).expand(2, 2), (data, s0), (data, s2))
    assert torch.equal(swapped, expected.t())
    with pytest.raises(storch.PlateError, match="declared"):
        lin.set_parents(3, torch.tensor([0, 1]), (data,))


def test_per_entry_parents_leave_a_broadcast_dim_of_an_earlier_step_broadcast():
    # a size-1 dim on the partition plate (a value shared by every entry, such as a gradient
    # function that is 0) reads the same value whichever parent each data point chose: it stays
    # size 1, as with parents shared by all data points (it was gathered with parent indices up
    # to k - 1 and failed with "index 1 is out of bounds")
    from storch.extending import align

    lin = storch.Lineage()
    data = storch.Plate("data", 2, True, 0, storch.Lineage())
    lin.set_parents(1, torch.tensor([[1, 0], [1, 1], [0, 0]]), (data,))
    s0, s1 = storch.Plate("z", 2, False, 0, lin), storch.Plate("z", 3, False, 1, lin)
    per_data = torch.tensor([[10.0, 11.0]])  # (z: 1, data: 2)
    assert torch.equal(align(per_data, (s0, data), (s1, data)), per_data)
    assert torch.equal(align(torch.zeros(1, 1, 1), (s0, data), (s1, data)), torch.zeros(1, 1, 1))
    swapped = align(per_data.t(), (data, s0), (data, s1))  # the partition plate not first
    assert torch.equal(swapped, per_data.t())
    # a full dim is still re-indexed per data point
    full = torch.tensor([[10.0, 11.0], [20.0, 21.0]])
    assert align(full, (s0, data), (s1, data)).tolist() == [[20.0, 11.0], [20.0, 21.0], [10.0, 11.0]]



# -- node.at(t): the view of step t holds step t's sample and distribution ------------------------

_W = torch.tensor([[0.8, -0.5], [-0.4, 0.9]], dtype=torch.float64)
_C = torch.tensor([1.0, -0.7], dtype=torch.float64)
_PHI = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64)  # a fixed control variate c(x) = φ0 + φ·x


class LinearCVScore(storch.Estimator):
    """Score function with a fixed control variate c(x) of known mean at every step of a partition:
    a_t = MagicBox(L_t - l_t) E_{p_t}[c] - MagicBox(L_t) c(x_t), zero in expectation at every order
    when x_t = node.sample and p_t = node.distribution are step t's (l_t = node.log_prob(x_t))."""

    name = "test_linear_cv_score"
    supports_partitions = True
    distributions = (Bernoulli,)

    def control_variate(self, node, cost):
        x, d = node.sample, node.distribution
        mu = _PHI[0] + (d.probs * _PHI[1:]).sum(-1)  # E_{p_t}[c], leading dims node.distribution_plates
        cx = _PHI[0] + (x * _PHI[1:]).sum(-1)  # c(x_t), leading dims node.plates
        total = node.gradient_values  # L_t
        before = total - node.log_prob(x)  # L_{t-1}: the steps before t
        return (cost.align(storch.magic_box(before)) * cost.align(mu, node.distribution_plates)
                - cost.align(storch.magic_box(total) * cx))


def _exact_two_steps(theta):
    total = 0.0
    vals = [torch.tensor(v, dtype=torch.float64) for v in itertools.product((0.0, 1.0), repeat=2)]
    p0 = torch.sigmoid(theta)
    for x0 in vals:
        w0 = torch.prod(torch.where(x0 > 0, p0, 1 - p0))
        p1 = torch.sigmoid(theta * 0.5 + x0 @ _W)
        total = total + w0 * ((x0 * _C).sum() - 0.3) ** 2
        for x1 in vals:
            w1 = torch.prod(torch.where(x1 > 0, p1, 1 - p1))
            total = total + w0 * w1 * ((x1 * _C).sum() + 0.5 * x0.sum() - 0.8) ** 2
    return total


def test_a_control_variate_reading_its_steps_sample_and_distribution_is_unbiased():
    """The view of a cost's step, node.at(t), held the LAST step's sample beside the FIRST step's
    distribution (the node overwrote node.sample at every step and the view copied it): a control variate
    c(x) with its exact mean E_p[c] was biased at order 0 already (value z ~ 30, gradient z ~ 44)."""
    torch.manual_seed(11)
    theta = torch.tensor([0.3, -0.6], dtype=torch.float64)
    est = LinearCVScore(plate="seq", n_samples=2)
    with storch.Graph():
        leaf, th = replicate(theta, R)
        x0 = est(Bernoulli(logits=th))
        storch.add_cost(((x0 * _C).sum(-1) - 0.3) ** 2, name="c0")
        x1 = est(Bernoulli(logits=th * 0.5 + x0 @ _W))
        storch.add_cost(((x1 * _C).sum(-1) + 0.5 * x0.sum(-1) - 0.8) ** 2, name="c1")
        loss = storch.surrogate_loss()
        # each replicate's estimate: the loss is the mean over R replicates (storch.testing.replicate)
        values = storch.cost_estimates()
        (grad,) = per_replicate_derivatives(loss, leaf, 1)
    t = theta.clone().requires_grad_(True)
    assert_unbiased(grad, torch.autograd.functional.jacobian(_exact_two_steps, t), "gradient")
    assert torch.isfinite(values["c0"]) and torch.isfinite(values["c1"])


def test_a_control_variate_value_is_zero_in_expectation_at_each_step():
    """Order 0: the value of a_t is E_{p_t}[c] - c(x_t); its mean over replicates is 0 only when the
    view's sample and distribution are of the same step."""
    torch.manual_seed(12)
    theta = torch.tensor([0.3, -0.6], dtype=torch.float64)
    seen = {}

    class Recording(LinearCVScore):
        def control_variate(self, node, cost):
            a = super().control_variate(node, cost)
            seen[cost.name] = a.detach().mean(cost.dim)  # (R,): one value per replicate
            return a

    est = Recording(plate="seq", n_samples=2)
    with storch.Graph():
        _, th = replicate(theta, R)
        x0 = est(Bernoulli(logits=th))
        storch.add_cost((x0 * _C).sum(-1), name="c0")
        x1 = est(Bernoulli(logits=th * 0.5 + x0 @ _W))
        storch.add_cost((x1 * _C).sum(-1), name="c1")
        storch.surrogate_loss()
    for name in ("c0", "c1"):
        assert_unbiased(seen[name].reshape(R, 1), torch.zeros(1, dtype=torch.float64), f"a of {name}")


def test_the_view_of_each_step_holds_that_steps_draw():
    est = SequenceScore(plate="seq", n_samples=3)
    with storch.Graph() as g:
        data = storch.denote_independent(torch.tensor([0.2, -0.4], dtype=torch.float64), 0, "data")
        d0 = Bernoulli(logits=data)
        x0 = est(d0)
        x1 = est(Bernoulli(logits=data + x0))
        x2 = est(Bernoulli(logits=data - x1))
        node = g.nodes[0]
        draws = [x0, x1, x2]
        for t in range(3):
            view = node.at(t)
            assert view.step == t and view.plate.step == t
            assert view.sample is draws[t].tensor and view.value is draws[t]
            assert view.plates == draws[t].plates
            assert view.first_distribution is node.distribution and view.first_parents == node.first_parents
        assert node.at(0).distribution is node.distribution and node.at(0).distribution_plates == node.first_parents
        assert node.at(0).original is d0
        for t in (1, 2):
            view = node.at(t)
            # a later step's distribution is drawn per prefix: led by the partition's plate at step t-1
            assert view.distribution is not node.distribution
            assert view.distribution_plates == (node.at(t - 1).plate,) + view.parents
            assert view.distribution.batch_shape == tuple(p.size for p in view.distribution_plates)
            # its log p of its own sample is the step's gradient function l_t = L_t - L_{t-1}
            torch.testing.assert_close(view.log_prob(view.sample),
                                       view.gradient_values - node.at(t - 1).gradient_values)
        assert node.steps == [x1.tensor, x2.tensor]
        assert node.sample is x2.tensor  # the node itself: the last step's sample, the first step's distribution


# -- sequences that end (eos): the view of step t of an entry finished before t -------------------

_S, _T, _EOS = 3, 3, 2  # a small MDP: state s, action a, action 2 ends the episode
_THETA = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4], [-0.3, 0.2, 0.6]], dtype=torch.float64)
_RTAB = torch.tensor([[1.0, -0.5, 0.2], [0.3, 2.0, -1.0], [-0.7, 0.4, 1.5]], dtype=torch.float64)
_PHI3 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # a control variate c(a) = φ[a]


def _exact_mdp(theta):
    """E[Σ_t r_t] by enumeration; an episode ends at the step that draws eos (its later steps are eos)."""
    total = 0.0
    for seq in itertools.product(range(_S), repeat=_T):
        s, lp, ret, done = 0, 0.0, 0.0, False
        for a in seq:
            if done:
                if a != _EOS:
                    lp = None
                    break
                continue
            lp = lp + torch.log_softmax(theta[s], -1)[a]
            ret = ret + _RTAB[s, a]
            done = a == _EOS
            s = (s + a + 1) % _S
        if lp is not None:
            total = total + torch.exp(lp) * ret
    return total


def _mdp_episode(est, th):
    s, done = torch.zeros((), dtype=torch.long), None
    for _ in range(_T):
        a = est(torch.distributions.Categorical(logits=th[s]))
        alive = 1.0 if done is None else 1.0 - done
        storch.add_cost(-_RTAB[s, a] * alive, name="r")
        d = (a == _EOS).double()
        done = d if done is None else torch.maximum(done, d)
        s = (s + a + 1) % _S


class EosCVScore(storch.Estimator):
    """The control variate of docs/partitions.md ("For estimator authors") with eos: a_t =
    MagicBox(L_{t-1}) E_{p_t}[c] - MagicBox(L_t) c(x_t), 0 on the entries finished before step t (they
    drew eos with probability 1)."""

    name = "test_eos_cv_score"
    supports_partitions = True
    form = "mask"

    def control_variate(self, node, cost):
        x, d = node.sample, node.distribution
        total = node.gradient_values  # L_t
        before = total - node.log_prob(x)  # L_{t-1}
        if self.form == "mask":  # E_{p_t}[c] from the distribution the user built, then a_t = 0 where done
            mu = (d.probs * _PHI3).sum(-1)
        else:  # E_{p_t}[c] from view.log_prob over the support: the point mass at eos where done
            support = d.enumerate_support(expand=False)  # (3, 1, ...)
            mu = (node.log_prob(support).exp() * _PHI3.reshape((3,) + (1,) * (support.dim() - 1))).sum(0)
        a = (cost.align(storch.magic_box(before)) * cost.align(mu, node.distribution_plates)
             - cost.align(storch.magic_box(total) * _PHI3[x]))
        if self.form == "mask" and node.step > 0:
            prev = node.at(node.step - 1)
            a = torch.where(cost.align(prev.finished, prev.plates), torch.zeros_like(a), a)
        return a


@pytest.mark.parametrize("form", ["mask", "log_prob"])
def test_a_control_variate_of_a_sequence_that_ends_is_unbiased(form):
    """view.log_prob(view.sample) was the user's distribution's log p on entries finished before step t
    (1.09, 1.60 where l_t is 0), and view.at(t - 1) on a view was the view itself: the documented
    control variate was biased (|z| 15-19 on the gradient)."""
    torch.manual_seed(3)
    est = EosCVScore(plate="ep", n_samples=2)
    est.eos, est.form = _EOS, form
    with storch.Graph():
        leaf, th = replicate(_THETA, R)
        _mdp_episode(est, th)
        (grad,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    t = _THETA.clone().requires_grad_(True)
    exact = torch.autograd.grad(_exact_mdp(t), t)[0]
    assert_unbiased(-grad, exact.reshape(-1), "gradient")


def test_the_view_log_prob_of_its_sample_is_l_t_with_eos():
    """On an entry finished before step t the step draws eos with log-probability 0 (mask_after_eos):
    the view's log_prob agrees (0 for eos, -inf for another value), at every step."""
    torch.manual_seed(0)
    est = SequenceScore(plate="ep", n_samples=64)
    est.eos = _EOS  # (the base class's end-of-sequence option; score's eos=)
    with storch.Graph() as g:
        _mdp_episode(est, _THETA)
        node = g.nodes[0]
        for t in range(1, _T):
            view, prev = node.at(t), node.at(t - 1)
            l_t = view.gradient_values - prev.gradient_values
            assert bool(prev.finished.any()) and not bool(prev.finished.all())
            torch.testing.assert_close(view.log_prob(view.sample), l_t)
            other = torch.zeros_like(view.sample)  # not eos: impossible where the sequence had ended
            lp = view.log_prob(other)
            assert bool((lp[prev.finished] == -math.inf).all()) and bool(torch.isfinite(lp[~prev.finished]).all())


def test_at_on_a_view_is_the_view_of_the_partition():
    """view.at(s) was the view itself whatever s (a view is no partition: its step log is cleared)."""
    est = SequenceScore(plate="ep", n_samples=3)
    est.eos = _EOS
    with storch.Graph() as g:
        _mdp_episode(est, _THETA)
        node = g.nodes[0]
        for t in range(_T):
            for s in range(_T):
                assert node.at(t).at(s) is node.at(s)
        assert node.at(2).at(0).finished is node.at(0).finished


# -- eos with a stochastic environment: transitions drawn with plain torch, not by the partition ------

_P_ENV = torch.tensor([[[0.6, 0.0, 0.4], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]],
                       [[0.0, 0.5, 0.5], [0.8, 0.2, 0.0], [0.2, 0.2, 0.6]],
                       [[0.3, 0.0, 0.7], [0.5, 0.25, 0.25], [0.9, 0.1, 0.0]]], dtype=torch.float64)  # P[s, a, s']


def _exact_env(theta, s=0, t=0):
    """E[Σ_t r_t] by recursion over states: action _EOS ends the episode (its reward is still paid)."""
    if t == _T:
        return 0.0
    pi = torch.softmax(theta[s], -1)
    total = 0.0
    for a in range(_S):
        later = 0.0 if a == _EOS else sum(_P_ENV[s, a, n] * _exact_env(theta, n, t + 1) for n in range(_S))
        total = total + pi[a] * (_RTAB[s, a] + later)
    return total


def test_eos_with_an_environment_drawn_with_plain_torch_is_unbiased():
    """docs/partitions.md ('Variable length: eos='): with eos=, environment transitions are drawn with
    plain torch (option 1) and the costs of finished episodes masked; z-tested against the exact gradient."""
    torch.manual_seed(4)
    est = SequenceScore(plate="ep", n_samples=2)
    est.eos = _EOS
    with storch.Graph():
        leaf, th = replicate(_THETA, R)
        s, done = torch.zeros((), dtype=torch.long), None
        for _ in range(_T):
            a = est(Categorical(logits=th[s]))
            alive = 1.0 if done is None else 1.0 - done
            storch.add_cost(-_RTAB[s, a] * alive, name="r")
            d = (a == _EOS).double()
            done = d if done is None else torch.maximum(done, d)
            s = Categorical(probs=_P_ENV[s, a]).sample()  # the environment: plain torch, per entry
        (grad,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    t = _THETA.clone().requires_grad_(True)
    exact = torch.autograd.grad(_exact_env(t), t)[0]
    assert_unbiased(-grad, exact.reshape(-1), "gradient")


@pytest.mark.parametrize("transition", ["states", "one_hot", "normal"])
def test_eos_refuses_a_step_of_another_support(transition):
    """eos applies to every step of a partition: a transition drawn by the policy's estimator (docs option 2)
    was forced to state eos once an entry had stopped, a state of probability 0 (P = [0.5, 0, 0.5] drew
    state 1 for every stopped entry; the tester's MDP gradient was off by z = 14 eager, 17 compiled).
    A step whose support differs from the first step's (values, class, event shape) is refused."""
    torch.manual_seed(0)
    est = SequenceScore(plate="ep", n_samples=8)
    est.eos = 1
    step = {"states": lambda: Categorical(probs=torch.tensor([0.5, 0.0, 0.5])),
            "one_hot": lambda: torch.distributions.OneHotCategorical(logits=torch.zeros(2)),
            "normal": lambda: Normal(0.0, 1.0)}[transition]
    with storch.Graph():
        est(Categorical(logits=torch.zeros(2, requires_grad=True)))  # the policy: action 1 stops
        with pytest.raises(storch.OptionError, match=r"(?s)step 1 of its partition.*EVERY later step.*plain torch"):
            est(step())


def test_eos_accepts_later_steps_of_the_same_support():
    """Steps of the first step's support (the tokens of a sequence, whatever their logits) are accepted
    (a transition with as many states as actions cannot be told apart: docs/partitions.md says so)."""
    est = SequenceScore(plate="ep", n_samples=4)
    est.eos = 1
    with storch.Graph():
        a = est(Categorical(logits=torch.zeros(3)))
        b = est(Categorical(logits=torch.stack([torch.zeros(3), torch.ones(3), torch.arange(3.0)])[a]))
        assert b.plates[0].step == 1


# -- a table made at step 0 written in place at later steps (tabular RL in an episode) ----------

_WRITES = {
    "counts[s, a] += 1": lambda tab, s, a: tab.__setitem__((s, a), tab[s, a] + 1),
    "counts[s][a] += 1": None,  # (written out below: a write through the copy tab[s])
    "Q[s, a] = Q[s, a] + 0.1": lambda tab, s, a: tab.__setitem__((s, a), tab[s, a] + 0.1),
    "visited[s][a] = 1": None,
    "tab[s] = a": lambda tab, s, a: tab.__setitem__(s, a.to(tab.dtype)),
    "tab[s == a] = 2": lambda tab, s, a: tab.__setitem__(torch.arange(_S) == a, 2.0),
    "tab.add_(a)": lambda tab, s, a: tab.add_(a.to(tab.dtype)),
}


def _write(form, tab, s, a):
    if form == "counts[s][a] += 1":
        tab[s][a] += 1
    elif form == "visited[s][a] = 1":
        tab[s][a] = 1
    else:
        _WRITES[form](tab, s, a)


@pytest.mark.parametrize("with_data", [False, True])
@pytest.mark.parametrize("form", list(_WRITES))
def test_a_table_of_step_0_written_in_place_at_later_steps(form, with_data):
    """Sampling with replacement: entry i of step t continues entry i of step t-1, so an in-place write
    at step t into a per-entry table made at step 0 is exact per entry (as a plain loop over the entries).
    It raised "the index or the value varies over plates []" (the table's plate was step 0's)."""
    torch.manual_seed(0)
    est = SequenceScore(plate="ep", n_samples=5)
    logits = torch.randn(_S, _S, dtype=torch.float64)
    with storch.Graph():
        s0 = storch.denote_independent(torch.tensor([0, 1]), 0, "batch") if with_data else torch.tensor(0)
        s, tab, actions = s0, None, []
        for _ in range(_T):
            a = est(torch.distributions.Categorical(logits=logits[s]))
            actions.append(a)
            if tab is None:
                tab = torch.zeros(_S, _S, dtype=torch.float64) + 0.0 * a[..., None, None]
            plates = tab.plates
            _write(form, tab, s, a)
            assert tab.plates == plates  # an in-place write keeps the table's plates
            s = (s + a + 1) % _S
        out = tab.tensor
        raw = [x.tensor.expand(out.shape[:len(tab.plates)]) for x in actions]
    s0 = torch.tensor([0, 1]) if with_data else torch.tensor(0)
    for idx in itertools.product(*(range(n) for n in out.shape[:len(tab.plates)])):
        ref, s = torch.zeros(_S, _S, dtype=torch.float64), int(s0[idx[1]]) if with_data else 0
        for a_t in raw:  # the plain-torch loop for one entry
            a = a_t[idx]
            _write(form, ref, torch.tensor(s), a)
            s = (s + int(a) + 1) % _S
        torch.testing.assert_close(out[idx], ref)


class MyPathwise(storch.Estimator):
    """A third-party pathwise estimator written from docs/writing-an-estimator.md: rsample proposal, l = 0,
    and no partition hooks (extend, step_gradient_function) of its own."""

    name = "test_third_party_pathwise"
    requires_rsample = True
    supports_partitions = True

    def proposal(self, node):
        return node.distribution.rsample((self.n_samples,))

    def gradient_function(self, node):
        return torch.zeros((1,), dtype=node.sample.dtype, device=node.sample.device)  # pathwise: l = 0


@pytest.mark.parametrize("n_samples", [1, 3])
def test_a_third_party_estimator_s_later_partition_steps_use_its_own_components(n_samples):
    # found by a tester: the later steps got the base class's extend (a draw scored with log p), so a
    # pathwise estimator's step 1 was differentiated twice, pathwise and by the score (max |z| 51)
    torch.manual_seed(11)
    theta = torch.tensor([0.4, -0.9], dtype=torch.float64)
    est = MyPathwise(plate="x", n_samples=n_samples)
    with storch.Graph() as g:
        leaf, th = replicate(theta, R)
        x0 = est(Normal(th[0], 1.0))
        x1 = est(Normal(x0, th[1].exp()))  # step 1 of the partition
        assert len(g.nodes) == 1 and x1.plates[0].step == 1
        storch.add_cost((x1 - x0) ** 2 + x0 ** 2)  # E = exp(2 th1) + th0^2 + 1
        assert torch.count_nonzero(g.nodes[0].step_log[1][1]) == 0  # l_1 is the estimator's 0
        (grad,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(grad, torch.stack([2 * theta[0], 2 * torch.exp(2 * theta[1])]), "gradient")


def test_a_later_partition_step_hands_out_the_estimator_s_output():
    class Exp(MyPathwise):
        name = "test_third_party_exp_output"

        def output(self, node):
            return node.sample.exp()

    torch.manual_seed(2)
    est = Exp(plate="x", n_samples=2)
    with storch.Graph() as g:
        y0 = est(Normal(torch.tensor(0.3), 1.0))
        y1 = est(Normal(y0.log(), 0.5))
        node = g.nodes[0]
        assert torch.equal(y1.tensor, node.sample.exp()) and torch.equal(y0.tensor, node.at(0).sample.exp())
        assert node.at(1).value is y1


def _pathwise_subclass(component):
    """A subclass of the built-in pathwise estimator with a component of its own (a user's variant)."""
    base = storch.estimator("reparameterization", plate="x").__class__
    if component == "gradient_function":
        class Scored(base):  # l = log p: its later steps would inherit step_gradient_function's l_t = 0
            name = "test_scored_pathwise"

            def gradient_function(self, node):
                return node.log_prob(node.sample)
        return Scored

    class Proposed(base):  # its later steps would be drawn by the inherited draw, not by this proposal
        name = "test_proposed_pathwise"

        def proposal(self, node):
            return node.distribution.rsample((self.n_samples,))
    return Proposed


@pytest.mark.parametrize("component, hooks", [("gradient_function", "step_gradient_function or extend"),
                                              ("proposal", "draw or extend")])
def test_components_below_the_partition_hooks_are_refused_at_step_1_not_at_creation(component, hooks):
    # a reviewer found: refusing such a class when it was created (the earlier rule) broke a subclass that is
    # never used in a partition; it is refused where its steps would be wrong: the second call in a graph
    cls = _pathwise_subclass(component)
    est = cls(plate="x", n_samples=2)
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    with storch.Graph():
        x = est(Normal(theta, 1.0))  # a single node: its own components, as before the partition rule
        storch.add_cost((x ** 2).sum(-1))
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
        assert torch.isfinite(g).all()
    with storch.Graph():
        x = est(Normal(theta, 1.0))
        with pytest.raises(storch.StorchError, match=rf"step 1 of its partition.*{cls.__qualname__} overrides "
                                                     rf"{component} without {hooks} in that class or a subclass"):
            est(Normal(x, 1.0))


class HalfScore(storch.Estimator):
    """l = 0.5 log p, with draw (a partition hook) overridden in the same class (a reviewer's repro)."""

    name = "test_half_score"
    supports_partitions = True

    def draw(self, distribution, shape):
        return super().draw(distribution, shape)

    def gradient_function(self, node):
        return 0.5 * super().gradient_function(node)


def test_a_component_is_paired_with_its_own_hook_not_with_any_hook():
    # the earlier rule compared the components with the shallowest hook (draw, in the same class), so this class
    # passed, and its later steps were scored by the base step_gradient_function (log p, not 0.5 log p): a
    # silently doubled score term. gradient_function pairs with step_gradient_function or extend only
    est = HalfScore(plate="x", n_samples=3)
    with storch.Graph():
        y0 = est(Normal(torch.tensor(0.3), 1.0))
        with pytest.raises(storch.StorchError, match="HalfScore overrides gradient_function without "
                                                     "step_gradient_function or extend.*scored by"):
            est(Normal(y0, 1.0))

    class HalfSteps(HalfScore):  # with its hook: step t is scored by 0.5 log p too
        name = "test_half_steps"

        def step_gradient_function(self, node, distribution, sample, plates):
            return 0.5 * super().step_gradient_function(node, distribution, sample, plates)

    torch.manual_seed(0)
    est = HalfSteps(plate="x", n_samples=3)
    with storch.Graph() as g:
        y0 = est(Normal(torch.tensor(0.3), 1.0))
        est(Normal(y0 - 0.2, 1.0))
        node = g.nodes[0]
        torch.testing.assert_close(node.step_log[1][1], 0.5 * Normal(y0.tensor - 0.2, 1.0).log_prob(node.sample))


class Spin(SequenceScore):
    """Hands out a ±1 spin, 2 b - 1, instead of the Bernoulli's {0, 1}."""

    name = "test_spin"

    def output(self, node):
        return 2 * node.sample - 1


def test_an_extend_returns_the_output_of_an_estimator_that_overrides_output():
    # a reviewer found: extend returned (sample, l_t) only, so an estimator overriding extend and output handed
    # out the raw {0, 1} sample at later steps; extend may return (sample, l_t, output)
    class SpinSteps(Spin):
        name = "test_spin_steps"

        def extend(self, node, distribution, plates):
            sample, lp = super().extend(node, distribution, plates)
            return sample, lp, 2 * sample - 1

    torch.manual_seed(0)
    est = SpinSteps(plate="x", n_samples=4)
    with storch.Graph() as g:
        s0 = est(Bernoulli(logits=torch.tensor(0.0)))
        s1 = est(Bernoulli(logits=0.5 * s0))
        node = g.nodes[0]
        assert torch.equal(s1.tensor, 2 * node.sample - 1) and torch.equal(s0.tensor, 2 * node.at(0).sample - 1)
        assert node.at(1).value is s1 and set(s1.tensor.tolist()) <= {-1.0, 1.0}


def test_an_extend_without_the_output_of_an_estimator_that_overrides_output_is_refused():
    class TwoTuple(Spin):  # extend paired with output (same class or a subclass), but it returns (sample, l_t)
        name = "test_spin_two_tuple"

        def extend(self, node, distribution, plates):
            return super().extend(node, distribution, plates)

    class OutputBelow(TwoTuple):  # output overridden in a subclass of the class that wrote extend
        name = "test_spin_output_below"

        def output(self, node):
            return 1 - 2 * node.sample

    class WrongShape(Spin):
        name = "test_spin_wrong_shape"

        def extend(self, node, distribution, plates):
            sample, lp = super().extend(node, distribution, plates)
            return sample, lp, (2 * sample - 1)[:1]

    for cls, match in [(TwoTuple, r"overrides output \(in Spin\), but its extend returned \(sample, l_t\) at step 1"
                                  r".*third element"),
                       (OutputBelow, "OutputBelow overrides output without extend in that class or a subclass"),
                       (WrongShape, r"extend \(its third element\) returned a tensor of shape \(1,\)")]:
        est = cls(plate="x", n_samples=2)
        with storch.Graph():
            s0 = est(Bernoulli(logits=torch.tensor(0.0)))
            with pytest.raises(storch.StorchError, match=match):
                est(Bernoulli(logits=s0))


def test_weights_of_a_sequence_from_the_components_are_refused():
    class Weighted(SequenceScore):
        name = "test_weighted_sequence"

        def weighting_function(self, node):
            return torch.full((node.n,), 1.0 / node.n)

    est = Weighted(plate="x", n_samples=2)
    with storch.Graph():
        b = est(Bernoulli(logits=torch.tensor(0.2)))
        with pytest.raises(storch.StorchError, match="weighting_function.*step 1.*extend"):
            est(Bernoulli(logits=b - 0.5))


def test_a_proposal_whose_draws_are_the_base_draw_says_so_with_the_base_draw():
    """A pathwise estimator written like the built-in reparameterization before it had its own draw (proposal =
    rsample, step_gradient_function = 0) is refused at step 1 (storch cannot tell its proposal is the base
    draw); `draw = storch.Estimator.draw` in the class says so, and its steps are the built-in's (same draws)."""

    class OldPathwise(storch.Estimator):
        requires_rsample = True
        supports_partitions = True

        def proposal(self, node):
            return node.distribution.rsample((self.n_samples,))

        def gradient_function(self, node):
            return torch.zeros((1,), dtype=node.sample.dtype)

        def step_gradient_function(self, node, distribution, sample, plates):
            return torch.zeros((1,), dtype=sample.dtype)

    class SaysSo(OldPathwise):
        draw = storch.Estimator.draw

    mu = torch.tensor([0.2, -0.3], dtype=torch.float64, requires_grad=True)

    def episode(est):
        torch.manual_seed(0)
        with storch.Graph():
            s = None
            for t in range(3):
                s = est(Normal(mu if s is None else mu + 0.5 * torch.tanh(s), 1.0))
                storch.add_cost((s ** 2).sum(-1) * (t + 1), name=f"c{t}")
            return torch.autograd.grad(storch.surrogate_loss(), mu)[0]

    with pytest.raises(storch.StorchError, match=r"proposal without draw or extend.*draw = storch\.Estimator\.draw"):
        episode(OldPathwise(plate="x", n_samples=3))
    builtin = episode(storch.estimator("reparameterization", plate="x", n_samples=3))
    torch.testing.assert_close(episode(SaysSo(plate="x", n_samples=3)), builtin)


def test_lineage_broadcasts_shapes_as_torch_does():
    """The lineage's re-indexing broadcasts shapes in plain Python (torch.broadcast_shapes cost ~40 us a call,
    a few calls per step and cost of a sequence): the same shapes as torch's, the same refusal."""
    from storch.plates.tensor import _broadcast_shapes

    cases = [((4, 16, 1), (1, 16, 1)), ((3,), (2, 1)), ((), (5, 2)), ((0, 1), (1, 7)), ((1,), (1,)),
             (torch.Size([2, 1, 3]), [4, 1])]
    for a, b in cases:
        assert _broadcast_shapes(a, b) == tuple(torch.broadcast_shapes(a, b))
    with pytest.raises(RuntimeError, match="cannot be broadcast"):
        _broadcast_shapes((4, 3), (2, 3))


def test_eos_support_reads_the_users_class_and_counts_categories_without_enumerating(monkeypatch):
    """The eos check compares the user's class (a saturated Bernoulli that strict_support copied is still a
    Bernoulli: unordered_set refused a binary sequence when one step saturated) and reads a (one-hot) categorical's
    number of values from its parameters (enumerating a OneHotCategorical's support built eye(K) per step:
    K = 8000 doubled the step; review r-eighteen)."""
    from torch.distributions import Bernoulli, OneHotCategorical

    from storch.distributions.support import strict_support
    from storch.estimators.step_checks import _eos_support

    plain = Bernoulli(logits=torch.zeros(2))
    saturated = strict_support(Bernoulli(logits=torch.tensor([float("inf"), 0.0])))
    assert type(saturated) is not Bernoulli  # (the strict copy)
    assert _eos_support(saturated) == _eos_support(plain)

    def no_enumeration(self, expand=True):
        raise AssertionError("enumerate_support called")
    monkeypatch.setattr(OneHotCategorical, "enumerate_support", no_enumeration)
    monkeypatch.setattr(Categorical, "enumerate_support", no_enumeration)
    assert _eos_support(OneHotCategorical(logits=torch.zeros(8000)))[2] == 8000
    assert _eos_support(Categorical(probs=torch.tensor([0.5, 0.0, 0.5])))[2] == 3


def test_eos_set_after_a_partition_began_is_refused():
    """est.eos set in the middle of an episode (review r-27): the earlier steps recorded no finished entries, so the
    step crashed with an AttributeError; now an OptionError that says when to set eos."""
    torch.manual_seed(0)
    th = torch.randn(3, requires_grad=True)
    est = SequenceScore("e", n_samples=4)
    with storch.Graph():
        s = est(Bernoulli(logits=th[0]))
        s = est(Bernoulli(logits=th[1] + th[2] * s))
        est.eos = 1
        with pytest.raises(storch.OptionError, match="eos was set after its partition began"):
            est(Bernoulli(logits=th[1] + th[2] * s))
