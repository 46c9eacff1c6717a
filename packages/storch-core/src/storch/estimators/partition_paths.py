"""How a class's later partition steps are made (paper, section 3.2; docs/partitions.md, 'For estimator authors'):
by its ``extend``, by ``extend`` returning the output, or by its own components, or refused, decided once per class
from the partition hooks and components it overrides and where in its MRO (:func:`_partition_path`, cached in
``_STEP_PATH``). A decision about the class, read by every step of every partition of it
(:mod:`storch.estimators.partition_steps`) and by ``Estimator._storch_forward``'s plain-step condition."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import Estimator
else:  # the class is defined above this module (storch.estimators.base imports it): bound there, read at call time
    Estimator = None


# The partition hooks: what a later step of a partition calls (Estimator.extend draws with draw and scores with
# step_gradient_function), each with the components it stands in for at a later step. The base class's hooks are
# written for its own components (a draw from p, l = log p, the sample handed out); an estimator that overrides
# components and no hook has its later steps made from its components (_components_step)
_PARTITION_HOOKS = ("extend", "step_gradient_function", "draw")
_HOOKS_OF = {"gradient_function": ("step_gradient_function", "extend"), "proposal": ("draw", "extend"),
             "output": ("extend",), "weighting_function": ("extend",)}
_DOES = {"gradient_function": "scored", "proposal": "drawn", "output": "handed out", "weighting_function": "weighted"}
# how a later step of a class is made (per class, computed at its first step 1): by extend; by extend, which must
# return the output (the class overrides output); by its components; or a str: why it is refused
_BY_EXTEND, _BY_EXTEND_OUTPUT, _BY_COMPONENTS = 0, 1, 2
_STEP_PATH: dict[type, Any] = {}


def _depth(cls: type, name: str) -> int:
    """The position in ``cls.__mro__`` of the class that defines ``name`` (smaller: more derived)."""
    return next(i for i, k in enumerate(cls.__mro__) if name in k.__dict__)


def _partition_path(cls: type) -> Any:
    """How a later step of a partition of ``cls`` is made (cached in ``_STEP_PATH``): ``_BY_COMPONENTS`` if it
    overrides no partition hook (below :class:`Estimator`); else by ``extend`` (``_BY_EXTEND_OUTPUT`` if it
    overrides ``output``, which extend must then return), provided every component it overrides at MRO depth d
    has one of its hooks (``_HOOKS_OF``) overridden at depth <= d (the same class or a subclass: written with the
    component in view); else a str, the end of the message that refuses step 1 (a silently wrong step: e.g. a
    class overriding draw and gradient_function together got l_t = log p from the base step_gradient_function).
    Checked at step 1, not at the class: a subclass used only for single nodes is fine."""
    base = cls.__mro__.index(Estimator)
    depth = {n: _depth(cls, n) for n in _PARTITION_HOOKS + tuple(_HOOKS_OF)}
    if all(depth[h] >= base for h in _PARTITION_HOOKS):
        how = _BY_COMPONENTS if any(depth[c] < base for c in _HOOKS_OF) else _BY_EXTEND
    else:
        late = [c for c, hooks in _HOOKS_OF.items() if depth[c] < base and min(depth[h] for h in hooks) > depth[c]]
        if late:
            def where(n):
                return f"{cls.__mro__[depth[n]].__qualname__}.{n}"

            def owner(c):
                k = cls.__mro__[depth[c]].__qualname__
                return k if k == cls.__qualname__ else f"{cls.__qualname__} (in {k})"
            parts = "; and ".join(
                f"{owner(c)} overrides {c} without {' or '.join(_HOOKS_OF[c])} in that class or a subclass: a "
                f"later step would be {_DOES[c]} by {' / '.join(where(h) for h in _HOOKS_OF[c])}, written without "
                f"it, not by {c}" for c in late)
            how = (f"{parts}. storch cannot tell whether step t >= 1 made that way is what your components would "
                   "make (where they differ, a silently wrong gradient or value). Override extend(node, "
                   "distribution, plates) in that class or a subclass, returning step t's (sample, l_t), or "
                   "(sample, l_t, output) where output is overridden, made with your components (or override "
                   "step_gradient_function(node, distribution, sample, plates) if only the gradient function "
                   "differs, draw(distribution, shape) if only the proposal does); where the base class's hook is "
                   "right for your component (a proposal of n i.i.d. draws from p, as Estimator.draw makes them: "
                   "rsample with requires_rsample, else sample), say so in the class: `draw = storch.Estimator.draw`. "
                   "Or set supports_partitions = False, or create one estimator per stochastic node "
                   "(docs/partitions.md, 'For estimator authors')")
        else:
            how = _BY_EXTEND_OUTPUT if depth["output"] < base else _BY_EXTEND
    _STEP_PATH[cls] = how
    return how
