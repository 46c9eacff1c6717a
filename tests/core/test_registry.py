"""The registry: discovery through entry points, aliases, errors. Runs in the `core` tox env,
where the fixture plugins in tests/fixtures are installed and no estimator family is."""

import importlib.util
import os
import warnings

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch import registry as _registry

FIXTURES_INSTALLED = importlib.util.find_spec("storch_fixture") is not None
if os.environ.get("STORCH_REQUIRE_FIXTURES") and not FIXTURES_INSTALLED:
    raise RuntimeError("the registry fixture plugins (tests/fixtures) must be installed in this environment")
# outside tox (a developer's venv without the fixtures) these tests are skipped; `tox -e core` requires them
needs_fixtures = pytest.mark.skipif(not FIXTURES_INSTALLED, reason="fixture plugins not installed: run `tox -e core`")


@pytest.fixture
def fresh_registry():
    storch.reload_estimators()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = storch.available_estimators()
    yield infos, caught
    storch.reload_estimators()


def test_builtins_are_registered_through_entry_points(fresh_registry):
    infos, _ = fresh_registry
    assert infos["expect"].package == "storch-core" and infos["expect"].family == "core"
    assert infos["reparameterization"].max_order == float("inf")
    assert not infos["expect"].biased
    assert "enumerat" in infos["expect"].description.lower()


def test_aliases_resolve():
    assert type(storch.estimator("enumerate", plate="z")) is type(storch.estimator("expect", plate="z"))
    assert storch.get_estimator_class("pathwise").name == "reparameterization"


def test_unknown_name_lists_installed_and_suggests():
    with pytest.raises(storch.UnknownEstimatorError) as e:
        storch.estimator("expcet", plate="z")
    msg = str(e.value)
    assert "'expect'" in msg and "Did you mean" in msg and "reparameterization" in msg
    assert isinstance(e.value, LookupError)


@pytest.mark.parametrize("name,dist,module", [
    ("score", "storch-estimators-score", "storch_score"),
    ("unordered_set", "storch-estimators-score", "storch_score"),
    ("vimco", "storch-estimators-score", "storch_score"),
    ("rebar", "storch-estimators-relaxed", "storch_relaxed"),
    ("mvd", "storch-estimators-mvd", "storch_mvd"),
])
def test_first_party_name_of_missing_family_says_what_to_install(name, dist, module):
    if importlib.util.find_spec(module) is not None:
        assert storch.get_estimator_class(name).name == name
        return
    with pytest.raises(storch.UnknownEstimatorError, match=f"pip install {dist}") as e:
        storch.estimator(name, plate="z")
    assert f"Did you mean '{name}'" not in str(e.value)  # never suggests the name back


@pytest.mark.parametrize("name", ["leave_one_out", "moving_average", "batch_average"])
def test_a_baseline_asked_for_as_an_estimator_says_which_estimator_takes_it(name):
    """The README's `storch.estimator("score", ..., baseline="leave_one_out")` read as an estimator name: the error
    said only "no estimator named 'leave_one_out' is installed" (no suggestion, no package), with or without the
    score family. It now names the estimator and option, and the package where the family is missing."""
    with pytest.raises(storch.UnknownEstimatorError) as e:
        storch.estimator(name, plate="z")
    msg = str(e.value)
    assert f"{name!r} is a baseline of the 'score' estimator" in msg
    assert "storch.estimator('score', plate=..." in msg and f"baseline={name!r})" in msg
    score_installed = importlib.util.find_spec("storch_score") is not None
    assert ("pip install storch-estimators-score" in msg) is not score_installed


@pytest.mark.parametrize("metadata", [False, True])
def test_no_core_estimators_says_how_to_install(monkeypatch, metadata):
    """With storch on sys.path (PYTHONPATH to the src folders) but not installed, no distribution metadata
    is found, so no entry point either: the registry was empty and `storch.estimator("expect", ...)` said only
    "Installed: none.". The error now says why and what to do (a real run: PYTHONPATH=packages/storch-core/src
    with a Python where storch is not installed gives the first message)."""
    from importlib_metadata import PackageNotFoundError

    def no_metadata(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(_registry, "entry_points", lambda **kw: [])
    if not metadata:
        monkeypatch.setattr(_registry, "distribution", no_metadata, raising=False)
    storch.reload_estimators()
    try:
        assert storch.available_estimators() == {}
        with pytest.raises(storch.UnknownEstimatorError) as e:
            storch.estimator("expect", plate="z")
        msg = str(e.value)
        assert "Installed: none." in msg and "storch-core's own estimators" in msg
        if metadata:
            assert "metadata was found" in msg and "pip install --force-reinstall storch-core" in msg
        else:
            assert "metadata of storch-core was not found" in msg and "PYTHONPATH" in msg
            assert "pip install -e packages/storch-core" in msg
    finally:
        monkeypatch.undo()
        storch.reload_estimators()
    # installed: no such hint
    with pytest.raises(storch.UnknownEstimatorError) as e:
        storch.estimator("expcet", plate="z")
    assert "storch-core's own estimators" not in str(e.value)


@pytest.mark.parametrize("hint", ["Use the estimator 'other' (storch.estimator('other', plate=...))",
                                  "Use the estimator 'other'.", "  Is it 'other'? Then use that one. "])
def test_an_unknown_option_hint_gets_storchs_punctuation_around_it(monkeypatch, hint):
    """docs/writing-an-estimator.md: the hint is one or more sentences, and storch adds the punctuation around
    it. It read "has no option 'hard'; For the hard ... temperature=...)). its options are: ..." (p-docs6)."""
    from storch.builtins.reparameterization import Reparameterization

    class Hinted(Reparameterization):
        name = "hinted"
        unknown_option_hints = {"hard": hint}

    monkeypatch.setattr(_registry, "get_estimator_class", lambda name: Hinted)
    with pytest.raises(storch.OptionError) as info:
        storch.estimator("hinted", plate="z", hard=True)
    told = hint.strip()
    told += "" if told.endswith((".", "?")) else "."
    assert str(info.value) == f"estimator 'hinted' has no option 'hard'. {told} Its options are: " + ", ".join(
        Hinted.options())
    with pytest.raises(storch.OptionError) as info:  # no hint, no close name: two sentences
        storch.estimator("hinted", plate="z", xyzzy=True)
    assert str(info.value) == "estimator 'hinted' has no option 'xyzzy'. Its options are: " + ", ".join(
        Hinted.options())
    with pytest.raises(storch.OptionError) as info:  # difflib's question
        storch.estimator("hinted", plate="z", n_sample=2)
    assert str(info.value).startswith("estimator 'hinted' has no option 'n_sample'. Did you mean 'n_samples'? Its "
                                      "options are: ")


def test_options_are_validated():
    with pytest.raises(storch.OptionError, match="n_samples"):
        storch.estimator("reparameterization", plate="z", n_samples=0)
    with pytest.raises(storch.OptionError, match="no option 'temperature'.*n_samples"):
        storch.estimator("reparameterization", plate="z", temperature=0.5)
    with pytest.raises(storch.OptionError, match="plate"):
        storch.estimator("expect", plate="")


def test_entry_points_are_scanned_once(monkeypatch):
    storch.reload_estimators()
    calls = []
    real = _registry.entry_points
    monkeypatch.setattr(_registry, "entry_points", lambda **kw: calls.append(kw) or real(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storch.available_estimators()
        storch.available_estimators()
        storch.estimator("expect", plate="z")
    assert len(calls) == 1
    storch.reload_estimators()


@needs_fixtures
def test_third_party_plugin_found_by_name_and_alias(fresh_registry):
    infos, _ = fresh_registry
    assert infos["fixture_first_order"].package == "storch-fixture-plugin"
    assert infos["fixture_first_order"].max_order == 1
    assert storch.get_estimator_class("fixture_alias").name == "fixture_first_order"


@needs_fixtures
def test_broken_plugin_warns_with_its_name_and_others_still_work(fresh_registry):
    infos, caught = fresh_registry
    msgs = [str(w.message) for w in caught]
    assert any("fixture_broken" in m and "storch-fixture-plugin" in m and "deliberately broken" in m for m in msgs)
    assert "expect" in infos and "fixture_first_order" in infos


@needs_fixtures
def test_malformed_plugin_is_a_named_error(fresh_registry):
    infos, caught = fresh_registry
    assert "fixture_malformed" not in infos
    assert any("max_order='two'" in str(w.message) for w in caught)
    with pytest.raises(storch.PluginError, match="storch-fixture-plugin.*max_order='two'"):
        storch.estimator("fixture_malformed", plate="z")


@needs_fixtures
def test_two_plugins_claiming_one_name_is_an_error_naming_both(fresh_registry):
    infos, caught = fresh_registry
    assert "fixture_twin" not in infos
    with pytest.raises(storch.PluginError) as e:
        storch.estimator("fixture_twin", plate="z")
    assert "storch-fixture-plugin" in str(e.value) and "storch-fixture-twin" in str(e.value)


@needs_fixtures
def test_order_error_names_estimator_and_plate():
    est = storch.estimator("fixture_first_order", plate="b", n_samples=2)
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        storch.surrogate_loss(order=1)
        with pytest.raises(storch.OrderError, match="'fixture_first_order' on plate 'b'.*order 2"):
            storch.surrogate_loss(order=2)


def test_order_error_of_a_biased_estimator_says_so_and_lists_installed_ones():
    """A biased third-party estimator (max_order 1: where its estimate is defined) was called 'unbiased only up
    to order 1', and the message suggested unordered_set (maybe not installed) and a docs page of storch's own
    (found by a third-party author). It now says biased, lists the installed unbiased estimators that reach
    the order for the node's distribution, and an estimator's higher_order_options where it has some."""

    class StraightThrough(storch.Estimator):
        name = "straight_through_test"
        max_order = 1
        biased = True

    class FirstOrder(storch.Estimator):
        name = "first_order_test"
        max_order = 1
        higher_order_options = "first_order_test(exact=True) is unbiased at every order"

    theta = torch.zeros(3, requires_grad=True)
    for cls, said in [(StraightThrough, r"is biased.*defined only up to order 1"),
                      (FirstOrder, r"unbiased only up to order 1.*first_order_test\(exact=True\)")]:
        with storch.Graph():
            b = cls("b")(Bernoulli(logits=theta))
            storch.add_cost(b.sum())
            with pytest.raises(storch.OrderError, match=said) as e:
                storch.surrogate_loss(order=2)
        assert "expect" in str(e.value) and "unordered_set" not in str(e.value).split("choose")[1].split(")")[0]


def test_malformed_distributions_and_state_are_named_at_registration_and_construction():
    """`distributions = Bernoulli` (a class, not a tuple) passed the registry's check and failed later
    with "TypeError: 'type' object is not iterable"; a State field without a default failed with
    "S.__init__() missing 1 required positional argument" at the first node, naming no estimator.
    Both are named errors now, at registration (_verify) and when the class is instantiated."""
    import dataclasses

    class NotTuple(storch.Estimator):
        name = "my_not_tuple"
        distributions = Bernoulli

    @dataclasses.dataclass
    class S:
        kappa: torch.Tensor  # no default

    class NoDefault(storch.Estimator):
        name = "my_no_default"
        State = S

    @dataclasses.dataclass
    class Good:
        kappa: object = None
        seen: list = dataclasses.field(default_factory=list)

    class Fine(storch.Estimator):
        name = "my_fine"
        distributions = (Bernoulli,)
        State = Good

    cases = [(NotTuple, r"distributions=<class .*Bernoulli'>; use None \(any\) or a tuple.*distributions = \(Bernoulli,\)"),
             (NoDefault, r"State=.*S whose field\(s\) kappa have no default; every field of State needs one")]
    for cls, message in cases:
        problem = _registry._verify(cls, "my-package", storch.Estimator)
        assert problem is not None and "plugin 'my-package'" in problem
        assert __import__("re").search(message, problem), problem
        with pytest.raises(storch.StorchError, match=f"estimator class .*{cls.__name__} \\({cls.name}\\) has {message}"):
            cls("z")
    assert _registry._verify(Fine, "my-package", storch.Estimator) is None
    with storch.Graph():
        z = Fine("z")(Bernoulli(logits=torch.zeros(2, requires_grad=True)))
        storch.add_cost(z.sum())
        storch.backward()


def test_the_pass_the_base_hint_for_an_independent_appears_only_where_the_estimator_takes_the_base():
    """An estimator refusing Independent(Categorical(...), 1) said "pass the Categorical itself" also where it
    refuses the bare Categorical too (arm and disarm take Bernoulli only: found by porting). The hint is shared
    by all estimators; it now appears only where the estimator supports the base distribution."""
    from torch.distributions import Categorical, Independent

    class BernoulliOnly(storch.Estimator):  # as arm: a Categorical is refused bare or wrapped
        name = "bernoulli_only_test"
        distributions = (Bernoulli,)
        requires_enumerate_support = True

    class Enumerating(storch.Estimator):  # as expect: it takes the Categorical, not the Independent
        name = "enumerating_test"
        requires_enumerate_support = True

    wrapped = Independent(Categorical(logits=torch.zeros(2, 3, requires_grad=True)), 1)
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError) as e:
        BernoulliOnly("x")(wrapped)
    msg = str(e.value)
    assert "does not support Independent; it needs one of Bernoulli" in msg, msg
    assert "pass the Categorical itself" not in msg and "wrapper is not needed" not in msg, msg
    with storch.Graph(), pytest.raises(storch.UnsupportedDistributionError, match="pass the Categorical itself"):
        Enumerating("x")(wrapped)
    with storch.Graph():  # the advice holds: the bare Categorical is accepted
        Enumerating("x")(wrapped.base_dist)


def test_order_error_names_a_subclass_that_inherits_its_name():
    """A subclass that lowers max_order but keeps its parent's name (registered or not) is named by its class in
    the OrderError, not by the name it inherits (the parent is unbiased at that order; p-lola, p-ext3)."""
    from torch.distributions import Normal

    Rep = storch.get_estimator_class("reparameterization")

    class Rep1(Rep):
        max_order = 1

    class MyRep(Rep):
        name = "my_rep"

    class MyRep1(MyRep):
        max_order = 1

    mu = torch.tensor(0.3, requires_grad=True)
    for cls, shown in ((Rep1, "Rep1 (a subclass of 'reparameterization')"), (MyRep1, "MyRep1 (a subclass of 'my_rep')"),
                       (MyRep, None)):
        with storch.Graph():
            x = cls(plate="x", n_samples=2)(Normal(mu, 1.0))
            storch.add_cost(x ** 3, name="c")
            if shown is None:
                storch.surrogate_loss(order=2)  # (unbiased at order 2: no refusal)
                continue
            with pytest.raises(storch.OrderError) as info:
                storch.surrogate_loss(order=2)
            assert f"estimator {shown} on plate 'x'" in str(info.value)


def _core_only(monkeypatch):
    """The registry as a core-only install sees it (whatever families this environment has)."""
    reg = _registry._get()
    core = {k: c for k, c in reg.classes.items() if _registry.FIRST_PARTY.get(k) == "storch-core"}
    monkeypatch.setattr(reg, "classes", core)
    monkeypatch.setattr(reg, "aliases", {a: n for a, n in reg.aliases.items() if n in core})


def _unknown(name: str) -> str:
    with pytest.raises(storch.UnknownEstimatorError) as e:
        storch.estimator(name, plate="z")
    return str(e.value)


def test_names_of_families_not_installed_are_not_suggested_as_installed(monkeypatch):
    # found by a tester (p-api) with core only: "relax" said "Did you mean 'lax' or 'rebar'?" (neither installed;
    # relax is the right name of a family not installed), "scroe" suggested 'score' without the package to install
    _core_only(monkeypatch)
    msg = _unknown("relax")
    assert "Did you mean" not in msg and "'relax' is provided by storch-estimators-relaxed: `pip install " \
        "storch-estimators-relaxed`" in msg
    assert _unknown("scroe").count("Did you mean 'score' (not installed: `pip install storch-estimators-score`)?") == 1
    assert "Did you mean 'reparameterization'?" in _unknown("reparameterisation")  # an installed name as it is
    assert "Did you mean" not in _unknown("xyzzy")
