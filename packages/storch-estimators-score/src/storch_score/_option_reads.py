"""Whether a :class:`storch_score.Score` subclass's own ``baseline`` / ``control_variate`` reads the baseline option.

``Score.baseline`` is the only code that turns ``baseline=`` into a value; a subclass that overrides ``baseline``
(or ``control_variate``) and never reaches it drops the option silently. This reads the override's source (its
syntax tree, not its names: ``self.critic.baseline(h)`` is another object's ``baseline``, ``cost.name`` is no
class attribute ``name``) and follows what it calls on the estimator: ``super().baseline(node, cost)``,
``Score.baseline(self, ...)`` (any spelling that resolves to a Score class), ``self.baseline(...)`` from a
``control_variate``, ``self.<state>`` for the option's state (``_OPTION_STATE``, also as a string constant:
``getattr(self, "moving_averages")``), and, through them, the methods (of the class, its mixins wherever they
sit in the MRO, and ``super()``'s), properties and functions (global, closure, ``module.function``) it passes
the estimator to. A ``staticmethod`` reaches no estimator. What it cannot follow (code without source, a
helper held in an instance attribute) does not count as a read: the error then says how to declare the read
(``reads_baseline_option = True``).
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import sys
import textwrap
import types
import weakref
from typing import Any, Optional

# the option's state on the estimator: reading one is reading the option
_OPTION_STATE = frozenset({"_baseline", "baseline_fn", "baseline_kind", "moving_averages"})
_DEPTH = 8  # nested calls followed at most

_verdicts: "weakref.WeakKeyDictionary[type, tuple[bool, tuple[str, ...]]]" = weakref.WeakKeyDictionary()


def reads_option(cls: type, score: type) -> tuple[bool, tuple[str, ...]]:
    """Whether ``cls.control_variate`` (as the surrogate calls it: ``Estimator.control_variate`` calls
    ``self.baseline``) reads the baseline option, and the qualified names of the functions on the way whose
    source could not be read. ``score`` is :class:`storch_score.Score` (passed in: no import cycle)."""
    got = _verdicts.get(cls)
    if got is None:
        reader = _Reader(cls, score)
        got = (reader.member(cls, "control_variate", None, 0), tuple(reader.unreadable))
        _verdicts[cls] = got
    return got


class _Reader:
    def __init__(self, cls: type, score: type) -> None:
        self.cls, self.score = cls, score
        self.base = score.__mro__[1:]  # Estimator, nn.Module, object: their members never read the option
        self.seen: set = set()  # (code, estimator params): a cycle (baseline calling itself) reads nothing new
        self.unreadable: list[str] = []

    # -- members: what ``self.<name>`` (or ``super().<name>``, ``Cls.<name>``) runs ------------------------

    def member(self, start: type, name: str, after: Optional[type], depth: int) -> bool:
        """Whether the member ``name`` of ``start`` (searched in its MRO after ``after`` for ``super()``) reads
        the option when called on (or read from) the estimator."""
        if name in _OPTION_STATE:
            return True
        mro = start.__mro__
        if after is not None and after in mro:
            mro = mro[mro.index(after) + 1:]
        owner = next((k for k in mro if name in vars(k)), None)
        if owner is None:  # an instance attribute (a submodule, a number): data, not the option
            return False
        if owner is self.score:
            return name == "baseline" or name == "_call_baseline"
        if owner in self.base:
            # Estimator.control_variate calls self.baseline (dispatched on the estimator's class)
            return name == "control_variate" and self.member(self.cls, "baseline", None, depth + 1)
        raw = vars(owner)[name]
        if isinstance(raw, staticmethod):
            return self.function(raw.__func__, set(), owner, depth + 1)  # no estimator to read it from
        if isinstance(raw, (classmethod, functools.partialmethod)):
            return self.function(raw.__func__ if isinstance(raw, classmethod) else raw.func, {0}, owner, depth + 1)
        if isinstance(raw, property):
            return raw.fget is not None and self.function(raw.fget, {0}, owner, depth + 1)
        if isinstance(raw, types.FunctionType):
            return self.function(raw, {0}, owner, depth + 1)
        return False  # data (a class attribute such as name = "...") or a callable object

    # -- functions: walk the syntax tree -------------------------------------------------------------

    def function(self, fn: Any, estimator_args: set, owner: Optional[type], depth: int) -> bool:
        """Whether ``fn``, called with the estimator as its positional arguments ``estimator_args`` (indices) or
        keyword arguments (names), reads the option."""
        fn = inspect.unwrap(fn)  # (@torch.no_grad() and other functools.wraps decorators)
        if not isinstance(fn, types.FunctionType) or depth > _DEPTH:
            return False
        code = fn.__code__
        params = list(code.co_varnames[:code.co_argcount + code.co_kwonlyargcount])
        selves = {params[i] if isinstance(i, int) else i for i in estimator_args
                  if not isinstance(i, int) or i < code.co_argcount}
        key = (code, frozenset(selves))
        if key in self.seen:
            return False
        self.seen.add(key)
        tree = _syntax_tree(fn)
        if tree is None:
            self.unreadable.append(fn.__qualname__)
            return False
        return _Walk(self, fn, selves, owner, depth).reads(tree)


class _Walk:
    """One function's syntax tree (nested functions, lambdas and comprehensions included)."""

    def __init__(self, reader: _Reader, fn: types.FunctionType, selves: set, owner: Optional[type],
                 depth: int) -> None:
        self.reader, self.owner, self.depth = reader, owner, depth
        self.selves = set(selves)
        self.scope: dict = dict(vars(builtins))
        self.scope.update(fn.__globals__)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                self.scope[name] = cell.cell_contents
            except ValueError:  # (an empty cell)
                pass

    def reads(self, tree: ast.AST) -> bool:
        nodes = list(ast.walk(tree))
        for n in nodes:  # local imports (import storch_score inside the function), of modules already loaded
            if isinstance(n, ast.Import):
                for a in n.names:
                    head = a.name if a.asname else a.name.partition(".")[0]
                    self.scope[a.asname or head] = sys.modules.get(head)
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                module = sys.modules.get(n.module)
                for a in n.names:
                    self.scope[a.asname or a.name] = getattr(module, a.name, None)
        # aliases of the estimator: est = self, est = node.estimator (to a fixed point: chains of aliases)
        grown = True
        while grown:
            grown = False
            for n in nodes:
                if isinstance(n, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and n.value is not None \
                        and self.is_estimator(n.value):
                    targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                    for t in targets:
                        if isinstance(t, ast.Name) and t.id not in self.selves:
                            self.selves.add(t.id)
                            grown = True
        return any(self.node_reads(n) for n in nodes)

    def node_reads(self, n: ast.AST) -> bool:
        if isinstance(n, ast.Constant):
            return isinstance(n.value, str) and n.value in _OPTION_STATE  # getattr(self, "moving_averages")
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
            return self.attribute_reads(n.value, n.attr)
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Name) and self.scope.get(f.id) is getattr and len(n.args) >= 2 \
                    and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str):
                return self.attribute_reads(n.args[0], n.args[1].value)
            return self.call_reads(n)
        return False

    def attribute_reads(self, value: ast.AST, attr: str) -> bool:
        """``value.attr``: a member of the estimator, of ``super()``, or of a Score class."""
        r = self.reader
        if attr in _OPTION_STATE:  # (on any receiver: node.estimator.moving_averages)
            return True
        sup = self.super_of(value)
        if sup is not None:
            return r.member(r.cls, attr, sup, self.depth)
        if self.is_estimator(value) or self.is_estimator_class(value):
            return r.member(r.cls, attr, None, self.depth)
        obj = self.resolve(value)
        if isinstance(obj, type) and issubclass(obj, r.score):  # Score.baseline(self, ...), SubClass.helper(...)
            return r.member(obj, attr, None, self.depth)
        return False  # another object's attribute: self.critic.baseline(h), cost.name, tensor.float()

    def call_reads(self, call: ast.Call) -> bool:
        """A function the estimator is passed to: ``helper(self, node, cost)``, ``module.helper(est=self)``,
        ``Mixin.helper(self, ...)``."""
        positions: set = {i for i, a in enumerate(call.args) if self.is_estimator(a)}
        positions |= {k.arg for k in call.keywords if k.arg is not None and self.is_estimator(k.value)}
        if not positions:
            return False
        f = call.func
        if isinstance(f, ast.Attribute) and (self.super_of(f.value) is not None or self.is_estimator(f.value)):
            return False  # a member: attribute_reads followed it
        fn = self.resolve(f)
        owner = None
        if isinstance(f, ast.Attribute):
            holder = self.resolve(f.value)
            if isinstance(holder, type):
                if issubclass(holder, self.reader.score):
                    return False  # Score.baseline(self, ...): attribute_reads followed it
                owner = next((k for k in holder.__mro__ if f.attr in vars(k)), None)
        return self.reader.function(fn, positions, owner, self.depth + 1)

    # -- what an expression is ---------------------------------------------------------------------------

    def is_estimator(self, e: ast.AST) -> bool:
        """``self`` (or an alias), ``node.estimator``."""
        return (isinstance(e, ast.Name) and e.id in self.selves) or (
            isinstance(e, ast.Attribute) and e.attr == "estimator")

    def is_estimator_class(self, e: ast.AST) -> bool:
        """``type(self)``, ``self.__class__``."""
        if isinstance(e, ast.Attribute) and e.attr == "__class__":
            return self.is_estimator(e.value)
        return (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and self.scope.get(e.func.id) is type
                and len(e.args) == 1 and self.is_estimator(e.args[0]))

    def super_of(self, e: ast.AST) -> Optional[type]:
        """For ``super()`` / ``super(C, self)``: the class after which the member is looked up."""
        if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "super"):
            return None
        if e.args:
            after = self.resolve(e.args[0])
            return after if isinstance(after, type) else self.owner
        return self.owner

    def resolve(self, e: ast.AST) -> Any:
        """A name or dotted name's value in the function's scope (globals, closure, builtins), or None."""
        if isinstance(e, ast.Name):
            return self.scope.get(e.id)
        if isinstance(e, ast.Attribute):
            holder = self.resolve(e.value)
            if holder is None:
                return None
            try:
                return inspect.getattr_static(holder, e.attr)
            except AttributeError:
                return None
        return None


def _syntax_tree(fn: types.FunctionType) -> Optional[ast.AST]:
    """The ``def`` (or ``lambda``) of ``fn`` from its source, or None where there is none (exec, a REPL)."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        module = ast.parse(source)
    except SyntaxError:  # a lambda inside a longer statement: its lines alone do not parse
        return None
    name = fn.__code__.co_name
    for n in ast.walk(module):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name:
            return n
        if isinstance(n, ast.Lambda) and name == "<lambda>":
            return n
    return None
