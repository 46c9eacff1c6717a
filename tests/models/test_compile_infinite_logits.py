"""storch.compile with infinite logits (a masked or pinned value: ``logits + mask``, mask ``±inf``).

Eagerly the enumerating estimators read a Bernoulli's log p through ``strict_support`` (0 on the value
an infinite logit always draws, -inf on the other); while storch.compile traced, ``strict_support``
left the distribution alone (a value check cannot be traced), so torch's log p, NaN there, reached
``expect`` (NaN value and gradient, no error, on every row of a data plate), ``importance`` (NaN) and
``sum_and_sample`` (torch's "invalid multinomial distribution", or a refusal blaming n_enumerate).
Traced, the copy is now always made (its log p is a ``torch.where``: no branch on values). Every
estimator of docs/estimators/README.md's compile table on such a node gives what eager storch gives
from the same seed, or refuses with a message that says to run the step eagerly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch

pytestmark = pytest.mark.usefixtures("restore_validation")  # conftest

INF = math.inf
# one row of every value possible, one row with infinite logits (a data plate of two points)
PINS = {
    "Bernoulli": torch.tensor([[0.0, 0.0, 0.0], [0.0, -INF, INF]], dtype=torch.float64),
    "Categorical": torch.tensor([[0.0, 0.0, 0.0], [0.0, -INF, 0.0]], dtype=torch.float64),
    "OneHotCategorical": torch.tensor([[0.0, 0.0, 0.0], [-INF, 0.0, -INF]], dtype=torch.float64),
}
_TARGET = torch.tensor([0.2, 0.7, 0.1], dtype=torch.float64)
_COST = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)

# the compile table's estimators on the families they support (lax and reparameterization: continuous
# only; the relaxations' Categorical sample is a one-hot vector, so they are tested on OneHotCategorical)
_ALL = ["expect", "go", "importance", "mvd", "score", "spsa", "sum_and_sample", "unordered_set"]
_RELAXED = ["gumbel_softmax", "gumbel_straight_through", "straight_through", "rebar", "relax"]
CASES = ([(n, "Bernoulli") for n in _ALL + _RELAXED + ["arm", "disarm"]]
         + [(n, "Categorical") for n in _ALL]
         + [(n, "OneHotCategorical") for n in _ALL + _RELAXED])
# these hold the eager result under storch.compile (no refusal). go reads a Bernoulli's log p through
# strict_support, whose traced copy is exact at ±inf: it refused such logits when that copy was not made.
# mvd: a Bernoulli bit at ±inf has c = 0 and its impossible slot inactive (its density ratio 1, not torch's NaN)
EXACT = {"expect", "go", "importance", "mvd", "sum_and_sample"}


def _estimator(name: str, family: str):
    options = {}
    if name == "importance":
        dist = {"Bernoulli": Bernoulli, "Categorical": Categorical, "OneHotCategorical": OneHotCategorical}[family]
        shape = (2, 3)
        options["proposal"] = dist(probs=torch.full(shape, 0.5 if family == "Bernoulli" else 1 / 3, dtype=torch.float64))
    return storch.estimator(name, plate="z", **options)


def _step(est, family: str):
    def step(theta, pins):
        with storch.Graph():
            logits = storch.denote_independent(theta + pins, 0, "data")
            if family == "Bernoulli":
                z = est(Bernoulli(logits=logits))
                cost = ((z - _TARGET) ** 2).sum(-1)
            elif family == "Categorical":
                cost = _COST[est(Categorical(logits=logits))]
            else:
                cost = (est(OneHotCategorical(logits=logits)) * _COST).sum(-1)
            storch.add_cost(cost, name="c")
            return storch.surrogate_loss()
    return step


def _run(step, theta, pins, seed):
    torch.manual_seed(seed)
    value = step(theta, pins)
    return value.detach(), torch.autograd.grad(value, theta)[0]


def _check(got, want, who):
    """The eager result (value and gradient), or not finite where eager storch's is not."""
    if not (torch.isfinite(want[0]) and torch.isfinite(want[1]).all()):
        # torch's log p of a Bernoulli is NaN at an infinite logit; the score-function family reads it
        # eagerly too (storch.backward() raises NonFiniteCostError there): never a finite wrong number
        assert not (torch.isfinite(got[0]) and torch.isfinite(got[1]).all()), (who, got, want)
        return
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12, msg=who)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12, msg=who)


@pytest.mark.parametrize("traced_with", ["finite logits", "infinite logits"])
@pytest.mark.parametrize("name, family", CASES)
def test_infinite_logits_give_the_eager_result_or_are_refused(name, family, traced_with):
    theta = torch.tensor([[0.3, -0.2, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    pins = PINS[family]
    step = _step(_estimator(name, family), family)
    try:
        want = _run(step, theta, pins, 1)
    except storch.NonFiniteCostError:  # eagerly a NaN loss (torch's log p of a pinned bit) is refused on backward
        assert name not in EXACT, f"{name} on {family}: eagerly a NaN loss"
        want = None
    compiled = storch.compile(step, backend=None)
    try:
        if traced_with == "finite logits":
            _run(compiled, theta, torch.zeros_like(pins), 0)  # the trace; then a replay meets the infinities
        got = _run(compiled, theta, pins, 1)
    except (RuntimeError, storch.StorchError) as e:
        assert name not in EXACT, f"{name} on {family} refused under storch.compile: {e}"
        assert "eagerly" in str(e), f"{name} on {family}: unclear refusal: {e}"
        return
    assert want is not None, f"{name} on {family}: eagerly refused as not finite, compiled not refused"
    _check(got, want, f"{name} on {family}, traced with {traced_with}")


def test_expect_pinned_bits_are_exact_with_a_compiling_backend():
    # the tester's imputation step: bits pinned per data point; the exact expectation by hand
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    pin = torch.tensor([0.0, -INF, INF], dtype=torch.float64)
    est = storch.estimator("expect", plate="z")

    def step(pin):
        with storch.Graph():
            z = est(Bernoulli(logits=theta + pin))
            storch.add_cost(((z - _TARGET) ** 2).sum(-1), "c")
            return storch.surrogate_loss()

    p0 = torch.sigmoid(theta[0])
    cost = lambda z: ((torch.tensor(z, dtype=torch.float64) - _TARGET) ** 2).sum()  # noqa: E731
    exact = p0 * cost([1.0, 0.0, 1.0]) + (1 - p0) * cost([0.0, 0.0, 1.0])
    exact_grad, = torch.autograd.grad(exact, theta)
    compiled = storch.compile(step, backend="aot_eager")
    for _ in range(2):
        value = compiled(pin)
        grad, = torch.autograd.grad(value, theta)
        torch.testing.assert_close(value, exact.detach())
        torch.testing.assert_close(grad, exact_grad)


@pytest.mark.parametrize("traced_with", ["finite logits", "infinite logits"])
def test_sum_and_sample_rows_with_pinned_bits_replay_as_eagerly(traced_with):
    # the tester's rows of 8, 2 and 4 possible values (n_enumerate=2): torch's NaN log p counted the
    # possible values wrongly and drew from a NaN remainder; one row of 4: a refusal naming n_enumerate
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=2, n_samples=2)

    def step(theta, masks):
        with storch.Graph():
            z = est(Bernoulli(logits=theta + storch.denote_independent(masks, 0, "data")))
            storch.add_cost(((z - _TARGET) ** 2).sum(-1), "c")
            return storch.surrogate_loss()

    for masks in (torch.tensor([[0.0, 0.0, 0.0], [0.0, INF, -INF], [0.0, 0.0, INF]], dtype=torch.float64),
                  torch.tensor([[0.0, 0.0, -INF]], dtype=torch.float64)):
        want = [_run(step, theta, masks, seed) for seed in range(3)]
        compiled = storch.compile(step, backend=None)
        if traced_with == "finite logits":
            _run(compiled, theta, torch.zeros_like(masks), 0)
        for seed in range(3):
            _check(_run(compiled, theta, masks, seed), want[seed], f"sum_and_sample, seed {seed}")


def test_strict_support_while_traced_is_value_independent():
    # traced, a Bernoulli / Binomial given by logits always gets the strict copy (no branch on values):
    # exact log p at finite and infinite logits alike, with torch's derivatives at the finite ones
    from storch.distributions import strict_support

    logits = torch.tensor([0.3, -INF, INF], dtype=torch.float64, requires_grad=True)
    for d in (Bernoulli(logits=logits), torch.distributions.Binomial(2, logits=logits)):
        top = 1.0 if isinstance(d, Bernoulli) else 2.0
        strict = strict_support(d, traced=True)
        assert strict is not d
        lp = strict.log_prob(torch.tensor([1.0, 0.0, top], dtype=torch.float64))
        want = type(d)(**({} if top == 1.0 else {"total_count": 2}), logits=logits[:1]).log_prob(torch.ones(1, dtype=torch.float64))
        assert lp[1:].tolist() == [0.0, 0.0] and torch.allclose(lp[:1], want)
        grad, = torch.autograd.grad(lp.sum(), logits)
        assert torch.isfinite(grad).all() and grad[1:].tolist() == [0.0, 0.0]
        finite = type(d)(**({} if top == 1.0 else {"total_count": 2}), logits=logits.detach()[:1])
        assert strict_support(finite, traced=True) is not finite  # traced: whatever the values
        # eagerly: d itself when nothing changes; a Binomial always gets the copy (its log p is smooth at a logit
        # of 0, where torch's second derivative is 0: tests/all/test_distribution_zoo.py)
        assert (strict_support(finite) is finite) == isinstance(d, Bernoulli)


def _go_pinned_step(est):
    def step(theta, pin):
        with storch.Graph():
            z = est(Bernoulli(logits=theta + pin))
            storch.add_cost(((z - _TARGET4) ** 2).sum(-1), "c")
            return storch.surrogate_loss()
    return step


_TARGET4 = torch.tensor([0.2, 0.7, 0.1, 0.6], dtype=torch.float64)
_PIN4 = torch.tensor([0.0, -INF, INF, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_go_pinned_bits_compiled_equal_eager(backend):
    # go refused an infinite Bernoulli logit under storch.compile (torch's NaN log p, before strict_support's
    # traced copy); now every call, traced with finite or with infinite logits, is the eager one
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5, -0.4], dtype=torch.float64))
    step = _go_pinned_step(storch.estimator("go", plate="z", n_samples=3))
    for first in (torch.zeros_like(_PIN4), _PIN4):
        compiled = storch.compile(step, backend=backend)
        _run(compiled, theta, first, 0)
        for seed in range(1, 4):
            got, want = _run(compiled, theta, _PIN4, seed), _run(step, theta, _PIN4, seed)
            assert torch.isfinite(got[1]).all() and got[1][1:3].tolist() == [0.0, 0.0]
            torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)


def test_go_pinned_bits_compiled_gradient_is_unbiased():
    # z-test of the replayed gradient against exact enumeration of the two free bits (the pinned ones
    # are constants: their derivatives are exactly 0)
    from storch.testing import assert_unbiased

    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.5, -0.4], dtype=torch.float64))
    compiled = storch.compile(_go_pinned_step(storch.estimator("go", plate="z", n_samples=2)), backend=None)
    torch.manual_seed(0)
    grads = torch.stack([torch.autograd.grad(compiled(theta, _PIN4), theta)[0] for _ in range(800)])
    exact = 0.0
    p0, p3 = torch.sigmoid(theta[0]), torch.sigmoid(theta[3])
    for b0 in (0.0, 1.0):
        for b3 in (0.0, 1.0):
            z = torch.tensor([b0, 0.0, 1.0, b3], dtype=torch.float64)
            exact = exact + (p0 if b0 else 1 - p0) * (p3 if b3 else 1 - p3) * ((z - _TARGET4) ** 2).sum()
    exact_grad, = torch.autograd.grad(exact, theta)
    assert_unbiased(grads, exact_grad, "replayed go gradient with pinned bits")


def test_spsa_holds_infinite_bits_on_the_traced_path():
    # spsa's traced path refused a bit's infinite logit for a reason that no longer held (torch's NaN log p:
    # strict_support's traced copy is exact there); it now holds such a logit fixed as eagerly (the traced
    # path run eagerly, CompiledStep.eager, gives the eager result; coupled=False: the coupled draws are
    # refused on every traced path), and a compiled spsa step is refused for the true reason, at the trace:
    # its coupled draws cannot be replayed
    theta = torch.tensor([[0.3, -0.2, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    step = _step(storch.estimator("spsa", plate="z", n_samples=4, coupled=False), "Bernoulli")
    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        want = _run(step, theta, PINS["Bernoulli"], seed)
        assert torch.isfinite(want[1]).all() and bool((want[1][1, 1:] == 0).all())  # the held bits: exactly 0
        _check(_run(compiled.eager, theta, PINS["Bernoulli"], seed), want, f"spsa's traced path, seed {seed}")
    coupled = storch.compile(_step(storch.estimator("spsa", plate="z", n_samples=4), "Bernoulli"), backend=None)
    with pytest.raises(storch.StorchError, match="cannot replay estimator 'spsa' with coupled=True") as refused:
        coupled(theta, PINS["Bernoulli"])
    assert "infinite logit" not in str(refused.value)


@pytest.mark.parametrize("family", ["Bernoulli", "Categorical", "OneHotCategorical"])
def test_unordered_set_refusal_names_the_infinite_logit(family):
    theta = torch.tensor([[0.3, -0.2, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    compiled = storch.compile(_step(storch.estimator("unordered_set", plate="z"), family), backend=None)
    compiled(theta, torch.zeros_like(PINS[family]))
    with pytest.raises(storch.StorchError, match="an infinite logit") as refused:
        compiled(theta, PINS[family])
    assert "Run this step eagerly" in str(refused.value) and isinstance(refused.value, RuntimeError)
    # the first call (the trace, its replay check) with such a logit: the same StorchError, naming this call
    with pytest.raises(storch.StorchError, match=r"this call \(the first one too\) met a value of probability 0"):
        storch.compile(_step(storch.estimator("unordered_set", plate="z"), family), backend=None)(theta, PINS[family])


# score-function estimators read torch's log p, NaN at a bit's infinite logit: eagerly storch.backward()
# raises NonFiniteCostError; the compiled step's .backward() (its replacement: storch.backward() cannot run
# in a compiled step) backpropagated NaN silently when no estimator of the step had an update
_NAN_LOG_P = ["score", "arm", "disarm", "rebar", "relax"]


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("name", _NAN_LOG_P)
def test_compiled_backward_of_a_nan_loss_raises_as_storch_backward(name, backend):
    theta = torch.tensor([[0.3, -0.2, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    est = storch.estimator(name, plate="z", **({"update": False} if name in ("rebar", "relax") else {}))
    assert not est.has_update
    with pytest.raises(storch.NonFiniteCostError, match="Infinite logits"), storch.Graph():  # eagerly
        z = est(Bernoulli(logits=storch.denote_independent(theta + PINS["Bernoulli"], 0, "data")))
        storch.add_cost(((z - _TARGET) ** 2).sum(-1), name="c")
        storch.backward()
    compiled = storch.compile(_step(est, "Bernoulli"), backend=backend)
    compiled(theta, torch.zeros_like(PINS["Bernoulli"])).backward()  # finite: no error
    theta.grad = None
    with pytest.raises(storch.NonFiniteCostError, match="infinite logit"):
        compiled(theta, PINS["Bernoulli"]).backward()
    # torch.autograd.grad is checked too (eagerly only storch.backward() is): a NaN gradient is never silent
    with pytest.raises(storch.NonFiniteCostError, match="infinite logit"):
        _run(compiled, theta, PINS["Bernoulli"], 0)


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_compiled_finite_check_reads_the_loss_only(backend):
    """The check is the loss's: a masked logit of -inf returned beside a finite loss (for logging) was refused on
    every backward by a first version, which hooked every output (under aot_eager they share the program's node);
    a parameter returned as it is got a hook per call that was never removed (50 calls: 50 hooks, each run on
    every backward: the steps slowed down quadratically). Both found by review."""
    est = storch.estimator("reparameterization", plate="z", n_samples=4)
    theta = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([0.0, -INF, 0.0], dtype=torch.float64)

    def step(theta):
        logits = theta + mask
        z = est(torch.distributions.Normal(theta, 1.0))
        storch.add_cost((z ** 2).sum(), name="f")
        return storch.surrogate_loss(), logits, theta

    compiled = storch.compile(step, backend=backend)
    for _ in range(5):
        loss, logits, same = compiled(theta)
        assert torch.isfinite(loss) and not torch.isfinite(logits).all()
        (loss + logits[0]).backward()  # through the masked logits too: its finite entry
    assert not theta._backward_hooks  # nothing piled up on the returned input
    assert torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("backend", [None, "aot_eager"])
@pytest.mark.parametrize("form", ["plus", "reshape", "stack"])
def test_compiled_finite_check_of_a_loss_in_an_expression(backend, form):
    """What a step computes from its surrogate loss (surrogate_loss() + reg, loss.reshape(1), a stack of losses)
    is checked, not a metric returned beside it (a 0-dim -inf minimum of masked logits, which shares the loss's
    node under aot_eager); and a result used in an expression by the caller, (step(x) + reg).backward(), whose
    temporary output is freed before the pass (a weak reference missed it: found by review)."""
    theta = torch.tensor([[0.3, -0.2, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    est = storch.estimator("score", plate="z")

    def step(theta, pins, mask):
        with storch.Graph():
            z = est(Bernoulli(logits=storch.denote_independent(theta + pins, 0, "data")))
            storch.add_cost(((z - _TARGET) ** 2).sum(-1), name="c")
            loss = storch.surrogate_loss()
            out = {"plus": lambda: loss + 0.01 * theta.pow(2).sum(), "reshape": lambda: loss.reshape(1),
                   "stack": lambda: torch.stack([loss, loss.detach()])}[form]()
            return out, (theta + mask).min()

    compiled = storch.compile(step, backend=backend)
    free, masked = torch.zeros_like(PINS["Bernoulli"]), PINS["Categorical"]
    loss, metric = compiled(theta, free, free)
    loss.sum().backward()
    loss, metric = compiled(theta, free, masked)
    assert metric == -INF and torch.isfinite(loss).all()  # a metric of -inf beside a finite loss
    (loss.sum() + metric.clamp(min=0)).backward()
    with pytest.raises(storch.NonFiniteCostError, match="infinite logit"):
        compiled(theta, PINS["Bernoulli"], free)[0].sum().backward()
    with pytest.raises(storch.NonFiniteCostError, match="infinite logit"):
        (compiled(theta, PINS["Bernoulli"], free)[0].sum() + theta.sum()).backward()


def test_compiled_finite_check_hooks_only_a_non_finite_cpu_loss(monkeypatch):
    """The fast path: on the CPU a finite loss is read when the call returns and gets no hook (a Python hook on the
    loss's node cost ~10% of a replayed toy step); only a non-finite one is hooked, to raise on backward."""
    import storch.compiled.finite as finite_module  # (where _finite_on_backward looks _message up: made only for a hook)

    made = []
    message = finite_module._message
    monkeypatch.setattr(finite_module, "_message", lambda fn: made.append(fn) or message(fn))
    theta = torch.tensor([[0.3, -0.2, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    compiled = storch.compile(_step(storch.estimator("score", plate="z"), "Bernoulli"), backend=None)
    for _ in range(3):
        compiled(theta, torch.zeros_like(PINS["Bernoulli"])).backward()
    assert made == []
    loss = compiled(theta, PINS["Bernoulli"])
    assert len(made) == 1
    with pytest.raises(storch.NonFiniteCostError):
        loss.backward()
