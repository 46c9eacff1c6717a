"""Which estimators take part: every registered one that supports the model's distribution.

An estimator is named by a spec string ``name[option=value,...]@n``: ``score@1``,
``score[baseline=leave_one_out]@5``, ``gumbel_softmax[temperature=0.5]@1``. ``auto`` stands
for every installed estimator (via ``storch.available_estimators()``), with the presets below
for estimators that are usually run with several samples. Whether an estimator supports a
distribution is read from its class attributes (``distributions``, ``requires_rsample``,
``requires_enumerate_support``, ``max_order``); an estimator that still raises
``storch.UnsupportedDistributionError`` when built or on its first step is skipped with a note.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import storch
from storch.extending import base_distribution

__all__ = ["Spec", "parse_spec", "parse_specs", "resolve", "supports", "build", "skip_reason", "bad_spec",
           "bad_spec_advice", "PRESETS"]

# estimators usually compared with several samples (Table 1 of the Storchastic paper): name -> specs
PRESETS: dict[str, list[str]] = {
    "score": ["score@1", "score[baseline=leave_one_out]@{n}", "score[baseline=learned]@1"],
    "unordered_set": ["unordered_set@{n}"],
    # 1 memory value + n - 1 samples: n cost evaluations per step, as unordered_set@n
    "sum_and_sample": ["sum_and_sample@1", "sum_and_sample[n_enumerate=1,baseline=leave_one_out]@{n1}"],
}
SHORT = {("baseline", "leave_one_out"): "loo", ("baseline", "batch_average"): "loo",
         ("baseline", "moving_average"): "ma", ("baseline", "none"): "nobaseline",
         ("baseline", "learned"): "nvil", ("baseline", "greedy"): "greedy"}

_SPEC = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*(?:\[(.*)\])?\s*(?:@\s*(\d+))?\s*$")


@dataclass(frozen=True)
class Spec:
    """One estimator configuration: a registry name, options and a sample count.

    ``cls`` may hold an estimator class directly (one that is not registered, e.g. in tests);
    otherwise the class is looked up with ``storch.get_estimator_class(name)``.
    """

    name: str
    n_samples: int = 1
    options: tuple[tuple[str, Any], ...] = ()
    cls: Optional[type] = field(default=None, compare=False)

    @property
    def label(self) -> str:
        opts = []
        for k, v in self.options:
            opts.append(SHORT.get((k, v), f"{k}={v}"))
        inner = f"[{','.join(opts)}]" if opts else ""
        return f"{self.name}{inner}@{self.n_samples}"

    def estimator_class(self) -> type:
        return self.cls if self.cls is not None else storch.get_estimator_class(self.name)


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip()


def parse_spec(text: str) -> Spec:
    """``"score[baseline=leave_one_out]@5"`` -> ``Spec("score", 5, (("baseline", "leave_one_out"),))``."""
    m = _SPEC.match(text)
    if not m:
        raise ValueError(f"cannot read estimator spec {text!r}; write name[option=value,...]@n, e.g. score@1")
    name, opts, n = m.group(1), m.group(2), m.group(3)
    options = []
    for item in filter(None, (o.strip() for o in (opts or "").split(","))):
        if "=" not in item:
            raise ValueError(f"option {item!r} in spec {text!r} is not of the form option=value")
        k, v = item.split("=", 1)
        options.append((k.strip(), _value(v)))
    if n is not None and int(n) < 1:
        raise ValueError(f"estimator spec {text!r} asks for {n} samples; write @n with n >= 1")
    return Spec(name, int(n) if n else 1, tuple(options))


def _split(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def parse_specs(text: str, n_multi: int = 5) -> list[Spec]:
    """A comma-separated list of specs; ``auto`` expands to every installed estimator.

    Args:
        text: e.g. ``"auto"``, ``"score@1,score[baseline=leave_one_out]@8"`` or ``"auto,score@8"``.
        n_multi: the sample count of the multi-sample presets (``score[loo]@n``, ``unordered_set@n``).
    """
    specs: list[Spec] = []
    for part in _split(text):
        if part == "auto":
            for name in storch.available_estimators():
                for s in PRESETS.get(name, [f"{name}@1"]):
                    specs.append(parse_spec(s.format(n=n_multi, n1=max(n_multi - 1, 2))))
        else:
            specs.append(parse_spec(part))
    seen, unique = set(), []
    for s in specs:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def supports(cls: type, d, options: tuple[tuple[str, Any], ...] = ()) -> Optional[str]:
    """``None`` if estimator class ``cls`` (with the spec's ``options``) can train a model whose latent is ``d``;
    else why not. An option may widen what an instance takes (``gumbel_softmax[categorical=one_hot]``: a
    Categorical): then the instance's check decides."""
    if not cls.supports(d) and not _instance_supports(cls, d, options):  # storch.Estimator.supports; the words:
        base = base_distribution(d)
        if cls.distributions is not None and not isinstance(base, cls.distributions):
            hint = ""
            if type(base).__name__ == "Categorical" and "categorical" in cls.options():  # the relaxations
                hint = (" (its sample would be a one-hot vector, not an index: use OneHotCategorical, or "
                        f"{cls.name}[categorical=one_hot] for a model written for one-hot vectors)")
            return f"supports {', '.join(t.__name__ for t in cls.distributions)}, not {type(base).__name__}{hint}"
        return f"needs {' and '.join(cls.requirements())}, which {type(base).__name__} lacks"
    if getattr(cls, "multi_sample_bound", False):  # vimco: the model must be written for it (est.bound)
        return ("estimates the gradient of a multi-sample bound that the model adds with est.bound(log_w); "
                "this model's costs are per sample")
    if cls.max_order < 1:
        return f"max_order={cls.max_order}: no unbiased gradient"
    return None


def _instance_supports(cls: type, d, options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether an instance of ``cls`` built with ``options`` supports ``d`` (False without options, or where the
    options do not build one: the run reports that error)."""
    if not options:
        return False
    try:
        return bool(cls(plate="roster", **dict(options)).supports(d))
    except (storch.StorchError, TypeError, ValueError):
        return False


def build(spec: Spec, cls: type):
    """Create the estimator for ``spec`` (the sample plate is ``"z"``)."""
    options = dict(spec.options)
    accepted = cls.options()
    if "n_samples" in accepted:
        options["n_samples"] = spec.n_samples
    elif spec.n_samples != 1:
        raise storch.OptionError(f"{spec.name} has no n_samples option, so @{spec.n_samples} is not possible")
    if spec.cls is not None:
        return cls(plate="z", **options)
    return storch.estimator(spec.name, plate="z", **options)


# the reasons that are a mistake in a spec (a misspelt name or option), not a limit of an estimator or of
# what is installed: no install advice for them, and a run where nothing ran because of them fails
UNKNOWN, INVALID = "unknown estimator: ", "invalid options: "


def skip_reason(e: Exception) -> str:
    """Why a spec did not take part, from the error its lookup or construction raised.

    The registry's own message is kept (it suggests close names: "Did you mean 'score'?"); only a
    first-party name whose family is not installed is reported as "not installed", with its
    ``pip install``.
    """
    if isinstance(e, storch.UnknownEstimatorError):
        hint = re.search(r"`pip install [^`]+`", str(e))
        return f"not installed ({hint.group(0)})" if hint else UNKNOWN + str(e)
    if isinstance(e, storch.OptionError):
        return INVALID + str(e)
    return f"{type(e).__name__}: {e}"


def bad_spec(why: str) -> bool:
    """Whether a reason from :func:`skip_reason` is a mistake in the spec (fix the spec, install nothing)."""
    return why.startswith((UNKNOWN, INVALID))


def bad_spec_advice(skipped: list[tuple[str, str]]) -> Optional[str]:
    """When nothing ran: what to say if specs were wrong (the caller exits non-zero), else ``None``.

    Args:
        skipped: ``(label, reason)`` of the specs that did not take part.
    """
    bad = dict((label, why) for label, why in skipped if bad_spec(why))
    if not bad:
        return None
    reasons = "; ".join(f"{label}: {why}" for label, why in bad.items())
    return (f"Nothing ran: --estimators {', '.join(bad)}: a spec to fix ({reasons}). `python -c \"import storch; "
            "print(storch.available_estimators())\"` lists the installed estimators")


def resolve(specs: list[Spec], d) -> tuple[list[tuple[Spec, type]], list[tuple[str, str]]]:
    """Split ``specs`` into those that support distribution ``d`` and notes on the others.

    Returns:
        ``(runnable, skipped)``: ``runnable`` is a list of ``(spec, class)``; ``skipped`` a list of
        ``(label, reason)``.
    """
    runnable, skipped = [], []
    for spec in specs:
        try:
            cls = spec.estimator_class()
        except storch.UnknownEstimatorError as e:
            skipped.append((spec.label, skip_reason(e)))
            continue
        except storch.PluginError as e:
            skipped.append((spec.label, str(e)))
            continue
        why = supports(cls, d, spec.options)
        if why is not None:
            skipped.append((spec.label, why))
        else:
            runnable.append((spec, cls))
    return runnable, skipped
