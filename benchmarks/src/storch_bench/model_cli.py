"""``storch-compare model FILE:FUNCTION``: rank the installed estimators on the user's own model.

Loads ``FUNCTION`` (default ``step``) from the Python file ``FILE``, runs
:func:`storch_bench.compare_estimators` on it and writes ``model.md``, ``model.csv`` and
``model.png`` (variance against time per step, log scales) to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from typing import Callable

from .model_compare import MIN_BIAS_ESTIMATES, BadReferenceError, Comparison, compare_estimators
from .report import header, markdown_table, text_table, write_csv
from .roster import bad_spec_advice

__all__ = ["load_step", "TargetError", "text", "markdown", "write", "plot_model", "run", "HEADER"]

HEADER = ["estimator", "biased", "max_order", "variance", "rel. bias", "bias z", "ms/step", "peak MB",
          "cost evals", "variance x ms", "note"]


class TargetError(LookupError):
    """``FILE:FUNCTION`` names no file, or no function of that file: the command line is wrong, not the model
    (an error raised while the file runs is the model's, and keeps its traceback)."""


def load_step(target: str) -> Callable:
    """``"path/to/file.py:step"`` -> the function ``step`` of that file (``:step`` may be omitted).

    Raises:
        TargetError: no such file, or no such function in it.
    """
    path, sep, name = target.rpartition(":")
    if not sep or not path or "/" in name or "\\" in name or name.endswith(".py"):
        path, name = target, "step"
    file = Path(path)
    if not file.is_file():
        raise TargetError(f"no such file {str(file)!r}; write storch-compare model path/to/model.py:step")
    spec = importlib.util.spec_from_file_location(f"storch_compare_user_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))  # the file may import its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(file.resolve().parent))
    fn = getattr(module, name, None)
    if not callable(fn):
        found = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise TargetError(f"{file} has no function {name!r}; write FILE:FUNCTION (functions there: "
                             f"{', '.join(found) or 'none'})")
    return fn


def _order(o: float) -> str:
    return "inf" if o == math.inf else str(int(o))


def _rows(c: Comparison) -> list[list]:
    return [[r.label, r.biased, _order(r.max_order), r.variance, r.rel_bias, r.bias_z, r.ms_per_step, r.peak_mb,
             r.cost_evals or "-", r.efficiency, r.note] for r in c.rows]


def bias_rule(estimates: int) -> str:
    """What the bias z column means at this many estimates."""
    if estimates >= MIN_BIAS_ESTIMATES:
        return "bias z = split-half z-test of the bias (> 4: biased)"
    return (f"rel. bias and bias z not computed: {estimates} estimates are too few for the bias z-test (from "
            f"{MIN_BIAS_ESTIMATES} on; below, an unbiased estimator's |z| exceeds 4 in 0.1-16% of rows)")


def setup(c: Comparison) -> str:
    what = "gradient" if c.order == 1 else f"order-{c.order} derivative (along a fixed random direction)"
    ref = (c.reference if c.reference_mean is None else f"{c.reference}, exact (deterministic)"
           if c.reference_estimates == 1 else f"the mean of {c.reference_estimates} estimates of {c.reference}")
    return (f"Model: {', '.join(c.distributions)}; {c.n_params} parameters. Per estimator: {c.estimates} estimates "
            f"of the {what} at the same parameters (seed {c.seed}). variance = trace of their covariance; "
            f"reference = {ref}; rel. bias = |mean - reference| / |reference| with the noise's share removed; "
            f"{bias_rule(c.estimates)}; ms/step = one estimate (the step, the "
            "surrogate, the derivative), the fastest of the repeats (slower ones measure other processes, as "
            f"in timeit); peak MB = {c.memory}, one estimate; cost evals = samples per data point at which the "
            "cost is evaluated; variance x ms: lower is better. Rows best first")


def _skipped(c: Comparison) -> str:
    return "\n".join(f"- {label}: {why}" for label, why in c.skipped)


def text(c: Comparison) -> str:
    """The comparison as a terminal table, with what did not take part."""
    out = text_table(HEADER, _rows(c))
    if c.skipped:
        out += "\n\nDid not take part:\n" + _skipped(c)
    return out + f"\n\n{setup(c)}."


def markdown(c: Comparison, title: str = "storch-compare model") -> str:
    """The comparison as a Markdown document (table, setup, skipped estimators)."""
    md = f"# {header(title)}\n{setup(c)}.\n\n{markdown_table(HEADER, _rows(c))}\n"
    if c.skipped:
        md += f"\nDid not take part:\n\n{_skipped(c)}\n"
    return md


def plot_model(c: Comparison, path: Path) -> None:
    """Variance against time per step (log scales), one point per estimator; zero variance at the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in c.rows if r.ok and math.isfinite(r.variance) and math.isfinite(r.ms_per_step)]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    positive = [r.variance for r in rows if r.variance > 0]
    floor = min(positive) / 10 if positive else 1e-12
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(rows):
        zero = r.variance <= 0
        marker = "v" if zero else ("s" if r.biased else "o")
        ax.scatter(r.ms_per_step, floor if zero else r.variance, color=cmap(i % 10), marker=marker, s=50,
                   label=r.label + (" (zero variance)" if zero else "") + (" (biased)" if r.biased else ""))
        ax.annotate(r.label, (r.ms_per_step, floor if zero else r.variance), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if rows:  # lines of equal variance x time: points on a line are equally efficient
        xs = [r.ms_per_step for r in rows]
        lo, hi = min(xs) / 1.5, max(xs) * 1.5
        for r in rows[:3]:
            if r.variance > 0:
                k = r.variance * r.ms_per_step
                ax.plot([lo, hi], [k / lo, k / hi], color="0.8", lw=0.8, zorder=0)
        ax.set_xlim(lo, hi)
    ax.set_xlabel("ms per step (fastest of the estimates)")
    ax.set_ylabel("gradient variance (trace of covariance)" if c.order == 1 else f"order-{c.order} variance")
    ax.set_title("variance vs time per step (lower left is better; grey: equal variance x time)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(c: Comparison, out: Path, title: str = "storch-compare model") -> list[Path]:
    """Write ``model.md``, ``model.csv`` and ``model.png`` to ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "model.md", out / "model.csv", out / "model.png"]
    paths[0].write_text(markdown(c, title))
    write_csv(paths[1], ["estimator", "biased", "max_order", "variance", "rel_bias", "bias_z", "ms_per_step",
                         "peak_mb", "cost_evals", "variance_x_ms", "note"],
              [[r.label, r.biased, _order(r.max_order), r.variance, r.rel_bias, r.bias_z, r.ms_per_step, r.peak_mb,
                r.cost_evals, r.efficiency, r.note] for r in c.rows]
              + [[label, "", "", "", "", "", "", "", "", "", "skipped: " + why] for label, why in c.skipped])
    plot_model(c, paths[2])
    return paths


def add_arguments(p: argparse.ArgumentParser, at_least: Callable[[int], Callable[[str], int]],
                  spec: Callable[[str], str]) -> None:
    p.add_argument("target", metavar="FILE:FUNCTION", help="the Python file and its function step(est) "
                   "(default function name: step)")
    p.add_argument("--estimates", type=at_least(4), default=32, help="derivative estimates per estimator (default "
                   f"32, at least 4); the bias z-test and rel. bias only from {MIN_BIAS_ESTIMATES} on (below, an "
                   "unbiased estimator shows |z| > 4 in 0.1-16%% of rows: README, 'Which estimator for my model?')")
    p.add_argument("--order", type=at_least(1), default=1, help="derivative order the model needs (default 1); "
                   "estimators not unbiased to it are skipped")
    p.add_argument("--warmup", type=at_least(0), default=20, help="storch.backward() steps before measuring "
                   "(default 20)")
    p.add_argument("--reference", default=None, type=spec, help="spec of the unbiased reference (default expect@1, "
                   "else score[baseline=leave_one_out]@SAMPLES); one that cannot run on the model is refused")
    p.add_argument("--reference-estimates", type=at_least(MIN_BIAS_ESTIMATES), default=256, help="estimates "
                   f"averaged by a stochastic reference (default 256, at least {MIN_BIAS_ESTIMATES})")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")


def run(args: argparse.Namespace) -> int:
    try:
        step = load_step(args.target)
    except TargetError as e:
        print(f"storch-compare model: error: argument FILE:FUNCTION: {e}", file=sys.stderr)
        return 2
    try:
        c = compare_estimators(step, args.estimators, estimates=args.estimates, order=args.order,
                               warmup=args.warmup, reference=args.reference,
                               reference_estimates=args.reference_estimates, seed=args.seed,
                               samples=args.samples or 8, measure_memory=not args.no_memory,
                               progress=not args.no_progress)
    except BadReferenceError as e:
        print(f"storch-compare model: error: argument --reference: {e}", file=sys.stderr)
        return 2
    title = f"storch-compare model {args.target}"
    paths = write(c, args.out, title)
    print(markdown(c, title))
    errors = [r for r in c.rows if not r.ok]
    if errors:
        print(f"\n{len(errors)} estimator(s) failed on this model (error rows above)")
    print("\nWrote " + ", ".join(map(str, paths)))
    advice = None if c.rows else bad_spec_advice(c.skipped)
    if advice:
        print("\n" + advice)
    return 2 if advice else 0
