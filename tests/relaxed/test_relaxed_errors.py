"""Orders, unsupported distributions, options, registration, and the estimators' trainable parts."""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Laplace, Normal, OneHotCategorical, Poisson, Uniform

import storch
from storch.testing import assert_unbiased
from storch_relaxed import Arm, DisArm, Go, GumbelSoftmax, GumbelStraightThrough, Lax, Rebar, Relax, StraightThrough
from twice import differentiate_twice

from relaxed_problems import TOY_THETA, toy_exact, toy_model

ALL = {"gumbel_softmax": (GumbelSoftmax, math.inf, True), "gumbel_straight_through": (GumbelStraightThrough, math.inf, True),
       "straight_through": (StraightThrough, math.inf, True), "lax": (Lax, math.inf, False), "relax": (Relax, math.inf, False), "rebar": (Rebar, math.inf, False),
       "arm": (Arm, 1, False), "disarm": (DisArm, 1, False), "go": (Go, 1, False)}


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    storch.reset()


def test_registered_through_entry_points():
    infos = storch.available_estimators()
    for name, (cls, order, biased) in ALL.items():
        info = infos[name]
        assert info.package == "storch-estimators-relaxed"
        assert (info.max_order, info.biased) == (order, biased)
        assert storch.get_estimator_class(name) is cls


@pytest.mark.parametrize("name", ["arm", "disarm", "go"])
def test_order_error_at_order_2(name):
    with storch.Graph():
        toy_model(storch.estimator(name, plate="b"), TOY_THETA.clone().requires_grad_(True))
        storch.surrogate_loss(order=1)
        with pytest.raises(storch.OrderError, match=f"'{name}' on plate 'b' is unbiased only up to order 1"):
            storch.surrogate_loss(order=2)


def test_arm_on_categorical_names_supporting_estimators():
    with pytest.raises(storch.UnsupportedDistributionError) as info:
        storch.estimator("arm", plate="z")(Categorical(logits=torch.zeros(5)))
    msg = str(info.value)
    print(msg)
    assert "'arm' does not support Categorical" in msg and "Bernoulli" in msg
    for other in ("expect", "go") + (("score",) if "score" in storch.available_estimators() else ()):
        assert other in msg.split("support it:")[1]  # (score: not in the relaxed family's own environment)
    # disarm: Bernoulli only; the relaxations take a Categorical only with categorical="one_hot"
    for other in ("disarm", "gumbel_softmax", "gumbel_straight_through", "rebar", "relax"):
        assert other not in msg.split("support it:")[1]


@pytest.mark.parametrize("name,dist,needs", [
    ("disarm", OneHotCategorical(logits=torch.zeros(3)), "Bernoulli"),
    ("go", Normal(0.0, 1.0), "Poisson"),
    ("lax", Bernoulli(logits=torch.zeros(3)), "rsample"),
    ("relax", Poisson(torch.ones(2)), "OneHotCategorical"),
    ("gumbel_softmax", Normal(0.0, 1.0), "Categorical"),
])
def test_unsupported_distributions(name, dist, needs):
    with pytest.raises(storch.UnsupportedDistributionError, match=needs):
        storch.estimator(name, plate="z")(dist)


def test_lax_refuses_a_support_that_moves_with_a_parameter():
    """LAX's gradient function is log p: on z ~ Uniform(0, h) it missed the boundary term (-0.39 for
    d/dh E[z²] = 1.0 at h = 1.5, found by porting). Refused, pointing to reparameterization."""
    h = torch.tensor(1.5, requires_grad=True)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match=r"'lax'.*high.*'reparameterization'"):
        storch.estimator("lax", plate="z")(Uniform(torch.zeros(()), h))


def test_lax_refuses_order_2_on_a_kink_of_log_p():
    """LAX's score term differentiates log p: on a Laplace (|x - loc|) its order-2 estimate of
    d²/dloc² E[z²] = 2 was 1.35 ± 0.07 (found by porting). Refused at order 2; order 1 unchanged."""
    loc = torch.tensor(0.3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("lax", plate="z", n_samples=2)(Laplace(loc, 0.8))
        storch.add_cost(z ** 2)
        assert torch.isfinite(torch.autograd.grad(storch.surrogate_loss(order=1), loc)[0])
        with pytest.raises(storch.OrderError, match=r"'lax'.*Laplace.*AbsBackward0.*'reparameterization'"):
            storch.surrogate_loss(order=2)


class _FoldedNormal(torch.distributions.Distribution):
    """|loc + eps| with its density: a user's class with a kink inside rsample."""

    arg_constraints = {"loc": torch.distributions.constraints.real}
    support = torch.distributions.constraints.nonnegative
    has_rsample = True

    def __init__(self, loc, validate_args=None):
        self.loc = loc
        super().__init__(loc.shape, validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        return (self.loc + torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype)).abs()

    def log_prob(self, x):
        n = Normal(self.loc, 1.0)
        return torch.logaddexp(n.log_prob(x), n.log_prob(-x))


class _RoundedNormal(_FoldedNormal):
    def rsample(self, sample_shape=torch.Size()):
        return (self.loc + torch.randn(self._extended_shape(sample_shape), dtype=self.loc.dtype)).round()


def test_lax_refuses_a_kink_or_jump_inside_rsample():
    """LAX differentiates its control variate c_phi(x) through x = rsample(): a kink inside the distribution's
    rsample (|loc + eps|) biases it from order 2, a jump (round) from order 1, as in the cost; LAX hands out a
    detached x, so it records the rsample's kinks itself (storch.extending.note_rsample). Order 1 through a
    kink is unchanged."""
    for cls, order, op in ((_FoldedNormal, 2, "AbsBackward0"), (_RoundedNormal, 1, "RoundBackward0")):
        loc = torch.tensor([0.3], requires_grad=True)
        with storch.Graph():
            z = storch.estimator("lax", plate="z", n_samples=2)(cls(loc))
            storch.add_cost((z ** 2).sum())
            if order == 2:
                assert torch.isfinite(torch.autograd.grad(storch.surrogate_loss(order=1), loc)[0]).all()
            with pytest.raises(storch.OrderError, match=rf"'lax'.*the rsample of {cls.__name__} holds {op}.*'score'"):
                storch.surrogate_loss(order=order)


@pytest.mark.parametrize("name,options,match", [
    ("gumbel_softmax", {"temperature": 0.0}, "temperature must be"),
    ("gumbel_straight_through", {"temperature": "hot"}, "temperature must be"),
    ("rebar", {"temperature": -1.0}, "temperature must be"),
    ("rebar", {"eta": float("nan")}, "eta must be"),
    ("relax", {"lr": 0}, "lr must be"),
    ("lax", {"hidden": 0}, "hidden must be"),
    ("relax", {"update": "yes"}, "update must be"),
    ("relax", {"network": 3}, "network must be"),
    ("arm", {"n_samples": 0}, "n_samples must be"),
    ("go", {"temperature": 1.0}, "has no option 'temperature'"),
])
def test_option_errors(name, options, match):
    with pytest.raises(storch.OptionError, match=match):
        storch.estimator(name, plate="z", **options)


def test_network_with_wrong_output_shape():
    est = storch.estimator("relax", plate="b", network=torch.nn.Linear(3, 2, dtype=torch.float64))
    with pytest.raises(storch.StorchError, match="one number per entry"):
        with storch.Graph():
            toy_model(est, TOY_THETA)
            storch.surrogate_loss()


def _batch_norm_network() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    with torch.no_grad():
        net[3].weight.mul_(20)  # a control variate large enough that a bias shows
    return net.double()


def test_a_network_normalising_over_the_batch_is_refused_and_in_eval_mode_is_unbiased():
    """A BatchNorm1d in training mode makes c_φ at one entry depend on the others: RELAX's score term multiplies it
    by that entry's log p gradient only, the pathwise term differentiates it through every entry (4 samples: |z| 67
    against exact enumeration, silently). Refused; with running statistics in eval mode each entry is on its own."""
    from storch.testing import assert_unbiased

    net = _batch_norm_network()
    est = storch.estimator("relax", plate="b", n_samples=4, network=net, update=False)
    with pytest.raises(storch.StorchError, match="BatchNorm1d normalising with the batch's statistics"):
        with storch.Graph():
            toy_model(est, TOY_THETA.clone().requires_grad_())
            storch.surrogate_loss()
    net[1].track_running_stats = False
    net[1].running_mean = net[1].running_var = None
    net.eval()  # eval mode without running statistics still normalises over the batch
    with pytest.raises(storch.StorchError, match="without running statistics"):
        with storch.Graph():
            toy_model(est, TOY_THETA.clone().requires_grad_())
            storch.surrogate_loss()
    net = _batch_norm_network().eval()
    est = storch.estimator("relax", plate="b", n_samples=4, network=net, update=False)
    x = TOY_THETA.clone().requires_grad_()
    exact = torch.autograd.grad(toy_exact(x), x)[0]
    torch.manual_seed(1)
    grads = []
    for _ in range(600):
        x = TOY_THETA.clone().requires_grad_()
        with storch.Graph():
            toy_model(est, x)
            grads.append(torch.autograd.grad(storch.surrogate_loss(), x)[0])
    assert_unbiased(torch.stack(grads), exact, "relax, batch-norm network in eval mode")


def test_plate_layouts_and_values():
    torch.manual_seed(40)
    with storch.Graph():
        b = storch.estimator("arm", plate="a", n_samples=2)(Independent(Bernoulli(logits=torch.zeros(4)), 1))
        assert b.plates[0].size == 4 and b.shape == (4,)
        r = storch.estimator("rebar", plate="r", n_samples=2, categorical="one_hot")(Categorical(logits=torch.zeros(3, 5)))
        assert r.plates[0].size == 6 and r.shape == (3, 5)  # one-hot for a Categorical taken as one (see rebar docs)
        raw = r.tensor
        assert set(raw[:2].unique().tolist()) <= {0.0, 1.0} and ((raw[2:] > 0) & (raw[2:] < 1)).all()
        g = storch.estimator("go", plate="g")(Bernoulli(probs=torch.tensor([0.3, 0.9])))
        assert g.plates[0].size == 3  # x and its two neighbours
        nb = g.tensor[1:]
        assert set(nb.unique().tolist()) <= {0.0, 1.0}  # neighbours of 1 stay at 1 (term is zero)
        x = storch.estimator("relax", plate="x", control_variate="network")(Categorical(logits=torch.zeros(2, 5)))
        assert x.tensor.dtype == torch.long and x.shape == (2,)  # network-only relax keeps the index
        y = storch.estimator("relax", plate="y", categorical="one_hot")(Categorical(logits=torch.zeros(2, 5)))
        assert y.plates[0].size == 3 and y.shape == (2, 5)  # with REBAR's term: b, σ_λ(z), σ_λ(z̃), one-hot


def test_trainable_parts_are_parameters_and_get_trained():
    torch.manual_seed(41)
    rebar = storch.estimator("rebar", plate="b")
    names = dict(rebar.named_parameters())
    assert set(names) == {"log_temperature", "eta"}
    relax = storch.estimator("relax", plate="b2")
    assert set(dict(relax.named_parameters())) == {"log_temperature", "eta"}  # r_ρ is built at the first node
    frozen = storch.estimator("relax", plate="c", update=False)
    theta = TOY_THETA.clone().requires_grad_(True)
    for _ in range(3):
        with storch.Graph():
            toy_model(rebar, theta)
            toy_model(relax, theta)
            storch.add_cost(frozen(Bernoulli(logits=theta)).sum())
            storch.backward()
        if _ == 0:
            start = {k: [p.detach().clone() for p in e.parameters()] for k, e in
                     (("rebar", rebar), ("relax", relax), ("frozen", frozen))}
    for key, est in (("rebar", rebar), ("relax", relax)):
        assert len(start[key]) > 0
        assert any(not torch.equal(a, b) for a, b in zip(start[key], est.parameters())), key
    assert all(torch.equal(a, b) for a, b in zip(start["frozen"], frozen.parameters()))
    assert rebar.update_steps == relax.update_steps == 3 and frozen.update_steps == 0



def _variance_step(est, theta, scale, dist=Bernoulli):
    with storch.Graph():
        z = est(dist(logits=theta) if dist is not Normal else Normal(theta, 1.0))
        storch.add_cost(scale * ((z - 0.45) ** 2).sum(), name="c")
        return storch.backward()


@pytest.mark.parametrize("name", ["rebar", "relax", "lax"])
def test_non_finite_variance_update_is_skipped_and_counted(name):
    """Σ ĝ² of a large but finite cost overflows float32 (|ĝ| ~ 1e20): the Adam step with its NaN gradient
    wrote NaN into η, λ or the network, after which every step's surrogate was NaN and storch.backward()
    blamed the (finite) cost. Now the step is skipped (φ and Adam's moments unchanged), counted in
    skipped_updates and warned about, as score's learned baseline does; the next ordinary step trains."""
    torch.manual_seed(0)
    dist = Normal if name == "lax" else Bernoulli
    est = storch.estimator(name, plate="z", n_samples=2)
    theta = torch.tensor([0.3, -0.5, 1.0], requires_grad=True)
    _variance_step(est, theta, 1.0, dist)  # builds the network; one ordinary update
    before = {k: v.detach().clone() for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)}
    adam = copy.deepcopy(est._optimizer.state_dict())
    with pytest.warns(RuntimeWarning, match=rf"{name} \(plate 'z'\): the control variate's variance loss or "
                      r"gradients are not finite.*1 update\(s\) skipped.*unchanged"):
        loss = _variance_step(est, theta, 1e20, dist)
    assert torch.isfinite(loss) and torch.isfinite(theta.grad).all()
    assert est.skipped_updates == 1 and est.update_steps == 1
    after = {k: v for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert str(est._optimizer.state_dict()) == str(adam)
    assert est.state_dict()["_extra_state"]["skipped_updates"] == 1
    for _ in range(2):  # training goes on: finite, and φ moves
        theta.grad = None
        _variance_step(est, theta, 1.0, dist)
        assert torch.isfinite(theta.grad).all()
    assert est.update_steps == 3 and est.skipped_updates == 1
    assert all(torch.isfinite(p).all() for p in est.parameters())
    assert any(not torch.equal(before[k], v) for k, v in est.state_dict().items() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_masked_categorical_in_float16_trains(name):
    """z̃ conditioned on the sample computed exp(-log p), which overflows float16 for a masked logit
    (3 log eps = -20.8: exp(20.8) > 65504): z̃ = -inf, NaN in ∂/∂φ Σ ĝ², and the update wrote NaN into φ
    (now it would be skipped: but it is finite, and trains)."""
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", n_samples=2, categorical="one_hot")
    theta = torch.tensor([0.3, -0.5, 1.0, 0.2, -1.0], dtype=torch.float16, requires_grad=True)
    mask = torch.tensor([0.0, -math.inf, 0.0, -math.inf, 0.0], dtype=torch.float16)
    start = [p.detach().clone() for p in est.parameters()]
    for _ in range(3):
        theta.grad = None
        with storch.Graph():
            z = est(Categorical(logits=theta + mask))
            storch.add_cost(((z - 0.45) ** 2).sum(), name="c")  # z one-hot (the relaxed inputs)
            loss = storch.backward()
        assert torch.isfinite(loss) and torch.isfinite(theta.grad).all()
    assert est.skipped_updates == 0 and est.update_steps == 3
    assert all(torch.isfinite(p).all() for p in est.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, est.parameters()))


def test_go_gradient_is_finite_at_saturated_logits():
    """float32 sigmoid(30) == 1: the branch of torch.where GO does not select must not send NaN."""
    import torch
    from torch.distributions import Bernoulli

    import storch

    torch.manual_seed(0)
    theta = torch.tensor([30.0, -30.0, 0.0], dtype=torch.float32, requires_grad=True)
    est = storch.estimator("go", plate="b", n_samples=16)
    with storch.Graph():
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g).all(), g


@pytest.mark.parametrize("name", ["gumbel_softmax", "gumbel_straight_through", "rebar", "relax"])
@pytest.mark.parametrize("lookup", ["embedding", "index", "index_select", "gather", "take_along_dim"])
def test_a_categorical_sample_used_as_an_index_says_it_is_one_hot(name, lookup):
    """The relaxed estimators hand out one-hot vectors for a Categorical node they take (categorical="one_hot"); using one as
    an index raised torch's bare "indices must be long" (re-wrapped): the message now says why and what
    to write instead (index_select and gather gave only torch's dtype error)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 3)
    lookups = {"embedding": lambda z: emb(z), "index": lambda z: emb.weight[z],
               "index_select": lambda z: emb.weight.index_select(0, z),
               "gather": lambda z: emb.weight.gather(0, z[:, None].expand(5, 3)),
               "take_along_dim": lambda z: torch.take_along_dim(emb.weight, z[:, None], 0)}
    with storch.Graph():
        est = storch.estimator(name, plate="z", n_samples=2, categorical="one_hot")
        z = est(Categorical(logits=torch.zeros(5, requires_grad=True)))
        with pytest.raises(storch.PlateError, match=r"hand out one-hot vectors.*z @ emb.weight instead of emb\(z\)"):
            lookups[lookup](z)
        assert (z @ emb.weight).shape == (3,)  # the lookup written for one-hot inputs


# -- order >= 2 needs a cost and a network n times differentiable in the relaxed sample ---------------

class _ReluNet(torch.nn.Module):
    def __init__(self, features: int = 3):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(features, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))

    def forward(self, z):
        return self.f(z.to(self.f[0].weight.dtype))


def _order2(make, model):
    """The order-1 surrogate is built and differentiated; the order-2 one refuses (OrderError, returned)."""
    with storch.Graph():
        leaf, x = storch.testing.replicate(TOY_THETA, 8)
        model(make(), x)
        torch.autograd.grad(storch.surrogate_loss(order=1), leaf)
        with pytest.raises(storch.OrderError) as info:
            storch.surrogate_loss(order=2)
    print(info.value)
    return str(info.value)


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_relu_decoder_refused_at_order_2(name):
    from relaxed_problems import decoder_model

    msg = _order2(lambda: storch.estimator(name, plate="b"),
                  lambda est, x: decoder_model(est, x, torch.relu))
    assert f"estimator {name!r} on plate 'b'" in msg and "the cost 'rec'" in msg and "relaxed sample" in msg
    assert "ReluBackward0" in msg
    for advice in ("softplus", "GELU", "SiLU", "tanh", "order=1", "'score'"):
        assert advice in msg


@pytest.mark.parametrize("form", ["network", "rebar+network"])
def test_relax_relu_network_refused_at_order_2(form):
    from relaxed_problems import decoder_model

    msg = _order2(lambda: storch.estimator("relax", plate="b", control_variate=form, network=_ReluNet()),
                  lambda est, x: decoder_model(est, x, torch.tanh))
    assert "estimator 'relax' on plate 'b'" in msg and "control-variate network's output" in msg
    assert "ReluBackward0" in msg and "softplus" in msg


def test_lax_relu_network_refused_at_order_2():
    msg = _order2(lambda: storch.estimator("lax", plate="x", network=_ReluNet()),
                  lambda est, x: storch.add_cost(((est(Normal(x, 1.0)) - 0.45) ** 2).sum()))
    assert "estimator 'lax' on plate 'x'" in msg and "ReluBackward0" in msg


def test_relu_of_parameters_alone_is_not_refused():
    """A ReLU that the relaxed sample does not pass through (a function of θ alone) is fine at order 2."""
    with storch.Graph():
        _, x = storch.testing.replicate(TOY_THETA, 8)
        b = storch.estimator("rebar", plate="b")(Bernoulli(logits=x))
        storch.add_cost(((b - torch.relu(x)) ** 2).sum() + torch.relu(x).sum())
        storch.surrogate_loss(order=2)


@pytest.mark.parametrize("name", ["rebar", "relax", "lax"])
def test_smoothness_walk_at_order_1_runs_once_per_cost_name(name, monkeypatch):
    """The autograd-graph walk of require_smooth costs nothing at order 1 (storch.backward()) in steady state:
    the check for jumps runs at the first step of the estimator, plate and cost name (rebar: the cost from
    σ_λ(z), σ_λ(z̃); relax: that and its network from z, z̃; lax: its network from x, and the core's check of
    the cost of a requires_rsample node); later order-1 steps walk nothing; order 2 walks at every surrogate."""
    import storch.conditions.smoothness as ext

    calls = []
    walk = ext._nonsmooth_on_path
    monkeypatch.setattr(ext, "_nonsmooth_on_path", lambda *a, **k: calls.append(1) or walk(*a, **k))
    est = storch.estimator(name, plate="b")

    def step(order):
        with storch.Graph():
            _, x = storch.testing.replicate(TOY_THETA, 8)
            if name == "lax":
                storch.add_cost(((est(Normal(x, 1.0)) - 0.45) ** 2).sum())
            else:
                toy_model(est, x)
            storch.surrogate_loss(order=order)

    step(1)
    assert len(calls) == {"rebar": 1, "relax": 3, "lax": 2}[name]
    calls.clear()
    step(1)
    assert not calls
    step(2)
    assert calls


def _order_1_loss(est):
    def f(t):
        with storch.Graph():
            toy_model(est, t)
            return storch.surrogate_loss()  # order 1
    return f


@pytest.mark.parametrize("name", ["arm", "disarm", "go"])
@pytest.mark.parametrize("how", ["hessian", "grad_of_grad"])
def test_order_1_surrogate_differentiated_twice_is_refused(name, how):
    """surrogate_loss(order=2) refuses these; the default order-1 surrogate differentiated twice gave a
    biased Hessian (ARM |z| 17, DisARM / GO 0) without a word: the create_graph=True pass is refused."""
    f = _order_1_loss(storch.estimator(name, plate="b"))
    with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'b' is unbiased only up to order 1.*order=n"):
        differentiate_twice(f, TOY_THETA, how)
    t = TOY_THETA.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(t), t)  # first order: unaffected
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["relax", "rebar", "gumbel_softmax"])
def test_order_1_surrogate_of_an_any_order_estimator_differentiates_twice(name):
    h = torch.autograd.functional.hessian(_order_1_loss(storch.estimator(name, plate="b")), TOY_THETA)
    assert torch.isfinite(h).all()


def test_relax_trains_next_to_an_arm_node():
    """RELAX's update differentiates the loss with create_graph=True (its control variate's variance
    training); an ARM node of the same loss and parameters does not refuse that pass."""
    relax, arm = storch.estimator("relax", plate="a"), storch.estimator("arm", plate="b")
    theta = TOY_THETA.clone().requires_grad_(True)
    for _ in range(2):
        with storch.Graph():
            toy_model(relax, theta)
            toy_model(arm, theta * 0.5)
            storch.backward()
    assert theta.grad is not None and relax.network.net is not None
    phi = [p.detach().clone() for p in relax.parameters()]
    with storch.Graph():
        toy_model(relax, theta)
        toy_model(arm, theta * 0.5)
        storch.surrogate_loss().sum()  # built; storch.backward() trains
        storch.backward()
    assert any(not torch.equal(a, b) for a, b in zip(phi, relax.parameters()))


@pytest.mark.parametrize("name", ["relax", "lax"])
@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_learned_part_built_under_torch_func_is_refused_with_what_to_do(name, transform):
    """A fresh relax / lax under torch.func.grad or jvp raised torch's raw RuntimeError ("mutating directly
    with .data inside functorch transform") from its lazily built network: now a StorchError that says to
    build it with one step outside the transform; after one eager step the transform works."""
    est = storch.estimator(name, plate="b")

    def f(t):
        with storch.Graph():
            if name == "lax":
                storch.add_cost(((est(Normal(t, 1.0)) - 0.45) ** 2).sum())
            else:
                toy_model(est, t)
            return storch.surrogate_loss(order=2)

    def call():
        if transform == "grad":
            return torch.func.grad(f)(TOY_THETA)
        return torch.func.jvp(f, (TOY_THETA,), (torch.ones_like(TOY_THETA),))

    with pytest.raises(storch.StorchError, match="outside the transform first"):
        call()
    f(TOY_THETA.clone().requires_grad_(True))  # one eager step builds the network
    call()


# -- order 1 needs no jump (round, sign, floor) on the relaxed path: the pathwise term misses its delta ----

def _jump_cost(b):
    """f(b) = round(0.6 b + 0.3) + (b - 0.45)²: f(0) and f(1) are those of b + (b - 0.45)², but f jumps at
    b = 1/3, which σ_λ(z) passes through: the control variate's pathwise term η ∇f(σ_λ(z)) misses the delta
    that ∇E[f(σ_λ(z))] has, so it no longer cancels the score term -η f(σ_λ(z̃)) ∇l."""
    return torch.round(0.6 * b + 0.3) + (b - 0.45) ** 2


def _jump_exact(theta):
    p = torch.sigmoid(theta)
    return (p * (1 + 0.55 ** 2) + (1 - p) * 0.45 ** 2).sum()


class _SignNet(torch.nn.Module):
    def forward(self, z):
        return torch.sign(z.sum(-1))


_JUMPS = {  # name -> (make the estimator, model(est, x), exact E[f] of θ, the operation found)
    "rebar": (lambda: storch.estimator("rebar", plate="b", update=False),
              lambda est, x: storch.add_cost(_jump_cost(est(Bernoulli(logits=x))).sum(), name="f"),
              _jump_exact, "RoundBackward0"),
    "relax": (lambda: storch.estimator("relax", plate="b", update=False),
              lambda est, x: storch.add_cost(_jump_cost(est(Bernoulli(logits=x))).sum(), name="f"),
              _jump_exact, "RoundBackward0"),
    "relax_network": (lambda: storch.estimator("relax", plate="b", control_variate="network", network=_SignNet(),
                                               update=False),
                      lambda est, x: storch.add_cost(((est(Bernoulli(logits=x)) - 0.45) ** 2).sum(), name="f"),
                      toy_exact, "SignBackward0"),
    "lax": (lambda: storch.estimator("lax", plate="b", network=_SignNet(), update=False),
            lambda est, x: storch.add_cost(((est(Normal(x, 1.0)) - 0.45) ** 2).sum(), name="f"),
            lambda th: ((th - 0.45) ** 2 + 1).sum(), "SignBackward0"),
}


@pytest.mark.parametrize("case", sorted(_JUMPS))
def test_a_jump_on_the_relaxed_path_is_refused_at_order_1(case, monkeypatch):
    """A jump on a path from the continuous sample to what the control variate differentiates (the cost at
    σ_λ(z) for rebar / relax, the network at z / x for relax / lax) biases the order-1 estimate: shown by a
    z-test (R = 4000) against the exact gradient with the walk switched off (|z| ≈ 10 to 50). So the order-1
    surrogate refuses it (OrderError naming the estimator, the plate and the operation), once per step until
    it is fixed (a refused cost is checked again)."""
    import storch.conditions.smoothness as ext
    from relaxed_problems import estimates, exact_derivatives

    make, model, exact, op = _JUMPS[case]
    name = case.split("_")[0]
    est = make()
    for _ in range(2):
        with storch.Graph():
            _, x = storch.testing.replicate(TOY_THETA, 4)
            model(est, x)
            with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'b': the order-1 .*{op}"):
                storch.surrogate_loss(order=1)
    # what the refusal prevents: without the walk, the estimate is biased
    monkeypatch.setattr(ext, "_nonsmooth_on_path", lambda *a, **k: {})
    torch.manual_seed(14)
    est = make()
    g, = estimates(lambda x: model(est, x), TOY_THETA, 1)
    report = storch.testing.z_test(g, exact_derivatives(exact, TOY_THETA, 1)[0], f"{case} with a jump")
    print(report.table())
    assert not report.ok


@pytest.mark.parametrize("kind", ["bernoulli", "onehot"])
@pytest.mark.parametrize("name", ["gumbel_softmax", "gumbel_straight_through", "rebar", "relax"])
def test_a_cost_cut_from_the_relaxed_sample_is_refused(name, kind):
    """A relaxation's gradient goes through the (relaxed) sample it hands out; a cost that reaches it only
    through a comparison or argmax ((b > 0.5).float(), one_hot(argmax)) got gradient 0 (gumbel_softmax,
    straight-through: mu.grad None; REBAR and RELAX: their control variate's pathwise term vanished, leaving
    (1 - η) f(b) ∇log p: 0 at η = 1). Refused by the core's check (OrderError) at order 1."""
    theta = TOY_THETA.clone().requires_grad_(True)
    w = torch.ones((), dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        if kind == "bernoulli":
            b = storch.estimator(name, plate="b")(Bernoulli(logits=theta))
            cost = (b > 0.5).to(torch.float64).sum()
        else:
            b = storch.estimator(name, plate="b")(OneHotCategorical(logits=theta))
            cost = (b.argmax(-1) == 0).to(torch.float64)
        storch.add_cost(cost * w, name="hard")
        # rebar / relax: the comparison (argmax) of the relaxed sample is named (test_a_thresholded_...)
        with pytest.raises(storch.OrderError, match=f"'{name}' on plate 'b': the cost 'hard' (depends on the "
                                                    "node's sample .* only through operations without|carries "
                                                    "the plate 'b', and in this step (gt|argmax))"):
            storch.backward()


def test_lax_with_a_cut_cost_is_not_refused_and_unbiased():
    """LAX hands out ⊥x (the cost is not differentiated through the sample): a cost 1[x > 0] is fine, and the
    gradient is unbiased: z-test against d/dμ E[1(μ + ε > 0)] = φ(μ)."""
    torch.manual_seed(7)
    theta = torch.tensor([0.3], dtype=torch.float64)
    est = storch.estimator("lax", plate="x", update=False)
    with storch.Graph():
        leaf, th = storch.testing.replicate(theta, 4000)
        x = est(Normal(th, 1.0))
        storch.add_cost((x > 0).to(torch.float64).sum())
        (g,) = storch.testing.per_replicate_derivatives(storch.surrogate_loss(order=1), leaf, 1)
    exact = torch.exp(-theta ** 2 / 2) / math.sqrt(2 * math.pi)
    storch.testing.assert_unbiased(g, exact, "gradient")


def _relu_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()


def _kinked(name: str):
    """An estimator and a model whose control variate has a ReLU on the path from the continuous sample:
    REBAR / RELAX with a ReLU in the cost (at σ_λ(z), σ_λ(z̃)), RELAX / LAX with a ReLU network=."""
    if name == "lax":
        est = storch.estimator("lax", plate="b", network=_relu_net())
        return est, lambda t: storch.add_cost(((est(Normal(t, 1.0)) - 0.45) ** 2).sum())
    if name == "relax_network":
        est = storch.estimator("relax", plate="b", network=_relu_net())
        return est, lambda t: toy_model(est, t)
    est = storch.estimator(name, plate="b")
    return est, lambda t: storch.add_cost((3 * torch.relu(est(Bernoulli(logits=t)) - 0.5)).sum())


@pytest.mark.parametrize("name", ["rebar", "relax", "relax_network", "lax"])
@pytest.mark.parametrize("how", ["hessian", "grad_of_grad"])
def test_order_1_surrogate_differentiated_twice_is_refused_on_a_kink(name, how):
    """surrogate_loss(order=2) refuses a ReLU on the path from the relaxed / continuous sample, but the
    order-1 surrogate differentiated twice gave biased Hessians without a word (REBAR / RELAX with a ReLU
    cost: z -65 / -47; LAX with a ReLU network=: z 5 to 9; found by porting): the order-1 check (once per
    plate and cost name) records the kink and the walked output is hooked at every step, so the
    create_graph=True pass is refused, at the checking step and at a later one. First order is unaffected."""
    est, model = _kinked(name)

    def f(t):
        with storch.Graph():
            model(t)
            return storch.surrogate_loss()  # order 1

    what = "control-variate network's output" if name in ("lax", "relax_network") else "cost"
    for _ in range(2):  # the first step walks; the second looks the kink up
        with pytest.raises(storch.OrderError, match=rf"'{name.split('_')[0]}' on plate 'b': the {what}.*kink.*"
                                                    r"ReluBackward0.*order=n"):
            differentiate_twice(f, TOY_THETA, how)
        t = TOY_THETA.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(t), t)
        assert torch.isfinite(g).all()


def test_order_1_surrogate_of_lax_with_a_smooth_network_differentiates_twice():
    est = storch.estimator("lax", plate="b")  # the default network: tanh

    def f(t):
        with storch.Graph():
            storch.add_cost(((est(Normal(t, 1.0)) - 0.45) ** 2).sum())
            return storch.surrogate_loss()

    for _ in range(2):
        assert torch.isfinite(torch.autograd.functional.hessian(f, TOY_THETA)).all()


@pytest.mark.parametrize("name", ["rebar", "relax", "relax_network", "lax"])
def test_variance_training_runs_through_a_kink_at_order_1(name):
    """The estimators' own create_graph=True pass (storch.backward() training λ, η, φ on the variance of
    the gradient) runs inside storch.extending.estimator_create_graph: the kink's hooks let it through."""
    est, model = _kinked(name)
    theta = TOY_THETA.clone().requires_grad_(True)
    for _ in range(2):
        with storch.Graph():
            model(theta)
            storch.backward()
    before = [p.detach().clone() for p in est.parameters()]
    with storch.Graph():
        model(theta)
        storch.backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    assert est.update_steps == 3 and any(not torch.equal(a, b) for a, b in zip(before, est.parameters()))


@pytest.mark.parametrize("name, options", [("relax", {}), ("relax", {"control_variate": "network"}), ("lax", {})])
def test_default_network_refuses_inputs_of_another_width_with_what_to_do(name, options):
    """One estimator whose default network was built for one width, then given another (an estimator shared
    by models with 5 and 7 latents, a Categorical over 5 then 7 values): torch's "mat1 and mat2 shapes cannot
    be multiplied" named neither the estimator nor what to do. Now a StorchError, and the step is discarded."""
    est = storch.estimator(name, plate="z", **options)

    def step(k):
        theta = torch.zeros(k, requires_grad=True)
        z = est(Normal(theta, 1.0) if name == "lax" else Bernoulli(logits=theta))
        storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
        storch.backward()
        return theta.grad

    step(5)
    with pytest.raises(storch.StorchError, match=rf"{name} \(plate 'z'\).*built .* width 5.* width 7.*one estimator "
                                                  r"per model.*network="):
        step(7)
    assert torch.isfinite(step(5)).all()  # the failed step left nothing behind


# -- a comparison of the relaxed sample (m > 0.5) makes the relaxed cost jump, outside the autograd graph --

_ATT_A = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # attention scores of 3 tokens
_ATT_V = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)  # their values


def _att_thresholded(m):
    """Hard attention to the tokens of a Bernoulli mask written with a comparison, plus a sparsity penalty."""
    att = torch.softmax(torch.where(m > 0.5, _ATT_A, torch.full_like(_ATT_A, -1e9)), 0)
    return (att @ _ATT_V - 1.0) ** 2 + 0.1 * m.sum()


def _att_multiplied(m):
    """The same kind of model with the mask multiplied in: continuous in the relaxed sample."""
    w = m * torch.exp(_ATT_A)
    return (w @ _ATT_V / (w.sum() + 1.0) - 1.0) ** 2 + 0.1 * m.sum()


def _att_exact(cost):
    def exact(theta):
        values = [torch.tensor(bits, dtype=torch.float64) for bits in itertools.product([0.0, 1.0], repeat=3)]
        return sum(Bernoulli(logits=theta).log_prob(b).sum().exp() * cost(b) for b in values)
    return exact


_THRESHOLDS = {  # how the mask is thresholded
    "where": _att_thresholded,
    "mul": lambda m: ((m > 0.5).to(m.dtype) * m * _ATT_A).sum() + 0.1 * m.sum(),
    "method": lambda m: (m.gt(0.5).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "bool": lambda m: (torch.where(m.bool(), _ATT_A, 0.0)).sum() + 0.1 * m.sum(),
    "lt_reflected": lambda m: ((0.5 < m).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "argmax": lambda m: (torch.nn.functional.one_hot(m.argmax(-1), 3).double() * _ATT_A).sum() + 0.1 * m.sum(),
    # found by porting (p-nas): thresholds written with these passed, REBAR's gradient 0.0246 for 0.7578 (z = -767)
    "signbit": lambda m: ((~torch.signbit(m - 0.5)).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "isfinite": lambda m: (torch.isfinite(torch.log(m - 0.5)).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "isinf": lambda m: (torch.isinf(torch.log(m - 0.5)).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "isposinf": lambda m: (torch.isposinf(torch.exp(1e4 * (m - 0.5))).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "isneginf": lambda m: (torch.isneginf(torch.log(m - 0.5)).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "isnan": lambda m: (torch.isnan(torch.log(m - 0.5)).double() * _ATT_A).sum() + 0.1 * m.sum(),
    "Tensor.isnan": lambda m: (torch.log(m - 0.5).isnan().double() * _ATT_A).sum() + 0.1 * m.sum(),
    "histc": lambda m: torch.histc(m, bins=2, min=0, max=1)[1] + 0.1 * m.sum(),
    "count_nonzero": lambda m: torch.count_nonzero(torch.relu(m - 0.5)).double() + 0.1 * m.sum(),
    "frexp": lambda m: torch.frexp(m + 0.5).exponent.double().sum() + 0.1 * m.sum(),
    # a one-hot argmax whose gradient is the soft one's (review r-nineteen: accepted before)
    "gumbel_softmax_hard": lambda m: (torch.nn.functional.gumbel_softmax(m * 3, hard=True) * _ATT_A).sum()
    + 0.1 * m.sum(),
}

_FINITENESS = ("isfinite", "isinf", "isposinf", "isneginf", "isnan", "Tensor.isnan")


@pytest.mark.parametrize("how", sorted(_THRESHOLDS))
@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_thresholded_relaxed_sample_is_refused(name, how):
    """softmax(where(m > 0.5, a, -1e9)) @ v + 0.1 Σm with m from rebar / relax: the relaxed cost f(σ_λ(z)) jumps
    where σ_λ(z) crosses 0.5, which autograd does not see (the comparison's result is a bool), so the control
    variate's pathwise term missed the jump and only the penalty's gradient was left (mean [0.024, 0.026,
    0.025] for the exact [-0.536, 0.091, 1.517], |z| up to 3900; found by porting). The cost reached the sample
    through the penalty, so the core's cut check let it pass. Now the comparison (in its forms: method,
    reflected operator, bool cast, argmax) is recorded by the dispatcher and the surrogate refuses it."""
    theta = TOY_THETA.clone().requires_grad_(True)
    est = storch.estimator(name, plate="m")
    torch.manual_seed(0)
    # a finiteness test is a jump only in a step where its operand is not finite somewhere (test below): these
    # are refused at the first step whose samples fall on both sides of m = 0.5
    steps = 20 if how in _FINITENESS else 1
    with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'm': the cost 'att' .*(without a "
                                                r"derivative|\bgt\b|__gt__|__lt__|bool|argmax|gumbel_softmax).*'score'.*"
                                                r"multiply by it"):
        for _ in range(steps):
            with storch.Graph():
                m = est(Bernoulli(logits=theta))
                storch.add_cost(_THRESHOLDS[how](m), name="att")
                storch.surrogate_loss()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_finiteness_threshold_stays_refused(name, seed):
    """isfinite(log(b - 0.5)) is b > 0.5 (NaN below): its operand is not finite in most steps, where the test is
    recorded as a threshold and refused (a step whose samples all fall above 0.5 is not; found by porting, p-nas:
    REBAR's gradient 0.0246 for 0.7578)."""
    th = torch.tensor([0.3], requires_grad=True)
    est = storch.estimator(name, plate="b")
    torch.manual_seed(seed)
    with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'b': the cost 'c' .*without a derivative"):
        for _ in range(20):
            with storch.Graph():
                b = est(Bernoulli(logits=th))
                storch.add_cost((3 * torch.isfinite(torch.log(b - 0.5)).float() + 0.1 * b).sum(), name="c")
                storch.surrogate_loss()


_GUARDS = {  # NaN guards of a cost that is finite everywhere: the one NonFiniteCostError advises, and its forms
    "where(isfinite(c), c, 0)": lambda c: torch.where(torch.isfinite(c), c, 0.0),
    "where(isnan(c), 0, c)": lambda c: torch.where(torch.isnan(c), 0.0, c),
    "c.masked_fill(c.isinf(), 0)": lambda c: c.masked_fill(c.isinf(), 0.0),
}


@pytest.mark.parametrize("guard", sorted(_GUARDS))
@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_nan_guard_of_a_finite_cost_is_accepted_and_unbiased(name, guard):
    """The finiteness tests were recorded as jumps wherever they read the relaxed sample, so the NaN guard storch's
    own NonFiniteCostError advises was refused (found by review). On an operand whose entries are all finite their
    result is constant: not recorded. E[3b + 0.1b²] has the gradient 3.1 p (1 - p) in the logit, z-tested."""
    th = torch.tensor([0.3], requires_grad=True)
    p = torch.sigmoid(th).item()
    est = storch.estimator(name, plate="b")
    torch.manual_seed(0)
    gs = []
    for _ in range(300):
        with storch.Graph():
            b = est(Bernoulli(logits=th))
            storch.add_cost(_GUARDS[guard](3 * b + 0.1 * b ** 2).sum(), name="c")
            gs.append(torch.autograd.grad(storch.surrogate_loss(), th)[0])
    assert_unbiased(torch.stack(gs).double(), torch.tensor([3.1 * p * (1 - p)], dtype=torch.float64), "gradient")


_FLOOR_DIVISIONS = {  # a jump written as a floor division or a remainder: in the autograd graph (DivBackward2 with
    # rounding mode floor, RemainderBackward0, FmodBackward0), refused at order 1 by the walk of the relaxed path
    "//": lambda m: ((m + 0.5) // 1 * _ATT_A).sum() + 0.1 * m.sum(),
    "rfloordiv": lambda m: ((2.0 // (m + 0.5)) * _ATT_A).sum() + 0.1 * m.sum(),
    "floor_divide": lambda m: (torch.floor_divide(m + 0.5, 1) * _ATT_A).sum() + 0.1 * m.sum(),
    "Tensor.floor_divide": lambda m: ((m + 0.5).floor_divide(1) * _ATT_A).sum() + 0.1 * m.sum(),
    "div floor": lambda m: (torch.div(m + 0.5, 1, rounding_mode="floor") * _ATT_A).sum() + 0.1 * m.sum(),
    "%": lambda m: ((m + 0.5) % 1 * _ATT_A).sum() + 0.1 * m.sum(),
    "fmod": lambda m: (torch.fmod(m + 0.5, 1) * _ATT_A).sum() + 0.1 * m.sum(),
}


@pytest.mark.parametrize("how", sorted(_FLOOR_DIVISIONS))
@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_floor_division_of_the_relaxed_sample_is_refused_by_storch(name, how):
    """(m + 0.5) // 1 built the surrogate, then torch's backward raised its own RuntimeError (floor_divide has no
    derivative; found by porting). On a plate tensor storch computes it as torch.div(..., rounding_mode="floor"),
    so it gets storch's OrderError naming the jump, as div(floor), % and fmod do; the values are torch's."""
    theta = TOY_THETA.clone().requires_grad_(True)
    with storch.Graph():
        m = storch.estimator(name, plate="m")(Bernoulli(logits=theta))
        storch.add_cost(_FLOOR_DIVISIONS[how](m), name="att")
        with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'm': the order-1 surrogate .*'att'.*"
                                                    r"(DivBackward|RemainderBackward|FmodBackward)"):
            storch.surrogate_loss()


_SMOOTH_NEAR = {  # near the refused forms, but smooth in the relaxed sample: not refused, unbiased
    # nan_to_num of a value that is always finite is the identity
    "nan_to_num": lambda m: (torch.nan_to_num(m) * _ATT_A).sum() + 0.1 * m.sum() ** 2,
    # bincount sums its weights (the sample) into bins of fixed integers: linear in the sample
    "bincount weights": lambda m: (torch.bincount(torch.tensor([0, 1, 0]), weights=m, minlength=2)
                                   * _ATT_A[:2]).sum() + 0.1 * m.sum() ** 2,
    # a remainder of data (not of the sample) scales the sample
    "% of data": lambda m: (m * (_ATT_A % 1.0)).sum() + 0.1 * m.sum() ** 2,
}


@pytest.mark.parametrize("how", sorted(_SMOOTH_NEAR))
@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_smooth_forms_near_the_refused_ones_are_unbiased(name, how):
    """Controls of the refusals above: a z-test of the gradient against exact enumeration."""
    from relaxed_problems import estimates, exact_derivatives

    torch.manual_seed(8)
    est = storch.estimator(name, plate="m")
    cost = _SMOOTH_NEAR[how]
    g, = estimates(lambda x: storch.add_cost(cost(est(Bernoulli(logits=x)))), TOY_THETA, 1)
    storch.testing.assert_unbiased(g, exact_derivatives(_att_exact(cost), TOY_THETA, 1)[0], "gradient")


def test_a_thresholded_relaxed_sample_is_what_biases_the_estimate():
    """What the refusal prevents: the same model with the record switched off (jump_free False on the
    instance) gives a biased gradient (z-test against exact enumeration)."""
    from relaxed_problems import estimates, exact_derivatives

    torch.manual_seed(3)
    est = storch.estimator("rebar", plate="m", update=False)
    est.jump_free = False
    g, = estimates(lambda x: storch.add_cost(_att_thresholded(est(Bernoulli(logits=x)))), TOY_THETA, 1, n=2000)
    report = storch.testing.z_test(g, exact_derivatives(_att_exact(_att_thresholded), TOY_THETA, 1)[0],
                                   "thresholded mask")
    assert not report.ok


@pytest.mark.parametrize("how", ["signbit", "count_nonzero", "frexp"])
def test_the_newly_refused_thresholds_are_what_biases_the_estimate(how):
    """As above for the forms found by porting (signbit, count_nonzero; frexp's exponent): with the record
    switched off the gradient is biased (z-test against exact enumeration)."""
    from relaxed_problems import estimates, exact_derivatives

    torch.manual_seed(3)
    est = storch.estimator("rebar", plate="m", update=False)
    est.jump_free = False
    cost = _THRESHOLDS[how]
    g, = estimates(lambda x: storch.add_cost(cost(est(Bernoulli(logits=x)))), TOY_THETA, 1, n=2000)
    report = storch.testing.z_test(g, exact_derivatives(_att_exact(cost), TOY_THETA, 1)[0], how)
    print(report.table())
    assert not report.ok


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_multiplied_mask_is_unbiased(name):
    """The same model with the mask multiplied in (no comparison) is not refused and is unbiased."""
    from relaxed_problems import estimates, exact_derivatives

    torch.manual_seed(5)
    est = storch.estimator(name, plate="m")
    g, = estimates(lambda x: storch.add_cost(_att_multiplied(est(Bernoulli(logits=x)))), TOY_THETA, 1)
    storch.testing.assert_unbiased(g, exact_derivatives(_att_exact(_att_multiplied), TOY_THETA, 1)[0], "gradient")


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_comparisons_that_do_not_threshold_the_relaxed_sample_are_not_refused(name):
    """Comparisons of data (plain and on a data plate), of a value without the sample's gradient (a downstream
    score node's sample, a metric on the raw tensor m.tensor.detach()), and torch.distributions' argument checks of a likelihood whose
    parameters carry the relaxed sample's gradient (Bernoulli(logits=...) compares logits == logits) run."""
    theta = TOY_THETA.clone().requires_grad_(True)
    data = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 3.0]], dtype=torch.float64)
    with storch.Graph():
        x = storch.denote_independent(data, 0, "data")
        m = storch.estimator(name, plate="m")(Bernoulli(logits=theta))
        y = storch.estimator("expect", plate="y")(Bernoulli(logits=2 * m - 1))  # (the relaxed env has no score)
        lik = Normal(m * x, torch.nn.functional.softplus(m) + 0.5)  # validated: loc == loc, scale > 0
        cost = (torch.where(_ATT_A > 0, m, 1 - m).sum() + torch.where(x > 0, m, 0.0).sum()
                + (y > 0.5).double().sum() - lik.log_prob(x).sum())
        storch.add_cost(cost, name="c")
        _ = (m.tensor.detach() > 0.5).double().mean()  # a metric, on the raw tensor
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g).all()


def test_network_relax_and_arm_may_threshold_their_sample():
    """relax with control_variate="network" evaluates the cost at the hard sample b only (it carries no
    gradient), as ARM does: a comparison of it is fine."""
    theta = TOY_THETA.clone().requires_grad_(True)
    for est in (storch.estimator("relax", plate="m", control_variate="network"), storch.estimator("arm", plate="m")):
        with storch.Graph():
            storch.add_cost(_att_thresholded(est(Bernoulli(logits=theta))))
            g, = torch.autograd.grad(storch.surrogate_loss(), theta)
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["rebar", "relax"])
@pytest.mark.parametrize("likelihood", ["kl_bernoulli", "continuous_bernoulli", "geometric", "max_value",
                                        "max_dim_values", "topk_values"])
def test_comparisons_inside_torch_distributions_or_without_indices_are_not_refused(name, likelihood):
    """Found by review: the comparisons torch.distributions makes internally (kl_divergence's q.probs == 0,
    ContinuousBernoulli's Taylor branch, Geometric's probs == 1) select between formulas of one smooth function,
    and max(m) without a dim returns no index: REBAR/RELAX must not refuse them."""
    from torch.distributions import ContinuousBernoulli, Geometric, kl_divergence

    theta = TOY_THETA.clone().requires_grad_(True)
    dec = torch.tensor([0.7, -0.4, 1.1], dtype=theta.dtype)
    y = torch.tensor([1.0, 0.0, 1.0], dtype=theta.dtype)
    costs = {
        "kl_bernoulli": lambda m: kl_divergence(Bernoulli(logits=m * dec), Bernoulli(logits=torch.zeros_like(dec))).sum(),
        "continuous_bernoulli": lambda m: -ContinuousBernoulli(logits=m * dec).log_prob(y * 0.8 + 0.1).sum(),
        "geometric": lambda m: -Geometric(logits=m * dec).log_prob(y).sum(),
        "max_value": lambda m: m.max() + (m * dec).sum(),
        # a stable log-sum-exp's x - x.max(-1, keepdim=True).values (found by review: refused when max with a dim
        # was recorded for its indices)
        "max_dim_values": lambda m: ((m * dec) - (m * dec).max(-1, keepdim=True).values).exp().sum().log(),
        "topk_values": lambda m: (m * dec).topk(2).values.sum(),
    }
    with storch.Graph():
        m = storch.estimator(name, plate="m")(Bernoulli(logits=theta))
        storch.add_cost(costs[likelihood](m), name="f")
        storch.backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()


# -- torch's (OneHot)Categorical.log_prob reads a relaxed / straight-through one-hot sample as indices --

_CAT_PRIOR = torch.tensor([0.2, 0.1, -0.4], dtype=torch.float64)


def _torch_log_ratio(kind):
    """The sampled-KL term q.log_prob(z) - p.log_prob(z) with torch's log_prob (validate_args=False, the recipe
    that holds for a Bernoulli)."""
    cls = OneHotCategorical if kind == "onehot" else Categorical

    def cost(theta, z):
        q, p = cls(logits=theta, validate_args=False), cls(logits=_CAT_PRIOR, validate_args=False)
        return q.log_prob(z) - p.log_prob(z)
    return cost


@pytest.mark.parametrize("kind", ["onehot", "categorical"])
@pytest.mark.parametrize("name", ["rebar", "relax", "gumbel_softmax", "gumbel_straight_through"])
def test_torch_log_prob_of_a_relaxed_category_is_refused(name, kind):
    """Found by porting a categorical VAE: with q.log_prob(z) - p.log_prob(z) in the cost, torch's
    OneHotCategorical.log_prob took value.max(-1)[1] (an argmax) of the relaxed simplex point, so the cost jumped
    along the relaxed path unseen (REBAR/RELAX |z| ~20, 72 in a two-layer categorical VAE), and
    Categorical.log_prob took value.long() of the one-hot vector (per-sample shape (3,), |z| 161). The watch
    exempted every jump made inside torch.distributions. Now these index reads are recorded for any estimator that
    hands out a one-hot value with gradient, and the refusal says what to write."""
    theta = TOY_THETA.clone().requires_grad_(True)
    dist = OneHotCategorical(logits=theta) if kind == "onehot" else Categorical(logits=theta)
    opt_in = {"categorical": "one_hot"} if kind == "categorical" else {}  # a Categorical taken as one-hot vectors
    with storch.Graph():
        z = storch.estimator(name, plate="z", **opt_in)(dist)
        storch.add_cost(_torch_log_ratio(kind)(theta, z).sum() + (z * _ATT_V).sum() ** 2, name="elbo")
        cause = r"OneHotCategorical\.log_prob applied max" if kind == "onehot" else r"Categorical\.log_prob applied long"
        with pytest.raises(storch.OrderError, match=rf"'{name}' on plate 'z': the cost 'elbo' .*{cause}.*"
                                                    r"\(z \* logits\.log_softmax\(-1\)\)\.sum\(-1\)"):
            storch.surrogate_loss()


@pytest.mark.parametrize("name", ["rebar", "gumbel_softmax"])
def test_torch_log_prob_of_a_relaxed_category_under_independent_is_refused(name):
    """The same through an Independent node and a likelihood whose value is a function of the sample."""
    theta = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        z = storch.estimator(name, plate="zi")(Independent(OneHotCategorical(logits=theta), 1))
        prior = OneHotCategorical(logits=_CAT_PRIOR, validate_args=False)
        storch.add_cost((prior.log_prob(z * 1.0).sum() + (z * _ATT_V).sum() ** 2), name="c")
        with pytest.raises(storch.OrderError, match=r"OneHotCategorical\.log_prob"):
            storch.surrogate_loss()


def test_a_category_read_only_through_an_argmax_names_log_prob():
    """A cost that reads gumbel_softmax's relaxed one-hot value only through an operation without a derivative
    (the core's cut check): for a (OneHot)Categorical node the message names torch's log_prob and the formula."""
    theta = TOY_THETA.clone().requires_grad_(True)
    with storch.Graph():
        z = storch.estimator("gumbel_softmax", plate="zc")(OneHotCategorical(logits=theta))
        storch.add_cost(_ATT_V[z.argmax(-1)], name="c")
        with pytest.raises(storch.OrderError, match=r"only through operations without a derivative.*"
                                                    r"OneHotCategorical\.log_prob\(z\).*"
                                                    r"\(z \* logits\.log_softmax\(-1\)\)\.sum\(-1\)"):
            storch.surrogate_loss()


@pytest.mark.parametrize("name", ["rebar", "relax", "gumbel_softmax"])
def test_categorical_likelihoods_of_data_are_not_refused(name):
    """torch's Categorical / OneHotCategorical log_prob of data (indices, one-hot labels: no gradient) under
    parameters that carry the relaxed sample's gradient, with argument validation (its comparisons), and the
    hand-written continuous extension of the sample's log-probability, run."""
    theta = TOY_THETA.clone().requires_grad_(True)
    labels = torch.tensor([2, 0])
    with storch.Graph():
        z = storch.estimator(name, plate="zd")(OneHotCategorical(logits=theta))
        logits = z * _ATT_A
        lik = Categorical(logits=logits).log_prob(labels).sum()
        lik = lik + OneHotCategorical(logits=logits).log_prob(torch.eye(3, dtype=theta.dtype)[labels]).sum()
        kl = (z * (theta.log_softmax(-1) - _CAT_PRIOR.log_softmax(-1))).sum(-1)
        storch.add_cost(kl - lik, name="c")
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["rebar", "relax", "gumbel_softmax", "gumbel_straight_through"])
@pytest.mark.parametrize("mode", ["Categorical", "OneHotCategorical"])
def test_torch_s_mode_of_a_decoder_is_treated_as_the_user_s_argmax(name, mode):
    """torch's .mode of a decoder built from z (an argmax of its probabilities, not an index read of z): for the
    relaxations it is an unused metric, accepted, as a user's own argmax is (a first version refused it as a
    log_prob of the sample); for REBAR and RELAX, which differentiate the cost through the relaxed sample, it is a
    jump, refused as a user's argmax is (a second version let it through; both found by review)."""
    theta = TOY_THETA.clone().requires_grad_(True)
    with storch.Graph():
        z = storch.estimator(name, plate="zm")(OneHotCategorical(logits=theta))
        logits = z * _ATT_A
        {"Categorical": Categorical, "OneHotCategorical": OneHotCategorical}[mode](logits=logits).mode
        storch.add_cost(logits.pow(2).sum(-1), name="c")
        if name in ("rebar", "relax"):
            with pytest.raises(storch.OrderError, match="argmax"):
                storch.surrogate_loss()
        else:
            g, = torch.autograd.grad(storch.surrogate_loss(), theta)
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", ["rebar", "relax"])
@pytest.mark.parametrize("form", ["detached", "no_grad", "clone_detached"])
def test_a_mask_of_the_detached_relaxed_sample_that_feeds_the_cost_is_refused(name, form):
    """Found by review: a comparison of the relaxed sample's detached copy (z.detach(), under torch.no_grad(),
    z.clone().detach()) has no autograd graph for the watch to walk, and was not counted: REBAR's gradient of
    E[where(z > 0.5, 1, 0)] came out 0.000 against the exact σ'(0.3) = 0.245, silently. Every tensor carrying only
    the node's sample plates is computed from its sample, so such a comparison in user code is a jump of the cost
    now, refused as the comparison of z itself is; a metric is computed on the raw tensor (see the test above)."""
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        z = storch.estimator(name, plate="z", n_samples=4)(Bernoulli(logits=theta))
        if form == "no_grad":
            with torch.no_grad():
                mask = z > 0.5
        else:
            mask = (z.detach() if form == "detached" else z.clone().detach()) > 0.5
        storch.add_cost(torch.where(mask, 1.0 - 0 * z, 0 * z), name="c")
        with pytest.raises(storch.OrderError, match=r"m\.tensor\.detach\(\)|tensor\.detach"):
            storch.surrogate_loss()


class _Leaky(torch.distributions.transforms.Transform):
    """max(x, x / 2): a bijection with a kink at 0 (LAX needs log p of ⊥x: an inverse)."""

    domain = codomain = torch.distributions.constraints.real
    bijective = True

    def _call(self, x):
        return torch.maximum(x, x / 2)

    def _inverse(self, y):
        return torch.minimum(y, 2 * y)

    def log_abs_det_jacobian(self, x, y):
        return torch.where(x > 0, 0.0, math.log(0.5)).to(x.dtype)


def test_lax_refuses_a_kink_behind_a_caching_transform():
    """A transform with cache_size=1 keeps the sample after the draw; taken for a parameter, the walk stopped at the
    sample and LAX's order-2 surrogate through max(loc + eps, (loc + eps) / 2) was accepted. The parameters are
    taken before the draw; the cache LAX re-keys for log p(⊥x) is still the draw's (the walk's own draw restores
    it)."""
    from torch.distributions import TransformedDistribution
    from torch.distributions.transforms import TanhTransform
    loc = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    tanh = TanhTransform(cache_size=1)
    with storch.Graph():
        z = storch.estimator("lax", plate="z", n_samples=2)(
            TransformedDistribution(Normal(loc, 1.0), [_Leaky(cache_size=1), tanh]))
        y = tanh._cached_x_y[1]  # (re-keyed to ⊥x by LAX after the walk: the draw's, detached)
        assert not y.requires_grad and torch.equal(getattr(y, "tensor", y), z.tensor)
        storch.add_cost((z ** 2).sum())
        with pytest.raises(storch.OrderError, match=r"'lax'.*the rsample of TransformedDistribution holds Maximum"):
            storch.surrogate_loss(order=2)


def test_relax_sampled_inside_a_non_reentrant_checkpoint_is_refused_during_backward():
    """p-torch: relax called inside checkpoint(..., use_reentrant=False) was recomputed in backward and refused with
    "estimator 'relax' was already used in this graph", though the user called it once (the core's test covers the
    base class's components)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
    data = torch.bernoulli(torch.rand(2, 4))
    est = storch.estimator("relax", plate="z", n_samples=2)
    x = storch.denote_independent(data, 0, "data")
    z = checkpoint(lambda t: est(Bernoulli(logits=enc(t))), x, use_reentrant=False)
    storch.add_cost(-Bernoulli(logits=dec(z)).log_prob(x).sum(), name="rec")
    with pytest.raises(storch.StorchError, match=r"(?i)during a backward pass.*checkpoint the networks, not the sampling"):
        storch.backward()
    storch.reset()


def test_a_commitment_loss_that_detaches_the_sample_gets_the_detach_the_parameters_hint():
    """A VQ-VAE's commitment loss (e - q.detach())**2 with q = z @ C under relax: refused (the relaxed control
    variate would differentiate a cost that does not reach the sample); the message's fixes (score, credit=False,
    z.detach()) all change the model, where the idiom is to detach the codebook (a porting test: with
    ((e - z @ C.detach())**2) relax and rebar are unbiased)."""
    torch.manual_seed(0)
    e = torch.randn(3, requires_grad=True)
    C = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("relax", plate="z", n_samples=2)(OneHotCategorical(logits=-((e - C) ** 2).sum(-1)))
        q = z @ C
        storch.add_cost(((q - 1.0) ** 2).sum(), name="rec")
        storch.add_cost(0.25 * ((e - q.detach()) ** 2).sum(), name="commit")
        with pytest.raises(storch.OrderError, match=r"cost 'commit'.*detaches the parameters instead of the sample: "
                           r"\(\(e - z @ C\.detach\(\)\)\*\*2\)"):
            storch.surrogate_loss()
    storch.reset()


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_arm_on_an_independent_categorical_does_not_advise_passing_the_categorical(name):
    """arm / disarm refused Independent(Categorical(...), 1) with "pass the Categorical itself", which they
    refuse too (found by porting); the message now names Bernoulli and the estimators that take the node."""
    d = Independent(Categorical(logits=torch.zeros(2, 3, requires_grad=True)), 1)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as e:
        storch.estimator(name, plate="x")(d)
    msg = str(e.value)
    assert "it needs one of Bernoulli" in msg and "Estimators that support it:" in msg and "go" in msg, msg
    assert "pass the Categorical itself" not in msg, msg


@pytest.mark.parametrize("name", ["gumbel_softmax", "gumbel_straight_through"])
def test_relaxation_eos_option_says_how_to_write_a_variable_length_message(name):
    """A port of EGG's Gumbel-softmax sender writes storch.estimator(name, eos=0) as for score: the refusal
    said only that there is no option 'eos' and listed the options; it now says why (they take no eos=: no variable-length partition) and how
    (one estimator per position, eos masked by hand; tests/models/test_signaling_game.py), and which estimators
    take eos=."""
    with pytest.raises(storch.OptionError) as info:
        storch.estimator(name, plate="m", eos=0)
    msg = str(info.value)
    assert msg.startswith(f"estimator {name!r} has no option 'eos'. eos= ends the sequences of a partition"), msg
    assert "one estimator per position" in msg and "live = live * (1 - b[eos])" in msg, msg
    assert "score, unordered_set. Its options are: n_samples, temperature, categorical" in msg, msg


def test_gumbel_softmax_hard_option_points_to_gumbel_straight_through():
    """torch's F.gumbel_softmax(hard=True) users write storch.estimator("gumbel_softmax", hard=True): the
    refusal names "gumbel_straight_through" (it only listed the options); gumbel_straight_through itself
    does not repeat the hint, and another unknown option keeps difflib's suggestion."""
    with pytest.raises(storch.OptionError) as info:
        storch.estimator("gumbel_softmax", plate="c", hard=True)
    # one sentence per part, no doubled period after the hint's closing parenthesis (was "has no option 'hard';
    # For the hard ... temperature=...)). its options are: ...")
    assert re.fullmatch(r"estimator 'gumbel_softmax' has no option 'hard'\. For the hard .* use the estimator "
                        r'"gumbel_straight_through" \(storch\.estimator\(.*temperature=\.\.\.\)\)\. '
                        r"Its options are: [a-z_, ]+", str(info.value)), str(info.value)
    with pytest.raises(storch.OptionError) as info:
        storch.estimator("gumbel_straight_through", plate="c", hard=True)
    assert "gumbel_straight_through\"" not in str(info.value)
    assert "already hard" in str(info.value) and "drop the option" in str(info.value)
    with pytest.raises(storch.OptionError, match=r"has no option 'temprature'\. Did you mean 'temperature'\? Its "
                                                  r"options are: "):
        storch.estimator("gumbel_softmax", plate="c", temprature=0.5)


@pytest.mark.parametrize("which", ["rebar", "relax"])
def test_mask_thresholded_from_relaxed_samples_builds_no_later_distribution(which):
    """A Plackett-Luce ranking drawn position by position, the mask of used items thresholded from the earlier
    draws (used > 0.5). REBAR and RELAX evaluate the model on relaxed samples too, where the threshold can mask
    every item: torch's argument validation raised "Expected parameter logits ... found invalid values" (NaN
    rows), which said nothing of the cause. Now storch's OrderError (still a ValueError) says that a threshold
    of a rebar / relax sample cannot build a later distribution's parameters and names the estimators to use."""
    torch.manual_seed(0)
    k = 4
    theta = torch.tensor([0.3, -0.2, 0.5, 0.1], requires_grad=True)
    ests = [storch.estimator(which, plate=f"r{t}") for t in range(k)]
    with storch.Graph():
        used = torch.zeros(k)
        with pytest.raises(storch.OrderError) as info:
            for t in range(k):
                c = ests[t](OneHotCategorical(logits=torch.where(used > 0.5, float("-inf"), theta), validate_args=False))
                used = used + c
    text = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"of estimator {which!r} (a distribution's parameter" in text and "sample was thresholded" in text
    assert "cannot build a later distribution's parameters" in text
    assert "'score'" in text and "'unordered_set'" in text and "'sum_and_sample'" in text
