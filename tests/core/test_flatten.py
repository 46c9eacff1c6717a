"""storch._util.flatten: the leaves of torch's pytree, in its order, without its per-call reference cycle (issue 19)."""

import collections
import gc

import torch
import torch.utils._pytree as pytree

from storch._util.flatten import flatten, unflatten

t = torch.zeros(2)
CASES = [
    ((t, 3), {}),
    ((t, [1, None, (t, "a")]), {"b": {"x": t, "y": [2.0]}, "a": ()}),
    ((), {}),
    (([],), {"k": {}}),
]


def test_same_leaves_as_pytree_and_round_trip():
    for tree in CASES:
        leaves, spec = flatten(tree)
        ref, _ = pytree.tree_flatten(tree)
        assert len(leaves) == len(ref) and all(a is b for a, b in zip(leaves, ref))
        back = unflatten(leaves, spec)
        assert back == tree or repr(back) == repr(tree)
        assert type(back[1]) is dict and list(back[1]) == list(tree[1])
        hash(spec)  # storch.compile keys its traces by it
    # a different structure (dict key order, list vs tuple) is a different key
    assert flatten(((t,), {"a": 1, "b": 2}))[1] != flatten(((t,), {"b": 2, "a": 1}))[1]
    assert flatten(([t],))[1] != flatten(((t,),))[1]


def test_other_containers_are_pytrees_own():
    point = collections.namedtuple("point", "x y")
    for tree in [((point(t, 1),), {}), ((collections.OrderedDict(a=t),), {}), ((torch.Size([2, 3]),), {})]:
        leaves, spec = flatten(tree)
        ref, ref_spec = pytree.tree_flatten(tree)
        assert leaves == ref and spec == ref_spec
        assert unflatten(leaves, spec) == tree
    # is_leaf keeps a container whole (vmap_call keeps a torch.Size)
    leaves, spec = flatten(((t, torch.Size([2])), {}), is_leaf=lambda x: type(x) is torch.Size)
    assert leaves[1] == torch.Size([2]) and type(leaves[1]) is torch.Size and not isinstance(spec, pytree.TreeSpec)


def _settle() -> None:
    """Collect until nothing is left (a collection can run finalizers that leave garbage of their own: after
    inductor's compile tests in one process, a single collection left 771 objects for the count below)."""
    for _ in range(10):
        if gc.collect() == 0:
            return


def test_no_cycle():
    tree = CASES[1]
    _settle()
    gc.disable()
    try:
        unflatten(*flatten(tree))
        n_ours = gc.collect()
        pytree.tree_flatten(tree)
        n_torch = gc.collect()
    finally:
        gc.enable()
    assert n_ours == 0
    assert n_torch > 0  # the control: torch's own leaves its helper's cycle


def test_torch_return_types_are_walked_without_a_cycle():
    # what torch functions return (torch.max(x, 0)): the plates' per-entry loop and vmap flatten those per call
    x = torch.arange(6.0).reshape(2, 3)
    tree = (torch.max(x, 0), [torch.linalg.slogdet(torch.eye(2)), None])
    leaves, spec = flatten(tree)
    ref, _ = pytree.tree_flatten(tree)
    assert len(leaves) == len(ref) and all(a is b for a, b in zip(leaves, ref))
    assert not isinstance(spec, pytree.TreeSpec)
    hash(spec)
    back = unflatten(leaves, spec)
    assert type(back[0]) is type(tree[0]) and type(back[1][0]) is type(tree[1][0])
    assert all(a is b for a, b in zip(back[0], tree[0])) and back[1][1] is None
    _settle()
    gc.disable()
    try:
        unflatten(*flatten(tree))
        n = gc.collect()
    finally:
        gc.enable()
    assert n == 0


def test_the_torch_2_7_namedtuple_test_answers_as_pytree():
    """torch 2.7 (the minimum) has no ``pytree.is_namedtuple_class``, and every flatten of a call's arguments failed
    there (an AttributeError from any plate tensor's vmap route); storch._util.flatten then uses torch 2.7's own test,
    ``_is_namedtuple_instance``, on the class. It answers as the installed pytree does."""
    from storch._util.flatten import _namedtuple_class_2_7

    point = collections.namedtuple("point", "x y")
    structseq = type(torch.max(torch.ones(2, 2), 0))
    for cls, expected in [(point, True), (tuple, False), (structseq, False), (torch.Size, False), (list, False)]:
        assert _namedtuple_class_2_7(cls) is expected, cls
        if hasattr(pytree, "is_namedtuple_class"):
            assert pytree.is_namedtuple_class(cls) is expected, cls


def test_the_torch_2_7_fallbacks_are_not_taken_where_torch_has_its_own_names():
    """d71bdc9's fallbacks (torch 2.7 and 2.8) are for torch without these names only: where torch has them (the
    pinned 2.13), storch uses torch's own pytree test and functorch's pre-dispatch vmap primitives (those a
    storch.compile trace records), not the stand-ins."""
    import storch._util.flatten as flat
    from storch.plates.rules import flat_vmap

    if hasattr(pytree, "is_namedtuple_class"):
        assert flat._is_namedtuple_class is pytree.is_namedtuple_class
    try:
        from torch._functorch import predispatch
    except ImportError:
        return
    if hasattr(predispatch, "_add_batch_dim"):
        for name in ("_add_batch_dim", "_remove_batch_dim", "_vmap_increment_nesting", "_vmap_decrement_nesting"):
            assert getattr(flat_vmap, name) is getattr(predispatch, name), name
