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
    """What the registry uses of an importlib_metadata.EntryPoint: name, dist.name, value, load()."""

    def __init__(self, name: str, dist: str, load, value: str = "") -> None:
        self.name, self.dist, self._load = name, _Dist(dist), load
        self.value = value or name

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


def _source_module(name: str, source: str) -> types.ModuleType:
    """A plugin module made from source, as an import makes it (its classes' and functions' module is it)."""
    m = types.ModuleType(name)
    exec(source, vars(m))
    return m


# an author's mistakes that registered no hook, so the plugin loaded silently with no estimators (found by a
# third-party author): storch_estimators without @hookimpl, and entry points `module:attr` naming the hook
# function or an estimator class instead of the module
def _one_estimator_source(cls: str, name: str, hookimpl: bool = True) -> str:
    """A plugin module's source: one estimator class ``cls`` named ``name`` and the hook that lists it."""
    mark = "@storch.hookimpl\n" if hookimpl else ""
    return (f"import storch\nclass {cls}(storch.Estimator):\n    name = {name!r}\n"
            f"{mark}def storch_estimators():\n    return [{cls}]\n")


_NO_HOOKIMPL = _one_estimator_source("Unmarked", "unmarked_hook_estimator", hookimpl=False)
_HOOK_FUNCTION = _one_estimator_source("ByFunction", "function_entry_estimator")
_ESTIMATOR_CLASS = _one_estimator_source("ByClass", "class_entry_estimator")
# two classes of one package under one name: the last one silently won
_TWINS = """
import storch
class First(storch.Estimator):
    name = "twin_in_one_package"
class Second(storch.Estimator):
    name = "twin_in_one_package"
@storch.hookimpl
def storch_estimators():
    return [First, Second]
"""

# a third party's own implementation under a name another installed package has (storch-core's 'expect'): the
# error said "uninstall one of them", not that renaming the new class is the fix, nor which classes clashed
_RIVAL = _one_estimator_source("MyExpect", "expect")
# a class of its own name whose alias another package has (storch-core's 'enumerate', Expect's alias): the class that
# lost the alias was skipped whole, its own name and the other class's left "not installed"
_RIVAL_ALIAS = ("import storch\nclass MyEnumeration(storch.Estimator):\n    name = 'my_enumeration'\n"
                "    aliases = ('enumerate', 'my_enum')\n"
                "@storch.hookimpl\ndef storch_estimators():\n    return [MyEnumeration]\n")
# storch-core's 'expect' as a class's own name, with an alias of its own
_RIVAL_NAMED = ("import storch\nclass MyExpect(storch.Estimator):\n    name = 'expect'\n    aliases = ('my_expect',)\n"
                "@storch.hookimpl\ndef storch_estimators():\n    return [MyExpect]\n")

BROKEN = {
    "import": FakeEntryPoint("import_plugin", "storch-broken-import", _import_fails),
    "hook": FakeEntryPoint("hook_plugin", "storch-broken-hook",
                           lambda: _module("hook_plugin", lambda: _hook_raises())),
    "bare_class": FakeEntryPoint("bare_plugin", "storch-broken-bare", lambda: _module("bare_plugin", lambda: Bare)),
    "class": FakeEntryPoint("class_plugin", "storch-broken-class", lambda: _module("class_plugin", lambda: [BadClass])),
    "no_hookimpl": FakeEntryPoint("unmarked_plugin", "storch-broken-unmarked",
                                  lambda: _source_module("unmarked_mod", _NO_HOOKIMPL), "unmarked_mod"),
    "function_entry": FakeEntryPoint(
        "function_plugin", "storch-broken-function",
        lambda: _source_module("function_mod", _HOOK_FUNCTION).storch_estimators, "function_mod:storch_estimators"),
    "class_entry": FakeEntryPoint("class_entry_plugin", "storch-broken-entry-class",
                                  lambda: _source_module("class_mod", _ESTIMATOR_CLASS).ByClass, "class_mod:ByClass"),
    "twins": FakeEntryPoint("twins_plugin", "storch-broken-twins", lambda: _source_module("twins_mod", _TWINS)),
}
# what a user would ask for, and what the error must mention
LOOKUP = {
    "import": ("import_plugin", "torch_scatter"),
    "hook": ("hook_plugin", "hook exploded"),
    "bare_class": ("bare_estimator", "not a list"),
    "class": ("bad_class_estimator", "max_order=-3"),
    "no_hookimpl": ("unmarked_hook_estimator", "storch_estimators() without the @storch.hookimpl decorator"),
    "function_entry": ("function_entry_estimator", "names the function storch_estimators, not the module"),
    "class_entry": ("class_entry_estimator", "names the class ByClass, not the module"),
    "twins": ("twin_in_one_package", "claimed by two classes of plugin 'storch-broken-twins': twins_mod.First and "
                                     "twins_mod.Second"),
}
# plugins that load but take a name from another package (not broken: the other names all work)
RIVALS = {
    "rival": FakeEntryPoint("rival_plugin", "storch-rival-expect", lambda: _source_module("rival_mod", _RIVAL)),
    "rival_alias": FakeEntryPoint("rival_alias_plugin", "storch-rival-alias",
                                  lambda: _source_module("rival_alias_mod", _RIVAL_ALIAS)),
    "rival_named": FakeEntryPoint("rival_named_plugin", "storch-rival-named",
                                  lambda: _source_module("rival_named_mod", _RIVAL_NAMED)),
}


@contextmanager
def installed(*kinds: str, first: bool = False):
    """The real entry points plus the broken plugins ``kinds`` (after them, or before them with ``first``); yields
    the warnings of loading."""
    real = _registry.entry_points

    def discover(**kw):
        fake = [{**BROKEN, **RIVALS}[k] for k in kinds]
        return [*fake, *real(**kw)] if first else [*real(**kw), *fake]

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
