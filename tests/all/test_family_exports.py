"""Every estimator family's package lists its plugin hook in ``__all__`` as the others do, and every name in
``__all__`` resolves (left by review: ``storch_score`` alone did not list ``storch_estimators``)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest

# each family's distribution and the package a user imports it by
FAMILIES = {"storch-core": "storch.builtins", "storch-estimators-score": "storch_score",
            "storch-estimators-relaxed": "storch_relaxed", "storch-estimators-mvd": "storch_mvd",
            "storch-estimators-example": "storch_example"}


@pytest.mark.parametrize("dist", sorted(FAMILIES))
def test_a_familys_all_names_its_hook_and_resolves(dist):
    package = pytest.importorskip(FAMILIES[dist])
    names = package.__all__
    assert "storch_estimators" in names
    missing = [name for name in names if not hasattr(package, name)]
    assert missing == [], f"{FAMILIES[dist]}.__all__ names {missing}, which it does not define"
    assert len(set(names)) == len(names)
    # the hook __all__ names is the one the family's entry point registers
    (ep,) = [ep for ep in entry_points(group="storch.estimators") if ep.dist is not None and ep.dist.name == dist]
    assert importlib.import_module(ep.module).storch_estimators is package.storch_estimators
