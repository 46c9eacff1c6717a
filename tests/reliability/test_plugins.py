"""A broken plugin (import, hook, classes) is skipped with one warning naming its distribution
and the reason; everything else works; looking up its names says it failed to load and why."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli

import storch

from _plugins import BROKEN, LOOKUP, installed


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_plugin_is_skipped_with_one_warning(kind):
    with installed(kind) as messages:
        dist = BROKEN[kind].dist.name
        mine = [m for m in messages if dist in m]
        assert len(mine) == 1, messages
        assert LOOKUP[kind][1] in mine[0]
        # everything else works: the built-ins (and installed families) are there and usable
        names = storch.available_estimators()
        assert "expect" in names and "reparameterization" in names
        est = storch.estimator("expect", plate="z")
        with storch.Graph():
            z = est(Bernoulli(logits=torch.zeros(2)))
            storch.add_cost(z.sum())
            assert storch.surrogate_loss().item() == pytest.approx(1.0)
        if "score" in names:
            storch.estimator("score", plate="z")


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_looking_up_a_name_of_a_broken_plugin_says_it_failed_and_why(kind):
    name, reason = LOOKUP[kind]
    with installed(kind):
        with pytest.raises(storch.PluginError) as e:
            storch.estimator(name, plate="z")
    msg = str(e.value)
    assert reason in msg and BROKEN[kind].dist.name in msg
    assert "Did you mean" not in msg


def test_unknown_name_lists_plugins_that_failed():
    with installed("import", "hook"):
        with pytest.raises(storch.UnknownEstimatorError) as e:
            storch.estimator("some_estimator_of_a_broken_plugin", plate="z")
    msg = str(e.value)
    assert "failed to load" in msg and "storch-broken-import" in msg and "hook exploded" in msg


def test_all_broken_plugins_at_once():
    with installed(*BROKEN) as messages:
        for ep in BROKEN.values():  # one warning per broken plugin (other installed plugins may warn too)
            assert sum(ep.dist.name in m for m in messages) == 1
        assert "expect" in storch.available_estimators()


@pytest.mark.parametrize("kind,instead", [("function_entry", "`function_plugin = function_mod`"),
                                          ("class_entry", "`class_entry_plugin = class_mod`")])
def test_an_entry_point_naming_the_hook_or_a_class_says_what_to_write(kind, instead):
    """`name = module:storch_estimators` (or `module:MyEstimator`) registered the function (the class) with pluggy,
    which finds hooks among the attributes of what it registers: no hook, no estimators, no warning. The
    warning now quotes the entry point and the line to write instead (the module)."""
    with installed(kind) as messages:
        mine = [m for m in messages if BROKEN[kind].dist.name in m]
    assert len(mine) == 1 and BROKEN[kind].value in mine[0] and instead in mine[0], messages


def test_two_classes_of_one_package_under_one_name_leave_the_name_unusable():
    """Neither class wins silently: the name is refused as a name claimed by two plugins is."""
    with installed("twins"):
        assert "twin_in_one_package" not in storch.available_estimators()
        with pytest.raises(storch.PluginError, match="give each estimator class its own `name`"):
            storch.get_estimator_class("twin_in_one_package")


def test_a_name_claimed_by_two_packages_says_to_rename_and_names_both_classes():
    """A third party's own 'expect' (or 'vimco' next to storch-estimators-score) took neither: the error said
    only "uninstall one of them", which for a first-party family means losing its other estimators; it now names
    both classes, says that installing does not override a name, and that the classes work constructed directly."""
    with installed("rival") as messages:
        assert any("storch-rival-expect" in m for m in messages), messages
        with pytest.raises(storch.PluginError) as e:
            storch.estimator("expect", plate="z")
        assert "reparameterization" in storch.available_estimators()  # the package's other names are unaffected
    msg = str(e.value)
    assert ("'storch-core' (storch.builtins.expect.Expect) and 'storch-rival-expect' (rival_mod.MyExpect)" in msg
            and "give one class another `name`" in msg and "`MyExpect(plate=...)`" in msg), msg


def test_a_misspelling_of_a_name_two_packages_claim_does_not_offer_it_as_usable():
    """"Did you mean 'expect'?" and "Installed: ..., expect, ..." offered a name that raises PluginError, while
    available_estimators() left it out."""
    with installed("rival"):
        with pytest.raises(storch.UnknownEstimatorError) as e:
            storch.estimator("expectt", plate="z")
    msg = str(e.value)
    assert "'expect' (claimed by two packages, so unusable" in msg, msg
    assert "expect" not in msg.split("Installed:")[1].replace("expectt", ""), msg


@pytest.mark.parametrize("first", [False, True])
def test_a_clash_on_one_alias_leaves_both_classes_their_other_names(first):
    """A third party's class named 'my_enumeration' with the alias 'enumerate' (storch-core's Expect's): only
    'enumerate' is unusable. The class that lost it was skipped whole, so which class lost every name depended on
    the order of the entry points: loaded after storch-core, 'my_enumeration' and 'my_enum' were "not installed";
    loaded before it, 'expect' was, with storch-core installed."""
    with installed("rival_alias", first=first) as messages:
        assert any("'enumerate' is claimed by two plugins" in m for m in messages), messages
        names = storch.available_estimators()
        assert "expect" in names and "my_enumeration" in names and "enumerate" not in names
        assert storch.get_estimator_class("expect").__module__ == "storch.builtins.expect"
        assert storch.get_estimator_class("my_enumeration").__name__ == "MyEnumeration"
        assert storch.get_estimator_class("my_enum").__name__ == "MyEnumeration"
        with pytest.raises(storch.PluginError, match="'enumerate' is claimed by two plugins"):
            storch.get_estimator_class("enumerate")
        with pytest.raises(storch.PluginError) as e:
            storch.get_estimator_class("enumerate")
    # both classes named, whichever loaded first (it named only the second: storch-core's Expect where the third
    # party's loaded first)
    assert "`Expect(plate=...)`" in str(e.value) and "`MyEnumeration(plate=...)`" in str(e.value), str(e.value)


def test_the_alias_of_a_class_whose_name_is_claimed_twice_still_works():
    """As the aliases of the class that loaded first do (the name is that class's key): it said "no estimator named
    'my_expect' is installed"."""
    with installed("rival_named"):
        assert storch.get_estimator_class("my_expect").__module__ == "rival_named_mod"
        assert storch.get_estimator_class("enumerate").__module__ == "storch.builtins.expect"  # (Expect's alias)
        with pytest.raises(storch.PluginError, match="'expect' is claimed by two plugins"):
            storch.get_estimator_class("expect")
