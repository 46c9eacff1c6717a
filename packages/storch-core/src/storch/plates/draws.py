"""Untracked draws: a random draw from a distribution whose parameters require grad, outside storch's nodes.

``Categorical(logits=h).sample()`` on plate tensors ``h`` computed from parameters draws a value that carries no
gradient to ``h``: torch's ``sample`` draws with ``torch.multinomial`` / ``bernoulli`` / ``poisson`` /
``binomial`` (which have no derivative) or under ``torch.no_grad()``. No estimator sees the draw, so its
score-function term is missing from the surrogate and the gradient of the expected cost is biased (scheduled
sampling written as ``q.sample()``: 41% off, found by porting). The dispatcher reports such a draw with an
:class:`storch.UntrackedDrawWarning` (once per call site, by the warnings module's default filter):

- a call of a function of :data:`DRAWS` with an operand (the probabilities, rates) that requires grad, in any grad
  mode (``Categorical.sample`` calls ``torch.multinomial`` on its probabilities with grad enabled);
- a call under ``torch.no_grad()`` with a plate operand that requires grad, made (through storch's and torch's
  own frames) by the ``sample`` of a ``torch.distributions`` distribution: ``Bernoulli``, ``Poisson``,
  ``Binomial``, ``Geometric`` and ``NegativeBinomial`` read their parameters there, and the ``sample`` of every
  reparameterizable distribution is its ``rsample`` under ``no_grad``.

Parameters that need no grad (``logits.detach()``, an environment's fixed probabilities) and noise drawn with
``torch.rand_like`` give no warning; nor does a pathwise ``rsample`` with grad enabled. storch's estimators draw
from their distributions' raw tensors, which never reach the dispatcher.
"""

from __future__ import annotations

import sys
import warnings

import torch

from .._util.stacklevel import user_stacklevel
from ..errors import UntrackedDrawWarning
from .tensor import PlateTensor
from .treatments import describe

__all__ = ["DRAWS", "watch_draw", "check_no_grad_call", "untracked_draw_message"]

_PT = PlateTensor
_T = torch.Tensor


def _draws() -> frozenset:
    out = set()
    for n in ("multinomial", "bernoulli", "poisson", "binomial"):
        out.update(f for f in (getattr(torch, n, None), getattr(_T, n, None)) if f is not None)
    out.add(_T.bernoulli_)
    return frozenset(out)


# The random functions without a derivative whose operand is a distribution's parameter (probabilities, rates):
# their draw is a plain value whatever the grad mode. (torch.normal, _standard_gamma, _sample_dirichlet have
# pathwise derivatives; rand_like / randn_like / dropout read no parameter.)
DRAWS: frozenset = _draws()


def _needs_grad(a) -> bool:
    if type(a) is _PT:
        return a._raw.requires_grad
    return isinstance(a, _T) and a.requires_grad


def _parameters(func, args, kwargs) -> tuple:
    """The operands of a call of a :data:`DRAWS` function that are the distribution's parameters."""
    if func is _T.bernoulli_:  # x.bernoulli_(p): x is only written to
        p = args[1] if len(args) > 1 else kwargs.get("p")
        return (p,)
    p = args[1] if len(args) > 1 else kwargs.get("p")
    if func in (torch.bernoulli, _T.bernoulli) and isinstance(p, (int, float)):
        return ()  # torch.bernoulli(x, 0.5): x gives the shape only
    return tuple(args) + tuple(v for k, v in kwargs.items() if k not in ("out", "generator"))


def watch_draw(impl):
    """``impl`` of a function of :data:`DRAWS`, which first warns where a parameter operand requires grad."""
    def run(func, args, kwargs):
        if not torch.is_inference_mode_enabled() and any(_needs_grad(a) for a in _parameters(func, args, kwargs)):
            _warn(func, _sampling_distribution(sys._getframe(1)))
        return impl(func, args, kwargs)
    return run


def check_no_grad_call(func, args, kwargs) -> None:
    """Called by the dispatcher for a call under ``torch.no_grad()``: warns where an operand is a plate tensor that
    requires grad and the call is made by a ``torch.distributions`` ``sample``."""
    for a in args:
        if type(a) is _PT and a._raw.requires_grad:
            break
    else:
        if not kwargs or not any(type(a) is _PT and a._raw.requires_grad for a in kwargs.values()):
            return
    if torch.is_inference_mode_enabled():
        return
    dist = _sampling_distribution(sys._getframe(1))
    if dist is not None:
        _warn(func, dist)


_NO_DIST = object()


def _sampling_distribution(frame):
    """The distribution whose ``sample`` (a ``torch.distributions`` method) made the call, among the frames from
    ``frame`` outward that are storch's and torch's (the outermost such ``sample``: ``OneHotCategorical.sample``
    calls ``Categorical.sample``); ``None`` where there is none before the first frame of other code, and
    :data:`_NO_DIST` where one is found without its ``self``."""
    found = None
    for _ in range(32):
        if frame is None:
            break
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith(("storch.", "torch.")) or name in ("storch", "torch")):
            break
        if frame.f_code.co_name == "sample" and name.startswith("torch.distributions"):
            found = frame
        frame = frame.f_back
    if found is None:
        return None
    dist = found.f_locals.get("self")
    return _NO_DIST if dist is None else dist


def untracked_draw_message(func, dist) -> str:
    """The warning's message: what was drawn, why its gradient is biased, and the two fixes."""
    if dist is None:
        what = (f"{describe(func)} draws from probabilities (or rates) that require grad, and its result carries no "
                "gradient to them")
        node = "a storch node of the distribution: `storch.estimator(\"score\", plate=\"y\")(Categorical(probs=p))`"
        detached = "`torch.multinomial(p.detach(), 1)`"
    else:
        name = "a distribution" if dist is _NO_DIST else f"{type(dist).__name__}"
        what = (f"{name}(...).sample() draws from a distribution whose parameters require grad, and the draw "
                "carries no gradient to them")
        est = ("\"reparameterization\"" if getattr(dist, "has_rsample", False) else "\"score\"")
        node = ("a storch node: `storch.estimator(" + est + ", plate=\"y\")(dist)` (or any estimator that supports "
                "the distribution) instead of `dist.sample()`")
        detached = "`Categorical(logits=logits.detach()).sample()`"
    return (
        f"{what}: the draw's score-function term is missing from the surrogate, so the gradient of the expected "
        "cost is biased (storch cannot see a plain draw; to every estimator it is a constant). For an unbiased "
        f"gradient make it {node}. Where no gradient through the draw is wanted (an environment's transition, the "
        f"token of scheduled sampling), sample from detached parameters, {detached}: that says so, and gives no "
        "warning (docs/partitions.md, \"Stochastic environments and options\")")


def _warn(func, dist) -> None:
    warnings.warn(untracked_draw_message(func, dist), UntrackedDrawWarning, stacklevel=user_stacklevel())
