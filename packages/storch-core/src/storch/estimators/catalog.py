"""The estimator catalog: what is known about the installed estimators, for the layers below the registry.

The registry (``storch.registry``, above the estimators) loads the plugins and installs its
lookups here with :func:`set_source`; the estimator base class asks this module, never the
registry, for the installed estimators (its error messages name the ones that support a
distribution, :meth:`storch.Estimator.info` reports the installing package).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

__all__ = ["EstimatorInfo", "available", "installed_classes", "set_source", "supporting_estimators"]


class EstimatorInfo(NamedTuple):
    """What the registry knows about an installed estimator."""

    name: str
    package: str
    family: str
    max_order: float
    biased: bool
    description: str


_classes: Optional[Callable[[], dict]] = None
_infos: Optional[Callable[[], dict]] = None


def set_source(classes: Callable[[], dict], infos: Callable[[], dict]) -> None:
    """Install the registry's lookups: ``classes()`` -> {name: class}, ``infos()`` -> {name: EstimatorInfo}."""
    global _classes, _infos
    _classes, _infos = classes, infos


def installed_classes() -> dict:
    """The installed estimator classes by name (empty before the registry is imported)."""
    return _classes() if _classes is not None else {}


def available() -> dict:
    """``storch.available_estimators()``: installed estimators' :class:`EstimatorInfo` by name."""
    return _infos() if _infos is not None else {}


def _supporting(d) -> list[tuple[str, type]]:
    """Installed estimators whose capabilities accept distribution ``d`` (``Estimator.supports``), by name."""
    try:
        classes = installed_classes()
    except Exception:  # noqa: BLE001  (only for an error message: a broken registry lists none)
        return []
    return [(name, cls) for name, cls in sorted(classes.items()) if cls.supports(d)]


def supporting_estimators(d) -> list[str]:
    """Names of installed estimators whose capabilities accept distribution ``d`` (``Estimator.supports``)."""
    return [name for name, _ in _supporting(d)]


def partition_needs(cls) -> str:
    """What a partition of estimator class ``cls`` needs (``partition_options``), for a message that offers it for
    a sequence: `` (a partition needs ...)``, or nothing."""
    options = getattr(cls, "partition_options", "")
    return f" (a partition needs {options})" if options else ""


def partition_estimators(d) -> list[str]:
    """Names of installed estimators that accept ``d`` and support partitions (``supports_partitions``): the
    advice for a sequence of nodes of an estimator that does not (one plate dim per node, at most 64 dims). Each
    with what a partition of it needs (``partition_options``), as the order refusal names them: sum_and_sample
    refuses a second call without ``buffer=`` and, with it, a step with batch dims of its own (a token per call),
    so named bare it was advice that the next call refuses."""
    return [name + partition_needs(cls) for name, cls in _supporting(d) if getattr(cls, "supports_partitions", False)]
