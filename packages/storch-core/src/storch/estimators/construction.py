"""An estimator's constructor options: the options set after construction (checked, or refused where fixed), the
unknown-option and misspelled-option messages, the options a constructor taking ``**kwargs`` forwards to its
base, the declared options under their private names of before, the marking of construction
(:func:`_marking_construction`) and the estimators' creation order (:func:`creation_mark`). What construction does
with the options, not whether a value is accepted: that is :mod:`storch.estimators.validators` (public as
``storch.extending.options``), which an estimator's ``check_option`` calls."""

from __future__ import annotations

import difflib
import functools
import inspect
import itertools
import sys
import types
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import OptionError
from .catalog import installed_classes
from .capabilities import _instance_or_class

if TYPE_CHECKING:
    from .base import Estimator
else:  # the class is defined above this module (storch.estimators.base imports it): bound there, read at call time
    Estimator = None


# the estimators' creation order (Estimator._created): storch.compile tells an estimator made anew at every call of
# the step it traces (one with state: from scratch at every eager call, but replayed as the traced instance) by it,
# as one created again in the eager run after the trace (its replay check)
_CREATED = itertools.count()


def created_after(mark: int, est: "Estimator") -> bool:
    """Whether ``est`` was created after :func:`creation_mark` returned ``mark``."""
    return getattr(est, "_created", -1) > mark


def creation_mark() -> int:
    """A mark in the estimators' creation order (see :func:`created_after`)."""
    return next(_CREATED)


_OPTION_NAMES: "weakref.WeakKeyDictionary[type, frozenset]" = weakref.WeakKeyDictionary()
_FIXED: "weakref.WeakKeyDictionary[type, dict]" = weakref.WeakKeyDictionary()
_BASE_OPTIONS = frozenset({"plate", "n_samples"})


def _option_names(cls: type) -> frozenset:
    """The attributes whose setting after construction ``Estimator.__setattr__`` checks: the constructor's
    options, the base's own options (``plate``, ``n_samples``: a subclass whose constructor computes
    ``n_samples`` from its own options still has it), and every name in ``cls.fixed_options``."""
    names = _OPTION_NAMES.get(cls)
    if names is None:
        names = _OPTION_NAMES[cls] = frozenset(_offered_options(cls)) | _BASE_OPTIONS | frozenset(cls.fixed_options)
    return names


def _fixed_options(cls: type) -> dict:
    """``cls.fixed_options``, and the options whose name is a method or property without a setter of the class
    (an instance attribute of that name would shadow it: ``score``'s ``baseline`` method)."""
    fixed = _FIXED.get(cls)
    if fixed is None:
        fixed = {}
        for name in _option_names(cls):
            member = inspect.getattr_static(cls, name, None)
            if isinstance(member, (types.FunctionType, staticmethod, classmethod, _instance_or_class)) or (
                    isinstance(member, property) and member.fset is None):
                fixed[name] = (f"`{name}` is also the name of the estimator's method, which the attribute would "
                               "shadow, and the option is read only at construction")
        fixed.update(cls.fixed_options)
        _FIXED[cls] = fixed
    return fixed


def unknown_option_message(cls: type, key: str, who: str) -> str:
    """What ``cls(plate, **{key: ...})`` (``storch.estimator(name, plate, ...)``) says of an option ``cls`` does
    not take: the class's own hint (``unknown_option_hints``) or "Did you mean" the closest option, and its
    options (a constructor's that takes ``**kwargs``: its base's too. One a subclass passes its base itself is
    offered as well: the constructor cannot tell it from one it defaults with ``kwargs.setdefault``, which can be
    given (review r-29); giving the first gets the collision's own OptionError.) ``who``: the estimator as the
    message names it."""
    accepted = _offered_options(cls)
    told = cls.__dict__.get("unknown_option_hints", {}).get(key)  # the class's own words (not a subclass's)
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = told.strip() if told else f"Did you mean {close[0]!r}?" if close else ""
    if hint and not hint.endswith((".", "?", "!")):
        hint += "."  # a hint is one or more sentences: storch adds the punctuation around it
    return f"{who} has no option {key!r}.{' ' + hint if hint else ''} Its options are: {', '.join(accepted) or 'none'}"


# how close (difflib's ratio) a new attribute's name must be to an option's for ``est.<name> = v`` on a constructed
# estimator to be refused as a misspelled option: closer than the registry's 0.6 for an unknown option, since an
# estimator may set attributes of its own after construction (``temprature``, ``n_sample``: 0.95 and 0.94)
_MISSPELLED = 0.8


def _check_new_attribute(est: Estimator, name: str) -> None:
    """Raise :class:`storch.OptionError` for ``est.<name> = ...`` on a constructed estimator where ``name`` is no
    attribute of it yet and is close to one of its options (``est.temprature = 0.1``, which would otherwise be
    silently ignored: the estimator reads ``temperature``). A public name far from every option stays allowed (an
    estimator's own new attribute), and so does every private one."""
    d = est.__dict__
    if name in d or name in d.get("_parameters", ()) or name in d.get("_buffers", ()) or name in d.get(
            "_modules", ()) or hasattr(type(est), name):
        return
    cls = type(est)
    close = difflib.get_close_matches(name, sorted(_option_names(cls)), n=1, cutoff=_MISSPELLED)
    if close and not _set_by_its_own_method(est):
        raise OptionError(
            f"{est.name or cls.__qualname__}: est.{name} = ... sets no option: the estimator has no option or "
            f"attribute {name!r}, and storch reads {close[0]!r}, not {name!r}. Did you mean {close[0]!r}? Its "
            f"options are: {', '.join(sorted(_option_names(cls) - set(_fixed_options(cls))))}. To keep a value "
            f"of your own on the estimator, set it in one of its methods (an estimator's own attributes are "
            f"its business) or name it `_{name}`")


def _set_by_its_own_method(est: Estimator) -> bool:
    """Whether ``est.<name> = ...`` runs in a method of ``est`` itself (``self.samples = ...`` in an author's
    ``update_parameters`` or ``anneal()``; review r-26): an estimator's own attributes are not misspelled options.
    Looked up only for a new name close to an option (frames: Estimator.__setattr__, _check_new_attribute)."""
    frame: Any = sys._getframe(2)  # Estimator.__setattr__ (or a subclass's, which called it)
    while frame is not None and frame.f_code.co_name == "__setattr__":
        frame = frame.f_back
    return frame is not None and frame.f_locals.get("self") is est


def _fixed_option_message(est: Estimator, name: str, value: Any, why: str) -> str:
    try:
        shown = repr(value)
    except Exception:  # (a value whose repr fails)
        shown = f"<{type(value).__name__}>"
    cls = type(est)
    made = (f"storch.estimator({est.name!r}, plate={est.plate!r}, ...," if est.name and installed_classes().get(est.name) is cls
            else f"{cls.__qualname__}(plate={est.plate!r}, ...,")
    if name in _offered_options(cls):  # (a base's, through **kwargs: see unknown_option_message)
        advice = f"Create a new estimator with the option instead: {made} {name}={shown[:80]})"
    else:  # (not a constructor option: n_samples computed from the estimator's own options, an attribute)
        advice = (f"Create a new estimator instead: {made[:-1]}) (its constructor sets `{name}` from its options: "
                  f"{', '.join(cls.options()) or 'none'})")
    return (f"{est.name or cls.__qualname__}: est.{name} = {shown[:80]} after construction is not supported: "
            f"{why}. {advice}")


_FORWARDS: "weakref.WeakKeyDictionary[type, Optional[type]]" = weakref.WeakKeyDictionary()


def _forwarded_to(cls: type) -> Optional[type]:
    """The estimator class whose constructor ``cls``'s ``**kwargs`` go to (the next class in ``cls``'s MRO after
    the one that defines its ``__init__``), or ``None`` where that constructor takes no ``**kwargs``."""
    if cls in _FORWARDS:
        return _FORWARDS[cls]
    base = None
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        mro = cls.__mro__
        definer = next(i for i, k in enumerate(mro) if "__init__" in k.__dict__)
        base = next((k for k in mro[definer + 1:] if issubclass(k, Estimator)), None)
    _FORWARDS[cls] = base
    return base


def takes_more_options(cls: type) -> bool:
    """Whether ``cls``'s constructor takes ``**kwargs``: options besides those :meth:`Estimator.options` lists
    may be its own (popped before it forwards the rest), so only its construction can refuse a keyword."""
    return _forwarded_to(cls) is not None


def _offered_options(cls: type) -> list[str]:
    """:meth:`Estimator.options`, then those of the base a constructor taking ``**kwargs`` may forward them to: what
    "Did you mean" offers and ``est.<option> = v`` checks. Not all of them need work (a subclass may set one
    itself, or keep its ``**kwargs``): its construction tells (``_marking_construction``, :func:`kept_option`)."""
    names = cls.options()
    base = _forwarded_to(cls)
    return names + [p for p in _offered_options(base) if p not in names] if base is not None else names


def _unknown_keywords(init: Callable, kwargs: dict) -> list:
    """The keywords of ``kwargs`` that ``init`` takes no parameter for (none where it takes ``**kwargs``)."""
    try:
        params = inspect.signature(init).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY]


def _parameter_names(init: Callable) -> tuple[tuple, frozenset, bool]:
    """The parameters of ``init`` an argument fills by position (after ``self``), those a keyword argument can
    name (not its ``**kwargs``), and whether it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        return (), frozenset(), False
    kinds = inspect.Parameter
    return (tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))[1:],
            frozenset(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)),
            any(p.kind is kinds.VAR_KEYWORD for p in params))


def _who(cls: type) -> str:
    return f"{cls.__qualname__} (estimator {cls.name!r})" if cls.name else cls.__qualname__


def _collided_option(cls: type, named: frozenset, kwargs: dict, error: TypeError) -> Optional[str]:
    """The option the user gave through ``**kwargs`` that the constructor also passes its base itself: Python's
    "got multiple values for keyword argument" at ``super().__init__(plate, n_samples=2 * pairs, **kwargs)``
    (review r-28: ``Pairs('z', n_samples=3)``), or "... for argument" where it passes it by position
    (``super().__init__(plate, 2 * pairs, **kwargs)``: review r-30, a bare TypeError, also from the kit's probe)."""
    base = _forwarded_to(cls)
    if base is None:
        return None
    offered, said = _offered_options(base), str(error)
    return next((k for k in kwargs if k not in named and k in offered
                 and any(f"multiple values for {by}argument {k!r}" in said for by in ("keyword ", ""))), None)


def kept_option(est: Estimator, options: dict) -> Optional[str]:
    """What refuses the first of ``options`` (given to ``type(est)``'s constructor) that is an option of the base
    its ``**kwargs`` may forward to yet reached no constructor: kept by the subclass (``def __init__(self, plate,
    n_samples=1, **net_kwargs)`` given ``baseline=``), so the estimator would run without it (review r-28).
    ``None`` where there is none; a keyword no base takes is the subclass's own (popped) and left to it. (One the
    subclass pops and handles itself is refused too: it cannot be told from a kept one; naming it as a parameter
    of the constructor makes it one of ``options()``.) Asked when the outermost constructor returns, so direct
    construction (``Keeps("z", baseline=...)``) refuses it as ``storch.estimator`` does."""
    cls = type(est)
    base = _forwarded_to(cls)
    forwarded = est.__dict__.get("_forwarded_options")
    if base is None or forwarded is None:
        return None
    own, offered = cls.options(), _offered_options(base)
    key = next((k for k in options if k not in own and k in offered and k not in forwarded), None)
    if key is None:
        return None
    return (f"{_who(cls)} has no option {key!r}: its constructor takes it in its **kwargs but passes it to no "
            f"estimator's constructor ({base.__qualname__}'s takes {key!r}), so it would be ignored. Its options "
            f"are: {', '.join(own) or 'none'}")


# the hooks that declare an estimator's options to the ranks' check and checkpoints (Estimator.state_options,
# Estimator.evolution_options); first-party estimators declared them as _state_options / _evolution_options before
_DECLARED_OPTIONS = ("state_options", "evolution_options")


def _defined_before(cls: type, private: str, public: str) -> bool:
    """Whether ``cls``'s method resolution order finds ``private`` in a class before (more derived than) the first
    that defines ``public``: the class itself, or a mixin that is no estimator (``class Mine(OptionsMixin, Score)``),
    whose ``__init_subclass__`` is not Estimator's. A class that defines both keeps its public hook."""
    mro = cls.__mro__
    at = {name: next((i for i, c in enumerate(mro) if name in c.__dict__), len(mro)) for name in (private, public)}
    return at[private] < at[public]


def _declared_under_private_name(hook: str) -> Callable[[Any], dict]:
    """The ``hook`` of a class that declares its options under the private name of before (``_state_options``,
    ``_evolution_options``; a third party may have copied it): what that method returns. Set on the class that
    defines the private name, so that it overrides a base class's public hook too (a subclass of ``Score`` that
    overrode ``Score._evolution_options`` was read at Score's, its own options silently left out of the check)."""
    private = "_" + hook

    def declared(self) -> dict:
        return dict(getattr(self, private)())

    declared.__name__ = declared.__qualname__ = hook
    declared.__doc__ = f"What ``{private}()`` declares (the private name of before)."
    return declared


def _marking_construction(init: Callable) -> Callable:
    """``init`` that marks the instance constructed when the outermost ``__init__`` returns (options set later
    go through ``Estimator.__setattr__``'s checks; those the constructors set are theirs to check). Where the
    outermost constructor takes ``**kwargs``, the options that the constructors it forwards them to receive (by name
    or position) from their caller are recorded (not what a base passes its own base): ``_forwarded_options``, the
    user's that reached one (:func:`kept_option` refuses the others)."""
    names: list = []  # [_parameter_names(init)], at the first call that needs them

    def parameter_names() -> tuple[tuple, frozenset, bool]:
        if not names:
            names.append(_parameter_names(init))
        return names[0]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        depth = self.__dict__.get("_init_depth", 0)
        received = self.__dict__.get("_init_received")
        recording = self.__dict__.get("_init_recording", False)  # (whether the caller forwards its **kwargs here)
        if depth == 0:
            received = set() if _forwarded_to(type(self)) is not None else None
            object.__setattr__(self, "_init_received", received)
        elif received is not None and recording:
            positional, named, _ = parameter_names()
            received.update(positional[:len(args)])
            received.update(k for k in kwargs if k in named)
        if received is not None:
            object.__setattr__(self, "_init_recording", parameter_names()[2])
        object.__setattr__(self, "_init_depth", depth + 1)
        try:
            init(self, *args, **kwargs)
        except TypeError as e:
            unknown = _unknown_keywords(init, kwargs) if kwargs else ()
            if unknown and depth > 0:
                # a base's constructor that a subclass's **kwargs forwarded a keyword to: marked, so that the
                # outermost constructor can tell this TypeError from any other one raised in its body
                e._storch_unknown_keyword = unknown[0]  # type: ignore[attr-defined]
            elif depth == 0 and not unknown and kwargs:
                key = getattr(e, "_storch_unknown_keyword", None)
                named = parameter_names()[1]
                if key in kwargs and key not in named:  # (the user's keyword, through **kwargs)
                    unknown = [key]
                elif (key := _collided_option(type(self), named, kwargs, e)) is not None:
                    cls, base = type(self), _forwarded_to(type(self))
                    raise OptionError(
                        f"{_who(cls)} has no option {key!r} to give: its constructor sets {key!r} itself when it "
                        f"calls {getattr(base, '__qualname__', 'its base')}'s (from its options: "
                        f"{', '.join(cls.options()) or 'none'}). Leave {key!r} out, or set it through those options"
                    ) from None
            if unknown and depth == 0:  # Score("z", n_samplez=3): the registry's words, not Python's bare TypeError
                raise OptionError(unknown_option_message(type(self), unknown[0], _who(type(self)))) from None
            raise
        finally:
            object.__setattr__(self, "_init_depth", depth)
            if depth == 0:
                del self.__dict__["_init_received"]
                self.__dict__.pop("_init_recording", None)
            elif received is not None:
                object.__setattr__(self, "_init_recording", recording)
        if depth == 0:
            if received is not None:
                object.__setattr__(self, "_forwarded_options", frozenset(received & kwargs.keys()))
                kept = kept_option(self, kwargs)  # (a base's option the user gave that reached no constructor)
                if kept is not None:
                    raise OptionError(kept)
            object.__setattr__(self, "_constructed", True)

    __init__._marks_construction = True  # type: ignore[attr-defined]
    return __init__


class _ByIdentity:
    """An option value in ``Estimator._options_key`` compared by identity (a callable schedule, a tensor), held."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is _ByIdentity and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)
