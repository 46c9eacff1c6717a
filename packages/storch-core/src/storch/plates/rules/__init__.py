"""The plate treatments, grouped by kind; each module registers its handlers in the table.

``pointwise`` (elementwise functions), ``vmap`` (the general fallback), ``batch_first`` (functions
with a batch dim: plates folded into it), ``metadata`` (shape queries, conversions, refusals),
``shape`` (dim arguments, reductions, matmul, norms), ``indexing`` and ``losses``. Rules import
the kit and each other, never the dispatcher.
"""
