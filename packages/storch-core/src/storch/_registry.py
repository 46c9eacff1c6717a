"""The estimator registry: pluggy hooks discovered through the ``storch.estimators`` entry points.

Each entry point's value is a module that implements the hook ``storch_estimators()`` and
returns its estimator classes. Core registers its built-ins the same way. Plugins are loaded
once, on first use; a plugin that fails to import is reported with a warning and skipped.
"""

from __future__ import annotations

import difflib
import math
import threading
import warnings
from typing import NamedTuple, Optional

import pluggy
from importlib_metadata import entry_points

from ._errors import OptionError, PluginError, UnknownEstimatorError

__all__ = [
    "hookimpl", "hookspec", "EstimatorInfo", "available_estimators", "estimator", "get_estimator_class",
    "reload_estimators", "ENTRY_POINT_GROUP",
]

ENTRY_POINT_GROUP = "storch.estimators"
hookspec = pluggy.HookspecMarker("storch")
hookimpl = pluggy.HookimplMarker("storch")

# first-party names -> the distribution to install, for a helpful error when a family is missing
FIRST_PARTY = {
    **dict.fromkeys(["expect", "enumerate", "reparameterization", "pathwise"], "storch-core"),
    **dict.fromkeys(["score", "reinforce", "importance", "sum_and_sample", "mapo", "unordered_set"],
                    "storch-estimators-score"),
    **dict.fromkeys(["gumbel_softmax", "gumbel_straight_through", "lax", "relax", "rebar", "arm",
                     "disarm", "go"], "storch-estimators-relaxed"),
    **dict.fromkeys(["spsa", "mvd"], "storch-estimators-mvd"),
}


class HookSpecs:
    @hookspec
    def storch_estimators(self) -> list:
        """Return the estimator classes (subclasses of ``storch.Estimator``) this plugin provides."""


class EstimatorInfo(NamedTuple):
    """What the registry knows about an installed estimator."""

    name: str
    package: str
    family: str
    max_order: float
    biased: bool
    description: str


class _Registry:
    def __init__(self) -> None:
        self.classes: dict[str, type] = {}
        self.infos: dict[str, EstimatorInfo] = {}
        self.aliases: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.conflicts: dict[str, tuple[str, str]] = {}
        self.invalid: dict[str, str] = {}

    def load(self) -> None:
        from ._estimator import Estimator

        pm = pluggy.PluginManager("storch")
        pm.add_hookspecs(HookSpecs)
        owners: dict[str, str] = {}  # name or alias -> distribution
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "<unknown distribution>"
            try:
                module = ep.load()
                pm.register(module, name=f"{dist}:{ep.name}")
            except Exception as e:  # a broken plugin must not break the others
                self.failed[dist] = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"storch: the estimator plugin {ep.name!r} of distribution {dist!r} failed to load "
                    f"({type(e).__name__}: {e}); its estimators are unavailable", RuntimeWarning, stacklevel=3)
                continue
            for impl in pm.hook.storch_estimators.get_hookimpls():
                if impl.plugin_name != f"{dist}:{ep.name}":
                    continue
                classes = impl.function()
                for cls in classes or ():
                    problem = _verify(cls, dist, Estimator)
                    if problem is not None:
                        # a malformed class is refused (named error on lookup); the others still work
                        name = getattr(cls, "name", None)
                        if isinstance(name, str) and name:
                            self.invalid[name] = problem
                        warnings.warn(f"storch: {problem}", RuntimeWarning, stacklevel=3)
                        continue
                    clash = [k for k in (cls.name, *cls.aliases) if k in owners and owners[k] != dist]
                    if clash:
                        # the name stays unusable (a clear error on lookup); other names keep working
                        for k in clash:
                            self.conflicts[k] = (owners[k], dist)
                        warnings.warn(
                            f"storch: estimator name {clash[0]!r} is claimed by two plugins, {owners[clash[0]]!r} "
                            f"and {dist!r}; uninstall one of them", RuntimeWarning, stacklevel=3)
                        continue
                    for k in (cls.name, *cls.aliases):
                        owners[k] = dist
                    self.classes[cls.name] = cls
                    self.infos[cls.name] = EstimatorInfo(
                        cls.name, dist, ep.name, cls.max_order, cls.biased, cls.describe())
                    for a in cls.aliases:
                        self.aliases[a] = cls.name


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
    return None


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


def get_estimator_class(name: str) -> type:
    reg = _get()
    if name in reg.conflicts:
        a, b = reg.conflicts[name]
        raise PluginError(
            f"estimator name {name!r} is claimed by two plugins: {a!r} and {b!r}; uninstall one of them"
        )
    if name in reg.invalid:
        raise PluginError(reg.invalid[name])
    key = reg.aliases.get(name, name)
    cls = reg.classes.get(key)
    if cls is not None:
        return cls
    known = sorted(set(reg.classes) | set(reg.aliases))
    msg = f"no estimator named {name!r} is installed."
    candidates = [k for k in dict.fromkeys(known + list(FIRST_PARTY)) if k != name]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if close:
        msg += f" Did you mean {' or '.join(repr(c) for c in close)}?"
    dist = FIRST_PARTY.get(name)
    if dist is not None and dist != "storch-core":
        msg += f" {name!r} is provided by {dist}: `pip install {dist}`."
    msg += f" Installed: {', '.join(sorted(reg.classes)) or 'none'}."
    raise UnknownEstimatorError(msg)


def estimator(name: str, plate: str, **options):
    """Create the estimator registered as ``name`` for the node with sample plate ``plate``.

    Example:
        >>> est = storch.estimator("score", plate="z", n_samples=8, baseline="leave_one_out")
    """
    cls = get_estimator_class(name)
    accepted = cls.options()
    for key in options:
        if key not in accepted:
            raise OptionError(
                f"estimator {cls.name!r} has no option {key!r}; its options are: {', '.join(accepted) or 'none'}"
            )
    return cls(plate=plate, **options)


def supporting_estimators(d) -> list[str]:
    """Names of installed estimators whose capabilities accept distribution ``d``."""
    out = []
    try:
        classes = _get().classes
    except Exception:
        return out
    base = getattr(d, "base_dist", d)
    for name, cls in sorted(classes.items()):
        if cls.distributions is not None and not isinstance(base, cls.distributions):
            continue
        if cls.requires_rsample and not d.has_rsample:
            continue
        if cls.requires_enumerate_support and not d.has_enumerate_support:
            continue
        out.append(name)
    return out
