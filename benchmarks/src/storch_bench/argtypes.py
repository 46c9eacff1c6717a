"""Argument types (argparse ``type=``) of ``storch-compare`` and ``python -m storch_bench.compiled``: a bad value is
argparse's usage error (exit 2, one line naming the option and what it takes) before any run.

A module of its own so that ``storch_bench.compiled``, which the subcommand modules import, can check its options
without importing the CLI back (.importlinter, "the subcommand modules ... never import the CLI back").
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

__all__ = ["at_least", "positive_int", "seed_int", "SEED_BELOW", "variance_reps", "positive_float",
           "non_negative_float", "int_list", "choice_list"]


def at_least(low: int, below: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type=``: an int >= ``low`` (and < ``below``), else argparse's usage error, exit 2."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be < {below}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = at_least(1)
SEED_BELOW = 2**63  # torch.manual_seed takes less than 2**64; the runs add small offsets (seed + 1, + i)
seed_int = at_least(0, SEED_BELOW)


def variance_reps(text: str) -> int:
    """An argparse ``type=``: 0 (skip the variance) or an int >= 2 (one estimate has no variance: nan)."""
    value = at_least(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (skip) or >= 2: the variance of 1 estimate is undefined")
    return value


def _finite_float(text: str, zero_ok: bool) -> float:
    """``text`` as a finite float > 0 (>= 0 where ``zero_ok``), else argparse's usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not ((0 <= value if zero_ok else 0 < value) and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be {'>=' if zero_ok else '>'} 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type=``: a finite float > 0."""
    return _finite_float(text, zero_ok=False)


def non_negative_float(text: str) -> float:
    """An argparse ``type=``: a finite float >= 0."""
    return _finite_float(text, zero_ok=True)


def int_list(low: int, below: Optional[int] = None) -> Callable[[str], str]:
    """An argparse ``type=``: comma-separated ints >= ``low`` (and < ``below``); the text is kept (the subcommand
    splits it)."""
    one = at_least(low, below)

    def parse(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("is empty; give comma-separated integers")
        for t in items:
            one(t)
        return text

    return parse


def choice_list(choices: Sequence[str]) -> Callable[[str], str]:
    """An argparse ``type=``: comma-separated names out of ``choices``; the text is kept."""

    def parse(text: str) -> str:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{'unknown ' + ', '.join(map(repr, bad)) if bad else 'is empty'}; "
                                             f"choose from {', '.join(choices)}")
        twice = sorted({t for t in items if items.count(t) > 1})
        if twice:  # each would run (and be reported) twice
            raise argparse.ArgumentTypeError(f"names {', '.join(map(repr, twice))} more than once")
        return text

    return parse
