"""Plates: the plate tensor and how torch functions run on it.

Layers, lowest first (each module imports only from those before it; checked by import-linter):

1. ``tensor``: :class:`Plate`, :class:`PlateTensor`, lineages, alignment of plates by name;
2. ``treatments``: the table that says how each torch function runs on plate tensors
   (``table_doc`` renders it for ``docs/plates.md``); beside it, ``raw_values``: raw values read in a plate
   order the caller names (``storch.aligned``), for code that leaves storch;
3. ``kit``: the helpers every rule uses (wrap, unwrap, walk operands, re-enter dispatch);
4. ``rules``: the treatments grouped by kind (pointwise, vmap, batch-first, metadata, shape,
   indexing, losses);
5. ``dispatch``: ``PlateTensor.__torch_function__``, which no rule imports; importing it installs
   it on the tensor (``tensor.install_dispatcher``), and importing this package imports it.
"""

from . import dispatch  # noqa: F401  (installs the dispatcher on PlateTensor)
from .tensor import Lineage, Plate, PlateTensor, ancestor_index
from .raw_values import aligned

__all__ = ["Lineage", "Plate", "PlateTensor", "ancestor_index", "aligned"]
