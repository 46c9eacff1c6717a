"""A graph's costs: ``Graph.add_cost`` checks a cost (one number per sample, floating point, of this graph, every
plate of the nodes it carries, not added during a backward pass) and registers it; the messages and warnings
(a constant cost, a cost added after the step's estimators updated) say what to do.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..conditions.order_guard import is_differentiated, unbatched
from .._util.stacklevel import user_stacklevel
from ..runtime.eager import eager_only
from ..errors import ConstantCostWarning, CostError
from .node import Node
from ..plates.tensor import PlateTensor
from .ownership import _Ownership
from .steps import _graph_task_id


class _Costs(_Ownership):
    """A :class:`~storch.graph.Graph`'s costs (one of its parts, on the plates' identity)."""

    @eager_only
    def add_cost(self, cost: torch.Tensor, name: Optional[str] = None, *, credit: bool = True) -> None:
        """Add a cost to this graph: :func:`storch.add_cost` on this graph instead of the current one."""
        with self._guard:
            self._add_cost(cost, name, credit)

    def _add_cost(self, cost, name: Optional[str], credit: bool = True) -> None:
        label = name if name is not None else len(self.costs)
        if _graph_task_id() != -1:  # (one C call: -1 outside a backward pass)
            raise CostError(_in_backward_message(label))
        if not isinstance(cost, torch.Tensor):
            raise CostError(
                f"cost {label!r} is a {type(cost).__name__}, not a tensor; pass the torch tensor computed "
                "from the samples (e.g. storch.add_cost(loss_tensor)), not a Python number or .item()")
        if type(cost) is PlateTensor:  # (raw_of, plates_of)
            raw, plates = cost._raw, cost._plates
        else:
            raw, plates = cost, ()
        if raw.dim() != len(plates):  # per-sample rank 0 (read from the raw tensor: no dispatch)
            raise CostError(self._shape_message(label, cost, raw, plates))
        if not raw.is_floating_point():
            raise CostError(f"cost {label!r} has dtype {cost.dtype}; a cost must be a floating point tensor "
                            "(e.g. `.float()`)")
        if not self.owns(plates):
            self.check_plates(plates, f"cost {label!r}")
        if credit is True and plates:
            self._check_node_plates(label, raw, plates)
        # (one attribute read if it needs grad; a cost on a sample plate, which comes first, is no constant either:
        # a score-function cost such as the toy's, of samples that need no grad, skips the warning's call)
        if not raw.requires_grad and credit is True and (not plates or plates[0].independent) and (
                torch.is_grad_enabled()):
            self._warn_constant(raw, plates, label)
        if credit is not True:
            if credit is not False:
                raise CostError(f"cost {label!r}: credit must be True or False, got {credit!r}")
            self.no_credit.add(id(cost))
        elif self.step_updated and plates:  # (None on the common path: one attribute read)
            self._warn_late_cost(label, plates)
        self.costs.append((name or f"cost{len(self.costs)}", cost))

    def _check_node_plates(self, label, raw: torch.Tensor, plates: tuple) -> None:
        """Refuse a cost that carries a node's sample plate but not every plate of that node's sample: a data
        plate (or an upstream node's sample plate) reduced by hand (``.tensor.sum(i)`` rewrapped with
        ``storch.PlateTensor``). The node's score term is per entry of all its plates, and such a cost has no
        entry per data point (or per upstream sample) to credit: the surrogate failed deep inside with a
        PlateError naming neither the cost nor the node (a porting test). A partition's node is left to the
        surrogate (its steps may have other plates).

        Refuse too a cost whose raw tensor holds one value for all the entries of a node's sample plate (size 1,
        or expanded: stride 0, along that plate's dim of size > 1): a value of the whole set of samples (a
        multi-sample bound reduced over the plate, ``keepdim=True`` or broadcast back), which each entry would be
        credited with as its own cost (biased: z = 16 against the IWAE bound's gradient; with leave-one-out the
        score term cancelled, z = 152, or the baseline failed on the size-1 dim). Only where the node's estimator
        reads its samples (:meth:`_set_value_refused`): a pathwise node's gradient of such a value is exact, and so
        is ``expect``'s; a value of an enumerated node, expanded over an upstream node's plate, is no set value.
        Strides tell a broadcast value from a computed one, not whether it was computed from the samples: a value
        that does not depend on them, broadcast onto the plate (``storch.aligned``, ``expand_as``), is refused too
        (its score term is pure noise: the message says to add it without the plate)."""
        get = self.plates.get
        full, carries_node = 1, False
        for p in plates:
            full *= p.size
            if p.independent:
                continue
            owner = get(p.name)
            if not isinstance(owner, Node):
                continue
            carries_node = True
            if owner.step_log is not None:
                continue
            for q in owner.parents:
                if q not in plates:  # (the same Plate objects, as a rule: found by identity) then by name
                    names = {r.name for r in plates}
                    missing = [r for r in owner.parents if r.name not in names]
                    if missing:
                        raise CostError(self._missing_plates_message(label, plates, owner, missing))
                    break
        # (two C calls: a cost's dims are its plates', each of the plate's size or 1, so a size-1 dim makes fewer
        # entries than the plates have; a stride-0 dim of size > 1 makes the tensor non-contiguous)
        if carries_node and (raw.numel() != full or not raw.is_contiguous()):
            self._check_set_value(label, raw, plates)

    def _check_set_value(self, label, raw: torch.Tensor, plates: tuple) -> None:
        """The refusal of a cost that holds one value for all the entries of a node's sample plate, for a cost with
        a size-1 plate dim or a non-contiguous one (off the common path: a permuted one comes here too)."""
        get = self.plates.get
        shape, strided = raw.shape, raw.layout == torch.strided  # (sparse tensors have no strides)
        for i, p in enumerate(plates):
            if p.independent or p.size == 1:
                continue
            owner = get(p.name)
            if (isinstance(owner, Node) and (shape[i] != p.size or strided and raw.stride(i) == 0)
                    and self._set_value_refused(owner, p, plates)):
                raise CostError(_set_value_message(label, p, owner, plates))

    def _set_value_refused(self, owner: Node, plate, plates: tuple) -> bool:
        """Whether a credited cost that holds one value for all the entries of ``plate`` (``owner``'s sample plate)
        is refused (error path only). Not where the entries' credit is exact for it: a node whose estimator does not
        read its samples (:meth:`Node.reads_its_samples`: reparameterization, gumbel_softmax; the plate's mean of
        one value is that value, differentiated through every sample), or one whose values are a function of its
        distribution (``deterministic_proposal``: ``expect``'s weights sum to 1 over the support it enumerates).
        Nor where the cost also carries the plate of a node downstream of ``owner`` whose weights are not uniform
        (``expect`` under an upstream sample plate): what each entry of ``plate`` is credited with is the cost
        weighted by them, which varies along ``plate`` (the enumerated sample itself, expanded over it)."""
        if owner.estimator.deterministic_proposal or not owner.reads_its_samples():
            return False
        get = self.plates.get
        for q in plates:
            other = get(q.name)
            if (q is not plate and isinstance(other, Node) and not other.estimator.uniform_weights
                    and any(r.name == plate.name for r in other.parents)):
                return False
        return True

    def _missing_plates_message(self, label, plates: tuple, node: Node, missing: list) -> str:
        """The refusal of :meth:`_check_node_plates` (error path only)."""
        data = [q.name for q in missing if q.independent]
        samples = [q.name for q in missing if not q.independent]
        msg = (f"cost {label!r} has plates {tuple(q.name for q in plates)}: it carries the sample plate "
               f"{node.plate.name!r} of node {node.plate.name!r} (estimator {node.estimator.name!r}), whose samples "
               f"have the plates {tuple(q.name for q in node.plates)}, but not ")
        parts = []
        if data:
            parts.append(
                f"the data plate{'s' if len(data) > 1 else ''} {data}, reduced by hand (a sum or mean over its dim "
                "of .tensor, wrapped back with storch.PlateTensor). Each data point's sample is credited with its "
                "own entry's cost, and a cost reduced over the data points has none. Add the per-data-point cost "
                "instead (before the reduction): storch averages a data plate; for the sum over it, scale the "
                "per-entry cost by the plate's size (`size * cost`; nested data plates: J * n, see 'Minibatches of "
                "a larger data set, and nested data plates' in docs/plates.md). A cost that mixes data points "
                "(contrastive across the batch) is no per-data-point cost: keep the batch as a per-sample dim of "
                "the node (no data plate), see 'A cost that mixes data points' in docs/plates.md")
        if samples:
            owners = [f"{n!r} (of node {n!r})" for n in samples]
            parts.append(
                f"the sample plate{'s' if len(samples) > 1 else ''} {', '.join(owners)}, reduced by hand. A reduction "
                "over a node's samples is not a cost storch can credit: compute the cost from the plate tensors "
                "themselves, one value per sample; a multi-sample bound such as IWAE's is the cost of ONE sample that "
                "holds its K draws (est(dist.expand((K, *dist.batch_shape)))), reduced over that dim, or the 'vimco' "
                "estimator (docs/plates.md)")
        return msg + "; nor ".join(parts)

    def _warn_late_cost(self, label, plates: tuple) -> None:
        """A cost added after a backward pass of this step's surrogate ran the estimators' updates
        (``surrogate_loss().backward()``; ``step_updated``): they update once per step, so the state they keep per
        cost (a moving average, a learned baseline's regression) never sees this one (p-state). Warned here; where
        the cost has a baseline, the surrogate that reaches it refuses it (its baseline would read state trained on
        this step's samples: ``storch.estimators.step_state``, review r-24)."""
        names = {p.name for p in plates}
        late = sorted({f"{n.estimator.name!r} (plate {n.plate.name!r})" for n in self.nodes
                       if id(n.estimator) in self.step_updated and n.plate.name in names})
        if late:
            warnings.warn(
                f"cost {label!r} was added after a backward pass of this step's surrogate loss updated estimator "
                f"{', '.join(late)} (surrogate_loss().backward() runs each estimator's update once per step): its "
                "state (a moving average or learned baseline per cost) will not include this cost, in this step or "
                "any later one, and a later storch.backward() of the step updates nothing. Add every cost before "
                "the step's first backward pass (one surrogate_loss() of all of them, or storch.backward())",
                UserWarning, stacklevel=user_stacklevel())

    def _shape_message(self, label, cost: torch.Tensor, raw: torch.Tensor, plates: tuple) -> str:
        """A cost that is not one number per sample (error path only)."""
        hint = ((self._per_entry_hint(raw) or self._set_value_hint(raw) or self._permuted_hint(raw)) if not plates
                else _data_plate_hint(cost, plates))
        # a black-box cost of several nodes wrapped on one node's plates: after the common advice (a forgotten
        # .sum(-1) whose event size equals another plate's size matches too: review r-twenty)
        after = self._other_plates_hint(cost, plates) if plates else ""
        return (f"cost {label!r} has per-sample shape {tuple(cost.shape)}; a cost must be one number per sample. "
                + (hint + "Otherwise: reduce" if hint else "Reduce") + " its event dims first (e.g. `.sum(-1)`), or "
                "use storch.denote_independent for dims that are independent data points"
                + (". " + after.rstrip(" ").rstrip(".") if after else "") + self._cost_hints(plates))

    def _warn_constant(self, raw: torch.Tensor, plates: tuple, label) -> None:
        """Warn (:class:`storch.ConstantCostWarning`) of a cost that carries no sample plate (a plain tensor, or
        data plates only) and needs no gradient while gradients are enabled: a constant, which contributes nothing
        to any gradient. A warning, not a refusal: a term constant by construction is harmless and common (the
        entropy of a Normal of fixed scale, a placeholder regulariser, a frozen module's weight decay: a review
        found them refused); the case it is for, a reward computed per sample outside torch then reduced
        (``r.sum()``) or put on a data plate, silently lost its credit (z = 320 in a porting test).
        Not warned: under torch.no_grad() (evaluation), with credit=False, a cost that needs grad."""
        if any(not p.independent for p in plates) or is_differentiated(unbatched(raw)):
            return  # a sample plate (score-function credit), or differentiated (under vmap / forward mode too)
        what = "a plain tensor" if not plates else f"only the data plates {tuple(p.name for p in plates)}"
        warnings.warn(ConstantCostWarning(
            f"cost {label!r} carries no sample plate ({what}) and needs no gradient (requires_grad is False while "
            "gradients are enabled): to storch it is a constant, which contributes nothing to any gradient. "
            + (self._per_entry_hint(raw) or "If it is a reward computed per sample outside torch (from z.tensor, in "
            "numpy), wrap it back on the sample's plates, `storch.PlateTensor(r, z.plates)` (the plate dims first, "
            "as in z.tensor), and a score-function estimator credits it to the node (the black-box recipe in "
            "docs/plates.md); reducing it (r.sum()) or putting it on a data plate (storch.denote_independent) cuts "
            "it from the samples. ")
            + "A term that is constant by construction (the entropy of a Normal of fixed scale) can be left out, "
            "or added with credit=False where it is meant only for the reported value; "
            "warnings.filterwarnings('ignore', category=storch.ConstantCostWarning) silences this"),
            stacklevel=user_stacklevel())

    def _per_entry_hint(self, raw: torch.Tensor) -> str:
        """Where ``raw``'s leading dims have the sizes of the plates of a live node's sample (a reward computed
        per sample outside torch, from z.tensor): the advice to wrap it back on them (error path only)."""
        for node in self.nodes:
            value = node.value
            if type(value) is not PlateTensor or not value._plates:
                continue
            vp = value._plates
            if raw.dim() >= len(vp) and tuple(raw.shape[:len(vp)]) == tuple(p.size for p in vp):
                names = tuple(p.name for p in vp)
                return (f"Its leading dims {tuple(raw.shape[:len(vp)])} have the sizes of the plates {names} of the "
                        f"sample of node {node.plate.name!r}: if it holds one value per entry of that sample (a reward "
                        "computed per sample outside torch, from z.tensor), wrap it back on them, "
                        "`storch.PlateTensor(r, z.plates)` with z that sample (the black-box recipe in docs/plates.md;"
                        " reducing it with .sum() or putting it on a data plate with storch.denote_independent would "
                        "cut it from the samples and drop its credit). ")
        return ""

    def _permuted_hint(self, raw: torch.Tensor) -> str:
        """Where ``raw``'s leading dims have the sizes of the plates of a live node's sample in another order (raw
        values lined up in an order of the user's, with ``storch.aligned(..., plates=...)`` or a transpose): the
        advice to wrap it on the plates in that order (error path only). The generic advice, to reduce it or use
        storch.denote_independent, would cut it from the samples."""
        for node in self.nodes:
            value = node.value
            if type(value) is not PlateTensor or len(value._plates) < 2:
                continue
            vp = value._plates
            lead = tuple(raw.shape[:len(vp)])
            if raw.dim() >= len(vp) and sorted(lead) == sorted(p.size for p in vp):
                names = tuple(p.name for p in vp)
                return (f"Its leading dims {lead} have the sizes of the plates {names} of the sample of node "
                        f"{node.plate.name!r}, in another order: if it holds one value per entry of that sample "
                        "computed from raw values in an order of your own (storch.aligned(..., plates=...), a "
                        "transpose of .tensor), wrap it back on the plates in the order of its dims, "
                        "`storch.PlateTensor(r, plates)` (storch.aligned returns those plates with the raw values); "
                        "reducing it or putting it on a data plate with storch.denote_independent would cut it from "
                        "the samples and drop its credit. ")
        return ""

    def _set_value_hint(self, raw: torch.Tensor) -> str:
        """Where ``raw``'s dims have the sizes of the plates of a live node's sample other than its own sample plate
        (a value of the whole set of samples, reduced over that plate: ``log_w.tensor.logsumexp(i)``): the advice to
        put it back on those plates (error path only). storch.denote_independent, which the generic advice names,
        would refuse the data plate's name, or make a second data plate of the same data points."""
        for node in self.nodes:
            value = node.value
            if type(value) is not PlateTensor:
                continue
            rest = tuple(p for p in value._plates if p.name != node.plate.name)
            if rest and len(rest) < len(value._plates) and tuple(raw.shape) == tuple(p.size for p in rest):
                names = tuple(p.name for p in rest)
                return (f"Its dims {tuple(raw.shape)} have the sizes of the plates {names} that the sample of node "
                        f"{node.plate.name!r} carries besides its sample plate {node.plate.name!r}: if it is a value "
                        "of the whole set of samples, reduced over that plate's dim of .tensor (a multi-sample bound, "
                        "reweighted wake-sleep's wake losses), put it back on those plates, `storch.PlateTensor(r, "
                        f"plates)` with plates the Plate objects of {names} in that order (from the tensor you reduced:"
                        f" `tuple(p for p in log_w.plates if p.name != {node.plate.name!r})`; or read its raw values "
                        f"with the plate last, `(lw,), plates = storch.aligned(log_w, plates=(..., "
                        f"{node.plate.name!r}))`, reduce over dim -1 and pass plates[:-1]), and add it with "
                        "credit=False where its sampling is not to be differentiated (reweighted wake-sleep, minimum "
                        "risk training: docs/estimators/vimco.md, 'Reweighted wake-sleep'). A bound whose sampling is "
                        "to be differentiated (IWAE under a score-function estimator) is the cost of ONE sample that "
                        "holds its K draws (est(dist.expand((K, *dist.batch_shape)))), reduced over that dim, or the "
                        "'vimco' estimator (docs/plates.md). ")
        return ""

    def _other_plates_hint(self, cost: torch.Tensor, plates: tuple) -> str:
        """Where the leading per-sample dims of ``cost`` have the sizes of live sample plates that ``plates`` lack
        (a black-box cost of two nodes wrapped on one node's plates): the advice to wrap it on the plates of a
        tensor that holds all of them (error path only)."""
        names = {p.name for p in plates}
        others = [node.plate for node in self.nodes if node.plate.name not in names]
        matched: list = []
        for size in tuple(cost.shape):
            plate = next((q for q in others if q.size == size and q not in matched), None)
            if plate is None:
                break
            matched.append(plate)
        if not matched:
            return ""
        return (f"Its leading dims {tuple(q.size for q in matched)} also have the sizes of the sample plates "
                f"{tuple(q.name for q in matched)}, which its plates {tuple(q.name for q in plates)} lack: if it is "
                "a black box computed outside torch from the .tensor of several nodes' samples "
                "(torch.stack([x, y], -1).tensor), wrap it on the plates of a tensor that holds all of them, `storch.PlateTensor(c, s.plates)` with s "
                "that tensor (e.g. s = torch.stack([x, y])), whose plates are in the order of its .tensor's dims (the "
                "black-box recipe for several nodes in docs/plates.md). ")

    def _cost_hints(self, plates: tuple) -> str:
        """The ``cost_hint`` of the estimators whose nodes a cost depends on (error path only)."""
        hints = []
        for p in plates:
            owner = self.plates.get(p.name)
            hint = getattr(getattr(owner, "estimator", None), "cost_hint", "")
            if hint and hint not in hints:
                hints.append(hint)
        return "".join(f". {h}" for h in hints)


def _data_plate_hint(cost: torch.Tensor, plates: tuple) -> str:
    """Where a cost's per-sample dims start with the size of one of its data plates: a plain tensor of one value per
    data point (a weight ``w * c``) broadcast against the plate, which ``.sum(-1)`` would weight by ``w.sum()``
    (p-semi). Error path only."""
    data = [p for p in plates if p.independent and cost.dim() and p.size == cost.shape[0]]
    if not data:
        return ""
    name = data[0].name
    return (f"Its per-sample dims start with {cost.shape[0]}, the size of its data plate {name!r}: if it multiplies "
            f"a plain tensor of one value per data point (a weight w in w * c), every data point's cost became a "
            f"vector over all of them, and .sum(-1) would weight each point by w.sum(); put that tensor on the data "
            f"plate with the data (storch.denote_independent((x, w), 0, {name!r})). ")


def _set_value_message(label, plate, node: Node, plates: tuple) -> str:
    """The refusal of a credited cost that holds one value for all the entries of a node's sample plate (error path
    only)."""
    return (
        f"cost {label!r} holds one value for all {plate.size} entries of the sample plate {plate.name!r} of node "
        f"{node.plate.name!r} (estimator {node.estimator.name!r}): its raw tensor has size 1, or is expanded (stride "
        f"0), along that plate's dim {plates.index(plate)}. It was computed from the whole set of samples (reduced "
        "over the plate, e.g. `log_w.tensor.logsumexp(i, keepdim=True)`, and broadcast back) or from none of them. "
        "Each entry of a sample plate is credited with its own entry's cost, so a value of the whole set gets a "
        "biased gradient (the score term of a multi-sample bound, or none at all under a leave-one-out baseline). "
        "For a multi-sample bound whose sampling is to be differentiated (IWAE), hold the K draws in ONE sample, "
        "est(dist.expand((K, *dist.batch_shape))), and reduce over that dim, or use the 'vimco' estimator "
        "(docs/plates.md, Pitfalls, '.tensor'). For a loss of the set whose sampling is not differentiated "
        "(reweighted wake-sleep's wake losses, minimum risk training), read the raw values with the plate last, "
        f"`(lw,), plates = storch.aligned(log_w, plates=(..., {plate.name!r}))`, reduce over that dim without "
        "keepdim, put the result on the plates left, `storch.PlateTensor(lw.logsumexp(-1), plates[:-1])`, and "
        "add it with credit=False (docs/estimators/vimco.md, 'Reweighted wake-sleep'). A value that does not depend "
        f"on the samples needs no plate {plate.name!r}: add it without that plate")


def _in_backward_message(label) -> str:
    return (
        f"storch.add_cost was called during a backward pass (cost {label!r}). "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) runs the checkpointed function again during "
        "backward to recompute what it saved, so a cost added there is added once more by every backward pass that "
        "goes through it (a gradient penalty with torch.autograd.grad(..., retain_graph=True) before "
        "storch.backward() counts it twice). Return the cost from the checkpointed function and add it outside "
        "(`cost = checkpoint(f, z, use_reentrant=False); storch.add_cost(cost, name=...)`); the same holds for "
        "storch.add_cost called from a tensor hook or a custom Function's backward")
