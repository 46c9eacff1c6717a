"""The estimator registry: pluggy hooks discovered through the ``storch.estimators`` entry points.

Each entry point's value is a module that implements the hook ``storch_estimators()`` (a function
marked ``@storch.hookimpl``) and returns its estimator classes. Core registers its built-ins the same
way. Plugins are loaded once, on first use. A plugin whose import, hook or classes fail is skipped
with one warning that names its distribution and the reason; every other plugin works, and looking up
a name of the broken plugin raises a :class:`PluginError` that says it failed to load and why. A plugin
that registers no hook at all (``storch_estimators`` without ``@storch.hookimpl``, or an entry point
``module:attr`` that names the function or a class instead of the module: pluggy registers the object
the entry point names and looks for marked functions among its attributes, as for pytest's ``pytest11``
plugins) is such a failure too, and so is an estimator name claimed twice, by two plugins or by two
classes of one.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import threading
import types
import warnings
from typing import Any, Iterator, Optional

import pluggy
from importlib_metadata import PackageNotFoundError, distribution, entry_points

from .errors import OptionError, PluginError, UnknownEstimatorError
from .estimators.base import Estimator
from .estimators.capabilities import capability_problem
from .estimators.construction import takes_more_options, unknown_option_message
from .estimators.catalog import EstimatorInfo, set_source, supporting_estimators
from .graph import current_graph
from .hookspecs import HookSpecs, hookimpl, hookspec

__all__ = [
    "hookimpl", "hookspec", "EstimatorInfo", "available_estimators", "estimator", "get_estimator_class",
    "reload_estimators", "supporting_estimators", "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "storch.estimators"

# first-party names -> the distribution to install, for a helpful error when a family is missing
FIRST_PARTY = {
    **dict.fromkeys(["expect", "enumerate", "reparameterization", "pathwise"], "storch-core"),
    **dict.fromkeys(["score", "reinforce", "importance", "sum_and_sample", "mapo", "unordered_set",
                     "vimco"],
                    "storch-estimators-score"),
    **dict.fromkeys(["gumbel_softmax", "gumbel_straight_through", "straight_through", "lax", "relax", "rebar",
                     "arm", "disarm", "go"], "storch-estimators-relaxed"),
    **dict.fromkeys(["spsa", "mvd"], "storch-estimators-mvd"),
}
# baselines of the score estimator, asked for as estimator names (the README's `baseline="leave_one_out"` read as
# an estimator): the error says which estimator and option take them, not only "no estimator named ..."
SCORE_BASELINES = ("leave_one_out", "batch_average", "moving_average", "greedy", "learned")


class _Registry:
    def __init__(self) -> None:
        self.classes: dict[str, type] = {}
        self.infos: dict[str, EstimatorInfo] = {}
        self.aliases: dict[str, str] = {}
        self.failed: dict[str, str] = {}  # distribution -> why (one of) its plugins failed
        self.failed_plugins: dict[str, tuple[str, str]] = {}  # entry point -> (distribution, why)
        self.failed_names: dict[str, tuple[str, str]] = {}  # estimator name -> (distribution, why)
        self.conflicts: dict[str, str] = {}  # name -> why it is unusable (claimed twice)
        self.unnamed: dict[str, type] = {}  # alias -> its class, whose own name is claimed twice (not in classes)
        self.invalid: dict[str, str] = {}

    def load(self) -> None:
        pm = pluggy.PluginManager("storch")
        pm.add_hookspecs(HookSpecs)
        owners: dict[str, tuple[str, type]] = {}  # name or alias -> (distribution, class)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if getattr(ep, "dist", None) is not None else "<unknown distribution>"
            # a broken plugin (import, hook or classes) is skipped with one warning; the others work
            try:
                classes = self._load_plugin(pm, ep, dist)
            except Exception as e:  # noqa: BLE001  (any failure of third-party code)
                self._fail(ep.name, dist, e)
                continue
            self._add_classes(classes, ep.name, dist, owners)

    def _load_plugin(self, pm: pluggy.PluginManager, ep, dist: str) -> list:
        """Import the entry point's module, register it, call its hook; the classes it returns."""
        plugin = f"{dist}:{ep.name}"
        stage = "import"
        try:
            module = ep.load()
            stage = "registration"
            pm.register(module, name=plugin)
            out = []
            impls = [impl for impl in pm.hook.storch_estimators.get_hookimpls() if impl.plugin_name == plugin]
            if not impls:
                # a plugin that provides nothing would load silently with no estimators: say what to write
                problem = _no_hook_problem(ep, module)
                for name in _estimator_names(module):  # a lookup of its estimators says why they are missing
                    self.failed_names.setdefault(name, (dist, problem))
                raise PluginError(problem)
            for impl in impls:
                stage = "hook storch_estimators()"
                classes = impl.function()
                if classes is None:
                    continue
                if isinstance(classes, (type, str)) or not hasattr(classes, "__iter__"):
                    name = getattr(classes, "name", None)
                    problem = (f"its storch_estimators() hook returned {classes!r}, not a list of estimator "
                               f"classes; return a list, e.g. `return [{getattr(classes, '__name__', 'MyEstimator')}]`")
                    if isinstance(name, str) and name:
                        self.failed_names[name] = (dist, problem)
                    raise PluginError(problem)
                out.extend(classes)
            return out
        except PluginError:
            raise
        except Exception as e:
            raise PluginError(f"{stage} failed: {type(e).__name__}: {e}") from e

    def _fail(self, ep_name: str, dist: str, error: Exception) -> None:
        reason = str(error)
        self.failed[dist] = reason
        self.failed_plugins[ep_name] = (dist, reason)
        warnings.warn(
            f"storch: the estimator plugin {ep_name!r} of distribution {dist!r} failed to load and is skipped "
            f"({reason}); its estimators are unavailable, the other plugins work", RuntimeWarning, stacklevel=4)

    def _add_classes(self, classes: list, ep_name: str, dist: str,
                     owners: dict[str, tuple[str, type]]) -> None:
        problems = []
        for cls in classes:
            problem = _verify(cls, dist, Estimator)
            if problem is not None:
                # a malformed class is refused (named error on lookup); the others still work
                name = getattr(cls, "name", None)
                if isinstance(name, str) and name:
                    self.invalid[name] = problem
                problems.append(problem)
                continue
            # the same class listed twice (by two entry points of one distribution) is no clash; two classes
            # of one distribution under one name are (the last one silently won)
            clash = [k for k in (cls.name, *cls.aliases) if k in owners and owners[k] != (dist, cls)]
            if clash:
                # the name stays unusable (a clear error on lookup); other names keep working, this class's too (it
                # was skipped whole: a third party's alias 'enumerate' loaded first left storch-core's 'expect'
                # "not installed", and which class lost its names depended on the order of the entry points)
                for k in clash:
                    self.conflicts[k] = _clash_message(k, owners[k], (dist, cls))
                warnings.warn(f"storch: {self.conflicts[clash[0]]}", RuntimeWarning, stacklevel=4)
                if cls.name in clash:  # (the other class is registered under that name: its aliases resolve to it)
                    for a in cls.aliases:
                        if a not in clash:
                            owners[a] = (dist, cls)
                            self.unnamed[a] = cls
                    continue
            for k in (cls.name, *cls.aliases):
                if k in clash:
                    continue
                owners[k] = (dist, cls)
            self.classes[cls.name] = cls
            self.infos[cls.name] = EstimatorInfo(cls.name, dist, ep_name, cls.max_order, cls.biased, cls.describe())
            for a in cls.aliases:
                if a not in clash:
                    self.aliases[a] = cls.name
        if problems:
            warnings.warn(f"storch: {'; '.join(problems)}", RuntimeWarning, stacklevel=4)

    def failure_of(self, name: str) -> Optional[tuple[str, str]]:
        """(distribution, reason) if ``name`` belongs to a plugin that failed to load."""
        if name in self.failed_names:
            return self.failed_names[name]
        if name in self.failed_plugins:
            return self.failed_plugins[name]
        dist = FIRST_PARTY.get(name)
        if dist is not None and dist in self.failed:
            return dist, self.failed[dist]
        return None


def _clash_message(name: str, first: tuple[str, type], second: tuple[str, type]) -> str:
    a, b = (f"{c.__module__}.{c.__qualname__}" for c in (first[1], second[1]))
    if first[0] != second[0]:
        # installing a package does not override a name (a first-party one included): the usual fix is a rename,
        # since uninstalling a family to free one name loses its other estimators
        return (f"estimator name {name!r} is claimed by two plugins: {first[0]!r} ({a}) and {second[0]!r} ({b}), "
                "so neither gets it; give one class another `name` (no name is reserved or overridden by "
                "installing a package), or uninstall one of them. Meanwhile each class works when constructed "
                f"directly: `{first[1].__qualname__}(plate=...)`, `{second[1].__qualname__}(plate=...)`")
    return (f"estimator name {name!r} is claimed by two classes of plugin {first[0]!r}: {a} and {b}; give each "
            "estimator class its own `name` (and `aliases`)")


def _estimator_names(obj: Any) -> list[str]:
    """The names and aliases of the estimator classes a plugin object defines (an estimator class itself,
    or those defined in a module or in a function's module): what its users look up."""
    if isinstance(obj, type):
        found = [obj]
    else:
        space = vars(obj) if isinstance(obj, types.ModuleType) else getattr(obj, "__globals__", {})
        found = [v for v in space.values() if isinstance(v, type) and v.__module__ == space.get("__name__")]
    names = []
    for c in found:
        if issubclass(c, Estimator) and isinstance(c.name, str) and c.name:
            names.append(c.name)
            if isinstance(c.aliases, tuple):
                names += [a for a in c.aliases if isinstance(a, str)]
    return names


def _no_hook_problem(ep, obj: Any) -> str:
    """Why a plugin registered no ``storch_estimators`` hook, and what to write instead."""
    hook = "@storch.hookimpl function storch_estimators()"
    if isinstance(obj, types.ModuleType):
        if callable(getattr(obj, "storch_estimators", None)):
            return (f"its module {obj.__name__} defines storch_estimators() without the @storch.hookimpl decorator, "
                    "so pluggy does not see a hook and the plugin would provide no estimators; decorate it: "
                    "`from storch import hookimpl`, then `@hookimpl` above `def storch_estimators():`")
        return (f"its module {obj.__name__} defines no {hook}, so the plugin would provide no estimators; add "
                "one that returns your estimator classes: `@storch.hookimpl` above "
                "`def storch_estimators(): return [MyEstimator]`")
    value = getattr(ep, "value", None)
    module = getattr(ep, "module", None) or (value.partition(":")[0] if value else None)
    kind = "class" if isinstance(obj, type) else "function" if isinstance(obj, types.FunctionType) else "object"
    what = getattr(obj, "__qualname__", None) or type(obj).__name__
    spelled = f"`{ep.name} = {value}`" if value else f"{ep.name!r}"
    instead = f"`{ep.name} = {module}`" if module else f"`{ep.name} = your_package.plugin_module`"
    return (f"its entry point {spelled} names the {kind} {what}, not the module: pluggy registers the object an "
            f"entry point names and finds the hook among its attributes (a module's functions, as for pytest's "
            f"pytest11 plugins), so it found no {hook}. Name the module that defines the hook: write {instead} "
            "under [project.entry-points.\"storch.estimators\"] in pyproject.toml, and reinstall the package")


def _verify(cls, dist: str, base: type) -> Optional[str]:
    """Check a plugin's class against the protocol (like pluggy's _verify_hook); the problem or None."""
    where = f"plugin {dist!r} provides {cls!r}"
    if not isinstance(cls, type) or not issubclass(cls, base):
        return f"{where}, which is not a subclass of storch.Estimator"
    if not isinstance(cls.name, str) or not cls.name:
        return f"{where} without a `name` class attribute"
    if not (isinstance(cls.max_order, int) or cls.max_order == math.inf) or cls.max_order < 0:
        return f"{where} with max_order={cls.max_order!r}; use an int >= 0 or math.inf"
    if not isinstance(cls.biased, bool):
        return f"{where} with biased={cls.biased!r}; use True or False"
    if not isinstance(cls.aliases, tuple):
        return f"{where} with aliases={cls.aliases!r}; use a tuple of names"
    problem = capability_problem(cls)  # distributions and State
    return None if problem is None else f"{where} with {problem}"


_lock = threading.Lock()
_registry: Optional[_Registry] = None


def _get() -> _Registry:
    global _registry
    with _lock:
        if _registry is None:
            reg = _Registry()
            reg.load()
            _registry = reg
        return _registry


def reload_estimators() -> None:
    """Forget the loaded plugins; the next lookup scans the entry points again."""
    global _registry
    with _lock:
        _registry = None


def available_estimators() -> dict[str, EstimatorInfo]:
    """All installed estimators by name."""
    reg = _get()
    return {k: v for k, v in sorted(reg.infos.items()) if k not in reg.conflicts}


def get_estimator_class(name: str) -> type[Estimator]:
    """The estimator class registered as ``name`` (or an alias of it).

    Raises:
        storch.UnknownEstimatorError: no installed estimator has that name (the message says which
            package provides a first-party name).
        storch.PluginError: two plugins claim the name, or its plugin failed to load.
    """
    reg = _get()
    if name in reg.conflicts:
        raise PluginError(reg.conflicts[name])
    if name in reg.invalid:
        raise PluginError(reg.invalid[name])
    key = reg.aliases.get(name, name)
    cls = reg.classes.get(key) or reg.unnamed.get(name)
    if cls is not None:
        return cls
    failure = reg.failure_of(name)
    if failure is not None:
        raise PluginError(
            f"estimator {name!r} is unavailable: the plugin of distribution {failure[0]!r} that provides it "
            f"failed to load ({failure[1]}); fix or reinstall {failure[0]} (`pip install --force-reinstall "
            f"{failure[0]}`), or uninstall it")
    known = sorted(set(reg.classes) | set(reg.aliases) | set(reg.unnamed))
    msg = f"no estimator named {name!r} is installed."
    if reg.failed_plugins:
        msg += " Plugins that failed to load (if it is theirs, that is why): " + "; ".join(
            f"{ep!r} of {dist!r}: {why}" for ep, (dist, why) in sorted(reg.failed_plugins.items())) + "."
    dist = FIRST_PARTY.get(name)
    if name in SCORE_BASELINES:
        msg += _baseline_hint(name, "score" in reg.classes)
    elif dist is None:  # (a known name of a family not installed: no "did you mean", the package to install)
        # installed names, and the known names of the families not installed with the package to install
        # ("relax" without storch-estimators-relaxed suggested 'lax' or 'rebar', neither installed either)
        candidates = [k for k in dict.fromkeys(known + list(FIRST_PARTY)) if k != name]
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
        if close:
            msg += f" Did you mean {' or '.join(_suggested(c, known, reg.conflicts) for c in close)}?"
    elif dist != "storch-core":
        msg += f" {name!r} is provided by {dist}: `pip install {dist}`."
    msg += f" Installed: {', '.join(k for k in sorted(reg.classes) if k not in reg.conflicts) or 'none'}."
    if not any(c in reg.classes for c in ("expect", "reparameterization")):
        msg += _no_core_hint()
    raise UnknownEstimatorError(msg)


def _baseline_hint(name: str, score_installed: bool) -> str:
    """``name`` is a baseline of the score estimator, not an estimator: how to ask for it (and, where the score
    family is missing, what to install)."""
    n = ", n_samples=8" if name in ("leave_one_out", "batch_average") else ""
    return (f" {name!r} is a baseline of the 'score' estimator, not an estimator: storch.estimator('score', "
            f"plate=...{n}, baseline={name!r})" + ("." if score_installed else
                                                  " (not installed: `pip install storch-estimators-score`)."))


def _suggested(name: str, installed: list[str], conflicts: dict[str, str]) -> str:
    """A name "Did you mean" offers: an installed one as it is, a first-party one with the package to install,
    one that two packages claim with why it cannot be used (as available_estimators() leaves it out)."""
    if name in conflicts:
        return f"{name!r} (claimed by two packages, so unusable: `storch.get_estimator_class({name!r})` says which)"
    dist = FIRST_PARTY.get(name)
    if name in installed or dist is None or dist == "storch-core":
        return repr(name)
    return f"{name!r} (not installed: `pip install {dist}`)"


def _no_core_hint() -> str:
    """Why even storch-core's own estimators (registered through its entry points like any plugin's) are
    missing, and what to do: usually storch imported from a source folder (PYTHONPATH) without being
    installed, so no distribution metadata, hence no entry points, is found."""
    try:
        distribution("storch-core")
    except PackageNotFoundError:
        return (" Even storch-core's own estimators ('expect', 'reparameterization') are missing: the "
                "distribution metadata of storch-core was not found, and with it the entry points (group "
                f"{ENTRY_POINT_GROUP!r}) through which every estimator is registered, the built-ins too. storch is probably imported from a source folder (PYTHONPATH) without being installed: "
                "install the packages, `pip install storch-core` and the estimator families you use, or from a "
                "checkout `pip install -e packages/storch-core -e packages/storch-estimators-score` (...), "
                "instead of putting their src folders on PYTHONPATH.")
    return (" Even storch-core's own estimators ('expect', 'reparameterization') are missing, though storch-core's "
            f"distribution metadata was found: its entry points (group {ENTRY_POINT_GROUP!r}) registered nothing. "
            "Reinstall it (`pip install --force-reinstall storch-core`, or `pip install -e packages/storch-core` "
            "from a checkout).")


def estimator(name: str, plate: str, **options: Any) -> Estimator:
    """Create the estimator registered as ``name`` for the node with sample plate ``plate``.

    ``storch.available_estimators()`` lists the installed names (each estimator family is a package:
    ``storch-estimators-score``, ``-relaxed``, ``-mvd``); the estimator table of the documentation,
    docs/estimators/README.md, has one page per first-party estimator with its options, what it requires and
    the highest order it is unbiased for. An option may be set later too (``est.temperature = 0.1``), checked
    as the constructor checks it.

    Args:
        name: the estimator's registered name or an alias (``"score"``, ``"reinforce"``, ``"gumbel_softmax"``).
        plate: the name of the sample plate of the nodes it draws.
        **options: the estimator's own options (``n_samples`` and those of its page; ``type(est).options()``).

    Returns:
        A new :class:`storch.Estimator`; call it on a distribution to sample a node.

    Raises:
        storch.UnknownEstimatorError: no installed estimator has that name (the message suggests close installed
            names, and the package to ``pip install`` for a first-party name of a family not installed).
        storch.OptionError: an option it does not take ("Did you mean"), or an invalid value.
        storch.PluginError: the plugin that provides the name failed to load, or two plugins claim it.

    Example:
        >>> est = storch.estimator("score", plate="z", n_samples=8, baseline="leave_one_out")
    """
    # like every storch call that raises during a step: the default graph's step is discarded
    with current_graph().guard():
        return _make_estimator(name, plate, options)


def _make_estimator(name: str, plate: str, options: dict):
    cls = get_estimator_class(name)
    accepted = cls.options()
    for key in options:
        # a constructor that takes **kwargs may take options of its own besides its base's (kwargs.pop("x")): its
        # construction says which keyword it does not take, as direct construction does
        if key not in accepted and not takes_more_options(cls):
            raise OptionError(unknown_option_message(cls, key, f"estimator {cls.name!r}"))
    est = cls(plate=plate, **options)  # (its construction refuses a base's option that reached no constructor)
    if est.has_update:
        _note_created(est)
    return est


# The latest instance made by storch.estimator per (class, plate) of an estimator with state (moving averages,
# learned parts, schedules), as [nodes it drew (estimators.first_steps._sample_node counts them), instances in a row that each
# replaced one that drew exactly one node]. An estimator made anew in every training step (inside the loop or the
# model's forward) starts from scratch each time: no moving average is ever applied, nothing learned is trained,
# and the user silently gets the plain estimator (found by a tester reading the docs as a new user)
_LATEST: dict[tuple, list] = {}
_STREAK = 3  # replaced after one node this many times in a row: warned (once per class and plate)


# Inside this scope (storch.testing's checks enter it) estimators are built anew by design (one per node of
# every model and check), so no streak is counted and nothing is warned; a context variable, not a global switch
_BY_DESIGN: contextvars.ContextVar[bool] = contextvars.ContextVar("storch_created_by_design", default=False)


@contextlib.contextmanager
def created_by_design() -> Iterator[None]:
    """A scope whose estimators are made anew on purpose (a conformance check): not counted towards the
    'created anew N times in a row' warning of an estimator made in every training step."""
    token = _BY_DESIGN.set(True)
    try:
        yield
    finally:
        _BY_DESIGN.reset(token)


def _note_created(est: Estimator) -> None:
    if _BY_DESIGN.get():
        return
    key = (type(est), est.plate)
    prev = _LATEST.get(key)
    streak = prev[1] + 1 if prev is not None and prev[0] == 1 else 0
    if len(_LATEST) > 1024:  # (plate names made per run: bounded)
        _LATEST.clear()
    _LATEST[key] = est._nodes_drawn = [0, streak]
    if streak == _STREAK:
        warnings.warn(
            f"storch.estimator({est.name!r}, plate={est.plate!r}, ...) was created anew {streak + 1} times in a row, "
            "each instance drawing one node before the next replaced it: an estimator made in every training step. "
            "Its state (a moving average, a learned baseline or control variate, a temperature schedule, a buffer) "
            "lives on the instance and is discarded with it, so the variance reduction you asked for never applies "
            "(the gradient stays unbiased). Create the estimator once, outside the training loop (e.g. in your "
            "module's __init__), and call it in every step", UserWarning, stacklevel=4)


# the estimator base class (below this module) reads the installed estimators through the catalog
set_source(lambda: _get().classes, available_estimators)
