"""An estimator's declared options, ``state_options()`` and ``evolution_options()`` (public hooks of the estimator
protocol): what the ranks' check before each storch collective compares (tests/reliability/test_ddp_declared_options.py
runs it in two processes). Here, in one process: what the check's description of a rank holds, the defaults, the
private names first-party estimators used before the hooks were public, and a bad declaration."""

from __future__ import annotations

import pytest

import storch
from storch.distributed.ranks import _collective


class Declares(storch.Estimator):
    def __init__(self, plate: str, decay: float = 0.9) -> None:
        super().__init__(plate)
        self.decay = decay

    def state_options(self) -> dict:
        return {"kind": "running"}

    def evolution_options(self) -> dict:
        return {"decay": self.decay, "update": True}


class Legacy(storch.Estimator):
    """Declared under the private names of before (kept: a third party may have copied them)."""

    def _state_options(self) -> dict:
        return {"kind": "legacy"}

    def _evolution_options(self) -> dict:
        return {"update": False}


class LegacyOverride(Declares):
    """A subclass of an estimator with the public hooks (as a third party's subclass of ``Score`` is), overriding
    them under the private names of before (``Score`` itself had them until the hooks were public)."""

    def _state_options(self) -> dict:
        return {"kind": "mine"}

    def _evolution_options(self) -> dict:
        return {"update": False}


class OptionsMixin:
    """A mixin that is no estimator, declaring options under the private names of before."""

    def _state_options(self) -> dict:
        return {"kind": "mixed"}

    def _evolution_options(self) -> dict:
        return {"update": False}


class Mixed(OptionsMixin, storch.Estimator):
    pass


class MixedOverride(OptionsMixin, Declares):
    pass


class Both(Legacy):
    """The public hooks and the private names in one class: the public hooks are read."""

    def _evolution_options(self) -> dict:
        return {"update": False}

    def evolution_options(self) -> dict:
        return {"update": True}


class Bad(storch.Estimator):
    def evolution_options(self):
        return [("decay", 0.9)]


def test_the_check_names_the_declared_options_of_a_third_party_estimator():
    assert _collective(Declares("z", decay=0.5), "averaging x") == "Declares(decay=0.5, kind='running', update=True) averaging x"
    assert (storch.Estimator("z").state_options(), storch.Estimator("z").evolution_options()) == ({}, {})
    assert _collective(storch.Estimator("z"), "averaging x") == "Estimator() averaging x"


def test_the_private_names_of_before_are_still_read():
    est = Legacy("z")
    assert (est.state_options(), est.evolution_options()) == ({"kind": "legacy"}, {"update": False})
    assert _collective(est, "skipping") == "Legacy(kind='legacy', update=False) skipping"


def test_the_private_names_of_before_override_a_base_classs_public_hooks():
    """They were read only through Estimator's own defaults, which a base class's public hooks replace: the check
    said 'LegacyOverride(decay=0.9, kind='running', update=True)' for an instance that never updates (a rank with
    it would leave another's update waiting in its collective)."""
    est = LegacyOverride("z")
    assert (est.state_options(), est.evolution_options()) == ({"kind": "mine"}, {"update": False})
    assert _collective(est, "skipping") == "LegacyOverride(kind='mine', update=False) skipping"
    assert _collective(Declares("z"), "x") == "Declares(decay=0.9, kind='running', update=True) x"  # (the base's own)


def test_a_declaration_that_is_not_a_dict_of_names_is_refused_naming_the_hook():
    with pytest.raises(storch.StorchError, match=r"Bad\.evolution_options\(\) must return a dict from option names"):
        _collective(Bad("z"), "averaging x")


def test_the_private_names_of_before_are_read_from_a_mixin_and_the_public_hook_wins_in_one_class():
    """A mixin that is no estimator defines them (its __init_subclass__ is not Estimator's): they were read before the
    hooks' defaults were emptied, then silently not ({} for both, a rank with update=False unchecked); before a base
    class's public hooks too. A class defining both names keeps its public hook; subclasses inherit what is read."""
    for cls in (Mixed, MixedOverride):
        est = cls("z")
        assert (est.state_options(), est.evolution_options()) == ({"kind": "mixed"}, {"update": False}), cls
    assert Both("z").evolution_options() == {"update": True}
    assert Both("z").state_options() == {"kind": "legacy"}  # (Legacy's private name, inherited)
