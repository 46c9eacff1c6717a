"""storch under ``torch.distributed`` (DistributedDataParallel and friends).

Estimator state that must agree across processes is kept in sync by the estimators themselves,
at the one place where it changes:

- running statistics (the ``score`` estimator's moving-average baselines) are averaged over
  the ranks before they are committed, so every rank holds the same average: of the ranks' mean
  costs (the global batch's mean when the shards are of equal size; each rank's mean counts
  equally otherwise, as in DDP's averaging of gradients); per
  step of a partition, over the ranks whose episodes reached that step (``partial=True``);
- learned baselines (``score``'s ``"learned"``, NVIL, and trainable baseline modules) and learned
  control variates (``relax``, ``rebar``, ``lax``) average their gradient over the ranks before
  their optimizer step (as DDP averages model gradients), and a lazily built network is
  broadcast from rank 0 when it is built, so their parameters stay identical; the learned control
  variates also set every parameter their update trains (η, the temperature, a ``network=``) to rank
  0's at their first update, as DDP does for a module's parameters when it wraps it (ranks built with
  another ``temperature=`` or ``eta=`` start from rank 0's values), and so does ``score`` for a
  ``baseline=`` module of yours and NVIL's heads (a head built while :func:`synchronize` was off, or
  before the process group existed, is not broadcast when built: it is at the next synchronised update,
  one built after the first included, :func:`broadcast_once_`). Ranks must freeze
  (``requires_grad=False``) the same parameters of a ``score`` baseline or a learned control variate: the
  check compares them (a rank whose step trains nothing, its costs all ``credit=False``, adds zeros to a
  control variate's Σ ĝ²; NVIL's heads average over the ranks whose costs credit them, the global batch's
  regression being a mean over its credited data points).

This happens automatically when ``torch.distributed`` is initialised with more than one
process. It is a collective operation, inside ``storch.backward()``: ranks that call it a different
number of times HANG (as under DDP); episodes of a partition may differ in length. Before each
collective one small all_reduce checks what every rank is about to run (the estimator's class, the
options that give its state its meaning and those that change how it evolves: decay, lr, update, as its
``state_options()`` and ``evolution_options()`` declare them; what it averages) and the values' layout:
ranks with different estimators or such options (ranks that all skip their update are compared on
``update=False`` and the state options only: the others act on nothing), a rank whose
step has no costs or no data (it joins the check from ``storch.backward()`` / ``denote_independent``)
or whose estimator was built with ``update=False`` (it joins from ``storch.backward()`` or
``surrogate_loss().backward()``, or the ``.backward()`` of a step compiled by ``storch.compile``, once per
estimator object: a copy joins again) while
the others update, and values of one name with different shapes or dtypes raise
:class:`storch.StorchError` on every rank. Different cost
names are not an error: each name is averaged over the ranks that have it. Under DDP a rank that
skips the step leaves the others in DDP's own gradient allreduce, which storch cannot join: give
every rank data (``DistributedSampler(drop_last=True)``, or pad) and costs in every step.

To use an estimator on one rank only, switch it off for that model with :func:`synchronize`
``(model, enabled=False)``, or pass another process group. A step that calls ``storch.backward()``
then updates that rank's state alone (even in ``model.eval()``), and ``enabled=True`` later does not
copy it back: evaluate under ``torch.no_grad()`` with ``storch.cost_estimates()`` instead (no update,
no collective).

DDP and ``find_unused_parameters=True``: DDP looks for the parameters the loss depends on by
walking back from the *outputs of the wrapped module's forward*. In storch the loss is built
from the registered costs, so the forward must return it: end the forward with
``return storch.surrogate_loss()`` and call ``storch.backward()`` after it (it rebuilds the same
surrogate; the estimators' state changes once). Otherwise DDP marks every parameter unused and
backward fails; ``storch.backward()`` turns that failure into a :class:`storch.StorchError`
that says this (``storch.surrogate_loss().backward()`` after a forward that returns nothing fails
in torch's reducer: "Expected to mark a variable ready only once"). With the default ``find_unused_parameters=False`` nothing is needed.

Example (``examples/distributed/train_ddp.py`` is a complete script)::

    model = DDP(VAE(estimator="relax"))          # the estimator is a submodule of the model
    for x in loader:
        model(x)                                 # registers the costs in the default graph
        storch.backward()                        # backward, estimator updates (in sync), reset
        optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any, Iterable, TypeVar, Union, overload

import torch

from .ranks import _collective, _comm_device, _dist, _layouts_agree, _raise_different_collectives
from ..errors import StorchError

__all__ = ["is_active", "world_size", "synchronize", "all_reduce_mean", "all_gather_objects", "broadcast_",
           "broadcast_once_", "frozen_parameters",
           "ranks_agree"]

_UNSET = object()


def _group_of(owner: Any) -> Any:
    """The process group ``owner`` (an estimator) synchronises over; None: world; False: off."""
    return getattr(owner, "_storch_process_group", None) if owner is not None else None


def is_active(owner: Any = None) -> bool:
    """Whether state of ``owner`` (an estimator, or None for the default) is synchronised now."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return False  # checked first: the common, single-process case costs no attribute look-up
    group = _group_of(owner)
    if group is False:
        return False
    return dist.get_world_size(group) > 1


def world_size(owner: Any = None) -> int:
    """The number of processes the state of ``owner`` (an estimator, or None for the default) is
    synchronised over: the size of its process group, or 1 when it is not synchronised
    (:func:`is_active` is False: a single process, or switched off by :func:`synchronize`).

    For an estimator whose update must scale what :func:`all_reduce_mean` returns: RELAX's variance
    objective Σ ĝ² over a batch split across the ranks is the ranks' mean divided by it (each rank's ĝ
    per data point is this many times the whole batch's).
    """
    if not is_active(owner):
        return 1
    return int(_dist().get_world_size(_group_of(owner)))


def synchronize(module: torch.nn.Module, enabled: bool = True, group: Any = None) -> None:
    """Set how every storch estimator inside ``module`` keeps its state in sync.

    Args:
        module: a model (or an estimator) holding storch estimators as submodules.
        enabled: False: each process keeps its own state (no collectives; for single-rank
            evaluation). True (the default of every estimator): average over ``group``.
        group: the ``torch.distributed`` process group (None: the default world group).

    Switching back on does not make the states agree again: a ``storch.backward()`` while it was off updated
    this rank's state alone (even in ``model.eval()``); the parameters that relax, rebar and lax train and a
    ``baseline=`` module of ``score``'s are set to rank 0's (the group's first member) only at the estimator's
    first synchronised update ever (:func:`broadcast_once_`), and a parameter built later (a head of ``score``'s
    ``baseline="learned"`` for a new cost) at the first synchronised update after it appears, the heads also when
    each is built while synchronised; moving averages, buffers and optimizer moments are not (each rank keeps what it updated
    while it was off), and the ranks stay apart from then on. Evaluate under
    ``torch.no_grad()`` with ``storch.cost_estimates()`` (no update, no collective) instead.
    """
    from ..estimators.base import Estimator

    for m in module.modules():
        if isinstance(m, Estimator):
            m._storch_process_group = group if enabled else False


_K = TypeVar("_K")


@overload
def all_reduce_mean(values: torch.Tensor, owner: Any = None, partial: bool = False,
                    what: str = "values") -> torch.Tensor: ...


@overload
def all_reduce_mean(values: dict[_K, torch.Tensor], owner: Any = None, partial: bool = False,
                    what: str = "values") -> dict[_K, torch.Tensor]: ...


@overload
def all_reduce_mean(values: list[torch.Tensor], owner: Any = None, partial: bool = False,
                    what: str = "values") -> list[torch.Tensor]: ...


def all_reduce_mean(values: Union[dict, list, torch.Tensor], owner: Any = None, partial: bool = False,
                    what: str = "values") -> Union[dict, list, torch.Tensor]:
    """The mean of ``values`` over the ranks (a dict or list of tensors, or one tensor).

    Without an active process group the values are returned unchanged. Every rank must call it
    (it is a collective). The ranks first check that they hold the same keys, shapes and dtypes
    (one small collective); then one collective per dtype and device.

    Args:
        values: the tensors to average.
        owner: the estimator whose process group is used (None: the world).
        partial: a dict whose keys may differ across ranks (a moving average per step of
            episodes of different lengths): the result holds the union of the keys on every rank,
            each averaged over the ranks that have it (a rank without it contributes nothing).
            Otherwise ranks with different keys, shapes or dtypes raise :class:`storch.StorchError`, as do
            ranks that run different collectives (another estimator, ``what`` or ``partial``).
        what: what the values are, for the error message.
    """
    if not is_active(owner):
        return values
    dist = _dist()
    group = _group_of(owner)
    if isinstance(values, torch.Tensor):
        return all_reduce_mean([values], owner, what=what)[0]
    items = list(values.items()) if isinstance(values, dict) else list(enumerate(values))
    # the ranks run the same collective (the same estimator kind, the same update) and their layouts agree?
    # (a flat all_reduce of different sizes aborts the process in gloo; a rank whose estimator runs other
    # collectives than the others' would wait in them forever)
    layout = [(key, str(v.dtype), tuple(v.shape)) for key, v in items]
    collective = _collective(owner, f"averaging {what}" + (" (partial)" if partial else ""))
    same_op, same_layout = _layouts_agree(layout, group, collective)
    if not same_op:
        _raise_different_collectives(collective, group)
    if not same_layout:
        if partial and isinstance(values, dict):
            return _union_mean(values, layout, group)
        raise StorchError(
            f"storch.distributed: the ranks hold different {what} to average (different keys, shapes or dtypes; "
            f"this rank: {len(layout)} of them). Every rank must run the same steps, with the same costs and "
            "estimator calls (as under DDP); to use an estimator on one rank only, switch its synchronisation "
            "off with storch.distributed.synchronize(model, enabled=False)")
    out: dict = {}
    by_kind: dict = {}
    for key, v in items:
        by_kind.setdefault((v.dtype, v.device), []).append((key, v))
    world = dist.get_world_size(group)
    for (dtype, device), group_items in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
        flat = torch.cat([v.detach().reshape(-1) for _, v in group_items])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat / world
        offset = 0
        for key, v in group_items:
            out[key] = flat[offset:offset + v.numel()].reshape(v.shape)
            offset += v.numel()
    if isinstance(values, dict):
        return {key: out[key] for key, _ in items}
    return [out[i] for i, _ in items]


def all_gather_objects(obj: Any, owner: Any = None, what: str = "objects") -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without an active process group.

    For state that is not an average: a set of things found per data point (MAPO's buffer of best sequences),
    which every rank must hold whole, so that each rank, and a checkpoint saved on one of them, has what every
    shard found. The ranks first check that they run the same collective (one small all_reduce, as before
    :func:`all_reduce_mean`): ranks with different estimators raise :class:`storch.StorchError` on every rank.

    Args:
        obj: this rank's contribution (its size may differ from the other ranks').
        owner: the estimator whose process group is used (None: the world).
        what: what the objects are, for the check and its error message.
    """
    if not is_active(owner):
        return [obj]
    dist = _dist()
    group = _group_of(owner)
    collective = _collective(owner, f"gathering {what}")
    same_op, _ = _layouts_agree([], group, collective)
    if not same_op:
        _raise_different_collectives(collective, group)
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _union_mean(values: dict, layout: list, group: Any) -> dict:
    """``all_reduce_mean(values, partial=True)`` when the ranks' keys differ: agree on the union of
    the keys (all_gather_object), then sum each key and the number of ranks that have it."""
    dist = _dist()
    layouts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    union: dict = {}
    for rank_layout in layouts:  # the same order on every rank: rank 0's keys first
        for key, dtype, shape in rank_layout:
            union.setdefault(key, (dtype, shape))
    for key, (dtype, shape) in union.items():
        if any(k == key and (d, s) != (dtype, shape) for rank_layout in layouts for k, d, s in rank_layout):
            raise StorchError(
                f"storch.distributed: the ranks hold {key!r} with different shapes or dtypes; a value of one key "
                "must have one shape and dtype on every rank")
    local = next(iter(values.values()), None)
    device = local.device if local is not None else _comm_device(group)
    keys = list(union)
    sums, counts = [], []
    for key in keys:
        dtype, shape = union[key]
        v = values.get(key)
        sums.append(v.detach().to(device).reshape(-1) if v is not None
                    else torch.zeros(shape, dtype=getattr(torch, dtype.split(".")[-1]), device=device).reshape(-1))
        counts.append(float(v is not None))
    out: dict = {}
    by_dtype: dict = {}
    for key, flat in zip(keys, sums):
        by_dtype.setdefault(str(flat.dtype), []).append((key, flat))
    count = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    n_of = dict(zip(keys, count.tolist()))
    for _, group_items in sorted(by_dtype.items()):
        flat = torch.cat([v for _, v in group_items])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for key, v in group_items:
            shape = union[key][1]
            out[key] = flat[offset:offset + v.numel()].reshape(shape) / n_of[key]
            offset += v.numel()
    return {key: out[key] for key in keys}


def broadcast_(tensors: list[torch.Tensor], owner: Any = None, src: int = 0,
               what: str = "a built network's parameters") -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op without a process group).

    ``src``: a rank of ``owner``'s process group (its first member by default; the group that
    :func:`synchronize` set may leave out the world's rank 0). ``what``: what the tensors are, for the ranks' check and its error message (a lazily built network's
    parameters; the parameters an estimator's update trains, set to rank 0's at its first update)."""
    if not is_active(owner):
        return
    dist = _dist()
    group = _group_of(owner)
    # the ranks broadcast the same tensors (a lazily built network: once)? The check that precedes every
    # storch collective: a rank whose estimator differs would otherwise wait in another collective forever
    collective = _collective(owner, f"broadcasting {what}")
    same_op, same_layout = _layouts_agree([(str(t.dtype), tuple(t.shape)) for t in tensors], group, collective)
    if not same_op:
        _raise_different_collectives(collective, group)
    if not same_layout:
        raise StorchError(
            f"storch.distributed: the ranks hold {what} of different shapes or dtypes to broadcast (this rank: "
            f"{len(tensors)} tensors); build the same model, with the same estimators and inputs, on every rank")
    # torch's src is a rank of the world: a group without the world's rank 0 (synchronize(model, group=g), one
    # data-parallel replica group of several) refused it ("Global rank 0 is not part of group") at the first update
    root = src if group is None else dist.get_global_rank(group, src)
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=root, group=group)



# Per owner (an estimator, by id(): a class may define __eq__; a copy (copy.deepcopy, pickle) is another estimator
# and starts from rank 0's values again): a weak reference to it, and the parameters broadcast_once_ has set to rank
# 0's, id -> a weak reference, read as the same tensor only while it is alive (the id of a freed tensor may be taken
# by a new one). An estimator that is freed leaves it (weakref.finalize).
_BROADCAST_ONCE: "dict[int, tuple[weakref.ref, dict[int, weakref.ref]]]" = {}


def broadcast_once_(tensors: Iterable[torch.Tensor], owner: Any, what: str = "the trained parameters (rank 0's)") -> None:
    """:func:`broadcast_` of rank 0's values (the first member of ``owner``'s group) of those of ``tensors`` that
    ``owner`` (an estimator) has not asked for while it was synchronised, and never again for them (no-op without a
    process group). For what an estimator's update trains (a baseline module, RELAX's η, λ and network), called at
    each update: DistributedDataParallel does the same to a module's parameters when it wraps it, but only to the
    modules it wraps, and the update averages the parameters' gradients over the ranks, never the parameters, so
    ranks built from their own seeds or options would train apart for good.

    At the first update rather than the first step: that is a collective on every rank anyway, while a first
    forward may be an evaluation on one rank alone. A parameter that appears later (a head of NVIL's built for a new
    cost while :func:`synchronize` was off, after the first synchronised update; a parameter replaced by
    ``load_state_dict(assign=True)``) is broadcast at the next update: the tensors are told apart by identity, with no
    collective where none is new (a dict look-up per tensor). Every rank must then hold the same new tensors; a rank
    that built a head the others did not raises :class:`storch.StorchError` on every rank (it runs this broadcast,
    they do not). Values that are equal already (every rank loaded one checkpoint) stay as they are; optimizer
    moments are not broadcast (zero at the start, or a checkpoint's that every rank loads). ``tensors`` is read only
    while ``owner`` is synchronised (a generator such as ``module.parameters()`` costs nothing in one process)."""
    if not is_active(owner):
        return
    entry = _BROADCAST_ONCE.get(id(owner))
    if entry is None or entry[0]() is not owner:
        entry = _BROADCAST_ONCE[id(owner)] = (weakref.ref(owner), {})
        weakref.finalize(owner, _forget_broadcasts, id(owner), entry[0])
    seen = entry[1]
    new = [t for t in tensors if (ref := seen.get(id(t))) is None or ref() is not t]
    if not new:
        return
    broadcast_(new, owner=owner, what=what)
    seen.update((id(t), weakref.ref(t)) for t in new)


def _forget_broadcasts(key: int, ref: weakref.ref) -> None:
    """An owner of :func:`broadcast_once_` was freed: drop its entry (unless a new owner with its id took it)."""
    entry = _BROADCAST_ONCE.get(key)
    if entry is not None and entry[0] is ref:
        del _BROADCAST_ONCE[key]


def frozen_parameters(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Which of an estimator's trained parameters (``module.named_parameters()``) are frozen (``requires_grad=False``),
    as the ranks' check compares it: ``"none"``, ``"all N parameters"``, or their names. Put it in the ``what`` of
    the update's :func:`all_reduce_mean`, which every rank must reach, one that froze them all too: ranks that
    freeze different ones then raise on every rank, naming each rank's, where they would train apart or leave the
    others waiting in the collective (the relaxed family's control variates, ``score``'s trained baselines). The names
    are sorted: the set is what is compared, not the order of ``named_parameters()`` (NVIL's heads are in the order
    each rank first met their costs)."""
    named = list(named)
    frozen = sorted(name for name, p in named if not p.requires_grad)
    if not frozen:
        return "none"
    return f"all {len(named)} parameters" if len(frozen) == len(named) else ", ".join(frozen)


def ranks_agree(tensors: list[torch.Tensor], owner: Any = None) -> bool:
    """Whether every rank holds bitwise the same ``tensors`` (a check for tests and debugging): as many tensors, of the
    same dtypes and shapes, with the same bytes.

    One collective: each rank's digest of its tensors' bytes, compared with the check that precedes every storch
    collective (ranks that are in another collective raise :class:`storch.StorchError`). Exact for every dtype: a
    NaN equals a NaN of the same bits (a min/max comparison read equal tensors holding NaN as different), integers
    are not rounded (in float64, int64 values above 2**53 that differ in their last bits read as equal), and 0.0
    and -0.0 differ."""
    if not is_active(owner):
        return True
    group = _group_of(owner)
    digest = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().resolve_conj().resolve_neg()  # (a lazy conjugate's or negation's bytes are not its values)
        digest.update(repr((str(t.dtype), tuple(t.shape))).encode())
        digest.update(t.reshape(-1).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    collective = _collective(owner, "comparing values (ranks_agree)")
    same_op, same = _layouts_agree([digest.hexdigest()], group, collective)
    if not same_op:
        _raise_different_collectives(collective, group)
    return same
