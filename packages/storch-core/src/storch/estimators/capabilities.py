"""What an estimator class can do and needs: ``supports`` / ``requirements`` (the capability attributes matched
against a distribution), the capability attributes checked at registration and first instantiation
(:func:`capability_problem`, :func:`replay_problem`), and whether a gradient function is the score log p
(:func:`_is_score_function`, a written-out log p found by :func:`_detect_log_p_gradient`)."""

from __future__ import annotations

import contextvars
import dataclasses
import inspect
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any, Callable, Generic, Optional, TypeVar

import torch
from torch.distributions import Distribution, Independent, TransformedDistribution

from ..distributions import base_distribution, holds_grad, straight_through_rsample, undifferentiable_rsample
from ..errors import UnsupportedDistributionError
from ..graph import is_tracing
from ..graph.node import Node
from ..conditions.score import moving_support

if sys.version_info >= (3, 10):
    from typing import Concatenate, ParamSpec
else:  # (a dependency of torch; storch-core requires it on 3.9)
    from typing_extensions import Concatenate, ParamSpec

if TYPE_CHECKING:
    from .base import Estimator
else:  # the class is defined above this module (storch.estimators.base imports it): bound there, read at call time
    Estimator = None


_P = ParamSpec("_P")
_R = TypeVar("_R")


class _instance_or_class(Generic[_P, _R]):
    """A method bound to the instance when called on one, else to the class (capability checks)."""

    def __init__(self, func: Callable[Concatenate[Any, _P], _R]) -> None:
        self.__func__ = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, cls: Any = None) -> Callable[_P, _R]:
        return types.MethodType(self.__func__, cls if obj is None else obj)


_REPLAY_FLAGS = ("replays_update", "update_uses_loss_graph")


def replay_problem(est: Any) -> Optional[str]:
    """What an estimator class or instance that sets ``replays_update`` lacks, or ``None``: ``update_inputs`` and
    ``update_from`` (and ``loss_graph_values`` with ``update_uses_loss_graph = True``), which the default
    ``update_parameters`` and ``storch.compile``'s replay call. Without this check the base class's
    ``NotImplementedError`` came at the first update, after the step's backward pass."""
    if est.replays_update is not True:  # (a class may also hold a property an instance computes)
        return None
    cls = est if isinstance(est, type) else type(est)
    missing = [sig for attr, sig in (("update_inputs", "update_inputs(nodes)"), ("update_from", "update_from(inputs)"))
               if getattr(cls, attr) is getattr(Estimator, attr)]
    if est.update_uses_loss_graph is True and cls.loss_graph_values is Estimator.loss_graph_values:
        missing.append("loss_graph_values(loss, inputs) (it sets update_uses_loss_graph = True)")
    if not missing:
        return None
    return (f"replays_update = True but does not implement {' and '.join(missing)}: storch.backward() (whose "
            "default update_parameters is update_from(update_inputs(nodes))) and storch.compile's replay call "
            f"them. Implement {'them' if len(missing) > 1 else 'it'} (docs/writing-an-estimator.md, 'An update that "
            "storch.compile replays'), or leave replays_update False (an update that storch.compile cannot replay: "
            "override update_parameters instead)")


def capability_problem(cls: type) -> Optional[str]:
    """What is wrong with the capability attributes ``distributions``, ``State`` and ``replays_update`` of an
    estimator class, or ``None``: checked at registration and when the class is first instantiated, so that a
    malformed attribute is a named error there, not a ``TypeError`` (or ``NotImplementedError``) deep in a
    later call."""
    replay = replay_problem(cls)
    if replay is not None:
        return replay
    d = cls.distributions
    if d is not None and not (isinstance(d, tuple) and all(isinstance(t, type) for t in d)):
        example = d.__name__ if isinstance(d, type) else "Bernoulli"
        return (f"distributions={d!r}; use None (any) or a tuple of distribution classes, "
                f"e.g. distributions = ({example},)")
    state = cls.State
    if state is None:
        return None
    if not (isinstance(state, type) and dataclasses.is_dataclass(state)):
        return f"State={state!r}; use None or a dataclass whose fields all have defaults"
    missing = [f.name for f in dataclasses.fields(state) if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        # node.state = State() is created for every node before proposal, with no arguments
        return (f"State={state.__qualname__} whose field(s) {', '.join(missing)} have no default; every field of "
                "State needs one (node.state = State() is made for each node before proposal fills it), "
                "e.g. `kappa: Optional[torch.Tensor] = None`")
    return None


_BASE_SUPPORTS: dict[type, bool] = {}
_LOWERS_ORDER: dict[type, bool] = {}


_SCORE_FUNCTION: dict[type, bool] = {}


def _is_score_function(est) -> bool:
    """``score_function`` of an estimator (instance or class); where it is ``None``, whether its gradient
    function is the base class's log p (cached per class)."""
    v = est.score_function
    if v is None:
        cls = est if isinstance(est, type) else type(est)
        v = _SCORE_FUNCTION.get(cls)
        if v is None:
            v = _SCORE_FUNCTION[cls] = cls.gradient_function is Estimator.gradient_function
    return v


# (estimator class, distribution type) -> whether the class's overridden gradient function returns log p(x)
# for that type: decided at the first node of a type whose log p may have a kink or whose support may move,
# for a class that leaves score_function None (the default guesses from the method, not from its values)
_LOG_P_GRADIENT: dict[tuple[type, type], bool] = {}


def _detect_log_p_gradient(est: Estimator, node: Node, raw: Distribution) -> None:
    """An overridden gradient function that returns ``node.log_prob(sample)`` (a masking / eos variant
    written out: equal where it is nonzero) is a score function although ``score_function`` was not
    set: the refusals of a score function apply to it (a moving support: refused here; a kink of log p
    at order >= 2: :func:`_is_score_node` tells the surrogate). One ``log_prob`` and one comparison per
    (class, distribution type), eager only, once the parameters require grad; then a dict lookup."""
    key = (type(est), type(raw))
    found = _LOG_P_GRADIENT.get(key)
    if found is None:
        g = node.gradient_values
        if (is_tracing() or not isinstance(g, torch.Tensor) or g.is_meta
                or torch._C._functorch.is_batchedtensor(g)):
            return  # (decided at an eager call with values)
        if not (g.requires_grad and holds_grad(raw)):
            return  # nothing to tell (frozen parameters, or no gradient through l at all): ask again later
        try:
            with torch.no_grad():
                lp = node.log_prob(node.sample)
        except (ValueError, RuntimeError, NotImplementedError):  # samples outside the support (relaxed): not log p
            lp = None
        g = g.detach()
        nonzero = g != 0
        if lp is not None and g.shape == lp.shape and not bool(nonzero.any()):
            return  # every value masked to 0: nothing to compare, no verdict (cached, it would stick): ask again later
        # in l's dtype: a float16 / bfloat16 node's l is widened to float32 (cost._widened), its log p is not
        found = lp is not None and g.shape == lp.shape and torch.allclose(g[nonzero], lp[nonzero].to(g.dtype))
        _LOG_P_GRADIENT[key] = found
    if found:
        moved = moving_support(raw)
        if moved:
            raise UnsupportedDistributionError(
                est._moving_support_message(raw, moved) + f". ({type(est).__qualname__} leaves score_function unset, "
                "but its gradient_function returns log p(x): storch takes it for a score function. Set "
                "score_function = True to say so, or score_function = False if the estimator accounts for the "
                "boundary term itself)")


def _is_score_node(node: Node) -> bool:
    """Whether ``node``'s gradient function is the score log p: its estimator's ``score_function``, or
    (where that is unset) an overridden gradient function found to return log p (:func:`_detect_log_p_gradient`)."""
    est = node.estimator
    return _is_score_function(est) or (est.score_function is None
                                       and _LOG_P_GRADIENT.get((type(est), type(node.distribution)), False))


# the estimator classes whose check_distribution is running (Estimator.supports then does not ask it again)
_CHECKING: "contextvars.ContextVar[frozenset]" = contextvars.ContextVar("storch_checking_distribution",
                                                                      default=frozenset())


def _supports_unconsulted(est: "Estimator", d: Distribution) -> bool:
    """``est.supports(d)`` from inside ``est``'s check_distribution: the base supports does not ask the
    check again (no recursion, no second check per node)."""
    token = _CHECKING.set(_CHECKING.get() | {type(est)})
    try:
        return est.supports(d)
    finally:
        _CHECKING.reset(token)


# a class's ``_storch_default_instance`` (in its own __dict__): its instance with default options (None: its
# constructor needs arguments), for _accepted_by_check
_MISSING_INSTANCE = object()


def _accepted_by_check(est: Any, d: Distribution) -> bool:
    """Whether ``est``'s own :meth:`Estimator.check_distribution` (an override) accepts ``d``; True where the
    class does not override it, or while a check runs (its own, or another's asked here, whose refusal message
    lists supporting estimators too: that list, discarded, is not asked again, so the checks do not nest).
    ``est``: an instance, or a class (asked through an instance with default options; True where none can be
    built)."""
    owner = est if isinstance(est, type) else type(est)
    if owner.check_distribution is Estimator.check_distribution or _CHECKING.get():
        return True
    token = _CHECKING.set(_CHECKING.get() | {owner})
    try:
        with torch.random.fork_rng(devices=[]):  # a learned part built with default options draws its init
            if isinstance(est, type):
                est = owner.__dict__.get("_storch_default_instance", _MISSING_INSTANCE)
                if est is _MISSING_INSTANCE:
                    # built once per class (warnings.catch_warnings resets the warnings already shown once, and
                    # is not thread-safe: not at every query; review r-24)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            est = owner(plate="supports")
                    except Exception:  # noqa: BLE001  (a constructor that needs arguments: the attributes decide)
                        est = None
                    # kept on the class (a WeakKeyDictionary's value, an instance, kept its key alive: review r-25)
                    type.__setattr__(owner, "_storch_default_instance", est)
                if est is None:
                    return True
            try:
                est.check_distribution(d)
            except Exception:  # noqa: BLE001  (the factory would raise it too: not supported)
                return False
            return True
    finally:
        _CHECKING.reset(token)


def _meets_requirements(est, d: Distribution) -> bool:
    """The type requirements of :meth:`Estimator.supports` (``est``: an instance or a class)."""
    if est.distributions is not None and not isinstance(base_distribution(d), est.distributions):
        return False
    if est.requires_rsample and (not d.has_rsample or straight_through_rsample(d) or undifferentiable_rsample(d)):
        return False  # (a straight-through rsample is no pathwise derivative: a biased estimate; Wishart's raises)
    if est.requires_expand and not implements_expand(d):
        return False
    return not est.requires_enumerate_support or d.has_enumerate_support


def implements_expand(d: Distribution) -> bool:
    """Whether ``d.expand`` is implemented: its class (or, under torch's ``Independent`` and
    ``TransformedDistribution``, which expand their base, the base's) overrides ``Distribution.expand``, and
    not by inheriting a torch class's ``expand`` with an ``__init__`` of its own (``class CountOf4(Binomial)``
    whose ``__init__(self, logits)`` calls ``Binomial(4, logits=logits)``): torch's ``expand`` then raises
    NotImplementedError, as it cannot build the subclass (``_get_checked_instance``); vimco said it
    supported such a class and then failed at its call."""
    while True:
        owner = next((c for c in type(d).__mro__ if "expand" in c.__dict__), Distribution)
        if owner is Distribution:
            return False
        if owner.__module__.startswith("torch.distributions") and type(d).__init__ is not owner.__init__:
            return False  # (torch's test in _get_checked_instance)
        if owner is Independent or owner is TransformedDistribution:
            d = d.base_dist
            continue
        return True


def _lowers_order(cls: type) -> bool:
    """Whether :meth:`Estimator.max_order_for` may lower ``cls``'s order for a distribution: it has
    ``requires_rsample`` or overrides the method (cached per class; the others are not asked)."""
    r = _LOWERS_ORDER.get(cls)
    if r is None:
        r = _LOWERS_ORDER[cls] = bool(cls.requires_rsample) or cls.max_order_for is not Estimator.max_order_for
    return r


def _base_supports(cls: type) -> bool:
    """Whether ``cls`` keeps the base class's :meth:`Estimator.supports` (cached per class)."""
    r = _BASE_SUPPORTS.get(cls)
    if r is None:
        r = _BASE_SUPPORTS[cls] = inspect.getattr_static(cls, "supports") is Estimator.__dict__["supports"]
    return r
