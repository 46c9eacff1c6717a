"""A call's arguments flattened to their leaves and back, as ``torch.utils._pytree`` does, without the
reference cycle its ``tree_flatten`` leaves per call (issue 19).

``tree_flatten`` walks the tree with a recursive local function (``tree_flatten.<locals>.helper``), whose
closure cell holds the function itself: every call leaves a cycle of 7 objects that only the cyclic
garbage collector frees. ``vmap_call`` and ``storch.compile``'s replay flatten on every call, so a step
left garbage at every such call. Here tuples, lists and dicts (their exact types: what arguments and
keyword arguments are made of) and torch's own structseqs (``torch.return_types``: what torch functions
return, e.g. ``torch.max(x, 0)``; the plates' per-entry vmap flattens those) are walked by a module-level
function, and their structure is a nested tuple (hashable: ``storch.compile`` keys its traces by it). Any
other pytree container (a namedtuple,
an ``OrderedDict``, a ``torch.Size`` unless it is a leaf, a registered class) makes the whole flatten
pytree's own, with its ``TreeSpec``: the same leaves in the same order either way.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.utils._pytree as pytree

__all__ = ["flatten", "unflatten"]

# a structure: None for a leaf, else (kind, children...) for a tuple or list, (_DICT, keys, children...) for a dict,
# (_RETURN, class, children...) for a torch.return_types structseq (pytree's node for it rebuilds it as class(values))
_TUPLE, _LIST, _DICT, _RETURN = 0, 1, 2, 3


def _namedtuple_class_2_7(cls: type) -> bool:
    """torch 2.7's pytree test for a namedtuple node (``_is_namedtuple_instance``), on the class"""
    fields = getattr(cls, "_fields", None)
    return cls.__bases__ == (tuple,) and isinstance(fields, tuple) and all(type(f) is str for f in fields)


# whether pytree flattens instances of a class as a namedtuple: its own test (torch 2.8+), else torch 2.7's
_is_namedtuple_class = getattr(pytree, "is_namedtuple_class", None) or _namedtuple_class_2_7


class _OtherNode(Exception):
    """A pytree container other than a tuple, list or dict: pytree's own flatten."""


def flatten(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None) -> tuple[list, Any]:
    """``tree``'s leaves and structure (a nested tuple, or pytree's ``TreeSpec`` for other containers);
    ``is_leaf``: as pytree's (a container it accepts stays a leaf)."""
    leaves: list = []
    try:
        return leaves, _walk(tree, leaves, is_leaf)
    except _OtherNode:
        return pytree.tree_flatten(tree, is_leaf=is_leaf)


def unflatten(leaves: list, structure: Any) -> Any:
    """The tree of :func:`flatten`'s ``structure`` with ``leaves`` in its leaves' places."""
    if isinstance(structure, pytree.TreeSpec):
        return pytree.tree_unflatten(leaves, structure)
    it = iter(leaves)
    return _build(structure, it)


def _walk(x: Any, leaves: list, is_leaf) -> Any:
    t = type(x)
    if is_leaf is not None and is_leaf(x):
        leaves.append(x)
        return None
    if t is tuple or t is list:
        children = [_TUPLE if t is tuple else _LIST]
        for v in x:
            children.append(_walk(v, leaves, is_leaf))
        return tuple(children)
    if t is dict:
        children = [_DICT, tuple(x)]
        for v in x.values():
            children.append(_walk(v, leaves, is_leaf))
        return tuple(children)
    if t.__module__ == "torch.return_types" and issubclass(t, tuple):
        children = [_RETURN, t]
        for v in x:
            children.append(_walk(v, leaves, is_leaf))
        return tuple(children)
    if t in pytree.SUPPORTED_NODES or _is_namedtuple_class(t):
        raise _OtherNode
    leaves.append(x)
    return None


def _build(structure: Any, it) -> Any:
    if structure is None:
        return next(it)
    kind = structure[0]
    if kind == _DICT:
        return {k: _build(s, it) for k, s in zip(structure[1], structure[2:])}
    if kind == _RETURN:
        return structure[1]([_build(s, it) for s in structure[2:]])
    children = [_build(s, it) for s in structure[1:]]
    return tuple(children) if kind == _TUPLE else children
