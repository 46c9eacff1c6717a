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

from .._order_guard import is_differentiated, unbatched
from ..errors import OrderError
from ..graph import current_graph
from ..node import Node
from ..plates.tensor import install_wrap_check
from .pathwise import _REACH_KEY, _pathwise


def check_wrapped(raw: torch.Tensor, plates: tuple) -> None:
    """Refuse ``storch.PlateTensor(raw, plates)`` while grad mode is on, where ``raw`` needs no gradient and has
    one entry per entry (not a broadcast size-1 dim over more entries) of the plate of a live node that
    differentiates the cost through its sample. Under ``torch.no_grad()`` it is allowed: nothing is
    differentiated there, and it is how a value per entry that does not depend on the sample (noise, an index)
    is declared. Attribute reads where ``raw`` requires grad, or grad mode is off."""
    if not torch.is_grad_enabled() or not plates or is_differentiated(unbatched(raw)):
        return
    graph = current_graph()
    for i, p in enumerate(plates):
        if raw.shape[i] != p.size or p.independent:
            continue  # broadcast along the plate (one value for every entry), or a data plate
        node = graph.plates.get(p.name)
        if not isinstance(node, Node) or (p.lineage is not None and node.plate.lineage is not p.lineage):
            continue  # not a node of this graph (check_plates says so where it is used)
        if _differentiates_cost(node):
            with graph.guard():  # (the default graph's step is discarded, as after any refused storch call)
                raise OrderError(_message(node, raw, plates))


def _differentiates_cost(node: Node) -> bool:
    """Whether ``node``'s estimator gets its gradient through the sample it hands out (the test of
    ``pathwise._check_reaches``, read from its record where an earlier surrogate decided it): a value it handed
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
        "sample. A value per entry that does not depend on the sample (noise drawn per entry, an entry's index): "
        "draw it with torch from the sample's shape (torch.randn_like(z)), or wrap it under torch.no_grad() "
        "(`with torch.no_grad(): eps = storch.PlateTensor(raw, z.plates)`), which says that it does not; a value "
        "that is the same for every entry needs no plate (a plain tensor broadcasts)")


install_wrap_check(check_wrapped)
