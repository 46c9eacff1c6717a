"""Small helpers that know nothing of storch's concepts (the lowest layer but the errors; nothing here imports storch).

``flatten``: a call's arguments to their leaves and back without pytree's per-call reference cycle;
``table_cache``: a cache for functions that build constant index tables, safe under torch.func transforms;
``stacklevel``: where a warning points (the first frame outside storch and torch: the user's call);
``qualname``: a function's class-qualified name for a message, from its code (also on Python < 3.11).
"""
