"""score with a learned, input-dependent baseline (NVIL) and with a self-critical (greedy) baseline.

- z-tests with the conformance kit, the learned baseline trained first (``warmup``), in one batched
  graph and with replicates as separate graphs (``check_leakage``);
- the greedy entry: user code sees n + 1 entries, the last (weight 0) is the most probable value,
  also at every step of a partition (greedy decoding);
- NVIL's regression learns an input-dependent cost, and its gradient variance is below the moving
  average's when the cost depends on the data point.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch
import storch.testing as kit
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from storch_score import LearnedBaseline

F64 = torch.float64


@pytest.mark.parametrize("baseline,warmup", [("learned", 60), ("greedy", 0)])
def test_kit_with_warmup(baseline, warmup):
    opts = {"n_samples": 2, "baseline": baseline}
    report = kit.check_against_enumeration("score", options=opts, orders=(0, 1, 2), warmup=warmup,
                                           n_replicates=3000)
    print("\n" + report.table(details=False))
    # eleven models (independent[Bernoulli], categorical[2x3], onehot[2x2], global_latent[Bernoulli] and
    # elbo[Bernoulli] included), three orders; laplace[loc] at orders 0 and 1 (order 2 is refused: a kink of log p);
    # uniform[high] refused when sampling (a moving support)
    assert len(report.checks) == 35 and report.ok
    assert {"global_latent[Bernoulli], order 2", "elbo[Bernoulli], order 2"} <= {c.name for c in report.checks}
    assert "laplace[loc], order 2" in report.skipped and "uniform[high]" in report.skipped


@pytest.mark.parametrize("baseline", ["learned", "greedy"])
def test_kit_with_separate_graphs(baseline):
    models = [m for m in kit.standard_models(storch.estimator("score", plate="p"))[0]
              if m.name in ("bernoulli[3]", "onehot[K=5]")]
    report = kit.check_leakage("score", options={"n_samples": 2, "baseline": baseline}, models=models,
                               n_graphs=300, warmup=60 if baseline == "learned" else 0)
    print("\n" + report.table(details=False))
    assert report.ok


def test_greedy_entry_is_the_mode_with_weight_zero():
    logits = torch.tensor([[0.1, 2.0, -1.0], [1.5, 0.0, 0.2]])
    with storch.Graph() as graph:
        z = storch.estimator("score", plate="z", n_samples=3, baseline="greedy")(Categorical(logits=logits))
        node = graph.nodes[0]
        assert z.plates[0].size == 4  # user code sees n + 1 entries
        assert torch.equal(z.tensor[3], torch.tensor([1, 0]))  # the greedy value argmax p
        assert torch.equal(node.weight_values.reshape(-1), torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
        assert float(node.gradient_values.reshape(4, -1)[3].abs().sum()) == 0.0
    with storch.Graph():
        b = storch.estimator("score", plate="b", baseline="greedy")(Bernoulli(logits=torch.tensor([0.0, 0.3, -2.0])))
        assert torch.equal(b.tensor[1], torch.tensor([0.0, 1.0, 0.0]))  # p = 1/2 gives 0, not NaN


def test_greedy_in_a_partition_decodes_greedily_and_is_unbiased():
    """x_t ~ Bern(σ(θ_t + 1.5 x_{t-1} - 0.5)), three steps of ONE estimator (a partition)."""
    torch.manual_seed(70)
    theta = torch.tensor([0.3, -0.4, 0.2], dtype=F64)
    est = storch.estimator("score", plate="seq", n_samples=3, baseline="greedy")

    def cost(xs):
        return (sum(xs) - 1.2) ** 2

    with storch.Graph() as graph:
        leaf, th = replicate(theta, 4000)
        xs, prev = [], 0.0
        for t in range(3):
            xs.append(est(Bernoulli(logits=th[t] + 1.5 * prev - 0.5)))
            prev = xs[-1]
        storch.add_cost(cost(xs))
        g, = per_replicate_derivatives(storch.surrogate_loss(1), leaf, 1)
        greedy = torch.stack([graph.nodes[0].sample[3]] + [s.select(
            [p.name for p in x.plates].index("seq"), 3) for s, x in zip(graph.nodes[0].steps, xs[1:])])
    # the greedy entry follows argmax at every step: logits θ_t + 1.5 x_{t-1} - 0.5 > 0
    want, prev = [], 0.0
    for t in range(3):
        prev = float(theta[t] + 1.5 * prev - 0.5 > 0)
        want.append(prev)
    assert torch.equal(greedy.reshape(3, -1)[:, 0], torch.tensor(want, dtype=greedy.dtype))

    def exact(th):
        total = th.new_zeros(())
        for v in itertools.product((0.0, 1.0), repeat=3):
            lp, prev = th.new_zeros(()), 0.0
            for t in range(3):
                lp = lp + Bernoulli(logits=th[t] + 1.5 * prev - 0.5).log_prob(th.new_tensor(v[t]))
                prev = v[t]
            total = total + lp.exp() * cost(list(v))
        return total

    assert_unbiased(g, torch.func.grad(exact)(theta), "greedy partition grad")


def _data_problem(est, steps: int):
    """8 data points with offsets c_d: C = (x - 0.4)² + 5 c_d; NVIL gets c_d as inputs."""
    offsets = torch.linspace(-1.0, 1.0, 8, dtype=F64).unsqueeze(-1)
    theta = torch.tensor([0.3], dtype=F64)

    def build(th):
        c = storch.denote_independent(offsets, 0, "data")
        x = est(Bernoulli(logits=th + 0.0 * c), inputs=c)
        storch.add_cost(((x - 0.4) ** 2).sum() + 5.0 * c.sum())

    for _ in range(steps):  # training steps
        with storch.Graph():
            _, th = replicate(theta, 16)
            build(th)
            storch.backward()
    with storch.Graph():
        leaf, th = replicate(theta, 4000)
        build(th)
        g, = per_replicate_derivatives(storch.surrogate_loss(1), leaf, 1)
    p = torch.sigmoid(theta)
    exact = p * (1 - p) * ((0.6 ** 2) - (0.4 ** 2))  # d/dθ E[(x - 0.4)²]
    assert_unbiased(g, exact, f"{est.baseline_kind} on the data problem")
    return float(g.var(0).sum())


def test_nvil_beats_the_moving_average_when_the_cost_depends_on_the_input():
    torch.manual_seed(71)
    nvil = storch.estimator("score", plate="x", baseline="learned", lr=0.05)
    ma = storch.estimator("score", plate="x", baseline="moving_average")
    v_nvil, v_ma = _data_problem(nvil, 200), _data_problem(ma, 200)
    print(f"\ngradient variance: NVIL {v_nvil:.4g}, moving average {v_ma:.4g} (ratio {v_nvil / v_ma:.3f})")
    assert isinstance(nvil.baseline_fn, LearnedBaseline) and nvil.update_steps == 200
    assert v_nvil < 0.5 * v_ma


def test_learned_baseline_is_a_submodule_trained_only_by_backward():
    est = storch.estimator("score", plate="z", n_samples=2, baseline="learned")
    theta = torch.tensor([0.2, -0.3, 0.1], dtype=F64, requires_grad=True)
    with storch.Graph():
        z = est(OneHotCategorical(logits=theta))
        storch.add_cost((z * torch.tensor([1.0, 2.0, 3.0], dtype=F64)).sum(), name="c")
        storch.surrogate_loss()
    params = {k: v.detach().clone() for k, v in est.named_parameters()}
    assert set(params) == {"baseline_fn.heads.cost_c.0.weight", "baseline_fn.heads.cost_c.0.bias",
                           "baseline_fn.heads.cost_c.2.weight", "baseline_fn.heads.cost_c.2.bias"}
    assert est.update_steps == 0  # the evaluation pass trained nothing
    with storch.Graph():
        z = est(OneHotCategorical(logits=theta))
        storch.add_cost((z * torch.tensor([1.0, 2.0, 3.0], dtype=F64)).sum(), name="c")
        storch.backward()
    assert est.update_steps == 1
    assert any(not torch.equal(params[k], v) for k, v in est.named_parameters())



@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_learned_baseline_first_used_under_torch_func_says_to_build_it_first(transform):
    """NVIL (baseline='learned') first used under torch.func.vmap failed with functorch's "Cannot ask for
    different inplace randomness on an unbatched tensor" (its head's initialisation), under torch.func.grad
    with torch's "mutating directly with `.data`"; RELAX said what to do (found by porting a training loop).
    Now NVIL says it too (the same storch.extending.refuse_lazy_build). After one eager step the transform
    runs: a vmapped ensemble's gradient by torch.autograd.grad; its .backward() would update the baseline
    and is refused (its state would mix the members), leaving the baseline as it was."""
    from torch.func import grad, vmap

    x = torch.tensor([[1.0, -0.5], [0.3, 0.7], [-1.0, 0.2]], dtype=F64)
    thetas = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    est = storch.estimator("score", plate="z", n_samples=2, baseline="learned", hidden=4)

    def step(theta):
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(x, 0, "data") * theta))
            storch.add_cost(((z - 0.45) ** 2).sum(), name="c")
            return storch.surrogate_loss()

    run, args = (vmap(step, randomness="different"), thetas) if transform == "vmap" else (grad(step), thetas[0])
    with pytest.raises(storch.StorchError, match=r"score's learned baseline's network for cost 'c' is built on "
                                                 r"first use.*outside the transform first"):
        run(args)
    step(thetas[0].clone().requires_grad_(True)).backward()  # one eager step builds (and trains) the head
    assert est.update_steps == 1
    if transform == "grad":
        assert run(args).shape == args.shape and est.update_steps == 1
        return
    params = thetas.clone().requires_grad_(True)
    g, = torch.autograd.grad(run(params).sum(), params)
    assert torch.isfinite(g).all()
    before = {k: v.clone() for k, v in est.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(storch.StorchError, match=r"inside torch\.func\.vmap.*'score' \(plate 'z'\)"):
        run(params).sum().backward()
    assert est.update_steps == 1 and params.grad is None
    assert all(torch.equal(v, est.state_dict()[k]) for k, v in before.items())

def test_option_errors():
    with pytest.raises(storch.OptionError, match="'learned', 'greedy'"):
        storch.estimator("score", plate="z", baseline="nvil")
    with pytest.raises(storch.OptionError, match="lr must be"):
        storch.estimator("score", plate="z", baseline="learned", lr=0)
    with pytest.raises(storch.OptionError, match="greedy.*mode.*not unique"):
        with storch.Graph():  # a uniform distribution has no unique most probable value
            storch.estimator("score", plate="z", baseline="greedy")(
                torch.distributions.Uniform(torch.zeros(2), torch.ones(2)))


class _ModedContinuousBernoulli(torch.distributions.ContinuousBernoulli):
    """What the greedy baseline's message advises: a subclass that defines ``mode`` (the density is monotone
    in x, so the most probable value is 1 where probs > 1/2 and 0 below; probs = 1/2 is uniform, taken as 0)."""

    @property
    def mode(self):
        return (self.probs > 0.5).to(self.probs.dtype)


def _tanh_normal():
    return torch.distributions.TransformedDistribution(torch.distributions.Normal(torch.zeros(2), torch.ones(2)),
                                                       [torch.distributions.transforms.TanhTransform()])


@pytest.mark.parametrize("make,name,base,why", [
    # torch 2.13 distributions without mode (NotImplementedError): ContinuousBernoulli, LKJCholesky, LogisticNormal,
    # MixtureSameFamily, Multinomial, RelaxedBernoulli, RelaxedOneHotCategorical, TransformedDistribution
    (lambda: torch.distributions.ContinuousBernoulli(probs=torch.tensor([0.3, 0.8])), "ContinuousBernoulli",
     "ContinuousBernoulli", "is not implemented"),
    (lambda: torch.distributions.Independent(_tanh_normal(), 1), r"Independent\(TransformedDistribution\)",
     "TransformedDistribution", "is not implemented"),
    (lambda: torch.distributions.Multinomial(4, probs=torch.tensor([0.2, 0.3, 0.5])), "Multinomial", "Multinomial",
     "is not implemented"),
    # a NaN mode: no unique most probable value (Uniform), or one torch does not compute (Kumaraswamy in torch 2.13)
    (lambda: torch.distributions.Independent(torch.distributions.Uniform(torch.zeros(2), torch.ones(2)), 1),
     r"Independent\(Uniform\)", "Uniform", "is NaN"),
    (lambda: torch.distributions.Kumaraswamy(torch.tensor([2.0]), torch.tensor([3.0])), "Kumaraswamy", "Kumaraswamy",
     "is NaN"),
], ids=["continuous_bernoulli", "independent_transformed", "multinomial", "independent_uniform", "kumaraswamy"])
def test_greedy_without_a_mode_names_the_distribution_and_what_to_do(make, name, base, why):
    with pytest.raises(storch.OptionError) as raised:
        with storch.Graph():
            storch.estimator("score", plate="z", n_samples=2, baseline="greedy")(make())
    message = str(raised.value)
    assert raised.match(rf"score \(plate 'z'\): baseline='greedy' needs .* {name}\.mode {why}")
    assert "another baseline ('leave_one_out' with n_samples >= 2, 'moving_average', 'learned'" in message
    assert f"a subclass of {base} whose `mode` property returns its most probable value" in message


def test_greedy_with_a_subclass_that_defines_mode():
    # the message's advice works: the same family with a mode runs, its greedy entry is that mode
    probs = torch.tensor([0.3, 0.8])
    with storch.Graph():
        c = storch.estimator("score", plate="c", n_samples=2, baseline="greedy")(_ModedContinuousBernoulli(probs=probs))
        assert torch.equal(c.tensor[2], torch.tensor([0.0, 1.0]))


def _squashed(a, b):
    return torch.distributions.TransformedDistribution(torch.distributions.Normal(a, b),
                                                       [torch.distributions.transforms.TanhTransform(cache_size=1)])


# distributions whose parameters are properties (over a base distribution): h is all of them; a Normal
# keeps its h = loc (the heads' width, so saved state_dicts, unchanged)
DEFAULT_H = {
    "Beta": (lambda a, b: torch.distributions.Beta(a, b), 2),
    "LogNormal": (lambda a, b: torch.distributions.LogNormal(a, b), 2),
    "tanh Normal": (_squashed, 2),
    "Normal": (lambda a, b: torch.distributions.Normal(a, b), 1),
}


@pytest.mark.parametrize("name", list(DEFAULT_H))
def test_learned_baseline_without_inputs_conditions_on_the_parameters(name):
    """docs/estimators/score.md: "Without inputs, h is the distribution's parameters". Beta, LogNormal and a
    tanh-squashed Normal were refused ("cannot find a parameter tensor"); on a data plate h is per data
    point, and the gradient with the trained baseline is unbiased (z-test against the closed form of a
    Beta's E[(z - 0.3)^2])."""
    make, width = DEFAULT_H[name]
    torch.manual_seed(72)
    est = storch.estimator("score", plate="x", n_samples=4, baseline="learned", lr=0.05)
    a = torch.tensor([1.5, 2.0, 3.0], dtype=F64, requires_grad=True)
    b = torch.tensor([2.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    for _ in range(20):
        with storch.Graph():
            pa, pb = storch.denote_independent((a, b), 0, "data")
            z = est(make(pa, pb))
            storch.add_cost((z - 0.3) ** 2, name="f")
            storch.backward()
    assert est.baseline_fn.heads["cost_f"][0].in_features == width
    if name != "Beta":
        return
    theta = torch.tensor([0.4, 0.1], dtype=F64)
    with storch.Graph():
        leaf, th = replicate(theta, 2000)
        z = est(torch.distributions.Beta(th[0].exp(), th[1].exp()))
        storch.add_cost((z - 0.3) ** 2, name="f")
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)

    def exact(t):
        al, be = t.exp()
        mean = al / (al + be)
        return al * be / ((al + be) ** 2 * (al + be + 1)) + (mean - 0.3) ** 2

    assert_unbiased(g, torch.autograd.functional.jacobian(exact, theta.clone()), "Beta gradient, learned baseline")
