"""The graph context: stochastic nodes, data plates and costs of one stochastic computation graph.

Each thread has a default graph; ``with storch.Graph():`` makes an isolated one. A graph lives
for one step (one surrogate loss); estimators, which hold state across steps, live outside it.

The modules, each importing only those below it (the ``graph-layers`` contract in ``.importlinter``); ``Graph`` is
built from the parts (``_Steps`` < ``_Ownership`` < ``_Costs``, ``_DataPlates``), classes of its methods:

- ``context``: ``Graph`` (entered with ``with``), the thread's graphs (``current_graph``), the entry points
  ``add_cost``, ``denote_independent``, ``reset``, and what ``storch.compile`` hooks into them;
- ``costs``: a cost checked and registered (``Graph.add_cost``), the messages that say what to do;
- ``data_plates``: ``Graph.denote_independent``, a dim of data points made an independent plate;
- ``ownership``: the plate names a graph's nodes and data plates own, which graph a plate tensor belongs to;
- ``steps``: a step's life cycle: reset, the step guard, an evaluation step ended by the next one.
"""

from __future__ import annotations

from .node import Node
# the private names the rest of storch imports from here: storch.estimators (_stack), storch.compile (tracing_nodes,
# tracing_recorder) and the surrogate (_stack, is_tracing, tracing_recorder)
from .context import (Graph, _stack, add_cost, current_graph, denote_independent, is_tracing, reset,  # noqa: F401
                      tracing_nodes, tracing_recorder)

__all__ = ["Graph", "Node", "current_graph", "add_cost", "denote_independent", "reset"]
