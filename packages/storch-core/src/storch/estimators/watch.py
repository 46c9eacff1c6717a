"""The watch on a relaxed sample read through a jump: a comparison, argmax or integer cast of a value
whose autograd graph reaches the sample an estimator handed out (``Node.thresholded``), in user code for a
``jump_free`` estimator, and in ``torch.distributions`` where a density reads the sample as indices (a
relaxed or straight-through Categorical / OneHotCategorical). ``storch.surrogate_loss`` refuses the costs
it reached (``storch.OrderError``). For a pathwise node (reparameterization, gumbel_softmax), the comparisons in
user code of a value its sample reaches (``Node.compared``: the mask of ``torch.where(x > 0, x, 0)``), refused
from order 2.
"""

from __future__ import annotations

import types
import weakref
from typing import Optional

import torch
from torch.distributions import Categorical, OneHotCategorical

from ..conditions.order_guard import unbatched
from .._util.qualname import code_qualname
from ..graph.node import Node
from ..plates.dispatch import FINITENESS_TESTS, INDEX_VALUES, INDEXING, INTEGER_SOURCES, Caller
from ..conditions.smoothness import _reaches


def finite_test(func, raw: torch.Tensor) -> bool:
    """Whether ``func`` is a finiteness test (:data:`~storch.plates.dispatch.FINITENESS_TESTS`: isfinite, isnan,
    isinf, isposinf, isneginf) of an operand whose entries are all finite in this step: its result is constant
    there (all True or all False), no jump, and the watches do not record it (a NaN guard,
    ``torch.where(torch.isfinite(c), c, 0)``, the one storch's NonFiniteCostError advises). One ``all()`` of the
    operand, asked only for these functions and only where a watch would record them. Where the operand is not
    finite somewhere (``isfinite(log(z - 0.5))``, NaN for z < 0.5) the test is a threshold, recorded as ``x < 0``
    is; an accepted step there is one whose samples all fell on one side."""
    if func not in FINITENESS_TESTS:
        return False
    raw = unbatched(raw)
    return not raw.is_meta and bool(torch.isfinite(raw).all())


def _threshold_watch(node: Node, jumps: bool):
    """The ``Lineage.watch`` of a node whose handed-out sample carries gradient and must not be read through a
    jump: records on ``node.thresholded`` the first such function applied to a value whose autograd graph
    reaches the sample handed out (its relaxed sample). ``jumps`` (a ``jump_free`` estimator): every function of
    ``storch.plates.dispatch.JUMPS`` in user code. Always (also for a relaxed or straight-through Categorical /
    OneHotCategorical node of gumbel_softmax, gumbel_straight_through): a function of ``torch.distributions``
    that reads the sample as indices (:func:`_reads_indices`); its name is kept on ``node.thresholded_in``; for a
    ``jump_free`` estimator also the argmax torch.distributions takes elsewhere (``Categorical.mode``). The comparisons torch.distributions makes (argument validation, ``validate_sample``, formula branches) are
    not counted. Holds the node weakly (the lineage is the node's plate's: no reference cycle).

    For a ``jump_free`` estimator, a function of :data:`~storch.plates.dispatch.INDEX_VALUES` (max / min with a dim,
    topk, sort, kthvalue, median, mode, the max poolings) in user code is not a threshold (its values are continuous
    and common: ``x - x.max(-1, keepdim=True).values``), but its indices are an argmax of the relaxed sample: the
    watch returns a record ``(node reference, name, operand or None)``, with which the dispatcher marks the indices
    (:mod:`storch.plates.integer_reads`), and a cost computed from them is refused
    (``storch.surrogate.integer_reads._check_integer_reads``; found by review: REBAR's gradient of
    ``w[m.max(-1).indices] + 0.1 * (m * v).sum(-1)`` was that of the smooth term alone, -0.0056 for -0.288)."""
    ref = weakref.ref(node)

    def watch(func, raw: torch.Tensor, plates: Optional[tuple], caller: Caller) -> Optional[tuple]:
        node = ref()
        if node is None or node.thresholded is not None or not (jumps or func in INDEXING or func in INDEX_VALUES):
            return None
        if jumps and func in INDEX_VALUES and (raw.is_floating_point() or raw.is_complex()):
            # the indices of max / topk / sort of a value the relaxed sample reaches, in user code: marked, refused
            # where a cost reads them (the walk is deferred to that surrogate: _check_integer_reads)
            if caller() is None:
                if plates is None:
                    return (ref, _name(func), raw)
                return (ref, _name(func), None) if _own(plates, node) else None
        if plates is not None:
            # an operand without an autograd graph (detached, compared under no_grad): a value computed from the
            # sample where it carries only the node's sample plates (_own); no graph to walk. A jump_free estimator's
            # comparison of it in user code is recorded (torch.where(z.detach() > 0.5, a, b) gave REBAR a gradient
            # of 0 against 0.245: found by review); a metric is computed on the raw tensor, z.tensor.detach(). Not
            # torch.distributions' index reads of a detached value: what the density reads is not the gradient path
            if (not jumps or func in INDEX_VALUES or caller() is not None or not _own(plates, node)
                    or finite_test(func, raw)):
                return None
            node.thresholded = getattr(func, "__name__", str(func))
            return None
        code = caller()
        if code is None:  # user code: a jump of the cost (max's indices: marked above, not a threshold)
            if not jumps or func in INDEX_VALUES:
                return None
        elif not _reads_indices(func, code):
            if not (jumps and func in INDEXING):
                return None
            # an argmax torch.distributions takes of a value the sample reaches (Categorical(logits=f(z)).mode): a
            # jump as the user's own argmax is, for a jump_free estimator (the general message; found by review)
            code = None
        if finite_test(func, raw):
            return None  # (a NaN guard of a finite value: constant, no jump)
        handed = [h for h, _ in node.handed if h.requires_grad] + list(node.preimages)
        if handed and _reaches([raw], handed):
            node.thresholded = getattr(func, "__name__", str(func))
            if code is not None:
                node.thresholded_in = code_qualname(code)
    watch.node = ref  # type: ignore[attr-defined]  # (read on an error path: storch.plates.rules.metadata)
    return watch


def is_pathwise(est) -> bool:
    """Whether ``est`` differentiates the cost through the value it hands out, so that the path from it to a cost
    must be smooth (``storch.surrogate.pathwise``) and its comparisons are watched (:func:`_compare_watch`): it
    ``requires_rsample`` (reparameterization, LAX), or says it is ``pathwise`` (a relaxation such as
    gumbel_softmax, drawn without ``rsample``)."""
    return est.requires_rsample or est.pathwise


def _both(first, second):
    """One ``Lineage.watch`` that runs two (a relaxed Categorical / OneHotCategorical of a pathwise estimator: the
    reads of its sample as indices, :func:`_threshold_watch`, and its comparisons in user code)."""
    def watch(func, raw: torch.Tensor, plates: Optional[tuple], caller: Caller) -> Optional[tuple]:
        one = first(func, raw, plates, caller)
        two = second(func, raw, plates, caller)
        return one if one is not None else two
    watch.node = getattr(first, "node", None) or getattr(second, "node", None)  # type: ignore[attr-defined]
    return watch


def _compare_watch(node: Node):
    """The ``Lineage.watch`` of a pathwise node (:func:`is_pathwise`: reparameterization, gumbel_softmax) whose
    handed-out sample carries gradient: a function of ``storch.plates.dispatch.JUMPS`` (a comparison, argmax, a
    bool or integer cast) applied in user code to a value that requires grad and carries the node's plate is
    kept on ``node._compared_pending`` as a candidate; :func:`compared` walks them when a surrogate asks (at
    order >= 2, or for the order-1 surrogate's refusal of a second derivative). Its result, a bool mask, has no
    autograd history, so a piecewise cost selected by it (``torch.where(x > 0, x, 0)``, ``x * (x > 0)``, a
    leaky ReLU written so) has a kink the walk of the autograd graph (storch.conditions.smoothness) cannot see. The
    comparisons torch.distributions makes (argument validation, formula branches) are not counted, nor
    ``max`` with a dim (its indices: see :data:`~storch.plates.dispatch.INDEX_VALUES`; its values are in the
    graph). Recording is a list append (no walk at order 1); at most ``_PENDING_MAX`` candidates are kept,
    beyond that they are walked at once. An operand without an autograd graph (``plates`` given: detached,
    ``x.detach()`` or ``x.clone().detach()``, or compared under ``torch.no_grad()``) has no graph to walk: it is
    recorded at once where every sample plate it carries is one of the node's (:func:`_own`: a value computed from
    the sample, as every tensor carrying only these plates is; found by review: ``torch.where(x.detach() > 0, x,
    0)`` gave a Hessian of 0); one that carries a later node's plate (a discrete sample's ``z == 1``) is not.
    A metric is computed on the raw tensor (``x.tensor.detach()``, not a plate tensor) or after the step. Holds the
    node weakly.

    An integer value it reads from a floating-point operand (:data:`~storch.plates.dispatch.INTEGER_SOURCES`:
    ``l.long()``, argmax, bucketize, the indices of max / topk / sort) is also returned as a record
    ``(node reference, name, operand or None)``, with which the dispatcher marks that integer result
    (:mod:`storch.plates.integer_reads`): a cost computed from it is refused at every order (the jump of the
    index has no derivative, so the gradient through the sample would miss its term)."""
    ref = weakref.ref(node)

    def watch(func, raw: torch.Tensor, plates: Optional[tuple], caller: Caller) -> Optional[tuple]:
        node = ref()
        if node is None:
            return None
        integer = func in INTEGER_SOURCES and (raw.is_floating_point() or raw.is_complex())
        if not integer and (node.compared is not None or func in INDEX_VALUES):
            return None
        # (torch.distributions' own comparisons first: the caller is found once per call, for every watch)
        if caller() is not None or (plates is not None and not _own(plates, node)):
            return None
        if not integer and finite_test(func, raw):
            return None  # (a NaN guard of a finite value: constant, no jump)
        # an integer value read from the sample (l.long(), argmax, topk's indices): marked, its walk deferred to
        # the surrogate of a cost that carries the mark (storch.surrogate.integer_reads._check_integer_reads)
        record = (ref, _name(func), None if plates is not None else raw) if integer else None
        if node.compared is not None or func in INDEX_VALUES:
            return record
        if plates is not None:
            node.compared = _name(func)
            return record
        pending = node._compared_pending
        if pending is None:
            node._compared_pending = [(func, raw)]
        elif len(pending) < _PENDING_MAX:
            pending.append((func, raw))
        elif compared(node) is None:  # (walks the candidates: one of them reaches the sample, as a rule)
            node._compared_pending = [(func, raw)]
        return record
    return watch


def _name(func) -> str:
    return getattr(func, "__name__", str(func)).strip("_")


_PENDING_MAX = 4


def _own(plates: tuple, node: Node) -> bool:
    """Whether every sample plate (not a data plate) of ``plates`` is one of ``node``'s (its own, its parents')."""
    mine = node.plates
    for p in plates:
        if not p.independent and p not in mine:
            names = {q.name for q in mine}  # (a partition's plate at another step: the same name)
            return all(q.independent or q.name in names for q in plates)
    return True


def compared(node: Node) -> Optional[str]:
    """``node.compared``, after walking the candidates its :func:`_compare_watch` recorded: the name of the first
    of them whose autograd graph reaches a value the node handed out that carries gradient (under
    ``torch.func.vmap``: the tensors batched). ``None`` where none does."""
    pending = node._compared_pending
    if pending is not None:
        node._compared_pending = None
        handed = [h for h in (unbatched(h) for h, _ in node.handed) if h.requires_grad]
        handed += [unbatched(u) for u in node.preimages]  # (t.inv(z) of a cached transform: its pre-image)
        if handed:
            for func, raw in pending:
                if _reaches([unbatched(raw)], handed):
                    node.compared = getattr(func, "__name__", str(func)).strip("_")  # (x > 0: __gt__)
                    break
    return node.compared


def _reads_indices(func, code: types.CodeType) -> bool:
    """Whether ``func``, called by torch.distributions' ``code``, reads its operand as indices: an integer cast
    (Categorical.log_prob's ``value.long()``), or the indices of ``max`` in OneHotCategorical.log_prob
    (``value.max(-1)[1]``). On a relaxed sample the log-probability then jumps between categories (found by
    porting: REBAR/RELAX with ``q.log_prob(z) - p.log_prob(z)``, |z| 20 to 161)."""
    return (func in INDEXING and code is _CATEGORICAL_LOG_PROB) or (func in INDEX_VALUES and code is _ONE_HOT_LOG_PROB)


# only these two densities read their value as indices: elsewhere in torch.distributions an argmax reads something
# else that the sample reaches (Categorical(logits=f(z)).mode, an unused metric of a decoder: refused by a first
# version, found by review)
_CATEGORICAL_LOG_PROB = Categorical.log_prob.__code__
_ONE_HOT_LOG_PROB = OneHotCategorical.log_prob.__code__
_CATEGORIES = (Categorical, OneHotCategorical)
