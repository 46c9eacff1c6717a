"""A value computed per sample outside torch's autograd, wrapped back on the plate of a pathwise node.

A black-box cost (a simulator, a reward computed in numpy from ``z.tensor``) is wrapped back with
``storch.PlateTensor(r, z.plates)``. A score-function node needs only its value per entry. A node whose
estimator differentiates the cost through the sample it hands out (reparameterization, the relaxations,
REBAR and RELAX at their relaxed samples: :mod:`storch.surrogate.pathwise`) gets no gradient through the
wrapped part: alone, such a cost does not reach the sample (refused by ``_check_reaches``), but added to a
differentiable term it does, and the gradient is silently biased. :func:`check_wrapped` refuses the value
where it is wrapped, in the public constructor (``PlateTensor._wrap``, the dispatcher's, is not checked).
"""

from __future__ import annotations

import torch

from ..conditions.order_guard import is_differentiated, unbatched
from ..errors import OrderError
from ..graph import current_graph
from ..graph.node import Node
from ..plates.tensor import install_wrap_check
from .reaches import _REACH_KEY, _pathwise


def check_wrapped(raw: torch.Tensor, plates: tuple) -> None:
    """Refuse ``storch.PlateTensor(raw, plates)`` where ``raw`` is a floating-point tensor that needs no gradient
    and has one entry per entry (not a broadcast size-1 dim over more entries) of the plate of a live node that
    differentiates the cost through its sample, and of no other sample plate.

    Not refused: integer and bool values (entry ids, masks: no gradient is ever expected of them); a value that
    also varies along the plate of a score-function node (a reward computed from that node's sample, whose
    plates include those of the pathwise nodes upstream of it: the score-function term credits it, and the
    pathwise nodes get their gradient through that node's log-probability); a value wrapped while the pathwise
    node's samples need no gradient (an evaluation under ``torch.no_grad()``, where nothing is differentiated).
    Grad mode at the wrap does not matter otherwise: ``with torch.no_grad(): storch.PlateTensor(r, z.plates)``
    inside a training step is the same value computed outside autograd (a review found it offered as an escape,
    and a black-box reward so wrapped was biased at z = 103). Attribute reads where ``raw`` requires grad."""
    if not plates or not raw.is_floating_point() or is_differentiated(unbatched(raw)):
        return
    graph = current_graph()
    pathwise = None
    for i, p in enumerate(plates):
        if raw.shape[i] != p.size or p.independent:
            continue  # broadcast along the plate (one value for every entry), or a data plate
        node = graph.plates.get(p.name)
        if not isinstance(node, Node) or (p.lineage is not None and node.plate.lineage is not p.lineage):
            continue  # not a node of this graph (check_plates says so where it is used)
        if not _differentiates_cost(node):
            return  # a score-function node's plate: the value may be computed from its sample (credited there)
        pathwise = pathwise or node
    if pathwise is not None:
        with graph.guard():  # (the default graph's step is discarded, as after any refused storch call)
            raise OrderError(_message(pathwise, raw, plates))


def _differentiates_cost(node: Node) -> bool:
    """Whether ``node``'s estimator gets its gradient through the sample it hands out (the test of
    ``reaches._check_reaches``, read from its record where an earlier surrogate decided it): a value it handed
    out requires grad, and is a path from the distribution's parameters (not MuProp's leaf of its own)."""
    est = node.estimator
    seen = est.__dict__.get(_REACH_KEY, ())
    if seen is None:  # never pathwise
        return False
    if not any(raw.requires_grad for raw, _ in node.handed):
        return False  # a score-function node (or its parameters need no gradient now)
    return seen != () or _pathwise(node) is not False


def _message(node: Node, raw: torch.Tensor, plates: tuple) -> str:
    est = node.estimator
    p = node.plate.name
    names = tuple(q.name for q in plates)
    return (
        f"storch.PlateTensor(raw, plates {names}): the raw tensor (shape {tuple(raw.shape)}) needs no gradient and "
        f"holds one value per entry of plate {p!r}, whose estimator {est.name!r} differentiates the cost through the "
        "sample it hands out (a reparameterised or relaxed sample; REBAR and RELAX: their relaxed samples, in the "
        "control variate). A value computed per entry outside torch's autograd (in numpy or another library from "
        f"the sample's .tensor, after .detach() or .tolist()) carries no gradient through the sample, so a cost "
        "built from it would be silently biased: only its differentiable terms would be differentiated. For a cost "
        "computed outside torch (a black-box reward, a simulator), use a score-function estimator for this node, "
        "which needs only the cost's value per entry: 'score' (with baseline='leave_one_out' for less variance), "
        "'lax' for a continuous node, 'arm' or 'disarm' for a Bernoulli; or compute the cost in torch from the "
        "sample. A value per entry that does not depend on the sample: noise, drawn with torch from the sample's "
        "shape (torch.randn_like(z)); an entry's index or a mask, as an integer or bool tensor (not checked); a "
        "value that is the same for every entry needs no plate (a plain tensor broadcasts). Wrapping under "
        "torch.no_grad() does not change this: the value is still computed outside autograd")


install_wrap_check(check_wrapped)
