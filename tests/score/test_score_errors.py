"""Registration, OrderError, and clear errors for bad options and unsupported distributions."""

import math
import re
import warnings

import pytest
import torch
from torch.distributions import (
    Bernoulli, Beta, Binomial, Categorical, Exponential, Geometric, Laplace, Multinomial, NegativeBinomial, Normal,
    OneHotCategorical, Pareto, Independent, Poisson, Uniform,
)

import storch
from user_distributions import UserCategorical
from twice import differentiate_twice

torch.set_default_dtype(torch.float64)


def test_registered_through_entry_points():
    info = storch.available_estimators()
    for name, order in (("score", math.inf), ("importance", math.inf), ("sum_and_sample", math.inf),
                        ("unordered_set", 1), ("vimco", math.inf)):
        assert info[name].package == "storch-estimators-score"
        assert info[name].family == "score"
        assert info[name].max_order == order
        assert not info[name].biased
    assert storch.get_estimator_class("reinforce") is storch.get_estimator_class("score")
    assert storch.get_estimator_class("mapo") is storch.get_estimator_class("sum_and_sample")
    import storch_score
    assert set(storch_score.__all__) == {"Score", "Importance", "SumAndSample", "SumAndSampleSequences", "UnorderedSet", "Vimco",
                                         "LearnedBaseline", "storch_estimators"}


def test_info_and_order_error_use_the_instance_capabilities():
    """unordered_set without its baseline is unbiased at any order: est.info() and the surrogate say so."""
    plain = storch.estimator("unordered_set", plate="z", n_samples=2, baseline=False)
    with_baseline = storch.estimator("unordered_set", plate="y", n_samples=2)
    assert storch.available_estimators()["unordered_set"].max_order == 1  # the class default
    assert plain.info().max_order == math.inf and with_baseline.info().max_order == 1
    assert plain.info().package == "storch-estimators-score"
    theta = torch.tensor([0.2, -0.3, 0.5], requires_grad=True)
    with storch.Graph():
        z = plain(torch.distributions.Categorical(logits=theta))
        storch.add_cost((z.to(theta.dtype) - 1.0) ** 2)
        storch.surrogate_loss(order=2)  # no OrderError: the instance's max_order is inf
    with storch.Graph():
        y = with_baseline(torch.distributions.Categorical(logits=theta))
        storch.add_cost((y.to(theta.dtype) - 1.0) ** 2)
        with pytest.raises(storch.OrderError, match=r"unordered_set.*up to order 1.*est.info\(\)"):
            storch.surrogate_loss(order=2)


def test_unordered_set_with_baseline_refuses_order_2():
    est = storch.estimator("unordered_set", plate="z", n_samples=3)
    with storch.Graph():
        z = est(Categorical(logits=torch.zeros(5, requires_grad=True)))
        storch.add_cost(z.double())
        storch.surrogate_loss(order=1)
        with pytest.raises(storch.OrderError, match=r"unordered_set.*'z'.*order 2"):
            storch.surrogate_loss(order=2)
    plain = storch.estimator("unordered_set", plate="z", n_samples=3, baseline=False)
    assert plain.max_order == math.inf and est.max_order == 1


def test_order_error_of_a_partition_says_what_sum_and_sample_needs_there():
    """unordered_set called once per step, asked for order 2: the refusal offers sum_and_sample for the partition and
    now says it needs buffer= and one token per call (plain sum_and_sample's second call was refused in turn, and a
    joint Bernoulli of two agents for its batch dim; found by porting LOLA, p-lola)."""
    est = storch.estimator("unordered_set", plate="ep", n_samples=2)
    theta = torch.zeros(2, requires_grad=True)
    with storch.Graph():
        for _ in range(2):
            a = est(Categorical(logits=theta))
            storch.add_cost(a.double(), name="c")
        with pytest.raises(storch.OrderError, match=r"sum_and_sample \(a partition needs buffer=K.*one token per call"):
            storch.surrogate_loss(order=2)


def test_order_error_names_a_users_subclass_by_its_class():
    """A user's subclass that lowers max_order inherits the registered name; the refusal names the class (it used to
    say "estimator 'score' ... is unbiased only up to order 2", and offer 'score' as the fix; p-lola)."""
    Score = storch.get_estimator_class("score")

    class Score2(Score):
        max_order = 2

    theta = torch.tensor([0.2, -0.3], requires_grad=True)
    with storch.Graph():
        z = Score2(plate="z", n_samples=2)(Categorical(logits=theta))
        storch.add_cost(z.double())
        with pytest.raises(storch.OrderError, match=r"estimator Score2 \(a subclass of 'score'\) on plate 'z' is "
                           r"unbiased only up to order 2"):
            storch.surrogate_loss(order=3)
    with storch.Graph():  # a first-party estimator keeps its registered name
        z = storch.estimator("unordered_set", plate="z", n_samples=2)(Categorical(logits=theta))
        storch.add_cost(z.double())
        with pytest.raises(storch.OrderError, match=r"estimator 'unordered_set' on plate 'z'"):
            storch.surrogate_loss(order=2)


@pytest.mark.parametrize("name,options,match", [
    ("score", dict(baseline="mean"), r"baseline='mean'.*'leave_one_out'"),
    ("score", dict(baseline="leave_one_out"), r"n_samples >= 2.*n_samples=1"),
    ("score", dict(baseline="batch_average", n_samples=1), r"n_samples >= 2"),
    ("score", dict(baseline="moving_average", decay=1.0), r"decay.*\[0, 1\)"),
    ("score", dict(n_samples=0), r"n_samples must be an int >= 1"),
    ("score", dict(temperature=0.5), r"no option 'temperature'"),
    ("importance", dict(), r"`proposal` is required"),
    ("importance", dict(proposal=3), r"proposal=3 is not accepted"),
    ("sum_and_sample", dict(n_enumerate=2, memory=torch.tensor([0])), r"either n_enumerate.*or memory"),
    ("sum_and_sample", dict(n_enumerate=-1), r"n_enumerate must be an int >= 0"),
    ("sum_and_sample", dict(baseline="leave_one_out"), r"needs n_samples >= 2"),
    ("sum_and_sample", dict(baseline="self_critical", n_samples=2), r"baseline='self_critical'"),
    ("sum_and_sample", dict(memory="top"), r"memory='top' is not accepted"),
    ("unordered_set", dict(baseline="kool"), r"baseline must be True"),
    ("unordered_set", dict(n_samples=1), r"needs n_samples >= 2.*baseline=False"),
    ("unordered_set", dict(budget=0), r"budget must be an int >= 1"),
])
def test_bad_options(name, options, match):
    with pytest.raises(storch.OptionError, match=match):
        storch.estimator(name, plate="z", **options)


def test_integer_options_accept_numpy_integers():
    """n_samples=np.int64(4) and the family's other integer options (budget, eos, n_enumerate, n_draws,
    hidden) were OptionErrors; they are accepted as Python ints (a bool or a float still is not)."""
    np = pytest.importorskip("numpy")
    i = np.int64
    made = [storch.estimator("score", plate="z", n_samples=i(4), baseline="leave_one_out"),
            storch.estimator("score", plate="z", baseline="learned", hidden=i(8)),
            storch.estimator("unordered_set", plate="z", n_samples=i(4), budget=i(64)),
            storch.estimator("sum_and_sample", plate="z", n_samples=i(3), n_enumerate=i(1), budget=i(64))]
    assert made[2].budget == 64 and type(made[2].budget) is int and type(made[3].budget) is int
    assert all(type(e.n_samples) is int for e in made)  # (stored as a Python int: its repr, plate sizes)
    assert type(storch.estimator("vimco", plate="z", n_draws=i(3)).n_draws) is int
    for name in ("score", "unordered_set"):  # eos: a sequence's end token (not run here: no sequence)
        assert type(storch.estimator(name, plate="z", n_samples=2, eos=i(1)).eos) is int
    theta = torch.zeros(3, requires_grad=True)
    for est in made:
        with storch.Graph():
            z = est(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.45) ** 2).sum())
            storch.surrogate_loss().backward()
    for bad in (np.bool_(True), 4.0, torch.tensor(4)):
        with pytest.raises(storch.OptionError, match="n_samples must be an int >= 1"):
            storch.estimator("score", plate="z", n_samples=bad)


@pytest.mark.parametrize("name,options", [
    ("sum_and_sample", dict(n_samples=2)), ("unordered_set", dict(n_samples=2)), ("mapo", dict()),
])
def test_continuous_distribution_is_refused(name, options):
    est = storch.estimator(name, plate="z", **options)
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError, match=r"does not support Normal.*finite support.*score"):
            est(Normal(torch.zeros(2), 1.0))


@pytest.mark.parametrize("name,options", [
    ("score", dict(n_samples=8)), ("score", dict(n_samples=4, baseline="leave_one_out")),
    ("score", dict(baseline="moving_average")), ("importance", dict(proposal=Uniform(0.0, 5.0), n_samples=4)),
])
@pytest.mark.parametrize("make,param", [
    (lambda h: Uniform(torch.zeros(()), h), "high"), (lambda h: Pareto(h, torch.tensor(3.0)), "scale"),
])
def test_support_that_moves_with_a_parameter_is_refused(name, options, make, param):
    """z ~ Uniform(0, h): the score identity misses the boundary term, d/dh E[z²] = 2h/3 but score@8 gave
    -h/3 and leave-one-out 0 (found by porting); Pareto's support [scale, ∞) likewise. Refused, pointing to
    reparameterization; with the bound detached the node is fine."""
    h = torch.tensor(1.5, requires_grad=True)
    est = storch.estimator(name, plate="z", **options)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as info:
        est(make(h))
    msg = str(info.value)
    assert f"{name!r}" in msg and param in msg and "'reparameterization'" in msg
    if name != "score":
        return
    with storch.Graph():
        storch.add_cost(est(make(h.detach())))
        storch.surrogate_loss()


@pytest.mark.parametrize("name,options", [
    ("score", dict(n_samples=4)), ("score", dict(n_samples=4, baseline="leave_one_out")),
    ("importance", dict(proposal=Normal(0.0, 3.0), n_samples=4)),
])
def test_order_2_is_refused_on_a_kink_of_log_p(name, options):
    """Laplace's log p has |x - loc|: the delta of its second derivative in loc is lost, and the order-2
    estimates of d²/dloc² E[z²] = 2 were 0 (leave-one-out) and 2.16 ± 0.02 (importance), found by porting.
    Order 2 raises an OrderError that says why and what to do; order 1 is unchanged."""
    loc = torch.tensor(0.3, requires_grad=True)
    est = storch.estimator(name, plate="z", **options)
    with storch.Graph():
        z = est(Laplace(loc, 0.8))
        storch.add_cost(z ** 2)
        g, = torch.autograd.grad(storch.surrogate_loss(order=1), loc)
        assert torch.isfinite(g)
        with pytest.raises(storch.OrderError, match=rf"'{name}'.*Laplace.*loc.*AbsBackward0.*'reparameterization'"):
            storch.surrogate_loss(order=2)


@pytest.mark.parametrize("name,options", [
    ("score", dict(n_samples=4)), ("score", dict(n_samples=4, baseline="leave_one_out")),
    ("importance", dict(proposal=Normal(0.0, 3.0), n_samples=4)),
])
@pytest.mark.parametrize("how", ["hessian", "grad_of_grad"])
def test_order_1_surrogate_differentiated_twice_is_refused_on_a_kink_of_log_p(name, options, how):
    """surrogate_loss(order=2) refuses Laplace(loc learned) (above), but the order-1 surrogate differentiated
    twice gave a Hessian of d²/dloc² E[z²] = 2 of 4.30 (score@16, z 29) without a word (found by porting): the
    create_graph=True pass through its log p is refused, naming the distribution and the kink. First order is
    unaffected; a Normal (smooth log p) still differentiates twice."""
    est = storch.estimator(name, plate="z", **options)

    def f(make):
        def loss(loc):
            with storch.Graph():
                storch.add_cost(est(make(loc)) ** 2)
                return storch.surrogate_loss()  # order 1
        return loss

    laplace = f(lambda loc: Laplace(loc, 0.8))
    loc = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'z'.*Laplace.*kink in loc.*AbsBackward0.*"
                                                r"order=n.*'reparameterization'"):
        differentiate_twice(laplace, loc, how)
    (g,) = torch.autograd.grad(laplace(loc), loc)
    assert torch.isfinite(g)
    h = torch.autograd.functional.hessian(f(lambda loc: Normal(loc, 0.8)), loc)
    assert torch.isfinite(h)


def test_joint_support_over_budget_is_not_listed():
    # beyond the budget neither estimator lists the joint support: beam search instead (no error)
    for name in ("sum_and_sample", "unordered_set"):
        est = storch.estimator(name, plate="z", n_samples=2, budget=100)
        with storch.Graph():
            z = est(Bernoulli(logits=torch.zeros(7)))
            assert z.plates[0].size in (2, 3)


class _NoExpand(Categorical):
    def expand(self, batch_shape, _instance=None):
        raise NotImplementedError  # as torch.distributions.Distribution.expand: no message


def test_runtime_option_errors():
    with storch.Graph():
        imp = storch.estimator("importance", plate="a", proposal=Categorical(logits=torch.zeros(3, 5)))
        with pytest.raises(storch.OptionError, match=r"batch shape \(3,\) does not broadcast to the node's batch shape \(4,\)"):
            imp(Categorical(logits=torch.zeros(4, 5)))
        # a proposal without expand (torch's default raises NotImplementedError with no text): named, with the fix
        imp = storch.estimator("importance", plate="e", proposal=_NoExpand(logits=torch.zeros(5)))
        with pytest.raises(storch.OptionError, match=r"_NoExpand\.expand is not implemented\. Implement expand"):
            imp(Categorical(logits=torch.zeros(4, 5)))
        imp = storch.estimator("importance", plate="b", proposal=lambda p: Normal(0.0, 1.0))
        with pytest.raises(storch.OptionError, match=r"event shape"):
            imp(torch.distributions.OneHotCategorical(logits=torch.zeros(5)))
        imp = storch.estimator("importance", plate="c", proposal=lambda p: "q")
        with pytest.raises(storch.OptionError, match=r"returned str"):
            imp(Bernoulli(logits=torch.zeros(())))
        mem = storch.estimator("sum_and_sample", plate="d", memory=torch.tensor([7]), n_samples=2)
        with pytest.raises(storch.OptionError, match=r"not in the support"):
            mem(Categorical(logits=torch.zeros(5)))
        mem = storch.estimator("sum_and_sample", plate="e", memory=torch.zeros(2, 3), n_samples=2)
        with pytest.raises(storch.OptionError, match=r"memory has shape \(2, 3\)"):
            mem(Categorical(logits=torch.zeros(5)))


def test_importance_names_the_plates_of_a_proposal_batch_shape_that_does_not_broadcast():
    """Raw behaviour logits, one row per data point, for a node on a data plate and an earlier sample plate:
    the message said "(*parent plates, *own batch)" without naming them. It names the plate of each dim, says
    that raw tensors line up from the right, and points to plate tensors (storch.denote_independent)."""
    e1 = storch.estimator("score", plate="z", n_samples=2)
    e2 = storch.estimator("importance", plate="a", proposal=Categorical(logits=torch.zeros(3, 4)), n_samples=2)
    with storch.Graph():
        x = storch.denote_independent(torch.zeros(3, 4), 0, "data")
        z = e1(Categorical(logits=torch.zeros(2)))
        with pytest.raises(storch.OptionError, match=r"batch shape \(3,\) does not broadcast to the node's batch "
                           r"shape \(3, 2\) \(plate 'data' \(3\), plate 'z' \(2\)\).*from the right.*"
                           r"storch.denote_independent"):
            e2(Categorical(logits=x + 0 * z.unsqueeze(-1)))


def test_unordered_set_more_than_16_samples_only_for_the_whole_support():
    # k > 16 needs the 2^k set probabilities unless the sample is the whole support (then exact)
    est = storch.estimator("unordered_set", plate="z", n_samples=17, baseline=False)
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="n_samples <= 16"):
            est(Categorical(logits=torch.zeros(20)))
    with storch.Graph():
        z = est(Categorical(logits=torch.zeros(17)))
        storch.add_cost(z.double())
        assert float(storch.surrogate_loss()) == pytest.approx(8.0)


@pytest.mark.parametrize("name", ["score", "unordered_set"])
def test_bad_eos(name):
    with pytest.raises(storch.OptionError, match="eos must be None or the index"):
        storch.estimator(name, plate="z", n_samples=2, eos="end")
    # the near misses say what to write: a negative index (the last token) and a tensor (a token read from data)
    with pytest.raises(storch.OptionError, match=r"got -1; .*negative one .* not accepted.*eos=vocab - 1"):
        storch.estimator(name, plate="z", n_samples=2, eos=-1)
    with pytest.raises(storch.OptionError, match=r"got tensor\(0\); a tensor .* not accepted.*eos=int\(t\)"):
        storch.estimator(name, plate="z", n_samples=2, eos=torch.tensor(0))
    est = storch.estimator(name, plate="z", n_samples=2, eos=5)
    with storch.Graph(), pytest.raises(storch.OptionError, match="eos=5 is not an index"):
        est(Categorical(logits=torch.zeros(3)))
    est = storch.estimator(name, plate="z", n_samples=2, eos=1)
    with storch.Graph(), pytest.raises(storch.OptionError, match="one token per step"):
        est(Categorical(logits=torch.zeros(4, 3)))  # four tokens at once: no single end token


@pytest.mark.parametrize("name", ["score", "unordered_set"])
def test_an_infinite_cost_read_after_eos_names_the_ended_sequences(name):
    """Porting RLOO fine-tuning: a per-token KL penalty read from the user's own top-k policy after eos is
    log p(eos) = -inf where top-k cut eos (the estimator draws eos there with log-probability 0). The error
    named the cost only; it now says that sequences ended and how to mask the cost of finished ones."""
    theta = torch.tensor([3.0, 0.5, -0.5], requires_grad=True)  # eos likely at step 0
    est = storch.estimator(name, plate="seq", n_samples=3, eos=0)
    torch.manual_seed(0)
    with storch.Graph():
        kl = 0.0
        for t in range(4):
            logits = theta if t == 0 else torch.tensor([-math.inf, 0.0, 0.0]) + theta  # eos cut after step 0
            d = Categorical(logits=logits)
            tok = est(d)
            kl = kl + d.log_prob(tok) - math.log(1 / 3)  # not masked after eos
        assert bool(torch.isinf(kl.tensor).any()) and not bool(torch.isinf(kl.tensor).all())
        storch.add_cost(kl, name="kl")
        with pytest.raises(storch.NonFiniteCostError,
                           match=r"(?s)cost 'kl' is not finite.*partition with eos= on plate 'seq'.*"
                                 r"live = live & \(token != eos\)") as info:
            storch.backward()
    # the likelier cause, said before the generic advice (find the source, a finite penalty)
    message = str(info.value)
    assert message.index("ended sequences") < message.index("find where") < message.index("finite penalty")


@pytest.mark.parametrize("name", ["score", "unordered_set"])
def test_an_infinite_cost_in_live_sequences_only_does_not_blame_the_ended_ones(name):
    """The eos hint was given whenever sequences had ended, also where the non-finite entries were live ones
    (whose cost has another cause): now only where some non-finite entry is in an ended sequence."""
    theta = torch.zeros(3, requires_grad=True)  # eos at a step with probability 1/3
    est = storch.estimator(name, plate="seq", n_samples=8, eos=0)
    torch.manual_seed(0)
    with storch.Graph():
        live = None
        for t in range(3):
            tok = est(Categorical(logits=theta))
            live = (tok != 0) if live is None else live & (tok != 0)
        assert bool(live.tensor.any()) and not bool(live.tensor.all())  # some ended, some live
        storch.add_cost(torch.where(live, math.inf, 0.0) + tok.double() * 0, name="r")
        with pytest.raises(storch.NonFiniteCostError, match="cost 'r' is not finite") as info:
            storch.backward()
    assert "eos" not in str(info.value) and "Find where" in str(info.value)


@pytest.mark.parametrize("q", [lambda: Categorical(probs=torch.ones(3) / 3),
                               lambda: Categorical(probs=torch.tensor([0.5, 0.5, 0.0, 0.0])),
                               lambda: OneHotCategorical(probs=torch.tensor([0.0, 0.4, 0.3, 0.3]))],
                         ids=["fewer-categories", "zero-probabilities", "one-hot-zero"])
def test_importance_refuses_a_proposal_that_misses_values_of_p(q):
    """A behaviour policy over 3 of 4 actions was accepted and the gradient was biased (max |z| = 12; found
    by porting an off-policy correction). A proposal over the same values with positive mass is accepted,
    and so is one with zeros where p's probabilities are zero too."""
    theta = torch.zeros(4, requires_grad=True)
    onehot = isinstance(q(), OneHotCategorical)
    p = OneHotCategorical(logits=theta) if onehot else Categorical(logits=theta)
    with storch.Graph():
        with pytest.raises(storch.OptionError, match=r"puts no mass on values"):
            storch.estimator("importance", plate="z", proposal=q(), n_samples=2)(p)
    mask = torch.tensor([True, True, False, False])
    with storch.Graph():
        z = storch.estimator("importance", plate="z", proposal=Categorical(probs=torch.tensor([0.5, 0.5, 0.0, 0.0])),
                             n_samples=2)(Categorical(logits=theta.masked_fill(~mask, -math.inf)))
        assert set(z.tensor.tolist()) <= {0, 1}


_IND = torch.distributions.Independent


_MIX = torch.distributions.MixtureSameFamily
MISSING = {  # p(θ), a proposal that puts no mass on some value p can draw (before: accepted, biased by z)
    # a greedy behaviour policy on the last bit of a multi-binary action (z = 46.9)
    "independent-bernoulli": (lambda th: _IND(Bernoulli(logits=th[:3]), 1),
                              lambda: _IND(Bernoulli(probs=torch.tensor([0.5, 0.5, 1.0])), 1)),
    # a multi-discrete action whose proposal misses one category at one position (z = 18)
    "independent-categorical": (lambda th: _IND(Categorical(logits=th.view(2, 3)), 1),
                                lambda: _IND(Categorical(probs=torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])),
                                             1)),
    # 20 bits (2^20 joint values): checked per bit, as p and q are Independent over the same dims
    "independent-bernoulli-20-bits": (lambda th: _IND(Bernoulli(logits=th.repeat(4)[:20]), 1),
                                      lambda: _IND(Bernoulli(probs=torch.full((20,), 0.5).index_fill(0, torch.tensor([7]),
                                                                                                    0.0)), 1)),
    # ε-greedy written as a mixture, ε annealed to 0 (z ~ 4e11)
    "epsilon-greedy-mixture-eps-0": (lambda th: Categorical(logits=th[:3]),
                                     lambda: _MIX(Categorical(probs=torch.tensor([1.0, 0.0])),
                                                  Categorical(probs=torch.tensor([[0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])))),
    # a mixture of two joint actions of 3 bits: p's 8 joint values enumerated through its base
    "mixture-of-independent-bernoulli": (lambda th: _IND(Bernoulli(logits=th[:3]), 1),
                                         lambda: _MIX(Categorical(probs=torch.tensor([0.5, 0.5])),
                                                      _IND(Bernoulli(probs=torch.tensor([[1.0, 1.0, 0.0],
                                                                                         [0.5, 0.5, 1.0]])), 1))),
    # torch's Multinomial has no enumerate_support: a proposal with probability 0 on a category (z = 219), or
    # with another total_count (its counts sum to 2, which p's support accepts: z = 38.8; or to 4)
    "multinomial-zero-probability": (lambda th: Multinomial(3, logits=th[:3]),
                                     lambda: Multinomial(3, probs=torch.tensor([0.5, 0.5, 0.0]))),
    "multinomial-fewer-trials": (lambda th: Multinomial(3, logits=th[:3]),
                                 lambda: Multinomial(2, probs=torch.full((3,), 1 / 3))),
    "multinomial-more-trials": (lambda th: Multinomial(3, logits=th[:3]),
                                lambda: Multinomial(4, probs=torch.full((3,), 1 / 3))),
    # the same inside Independent (review r-twentythree: max |z| 112 and z 10.5)
    "independent-multinomial-zero-probability": (
        lambda th: Independent(Multinomial(3, logits=th[:3].expand(2, 3)), 1),
        lambda: Independent(Multinomial(3, probs=torch.tensor([0.5, 0.5, 0.0]).expand(2, 3)), 1)),
    "independent-multinomial-fewer-trials": (
        lambda th: Independent(Multinomial(3, logits=th[:3].expand(2, 3)), 1),
        lambda: Independent(Multinomial(2, probs=torch.full((2, 3), 1 / 3)), 1)),
    # a user's class whose support is integer_interval(0, 2), without enumerate_support (z = 14.9)
    "user-integer-interval": (lambda th: UserCategorical(th[:3]),
                              lambda: Categorical(probs=torch.tensor([0.5, 0.5, 0.0]))),
    # an ε-greedy target policy (a mixture p: its components' values) and a proposal over 2 of its 3 values
    "mixture-p": (lambda th: _MIX(Categorical(logits=th[:2]), Categorical(logits=th.view(2, 3))),
                  lambda: Categorical(probs=torch.tensor([0.5, 0.5, 0.0]))),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_importance_refuses_independent_and_mixture_proposals_that_miss_values_of_p(case):
    """The check that q covers p ran only where both enumerated their support: an Independent (the
    multi-binary or multi-discrete action of a policy) or a MixtureSameFamily (ε-greedy) passed, and the
    estimate was biased by up to 105.9 standard errors (found by porting an off-policy correction). p's finite
    support is enough now (an Independent's through its base, a mixture's through its components), with
    q.log_prob on its values; the same OptionError as the batch-dims form. The covering versions stay exact
    (tests/score/test_unbiased.py::test_importance_independent_and_mixture_proposals_that_cover_p)."""
    mkp, mkq = MISSING[case]
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.0, -0.4], requires_grad=True)
    est = storch.estimator("importance", plate="z", proposal=mkq(), n_samples=2)
    with storch.Graph(), pytest.raises(storch.OptionError, match=r"puts no mass on values .* can draw.*Give a proposal"):
        est(mkp(theta))


def test_importance_compiled_refuses_a_proposal_that_misses_values_of_p():
    """storch.compile skipped the check (importance returned early while traced): a proposal with probability
    0 on a category p can draw gave a silently biased gradient (z up to 318). The check is recorded in the
    trace: the proposal's probabilities are per-call values, so it runs at the first call and every replay."""
    theta = torch.nn.Parameter(torch.zeros(4))
    w = torch.tensor([1.0, 2.0, -1.0, 3.0])
    current = []
    est = storch.estimator("importance", plate="z", proposal=lambda p: Categorical(logits=current[-1]), n_samples=4)

    def step(q_logits):
        current.append(q_logits)
        with storch.Graph():
            z = est(Categorical(logits=theta))
            storch.add_cost(w[z], name="c")
            return storch.surrogate_loss()

    missing = torch.tensor([0.0, 0.0, 0.0, -math.inf])
    with pytest.raises(RuntimeError, match=r"puts no mass on values"):  # the first call
        storch.compile(step, backend=None)(missing)
    compiled = storch.compile(step, backend=None)
    assert torch.isfinite(compiled(torch.zeros(4)))
    with pytest.raises(RuntimeError, match=r"puts no mass on values.*checked at every call"):  # a replay
        compiled(missing)
    assert torch.isfinite(compiled(torch.tensor([0.0, 1.0, 0.0, -2.0])))


def test_importance_names_the_proposal_when_p_cannot_weigh_its_draws():
    """A proposal over other values than p's, where storch knows no value inside p's support to weigh such a
    draw 0 (a Multinomial of 3 trials for p; for q 4 trials per category, an Independent Binomial, as a Multinomial
    of 4 trials is refused before it draws: "multinomial-more-trials" above): torch's argument validation raised
    its own ValueError
    ("Expected value argument ... within the support"), which did not say that the values came from the
    proposal. Now an OptionError says so."""
    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("importance", plate="z", proposal=_IND(Binomial(4, probs=torch.full((3,), 1 / 3)), 1),
                           n_samples=2)
    with storch.Graph(), pytest.raises(storch.OptionError, match=r"values drawn from the proposal Independent"):
        est(Multinomial(3, logits=theta, validate_args=True))


@pytest.mark.parametrize("backend", [None, "aot_eager", "eager without validation"])
def test_importance_checks_p_support_on_draws_without_validation(backend):
    """Only torch's argument validation of p.log_prob refused q's draws outside p's support where storch knows
    no value inside it (a Multinomial of 3 trials for p, 4 for q; now 4 per category, an Independent Binomial, as
    a Multinomial of 4 trials is refused before it draws); a compiled step (validation off in the
    trace) evaluated p's formula there: a loss biased by z = 16. p.support is checked on the draws (recorded
    in a trace, checked at every call)."""
    phi = torch.nn.Parameter(torch.tensor([0.2, -0.3, 0.5]))
    est = storch.estimator("importance", plate="m", proposal=_IND(Binomial(4, probs=torch.full((3,), 1 / 3)), 1),
                           n_samples=4)

    def step():
        with storch.Graph():
            m = est(Multinomial(3, logits=phi, validate_args=False))
            storch.add_cost((m * torch.tensor([1.0, -1.0, 2.0])).sum(-1), name="c")
            return storch.surrogate_loss()

    if backend == "eager without validation":
        with pytest.raises(storch.OptionError, match=r"values drawn from the proposal Independent.*outside p.support"):
            step()
    else:
        error = RuntimeError if backend is None else Exception  # (aot_eager: dynamo wraps the assertion's error)
        with pytest.raises(error) as info:
            storch.compile(step, backend=backend)()
        chain, e = [], info.value
        while e is not None:
            chain.append(str(e))
            e = e.__cause__ or e.__context__
        assert any("values drawn from the proposal Independent" in m for m in chain)


def test_importance_refuses_partitions_as_its_page_says():
    """docs/estimators/importance.md did not say that importance refuses partitions: calling one instance
    at several steps of one graph raises a PlateError (it has no per-sequence weights)."""
    from pathlib import Path

    from torch.distributions import Categorical

    est = storch.estimator("importance", plate="a", proposal=lambda p: Categorical(logits=torch.zeros(3)))
    with pytest.raises(storch.PlateError, match="one partition.*which 'importance' does not support"):
        with storch.Graph():
            est(Categorical(logits=torch.zeros(3, requires_grad=True)))
            est(Categorical(logits=torch.zeros(3, requires_grad=True)))
    page = (Path(__file__).parents[2] / "docs" / "estimators" / "importance.md").read_text()
    assert "Partitions are not supported" in page and "PlateError" in page


_THETA2 = torch.tensor([0.3, -0.5])
OUTSIDE = {  # p(θ), a proposal q that puts no mass on (almost all of) p's values, what the error says
    "bernoulli-normal": (lambda th: Bernoulli(logits=th), Normal(0.5, 1.0), "Normal is continuous"),
    "bernoulli-uniform": (lambda th: Bernoulli(logits=th), Uniform(0.0, 1.0), "Uniform is continuous"),
    "binomial-normal": (lambda th: Binomial(3, logits=th), Normal(1.5, 2.0), "Normal is continuous"),
    "normal-poisson": (lambda th: Normal(th, 1.0), Poisson(2.0), "Poisson is discrete"),
    "normal-categorical": (lambda th: Normal(th, 1.0), Categorical(logits=torch.zeros(3)),
                           "Categorical is discrete"),
    "poisson-categorical5": (lambda th: Poisson(th.exp()), Categorical(logits=torch.zeros(5)), "does not contain"),
    "poisson-binomial4": (lambda th: Poisson(th.exp()), Binomial(4, probs=torch.tensor(0.5)), "does not contain"),
    "normal-exponential": (lambda th: Normal(th, 1.0), Exponential(1.0), "does not contain"),
    "beta-narrower-uniform": (lambda th: Beta(th.exp(), torch.tensor(1.0)), Uniform(0.2, 1.0),
                              "does not contain"),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_importance_refuses_a_proposal_outside_p_support(case):
    """A continuous proposal for a discrete p (a Normal or Uniform for a Bernoulli) gave a loss and gradient of
    exactly 0 without a word: each draw is a value p cannot produce, weighed 0. A discrete proposal for a
    continuous p, or one whose support ends before p's (a Categorical(5) or Binomial(4) for a Poisson, an
    Exponential for a Normal), missed values p can produce and was silently biased. Each is refused with an
    OptionError that says what to give instead; wider proposals stay accepted (test_unbiased.py)."""
    mkp, q, match = OUTSIDE[case]
    theta = _THETA2.clone().requires_grad_(True)
    est = storch.estimator("importance", plate="z", proposal=q, n_samples=8)
    with storch.Graph(), pytest.raises(storch.OptionError, match=match + ".*Give a"):
        est(mkp(theta))


def test_importance_compiled_checks_that_the_proposal_contains_p_support():
    """Supports whose ends are per-call tensors (a Uniform p over an input's range): the check that q's support
    contains p's is recorded while storch.compile traces the step and runs at every replayed call."""
    est = storch.estimator("importance", plate="z", proposal=Exponential(1.0), n_samples=4)
    theta = torch.nn.Parameter(torch.tensor(0.5))

    def step(low):
        with storch.Graph():
            z = est(Uniform(low, low + 1))
            storch.add_cost(theta * z ** 2, name="c")
            return storch.surrogate_loss()

    compiled = storch.compile(step, backend=None)
    assert torch.isfinite(compiled(torch.tensor(0.2)))
    assert torch.isfinite(compiled(torch.tensor(0.0)))  # the same end as q's: contained
    with pytest.raises(RuntimeError, match=r"does not contain.*checked at every call"):
        compiled(torch.tensor(-0.5))


def test_infinite_bernoulli_logits_under_score_are_named_in_the_error():
    # torch's Bernoulli.log_prob is NaN (inf - inf) at an infinite logit: score's surrogate is NaN and the
    # error named no cause; it now names the node and the estimators that handle such logits

    theta = torch.zeros(3, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4)
    with storch.Graph():
        z = est(torch.distributions.Bernoulli(logits=theta + torch.tensor([0.0, -math.inf, 0.0])))
        storch.add_cost(((z - 0.45) ** 2).sum(-1))
        with pytest.raises(storch.NonFiniteCostError, match=r"Infinite logits .* at 'score' \(plate 'z', a Bernoulli\)") as info:
            storch.backward()
    assert "Bernoulli(probs=torch.sigmoid(logits.float()))" in str(info.value)


def test_learned_baseline_refuses_features_of_another_width_with_what_to_do():
    """NVIL's head, built for features of one width (a Categorical over 5 candidates: h = its 5 logits), then
    given another (7 candidates, or one estimator shared by models of different sizes): torch's "mat1 and mat2
    shapes cannot be multiplied" named neither the estimator nor what to do. Now a StorchError, the step is
    discarded, and inputs= of one width works for every number of candidates."""
    est = storch.estimator("score", plate="pick", n_samples=2, baseline="learned")

    def step(est, k, inputs=None):
        logits = torch.zeros(k, requires_grad=True)
        pick = est(Categorical(logits=logits), inputs=inputs)
        storch.add_cost(-torch.arange(k, dtype=torch.float64)[pick], name="r")
        storch.backward()
        return logits.grad

    step(est, 5)
    with pytest.raises(storch.StorchError, match=r"score \(plate 'pick'\).*cost 'r'.* width 5.* width 7.*inputs= of "
                                                 r"one fixed width.*one estimator per model"):
        step(est, 7)
    assert torch.isfinite(step(est, 5)).all()  # the failed step left nothing behind
    fixed = storch.estimator("score", plate="pick", n_samples=2, baseline="learned")
    for k in (5, 7):
        assert torch.isfinite(step(fixed, k, inputs=torch.ones(4))).all()


def _train(make, steps: int, plate: str) -> list:
    """``steps`` training steps of a Bernoulli toy, the estimator from ``make()`` at each step; the warnings."""
    theta = torch.zeros(3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            est = make()
            with storch.Graph():
                z = est(Bernoulli(logits=theta))
                storch.add_cost(((z - 0.4) ** 2).sum(), name="c")
                storch.backward()
    return [w for w in caught if "created anew" in str(w.message)]


@pytest.mark.parametrize("options", [{"baseline": "moving_average"}, {"baseline": "learned"}])
def test_a_stateful_estimator_made_in_every_step_warns_once(options):
    # its moving average (or NVIL's heads) start from scratch at every step: silently plain REINFORCE (found by a
    # tester reading the docs as a new user); the warning points at the user's storch.estimator call
    plate = f"recreated_{options['baseline']}"
    caught = _train(lambda: storch.estimator("score", plate=plate, n_samples=4, **options), 8, plate)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "outside the training loop" in str(caught[0].message)


def test_a_stateful_estimator_made_once_or_a_stateless_one_made_in_every_step_does_not_warn():
    est = storch.estimator("score", plate="made_once", n_samples=4, baseline="moving_average")
    assert _train(lambda: est, 8, "made_once") == []
    assert _train(lambda: storch.estimator("score", plate="stateless", n_samples=4), 8, "stateless") == []
    assert _train(lambda: storch.estimator("score", plate="loo", n_samples=4, baseline="leave_one_out"), 8, "loo") == []


def test_a_subclass_of_score_with_a_component_of_its_own_is_refused_only_in_a_partition():
    # a reviewer found: such a subclass was refused when it was created (a partition rule checked at the class),
    # although it is never used in a partition. It works for single nodes; the second call in one graph (step 1
    # of a partition) is refused, since Score's extend scores later steps without its gradient_function
    import storch_score

    class Tempered(storch_score.Score):
        name = "test_tempered_score"

        def gradient_function(self, node):
            return super().gradient_function(node)

    class OwnBaseline(storch_score.Score):  # a baseline is not a partition component: partitions work
        name = "test_own_baseline_score"

        def baseline(self, node, cost):
            return super().baseline(node, cost)

    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    for cls in (Tempered, OwnBaseline):
        est = cls(plate="z", n_samples=4, baseline="moving_average")
        with storch.Graph():
            z = est(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.5) ** 2).sum(-1), name="f")
            (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
            assert torch.isfinite(g).all()
    with storch.Graph():
        z = Tempered(plate="z", n_samples=2)
        b = z(Bernoulli(logits=theta[0]))
        with pytest.raises(storch.StorchError, match="step 1 of its partition.*Tempered overrides gradient_function "
                                                     "without step_gradient_function or extend.*Score.extend"):
            z(Bernoulli(logits=theta[1] * b))
    with storch.Graph():
        z = OwnBaseline(plate="z", n_samples=2)
        b = z(Bernoulli(logits=theta[0]))
        assert z(Bernoulli(logits=theta[1] * b)).plates[0].step == 1


def test_vimco_is_not_listed_for_a_distribution_without_expand():
    """The docs' PlackettLuce (no ``expand``): other estimators' refusals listed vimco among the estimators that
    support it, which then refused ("makes its K=2 draws with PlackettLuce.expand, which is not implemented").
    vimco declares ``requires_expand``: it is left out of the list, and it is listed where expand exists."""
    from user_distributions import PlackettLuce

    d = PlackettLuce(torch.zeros(4, requires_grad=True))
    assert "vimco" not in storch.registry.supporting_estimators(d)
    assert not storch.get_estimator_class("vimco").supports(d)
    for name in ("reparameterization",):  # (core's: the score environment has no relaxed estimators)
        with pytest.raises(storch.UnsupportedDistributionError, match="Estimators that support it: ") as info:
            with storch.Graph():
                storch.estimator(name, plate="z")(d)
        assert "vimco" not in str(info.value) and "score" in str(info.value)
    # a distribution with expand keeps it, also under Independent
    assert "vimco" in storch.registry.supporting_estimators(Bernoulli(logits=torch.zeros(3)))
    assert storch.get_estimator_class("vimco").supports(Independent(Bernoulli(logits=torch.zeros(3)), 1))
    assert "expand" in " ".join(storch.get_estimator_class("vimco").requirements())


_COUNT_ADVICE = {  # a count p, the proposals the refusal of a Normal proposal must name (each accepted), one it must not
    "poisson": (lambda th: Poisson(th.exp()), {"Poisson": Poisson(torch.tensor(2.0)),
                                               "Geometric": Geometric(torch.tensor(0.3)),
                                               "NegativeBinomial": NegativeBinomial(3.0, torch.tensor(0.4))}, "Binomial"),
    "geometric": (lambda th: Geometric(logits=th), {"Poisson": Poisson(torch.tensor(2.0)),
                                                    "Geometric": Geometric(torch.tensor(0.3))}, "Binomial"),
    "binomial": (lambda th: Binomial(3, logits=th), {"Binomial": Binomial(5, torch.tensor(0.5)),
                                                     "Poisson": Poisson(torch.tensor(2.0))}, None),
}


@pytest.mark.parametrize("case", list(_COUNT_ADVICE))
def test_importance_advice_for_a_count_names_only_proposals_whose_support_contains_p(case):
    """A Normal proposal for a Poisson node was refused with the advice "a Poisson or a Binomial for a count"; a
    Binomial proposal for the Poisson is then refused too (a bounded support cannot contain an unbounded one).
    The advice now depends on p's support: each proposal it names is accepted, and a bounded one is not named
    for an unbounded p."""
    mkp, named, absent = _COUNT_ADVICE[case]
    theta = _THETA2.clone().requires_grad_(True)
    with storch.Graph(), pytest.raises(storch.OptionError, match="Normal is continuous") as e:
        storch.estimator("importance", plate="z", proposal=Normal(1.0, 2.0), n_samples=8)(mkp(theta))
    advice = str(e.value).split("Give a")[1]
    recommended = advice.split("): ")[1].split(":")[0]  # the proposals named, before the reason
    assert all(n in recommended for n in named), advice
    assert absent is None or not re.search(rf"\b{absent}", recommended), advice  # (NegativeBinomial: no match)
    for n, q in named.items():  # the advice holds: each named proposal passes the support checks
        with storch.Graph():
            z = storch.estimator("importance", plate="z", proposal=q, n_samples=8)(mkp(theta))
            storch.add_cost(z.float().sum(), name="c")
            storch.surrogate_loss()


def test_sum_and_sample_takes_inputs_and_memory_key_as_keywords_only():
    """sum_and_sample's forward took *args, **kwargs and handed them on: a positional argument after the
    distribution (an observed value meant as Pyro's obs=) was taken for inputs and the node sampled. Its forward
    now names inputs and memory_key, and the call refuses the rest (tester p-port2)."""
    est = storch.estimator("sum_and_sample", plate="z")
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="1 positional argument after the distribution"):
            est(Bernoulli(logits=theta), torch.tensor(0.3))
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="keyword obs=.*takes the distribution and the keyword "
                                                     "inputs=, memory_key= only"):
            est(Bernoulli(logits=theta), obs=torch.tensor(0.3))
    with storch.Graph():
        with pytest.raises(storch.OptionError, match="memory_key= is for sequences"):
            est(Bernoulli(logits=theta), memory_key=torch.tensor([0]))
    with storch.Graph() as graph:
        x = torch.ones(3)
        est(Bernoulli(logits=theta), inputs=x)
        assert graph.nodes[0].inputs is x


def test_the_learned_baselines_warnings_point_at_the_users_lines():
    """storch.extending's helpers warn for the score family's learned baseline (its network built lazily with
    update=False, where the surrogate is built; a regression step skipped, non-finite): both warnings point at this
    file's storch.backward() line. With fixed stacklevels they pointed into storch_score's learned_baseline.py and
    score.py (the frames a level of 3 or 4 reached under the family's methods)."""
    import inspect

    theta = torch.zeros(3, requires_grad=True)
    lazy = storch.estimator("score", plate="a", n_samples=2, baseline="learned", update=False)
    diverging = storch.estimator("score", plate="b", n_samples=2, baseline="learned")
    line = inspect.currentframe().f_lineno

    def step(est, scale):
        with storch.Graph():
            a = est(Categorical(logits=theta))
            storch.add_cost(scale * (1.0 + (a == 1).to(theta.dtype)), name="c")
            storch.backward()  # line + 6

    torch.manual_seed(82)
    step(diverging, 1.0)  # builds the head and its optimizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(lazy, 1.0)
        step(diverging, torch.finfo(theta.dtype).max ** 0.75)  # a finite cost whose (b - f)² overflows: skipped
    found = [(w.filename, w.lineno, str(w.message)) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [(f, n) for f, n, _ in found] == [(__file__, line + 6)] * 2, found
    assert "update=False" in found[0][2] and "update was skipped" in found[1][2]
