"""storch.extending: the public API for estimator authors (issue 18)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, LogNormal, Normal, OneHotCategorical
from torch.torch_version import TorchVersion

import storch
from storch.extending import align, base_distribution, leave_one_out, options, plates_of, raw_of, step_guard


def test_every_public_name_is_documented():
    import storch.extending as ext

    for name in ext.__all__:
        obj = getattr(ext, name)
        assert (obj.__doc__ or "").strip(), name
    for name in options.__all__:
        assert (getattr(options, name).__doc__ or "").strip(), name


def test_base_distribution_unwraps_independent_once_and_nothing_else():
    n = Normal(torch.zeros(3), torch.ones(3))
    assert base_distribution(Independent(n, 1)) is n
    assert base_distribution(n) is n
    ln = LogNormal(torch.zeros(3), torch.ones(3))
    assert base_distribution(ln) is ln  # a TransformedDistribution is not its base
    inner = Independent(n, 1)
    assert base_distribution(Independent(inner, 0)) is inner  # once


@pytest.mark.parametrize("check, args, message", [
    (options.integer, ("est", "n", 0), "est: n must be an int >= 1, got 0"),
    (options.integer, ("est", "n", True), "est: n must be an int >= 1, got True"),
    (options.integer, ("est", "n", 2.0), "est: n must be an int >= 1, got 2.0"),
    (options.number, ("est", "lr", 0), "est: lr must be a float > 0, got 0"),
    (options.number, ("est", "lr", False), "est: lr must be a float > 0, got False"),
    (options.number, ("est", "lr", math.nan), "est: lr must be a float > 0, got nan"),
    (options.number, ("est", "t", math.inf), "est: t must be a finite float > 0, got inf"),
    (options.flag, ("est", "update", 1), "est: update must be True or False, got 1"),
    (options.choice, ("est", "baseline", "loo", ("none", "leave_one_out")),
     "est: baseline='loo' is not accepted; use one of 'none', 'leave_one_out'"),
    (options.choice, ("est", "baseline", [], ("none",)), "est: baseline=[] is not accepted; use one of 'none'"),
    (options.optional_index, ("est", "eos", -1), "est: eos must be None or an int >= 0, got -1; an index counts "
     "from the first value, and a negative one (counting from the end) is not accepted: write the index itself, "
     "eos=n - 1 for the last of n values (e.g. eos=vocab - 1)"),
    (options.optional_index, ("est", "eos", torch.tensor(0)), "est: eos must be None or an int >= 0, got tensor(0); "
     "a tensor or array is not accepted (an option is a Python number, not data): write eos=int(t)"),
    (options.optional_index, ("est", "eos", 1.0), "est: eos must be None or an int >= 0, got 1.0"),
])
def test_option_validators_name_the_option_the_value_and_what_is_accepted(check, args, message):
    kwargs = {"minimum": 1} if check is options.integer else {}
    if check is options.number:
        kwargs = {"above": 0, "finite": args[1] == "t"}
    with pytest.raises(storch.OptionError) as info:
        check(*args, **kwargs)
    assert str(info.value) == message


def test_option_validators_return_accepted_values():
    assert options.integer("e", "n", 3, minimum=1) == 3
    assert options.number("e", "d", 0.0, at_least=0.0, below=1.0) == 0.0
    with pytest.raises(storch.OptionError, match=r"e: d must be a float in \[0, 1\), got 1.0"):
        options.number("e", "d", 1.0, at_least=0.0, below=1.0)
    assert options.flag("e", "f", False) is False
    assert options.choice("e", "c", "a", ("a", "b")) == "a"
    assert options.optional_index("e", "eos", None) is None
    assert options.optional_index("e", "eos", 0) == 0


def test_integer_options_accept_any_integral_number_but_not_bool_float_or_tensor():
    """n_samples=np.int64(4) (what arithmetic on array sizes gives) was an OptionError; an integral
    number is now accepted, as a Python int, while bool, float (even 4.0) and tensors still are not."""
    np = pytest.importorskip("numpy")
    for value in (np.int64(4), np.int32(4), np.uint8(4)):
        n = options.integer("e", "n", value, minimum=1)
        assert n == 4 and type(n) is int
        eos = options.optional_index("e", "eos", value)
        assert eos == 4 and type(eos) is int
    for value in (np.bool_(True), True, 4.0, np.float64(4.0), torch.tensor(4), "4", np.int64(0)):
        with pytest.raises(storch.OptionError, match=r"e: n must be an int >= 1, got "):
            options.integer("e", "n", value, minimum=1)
    # every integer option of the core: n_samples (the base class), expect's budget
    est = storch.estimator("reparameterization", plate="z", n_samples=np.int64(4))
    exp = storch.estimator("expect", plate="y", budget=np.int64(8))
    assert exp.budget == 8 and type(exp.budget) is int
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = est(Normal(theta, 1.0))
        y = exp(Bernoulli(logits=theta))
        assert z.plates[0].size == 4 and y.plates[0].size == 8
        storch.add_cost(((z - 0.5) ** 2).sum() + y.sum())
        storch.surrogate_loss().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    with pytest.raises(storch.OptionError, match=r"expect: budget must be an int >= 1, got True"):
        storch.estimator("expect", plate="y", budget=True)


def test_n_samples_is_checked_by_the_validator():
    class Mine(storch.Estimator):
        name = "mine"

    with pytest.raises(storch.OptionError, match=r"mine: n_samples must be an int >= 1 \(the number of samples\), "
                                                 r"got 0; pass an int such as n_samples=4"):
        Mine("z", n_samples=0)


def test_leave_one_out_matches_the_mean_of_the_other_samples():
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    seen = {}

    class LOO(storch.Estimator):
        name = "loo_test"

        def baseline(self, node, cost):
            seen["full"] = leave_one_out(cost, node.n)
            seen["tail"] = leave_one_out(cost, node.n, start=2)
            seen["cost"] = cost.tensor.expand_as(seen["full"])
            seen["dim"] = cost.dim
            return seen["full"]

    with storch.Graph():
        x = LOO("z", n_samples=6)(Independent(Bernoulli(logits=theta), 1))
        storch.add_cost(((x - 0.4) ** 2).sum())
        storch.surrogate_loss()
    c, d = seen["cost"], seen["dim"]
    n = c.shape[d]
    for j in range(n):
        others = torch.cat([c.narrow(d, i, 1) for i in range(n) if i != j], d).mean(d)
        assert torch.allclose(seen["full"].narrow(d, j, 1).squeeze(d), others)
    assert torch.equal(seen["tail"].narrow(d, 0, 2), torch.zeros_like(c.narrow(d, 0, 2)))
    for j in range(2, n):
        others = torch.cat([c.narrow(d, i, 1) for i in range(2, n) if i != j], d).mean(d)
        assert torch.allclose(seen["tail"].narrow(d, j, 1).squeeze(d), others)


def test_step_guard_discards_the_default_graphs_step_and_reraises():
    storch.reset()
    z = storch.estimator("expect", plate="z")(Bernoulli(logits=torch.zeros(())))
    with pytest.raises(ValueError, match="boom"):
        with step_guard():
            raise ValueError("boom")
    with pytest.raises(storch.PlateError, match="discarded"):
        storch.add_cost(z * 1.0)
    storch.reset()


def test_step_guard_keeps_the_step_inside_a_graph_block():
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(Bernoulli(logits=torch.zeros(())))
        with pytest.raises(ValueError):
            with step_guard():
                raise ValueError("handled by the caller")
        storch.add_cost((z - 0.5) ** 2)  # the step goes on
        assert storch.surrogate_loss().dim() == 0


def test_align_plates_of_raw_of_are_the_plate_helpers():
    p, q = storch.Plate("a", 2, False, 0, storch.Lineage()), storch.Plate("b", 3, False, 0, storch.Lineage())
    x = storch.PlateTensor(torch.randn(2, 3), (p, q))
    assert plates_of(x) == (p, q) and plates_of(torch.ones(2)) == ()
    assert raw_of(x) is x.tensor
    assert align(x.tensor, (p, q), (q, p)).shape == (3, 2)


def test_supports_reads_an_instances_capabilities():
    class NeedsRsample(storch.Estimator):
        name = "needs_rsample"
        requires_rsample = True

    b = Bernoulli(logits=torch.zeros(()))
    assert not NeedsRsample.supports(b)
    est = NeedsRsample("z")
    est.requires_rsample = False  # an option that lifts the requirement, set on the instance
    assert est.supports(b) and not NeedsRsample.supports(b)
    est.check_distribution(b)
    assert NeedsRsample.requirements() == ["a distribution with rsample (has_rsample=True) that reparameterises its samples "
                                           "(not OneHotCategoricalStraightThrough's straight-through rsample, nor torch's "
                                           "Wishart.rsample, which autograd cannot differentiate)"]
    assert est.requirements() == []


# -- require_smooth: a pathwise term differentiated n times through a non-smooth operation ----------

def _refused(output, inputs, order):
    from storch.extending import require_smooth

    try:
        require_smooth(output, inputs, order, who="estimator 'e' on plate 'z'", what="the cost 'c'", through="z")
    except storch.OrderError as e:
        return str(e)
    return None


def test_nonsmooth_table_names_torchs_autograd_nodes():
    from storch.extending import nonsmooth_operations

    missing = [name for name in nonsmooth_operations() if not hasattr(torch._C._functions, name)]
    # (torch before the pinned 2.13, down to the minimum 2.7, has no derivative node of aminmax)
    newer = {"AminmaxBackward0"} if TorchVersion(torch.__version__) < "2.13" else set()
    assert not set(missing) - newer, missing  # a misspelt name would never match


@pytest.mark.parametrize("op", [
    torch.relu, torch.nn.ReLU(), torch.nn.functional.relu6, torch.nn.functional.leaky_relu, torch.abs,
    torch.nn.functional.hardtanh, lambda z: z.clamp(min=0.0), lambda z: z.clamp(-1.0, 1.0), torch.sign,
    lambda z: z.clamp(max=torch.zeros(3)), lambda z: torch.maximum(z, torch.zeros(3)), lambda z: z.amax(-1),
    lambda z: z.max(), lambda z: z.min(-1).values, lambda z: z.sort(-1).values, lambda z: z.topk(2).values,
    torch.nn.functional.selu, torch.nn.functional.softsign, torch.round,
])
def test_require_smooth_refuses_a_kink_on_the_path_at_order_2_only(op):
    w = torch.randn(3, 3, requires_grad=True)
    z = torch.sigmoid(torch.randn(3, requires_grad=True) * 2)  # a relaxed sample (it has a grad_fn)
    cost = (op(w @ z + 0.1) ** 2).sum() + (w ** 2).sum()
    msg = _refused(cost, [z], 2)
    assert msg is not None and "estimator 'e' on plate 'z'" in msg and "the cost 'c'" in msg, msg
    assert "softplus" in msg and "'score'" in msg
    assert _refused(cost, [z], 1) is None or "Sign" in msg or "Round" in msg  # a jump is wrong at order 1 too



_F = torch.nn.functional
_C = torch.tensor([0.1, -0.2, 0.3])
_SWEEP = {  # op of a sample z of 3 entries -> order of its first discontinuous derivative (None: smooth)
    "div floor": (lambda z: torch.div(z, 0.5, rounding_mode="floor"), 0),
    "div trunc": (lambda z: torch.div(z, torch.full((3,), 0.5), rounding_mode="trunc"), 0),
    "div floor, z the divisor": (lambda z: torch.div(torch.ones(3), z + 3, rounding_mode="floor"), 0),
    "div": (lambda z: z / (z + 3) / 0.5, None),
    "vector_norm ord 1": (lambda z: torch.linalg.vector_norm(z - _C, ord=1), 1),
    "vector_norm ord inf": (lambda z: torch.linalg.vector_norm(z - _C, ord=math.inf), 1),
    "vector_norm ord 0": (lambda z: torch.linalg.vector_norm(z - _C, ord=0), 0),
    "vector_norm ord 0.5": (lambda z: torch.linalg.vector_norm(z - _C, ord=0.5), 1),
    "vector_norm ord 1.5": (lambda z: torch.linalg.vector_norm(z - _C, ord=1.5), 2),
    "vector_norm of 1 element": (lambda z: torch.linalg.vector_norm(z[:1] - _C[:1]), 1),
    "vector_norm dim of 1 element": (lambda z: torch.linalg.vector_norm((z - _C)[:, None], dim=1), 1),
    "vector_norm ord 2 of 3": (lambda z: torch.linalg.vector_norm(z - _C), 3),  # a point: up to order 3
    "linalg.norm ord inf": (lambda z: torch.linalg.norm(z - _C, ord=math.inf), 1),
    "torch.norm p 1": (lambda z: torch.norm(z - _C, p=1), 1),
    "Tensor.norm 1 dim": (lambda z: (z - _C)[None].norm(1, dim=1), 1),
    "torch.dist p 1": (lambda z: torch.dist(z, _C, p=1), 1),
    "torch.dist p inf": (lambda z: torch.dist(z, _C, p=math.inf), 1),
    "torch.dist p 2 of 1": (lambda z: torch.dist(z[:1], _C[:1]), 1),
    "pairwise_distance p 1": (lambda z: _F.pairwise_distance(z[None], _C[None], p=1), 1),
    "pdist p 1": (lambda z: _F.pdist(torch.stack([z, _C]), p=1), 1),
    "cdist p 1": (lambda z: torch.cdist(z[None], _C[None], p=1), 1),
    "renorm": (lambda z: torch.renorm((z - _C)[None], p=2, dim=0, maxnorm=0.5), 1),
    "normalize p 2": (lambda z: _F.normalize(z[None]), 3),  # its clamp_min(1e-12) of the norm: a guard
    "normalize p 1": (lambda z: _F.normalize(z[None], p=1), 1),
    "copysign of sign": (lambda z: z * torch.copysign(torch.ones(3), z - _C), 0),
    "copysign of magnitude": (lambda z: torch.copysign(z, -1.0), 1),
    "hypot with a constant": (lambda z: torch.hypot(z - _C, torch.zeros(3)), 1),
    "atan2": (lambda z: torch.atan2(z, _C), 0),  # (a constant x < 0 somewhere: the cut at y = 0)
    "atan2, x a positive constant": (lambda z: torch.atan2(z, torch.full((3,), 2.0)), None),  # atan(y / 2)
    "atan2, y a nonzero constant": (lambda z: torch.atan2(torch.full((3,), -1.0), z), None),
    "atan2, y a constant 0": (lambda z: torch.atan2(torch.zeros(3), z), 0),  # 0 for x > 0, pi for x < 0
    "atan2 of two paths": (lambda z: torch.atan2(z, z.flip(0)), 0),
    "hypot with a nonzero constant": (lambda z: torch.hypot(z - _C, torch.full((3,), 2.0)), None),
    "angle": (lambda z: torch.angle(z), 0),
    "softplus threshold 1": (lambda z: _F.softplus(z, threshold=1.0), 0),
    "softplus": (lambda z: _F.softplus(z), None),
    "logit eps": (lambda z: torch.logit(torch.sigmoid(z), eps=0.1), 1),
    "logit": (lambda z: torch.logit(torch.sigmoid(z)), None),
    "smooth_l1_loss": (lambda z: _F.smooth_l1_loss(z, _C), 2),
    "smooth_l1_loss beta 0": (lambda z: _F.smooth_l1_loss(z, _C, beta=0.0), 1),
    "huber_loss": (lambda z: _F.huber_loss(z, _C), 2),
    "l1_loss": (lambda z: _F.l1_loss(z, _C), 1),
    "scatter_reduce amax": (lambda z: torch.zeros(2).scatter_reduce(0, torch.tensor([0, 1, 0]), z, "amax"), 1),
    "scatter_reduce sum": (lambda z: torch.zeros(2).scatter_reduce(0, torch.tensor([0, 1, 0]), z, "sum"), None),
    "segment_reduce max": (lambda z: torch.segment_reduce(z, "max", lengths=torch.tensor([2, 1])), 1),
    "embedding_bag max": (lambda z: _F.embedding_bag(torch.tensor([[0, 1]]), z[:, None], mode="max"), 1),
    "embedding_bag sum": (lambda z: _F.embedding_bag(torch.tensor([[0, 1]]), z[:, None], mode="sum"), None),
    "fake_quantize": (lambda z: torch.fake_quantize_per_tensor_affine(z, 0.1, 0, -128, 127), 0),
    "fmod": (lambda z: torch.fmod(z, 0.5), 0), "remainder": (lambda z: z % 0.5, 0), "frac": (torch.frac, 0),
    "trunc": (torch.trunc, 0), "ceil": (torch.ceil, 0), "floor": (torch.floor, 0), "round": (torch.round, 0),
    "round decimals": (lambda z: torch.round(z, decimals=1), 0), "sign": (torch.sign, 0), "sgn": (torch.sgn, 0),
    "hardshrink": (_F.hardshrink, 0), "softshrink": (_F.softshrink, 1), "threshold": (lambda z: _F.threshold(z, 0.1, 2.0), 0),
    "hardtanh": (_F.hardtanh, 1), "relu6": (_F.relu6, 1), "hardswish": (_F.hardswish, 1),
    "hardsigmoid": (_F.hardsigmoid, 1), "leaky_relu": (_F.leaky_relu, 1),
    "rrelu eval": (lambda z: _F.rrelu(z, training=False), 1), "selu": (_F.selu, 1), "elu": (_F.elu, 2),
    "maximum": (lambda z: torch.maximum(z, _C), 1), "fmin": (lambda z: torch.fmin(z, _C), 1),
    "cummax": (lambda z: torch.cummax(z, 0).values, 1), "cummin": (lambda z: torch.cummin(z, 0).values, 1),
    "amax": (lambda z: z.amax(0), 1), "min dim": (lambda z: z.min(0).values, 1), "median": (torch.median, 1),
    "kthvalue": (lambda z: z.kthvalue(2).values, 1), "topk": (lambda z: z.topk(2).values, 1),
    "sort": (lambda z: z.sort().values, 1), "quantile": (lambda z: torch.quantile(z, 0.3), 1),
    "max_pool1d": (lambda z: _F.max_pool1d(z[None, None], 2), 1),
    "adaptive_max_pool1d": (lambda z: _F.adaptive_max_pool1d(z[None, None], 1), 1),
    "clamp tensor bounds": (lambda z: torch.clamp(z, min=_C, max=_C + 1), 1),
    "mish": (_F.mish, None), "gelu": (_F.gelu, None), "silu": (_F.silu, None), "logsigmoid": (_F.logsigmoid, None),
    "mse_loss": (lambda z: _F.mse_loss(z, _C), None), "nan_to_num": (torch.nan_to_num, None),
    "pad reflect": (lambda z: _F.pad(z[None, None], (1, 1), mode="reflect"), None),
    "interpolate nearest (of values: linear)": (lambda z: _F.interpolate(z[None, None], scale_factor=2), None),
    "logsumexp": (lambda z: torch.logsumexp(z, 0), None), "cosine_similarity": (lambda z: _F.cosine_similarity(z, _C, 0), 3),
}


@pytest.mark.parametrize("name", list(_SWEEP))
def test_single_node_operations_are_classified_by_their_first_discontinuous_derivative(name):
    """Each operation as torch records it (one autograd node, or a decomposition): the lowest order found on the
    path (None: smooth). A renamed node in a future torch, or a new ord / mode it saves, fails here."""
    from storch.conditions.smoothness import _nonsmooth_on_path

    op, expected = _SWEEP[name]
    z = torch.sigmoid(torch.tensor([0.3, -1.2, 0.8], requires_grad=True)) * 2 - 1  # a relaxed sample
    found = _nonsmooth_on_path(op(z).sum(), [z], 10)
    assert (min(found.values()) if found else None) == expected, found


def test_require_smooth_passes_smooth_paths_and_kinks_off_the_path():
    w = torch.randn(3, 3, requires_grad=True)
    leaf = torch.rand(3, requires_grad=True)  # a leaf sample: found through its AccumulateGrad node
    for z in (torch.sigmoid(torch.randn(3, requires_grad=True)), leaf):
        for act in (torch.tanh, torch.nn.functional.softplus, torch.nn.functional.gelu, torch.nn.functional.silu,
                    torch.nn.functional.elu, torch.nn.functional.celu):  # ELU (α = 1), CELU: C¹
            assert _refused((act(w @ z) ** 2).sum(), [z], 2) is None, act
        # a ReLU of the parameters alone is a deterministic function of θ: fine
        assert _refused((torch.relu(w) @ z).sum() + torch.relu(w).sum(), [z], 3) is None
        # torch's clamp of probabilities to [eps, 1 - eps] (Bernoulli(probs=...)) is a numerical guard
        lp = Bernoulli(probs=torch.sigmoid(w @ z)).log_prob(torch.ones(3)).sum()
        assert _refused(lp, [z], 2) is None
    assert "ReluBackward0" in _refused((torch.relu(w @ leaf)).sum(), [leaf], 2)
    assert "EluBackward0" in _refused(torch.nn.functional.elu(w @ leaf).sum(), [leaf], 3)  # not C²
    assert _refused(torch.ones(()), [leaf], 2) is None  # no graph: nothing differentiated


def test_require_smooth_returns_the_kinks_it_lets_through_at_order_1():
    """At order 1 a kink is not refused, but an order-1 surrogate differentiated twice through the output
    would be biased: require_smooth returns the kinks its one walk found (for the caller to hook the output
    with refuse_create_graph), () for a smooth path, a kink off the path, and at order 2 (where it raises)."""
    from storch.extending import require_smooth

    w = torch.randn(3, 3, requires_grad=True)
    z = torch.sigmoid(torch.randn(3, requires_grad=True))
    args = dict(who="estimator 'e' on plate 'z'", what="the cost 'c'", through="z")
    assert require_smooth(torch.relu(w @ z).abs().sum(), [z], 1, **args) == ("AbsBackward0", "ReluBackward0")
    assert require_smooth(torch.tanh(w @ z).sum(), [z], 1, **args) == ()
    assert require_smooth((torch.relu(w) @ z).sum(), [z], 1, **args) == ()
    assert require_smooth(torch.tanh(w @ z).sum(), [z], 2, **args) == ()
    with pytest.raises(storch.OrderError, match="RoundBackward0"):
        require_smooth(torch.round(w @ z).sum(), [z], 1, **args)


def test_refuse_create_graph_refuses_a_second_derivative_only():
    """storch.extending.refuse_create_graph: a backward pass with create_graph=True that reaches the tensor
    raises OrderError(message()); a plain pass, and an estimator's own pass in estimator_create_graph, do not."""
    from storch.extending import estimator_create_graph, refuse_create_graph

    theta = torch.tensor([0.3, -0.2], requires_grad=True)

    def loss():
        y = torch.relu(theta) * 2
        refuse_create_graph(y, lambda: "a kink: refused")
        return (y ** 2).sum()

    (g,) = torch.autograd.grad(loss(), theta)
    assert torch.equal(g, torch.tensor([2.4, 0.0]))
    with pytest.raises(storch.OrderError, match="a kink: refused"):
        torch.autograd.grad(loss(), theta, create_graph=True)
    with estimator_create_graph():
        (g,) = torch.autograd.grad(loss(), theta, create_graph=True)
    assert g.requires_grad
    refuse_create_graph(torch.ones(2), lambda: "never")  # no gradient: nothing to hook


def _in_thread(fn):
    """fn() run in another thread; its result (or the exception it raised)."""
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class _ScoreForThreads(storch.Estimator):
    """The base class's components (the score function): the core test env has no storch_score."""

    name = "plain_score_for_thread_tests"


def _hooked_score_step(calls):
    """A score-function step whose plate tensor h = z * W has a hook that negates its gradient: W.grad is
    exactly -mean_z z (the cost's path to W goes through h; the score term does not reach W)."""
    torch.manual_seed(0)
    theta = torch.zeros(3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    with storch.Graph():
        z = _ScoreForThreads(plate="z", n_samples=2)(Bernoulli(logits=theta))
        h = z * w
        h.register_hook(lambda g: calls.append(1) or -g)
        storch.add_cost(h.sum(), name="c")
        storch.backward()
    return w.grad.clone(), -raw_of(z).mean(0)


def test_estimator_own_pass_leaves_other_threads_hooks_alone():
    """estimator_own_pass() was a process-wide switch: while one thread was in it (RELAX's update of its control
    variate), every other thread's backward pass skipped the user's register_hook hooks on plate tensors, a
    silent wrong gradient ([1, .5, .5] for [-1, -.5, -.5], the hook called 0 times). Only the block's passes skip
    them; a thread's own pass in its block still does."""
    from storch.extending import estimator_own_pass

    calls: list = []
    alone, exact = _hooked_score_step(calls)
    assert calls == [1] and torch.equal(alone, exact)
    calls.clear()
    with estimator_own_pass():
        got, exact = _in_thread(lambda: _hooked_score_step(calls))
        assert calls == [1] and torch.equal(got, exact) and torch.equal(got, alone)
        calls.clear()
        # this thread's passes in the block are the estimator's own: the hook is not run
        skipped, _ = _hooked_score_step(calls)
    assert calls == [] and torch.equal(skipped, -exact)


def test_estimator_create_graph_leaves_other_threads_refusals_alone():
    """estimator_create_graph() was a process-wide switch too: while one thread was in it, another thread's user
    create_graph pass through an order-1 refusal (a kink) went through, a silent biased second derivative. It
    is refused; the block's own thread's pass is let through."""
    from storch.extending import estimator_create_graph, refuse_create_graph

    theta = torch.tensor([0.3, -0.2], requires_grad=True)

    def loss():
        y = torch.relu(theta) * 2
        refuse_create_graph(y, lambda: "a kink: refused")
        return (y ** 2).sum()

    with estimator_create_graph():
        with pytest.raises(storch.OrderError, match=r"a kink: refused\. \(A `with storch\.extending\.estimator_create_graph"
                           r"\(\):` block is open, but this pass is not its own.*own\(loss\)"):
            _in_thread(lambda: torch.autograd.grad(loss(), theta, create_graph=True))
        (g,) = torch.autograd.grad(loss(), theta, create_graph=True)
    assert torch.equal(g.detach(), torch.tensor([2.4, 0.0]))


def test_a_marked_pass_is_the_blocks_own_in_any_thread():
    """A CUDA backward runs hooks in the autograd engine's device threads, not the block's: a pass from an
    output marked with the block's marker (``with estimator_own_pass() as own: ...grad(own(t), ...)``) is the
    block's own in whichever thread it runs (a pass run in another thread here), and only while it is open."""
    from storch.extending import estimator_create_graph, estimator_own_pass, refuse_create_graph

    calls: list = []
    theta = torch.zeros(3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    with storch.Graph():
        torch.manual_seed(0)
        z = _ScoreForThreads(plate="z", n_samples=2)(Bernoulli(logits=theta))
        h = z * w
        h.register_hook(lambda g: calls.append(1) or -g)
        obj = raw_of(h).sum()
        exact = raw_of(z).sum(0)
        with estimator_own_pass() as own:
            marked = own(obj)
            assert torch.equal(marked, obj)
            (g,) = _in_thread(lambda: torch.autograd.grad(marked, w, retain_graph=True))
            assert calls == [] and torch.equal(g, exact)  # the hook not run: the block's own pass
            (g,) = _in_thread(lambda: torch.autograd.grad(obj, w, retain_graph=True))  # unmarked, other thread
            assert calls == [1] and torch.equal(g, -exact)
        (g,) = _in_thread(lambda: torch.autograd.grad(marked, w, retain_graph=True))  # the block is closed
        assert calls == [1, 1] and torch.equal(g, -exact)
        storch.reset()

    y = torch.relu(theta + 0.5) * 2
    refuse_create_graph(y, lambda: "a kink: refused")
    with estimator_create_graph() as own:
        marked = own((y ** 2).sum())
        (g,) = _in_thread(lambda: torch.autograd.grad(marked, theta, retain_graph=True, create_graph=True))
        assert g.requires_grad and torch.equal(g.detach(), torch.full((3,), 4.0))
    with pytest.raises(storch.OrderError, match="a kink: refused"):
        torch.autograd.grad(marked, theta, create_graph=True)


def test_grid_sample_at_a_sampled_location_is_a_kink_and_linear_in_the_image():
    """A glimpse at a reparameterised location (F.grid_sample with the sample in the grid) was accepted at order
    2 with a biased second derivative (z 35-360 against quadrature; found by porting a recurrent attention
    model): bilinear interpolation is piecewise linear in the location. Refused with the grid on the path
    (bilinear and nearest; bicubic from order 3); a sample in the image alone is fine (linear)."""
    import torch.nn.functional as F

    img = torch.randn(1, 1, 5, 5)
    loc = torch.tanh(torch.randn(2, requires_grad=True))  # the location sample
    grid = loc.reshape(1, 1, 1, 2)
    for mode, first_refused in (("bilinear", 2), ("nearest", 1), ("bicubic", 3)):
        cost = F.grid_sample(img, grid, mode=mode, align_corners=False).pow(2).sum()
        if first_refused > 1:
            assert _refused(cost, [loc], first_refused - 1) is None, mode
        assert "GridSampler2DBackward0" in _refused(cost, [loc], first_refused), mode
    pixels = torch.sigmoid(torch.randn(1, 1, 5, 5, requires_grad=True))  # a sample in the image
    fixed = torch.zeros(1, 1, 1, 2)
    cost = F.grid_sample(pixels, fixed, align_corners=False).pow(2).sum()
    assert _refused(cost, [pixels], 3) is None


def test_parameters_and_rebuild_give_the_distribution_back():
    """storch.extending.parameters: the form given (probs or logits), also once torch cached the other form
    in the instance (rebuilding from both raised torch's 'Either probs or logits'), a OneHotCategorical's and
    a Multinomial's from their inner Categorical; rebuild keeps a Multinomial's total_count; given_by_probs
    answers for a OneHotCategorical as for a Categorical (it said False; found by a third-party author)."""
    from torch.distributions import Bernoulli, Categorical, Multinomial, Normal, OneHotCategorical

    from storch.extending import given_by_probs, parameters, rebuild

    p = torch.tensor([0.2, 0.8, 0.0])
    cases = [(Categorical(probs=p), "probs"), (Categorical(logits=p), "logits"), (OneHotCategorical(probs=p), "probs"),
             (Multinomial(3, probs=p), "probs"), (Bernoulli(logits=torch.tensor(0.3)), "logits")]
    for d, given in cases:
        _ = d.probs, d.logits  # torch caches the other form
        ps = parameters(d)
        assert list(ps) == [given] and given_by_probs(d) == (given == "probs")
        new = rebuild(d, {k: v.clone() for k, v in ps.items()})
        assert type(new) is type(d) and torch.equal(new.probs, d.probs)
        if isinstance(d, Multinomial):
            assert new.total_count == 3
    normal = Normal(torch.zeros(2), 2.0)
    assert sorted(parameters(normal)) == ["loc", "scale"]
    assert torch.equal(rebuild(normal, parameters(normal)).scale, normal.scale)


def test_differentiated_total_count_reads_every_form_of_a_learned_count():
    """storch.extending.differentiated_total_count: a reason for a Binomial's or NegativeBinomial's total_count
    that requires grad (plain, under Independent, a plate tensor as the registry's listing passes it, a
    forward-mode tangent, a tensor batched by torch.func.vmap), None for a fixed count, a learned probs alone,
    and other distributions; the Binomial's says to detach (an integer count), the NegativeBinomial's names
    'score' too (a real r)."""
    import torch.autograd.forward_ad as fwAD
    from torch.distributions import Binomial, NegativeBinomial, Poisson

    from storch.extending import differentiated_total_count as why

    n = torch.tensor([3.0, 5.0], requires_grad=True)
    p = torch.tensor([0.3, 0.6], requires_grad=True)
    binomial, negbin = why(Binomial(n, probs=p)), why(NegativeBinomial(n, probs=p))
    assert binomial is not None and binomial.startswith("with a total_count that requires grad")
    assert "Detach total_count" in binomial and "'score'" not in binomial
    assert negbin is not None and "'score'" in negbin and "detach total_count" in negbin
    assert why(Independent(Binomial(n, probs=p), 1)) == binomial
    assert why(Binomial(n.detach(), probs=p)) is None and why(NegativeBinomial(n.detach(), logits=p)) is None
    assert why(Poisson(n)) is None and why(Categorical(logits=n)) is None
    with fwAD.dual_level():  # a forward-mode tangent: the count does not require grad, but is differentiated
        dual = fwAD.make_dual(n.detach(), torch.ones(2))
        assert why(Binomial(dual, probs=p.detach())) == binomial
    with storch.Graph():  # a plate tensor (the user's distribution, as the registry asks)
        z = storch.estimator("expect", plate="z")(Bernoulli(torch.tensor(0.5)))
        assert why(Binomial(n * (1 + z), probs=p)) == binomial
        assert why(Binomial((1 + z) * n.detach(), probs=p)) is None
    seen = []
    torch.func.vmap(lambda c: seen.append(why(Binomial(c, probs=p.detach()))) or c)(n.unsqueeze(0) * 1.0)
    assert seen == [binomial]  # vmap's batched tensor reports requires_grad False: the tensor it batches does not


class _Failing(storch.Estimator):
    """An estimator whose proposal fails with torch's error (as unordered_set's float16 overflow did)."""

    name = "test_failing_proposal"
    score_function = True

    def proposal(self, node):
        raise RuntimeError("value cannot be converted to type c10::Half without overflow")


def test_an_error_on_masked_logits_is_not_reported_as_diverged_parameters():
    """-inf logits are a mask: an estimator's own error on them was re-raised as NonFiniteParameterError
    ('the logits hold NaN or infinite values (the model's outputs diverged)'), hiding the real one.
    NaN (or +inf) logits still get that message."""
    from torch.distributions import Categorical

    masked = torch.tensor([0.0, -math.inf, 0.5])
    with pytest.raises(RuntimeError, match="c10::Half") as info:
        _Failing("z")(Categorical(logits=masked))
    assert not isinstance(info.value, storch.NonFiniteParameterError)
    for bad in (math.nan, math.inf):
        with pytest.raises(storch.NonFiniteParameterError, match="'logits' hold NaN or infinite"):
            _Failing("z")(Categorical(logits=torch.tensor([0.0, bad, 0.5]), validate_args=False))
    with pytest.raises(storch.NonFiniteParameterError, match="'probs' hold NaN"):
        _Failing("z")(Categorical(probs=torch.tensor([0.5, math.nan, 0.5]), validate_args=False))
    # a parameter that holds -inf and no NaN (a padded entry): named as padding, with the fix, not as a divergence
    with pytest.raises(storch.NonFiniteParameterError, match="'loc' hold -inf and no NaN.*very low finite value"):
        _Failing("z")(torch.distributions.Normal(torch.tensor([0.0, -math.inf]), 1.0, validate_args=False))


def test_skip_nonfinite_update_counts_and_warns_only_when_not_finite():
    from storch.extending import all_finite, skip_nonfinite_update

    class Owner:
        name, plate, skipped_updates = "mine", "z", 0

    owner = Owner()
    assert bool(all_finite([torch.ones(2), None])) and bool(all_finite([]))
    assert not skip_nonfinite_update(owner, all_finite([torch.ones(2)]), "the part", "fit", "Check x.")
    assert owner.skipped_updates == 0
    with pytest.warns(RuntimeWarning, match=r"mine \(plate 'z'\): the part's fit loss or gradients are not finite "
                      r"\(NaN or inf; 1 update\(s\) skipped so far\).*the part's parameters and optimizer state are "
                      "unchanged. Check x."):
        assert skip_nonfinite_update(owner, all_finite([torch.tensor([1.0, math.inf])]), "the part", "fit", "Check x.")
    assert owner.skipped_updates == 1


class _Owner:
    name, plate, skipped_updates = "mine", "z", 0


def test_skip_nonfinite_update_on_the_meta_device_reads_no_values():
    """Meta tensors hold no values: the check let every update run on shapes (it called .item(), which
    they refuse, and storch.backward() failed on meta for NVIL, RELAX, REBAR, LAX)."""
    from storch.extending import all_finite, skip_nonfinite_update

    owner = _Owner()
    finite = all_finite([torch.empty(2, device="meta")])
    assert not skip_nonfinite_update(owner, finite, "the part", "fit", "Check x.") and owner.skipped_updates == 0


def _half_adam_after_float32_training():
    # Adam trained in float32 on tiny gradients (a converged regression: second moment ~1e-12), then the
    # parameter moved to float16 as model.half() moves an estimator's learned part
    p = torch.nn.Parameter(torch.tensor([0.5, -0.25, 1.0]))
    opt = torch.optim.Adam([p], lr=1e-2)
    for _ in range(3):
        p.grad = torch.full((3,), 1e-6)
        opt.step()
    p.data = p.data.half()
    p.grad = torch.full((3,), 1e-6).half()
    return p, opt


def test_optimizer_step_keeps_the_state_of_a_float16_parameter_in_float32():
    from storch.extending import match_optimizer_state, optimizer_step

    p, opt = _half_adam_after_float32_training()
    old = p.detach().clone()
    assert optimizer_step(_Owner(), opt, "the part")
    assert p.dtype == torch.float16 and p.grad.dtype == torch.float16
    assert torch.isfinite(p).all() and not torch.equal(p, old)  # torch's Adam in float16 wrote inf here
    assert torch.allclose(p.float(), old.float() - 1e-2, atol=1e-3)  # a step of ~lr against the gradient
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert (state["exp_avg_sq"] > 0).all()
    match_optimizer_state(opt)  # leaves float32 state of a float16 parameter as it is
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float32


def test_optimizer_step_rolls_back_a_step_that_overflows_the_parameters_dtype():
    from storch.extending import optimizer_step

    big = torch.nn.Parameter(torch.tensor([65504.0, 1.0]).half())  # float16's largest value
    other = torch.nn.Parameter(torch.tensor([2.0, 3.0]))
    opt = torch.optim.Adam([big, other], lr=100.0)
    big.grad, other.grad = torch.tensor([-1.0, 1.0]).half(), torch.ones(2)
    owner = _Owner()
    with pytest.warns(RuntimeWarning, match=r"mine \(plate 'z'\): the part's parameters would not be finite in "
                      r"torch.float16 after this update \(the step overflows their dtype; 1 update\(s\) skipped so "
                      r"far\).*parameters and optimizer state are unchanged.*est.float\(\)"):
        assert not optimizer_step(owner, opt, "the part")
    assert owner.skipped_updates == 1 and not opt.state  # no state: none before the step
    assert big.tolist() == [65504.0, 1.0] and other.tolist() == [2.0, 3.0]
    assert big.dtype == torch.float16 and big.grad.dtype == torch.float16
    big.grad = torch.tensor([1.0, 1.0]).half()  # a step that fits is taken
    assert optimizer_step(owner, opt, "the part") and big[0] < 65504
    assert torch.allclose(other, torch.tensor([-98.0, -97.0])) and owner.skipped_updates == 1


def test_is_differentiated_sees_reverse_and_forward_mode():
    """requires_grad reads a forward-mode input (a torch.autograd.forward_ad dual, torch.func.jvp's input,
    which do not require grad) as a constant; is_differentiated does not."""
    import torch.autograd.forward_ad as fwAD

    from storch.extending import is_differentiated

    x = torch.tensor([1.0, 2.0])
    assert not is_differentiated(x) and is_differentiated(x.clone().requires_grad_(True))
    with fwAD.dual_level():
        d = fwAD.make_dual(x, torch.ones(2))
        assert is_differentiated(d) and is_differentiated(d * 2) and not is_differentiated(x)
    seen = []

    def f(t):
        seen.append((is_differentiated(t), is_differentiated(t.sin()), is_differentiated(x + 1)))
        return t.sin()

    torch.func.jvp(f, (x,), (torch.ones(2),))
    torch.func.grad(lambda t: f(t).sum())(x)
    torch.func.jvp(torch.func.vmap(f), (x,), (torch.ones(2),))  # batched over a tangent-carrying tensor
    torch.func.vmap(f)(x)
    assert seen == [(True, True, False)] * 3 + [(False, False, False)]


# -- a one-hot value with gradient of a category, read as indices by torch's (OneHot)Categorical.log_prob --

class _Concrete(storch.Estimator):
    """A minimal Gumbel-softmax: hands out a relaxed one-hot vector (shape (n, K)) of a OneHotCategorical."""
    name = "concrete_test"
    biased = True
    score_function = False
    distributions = (OneHotCategorical, Categorical)

    def proposal(self, node):
        logits = node.distribution.logits
        g = -torch.log(-torch.log(torch.rand((self.n_samples,) + logits.shape, dtype=logits.dtype)))
        return torch.softmax((logits + g) / 0.5, -1)

    def gradient_function(self, node):
        return torch.zeros((1,), dtype=node.sample.dtype)


@pytest.mark.parametrize("cls", [OneHotCategorical, Categorical])
def test_torch_log_prob_of_a_relaxed_category_is_refused_for_any_estimator(cls):
    """Found by porting: torch's OneHotCategorical.log_prob takes value.max(-1)[1] of the relaxed simplex point
    (the argmax's log-probability: a jump along the relaxed sample that the pathwise gradient misses) and
    Categorical.log_prob takes value.long() of the one-hot vector (K entries read as K indices), both made
    inside torch.distributions, whose jumps were all exempt. Now any estimator's one-hot value with gradient of a
    (OneHot)Categorical node is watched for such index reads, and the refusal gives the formula to write; the
    formula itself, torch's log_prob of data under parameters that carry the sample (validated: comparisons), and
    comparisons of the sample in user code (not a jump_free estimator) are not refused."""
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -0.5, 1.0], requires_grad=True)
    w = torch.tensor([1.0, -2.0, 0.5])
    with storch.Graph():
        z = _Concrete("z")(cls(logits=theta))
        storch.add_cost(cls(logits=theta, validate_args=False).log_prob(z).sum() + (z * w).sum() ** 2, name="c")
        with pytest.raises(storch.OrderError, match=rf"'concrete_test' on plate 'z'.*torch's {cls.__name__}\.log_prob "
                                                    r"applied (max|long).*\(z \* logits\.log_softmax\(-1\)\)\.sum\(-1\)"):
            storch.surrogate_loss()
    with storch.Graph():
        z = _Concrete("z")(cls(logits=theta))
        lik = Categorical(logits=z * w).log_prob(torch.tensor(2)) + (z.max(-1).values > 0.5).float()
        storch.add_cost((z * theta.log_softmax(-1)).sum(-1) - lik + (z * w).sum() ** 2, name="c")
        g, = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype, expected", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64),
                                             (torch.int64, torch.int64)])
def test_learned_dtype_is_at_least_full_precision_for_a_float_input(dtype, expected):
    """storch.extending.learned_dtype: reduced-precision floats (autocast's) give the default dtype; full-precision
    and integer dtypes are kept (it now reads the dtype's itemsize instead of calling torch.finfo per step)."""
    from storch.extending import learned_dtype

    assert learned_dtype(torch.zeros(2, dtype=dtype)) is expected
