"""Equal budgets and repeated seeds for the VAE comparison.

The literature compares estimators at an equal number of cost evaluations per training step
(REBAR evaluates the cost 3 times per sample, ARM twice, GO 1 + m times, a self-critical
baseline once more than its samples). :func:`evaluations` measures what one estimator costs: it
samples the model's latent once with ``n_samples = 1`` and once with ``n_samples = 2`` and reads
the size of the node's plate (the entries user code evaluates the cost on), so the count comes
from the estimator itself, third-party ones included. :func:`at_budget` then picks, per
estimator, the largest ``n_samples`` whose evaluations fit the budget.

:func:`aggregate` turns several seeds' results into mean ± sd rows (``storch-compare --full``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Optional, Sequence

import storch

from .roster import Spec, build

__all__ = ["evaluations", "at_budget", "aggregate", "mean_sd"]


def _plate_size(spec: Spec, cls: type, d, n: int) -> int:
    est = build(replace(spec, n_samples=n), cls)
    with storch.Graph():
        return est(d).plates[0].size


def evaluations(spec: Spec, cls: type, d) -> tuple[int, int]:
    """``(a, b)``: the estimator for ``spec`` evaluates the cost a + b·n times per data point.

    ``b = 0`` for an estimator without an ``n_samples`` option (a fixed number of evaluations).
    """
    if "n_samples" not in cls.options():
        return _plate_size(spec, cls, d, 1), 0
    try:
        n, first = 1, _plate_size(spec, cls, d, 1)
    except storch.OptionError:  # e.g. a leave-one-out baseline needs n_samples >= 2
        n, first = 2, _plate_size(spec, cls, d, 2)
    b = _plate_size(spec, cls, d, n + 1) - first
    return first - b * n, b


def _accepts(spec: Spec, cls: type, n: int) -> bool:
    try:
        build(replace(spec, n_samples=n), cls)
        return True
    except storch.OptionError:
        return False


def at_budget(runnable: Sequence[tuple[Spec, type]], d, budget: int) -> tuple[list[tuple[Spec, type]], list]:
    """The specs with ``n_samples`` set so that each uses at most ``budget`` evaluations per step.

    Returns:
        ``(runnable, notes)``: ``(spec, class)`` pairs (duplicates removed) and ``(label, reason)``
        for estimators whose single sample already costs more than the budget.
    """
    out, notes, seen = [], [], set()
    for spec, cls in runnable:
        try:
            a, b = evaluations(spec, cls, d)
        except (storch.StorchError, TypeError, ValueError) as e:
            notes.append((spec.label, f"cannot count its evaluations: {type(e).__name__}: {e}"))
            continue
        n = spec.n_samples if b == 0 else (budget - a) // b
        while n > 1 and not _accepts(spec, cls, n):  # e.g. unordered_set takes at most 16 samples
            n -= 1
        if a + b * n > budget or not _accepts(spec, cls, n):
            notes.append((spec.label, f"its smallest configuration costs more than {budget} cost evaluations"))
            continue
        new = replace(spec, n_samples=n)
        if new not in seen:
            seen.add(new)
            out.append((new, cls))
    return out, notes


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (nan if there are none)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(per_seed: Sequence[Sequence], fields: Sequence[str]) -> list[dict]:
    """Group results of several seeds by (model, label); mean and sd of each field.

    Returns one dict per (model, label), in first-seen order: ``model``, ``label``, ``seeds`` (how
    many seeds produced it), ``biased``, ``max_order``, ``note`` (the notes joined) and
    ``field -> (mean, sd)`` for each of ``fields``.
    """
    groups: dict[tuple[str, str], list] = {}
    for results in per_seed:
        for r in results:
            groups.setdefault((r.model, r.label), []).append(r)
    rows = []
    for (model, label), rs in groups.items():
        row: dict[str, Optional[object]] = {"model": model, "label": label, "seeds": len(rs),
                                            "biased": rs[0].biased, "max_order": rs[0].max_order,
                                            "note": "; ".join(sorted({r.note for r in rs if r.note}))}
        for f in fields:
            row[f] = mean_sd([getattr(r, f) for r in rs])
        rows.append(row)
    return rows
