"""Which estimator for MY model? Rank the installed estimators on a user's own stochastic graph.

The user writes one function ``step(est)`` that builds ONE graph for a fixed batch with the
estimator it is given (``z = est(q)``, costs added with ``storch.add_cost``) and returns the
parameters (a tensor, an iterable of tensors, or an ``nn.Module``) whose gradient is compared.
:func:`compare_estimators` calls it inside a fresh ``storch.Graph()`` once per estimate, per
estimator, and measures, at the same parameters:

- variance: the trace of the covariance of ``estimates`` derivative estimates (the sum of the
  per-coordinate variances; the gradient for ``order=1``, for ``order=k`` the k-th derivative
  applied k-1 times to one fixed random direction v: ∇(∇f·v)...);
- bias against a reference: the mean of many estimates of an unbiased estimator (``expect``
  when the model's nodes can be enumerated, else ``score[baseline=leave_one_out]@n``), with a
  z-score (see :func:`bias_z`) and the noise-corrected relative bias |E ĝ - g_ref| / |g_ref|;
- time per step: the wall time of one estimate (the user's step, the surrogate, the
  derivative), the fastest of the ``estimates`` repeats (as ``timeit`` advises: slower repeats
  measure other processes, which on a shared machine would reorder the table), and the peak
  memory of one estimate (torch's CPU allocator via ``torch.profiler``, or
  ``torch.cuda.max_memory_allocated`` for CUDA parameters);
- cost evaluations per step: the number of entries of the sampling plates a cost carries
  (per data point), i.e. how often the model downstream of the samples is evaluated;
- variance × time (variance · ms/step): the number that decides in practice; halving the
  variance with 2 samples is only worth it if the step costs less than twice as much.

Every estimator first runs ``warmup`` training steps through ``storch.backward()`` (learned
control variates, moving averages adapt; first-call costs leave the timings); the user's
parameters are never changed (their ``.grad`` is restored afterwards). Estimates are drawn after
``torch.manual_seed(seed)``, one after another; warm-up and memory use their own seeds; all of
it in forked RNG streams (the caller's random state is left alone). So the k-th estimate of
every estimator can be reproduced by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

import storch

from .model_runner import Runner, Step, describe, first_line, probe
from .roster import INVALID, Spec, build, parse_spec, parse_specs, skip_reason, supports

__all__ = ["compare_estimators", "Comparison", "EstimatorResult", "bias_z", "DEFAULT_REFERENCES", "MIN_BIAS_ESTIMATES",
           "BadReferenceError"]

# tried in order when no reference is given; the first that supports the model and runs is used
DEFAULT_REFERENCES = ("expect@1", "score[baseline=leave_one_out]@{n}")
# the fewest estimates (per estimator, and of a stochastic reference) at which the bias z-test is reported: with
# fewer, the standard error of heavy-tailed estimates is too noisy. Measured on examples/which_estimator (5 unbiased
# estimators, 2000 resampled runs each), the share of rows with |z| > 4: 15-16% at 4 estimates, 2-3% at 8,
# 0.1-0.8% at 16, 0.05-0.2% at 32, <= 0.05% at 64
MIN_BIAS_ESTIMATES = 32


class BadReferenceError(ValueError):
    """The reference the caller named cannot be used (unknown, biased, unsupported by the model, or it failed)."""


@dataclass
class EstimatorResult:
    """One row of the comparison (NaN where not measured; ``note`` says why)."""

    label: str
    biased: bool = False
    max_order: float = math.inf
    variance: float = math.nan
    rel_bias: float = math.nan
    bias_z: float = math.nan
    ms_per_step: float = math.nan
    peak_mb: float = math.nan
    cost_evals: int = 0
    note: str = ""
    mean: Optional[torch.Tensor] = field(default=None, repr=False)
    estimates: Optional[torch.Tensor] = field(default=None, repr=False)  # (estimates, P) if kept

    @property
    def efficiency(self) -> float:
        """variance × ms per step (lower is better)."""
        return self.variance * self.ms_per_step

    @property
    def ok(self) -> bool:
        return not self.note.startswith("error")


@dataclass
class Comparison:
    """The result of :func:`compare_estimators`.

    Attributes:
        rows: one :class:`EstimatorResult` per estimator that ran (errors included), best first.
        skipped: ``(label, reason)`` for estimators that did not take part.
        reference: the reference's label and ``reference_mean`` its mean estimate (flat, float64).
        distributions: the model's stochastic nodes as the probe step saw them.
    """

    rows: list[EstimatorResult]
    skipped: list[tuple[str, str]]
    reference: str
    reference_mean: Optional[torch.Tensor]
    reference_estimates: int
    order: int
    estimates: int
    n_params: int
    distributions: list[str]
    memory: str
    seed: int

    def row(self, label: str) -> EstimatorResult:
        """The row of ``label`` (a spec string such as ``"score[baseline=leave_one_out]@8"`` works too)."""
        want = parse_spec(label).label if "@" in label or "[" in label else label
        for r in self.rows:
            if r.label in (label, want):
                return r
        raise KeyError(f"no row {label!r}; rows: {', '.join(r.label for r in self.rows)}")


def _why_not(spec: Spec, dists: list, order: int, partitioned: bool) -> tuple[Optional[type], Optional[str]]:
    try:
        cls = spec.estimator_class()
    except storch.UnknownEstimatorError as e:
        return None, skip_reason(e)
    except storch.PluginError as e:
        return None, str(e).splitlines()[0]
    for d in dists:
        why = supports(cls, d, spec.options)
        if why is not None:
            return None, why
    if partitioned and not getattr(cls, "supports_partitions", False):
        return None, "the model calls est several times in one graph (a partition), which it does not support"
    if cls.max_order < order:
        return None, f"max_order={cls.max_order}: not unbiased for order {order}"
    if order > 1 and cls.biased:
        return None, f"biased (estimates another objective), so its order-{order} derivatives are not the model's"
    return cls, None


_ROUNDING_ULPS = 64  # a difference of means below 64 ulps of the largest reference coordinate is rounding


def bias_z(estimates: torch.Tensor, reference: torch.Tensor, eps: Optional[float] = None) -> float:
    """|z| of the bias of ``estimates`` (R, P) against ``reference`` estimates (M, P); split-half test.

    The first halves give a direction d = mean(estimates₁) - mean(reference₁); the second halves
    give the projected difference (mean(estimates₂) - mean(reference₂))·d and its standard error
    from the projected samples (Welch). Given d, the statistic is (approximately) Student-t
    whatever the number of coordinates P and their correlation: an unbiased estimator gives
    |z| > 4 in about 1 of 1000 runs with 16 estimates per half, fewer with more; a bias b makes
    the numerator grow like |b|² while the noise shrinks like 1/sqrt(R). A deterministic reference
    (M = 1) enters both halves with zero variance. Differences at rounding level (below the larger of 1e-9
    and 64 ulps of the dtype, times the largest reference coordinate) count as 0.

    Args:
        eps: machine epsilon of the dtype the estimates were computed in (float32 parameters:
            1.2e-7), when ``estimates`` was cast to float64 afterwards; default: from their dtype.
    """
    r_n, m_n = estimates.shape[0], reference.shape[0]
    if r_n < 4:
        return math.nan
    ea, eb = estimates[: r_n // 2], estimates[r_n // 2:]
    ra, rb = (reference, reference) if m_n < 4 else (reference[: m_n // 2], reference[m_n // 2:])
    d = ea.mean(0) - ra.mean(0)
    diff = eb.mean(0) - rb.mean(0)
    scale = float(reference.mean(0).abs().max().clamp_min(1e-12))
    # below floating-point precision a difference is no bias: an exact estimator (unordered_set with
    # k >= the support) in float32 differs from an exact reference by rounding in a different order
    # (~1e-7 relative), and its variance is rounding too, so the z-score of rounding is meaningless
    if eps is None:  # the precision the estimates were computed in (the model's parameters' dtype)
        eps = max(torch.finfo(estimates.dtype).eps, torch.finfo(reference.dtype).eps)
    floor = max(1e-9, _ROUNDING_ULPS * eps) * scale
    if float((estimates.mean(0) - reference.mean(0)).abs().max()) <= floor:
        return 0.0  # the same values up to rounding (e.g. two exact estimators)
    pe, pr = eb @ d, rb @ d
    se2 = pe.var() / len(pe) + (pr.var() / len(pr) if len(pr) > 1 else 0.0)
    num = float(diff @ d)
    if float(se2) <= 0.0:
        return math.inf
    return abs(num) / float(se2) ** 0.5


def _rel_bias(estimates: torch.Tensor, reference: torch.Tensor) -> float:
    """sqrt(max(0, |m - r|² - tr Σ/R - tr Σ_ref/M)) / |r|: the bias norm with the noise's share removed."""
    m, r = estimates.mean(0), reference.mean(0)
    noise = estimates.var(0).sum() / len(estimates) if len(estimates) > 1 else 0.0
    if len(reference) > 1:
        noise = noise + reference.var(0).sum() / len(reference)
    b2 = float(((m - r) ** 2).sum() - noise)
    norm = float(r.norm())
    return math.sqrt(max(b2, 0.0)) / norm if norm > 0 else math.nan


def _specs(estimators: Union[None, str, Sequence[Union[str, Spec]]], samples: int) -> list[Spec]:
    if estimators is None:
        estimators = "auto"
    if isinstance(estimators, str):
        return parse_specs(estimators, samples)
    out: list[Spec] = []
    for e in estimators:
        out += [e] if isinstance(e, Spec) else parse_specs(e, samples)
    return out


def _reference(runner: Runner, reference, dists, partitioned: bool, order: int, n_ref: int, samples: int,
               warmup: int, seed: int, tick) -> tuple[str, Optional[torch.Tensor]]:
    """The reference's label and estimates; ``(why not, None)`` when no candidate could run."""
    candidates = [reference] if reference is not None else [s.format(n=samples) for s in DEFAULT_REFERENCES]
    tried = []
    for cand in candidates:
        spec = cand if isinstance(cand, Spec) else parse_spec(cand)
        cls, why = _why_not(spec, dists, order, partitioned)
        if cls is not None and cls.biased:
            why = "biased: a reference must be an unbiased estimator"
        if why is None:
            try:
                est = build(spec, cls)
                runner.warmup(est, warmup, seed + 1, tick)
                first, _, _ = runner.estimates(est, 2, seed + 2, tick)
                if torch.equal(first[0], first[1]):  # deterministic (e.g. exact enumeration): one suffices
                    return spec.label, first[:1]
                rest, _, _ = runner.estimates(est, n_ref - 2, seed + 3, tick)
                return spec.label, torch.cat([first, rest])
            except Exception as e:  # noqa: BLE001 - try the next candidate
                why = first_line(e)
        tried.append(f"{spec.label}: {why}")
        if reference is not None:  # the caller's choice: refused, not silently replaced by none
            raise BadReferenceError(f"{spec.label} cannot be the reference: {why}")
    return "none (" + "; ".join(tried) + ")", None


def compare_estimators(step: Step, estimators: Union[None, str, Sequence[Union[str, Spec]]] = None,
                       estimates: int = 32, order: int = 1, warmup: int = 20,
                       reference: Union[None, str, Spec] = None, reference_estimates: int = 256,
                       seed: int = 0, samples: int = 8, keep_estimates: bool = False,
                       measure_memory: bool = True, progress: bool = True) -> Comparison:
    """Rank estimators on the user's model ``step(est)`` by variance, bias, time and memory.

    Args:
        step: ``step(est)`` builds one graph for a fixed batch with estimator ``est`` (``z = est(q)``,
            ``storch.add_cost(...)``) and returns the parameters (or the ``nn.Module``) whose
            derivative is compared. It must not call ``storch.backward()`` itself. Return every
            parameter the step uses: warm-up runs ``storch.backward()``, and only the ``.grad`` of
            the returned parameters is restored afterwards.
        estimators: spec strings ``name[option=value,...]@n`` (a list, or one comma-separated
            string), :class:`storch_bench.Spec` objects, or ``None``/``"auto"``: every installed
            estimator (``score`` also with ``baseline=leave_one_out``, ``unordered_set`` at ``@samples``).
        estimates: derivative estimates per estimator (the variance is over these; at least 4). The bias
            columns are computed from ``MIN_BIAS_ESTIMATES`` (32) on and NaN below: with fewer, the
            z-test flags unbiased estimators (|z| > 4 in 0.1-16% of rows).
        order: the derivative order the model needs; estimators with ``max_order < order`` and,
            for ``order >= 2``, biased ones are skipped.
        warmup: training steps (``storch.backward()``) each estimator runs before it is measured.
        reference: spec of an unbiased reference; default ``expect@1``, else
            ``score[baseline=leave_one_out]@samples``. A reference named here that cannot run on the
            model (unknown, biased, unsupported, failing) raises :class:`BadReferenceError`.
        reference_estimates: estimates averaged for a stochastic reference (at least ``MIN_BIAS_ESTIMATES``).
        seed: estimates are drawn after ``torch.manual_seed(seed)``.
        samples: the sample count of the multi-sample presets of ``auto``.
        keep_estimates: keep every row's ``(estimates, P)`` tensor in ``EstimatorResult.estimates``.
        measure_memory: measure the peak memory of one estimate (costs one profiled step).
        progress: show a tqdm progress bar.

    Returns:
        a :class:`Comparison`; ``storch_bench.model_cli`` writes it as Markdown, CSV and PNG.

    Raises:
        TypeError / ValueError / RuntimeError: ``step`` does not build a valid graph with a plain
            score-function estimator; ``estimates`` < 4 or ``reference_estimates`` < ``MIN_BIAS_ESTIMATES``.
        BadReferenceError: the ``reference`` named cannot run on the model. (When no default reference
            can run, the bias columns are NaN and ``Comparison.reference`` says why.)
    """
    from tqdm.auto import tqdm

    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    if estimates < 4:
        raise ValueError(f"estimates must be >= 4 (the variance needs them), got {estimates}")
    if reference_estimates < MIN_BIAS_ESTIMATES:
        raise ValueError(f"reference_estimates must be >= {MIN_BIAS_ESTIMATES} (the bias z-test is unreliable with "
                         f"fewer), got {reference_estimates}")
    params, dists, partitioned = probe(step)
    gen = torch.Generator().manual_seed(seed)
    # the fixed direction of higher-order derivatives: Rademacher, one entry per parameter element
    direction = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
    runner = Runner(step, params, order, direction)
    plan, skipped = [], []
    for spec in _specs(estimators, samples):
        cls, why = _why_not(spec, dists, order, partitioned)
        (skipped.append((spec.label, why)) if why else plan.append((spec, cls)))
    total = len(plan) * (warmup + estimates) + warmup + reference_estimates
    rows = []
    # the estimates are cast to float64; rounding is at the precision the model computes in
    precision = max((torch.finfo(p.dtype).eps for p in runner.params if p.is_floating_point()), default=None)
    with tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        bar.set_description("reference")
        ref_label, ref = _reference(runner, reference, dists, partitioned, order, reference_estimates, samples,
                                    warmup, seed, tick)
        bar.total = bar.n + len(plan) * (warmup + estimates)  # a deterministic reference took 2 estimates
        bar.refresh()
        for spec, cls in plan:
            bar.set_description(spec.label)
            row = EstimatorResult(spec.label, bool(cls.biased), cls.max_order)
            done = bar.n
            try:
                est = build(spec, cls)
            except (storch.UnsupportedDistributionError, storch.OptionError, TypeError, ValueError) as e:
                skipped.append((spec.label, INVALID + first_line(e) if isinstance(e, storch.OptionError)
                                else "cannot be built: " + first_line(e)))
                bar.update(warmup + estimates)
                continue
            try:
                runner.warmup(est, warmup, seed + 1, tick)
                g, times, row.cost_evals = runner.estimates(est, estimates, seed, tick)
                if measure_memory:
                    row.peak_mb = runner.peak_mb(est, seed + 4)
            except (storch.UnsupportedDistributionError, storch.OptionError) as e:
                skipped.append((spec.label, first_line(e)))
                bar.update(done + warmup + estimates - bar.n)
                continue
            except Exception as e:  # noqa: BLE001 - one failing estimator must not end the comparison
                row.note = "error: " + first_line(e)
                rows.append(row)
                bar.update(done + warmup + estimates - bar.n)
                continue
            row.variance = float(g.var(0).sum())  # trace of the covariance (unbiased per coordinate)
            row.ms_per_step = 1e3 * min(times)  # timeit's convention
            if ref is not None and estimates >= MIN_BIAS_ESTIMATES:
                row.bias_z, row.rel_bias = bias_z(g, ref, eps=precision), _rel_bias(g, ref)
            row.mean = g.mean(0)
            row.estimates = g if keep_estimates else None
            notes = []
            if cls.biased:
                notes.append("biased by design")
            if not torch.isfinite(g).all():
                notes.append("non-finite estimates")
            row.note = "; ".join(notes)
            rows.append(row)
    rows.sort(key=_rank)
    memory = ("not measured (measure_memory=False, --no-memory)" if not measure_memory
              else "torch.cuda.max_memory_allocated" if runner.cuda
              else "torch CPU allocator peak (torch.profiler, profile_memory=True)")
    return Comparison(rows, skipped, ref_label, None if ref is None else ref.mean(0),
                      0 if ref is None else len(ref), order, estimates,
                      sum(p.numel() for p in params), [describe(d) for d in dists], memory, seed)


def _rank(r: EstimatorResult) -> tuple:
    eff = r.efficiency
    return (not r.ok, not math.isfinite(eff), eff if math.isfinite(eff) else 0.0, r.label)
