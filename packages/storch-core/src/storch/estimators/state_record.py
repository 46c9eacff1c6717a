"""The record of who saved an estimator's state: which estimator, with which options that give the state its
meaning, kept in the extra state of a checkpoint and checked when it is loaded (re-exported by
``storch.extending``).

torch's ``load_state_dict`` matches keys and shapes only: a moving average saved by ``score`` with
``baseline="moving_average"`` loads into a ``score`` with ``baseline="leave_one_out"`` (which never reads it),
REBAR's η, λ and their Adam moments load into RELAX, which trains on them, even with ``strict=True`` (found by
porting). An estimator with extra state merges :func:`state_record` into ``get_extra_state()`` and calls
:func:`check_state_record` first in ``set_extra_state``: a state saved by another estimator, or with other
such options, is refused with a :class:`storch.OptionError` naming both. A checkpoint without the record (saved
before storch wrote it) loads as it did.
"""

from __future__ import annotations

from typing import Any

from ..errors import OptionError

__all__ = ["state_record", "check_state_record", "RECORD_KEY"]

#: the key of the record in an estimator's extra state
RECORD_KEY = "saved_by"


def _kind(estimator: Any) -> str:
    return getattr(estimator, "name", None) or type(estimator).__qualname__


def state_record(estimator: Any, **options: Any) -> dict:
    """``{"saved_by": {"estimator": name, **options}}``: merge it into the dict ``get_extra_state`` returns.

    ``options`` are those of the estimator's options that change what its saved state means (``score``'s
    baseline kind; ``relax``'s control variate form; MAPO's buffer size), as
    plain values (str, int, float, bool, None) so that ``torch.load(weights_only=True)`` reads them. Options
    the state does not depend on (a learning rate, the number of samples) stay out: they may change between
    saving and loading.
    """
    return {RECORD_KEY: {"estimator": _kind(estimator), **options}}


def check_state_record(estimator: Any, state: Any, **options: Any) -> None:
    """Refuse (:class:`storch.OptionError`) an extra state whose record says it was saved by another estimator
    or with other ``options`` (as for :func:`state_record`) than ``estimator`` has now; a state without the
    record (a checkpoint from before it was written, or not a dict) passes. Call it first in
    ``set_extra_state``, before anything of the estimator changes."""
    saved = state.get(RECORD_KEY) if isinstance(state, dict) else None
    if saved is None:
        return
    current = state_record(estimator, **options)[RECORD_KEY]
    if saved == current:
        return
    plate = getattr(estimator, "plate", None)
    who = f"estimator {current['estimator']!r}" + (f" (plate {plate!r})" if plate is not None else "")
    if saved.get("estimator") != current["estimator"]:
        what = "by another estimator"
    else:
        keys = [k for k in dict.fromkeys([*saved, *current]) if k != "estimator" and saved.get(k) != current.get(k)]
        what = f"with other options ({', '.join(keys)} {'differs' if len(keys) == 1 else 'differ'})"
    raise OptionError(
        f"{who}: the checkpoint's state for it was saved {what}: saved by {_spelled(saved)}; this estimator is "
        f"{_spelled(current)}. Loaded, the state would mean something else here (or be silently unused), so it "
        "is refused. Construct the estimator as it was saved to resume; to start its state afresh instead, load "
        "a state dict without its entries (strict=False); to load it anyway, on purpose, delete the record "
        f"first: del state_dict[prefix + '_extra_state'][{RECORD_KEY!r}] (docs/reliability.md, 'Saving and "
        "resuming')")


def _spelled(record: dict) -> str:
    name = record.get("estimator")
    rest = ", ".join(f"{k}={v!r}" for k, v in record.items() if k != "estimator")
    return f"{name!r}" + (f" ({rest})" if rest else "")
