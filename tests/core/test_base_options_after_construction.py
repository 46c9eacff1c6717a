"""Options of the base class set on a constructed estimator, ``fixed_options`` naming any attribute, and the
NonFiniteCostError that names a non-finite baseline or control variate (found by a third-party author)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.extending import leave_one_out, options


class Pairs(storch.Estimator):
    """Score function on n_pairs pairs of i.i.d. samples: its constructor takes n_pairs and passes 2 * n_pairs as
    the base's n_samples (a third-party pattern), and checks n_samples against it in check_option."""

    name = "test_pairs"

    def __init__(self, plate: str, n_pairs: int = 2) -> None:
        self.n_pairs = options.integer(self.name, "n_pairs", n_pairs, minimum=1)
        super().__init__(plate, 2 * self.n_pairs)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "n_samples":
            value = super().check_option(name, value)
            if value != 2 * self.n_pairs:
                raise storch.OptionError(f"{self.name}: n_samples is 2 * n_pairs = {2 * self.n_pairs}")
            return value
        return super().check_option(name, value)


class FixedPairs(Pairs):
    """The same, with n_samples (not a constructor parameter) and an attribute listed in fixed_options."""

    name = None
    fixed_options = {"n_samples": "it is set from n_pairs", "table": "the table is built at construction"}

    def __init__(self, plate: str, n_pairs: int = 2) -> None:
        super().__init__(plate, n_pairs)
        self.table = torch.arange(n_pairs)


def _plate_size(est) -> int:
    with storch.Graph():
        return est(Bernoulli(logits=torch.zeros(2))).plates[0].size


def test_n_samples_of_an_estimator_whose_constructor_computes_it_goes_through_check_option():
    # found by a third-party author: est.n_samples = 5 on an estimator whose constructor takes n_pairs was accepted
    # and ignored by nothing (only the constructor's parameter names were checked): check_option never ran
    est = Pairs("z", n_pairs=2)
    with pytest.raises(storch.OptionError, match=r"n_samples is 2 \* n_pairs = 4"):
        est.n_samples = 5
    assert est.n_samples == 4 and _plate_size(est) == 4
    est.n_samples = 4  # the value it has: accepted
    with pytest.raises(storch.OptionError, match="an int >= 1"):
        est.n_samples = 0  # the base's own check, for a subclass that does not check n_samples itself
    with pytest.raises(storch.OptionError, match="plate must be a non-empty string"):
        est.plate = ""


def test_fixed_options_apply_to_any_attribute_name():
    # found by a third-party author: "n_samples" in fixed_options changed nothing (only constructor parameters
    # were looked up in it)
    est = FixedPairs("z", n_pairs=2)
    with pytest.raises(storch.OptionError, match=r"est\.n_samples = 4 after construction is not supported: it is "
                                                 r"set from n_pairs\. Create a new estimator instead: "
                                                 r"FixedPairs\(plate='z', \.\.\.\) \(its constructor sets "
                                                 r"`n_samples` from its options: n_pairs\)"):
        est.n_samples = 4
    with pytest.raises(storch.OptionError, match="the table is built at construction"):
        est.table = torch.arange(5)
    assert est.n_samples == 4 and est.table.tolist() == [0, 1]


def test_expect_refuses_n_samples_it_would_ignore():
    est = storch.estimator("expect", plate="z")
    with pytest.raises(storch.OptionError, match=r"expect enumerates every value.*storch\.estimator\('expect'"):
        est.n_samples = 3
    assert _plate_size(est) == 4  # (two Bernoullis: every joint value)


class LeaveOneOutChecked(storch.Estimator):
    """docs/writing-an-estimator.md's LeaveOneOut: n_samples >= 2 checked in check_option."""

    name = "test_leave_one_out_checked"

    def __init__(self, plate: str, n_samples: int = 4) -> None:
        super().__init__(plate, n_samples)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "n_samples":
            return options.integer(self.name, "n_samples", value, minimum=2)
        return super().check_option(name, value)

    def baseline(self, node, cost):
        return leave_one_out(cost, node.n)


class LeaveOneOutUnchecked(storch.Estimator):
    """The same without the check: at n_samples = 1 the baseline is 0 / 0."""

    name = "test_leave_one_out_unchecked"

    def baseline(self, node, cost):
        return leave_one_out(cost, node.n)


class NanControlVariate(storch.Estimator):
    """A control variate that is NaN (for the message)."""

    name = "test_nan_control_variate"

    def control_variate(self, node, cost):
        return cost.tensor * float("nan")


def _backward(est, theta):
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        storch.add_cost(z.sum(), name="f")
        storch.backward()


def test_the_guides_leave_one_out_refuses_one_sample_set_after_construction():
    with pytest.raises(storch.OptionError, match="n_samples"):
        LeaveOneOutChecked("z", n_samples=1)
    est = LeaveOneOutChecked("z", n_samples=3)
    with pytest.raises(storch.OptionError, match="n_samples"):
        est.n_samples = 1
    assert est.n_samples == 3


def test_a_non_finite_baseline_or_control_variate_is_named():
    # found by a third-party author: a NaN leave-one-out baseline (n_samples = 1) was reported as "the weights or
    # gradient-function values of an estimator are" not finite
    theta = torch.zeros(3, requires_grad=True)
    with pytest.raises(storch.NonFiniteCostError,
                       match=r"NaN or inf in the baseline \(`baseline`\) for cost 'f' of estimator "
                             r"'test_leave_one_out_unchecked' \(plate 'z'\)"):
        _backward(LeaveOneOutUnchecked("z", n_samples=1), theta)
    with pytest.raises(storch.NonFiniteCostError,
                       match=r"NaN or inf in the control variate \(`control_variate`\) for cost 'f' of estimator "
                             r"'test_nan_control_variate'"):
        _backward(NanControlVariate("z", n_samples=2), theta)
    assert theta.grad is None  # nothing was backpropagated
    _backward(LeaveOneOutUnchecked("z", n_samples=2), theta)  # finite: no error
    assert theta.grad is not None and bool(torch.isfinite(theta.grad).all())


def test_a_non_finite_log_prob_keeps_the_general_message():
    theta = torch.tensor([float("inf"), 0.0], requires_grad=True)  # an infinite logit: log p = NaN at x = 1
    with pytest.raises(storch.NonFiniteCostError, match="weights or gradient-function values.*Infinite logits"):
        _backward(LeaveOneOutUnchecked("z", n_samples=2), theta)


class Tempered(storch.Estimator):
    """An estimator with a ``temperature`` option that sets an attribute of its own after construction."""

    name = None

    def __init__(self, plate: str, n_samples: int = 1, temperature: float = 1.0) -> None:
        super().__init__(plate, n_samples)
        self.temperature = temperature

    def note(self) -> None:
        self.calls_seen = 1  # a public attribute of its own, set after construction, far from every option


def test_a_misspelled_option_set_after_construction_is_refused_with_did_you_mean():
    # found by a tester (p-api): est.temprature = 0.1 and est.n_sample = 3 were accepted and silently ignored
    est = Tempered("z", temperature=0.5)
    with pytest.raises(storch.OptionError, match=r"'temprature'.*Did you mean 'temperature'\?"):
        est.temprature = 0.1
    with pytest.raises(storch.OptionError, match=r"Did you mean 'n_samples'\?"):
        est.n_sample = 3
    assert not hasattr(est, "temprature") and est.temperature == 0.5 and est.n_samples == 1
    est.temperature = 0.1  # the option itself, an attribute far from the options, a private one: accepted
    est.note()
    est.my_counter = 3
    est._temprature = 2.0
    assert est.temperature == 0.1 and est.calls_seen == 1 and est.my_counter == 3
    est.my_counter = 4  # an existing attribute
    assert est.my_counter == 4


def test_direct_construction_with_a_misspelled_option_is_an_option_error():
    # found by a tester (p-api): Score('z', n_samplez=3) raised Python's bare TypeError, not the registry's words
    with pytest.raises(storch.OptionError, match=r"Tempered has no option 'n_samplez'\. Did you mean 'n_samples'\? "
                                                 r"Its options are: n_samples, temperature"):
        Tempered("z", n_samplez=3)
    with pytest.raises(storch.OptionError, match=r"Pairs \(estimator 'test_pairs'\) has no option 'n_pair'\. Did you "
                                                 "mean 'n_pairs'"):
        Pairs("z", n_pair=3)
    with pytest.raises(TypeError):  # (not an option: a missing argument stays Python's error)
        Tempered()  # type: ignore[call-arg]


class Forwarding(Tempered):
    """A third-party subclass whose constructor forwards ``**kwargs`` to its base's, with an option of its own
    (``foo``) and one it pops from ``kwargs`` before forwarding the rest (``special``)."""

    name = "test_forwarding"

    def __init__(self, plate: str, *, foo: int = 1, **kwargs: Any) -> None:
        self.special = kwargs.pop("special", 0)
        super().__init__(plate, **kwargs)
        self.foo = foo


class Twice(Forwarding):
    name = None

    def __init__(self, plate: str, **kwargs: Any) -> None:
        super().__init__(plate, **kwargs)


class MisspelledBase(Tempered):
    name = None

    def __init__(self, plate: str, **kwargs: Any) -> None:
        super().__init__(plate, **{"temprature": 1.0}, **kwargs)  # the author's misspelling, not the user's


class FailingBody(Tempered):
    name = None

    def __init__(self, plate: str, **kwargs: Any) -> None:
        super().__init__(plate, **kwargs)
        len(self.temperature)  # type: ignore[arg-type]  # a TypeError of its own, after the base's constructor


def test_a_subclass_forwarding_kwargs_refuses_a_misspelled_option_as_its_base_does(monkeypatch):
    # left by review: Forwarding("z", n_samplez=3) raised the base's bare TypeError ("Tempered.__init__() got an
    # unexpected keyword argument"), and storch.estimator refused even n_samples (options() listed only foo)
    # options() lists the constructor's own options only (review r-28: a subclass may set a base's option itself);
    # the base's are offered by "Did you mean" and accepted by storch.estimator
    assert Forwarding.options() == ["foo"]
    with pytest.raises(storch.OptionError, match=r"^Forwarding \(estimator 'test_forwarding'\) has no option "
                                                 r"'n_samplez'\. Did you mean 'n_samples'\? Its options are: foo, "
                                                 r"n_samples, temperature$"):
        Forwarding("z", n_samplez=3)
    with pytest.raises(storch.OptionError, match=r"^Twice has no option 'temprature'\. Did you mean 'temperature'"):
        Twice("z", temprature=0.5)
    est = Forwarding("z", n_samples=3, temperature=0.5, foo=2, special=7)
    assert (est.n_samples, est.temperature, est.foo, est.special) == (3, 0.5, 2, 7)
    with pytest.raises(storch.OptionError, match=r"Did you mean 'temperature'\?"):
        est.temprature = 0.1  # a base's option misspelled after construction: refused as for the base
    monkeypatch.setattr(storch.registry, "get_estimator_class", lambda name: Forwarding)
    est = storch.estimator("test_forwarding", plate="z", n_samples=3, special=7)
    assert (est.n_samples, est.special) == (3, 7)
    with pytest.raises(storch.OptionError, match=r"has no option 'n_samplez'\. Did you mean 'n_samples'\?"):
        storch.estimator("test_forwarding", plate="z", n_samplez=3)


def test_a_subclass_forwarding_kwargs_keeps_typeerrors_that_are_not_the_users_unknown_option():
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'") as e:
        MisspelledBase("z", n_samples=2)  # the subclass's own call to its base: not an option the user gave
    assert not isinstance(e.value, storch.OptionError)
    with pytest.raises(TypeError, match="has no len") as e:
        FailingBody("z", n_samples=2)
    assert not isinstance(e.value, storch.OptionError)
    with pytest.raises(storch.OptionError, match="FailingBody has no option 'n_sample'"):
        FailingBody("z", n_sample=2)


def test_the_base_attributes_and_compiles_options_are_typed():
    # found by a tester (p-api) with a strict type checker: n_samples and skipped_updates were Any (through the
    # TYPE_CHECKING __getattr__), storch.compile's options a bare dict ("partially unknown" in strict user code)
    import inspect

    assert storch.Estimator.__annotations__["n_samples"] == "int"
    assert storch.Estimator.__annotations__["skipped_updates"] == "int"
    assert storch.Estimator.__annotations__["plate"] == "str"
    assert inspect.signature(storch.compile).parameters["options"].annotation == "Optional[dict[str, Any]]"
    est = Tempered("z", n_samples=3)
    assert type(est.n_samples) is int and est.n_samples == 3 and est.skipped_updates == 0


class Author(storch.Estimator):
    """A third-party estimator that keeps values of its own under names close to its options, set in its own
    methods after construction (review r-26 D4: `self.samples` in update_parameters, `self.n_sample` in a helper,
    a child module `self.baselines` attached lazily)."""

    name = "test_author_attrs"
    has_update = True

    def __init__(self, plate: str, n_samples: int = 2) -> None:
        super().__init__(plate, n_samples)

    def update_parameters(self, nodes, loss) -> None:
        self.samples = [n.n for n in nodes]
        self._helper()

    def _helper(self) -> None:
        self.n_sample = 1
        self.baselines = torch.nn.Linear(1, 1)


def test_an_estimators_own_methods_may_set_attributes_close_to_its_options():
    est = Author("z")
    est.update_parameters([], None)
    assert est.samples == [] and est.n_sample == 1 and isinstance(est.baselines, torch.nn.Linear)
    with pytest.raises(storch.OptionError, match="Did you mean 'n_samples'") as e:
        Author("z").n_sample = 3  # the same name set from outside: a misspelled option
    assert "set it in one of its methods" in str(e.value)
