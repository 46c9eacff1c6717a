"""The bad-input table of issue 11: every case raises a storch exception whose message names the
problem and the fix, and the NEXT step's gradient equals a clean run's (same seeds), in the
thread's default graph and in a ``with storch.Graph():`` block.

The training step uses ``score`` with a moving-average baseline (state that a leaked or
half-finished step would change) on a data plate. A clean run does steps with seeds 0 and 2; the
tested run does seed 0, then the bad step (seed 1), then seed 2."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch

from _plugins import installed as broken_plugins

DATA = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.5).float()


class FirstOrder(storch.Estimator):
    """A score-function estimator declared unbiased to first order only (like arm, go, spsa)."""

    name = "test_first_order"
    max_order = 1


class Model:
    def __init__(self) -> None:
        torch.manual_seed(42)
        self.enc = torch.nn.Linear(5, 3)
        self.est = storch.estimator("score", plate="z", n_samples=3, baseline="moving_average") \
            if "score" in storch.available_estimators() else storch.estimator("expect", plate="z")

    def q(self, x):
        return Bernoulli(logits=self.enc(x))


def _step(m: Model, seed: int, mode: str, body: Callable = None):
    """One training step; ``body(m, x)`` replaces the normal step body (for the bad step)."""
    torch.manual_seed(seed)
    m.enc.zero_grad(set_to_none=True)
    with (storch.Graph() if mode == "graph" else contextlib.nullcontext()):
        x = storch.denote_independent(DATA, 0, "data")
        if body is not None:
            body(m, x)
        z = m.est(m.q(x))
        storch.add_cost(((z - 0.45) ** 2).sum(), name="c")
        storch.backward()
    return [p.grad.clone() for p in m.enc.parameters()]


# -- the bad steps ---------------------------------------------------------------------------------

def unknown_name(m, x):
    storch.estimator("scroe", plate="w")


def misspelled_option(m, x):
    storch.estimator("score", plate="w", n_sample=4)


def n_samples(value):
    def bad(m, x):
        storch.estimator("score", plate="w", n_samples=value)
    return bad


def leave_one_out_one_sample(m, x):
    storch.estimator("score", plate="w", n_samples=1, baseline="leave_one_out")


def plate_name_reused(m, x):
    m.est(m.q(x))
    storch.estimator("expect", plate="z")(m.q(x))  # a second node named "z"


def data_plate_reused(m, x):
    storch.denote_independent(DATA, 0, "data")


def cost_with_event_shape(m, x):
    z = m.est(m.q(x))
    storch.add_cost((z - 0.45) ** 2, name="per_latent")


def non_tensor_cost(m, x):
    z = m.est(m.q(x))
    storch.add_cost(((z - 0.45) ** 2).sum().tensor.mean().item(), name="number")


def wrong_distribution(m, x):
    storch.estimator("reparameterization", plate="w")(m.q(x))


def order_too_high(m, x):
    b = FirstOrder(plate="w", n_samples=2)(Bernoulli(logits=m.enc(x).sum()))
    storch.add_cost(b * 1.0, name="c1")
    storch.surrogate_loss(order=2)


def backward_without_costs(m, x):
    m.est(m.q(x))
    storch.backward()


def nan_parameters_sampling(m, x):
    m.est(Bernoulli(logits=m.enc(x) * float("nan"), validate_args=False))


def nan_parameters_cost(m, x):
    z = storch.estimator("reparameterization", plate="w")(Normal(m.enc(x) * float("nan"), 1.0, validate_args=False))
    storch.add_cost((z ** 2).sum(), name="nan_cost")
    storch.backward()


def broken_plugin(kind, name):
    def bad(m, x):
        with broken_plugins(kind):
            storch.estimator(name, plate="w")
    return bad


@dataclass
class Case:
    body: Callable
    error: type
    problem: str  # regex: the message names the problem
    fix: str  # regex: ... and the fix
    needs: tuple = field(default_factory=tuple)


CASES = {
    "unknown name": Case(unknown_name, storch.UnknownEstimatorError, "no estimator named 'scroe'",
                         "Did you mean 'score'", ("score",)),
    "misspelled option": Case(misspelled_option, storch.OptionError, "no option 'n_sample'",
                              "Did you mean 'n_samples'", ("score",)),
    "n_samples=0": Case(n_samples(0), storch.OptionError, "n_samples must be an int >= 1.*got 0",
                        "pass an int such as n_samples=4", ("score",)),
    "n_samples=-1": Case(n_samples(-1), storch.OptionError, "got -1", "pass an int such as n_samples=4", ("score",)),
    "n_samples=2.5": Case(n_samples(2.5), storch.OptionError, "got 2.5", "pass an int", ("score",)),
    "n_samples='4'": Case(n_samples("4"), storch.OptionError, "got '4'", "pass an int", ("score",)),
    "leave-one-out with one sample": Case(leave_one_out_one_sample, storch.OptionError,
                                          "needs n_samples >= 2", "averages the other samples", ("score",)),
    "plate name reused (node)": Case(plate_name_reused, storch.PlateError, "plate name 'z' is already used",
                                     "give each stochastic node and data plate its own name"),
    "plate name reused (data)": Case(data_plate_reused, storch.PlateError, "plate name 'data' is already used",
                                     r"pass them in ONE call: `x, y = storch.denote_independent\(\(x, y\), 0, 'data'\)`"),
    "cost with an event shape": Case(cost_with_event_shape, storch.CostError,
                                     r"cost 'per_latent' has per-sample shape \(3,\)", r"sum\(-1\)"),
    "non-tensor cost": Case(non_tensor_cost, storch.CostError, "cost 'number' is a float, not a tensor",
                            "pass the torch tensor"),
    "wrong distribution": Case(wrong_distribution, storch.UnsupportedDistributionError,
                               "'reparameterization' does not support Bernoulli", "Estimators that support it"),
    "order too high": Case(order_too_high, storch.OrderError, "unbiased only up to order 1.*order 2",
                           "choose an estimator with a higher max_order"),
    "backward() without costs": Case(backward_without_costs, storch.StorchError, "no costs",
                                     r"call storch.add_cost"),
    "NaN parameters (sampling)": Case(nan_parameters_sampling, storch.NonFiniteParameterError,
                                      "'logits' hold NaN or infinite", "keep torch's argument validation on"),
    "NaN parameters (cost)": Case(nan_parameters_cost, storch.NonFiniteCostError, "cost 'nan_cost' is not finite",
                                  "Find where the non-finite value comes from"),
    "broken plugin: import": Case(broken_plugin("import", "import_plugin"), storch.PluginError,
                                  "failed to load.*torch_scatter", "fix or reinstall"),
    "broken plugin: hook": Case(broken_plugin("hook", "hook_plugin"), storch.PluginError,
                                "failed to load.*hook exploded", "fix or reinstall"),
    "broken plugin: bare class": Case(broken_plugin("bare_class", "bare_estimator"), storch.PluginError,
                                      "returned .*Bare.*not a list", r"return a list, e.g. `return \[Bare\]`"),
    "broken plugin: class": Case(broken_plugin("class", "bad_class_estimator"), storch.PluginError,
                                 "max_order=-3", "use an int >= 0 or math.inf"),
}


@pytest.fixture(scope="module")
def clean():
    out = {}
    for mode in ("default", "graph"):
        m = Model()
        _step(m, 0, mode)
        out[mode] = _step(m, 2, mode)
    return out


@pytest.mark.parametrize("mode", ["default", "graph"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, mode, clean):
    c = CASES[case]
    missing = [n for n in c.needs if n not in storch.available_estimators()]
    if missing:
        pytest.skip(f"needs {missing}")
    m = Model()
    _step(m, 0, mode)
    with pytest.raises(c.error) as info:
        _step(m, 1, mode, body=c.body)
    msg = str(info.value)
    assert c.error is not storch.StorchError or type(info.value) is storch.StorchError
    import re
    assert re.search(c.problem, msg, re.S), msg
    assert re.search(c.fix, msg, re.S), msg
    assert not storch.current_graph().nodes and not storch.current_graph().costs  # the step was discarded
    # the next step is exactly a clean run's
    for g, g_clean in zip(_step(m, 2, mode), clean[mode]):
        assert torch.equal(g, g_clean)


def test_messages_found_by_porting_sequences():
    """70 chained per-step estimators: torch's 64-dim limit says to use one estimator for the sequence;
    unordered_set's OrderError names the option that raises its order; storch.compile's refusal of
    sum_and_sample(buffer=) names the options in use and the buffer."""
    from torch.distributions import Categorical

    with storch.Graph():
        a = torch.zeros(3, 3, requires_grad=True)
        z = torch.tensor(0)
        with pytest.raises(storch.PlateError, match=r"64 dims.*ONE estimator outside the loop"):
            for t in range(70):
                z = storch.estimator("score", plate=f"a{t}")(Categorical(logits=a[z]))
    with storch.Graph():
        z = storch.estimator("unordered_set", plate="u", n_samples=2)(Categorical(logits=torch.zeros(3, requires_grad=True)))
        storch.add_cost(z.float())
        with pytest.raises(storch.OrderError, match=r"unordered_set\(baseline=False\)"):
            storch.surrogate_loss(order=2)
    est = storch.estimator("sum_and_sample", plate="seq", n_samples=2, buffer=4)
    theta = torch.zeros(3, requires_grad=True)

    @storch.compile(backend=None)
    def step(theta):
        tok = est(Categorical(logits=theta))
        tok = est(Categorical(logits=theta + tok.float()))
        storch.add_cost(tok.float())
        return storch.surrogate_loss()

    with pytest.raises(storch.StorchError, match=r"buffer=4.*no buffer="):
        step(theta)


def test_two_costs_with_one_name_at_one_step_warn():
    """The loss counts both, but per-cost estimator state (baselines, buffers) is kept by name and step:
    say so. The same name at different steps of a partition (the documented pattern) does not warn."""
    import warnings

    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("score", plate="z", n_samples=2)(Bernoulli(logits=theta))
        storch.add_cost(z.sum(), name="a")
        storch.add_cost(10 * z.sum(), name="a")
        with pytest.warns(UserWarning, match=r"two costs named 'a'.*own name"):
            storch.surrogate_loss()
    est = storch.estimator("score", plate="s", n_samples=2)
    with storch.Graph(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            z = est(Bernoulli(logits=theta))
            storch.add_cost(z.sum(), name="r")
        storch.surrogate_loss()


def test_interleaved_partitions_say_how_to_write_them():
    """An option every 2 steps and an action every step, each its own estimator: refused (partitions must
    be topologically ordered), and the message says what to write instead (found by porting a hierarchical
    policy). It used to say to create "the less frequent one" anew per call, which is refused in turn with
    the same advice; what works is a new partition after each draw of the other node, here for both (the
    option's logits depend on the state the actions reach)."""
    from torch.distributions import Categorical

    phi = torch.zeros(4, 2, requires_grad=True)
    psi = torch.zeros(2, 4, 2, requires_grad=True)
    hi = storch.estimator("score", plate="opt", n_samples=2)
    lo = storch.estimator("score", plate="act", n_samples=2)
    with storch.Graph():
        s = torch.tensor(1)
        with pytest.raises(storch.PlateError, match=r"partition 'opt' depends on node 'act'.*estimator of 'opt' "
                           r"anew for each segment.*plate=f'opt\{k\}'.*'act' is a partition too"):
            for t in range(4):
                if t % 2 == 0:
                    o = hi(Categorical(logits=phi[s]))
                a = lo(Categorical(logits=psi[o, s]))
                s = (s + 2 * a - 1).clamp(0, 3)
    with storch.Graph():  # the advice, followed for both: each created anew per segment between the other's draws
        s = torch.tensor(1)
        for t in range(4):
            if t % 2 == 0:
                o = storch.estimator("score", plate=f"opt{t // 2}", n_samples=2)(Categorical(logits=phi[s]))
                lo = storch.estimator("score", plate=f"act{t // 2}", n_samples=2)
            a = lo(Categorical(logits=psi[o, s]))
            s = (s + 2 * a - 1).clamp(0, 3)
            storch.add_cost(-s.float(), name="r")
        storch.backward()
    assert phi.grad is not None and psi.grad is not None


def test_two_sequences_reading_each_other_say_to_create_both_estimators_per_step():
    """A switching state-space model: z_t reads x_{t-1}, x_t reads z_t, one estimator each. At z's step 1, x has
    been called once (not yet a partition), and the advice used to say only to create z's estimator anew, which
    was then refused for x in turn (found by porting, p-mix); the message now says to create both anew per step,
    and doing so works."""
    from torch.distributions import Categorical, Normal

    pi0 = torch.zeros(2, requires_grad=True)
    a = torch.tensor([0.9, -0.6], requires_grad=True)
    ez = storch.estimator("score", plate="z", n_samples=2)
    ex = storch.estimator("reparameterization", plate="x")
    with storch.Graph():
        z0 = ez(Categorical(logits=pi0))
        x0 = ex(Normal(a[z0], 0.5))
        with pytest.raises(storch.PlateError, match=r"partition 'z' depends on node 'x'.*itself called again at "
                           r"later steps.*create BOTH estimators anew per step, for 'z' and for 'x'"):
            ez(Categorical(logits=torch.stack([x0, -x0], -1)))
    with storch.Graph():  # the advice followed: both anew per step
        x = None
        for t in range(2):
            logits = pi0 if x is None else torch.stack([x, -x], -1)
            z = storch.estimator("score", plate=f"z{t}", n_samples=2)(Categorical(logits=logits))
            x = storch.estimator("reparameterization", plate=f"x{t}")(Normal(a[z] * (1.0 if t == 0 else x), 0.5))
            storch.add_cost((x - 0.3) ** 2, name="c")
        storch.backward()
    assert pi0.grad is not None and a.grad is not None


@pytest.mark.parametrize("name", ["expect", "unordered_set", "sum_and_sample"])
def test_an_independent_of_a_finite_distribution_says_to_pass_the_base(name):
    """Independent(Bernoulli(...), 1) for an enumerating estimator: torch's Independent has no enumerable
    support, and the refusal now says to pass the Bernoulli itself (storch treats a node's batch dims jointly);
    the Bernoulli then gives the same per-sample shape and the exact expectation (found by porting a belief
    net)."""
    from torch.distributions import Independent

    logits = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    est = storch.estimator(name, plate="z")
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="pass the Bernoulli itself"):
        est(Independent(Bernoulli(logits=logits), 1))
    if name == "expect":
        with storch.Graph():
            z = est(Bernoulli(logits=logits))
            assert z.shape == (3,)
            storch.add_cost((z * torch.tensor([1.0, 2.0, 3.0])).sum())
            value = storch.surrogate_loss()
        torch.testing.assert_close(value, (torch.sigmoid(logits) * torch.tensor([1.0, 2.0, 3.0])).sum())


def test_one_estimator_per_step_with_several_samples_is_refused_before_memory_runs_out(monkeypatch):
    """One estimator per step of a sequence with n_samples=8: each step multiplies the storage by 8, so the
    process ran out of memory (killed, or 'can't allocate memory') around step 9, long before torch's 64-dim
    limit that the docs' PlateError is about (found by running the docs' example). storch refuses at 2^24
    sample entries per data point (and a chain node's whole sample at MAX_DRAW_ENTRIES) with the partition advice;
    a large data plate alone (no chain) does not count."""
    from torch.distributions import Categorical

    import storch.estimators.checks as checks

    monkeypatch.setattr(checks, "MAX_SAMPLE_ENTRIES", 8 ** 4)  # the chain below, without its memory (2^24: step 9)
    a = torch.zeros(3, 3, requires_grad=True)
    with storch.Graph():
        z = torch.tensor(0)
        with pytest.raises(storch.PlateError, match=r"would sample 32768 entries.*ONE estimator outside"):
            for t in range(12):
                z = storch.estimator("score", plate=f"a{t}", n_samples=8)(Categorical(logits=a[z]))
        assert t == 5
    from torch.distributions import Bernoulli

    from storch.estimators.checks import _check_sample_entries

    est = storch.estimator("score", plate="b", n_samples=8)
    one = Bernoulli(logits=torch.zeros(()))
    _check_sample_entries(est, one, (storch.Plate("data", 2 ** 30, True), storch.Plate("a", 1)))  # no chain: fine
    with pytest.raises(storch.PlateError, match="the sample plates of the 2 earlier nodes"):
        _check_sample_entries(est, one, (storch.Plate("a", 2 ** 12), storch.Plate("data", 2, True), storch.Plate("c", 2 ** 13)))


def test_chain_size_guard_counts_the_data_plate_and_the_values_of_a_draw(monkeypatch):
    """The chain guard counted the sample entries per data point only (docs/partitions.md: 2^24 per data
    point), so a batched chain (score, n_samples=8, 64 data points, 8 nodes: a 2^30-entry, 4.3 GB sample at
    the 8th node) was killed by the OS instead of refused. Now a chain's node whose sample would hold more
    than MAX_DRAW_ENTRIES in all (parents' entries x its samples x data points x values of a draw) is refused
    too; a node without a chain is never refused."""
    from torch.distributions import Bernoulli, OneHotCategorical

    import storch.estimators.checks as checks

    monkeypatch.setattr(checks, "MAX_DRAW_ENTRIES", 8 ** 4 * 64)  # (2^29 in use)
    a = torch.full((8,), 0.5, requires_grad=True)
    with storch.Graph():
        z = storch.denote_independent(torch.randn(64), 0, "data")
        with pytest.raises(storch.PlateError, match=r"(?s)would sample 2097152 entries \(4096 entries of the sample "
                           r"plates of the 4 earlier nodes .* x 8 samples x 64 data points\).*smaller batches"):
            for t in range(8):
                z = storch.estimator("score", plate=f"z{t}", n_samples=8)(Bernoulli(logits=a[t] * z))
        assert t == 4
    # the values of one draw count too (own batch x event): 8 x 8 x 64 data points x 8 variables of 8 categories
    monkeypatch.setattr(checks, "MAX_DRAW_ENTRIES", 8 * 8 * 64 * 8)
    with storch.Graph():
        x = storch.denote_independent(torch.randn(64), 0, "data")
        z = storch.estimator("score", plate="z0", n_samples=8)(Bernoulli(logits=x))
        storch.estimator("score", plate="z1", n_samples=8)(Bernoulli(logits=z.expand(8)))  # 8 x 8 x 64 x 8: fine
        with pytest.raises(storch.PlateError, match=r"x 64 data points x 64 values per draw"):
            storch.estimator("score", plate="z2", n_samples=8)(OneHotCategorical(logits=z.expand(8, 8)))
    # a large data plate without a chain is never refused
    monkeypatch.setattr(checks, "MAX_DRAW_ENTRIES", 4)
    with storch.Graph():
        x = storch.denote_independent(torch.randn(64), 0, "data")
        storch.estimator("score", plate="z0", n_samples=8)(Bernoulli(logits=x))


def test_backward_on_a_plate_tensor_names_the_routes_for_a_loss_that_trains_another_part():
    """A GAN's discriminator loss on `x.detach()` of a storch sample: `.backward()` on it is refused, and the
    message offers, beside storch.backward() (which, followed literally with the loss as an ordinary cost,
    credits the generator's samples with the discriminator's loss), plain torch on the raw samples and
    storch.add_cost(..., credit=False). Both give the discriminator the same gradient, from the same samples,
    and leave the generator's gradient what it is without that loss; the ordinary cost changes it."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    D = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    theta = torch.zeros(4, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")

    def step(d_loss: str):
        theta.grad = None
        D.zero_grad()
        torch.manual_seed(5)
        with storch.Graph():
            x = est(Bernoulli(logits=theta))
            storch.add_cost(-F.logsigmoid(D(x).squeeze(-1)), name="g")
            fake = D(x.detach()).squeeze(-1)
            if d_loss == "refused":
                F.binary_cross_entropy_with_logits(fake, torch.zeros(())).backward()
            if d_loss in ("no credit", "credit"):
                loss = F.binary_cross_entropy_with_logits(fake, torch.zeros(()), reduction="none")
                storch.add_cost(loss, name="d", credit=d_loss == "credit")
            raw = x.tensor.detach()
            storch.backward()
        if d_loss == "plain torch":  # the raw samples, plate dim first: the mean over them
            F.binary_cross_entropy_with_logits(D(raw).squeeze(-1), torch.zeros(3)).backward()
        return theta.grad.clone(), [p.grad.clone() for p in D.parameters()]

    with pytest.raises(storch.PlateError) as info:
        step("refused")
    msg = str(info.value)
    assert "storch.backward()" in msg and "x.tensor.detach()" in msg and "credit=False" in msg
    g_alone, _ = step("none")
    g_plain, d_plain = step("plain torch")
    g_free, d_free = step("no credit")
    g_credit, _ = step("credit")
    assert torch.equal(g_plain, g_alone) and torch.allclose(g_free, g_alone, atol=1e-7)
    for a, b in zip(d_free, d_plain):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    assert (g_credit - g_alone).abs().max() > 1e-3  # the discriminator's loss credited to the generator
