"""The lowest layer of storch.distributed: torch.distributed looked up once, and the check that precedes
every storch collective (what each rank is about to run, and the values' layout), with which a step
that has no costs or no data, or an estimator built with ``update=False``, joins the others' check
(``storch.graph`` and ``storch.surrogate`` call it where they refuse such a step or skip such an update;
:mod:`storch.distributed` sits above them)."""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..errors import StorchError

__all__: list = []


@functools.cache
def _dist():
    """torch.distributed, or None where it is not built in (looked up once: every update asks)."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _comm_device(group: Any) -> torch.device:
    """Where tensors of a collective of ``group`` live (nccl: the current CUDA device; else the CPU)."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(obj: Any) -> int:
    """A 63-bit fingerprint of ``repr(obj)``, the same in every process (Python's hash() of a str is not)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little") >> 1


_NO_COSTS = "a step with no costs or no data (no estimator updates)"


def _layouts_agree(layout: list, group: Any, collective: str = "") -> tuple[bool, bool]:
    """Whether every rank runs the same ``collective`` and passed the same ``layout`` (one all_reduce of
    two 63-bit fingerprints)."""
    op, fp = _fingerprint(collective), _fingerprint(layout)
    t = torch.tensor([op, -op, fp, -fp], dtype=torch.int64, device=_comm_device(group))
    dist = _dist()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    same_op = int(t[0]) == op and int(t[1]) == -op  # max == min == this rank's
    return same_op, same_op and int(t[2]) == fp and int(t[3]) == -fp


def _gather_collectives(collective: str, group: Any) -> list:
    """What each rank runs, by rank (every rank calls it: a collective)."""
    dist = _dist()
    names: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, collective, group=group)
    return names


def _listed(names: list) -> str:
    return "; ".join(f"rank {r}: {n}" for r, n in enumerate(names))


_FOR_COST = re.compile(r" for cost (.+)$")  # the name as repr() writes it


def _costs_met_apart(names: list) -> str:
    """Where the ranks run the same collective for different costs (a learned part built per cost name, NVIL's
    heads, broadcast as each rank first meets its cost): which cost each rank met, else ``""``."""
    found = [_FOR_COST.search(n) for n in names]
    if not all(found) or len({n[:m.start()] for n, m in zip(names, found)}) != 1:
        return ""
    return ", ".join(f"rank {r} {'' if r else 'first met '}cost {m.group(1)}" for r, m in enumerate(found))


def _collective(owner: Any, action: str, evolution: bool = True) -> str:
    """Which collective a rank is about to run: the estimator (its class, the options that give its state its
    meaning, ``state_options()``: score's baseline kind, RELAX's control variate form, MAPO's buffer; and
    those that change how the state evolves, ``evolution_options()``: a moving average's decay, a learned
    part's lr, update; the public hooks of the estimator protocol, so a third-party estimator declares its own)
    and what it does. Ranks whose estimators differ run different sequences of collectives (a moving average
    alone, or a moving average and then a learned baseline's gradients), or the same ones and then hold
    different state (another decay or lr): the first collective where they differ is caught. ``evolution`` False:
    of an estimator that skips its update, whose evolution options act on nothing (only ``update=False`` kept)."""
    if owner is None:
        return f"storch.distributed {action}"
    options: dict = _options_of(owner, "state_options")
    if not options and isinstance(getattr(owner, "baseline_kind", None), str):
        options = {"baseline": owner.baseline_kind}
    options = {**options, **(_options_of(owner, "evolution_options") if evolution else {"update": False})}
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return f"{type(owner).__name__}({args}) {action}"


def _options_of(owner: Any, method: str) -> dict:
    """What ``owner.<method>()`` declares (``state_options`` / ``evolution_options``; an owner that is no estimator
    may have neither: {}). Refused unless a mapping from option names (str) to values: the check sorts and prints
    them, and a bad return would otherwise surface as a TypeError inside a collective, on one rank."""
    declared = getattr(owner, method, None)
    if not callable(declared):
        return {}
    options: Any = declared()
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise StorchError(
            f"{type(owner).__qualname__}.{method}() must return a dict from option names (str) to values, got "
            f"{options!r:.80}: the ranks' check compares them by name")
    return dict(options)


def _raise_different_collectives(collective: str, group: Any) -> None:
    """Every rank, once the fingerprints said the ranks run different collectives: gather what each runs
    (every rank is here: each saw the same mismatch) and raise, on every rank, saying it."""
    names = _gather_collectives(collective, group)
    ranks, met = _listed(names), _costs_met_apart(names)
    if _NO_COSTS in ranks:
        advice = ("A rank whose step has no costs (an episode that ended at reset, an empty shard) cannot take "
                  "part in the others' estimator updates: every rank must register costs in every step (pad "
                  "the shard, use DistributedSampler(drop_last=True), or skip the step on every rank)")
    elif met:
        advice = (f"The ranks met different costs first ({met}): a part learned per cost name (NVIL's head) is "
                  "built, and broadcast from rank 0, at the first node of its cost, and every rank must build the "
                  "same one at the same time. Register the same costs (storch.add_cost names) in the same order on "
                  "every rank, e.g. sorted by name; a cost that only some ranks have in a step cannot be matched")
    else:
        advice = ("The ranks use different estimators (a different class, baseline or option: decay, lr, "
                  "update; or other parameters of what they train frozen with requires_grad=False), or call them "
                  "in a different order: build the same model, with the same estimators, options and frozen "
                  "parameters, on every rank; to use an estimator on one rank only, switch its "
                  "synchronisation off with storch.distributed.synchronize(model, enabled=False)")
    raise StorchError(f"storch.distributed: the ranks run different collectives ({ranks}). {advice}")


_SKIPPED_UPDATE = "skipping its update (update=False)"


# The estimators built with update=False that joined the ranks' check once (:func:`_join_skipped_update`), by
# identity: not an attribute of theirs, which copy.deepcopy and pickle would carry into a copy (a target network or
# an EMA copy of a model holding one), and the copy would then never join the check (a hang, where another rank
# updates). Keyed by id() (an estimator class may define __eq__), weak: an estimator that is freed leaves it.
_SKIP_CHECKED: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def _skips_synced_update(est: Any) -> bool:
    """Whether ``storch.backward()`` (or the update probe of ``surrogate_loss().backward()``) must have ``est``
    join the ranks' check where it skips its update: an
    estimator whose state would evolve (its ``evolution_options()`` say ``update=False``),
    synchronised over more than one process, and not yet checked. Where another rank built
    it with ``update=True``, that rank waits in the update's collective, which this one would never join (a
    hang): joining the check instead makes every rank raise. Once per estimator object (update is fixed at
    construction; a copy is another object, checked again): ranks that all skip their updates pay one small
    collective, on their first step."""
    dist = _dist()
    if dist is None or not dist.is_initialized() or _SKIP_CHECKED.get(id(est)) is est:
        return False  # (in one process: no attribute look-up of the estimator's)
    if _options_of(est, "evolution_options").get("update", True) is not False:
        return False
    group = getattr(est, "_storch_process_group", None)
    return group is not False and dist.get_world_size(group) > 1


def _join_skipped_update(est: Any) -> None:
    """``est`` skips its update (:func:`_skips_synced_update`): take part in the check that precedes the
    collective the other ranks' update would run; where they update, every rank raises. Ranks that all skip agree
    whatever else their evolution options say (``decay``, ``lr``, score's note of a baseline module frozen at
    construction): those act on no state, as nothing is updated; only the state options and ``update=False`` are
    compared (a module frozen at construction on one rank and one built with ``update=False`` on another were
    refused, although neither trains). The error names each rank's options in full."""
    group = getattr(est, "_storch_process_group", None)
    collective = _collective(est, _SKIPPED_UPDATE)
    same_op, _ = _layouts_agree([], group, _collective(est, _SKIPPED_UPDATE, evolution=False))
    if not same_op:
        _raise_different_collectives(collective, group)
    _SKIP_CHECKED[id(est)] = est


def _announce_no_costs(owners: tuple = ()) -> Optional[str]:
    """A step without costs (or with an empty data shard) under torch.distributed: the other ranks are (or
    will be) in their estimators' collectives, which this rank cannot join. Join their check with a
    collective of its own, so that every rank raises (the others: storch.distributed raises on seeing it)
    instead of waiting forever; the caller raises its own error.

    Returns None in one process (nothing is asked then); else what the ranks were running ("" where every
    rank is here, or inside a DistributedDataParallel forward, where nothing is joined: the other ranks
    wait in DDP's own gradient allreduce, which storch cannot join, and a collective of its own would meet
    DDP's there). ``owners``: the estimators the step called; where there are some and every one has its
    synchronisation switched off (``storch.distributed.synchronize(model, enabled=False)``: single-rank
    use) nothing is joined either, and None is returned; nor under ``torch.no_grad()`` (evaluation, where no
    rank takes part in an estimator's collective)."""
    dist = _dist()
    if dist is None or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    if not torch.is_grad_enabled():  # evaluation: no rank runs an estimator update (storch.backward refuses
        return None  # no_grad), so nobody waits; joining here would leave this rank waiting instead
    if owners and all(getattr(o, "_storch_process_group", None) is False for o in owners):
        return None
    from torch.nn.parallel import DistributedDataParallel

    if getattr(DistributedDataParallel, "_active_ddp_module", None) is not None:
        return ""
    same_op, _ = _layouts_agree([], None, _NO_COSTS)
    return "" if same_op else _listed(_gather_collectives(_NO_COSTS, None))
