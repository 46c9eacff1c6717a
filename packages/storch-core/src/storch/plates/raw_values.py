"""Raw values in a plate order the caller chooses (``storch.aligned``), for a computation in plain torch.

A loss of a whole set of samples (minimum risk training's Q ∝ p^α renormalised over the plate), a rollout
simulator, a black box: code that leaves storch reads raw tensors, one dim per plate. ``x.tensor`` has
``x``'s plates in ``x``'s order, and the plates of a torch result follow its operands (``(a + 0 * b).plates``
is ``a``'s order where ``a`` has as many plates as ``b``), so raw tensors paired by hand line up only where
the values happen to carry the same plates in the same order. :func:`aligned` lines the values up by plate
name, to one order the caller names, as the dispatcher lines up a torch function's operands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from ..errors import PlateError
from ..runtime.eager import eager_only
from .tensor import Plate, PlateTensor, align, plates_of, union_plates

__all__ = ["aligned"]

if not TYPE_CHECKING:  # ``ellipsis``: the type of ``...`` as typeshed names it (types.EllipsisType from Python 3.10),
    ellipsis = type(Ellipsis)  # bound at run time too, so that typing.get_type_hints(storch.aligned) resolves it


# eager_only: an entry point of storch, which torch.compile does not inline (storch.runtime.eager)
@eager_only
def aligned(*values: torch.Tensor, plates: Optional[Sequence[Union[str, Plate, ellipsis]]] = None
            ) -> tuple[tuple[torch.Tensor, ...], tuple[Plate, ...]]:
    """The raw tensors of ``values``, each with exactly ``plates`` as its leading dims, in that order.

    For a computation that leaves storch (a loss of the whole set of samples, reduced over a plate; a
    simulator; numpy): read the values with one call, compute on the raw tensors, and wrap the result on the
    plates it still has, ``storch.PlateTensor(result, plates)``. Where raw tensors are paired by hand, the
    plate dims line up only if the values carry the same plates in the same order, and nothing checks it:
    ``(a + 0 * b).tensor`` has ``a``'s order where ``a`` has as many plates as ``b``, and ``b.tensor`` lacks
    a plate ``a`` has (torch then broadcasts it against a per-sample or another plate's dim).

    Each value is lined up by plate name, as a torch function's operands are:

    - its dims are ``plates`` in the order given, then its own per-sample dims (``value.shape``), unchanged;
    - a plate the value does not carry is broadcast: an expanded view of the plate's size (no copy);
    - a partition's plate is taken at the latest step any value (or a :class:`storch.Plate` in ``plates``)
      is at, and a value of an earlier step is re-indexed by the parents, as ``x + 0 * y`` re-indexes it:
      entry ``i`` of every result belongs to the same sequence; where the parents are chosen per entry of
      another plate (a beam per data point), that plate is one of the results' plates too;
    - a plain tensor is one value for every entry of the plates (its dims are per-sample dims).

    The results are views of the values (or gathers, for a re-indexed step) and keep their autograd graph.

    Args:
        *values: plate tensors (or plain tensors) of one graph.
        plates: the order of the leading dims: the names of the plates (or :class:`storch.Plate` objects
            taken from values of this graph, e.g. ``x.plates``; a partition's plate is then taken at least at that plate's step, and a plate
            no value carries is broadcast over). Every plate of every value must be listed, each once, or
            stand under one ``...``: ``plates=(..., "seq")`` puts
            ``seq`` last and the plates not listed first, in the order ``None`` gives them. ``None`` (the
            default): the order a torch function of the values gives its result (``torch.stack(values).plates``:
            the first of the longest values' plates, then the plates the others add), which the returned
            plates say.

    Returns:
        tensors: one raw tensor per value, of shape ``(*[p.size for p in plates], *value.shape)``.
        plates: the :class:`storch.Plate` of each leading dim, in order. A result computed from the tensors with
            the same leading dims is put back on the plates with ``storch.PlateTensor(result, plates)``; one
            reduced over the last ``k`` plate dims (list those last) with ``plates[:-k]``.

    Raises:
        PlateError: a value that is not a tensor; ``plates`` is a string or bytes (not a sequence of names),
            names a plate that neither a value nor a :class:`storch.Plate` in ``plates`` carries, names one twice,
            or omits a plate of the values (or one a partition's parents are chosen per) without a ``...`` (list
            it at the position wanted, or write ``...`` where the others go); a :class:`storch.Plate` in
            ``plates`` built by hand (``lineage=None``) rather than taken from a value; values of different graphs.

    Example (minimum risk training: Q ∝ p^α over the sampled set; ``seq`` last, any data plate before it)::

        (a, d, m), plates = storch.aligned(lp, delta, pad, plates=(..., "seq"))
        q = torch.softmax((alpha * a).masked_fill(m, float("-inf")), -1)
        storch.add_cost(storch.PlateTensor((q * d).sum(-1), plates[:-1]), name="mrt", credit=False)
    """
    if not values:
        raise PlateError("storch.aligned needs at least one value: storch.aligned(x, y, plates=(...))")
    groups = []
    for k, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise PlateError(
                f"storch.aligned: value {k} is a {type(v).__name__}, not a tensor: pass plate tensors (values storch "
                "computed) or plain tensors; make a number or an array one first, e.g. torch.as_tensor(v)")
        groups.append(plates_of(v))
    if plates is None:
        target = union_plates(groups)
        target += tuple(r for r, _ in _parent_plates(target, groups))
    else:
        target = _requested(plates, groups)
    shape = tuple(p.size for p in target)
    out = []
    for v, g in zip(values, groups):
        raw = align(v.tensor if type(v) is PlateTensor else v, g, target)
        out.append(raw.expand(shape + raw.shape[len(target):]))
    return tuple(out), target


def _requested(plates: Sequence[Any], groups: list[tuple[Plate, ...]]) -> tuple[Plate, ...]:
    """The plates of the values in the order ``plates`` names them, each at its latest step; refusals."""
    if isinstance(plates, (str, bytes, bytearray, Plate)):  # (bytes iterate as ints: b"x" gave "got a int: 120")
        raise PlateError(f"storch.aligned: plates= takes a sequence of plate names, got {plates!r}: pass "
                         f"plates=({_name(plates)!r},)")
    names, given, rest = [], [], None
    for p in plates:
        if p is Ellipsis:
            if rest is not None:
                raise PlateError("storch.aligned: plates= holds ... twice; one ... stands for every plate not listed")
            rest = len(names)
            continue
        if isinstance(p, Plate):
            given.append(p)
        elif not isinstance(p, str):
            raise PlateError(f"storch.aligned: plates= takes plate names (or storch.Plate objects, e.g. x.plates, and "
                             f"one ... for the plates not listed), got a {type(p).__name__}: {p!r}"
                             + (f"; pass the name as a str, {_name(p)!r}" if isinstance(p, (bytes, bytearray)) else ""))
        names.append(_name(p))
    carried_plates = {q for g in groups for q in g}
    for p in given:
        if p.lineage is None and p not in carried_plates:  # (before: "comes from two different graphs")
            raise PlateError(_hand_built_message(p, any(q.name == p.name for q in carried_plates)))
    union = union_plates(groups + ([tuple(given)] if given else []))
    gained = _parent_plates(union, groups)
    union += tuple(r for r, _ in gained)
    carried = {q.name for q in union}
    seen: set = set()
    for n in names:
        if n in seen:
            raise PlateError(f"storch.aligned: plates= names plate {n!r} twice; name each plate once, at the position "
                             "its dim takes")
        seen.add(n)
        if n not in carried:
            raise PlateError(
                f"storch.aligned: no value carries a plate {n!r} (the plates of the values and of plates=: "
                f"{sorted(carried)}); name only "
                "plates of the values, or pass a value that carries it (the sample of that plate, e.g. the current "
                "step's) or its storch.Plate (plates=x.plates)")
    left = [q.name for q in union if q.name not in seen]
    if rest is not None:
        names[rest:rest] = left
    elif left:
        why = [(r.name, p) for r, p in gained if r.name in left]
        if why:
            n, p = why[0]
            raise PlateError(
                f"storch.aligned: partition {p.name!r} chose the parents of its entries at step {p.step} per entry of "
                f"plate {n!r} (a beam per data point), so a value of an earlier step read at step {p.step} differs "
                f"per entry of {n!r}, which plates= does not list (it lists {names}); list "
                f"{[m for m, _ in why]} at the position their dims should take, or put ... where they go")
        raise PlateError(
            f"storch.aligned: the values carry plates {left} that plates= does not list (it lists {names}); list "
            "every plate of the values, at the position its dim should take (e.g. plates=x.plates for x's order), "
            "or put ... where the plates not listed go (plates=(..., 'seq'): the plate reduced over last)")
    by_name = {q.name: q for q in union}
    return tuple(by_name[n] for n in names)


def _parent_plates(union: tuple[Plate, ...], groups: list[tuple[Plate, ...]]) -> list[tuple[Plate, Plate]]:
    """The plates ``union`` lacks that a value of an earlier step of one of its partitions gains when it is re-indexed
    to the union's step (parents chosen per entry of a data plate: a beam per data point), each with that partition's
    plate; a value re-indexed without them could not be gathered (``align``)."""
    have = {q.name for q in union}
    out = []
    for p in union:
        lin = p.lineage
        if lin is None or not lin.parents:
            continue
        for step in sorted({q.step for g in groups for q in g if q.name == p.name and q.step < p.step}):
            for r in lin.index_plates_of(step, p.step):
                if r.name not in have:
                    have.add(r.name)
                    out.append((r, p))
    return out


def _hand_built_message(p: Plate, carried: bool) -> str:
    """The refusal of a :class:`Plate` built by hand (no lineage) in ``plates=``, which no value carries."""
    fix = (f"Pass the plate's name, {p.name!r}, in its place (a value carries it)" if carried else
           f"No value carries a plate {p.name!r}: pass the Plate of a value of this graph that has it in its place "
           f"(y.plates[i], y the sample of that plate or a value computed from it), or pass such a value too")
    return (f"storch.aligned: plates= holds {p!r}, a storch.Plate built by hand (lineage=None), not one of this graph's "
            "plates: a Plate in plates= must be taken from a value of this graph (x.plates[i], or the plates an "
            "earlier storch.aligned returned), whose lineage says which graph it belongs to and, for a partition, "
            f"at which step. {fix}")


def _name(p: Union[str, bytes, bytearray, Plate]) -> str:
    if isinstance(p, (bytes, bytearray)):
        return bytes(p).decode(errors="replace")
    return p.name if isinstance(p, Plate) else str(p)
