"""Broken plugins, discovered through fake entry points next to the real ones.

The registry reads entry points with ``importlib_metadata.entry_points``; the fixture replaces
the registry's discovery function (storch's own, not torch's) with one that adds fake entry
points whose ``load()`` imports a module that fails, or returns a module whose hook fails."""

from __future__ import annotations

import types
import warnings
from contextlib import contextmanager

import storch
from storch import registry as _registry


class _Dist:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeEntryPoint:
    """What the registry uses of an importlib_metadata.EntryPoint: name, dist.name, load()."""

    def __init__(self, name: str, dist: str, load) -> None:
        self.name, self.dist, self._load = name, _Dist(dist), load

    def load(self):
        return self._load()


def _module(name: str, hook) -> types.ModuleType:
    m = types.ModuleType(name)
    m.storch_estimators = storch.hookimpl(hook)
    return m


def _import_fails():
    raise ImportError("No module named 'torch_scatter' (plugin broken on purpose)")


def _hook_raises():
    raise RuntimeError("hook exploded (plugin broken on purpose)")


class Bare(storch.Estimator):
    """A plugin estimator returned without a list."""

    name = "bare_estimator"


class BadClass(storch.Estimator):
    """A plugin estimator with a malformed capability."""

    name = "bad_class_estimator"
    max_order = -3


BROKEN = {
    "import": FakeEntryPoint("import_plugin", "storch-broken-import", _import_fails),
    "hook": FakeEntryPoint("hook_plugin", "storch-broken-hook",
                           lambda: _module("hook_plugin", lambda: _hook_raises())),
    "bare_class": FakeEntryPoint("bare_plugin", "storch-broken-bare", lambda: _module("bare_plugin", lambda: Bare)),
    "class": FakeEntryPoint("class_plugin", "storch-broken-class", lambda: _module("class_plugin", lambda: [BadClass])),
}
# what a user would ask for, and what the error must mention
LOOKUP = {
    "import": ("import_plugin", "torch_scatter"),
    "hook": ("hook_plugin", "hook exploded"),
    "bare_class": ("bare_estimator", "not a list"),
    "class": ("bad_class_estimator", "max_order=-3"),
}


@contextmanager
def installed(*kinds: str):
    """The real entry points plus the broken plugins ``kinds``; yields the warnings of loading."""
    real = _registry.entry_points

    def discover(**kw):
        return [*real(**kw), *(BROKEN[k] for k in kinds)]

    _registry.entry_points = discover
    storch.reload_estimators()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            storch.available_estimators()
        yield [str(w.message) for w in caught if "storch" in str(w.message)]
    finally:
        _registry.entry_points = real
        storch.reload_estimators()
