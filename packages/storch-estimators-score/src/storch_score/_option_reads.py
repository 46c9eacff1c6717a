"""Whether a :class:`storch_score.Score` subclass's own ``baseline`` / ``control_variate`` reads the baseline option.

``Score.baseline`` is the only code that turns ``baseline=`` into a value; a subclass that overrides ``baseline``
(or ``control_variate``) and never reaches it drops the option silently. This reads the override's source (its
syntax tree, not its names: ``self.critic.baseline(h)`` is another object's ``baseline``, ``cost.name`` is no
class attribute ``name``) and follows what it calls on the estimator: ``super().baseline(node, cost)``,
``Score.baseline(self, ...)`` (any spelling that resolves to a Score class), ``self.baseline(...)`` from a
``control_variate``, ``self.<state>`` for the option's state (``_OPTION_STATE``, also as a string constant:
``getattr(self, "moving_averages")``), and, through them, the methods (of the class, its mixins wherever they
sit in the MRO, and ``super()``'s), properties and functions (global, closure, ``module.function``) it passes
the estimator to. A ``staticmethod`` reaches no estimator. The option's state counts only on the estimator
(``self.critic.moving_averages`` is the critic's). Where a function has no source (``exec``, ``python -c``, a
``.pyc``-only install), its bytecode is read instead (``_Code``): the same reads, with the receivers found from the
instructions that load them. What it cannot follow (a helper held in an instance attribute, a helper that gets the
estimator only through ``node``) does not count as a read: the error then says how to declare the read
(``reads_baseline_option = True``).
"""

from __future__ import annotations

import ast
import builtins
import dis
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
        if tree is None:  # no source: read its bytecode
            self.unreadable.append(fn.__qualname__)
            return _Code(self, _scope(fn), selves, owner, depth).reads(code)
        return _Walk(self, fn, selves, owner, depth).reads(tree)


class _Walk:
    """One function's syntax tree (nested functions, lambdas and comprehensions included)."""

    def __init__(self, reader: _Reader, fn: types.FunctionType, selves: set, owner: Optional[type],
                 depth: int) -> None:
        self.reader, self.owner, self.depth = reader, owner, depth
        self.selves = set(selves)
        self.scope = _scope(fn)

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
        # getattr(x, "name"): read as x.name (the name alone is no read: getattr(self.critic, "moving_averages"))
        self.named = {id(n.args[1]) for n in nodes if isinstance(n, ast.Call) and self.is_getattr(n)}
        return any(self.node_reads(n) for n in nodes)

    def is_getattr(self, n: ast.AST) -> bool:
        return isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and self.scope.get(n.func.id) is getattr \
            and len(n.args) >= 2 and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)

    def node_reads(self, n: ast.AST) -> bool:
        if isinstance(n, ast.Constant):  # a string naming the option's state: vars(self)["moving_averages"]
            return isinstance(n.value, str) and n.value in _OPTION_STATE and id(n) not in self.named
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
            return self.attribute_reads(n.value, n.attr)
        if isinstance(n, ast.Call):
            if self.is_getattr(n):
                return self.attribute_reads(n.args[0], n.args[1].value)  # type: ignore[attr-defined]
            return self.call_reads(n)
        return False

    def attribute_reads(self, value: ast.AST, attr: str) -> bool:
        """``value.attr``: a member of the estimator (the option's state included: ``self.moving_averages``,
        ``node.estimator.baseline_fn``), of ``super()``, or of a Score class; another receiver's
        (``self.critic.moving_averages``) is no read."""
        r = self.reader
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
        if isinstance(e, ast.Call) and not e.keywords and all(isinstance(a, ast.Constant) for a in e.args):
            # storch.get_estimator_class("score"): the registered class
            return _estimator_class_of(self.resolve(e.func), [a.value for a in e.args])  # type: ignore[attr-defined]
        return None


def _scope(fn: types.FunctionType) -> dict:
    """The names ``fn`` sees: builtins, its globals, its closure."""
    scope: dict = dict(vars(builtins))
    scope.update(fn.__globals__)
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            scope[name] = cell.cell_contents
        except ValueError:  # (an empty cell)
            pass
    return scope


def _estimator_class_of(fn: Any, args: list) -> Any:
    """``storch.get_estimator_class("score")`` (``fn`` called with the constants ``args``): the registered class,
    or None."""
    if fn is None or fn is not getattr(sys.modules.get("storch"), "get_estimator_class", None):
        return None
    if len(args) != 1 or not isinstance(args[0], str):
        return None
    try:
        return fn(args[0])
    except Exception:  # (an unknown name: no class, no read)
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


# -- code without source: its bytecode ---------------------------------------------------------------------------

_SKIP = frozenset({"CACHE", "EXTENDED_ARG", "NOP", "PRECALL", "PUSH_NULL", "RESUME", "COPY_FREE_VARS", "MAKE_CELL",
                   "NOT_TAKEN"})
_FAST_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_BORROW", "LOAD_FAST_AND_CLEAR"})
_CELL_LOADS = frozenset({"LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"})
_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_PAIRS = {"LOAD_FAST_LOAD_FAST": ("LOAD_FAST", "LOAD_FAST"),  # (3.13+: two instructions in one)
          "LOAD_FAST_BORROW_LOAD_FAST_BORROW": ("LOAD_FAST", "LOAD_FAST"),
          "STORE_FAST_LOAD_FAST": ("STORE_FAST", "LOAD_FAST"), "STORE_FAST_STORE_FAST": ("STORE_FAST", "STORE_FAST")}
_ATTRS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
_CALLS = frozenset({"CALL", "CALL_FUNCTION", "CALL_METHOD", "CALL_KW", "CALL_FUNCTION_KW"})
_STORES = frozenset({"STORE_FAST", "STORE_DEREF", "STORE_NAME"})
_EST, _EST_CLASS, _UNKNOWN = ("estimator",), ("estimator class",), ("?",)


class _Code:
    """One function's bytecode, for code without source: the reads of :class:`_Walk`, each receiver read off the
    instructions that push it (a name, ``x.estimator``, ``super()``, a dotted global, ``get_estimator_class("...")``,
    a call's arguments), expression by expression backwards from the instruction that uses it. Instruction sequences
    it does not know (a conditional expression as a receiver, ``*args``) are no read."""

    def __init__(self, reader: _Reader, scope: dict, selves: set, owner: Optional[type], depth: int) -> None:
        self.reader, self.scope, self.owner, self.depth = reader, scope, owner, depth
        self.selves = set(selves)

    def reads(self, code: types.CodeType) -> bool:
        self.cells = set(code.co_cellvars)  # its own locals held in cells: not the scope's names
        ins: list = []  # (opname, argval, arg), the no-ops left out and a pair of loads split
        kw: tuple = ()
        for i in dis.get_instructions(code):
            if i.opname in _SKIP:
                continue
            if i.opname == "KW_NAMES":  # (3.11, 3.12: the keyword names of the next call)
                kw = i.argval if isinstance(i.argval, tuple) else ()
                continue
            if i.opname in _PAIRS and isinstance(i.argval, tuple):
                ins += [(op, name, None) for op, name in zip(_PAIRS[i.opname], i.argval)]
                continue
            ins.append((i.opname, i.argval, (i.arg, kw) if i.opname in _CALLS else i.arg))
            if i.opname in _CALLS:
                kw = ()
        self.ins = ins
        self.memo: dict = {}
        grown = True  # aliases of the estimator: est = self, est = node.estimator (to a fixed point)
        while grown:
            grown = False
            for k, (op, name, _) in enumerate(ins):
                if op in _STORES and k and name not in self.selves and self.value(k - 1) is _EST:
                    self.selves.add(name)
                    self.memo.clear()
                    grown = True
        named = set()  # getattr(x, "name"): read as x.name
        for k, (op, _, _) in enumerate(ins):
            if op in _CALLS:
                got = self.call(k)
                if got is not None and got[2] == ("value", getattr) and len(got[3]) >= 2:
                    named.add(got[3][1][0])
        for k, (op, name, _) in enumerate(ins):
            if op == "LOAD_CONST" and isinstance(name, types.CodeType):  # a nested function, lambda, comprehension
                if _Code(self.reader, self.scope, self.selves, self.owner, self.depth).reads(name):
                    return True
            elif op == "LOAD_CONST" and isinstance(name, str) and name in _OPTION_STATE and k not in named:
                return True
            elif (op in _ATTRS or op == "LOAD_SUPER_ATTR") and self.attribute_reads(k):
                return True
            elif op in _CALLS and self.call_reads(k):
                return True
        return False

    def attribute_reads(self, k: int) -> bool:
        op, attr, _ = self.ins[k]
        r = self.reader
        if op == "LOAD_SUPER_ATTR":  # (3.12+: super, its class, self, then the attribute)
            got = self.operands(k, 3)
            after = got[1][1] if got is not None else None
            return r.member(r.cls, attr, after if isinstance(after, type) else self.owner, self.depth)
        return self.member_reads(self.value(k - 1), attr)

    def member_reads(self, receiver: Any, attr: str) -> bool:
        """``receiver.attr``, the receiver a value of :meth:`expr`."""
        r = self.reader
        if receiver is None:
            return False
        if receiver is _EST or receiver is _EST_CLASS:
            return r.member(r.cls, attr, None, self.depth)
        if receiver[0] == "super":
            return r.member(r.cls, attr, receiver[1], self.depth)
        if receiver[0] == "value" and isinstance(receiver[1], type) and issubclass(receiver[1], r.score):
            return r.member(receiver[1], attr, None, self.depth)
        return False

    def call_reads(self, k: int) -> bool:
        """A function the estimator is passed to (as in :meth:`_Walk.call_reads`)."""
        got = self.call(k)
        if got is None:
            return False
        _, f_end, f, args, kwnames = got
        if f == ("value", getattr) and len(args) >= 2 and args[1][1][0] == "value" and isinstance(args[1][1][1], str):
            return self.member_reads(args[0][1], args[1][1][1])  # getattr(self, "moving_averages")
        n_pos = len(args) - len(kwnames)
        positions: set = {j for j, (_, v) in enumerate(args[:n_pos]) if v is _EST}
        positions |= {name for name, (_, v) in zip(kwnames, args[n_pos:]) if v is _EST}
        if not positions or f[0] != "value":
            return False
        owner = None
        f_op, f_attr, _ = self.ins[f_end]
        if f_op in _ATTRS:
            holder = self.value(f_end - 1)
            if holder is None or holder[0] != "value":
                return False  # a member of the estimator or of super(): attribute_reads followed it
            if isinstance(holder[1], type):
                if issubclass(holder[1], self.reader.score):
                    return False  # Score.baseline(self, ...): attribute_reads followed it
                owner = next((c for c in holder[1].__mro__ if f_attr in vars(c)), None)
        return self.reader.function(f[1], positions, owner, self.depth + 1)

    # -- expressions, read backwards ---------------------------------------------------------------------------

    def value(self, k: int) -> Any:
        got = self.expr(k)
        return None if got is None else got[1]

    def expr(self, k: int) -> Optional[tuple[int, Any]]:
        """The expression whose last instruction is ``k``: (its first instruction, its value: ``_EST``,
        ``_EST_CLASS``, ("super", the class after which it looks up), ("value", an object of the scope) or
        ``_UNKNOWN``), or None where the instructions are not one known expression."""
        if k < 0:
            return None
        if k not in self.memo:
            self.memo[k] = None  # (no cycles: each step reads earlier instructions)
            self.memo[k] = self._expr(k)
        return self.memo[k]

    def _expr(self, k: int) -> Optional[tuple[int, Any]]:
        op, name, _ = self.ins[k]
        if op == "LOAD_CONST":
            return k, ("value", name)
        if op in _FAST_LOADS or op in _CELL_LOADS:
            if name in self.selves:
                return k, _EST
            if op in _CELL_LOADS and name not in self.cells and name in self.scope:  # (a closure's)
                return k, ("value", self.scope[name])
            return k, _UNKNOWN
        if op in _GLOBAL_LOADS:
            return k, (("value", self.scope[name]) if name in self.scope else _UNKNOWN)
        if op in _ATTRS:
            got = self.expr(k - 1)
            if got is None:
                return None
            start, holder = got
            if name == "estimator":
                return start, _EST
            if name == "__class__" and holder is _EST:
                return start, _EST_CLASS
            if holder[0] == "value":
                try:
                    return start, ("value", inspect.getattr_static(holder[1], name))
                except AttributeError:
                    return start, _UNKNOWN
            return start, _UNKNOWN
        if op == "LOAD_SUPER_ATTR":
            got = self.operands(k, 3)
            return None if got is None else (got[0][0], _UNKNOWN)
        if op in _CALLS:
            got = self.call(k)
            if got is None:
                return None
            f_start, _, f, args, kwnames = got
            if f[0] == "value" and f[1] is super:  # super() / super(C, self)
                after = args[0][1][1] if args and args[0][1][0] == "value" else None
                return f_start, ("super", after if isinstance(after, type) else self.owner)
            if f[0] == "value" and not kwnames and all(v[0] == "value" for _, v in args):
                cls = _estimator_class_of(f[1], [v[1] for _, v in args])
                if cls is not None:  # storch.get_estimator_class("score")
                    return f_start, ("value", cls)
            return f_start, _UNKNOWN
        return None

    def operands(self, k: int, n: int) -> Optional[list]:
        """The ``n`` expressions that end just before ``k``, first to last, as (start, value)."""
        out: list = []
        end = k - 1
        for _ in range(n):
            got = self.expr(end)
            if got is None:
                return None
            out.append(got)
            end = got[0] - 1
        return out[::-1]

    def call(self, k: int) -> Optional[tuple[int, int, Any, list, tuple]]:
        """The call at ``k``: (its first instruction, the function expression's last, the function's value, the
        arguments as (start, value), the keyword names of the last arguments)."""
        op, _, (n, kwnames) = self.ins[k]
        end = k
        if op in ("CALL_KW", "CALL_FUNCTION_KW"):  # the names are a constant on top of the arguments
            if k < 1 or self.ins[k - 1][0] != "LOAD_CONST" or not isinstance(self.ins[k - 1][1], tuple):
                return None
            kwnames, end = self.ins[k - 1][1], k - 1
        args = self.operands(end, n)
        if args is None:
            return None
        f_end = (args[0][0] if args else end) - 1
        f = self.expr(f_end)
        if f is None:
            return None
        return f[0], f_end, f[1], args, tuple(kwnames)
