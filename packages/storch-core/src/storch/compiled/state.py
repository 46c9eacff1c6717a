"""Estimators with state in a compiled step: which estimators' state the program reads, its structure (a trace
per structure: the cache entry :class:`_Stateful`), and the state tensors lifted from the trace's constants
into inputs of the program, so that each call passes their current values."""

from __future__ import annotations

import torch

from ..errors import StorchError


class _Stateful:
    """The cache entry of a step with estimator state: a trace per structure of the state (which
    moving averages exist: the first step has none, and so no baseline, and traces another program)."""

    __slots__ = ("estimators", "variants")

    def __init__(self, estimators: list, variants: dict) -> None:
        self.estimators, self.variants = estimators, variants


def _stateful(nodes: list) -> list:
    """The estimators of the traced nodes whose state the program reads or whose update it replays."""
    out, seen = [], set()
    for node in nodes:
        est = node.estimator
        if id(est) not in seen and (est.replays_update or est.state_tensors()):
            seen.add(id(est))
            out.append(est)
    return out


def _state_of(estimators: list) -> tuple[tuple, list]:
    """The structure of the estimators' state (keys, shapes, dtypes, devices: the trace's key) and its tensors."""
    sig, state = [], []
    for est in estimators:
        items = []
        for key, value in est.state_tensors().items():
            if not isinstance(value, torch.Tensor):
                raise StorchError(f"estimator {est.name!r}: state_tensors() must map names to tensors; {key!r} "
                                  f"is a {type(value).__name__}")
            items.append((key, value.shape, value.dtype, value.device, value.requires_grad))
            state.append(value)
        sig.append(tuple(items))
    return tuple(sig), state


def _lift_state(gm: torch.fx.GraphModule, state: list) -> None:
    """Make the estimators' state tensors, which the trace captured as constants, inputs of the
    program (after the others, in ``state``'s order): each call passes their current values."""
    if not state:
        return
    graph = gm.graph
    index = {}
    for i, t in enumerate(state):
        index.setdefault(id(t), i)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = []
    for i, t in enumerate(state):
        if i == 0 and not placeholders:  # no tensor argument and no probe (a call under no_grad): the first inputs
            with graph.inserting_before(next(iter(graph.nodes))):
                anchor = graph.placeholder(f"state_{i}")
        else:
            with graph.inserting_after(anchor if i else placeholders[-1]):
                anchor = graph.placeholder(f"state_{i}")
        anchor.meta["val"] = t
        inputs.append(anchor)
    lifted = set()
    for node in list(graph.nodes):
        if node.op == "get_attr":
            value = getattr(gm, node.target, None)
            i = index.get(id(value)) if isinstance(value, torch.Tensor) else None
            if i is not None:
                node.replace_all_uses_with(inputs[i])
                graph.erase_node(node)
                lifted.add(node.target)
    # removed after the walk: make_fx records one get_attr node per read of a constant, so a state tensor
    # read twice (two costs of one name share a moving average) has two nodes of one target, and deleting
    # the attribute at the first left the second reading a constant the module no longer had
    for target in lifted:
        delattr(gm, target)
    gm.recompile()
