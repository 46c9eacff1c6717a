"""Option validators: check an estimator's constructor options once, with errors that say what to pass.

Every check raises :class:`storch.OptionError` with the message
``"<owner>: <option> must be <what is accepted>, got <value>"`` (plus a hint where one helps),
and returns the value (an integral number, a NumPy integer too, as a Python int; a number as given).
``bool`` is never accepted as a number: ``n_samples=True`` is a mistake, not 1; nor is a float
an int, even ``4.0``.

Example:
    >>> from storch.extending import options
    >>> options.integer("my_estimator", "n_samples", 4, minimum=1)
    4
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Collection, Optional, TypeVar, Union

from ..errors import OptionError

__all__ = ["integer", "number", "flag", "choice", "optional_index", "fail"]


def fail(owner: str, name: str, what: str, value: Any, hint: str = "") -> OptionError:
    """The :class:`OptionError` for option ``name`` of ``owner``: it must be ``what``, got ``value``."""
    return OptionError(f"{owner}: {name} must be {what}, got {value!r}{hint}")


def _integral(value: Any) -> Optional[int]:
    """``value`` as a Python int if it is an integral number (a ``numbers.Integral``: an int, a NumPy
    integer), else ``None``. A bool is refused (``n_samples=True`` is a mistake, not 1; NumPy's bool is no
    Integral), and so is a float, even 4.0, and a tensor (an option is a number, not data)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def integer(owner: str, name: str, value: Any, *, minimum: Optional[int] = None, what: Optional[str] = None,
            hint: str = "") -> int:
    """``value`` as an int if it is an integral number (not a bool, not a float) >= ``minimum``; else an
    :class:`OptionError`. A NumPy integer (``np.int64(4)``, what arithmetic on array sizes gives) is accepted
    and returned as a Python int."""
    n = _integral(value)
    if n is None or (minimum is not None and n < minimum):
        raise fail(owner, name, what or ("an int" if minimum is None else f"an int >= {minimum}"), value, hint)
    return n


def number(owner: str, name: str, value: Any, *, above: Optional[float] = None, at_least: Optional[float] = None,
           below: Optional[float] = None, finite: bool = False, what: Optional[str] = None,
           hint: str = "") -> Union[int, float]:
    """``value`` if it is an int or float (not a bool) within the bounds; else an :class:`OptionError`.

    Args:
        above: exclusive lower bound. at_least: inclusive lower bound. below: exclusive upper bound.
        finite: refuse inf and NaN.
        what: the accepted values in words (default: built from the bounds, e.g. "a float > 0").
    """
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok:  # NaN fails every bound
        ok = not finite or math.isfinite(value)
        ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
        ok = ok and (below is None or value < below)
    if not ok:
        if what is None:
            if at_least is not None and below is not None:
                what = f"a float in [{at_least:g}, {below:g})"
            else:
                bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
                          f"< {below:g}" if below is not None else ""]
                what = " ".join(["a finite float" if finite else "a float", *[b for b in bounds if b]])
        raise fail(owner, name, what, value, hint)
    return value


def flag(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; else an :class:`OptionError`."""
    if not isinstance(value, bool):
        raise fail(owner, name, "True or False", value)
    return value


_Choice = TypeVar("_Choice")


def choice(owner: str, name: str, value: Any, choices: Collection[_Choice], hint: str = "") -> _Choice:
    """``value`` if it is one of ``choices``; else an :class:`OptionError` that lists them."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value
        ok = False
    if not ok:
        raise OptionError(f"{owner}: {name}={value!r} is not accepted; use one of "
                          f"{', '.join(repr(c) for c in choices)}{hint}")
    return value


def optional_index(owner: str, name: str, value: Any, what: str = "None or an int >= 0") -> Optional[int]:
    """``value`` if it is ``None`` or an int >= 0 (an index, e.g. ``eos``; a NumPy integer as a Python
    int); else an :class:`OptionError`, which says what to write for the two near misses: a negative index
    (Python's count from the end, which an option does not take: ``eos=-1`` for the last token) and a tensor
    (``eos=torch.tensor(0)``; an option is a number, not data)."""
    if value is None:
        return None
    hint = ""
    n = _integral(value)
    if n is not None and n < 0:
        hint = (f"; an index counts from the first value, and a negative one (counting from the end) is not "
                f"accepted: write the index itself, {name}=n - 1 for the last of n values (e.g. {name}=vocab - 1)")
    elif n is None and getattr(value, "ndim", None) == 0 and not isinstance(value, bool):
        hint = f"; a tensor or array is not accepted (an option is a Python number, not data): write {name}=int(t)"
    return integer(owner, name, value, minimum=0, what=what, hint=hint)
