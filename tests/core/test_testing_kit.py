"""The conformance kit (storch.testing) catches real estimator bugs and passes correct estimators.

Each deliberately wrong estimator below is paired with its correct twin (the same code with the
bug fixed), so a failure of the buggy one is due to the bug, not to the kit or the model.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, Normal, OneHotCategorical

import storch
import storch.testing as kit
from storch.extending import base_distribution

F64 = torch.float64


# -- estimators written for these tests ----------------------------------------------------------


class LeaveOneOut(storch.Estimator):
    """Score function with the leave-one-out baseline (correct)."""

    name = "test_leave_one_out"

    def baseline(self, node, cost):
        # mean cost of the OTHER samples: independent of this sample (appendix C)
        return (cost.sum_plate(cost.tensor) - cost.tensor) / (node.n - 1)


class LeakyBaseline(storch.Estimator):
    """BUG: a 'batch average' baseline that includes the sample's own cost."""

    name = "test_leaky_baseline"

    def baseline(self, node, cost):
        return cost.sum_plate(cost.tensor) / node.n


def _flat(d):
    """A proposal that ignores θ: uniform over the support of a Bernoulli / (OneHot)Categorical."""
    if isinstance(d, Independent):  # the kit's independent[...] model: the same wrapper around q
        return Independent(_flat(d.base_dist), d.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(d, Bernoulli):
        return Bernoulli(probs=torch.full_like(d.probs, 0.5), validate_args=False)
    return type(d)(logits=torch.zeros_like(d.logits), validate_args=False)


class Importance(storch.Estimator):
    """Importance sampling from a uniform proposal, w = p/q / N (detached), l = log p (correct)."""

    name = "test_importance"
    distributions = (Bernoulli, Categorical, OneHotCategorical)
    detach_weights = True

    def proposal(self, node):
        return _flat(node.distribution).sample((self.n_samples,))

    def weighting_function(self, node):
        x = node.sample
        w = (node.log_prob(x) - node.log_prob(x, _flat(node.distribution))).exp() / node.n
        return w.detach() if self.detach_weights else w  # detach: the weight carries no gradient


class AttachedImportance(Importance):
    """BUG: the importance weight p/q is left attached to the graph."""

    name = "test_attached_importance"
    detach_weights = False


@dataclass
class PriorityState:
    """Per-node record of PrioritySampling: κ, filled by ``proposal``, read by ``weighting_function``."""

    kappa: Optional[torch.Tensor] = None


class PrioritySampling(storch.Estimator):
    """k samples without replacement (Gumbel-top-k) weighted by p(x) / q_κ(x) (correct).

    q_κ(x) = P(log p(x) + G > κ) = 1 - exp(-exp(log p(x) - κ)), with κ the (k+1)-th largest
    perturbed log-probability: the inclusion probability of x given the other keys, so
    Σ_{x∈S} p(x)/q_κ(x) f(x) is unbiased for E_p[f] (Duffield et al. 2007; Kool et al. 2019).
    """

    name = "test_priority_sampling"
    distributions = (Categorical,)
    kappa_rank = 1  # κ = the key just below the sample; 0 would be the smallest key IN the sample
    State = PriorityState

    def check_distribution(self, d):
        # Gumbel-top-k over the last dim draws from one Categorical; an Independent(Categorical) node
        # is a joint of several, which this sampler does not handle: refuse it, as the guide says
        if isinstance(d, Independent):
            raise storch.UnsupportedDistributionError(f"{self.name} samples one Categorical, not an Independent")
        super().check_distribution(d)

    def proposal(self, node):
        if node.distribution.logits.dim() > len(node.parents) + 1:
            # own batch dims: a joint of several Categoricals, which Gumbel-top-k over the last dim does not
            # sample without replacement; refused when sampling (the kit skips categorical[2x3])
            raise storch.UnsupportedDistributionError(f"{self.name} samples one Categorical per node")
        logp = node.distribution.logits  # normalised log-probabilities (*parents, K)
        keys = logp - torch.log(-torch.log(torch.rand_like(logp)))  # Gumbel-perturbed
        top = keys.topk(self.n_samples + 1, dim=-1)
        node.state.kappa = top.values[..., self.n_samples - 1 + self.kappa_rank]
        return top.indices[..., : self.n_samples].movedim(-1, 0)

    def weighting_function(self, node):
        logp = node.log_prob(node.sample)
        log_q = torch.log(-torch.expm1(-torch.exp(logp - node.state.kappa)))
        return (logp - log_q).exp().detach()  # detach: the weight carries no gradient (condition 3)


class OffByOnePrioritySampling(PrioritySampling):
    """BUG: κ is the smallest key inside the sample instead of the (k+1)-th largest key."""

    name = "test_off_by_one_priority"
    kappa_rank = 0


def _check(est, **kw) -> kit.ConformanceReport:
    start = time.perf_counter()
    report = kit.check_against_enumeration(est, raise_on_failure=False, **kw)
    print(f"\n{report.table(details=False)}\n(wall {time.perf_counter() - start:.2f}s)")
    return report


def _failed(report) -> set[str]:
    return {c.name for c in report.failures}


# -- correct estimators pass ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["expect", "reparameterization"])
def test_core_builtins_pass(name):
    report = kit.check_against_enumeration(name)
    print("\n" + report.table())
    assert report.ok and report.orders == (0, 1, 2, 3)
    assert len(report.checks) >= 8


@pytest.mark.parametrize("cls", [LeaveOneOut, Importance, PrioritySampling])
def test_correct_twins_pass(cls):
    report = _check(cls, options={"n_samples": 2})
    assert report.ok, report.table()


# -- deliberately wrong estimators are reported --------------------------------------------------


def test_baseline_that_sees_its_own_sample_is_reported():
    report = _check(LeakyBaseline, options={"n_samples": 2})
    assert not report.ok
    failed = _failed(report)
    assert not any(name.endswith("order 0") for name in failed)  # the forward value is fine
    assert {"bernoulli[3], order 1", "categorical[K=5], order 1", "chain[Bernoulli], order 1"} <= failed
    with pytest.raises(AssertionError, match=r"(?s)test_leaky_baseline does not match.*FAIL"):
        kit.check_against_enumeration(LeakyBaseline, options={"n_samples": 2})


def test_attached_importance_weight_is_reported():
    report = _check(AttachedImportance, options={"n_samples": 2})
    failed = _failed(report)
    assert not any(name.endswith("order 0") for name in failed)
    assert {"bernoulli[3], order 1", "categorical[K=5], order 1", "onehot[K=5], order 1"} <= failed


def test_off_by_one_without_replacement_weight_is_reported():
    report = _check(OffByOnePrioritySampling, options={"n_samples": 2})
    failed = _failed(report)
    assert {"categorical[K=5], order 0", "chain[Categorical], order 0"} <= failed


class BernoulliScore(storch.Estimator):
    """Score function whose proposal reads the Bernoulli's probabilities (correct)."""

    name = "test_bernoulli_score"
    distributions = (Bernoulli,)

    def proposal(self, node):
        # supports() matches Bernoulli against base_distribution(d): the wrapper of an Independent
        # holds no parameters, the distribution under it does
        p = base_distribution(node.distribution).probs
        return torch.bernoulli(p.expand((self.n_samples,) + p.shape))


class WrapperBlindScore(BernoulliScore):
    """BUG: reads ``node.distribution.probs``, which an ``Independent(Bernoulli)`` node does not have."""

    name = "test_wrapper_blind_score"

    def proposal(self, node):
        p = node.distribution.probs
        return torch.bernoulli(p.expand((self.n_samples,) + p.shape))


def test_an_estimator_blind_to_independent_wrappers_is_reported():
    """The kit's standard models had no Independent-wrapped node, so an estimator that accepts
    Independent(Bernoulli) by its `distributions` but reads the wrapper's parameters (as the example
    gumbel_rao did) passed the kit and crashed on users' models. The models now include one."""
    models, _ = kit.standard_models(BernoulliScore("z"))
    assert "independent[Bernoulli]" in [m.name for m in models]
    report = _check(BernoulliScore, options={"n_samples": 2})
    assert report.ok and {f"independent[Bernoulli], order {m}" for m in range(4)} <= {c.name for c in report.checks}
    with pytest.raises(AttributeError, match="'Independent' object has no attribute 'probs'"):
        kit.check_against_enumeration(WrapperBlindScore, options={"n_samples": 2})
    # an estimator that refuses the wrapper (check_distribution) gets no such model
    models, skipped = kit.standard_models(PrioritySampling("z"))
    assert not any(m.name.startswith("independent[") for m in models) and "independent[Bernoulli]" in skipped


class ElementwiseScore(storch.Estimator):
    """Score function whose proposal draws each element of a (OneHot)Categorical node from the node's
    logits laid out as (*parents, D elements, K) (correct)."""

    name = "test_elementwise_score"
    distributions = (Bernoulli, Categorical, OneHotCategorical)

    def element_logits(self, logits, n_parents):
        return logits

    def proposal(self, node):
        d = base_distribution(node.distribution)
        if isinstance(d, Bernoulli):
            return node.distribution.sample((self.n_samples,))
        npar = len(node.parents)  # the logits' leading dims are the parent plates, then the node's own
        flat = d.logits.reshape(d.logits.shape[:npar] + (-1, d.logits.shape[-1]))  # (*parents, D, K)
        logits = self.element_logits(flat, npar).reshape(d.logits.shape)
        return type(d)(logits=logits).sample((self.n_samples,)).reshape((self.n_samples,) + node.distribution.batch_shape
                                                                         + node.distribution.event_shape)


class FirstElementScore(ElementwiseScore):
    """BUG: every element drawn with the first element's probabilities (right for one element, D = 1)."""

    name = "test_first_element_score"

    def element_logits(self, logits, n_parents):
        return logits[..., :1, :].expand(logits.shape)


def test_an_estimator_that_gives_every_element_the_first_ones_probabilities_is_reported():
    """Found by a third-party author: the standard models had no (OneHot)Categorical node with more than one
    element (the Independent one is chosen only for an estimator without Bernoulli), so an estimator that gave
    every element the first element's probabilities passed them all (max |z| 2.9). The kit now has
    categorical[2x3] and onehot[2x2] (K = D: a mix-up of the element and category dims keeps the shapes)."""
    new = {"categorical[2x3]", "onehot[2x2]"}
    models, _ = kit.standard_models(FirstElementScore("z"))
    assert new <= {m.name for m in models}
    assert new <= {m.name for m in kit.standard_models(storch.estimator("expect", plate="z"))[0]}
    old, added = [m for m in models if m.name not in new], [m for m in models if m.name in new]
    assert _check(FirstElementScore, options={"n_samples": 2}, models=old, orders=(0, 1)).ok  # blind to it
    report = _check(FirstElementScore, options={"n_samples": 2}, models=added, orders=(0, 1))
    assert {"categorical[2x3], order 0", "onehot[2x2], order 0"} <= _failed(report)
    assert min(c.max_abs_z for c in report.failures) > 8
    assert _check(ElementwiseScore, options={"n_samples": 2}, models=added, orders=(0, 1)).ok  # the correct twin


class DataLeaveOneOut(storch.Estimator):
    """Score function whose baseline for data point i is the mean cost of the other data points of the plate
    ``data``, for a node under that plate (correct: the other points' samples are independent of its own)."""

    name = "test_data_leave_one_out"

    def baseline(self, node, cost):
        names = [p.name for p in cost.plates]
        if "data" not in names or "data" not in {p.name for p in node.plates}:
            return None
        k = names.index("data")
        f = cost.tensor
        return (f.sum(k, keepdim=True) - f) / (f.shape[k] - 1)


class DataLeaveOneOutForAll(DataLeaveOneOut):
    """BUG: the data-point baseline also for a node NOT under the plate ``data`` (a global latent), whose
    sample the other data points' costs depend on."""

    name = "test_data_leave_one_out_for_all"

    def baseline(self, node, cost):
        names = [p.name for p in cost.plates]
        if "data" not in names:
            return None
        k = names.index("data")
        f = cost.tensor
        return (f.sum(k, keepdim=True) - f) / (f.shape[k] - 1)


def test_a_data_plate_baseline_for_a_node_outside_the_data_plate_is_reported():
    """Found by a third-party author: no standard model had a node outside a data plate of its costs (every node
    was under every plate of its costs), so a leave-one-data-point-out baseline that forgot to check that the node
    is under the data plate (biased for a global latent: z = -21.96 on the author's model) passed
    check_against_enumeration and check_leakage. The kit now has global_latent[D]: a global z over the costs' data
    plate, with a local y_i per data point (under it, where the baseline is right). Old models: the bug passes."""
    models, _ = kit.standard_models(DataLeaveOneOutForAll("z"))
    added = [m for m in models if m.name == "global_latent[Bernoulli]"]
    assert len(added) == 1
    old = [m for m in models if m.name in ("bernoulli[3]", "chain[Bernoulli]")]
    assert _check(DataLeaveOneOutForAll, options={"n_samples": 2}, models=old, orders=(0, 1)).ok  # blind to it
    report = _check(DataLeaveOneOutForAll, options={"n_samples": 2}, models=added, orders=(0, 1, 2))
    assert _failed(report) == {"global_latent[Bernoulli], order 1", "global_latent[Bernoulli], order 2"}
    assert min(c.max_abs_z for c in report.failures) > 8
    assert "NOT under the data plate" in report.table()  # the model's hint
    leak = kit.check_leakage(DataLeaveOneOutForAll, options={"n_samples": 2}, models=added, n_graphs=300,
                             raise_on_failure=False)
    assert _failed(leak) == {"global_latent[Bernoulli], order 1"}
    # the correct twin passes both, at every order
    assert _check(DataLeaveOneOut, options={"n_samples": 2}, models=added).ok
    assert kit.check_leakage(DataLeaveOneOut, options={"n_samples": 2}, models=added, n_graphs=300).ok


def test_the_global_latent_models_exact_values():
    """global_latent[D]'s exact expectation against a direct enumeration (Bernoulli) and a Monte Carlo z-test
    (Normal: 200000 draws), so that the model's exact value is not checked only against the estimators."""
    models = {m.name: m for m in kit.standard_models(storch.estimator("expect", plate="z"))[0]}
    models.update({m.name: m for m in kit.standard_models(storch.estimator("reparameterization", plate="z"))[0]})
    x, a = torch.tensor([0.4, 1.0, -0.3], dtype=F64), torch.tensor([0.25, -0.65, 0.05], dtype=F64)
    th = torch.tensor([0.4, -0.3], dtype=F64)
    p1 = torch.sigmoid(th[0])
    want = 0.0
    for z in (0.0, 1.0):
        pz = p1 if z else 1 - p1
        for i in range(3):
            q = torch.sigmoid(th[1] + 0.8 * z + a[i])
            for y in (0.0, 1.0):
                want = want + pz * (q if y else 1 - q) * ((y - x[i] + z) ** 2 + th[0] * x[i]) / 3
    assert torch.allclose(models["global_latent[Bernoulli]"].exact(th), want)
    torch.manual_seed(0)
    z = th[0] + torch.randn(200000, 1, dtype=F64)
    y = th[1] + 0.8 * z + a + 0.5 * torch.randn(200000, 3, dtype=F64)
    draws = ((y - x + z) ** 2 + th[0] * x).mean(-1)
    exact = models["global_latent[Normal]"].exact(th)
    assert abs(draws.mean() - exact) < 4 * draws.std() / 200000 ** 0.5


def test_failure_message_is_a_readable_table():
    with pytest.raises(AssertionError) as info:
        kit.check_against_enumeration(OffByOnePrioritySampling, options={"n_samples": 2})
    text = str(info.value)
    print("\n" + text)
    assert "model, order" in text and "max |z|" in text
    assert "categorical[K=5], order 0" in text and "<-- FAIL" in text and "exact" in text


# -- Theorem 1's local conditions ----------------------------------------------------------------

THETA2 = torch.tensor([0.3, -0.7], dtype=F64)


def _bern(th):
    return Bernoulli(logits=th)


def _toy(x):
    return ((x - 0.2) ** 2 * torch.tensor([1.0, 2.0], dtype=F64)).sum()


def test_conditions_hold_for_core_builtins():
    r1 = kit.check_conditions("expect", _bern, THETA2, _toy)
    r2 = kit.check_conditions("reparameterization", lambda th: Normal(th, 0.8), THETA2,
                              lambda x: (x ** 2).sum() + torch.sin(x[0]))
    r3 = kit.check_conditions(LeaveOneOut, lambda th: Categorical(logits=th), torch.tensor(
        [0.2, -0.4, 0.9, 0.0, -1.1], dtype=F64), lambda x: (x - 1.3) ** 2, options={"n_samples": 3})
    for r in (r1, r2, r3):
        print("\n" + r.table())
        assert r.ok and len(r.checks) == 11  # conditions 1, 2: orders 0-3; condition 3: orders 1-3


def test_conditions_pinpoint_each_bug():
    opts = {"n_samples": 2}
    leaky = kit.check_conditions(LeakyBaseline, _bern, THETA2, _toy, options=opts, raise_on_failure=False)
    attached = kit.check_conditions(AttachedImportance, _bern, THETA2, _toy, options=opts, raise_on_failure=False)
    off = kit.check_conditions(OffByOnePrioritySampling, lambda th: Categorical(logits=th), torch.tensor(
        [0.2, -0.4, 0.9, 0.0, -1.1], dtype=F64), lambda x: (x - 1.3) ** 2, options=opts, raise_on_failure=False)
    for r in (leaky, attached, off):
        print("\n" + r.table(details=False))
    # the baseline sees its own sample: condition 2 (E[∇ w a] = 0) breaks, 1 and 3 hold
    assert leaky.condition_ok(1) and leaky.condition_ok(3) and not leaky.condition_ok(2)
    assert "condition 2, order 1" in {c.name for c in leaky.failures}
    # the attached weight double-counts the score: condition 1 breaks from order 1 on; Σ_x p(x) = 1
    # keeps condition 3 true, which is why condition 1 must be checked at every order
    assert not attached.condition_ok(1) and attached.condition_ok(3)
    assert {c.name for c in attached.failures} >= {"condition 1, order 1"}
    assert "condition 1, order 0" not in {c.name for c in attached.failures}
    # the off-by-one weight is already wrong for the forward value
    assert "condition 1, order 0" in {c.name for c in off.failures}


# -- the API -------------------------------------------------------------------------------------


def test_instance_class_factory_and_name_are_equivalent():
    est = storch.estimator("expect", plate="anything", budget=64)
    reports = [kit.check_against_enumeration(e) for e in (
        "expect", est, type(est), lambda plate: storch.estimator("expect", plate=plate))]
    assert all(r.ok and r.estimator == "expect" for r in reports)
    assert len({len(r.checks) for r in reports}) == 1


def test_orders_models_and_errors():
    report = kit.check_against_enumeration("reparameterization", orders=[1])
    assert report.orders == (1,) and all(c.name.endswith("order 1") for c in report.checks)
    # a sorted tuple without repeats, whatever sequence was passed (docs/storch-testing.md, ConformanceReport)
    assert kit.check_against_enumeration("expect", orders=[1, 0, 1]).orders == (0, 1)
    models, skipped = kit.standard_models(storch.estimator("reparameterization", plate="z"))
    assert [m.name for m in models] == ["normal[2]", "chain[Normal]", "independent[Normal]", "global_latent[Normal]",
                                      "elbo[Normal]", "laplace[loc]", "uniform[high]"]
    assert "bernoulli[3]" in skipped
    with pytest.raises(AssertionError, match="none of the models"):
        kit.check_against_enumeration("reparameterization", models=[m for m in kit.standard_models(
            storch.estimator("expect", plate="z"))[0]])
    with pytest.raises(ValueError, match="orders"):
        kit.check_against_enumeration("expect", orders=[4])
    with pytest.raises(TypeError):
        kit.check_against_enumeration(42)
    # options with a factory would be ignored (the factory builds the estimator): refused, as with an instance
    with pytest.raises(TypeError, match="not with a factory"):
        kit.check_against_enumeration(lambda plate: storch.estimator("expect", plate=plate),
                                      options={"n_samples": 3})  # type: ignore[call-overload]


def test_global_rng_is_left_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    kit.check_against_enumeration("reparameterization", orders=[0])
    assert torch.equal(torch.rand(3), before)


def test_exact_values():
    th = torch.tensor([0.5, -1.0], dtype=F64)
    normal = kit.exact_expectation(lambda t: Normal(t, 0.7), lambda x: (x ** 4).sum())(th)
    closed = (th ** 4 + 6 * th ** 2 * 0.49 + 3 * 0.7 ** 4).sum()  # E[x^4] of N(μ, σ²)
    assert torch.allclose(normal, closed, rtol=1e-12)
    bern = kit.exact_expectation(_bern, _toy)(THETA2)
    p = torch.sigmoid(THETA2)
    assert torch.allclose(bern, (torch.tensor([1.0, 2.0], dtype=F64) * (p * 0.8 ** 2 + (1 - p) * 0.2 ** 2)).sum())
    d = kit.exact_derivatives(lambda t: (t ** 3).sum(), th, 3)
    assert torch.allclose(d[1], 3 * th ** 2) and torch.allclose(d[2], torch.diag(6 * th))
    assert torch.allclose(d[3], torch.diag(6 * kit.direction(2)))  # ∇³f·v


def test_full_check_of_a_score_function_estimator_passes():
    # (its time is not asserted: speed is measured in benchmarks, not in unit tests)
    report = kit.check_against_enumeration(LeaveOneOut, options={"n_samples": 2})
    assert report.ok


def test_z_test_rejects_nan_and_keeps_assert_unbiased():
    r = kit.z_test(torch.tensor([[float("nan")], [1.0]]), 1.0)
    assert not r.ok and math.isinf(r.max_abs_z)
    with pytest.raises(AssertionError, match="biased"):
        kit.assert_unbiased(torch.ones(100, 1) + 0.01 * torch.randn(100, 1), 2.0)


def test_z_test_rejects_a_non_finite_exact_value():
    # an enumeration that failed (0 * inf at a masked value) must not pass as z = 0
    est = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    r = kit.z_test(est, torch.tensor([float("nan"), 0.0]))
    assert not r.ok and math.isinf(float(r.z[0])) and abs(float(r.z[1])) < 4
    with pytest.raises(AssertionError, match="biased"):
        kit.assert_unbiased(est, torch.tensor([0.0, float("inf")]))


# -- a score function storch does not know is one: kinked log p, moving support ---------------------------


class DeclaredNotAScore(storch.Estimator):
    """BUG: the gradient function is log p (written out, as a masking variant would), but the class says
    score_function = False, so storch's refusals for score functions are off."""

    name = "test_declared_not_a_score"
    score_function = False

    def gradient_function(self, node):
        return node.log_prob(node.sample)


def _refusal_models(est) -> list:
    return [m for m in kit.standard_models(est)[0] if m.name in ("laplace[loc]", "uniform[high]")]


def test_a_score_function_without_its_refusals_fails_the_kink_and_moving_support_models():
    """The standard models (Bernoulli, Categorical, Normal) cannot tell: a Laplace's kink at order 2 (|z| 145
    by porting) and Uniform(0, h)'s moving support at order 1 (|z| 442) can; the failure says score_function."""
    probe = DeclaredNotAScore("x")
    models = _refusal_models(probe)
    assert [m.name for m in models] == ["laplace[loc]", "uniform[high]"]
    report = _check(DeclaredNotAScore, orders=(1, 2), models=models)
    assert {"laplace[loc], order 2", "uniform[high], order 1"} <= _failed(report)
    assert "laplace[loc], order 1" not in _failed(report)  # unbiased at order 1: the kink is of log p's derivative
    assert "score_function = True" in report.table()
    with pytest.raises(AssertionError, match="score_function = True"):
        kit.check_against_enumeration(DeclaredNotAScore, orders=(1, 2), models=models)


def test_refusals_and_pathwise_estimates_pass_the_kink_and_moving_support_models():
    """The base class's score function is refused (order 2 at the kink, the moving support when sampling):
    an accepted outcome, the lower orders still tested; reparameterization is unbiased on both."""
    report = _check(LeaveOneOut, options={"n_samples": 2}, orders=(0, 1, 2), models=_refusal_models(LeaveOneOut("x")))
    assert report.ok, report.table()
    assert {c.name for c in report.checks} == {"laplace[loc], order 0", "laplace[loc], order 1"}
    assert "refused" in report.skipped["laplace[loc], order 2"]
    assert "refused while sampling" in report.skipped["uniform[high]"]
    pathwise = _check("reparameterization", models=_refusal_models(storch.estimator("reparameterization", plate="x")))
    assert pathwise.ok and len(pathwise.checks) == 8, pathwise.table()


class EnumerateOne(storch.Estimator):
    """BUG: an exact sum over a Bernoulli's two values with weights p(x) (weights that carry the gradient),
    but uniform_weights says True: the surrogate never reads the weights."""

    name = "test_enum_one"
    distributions = (Bernoulli,)

    def proposal(self, node):
        d = node.distribution
        return torch.arange(2.0, dtype=F64).reshape((2,) + (1,) * len(d.batch_shape)).expand((2,) + d.batch_shape)

    def weighting_function(self, node):
        return node.log_prob(node.sample).exp()

    def gradient_function(self, node):
        return torch.zeros(2, dtype=F64)

    @property
    def uniform_weights(self):
        return True


def test_uniform_weights_claimed_for_weights_that_are_not_one_over_n_is_named():
    """Was: every order failed with |z| = inf and storch.backward() said 'no tensor that requires grad',
    neither naming uniform_weights."""
    chain = [m for m in kit.standard_models(EnumerateOne("z"))[0] if m.name.startswith("chain")]
    with pytest.raises(AssertionError, match=r"uniform_weights is True.*carry gradient.*1/N = 0.5"):
        kit.check_against_enumeration(EnumerateOne, models=chain)


def test_uniform_weights_of_a_node_that_a_factorys_probe_does_not_get_are_checked():
    """The check was keyed on the factory's probe make("probe") (expect here), so a node whose estimator drops its
    weights was not checked: the model failed with |z| = inf at every order without naming the node or
    uniform_weights. Each model of a factory is checked at every node."""
    chain = [m for m in kit.standard_models(EnumerateOne("z"))[0] if m.name.startswith("chain")]

    def make(plate):
        return EnumerateOne(plate) if plate == "x2" else storch.estimator("expect", plate=plate)

    with pytest.raises(AssertionError, match=r"test_enum_one: uniform_weights is True.*carry gradient.*1/N = 0.5 "
                                             r"\(node 'x2' of model chain\[Bernoulli\]\)"):
        kit.check_against_enumeration(make, models=chain, orders=(0, 1), n_replicates=50)
    # the check does not stop at the first model of a factory: a later model's node is checked too
    first = [m for m in kit.standard_models(EnumerateOne("z"))[0] if m.name == "bernoulli[3]"]
    with pytest.raises(AssertionError, match=r"node 'x2' of model chain\[Bernoulli\]"):
        kit.check_against_enumeration(make, models=first + chain, orders=(0,), n_replicates=50)


def test_dropped_weights_are_reported_not_raised_with_raise_on_failure_false():
    """Was: the finding raised AssertionError through raise_on_failure=False (a factory's, and a class's), unlike
    every other finding of the kit. Now it is the model's entry in report.errors (ok False), the model is not run
    (its estimates would miss the weights), and the other models still run; raise_if_failed() raises it."""
    chain = [m for m in kit.standard_models(EnumerateOne("z"))[0] if m.name.startswith("chain")]
    first = [m for m in kit.standard_models(EnumerateOne("z"))[0] if m.name == "bernoulli[3]"]

    def make(plate):
        return EnumerateOne(plate) if plate == "x2" else storch.estimator("expect", plate=plate)

    report = kit.check_against_enumeration(make, models=first + chain, orders=(0, 1), n_replicates=50,
                                           raise_on_failure=False)
    assert not report.ok
    assert list(report.errors) == ["chain[Bernoulli]"], report.errors
    assert re.match(r"drops its weights: test_enum_one: uniform_weights is True.*carry gradient.*1/N = 0\.5 \(node "
                    r"'x2' of model chain\[Bernoulli\]\)", report.errors["chain[Bernoulli]"]), report.errors
    assert {c.name for c in report.checks} == {"bernoulli[3], order 0", "bernoulli[3], order 1"}  # (expect: exact)
    assert all(c.ok for c in report.checks), report.table()
    assert "chain[Bernoulli]                   FAIL: drops its weights: test_enum_one" in report.table()
    with pytest.raises(AssertionError, match=r"drops the weights of some nodes \(uniform_weights\)"):
        report.raise_if_failed("does not match the exact values")
    # a class (not a factory): the same
    report = kit.check_against_enumeration(EnumerateOne, models=chain, orders=(0,), n_replicates=50,
                                           raise_on_failure=False)
    assert not report.ok and not report.checks and report.errors["chain[Bernoulli]"].startswith(
        "drops its weights: test_enum_one: uniform_weights is True"), report.errors


def test_a_replicate_with_a_nan_estimate_is_a_failed_check_not_an_error():
    """The kit sums R independent replicates into one loss; a backward pass through a non-finite surrogate loss is
    refused (NonFiniteCostError, as storch.backward() refuses it), and a first version refused the kit's too, so one
    replicate's NaN raised out of check_against_enumeration(raise_on_failure=False) instead of failing its check
    (found by review). The kit differentiates its loss unchecked: the NaN estimate is an infinite z-score."""
    from torch.distributions import Bernoulli

    from storch.distributions import base_distribution

    class NanScore(storch.Estimator):
        name = "nan_score"
        distributions = (Bernoulli,)

        def proposal(self, node):
            p = base_distribution(node.distribution).probs
            return torch.bernoulli(p.expand((self.n_samples,) + p.shape))

        def gradient_function(self, node):
            lp = super().gradient_function(node)
            bad = torch.rand(lp.shape) < 0.002  # a rare NaN: a broken estimator
            return torch.where(bad, torch.full_like(lp, float("nan")), lp)

    torch.manual_seed(0)
    report = storch.testing.check_against_enumeration(NanScore, options={"n_samples": 2}, raise_on_failure=False,
                                                      seed=0)
    assert not report.ok
    assert any(bool(torch.isinf(c.z).any()) for c in report.checks), report.table(details=False)


# -- found by a porting tester (Bayesian networks checked with the kit) ----------------------------------------


class CrossCostBaseline(LeaveOneOut):
    """BUG: the baseline of a cost is the previous cost frame of the step. In an ELBO the two costs log q(z) and
    -log p(x, z) are on the same frame, so the baseline of the second is the first: this very sample's cost."""

    name = "test_cross_cost_baseline"

    def __init__(self, plate: str, n_samples: int = 2) -> None:
        super().__init__(plate, n_samples)
        self._last = None

    def baseline(self, node, cost):
        prev, self._last = self._last, cost.tensor
        return prev if prev is not None and prev.shape == cost.tensor.shape else None


def test_a_baseline_made_of_another_cost_of_the_same_frame_is_caught_on_the_elbo_model():
    # it passed every standard model at orders 0-3 (no node had two costs of the same frame): the elbo model fails it
    bad = kit.check_against_enumeration(CrossCostBaseline, raise_on_failure=False)
    failed = {c.name for c in bad.failures}
    assert failed and all(name.startswith("elbo[") for name in failed), bad.table(details=False)
    assert max(c.max_abs_z for c in bad.failures) > 8 and "TWO costs of the same frame" in bad.table()
    twin = kit.check_against_enumeration(LeaveOneOut, models=[m for m in kit.standard_models(
        LeaveOneOut("probe", 2))[0] if m.name.startswith("elbo[")])  # the correct twin passes it
    assert [c.name for c in twin.checks] == [f"elbo[Bernoulli], order {m}" for m in range(4)]


@pytest.mark.parametrize("kind", [Bernoulli, OneHotCategorical, Categorical, Normal])
def test_the_elbo_models_exact_values(kind):
    # expect (zero variance: equal to the enumeration to 1e-9) and reparameterization (z-tests) check the
    # closed forms / enumerations of every variant of the elbo model
    from storch.testing._models import _elbo

    model = _elbo(kind)
    name = "reparameterization" if kind is Normal else "expect"
    report = kit.check_against_enumeration(name, models=[model], orders=(0, 1, 2, 3), n_replicates=2000)
    assert len(report.checks) == 4 and report.ok


def test_a_model_passed_explicitly_that_cannot_run_fails_and_names_the_estimators_per_node():
    # reparameterization at node 'x' refuses bernoulli[3]'s Bernoulli when sampling: the model was skipped and the
    # check passed on the other model (ok=True, nothing raised); the report named only the probe's estimator
    models = {m.name: m for m in kit.standard_models(storch.estimator("expect", plate="z"))[0]}

    def make(plate):
        return storch.estimator("reparameterization" if plate == "x" else "expect", plate=plate)

    chosen = [models["chain[Bernoulli]"], models["bernoulli[3]"]]
    with pytest.raises(AssertionError, match=r"factory \(expect at x1, x2; reparameterization at x\) could not run "
                                             r"on models passed in models=\[\.\.\.\][\s\S]*bernoulli\[3\] +FAIL: "
                                             r".*refused while sampling by reparameterization at node 'x'"):
        kit.check_against_enumeration(make, models=chosen, orders=(0, 1))
    report = kit.check_against_enumeration(make, models=chosen, orders=(0, 1), raise_on_failure=False)
    assert not report.ok and all(c.ok for c in report.checks) and list(report.errors) == ["bernoulli[3]"]
    # a model the estimator does not support by its class attributes, passed explicitly: a failure too
    with pytest.raises(AssertionError, match=r"could not run[\s\S]*normal\[2\] +FAIL"):
        kit.check_against_enumeration("expect", models=[models["bernoulli[3]"], kit.standard_models(
            storch.estimator("reparameterization", plate="z"))[0][0]], orders=(0,))
    # separate graphs: the same
    with pytest.raises(AssertionError, match=r"could not run[\s\S]*refused while sampling by reparameterization"):
        kit.check_leakage(make, models=chosen, orders=(0,), n_graphs=50)


def test_a_zero_variance_failure_says_the_gap_the_tolerance_and_float32():
    # it printed 'mean 2.27528, stderr 0, exact 2.27528, z inf, FAIL' without the gap (6e-9) or the tolerance
    est = torch.full((5, 1), 2.2752800, dtype=torch.float32)
    exact = torch.tensor([float(est[0, 0]) + 6e-9], dtype=F64)
    report = kit.z_test(est, exact)
    assert not report.ok
    row = report.table().splitlines()[-1]
    assert "|mean - exact| = 6e-09 > tolerance 3.28e-09" in row and "float32" in row and "float64" in row
    assert "float32" not in kit.z_test(est.double(), exact).table()


# -- found by a plugin-author tester -----------------------------------------------------------------------


class CategoricalCrash(storch.Estimator):
    """The score function, which raises on a Categorical node (a broken estimator on some kit models)."""

    name = "test_categorical_crash"
    distributions = (Bernoulli, Categorical)

    def gradient_function(self, node):
        if isinstance(base_distribution(node.distribution), Categorical):
            raise RuntimeError("categorical logits not handled")
        return super().gradient_function(node)


def test_an_estimator_that_raises_on_a_kit_model_is_recorded_without_raise_on_failure():
    """Was: the RuntimeError propagated out of check_against_enumeration(raise_on_failure=False), losing the
    report of the models that ran. Now it is the model's entry in report.errors (ok False); the other models
    are tested (the Bernoulli ones pass their z-tests), and raise_on_failure=True still propagates it."""
    report = kit.check_against_enumeration(CategoricalCrash, options={"n_samples": 2}, orders=[1],
                                           n_replicates=1000, raise_on_failure=False)
    print(report.table(details=False))
    crashed = {name for name, why in report.errors.items()
               if why == "raised RuntimeError: categorical logits not handled"}
    assert "categorical[K=5]" in crashed and crashed == set(report.errors), report.errors
    assert not report.ok and not report.failures
    assert any(c.name.startswith("bernoulli") for c in report.checks)
    assert "FAIL: raised RuntimeError: categorical logits not handled" in report.table()
    with pytest.raises(RuntimeError, match="categorical logits not handled"):
        kit.check_against_enumeration(CategoricalCrash, options={"n_samples": 2}, orders=[1], n_replicates=1000)


class RaisesAtEveryProposal(storch.Estimator):
    """Uniform weights and an overridden weighting function (as Score has): the kit's one-off uniform-weights check
    builds the first model, outside the per-model recording; the proposal raises there."""

    name = "test_raises_at_every_proposal"
    distributions = (Bernoulli, Categorical)
    uniform_weights = True

    def proposal(self, node):
        raise RuntimeError("boom")

    def weighting_function(self, node):
        return super().weighting_function(node)


def test_an_estimator_that_raises_in_the_uniform_weights_check_is_recorded_without_raise_on_failure():
    """Review p-docs7: the uniform-weights check built the first model outside the try that records errors, so an
    estimator raising there escaped check_against_enumeration(raise_on_failure=False)."""
    report = kit.check_against_enumeration(RaisesAtEveryProposal, orders=[1], n_replicates=100,
                                           raise_on_failure=False)
    assert report.errors and set(report.errors.values()) == {"raised RuntimeError: boom"}, report.errors
    assert not report.ok
    with pytest.raises(RuntimeError, match="boom"):
        kit.check_against_enumeration(RaisesAtEveryProposal, orders=[1], n_replicates=100)


class BiasedPathwise(storch.get_estimator_class("reparameterization")):
    """BUG: the pathwise derivative is 1.5 times the sample's (a wrong output; the forward value is right)."""

    name = "test_biased_pathwise"

    def output(self, node):
        x = super().output(node)
        return x + 0.5 * (x - x.detach())


def test_hints_follow_the_capabilities_and_a_failure_everywhere_is_said_first():
    """Was: a biased pathwise estimator got every failed model's fixed hint: 'a baseline or control variate ...
    built from another cost' and 'set the class attribute score_function = True', neither of which it can have.
    Now a model's hint shows only where it can apply (baselines: an estimator with a baseline or control
    variate; score_function: one whose own gradient function may be an undeclared score), and a failure on
    every model says first that the estimator itself is biased."""
    from storch.testing._models import has_baseline, may_be_undeclared_score

    assert has_baseline(LeaveOneOut("z")) and not has_baseline(BiasedPathwise("z"))
    assert may_be_undeclared_score(DeclaredNotAScore("z")) and not may_be_undeclared_score(BiasedPathwise("z"))
    assert not may_be_undeclared_score(LeaveOneOut("z"))  # the base class's log p: storch knows it
    models = [m for m in kit.standard_models(BiasedPathwise("z"))[0] if not m.name.startswith("global_latent")]
    report = _check(BiasedPathwise, models=models, orders=[1], n_replicates=4000)  # (global_latent: |z| < 1)
    table = report.table()
    assert len(report.failures) == len(report.checks) > 1, table
    assert table.splitlines()[1].startswith("fails on every model"), table
    assert "another cost" not in table and "score_function = True" not in table and "data plate" not in table
    # a failure on one model only: no claim about every model, and the hint of an estimator it applies to
    one = _check(CrossCostBaseline, options={"n_samples": 2}, models=[m for m in kit.standard_models(
        CrossCostBaseline("z"))[0] if m.name.startswith(("elbo", "bernoulli"))], orders=[1])
    assert "fails on every model" not in one.table() and "another cost" in one.table(), one.table()


def test_reports_print_a_readable_summary_and_say_when_a_failure_is_a_declared_bias():
    # p-api: str(UnbiasednessReport) was the dataclass's repr (every tensor in full); a failed enumeration check
    # of an estimator declared biased (gumbel_softmax, orders=[1]) said only "does not match the exact values"
    torch.manual_seed(0)
    good = kit.z_test(torch.randn(400, 3, dtype=torch.float64), 0.0, name="demo")
    text = str(good)
    assert text.startswith(f"demo: ok, max |z| = {good.max_abs_z:.2f} over 3 component(s) (400 estimates, |z| < 4.0)")
    assert len(text.splitlines()) == 5 and "tensor(" not in text
    bad = kit.z_test(torch.randn(400, 2, dtype=torch.float64) + 1.0, 0.0, name="shifted")
    assert str(bad).startswith("shifted: FAIL") and "<-- FAIL" in str(bad)
    for biased in (False, True):
        report = kit.ConformanceReport("mine", (1,), checks=[bad, good], biased=biased)
        assert ("declared biased" in report.table()) is biased


class _BiasedScore(storch.Estimator):
    """The base score function with a bias: each sample's gradient weight is doubled, declared biased."""

    name = None
    biased = True

    def gradient_function(self, node):  # noqa: D102
        return 2 * super().gradient_function(node)


def test_a_failed_check_of_an_estimator_declared_biased_says_so():
    model = kit.standard_models(_BiasedScore("probe"))[0][:1]
    with pytest.raises(AssertionError, match=r"does not match the exact values, as an estimator declared biased "
                                             r"need not") as e:
        kit.check_against_enumeration(_BiasedScore, orders=[1], models=model, n_replicates=400)
    assert "a failed z-test measures that bias" in str(e.value)
