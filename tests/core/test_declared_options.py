"""An estimator's declared options, ``state_options()`` and ``evolution_options()`` (public hooks of the estimator
protocol): what the ranks' check before each storch collective compares (tests/reliability/test_ddp_declared_options.py
runs it in two processes). Here, in one process: what the check's description of a rank holds, the defaults, the
private names first-party estimators used before the hooks were public, and a bad declaration."""

from __future__ import annotations

import pytest

import storch
from storch._ranks import _collective


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


def test_a_declaration_that_is_not_a_dict_of_names_is_refused_naming_the_hook():
    with pytest.raises(storch.StorchError, match=r"Bad\.evolution_options\(\) must return a dict from option names"):
        _collective(Bad("z"), "averaging x")
