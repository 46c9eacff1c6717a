"""Where a storch warning points: the first frame outside storch and torch (the user's call), and outside any
estimator's code (a family's, first- or third-party) that the warning was issued under."""

from __future__ import annotations

import os
import sys
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
        outermost, family = inner
        family = own + family
        while frame is not None:
            if not (frame.f_code.co_filename.startswith(family) or _owner_of(frame) is not None):
                return level  # other code an estimator called (a user's callable)
            last = frame is outermost
            frame, level = frame.f_back, level + 1
            if last:
                break
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame, level = frame.f_back, level + 1
    return level


# id(code object) -> (the code object, whether its first argument is named self): co_varnames builds a tuple at each
# read and a code object's hash reads it too (~0.5 us, per frame of the walk); the entry holds its code object, so an
# id is not reused while it is a key; bounded (a run's code objects are few)
_TAKES_SELF: dict[int, tuple[CodeType, bool]] = {}


def _takes_self(code: CodeType) -> bool:
    entry = _TAKES_SELF.get(id(code))
    if entry is None:
        if len(_TAKES_SELF) > 4096:
            _TAKES_SELF.clear()
        entry = _TAKES_SELF[id(code)] = (code, code.co_argcount > 0 and code.co_varnames[0] == "self")
    return entry[1]


def _owner_of(frame: FrameType) -> object:
    """The estimator whose method ``frame`` runs (its first argument, ``self``), or None."""
    if not _takes_self(frame.f_code):
        return None
    owner = frame.f_locals.get("self")
    return owner if isinstance(owner, tuple(_OWNERS)) else None


def _estimator_frames(frame: FrameType | None) -> tuple[FrameType, tuple[str, ...]] | None:
    """The outermost frame of an estimator's method from ``frame`` outward, and the files or folders of the
    families of the estimators met on the way; None where no estimator's method is on the stack."""
    outermost, family, owners, get = None, [], tuple(_OWNERS), _TAKES_SELF.get
    while frame is not None:
        entry = get(id(frame.f_code))  # (inline: a function call per frame was most of the walk's time)
        if entry[1] if entry is not None else _takes_self(frame.f_code):
            owner = frame.f_locals.get("self")
            if isinstance(owner, owners):
                outermost = frame
                family.extend(_family_paths(type(owner)))
        frame = frame.f_back
    return None if outermost is None else (outermost, tuple(family))


def _family_paths(cls: type) -> list[str]:
    """Where the code of an estimator class and its bases lives: a package's folder (``storch_relaxed/``, its
    helper modules included), or the file of a top-level module (a user's script, a test module)."""
    out = []
    for c in cls.__mro__:
        if not any(issubclass(c, o) for o in _OWNERS):
            continue
        name = c.__module__
        top = sys.modules.get(name.partition(".")[0])
        file = getattr(top, "__file__", None)
        if not isinstance(file, str):
            continue
        out.append(os.path.dirname(os.path.abspath(file)) + os.sep if "." in name else os.path.abspath(file))
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
