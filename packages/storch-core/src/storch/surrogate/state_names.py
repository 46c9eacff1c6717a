"""The state names of a step's costs: where estimator state kept per cost (moving averages, NVIL's heads,
sum_and_sample's buffer totals) must be kept under a name with the cost's plates, because costs of one name and
different plates reach one node.
"""

from __future__ import annotations

import warnings
from typing import Optional

from .._util.stacklevel import user_stacklevel
from ..plates.tensor import plates_of


def _state_names(per_cost: list) -> Optional[dict]:
    """The state names of costs that share a name with a cost of other plates reaching the same node.

    Per-cost estimator state (moving averages, NVIL's heads, the frames ``update_parameters`` reads,
    sum_and_sample's buffer totals) is kept by the frame's key, the cost's name and step. Costs added per
    layer under one name (``storch.add_cost(term, name="nelbo")`` for each layer) have different plates,
    and one baseline for all of them (the last one's average) would silently cost variance: at a node
    that several such costs reach, each is kept under its name with its plate names, sorted
    (``"nelbo[z1,z2]"``). A model without such costs keeps its keys (and state_dict) as they were.
    Two costs of one name with the same plates at one step do share the state: warned about.

    Returns:
        ``None`` (nothing renamed), or by ``id(cost)`` the cost's state name and the plate names of the
        nodes where it is used.
    """
    by_name: dict = {}
    for name, cost, nodes in per_cost:
        if nodes:
            by_name.setdefault(name, []).append((cost, nodes))
    renamed: Optional[dict] = None
    warned = False
    for name, members in by_name.items():
        if len(members) < 2:
            continue
        kinds: dict = {}  # the plate names of a cost: its costs (and their nodes)
        seen: set = set()
        for cost, nodes in members:
            plates = plates_of(cost)
            if plates in seen and not warned:
                warned = True
                warnings.warn(
                    f"two costs named {name!r} were added at the same step (the same plates): the loss counts both, "
                    "but estimator state kept per cost (moving-average and learned baselines, sum_and_sample's "
                    "buffer) is kept by name, plates and step, so they share it and one replaces the other there. "
                    "Give each cost of a step its own name (the same name at different steps of a partition, or "
                    "for costs of different plates such as one per layer, is fine)", UserWarning, stacklevel=user_stacklevel())
            seen.add(plates)
            kinds.setdefault(frozenset([p.name for p in plates]), []).append((cost, nodes))
        if len(kinds) < 2:  # (the steps of a partition: one kind)
            continue
        at_node: dict = {}  # a node's plate name -> the kinds of the costs that reach it
        for kind, costs in kinds.items():
            for _, nodes in costs:
                for node in nodes:
                    at_node.setdefault(node.plate.name, set()).add(kind)
        for kind, costs in kinds.items():
            state = f"{name or ''}[{','.join(sorted(kind))}]"
            for cost, nodes in costs:
                split = {node.plate.name for node in nodes if len(at_node[node.plate.name]) > 1}
                if split:
                    if renamed is None:
                        renamed = {}
                    renamed[id(cost)] = (state, split)
    return renamed
