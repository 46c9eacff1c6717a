"""Where a storch warning points: the first frame outside storch and torch (the user's call), and outside any
estimator's code (a family's, first- or third-party) that the warning was issued under."""

from __future__ import annotations

import os
import sys
import weakref
from types import CodeType, FrameType, ModuleType

import torch

__all__ = ["user_stacklevel", "skip_methods_of"]

# storch's and torch's own files: frames a warning skips to reach the user's call (this module is in storch/_util/:
# two dirnames up is the whole storch package, not only _util/)
_OWN_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)

# classes whose methods are estimator code (storch.Estimator registers itself: this layer cannot import it)
_OWNERS: list[type] = []


def skip_methods_of(cls: type) -> None:
    """Register ``cls`` (``storch.Estimator``): a warning issued while a method of an instance of it is on the stack
    points outside that method and the code of the instance's family (see :func:`user_stacklevel`)."""
    if cls not in _OWNERS:
        _OWNERS.append(cls)


def user_stacklevel(*modules: ModuleType) -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the first frame
    outside storch and torch (the user's call, whichever of storch's paths led to it).

    ``modules``: modules whose folders' frames are skipped too: an estimator family passes one of its own
    (``warnings.warn(..., stacklevel=storch.extending.user_stacklevel(sys.modules[__name__]))`` in a module at
    its package's top level), so that a warning issued deep in its code points at the user's line, not at the
    family's or storch's frames in between.

    A warning issued while an estimator's method is running (its components under ``est(d)``, its
    ``update_parameters`` under ``storch.backward()``) skips that estimator's code too, without ``modules``: up to
    the outermost such method, every frame of a method of an estimator and every frame in its family (the package
    of each estimator class it derives from; the file, for a class of a top-level module such as a script) is
    skipped. Otherwise a core helper that warns (``storch.extending.skip_nonfinite_update``) pointed into the
    family's file, or into storch's own frame that called the family. A frame of other code that an estimator
    calls (a user's baseline or network) stops the walk: the warning points there. The walk reads the whole stack,
    only when a warning is issued.
    """
    own = _OWN_DIRS + tuple(_folder(m) for m in modules)
    frame, level = sys._getframe(1), 1
    inner = _estimator_frames(frame) if _OWNERS else None
    if inner is not None:
        outermost, family, codes = inner
        family = own + family
        while frame is not None:
            if not (frame.f_code.co_filename.startswith(family) or _owner_of(frame, codes) is not None):
                return level  # other code an estimator called (a user's callable)
            last = frame is outermost
            frame, level = frame.f_back, level + 1
            if last:
                break
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame, level = frame.f_back, level + 1
    return level


def _method_codes() -> set[int]:
    """The ids of the code objects of the functions defined in the classes of every estimator class's MRO (torch's
    own classes left out: nn.Module's ``_call_impl`` runs every user model too), ``__wrapped__`` followed. Only a
    frame running one of them can be an estimator's method, so only its ``f_locals`` is read: reading a frame's
    ``f_locals`` (before Python 3.13) leaves a snapshot of its locals on the frame until it returns, and a user's
    training loop (``Trainer.fit(self)``) then kept that iteration's tensors alive. Each class's codes are cached weakly
    (classes come and go in a long-running process: an entry goes with its class)."""
    ids: set[int] = set()
    todo, seen = list(_OWNERS), set()
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
            codes = _CODES.get(cls)
            if codes is None:
                codes = _CODES[cls] = _codes_of(cls)
            ids.update(map(id, codes))
    return ids


# estimator class -> the code objects of the functions of its MRO (weak keys: a class that is gone drops its entry)
_CODES: "weakref.WeakKeyDictionary[type, tuple[CodeType, ...]]" = weakref.WeakKeyDictionary()


def _codes_of(cls: type) -> tuple[CodeType, ...]:
    out = []
    for c in cls.__mro__:
        if c is object or c.__module__.partition(".")[0] == "torch":
            continue
        for v in vars(c).values():
            for f in (v, getattr(v, "__func__", None), getattr(v, "fget", None)):
                for _ in range(8):  # (a chain of functools.wraps decorators)
                    code = getattr(f, "__code__", None)
                    if not isinstance(code, CodeType):
                        break
                    out.append(code)
                    f = getattr(f, "__wrapped__", None)
    return tuple(out)


def _owner_of(frame: FrameType, codes: set[int]) -> object:
    """The estimator whose method ``frame`` runs (its first argument, ``self``), or None."""
    code = frame.f_code
    if id(code) not in codes or code.co_argcount == 0:
        return None
    owner = frame.f_locals.get(code.co_varnames[0])
    return owner if isinstance(owner, tuple(_OWNERS)) else None


def _estimator_frames(frame: FrameType | None) -> tuple[FrameType, tuple[str, ...], set[int]] | None:
    """The outermost frame of an estimator's method from ``frame`` outward, the files or folders of the families of
    the estimators met on the way, and the ids of the estimator methods' code objects; None where no estimator's
    method is on the stack."""
    outermost, family, codes = None, [], _method_codes()
    while frame is not None:
        owner = _owner_of(frame, codes)
        if owner is not None:
            outermost = frame
            family.extend(_family_paths(type(owner)))
        frame = frame.f_back
    return None if outermost is None else (outermost, tuple(family), codes)


def _family_paths(cls: type) -> list[str]:
    """Where the code of an estimator class and its bases lives: a package's folder (``storch_relaxed/``, its
    helper modules included), or the file of a top-level module (a user's script, a test module)."""
    out = []
    for c in cls.__mro__:
        if not any(issubclass(c, o) for o in _OWNERS):
            continue
        name = c.__module__
        top = sys.modules.get(name.partition(".")[0])
        folders = getattr(top, "__path__", None)  # a package (its classes may be in __init__.py) or a namespace one
        if folders is not None:
            out.extend(os.path.abspath(f) + os.sep for f in folders if isinstance(f, str))
            continue
        file = getattr(top, "__file__", None)
        if isinstance(file, str):
            out.append(os.path.abspath(file))
    return out


def _folder(module: ModuleType) -> str:
    """The folder of ``module``'s file. A module without one (a namespace package's ``__file__`` is None) is
    refused: ``str(None)`` read as a relative path named the working directory, and the walk skipped the user's
    own frames there."""
    file = getattr(module, "__file__", None)
    if not isinstance(module, ModuleType) or not isinstance(file, str):
        raise TypeError(
            f"storch.extending.user_stacklevel: {module!r} is not a module loaded from a file (a namespace package "
            "has no __file__); pass a module of your package, e.g. sys.modules[__name__] from a module at its top "
            "level")
    return os.path.dirname(os.path.abspath(file)) + os.sep
