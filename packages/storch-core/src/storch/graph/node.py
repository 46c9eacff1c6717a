"""The stochastic node: the record of one estimator call (one partition of the paper, section 3.2).

A :class:`Node` is what an estimator's components receive; the graph (``storch.graph``) keeps
the nodes of one step. This module sits below the estimators: it names the estimator type in
annotations only.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch.distributions import Distribution

from ..distributions import raw_log_prob
from ..errors import StorchError, OutsideSupportError
from ..plates.tensor import Plate, PlateTensor, align

if TYPE_CHECKING:
    from .cost_frame import CostFrame
    from ..estimators.base import Estimator

__all__ = ["Node", "StepDraw", "draw_of"]


class StepDraw(NamedTuple):
    """One step's draw of a partition, an entry of ``Node.step_draws`` (what :meth:`Node.at` gives the view of
    the step). One layout for every step, with named fields: step 0's record is made from the node's own
    attributes (``node.distribution`` the raw distribution, ``node.original`` the user's), a later step's from
    the step's locals (``raw`` the raw one, ``distribution`` the user's); as a positional tuple the two sites
    read as two layouts (review f-steps16: they were one), the names say which field is which."""

    sample: torch.Tensor  # the raw sample (plate dim first), ``node.sample`` of the step
    distribution: Distribution  # the raw distribution it was drawn from (``Node.distribution``)
    original: Optional[Distribution]  # the distribution the user built (``Node.original``; None: made by hand)
    value: Optional[PlateTensor]  # the value handed to user code
    finished: Optional[torch.Tensor]  # ``Node.finished`` after the step (eos), None without eos


class Node:
    """One stochastic node (one partition of the paper, section 3.2) in a graph.

    A partition's node is the record of the whole sequence as its last step left it: ``sample`` is the
    last step's, ``distribution`` the first step's. What an estimator's component gets for a cost at
    step t is :meth:`at` ``(t)``, a view whose per-step attributes are all step t's.

    Attributes:
        estimator: the estimator that sampled it.
        distribution: the raw distribution (``distribution_plates`` lead its batch shape). For a
            partition's node, its first step's; for ``at(t)``, step t's.
        first_distribution: the first step's raw distribution (``first_parents`` lead it), on the node
            and every view: what depends on nothing the sequence sampled (a baseline may read it).
        distribution_plates: the plates that lead ``distribution``'s batch shape: ``first_parents`` for
            the first step (and a partition's node); for ``at(t)`` with t >= 1, the partition's plate
            at step t-1 then step t's parents (a later step's distribution is drawn per prefix: under
            sampling with replacement entry i continues entry i; re-indexed by the lineage's parents
            where the estimator selects them, as ``storch.extending.align`` does).
        parents: plates of the distribution's parameters (data plates, upstream samples).
        first_parents: the parent plates of the first call, which lead ``first_distribution``'s batch
            shape (a partition's ``parents`` are those of its last step; they may grow, e.g. a data plate
            that joins at a later step).
        plate: the node's own sample plate (set once the proposal is drawn: ``None`` while ``proposal``
            runs, and typed as set, as every other component sees it; so is ``sample``).
        sample: raw samples, shape ``(plate, *parents, *batch, *event)`` (a partition's node: the last
            step's; ``at(t)``: step t's).
        gradient_values: l(x) evaluated on the samples (the result of the estimator's
            ``gradient_function``), shape broadcastable to ``(plate, *parents)``; for a partition the
            cumulative L_t (``at(t)``: of step t).
        weight_values: w(x) evaluated on the samples (the result of ``weighting_function``),
            shape broadcastable to ``(plate, *parents)`` (``at(t)``: computed for the view).
        value: the PlateTensor handed to user code (a partition's node: the first step's; ``at(t)``:
            step t's).
        original: the distribution the user built (plate tensors; ``None`` for a node made by hand):
            the first call's on a partition's node, step t's on ``at(t)``.
        state: the estimator's typed per-node record (an instance of its ``State`` dataclass,
            created empty before ``proposal``; ``None`` if the estimator declares none). Its
            components pass values to each other (noise, relaxed samples, ...) through its fields.
            One record for a whole partition, shared by its views: an estimator that needs values of
            each step keeps them per step in it (``sum_and_sample``'s sequences keep their tokens).
        inputs: extra inputs given at the call, ``est(distribution, inputs=h)`` (``None`` if none):
            what a learned baseline may condition on besides the distribution (NVIL's observation).
            For a partition: the inputs of the latest step (up to ``step``) that was given some.
        step_inputs: for a partition whose calls got ``inputs=``: the inputs of each step (``None``
            for a step without); ``None`` otherwise.
        frames: the :class:`storch.CostFrame` the surrogate built for this node, by cost key (filled
            by ``storch.surrogate_loss`` for estimators with a control variate; what
            ``update_parameters`` trains on). Shared by a partition's node and its views.
        step_draws: for a partition with more than one step, a :class:`StepDraw` ``(sample, distribution,
            original, value, finished)`` of each step (its raw sample, raw distribution, the user's distribution,
            the value handed to user code, ``finished`` after it); ``None`` otherwise. ``at(t)`` reads it.
        steps: the samples of the later steps of a partition (steps 1, 2, ...), in call order.
        handed: ``(raw value, its version)`` of every value handed to user code, all steps (shared by
            the views): in-place changes of them are refused.
        preimages: the raw pre-images that the distribution's transforms cached for the handed-out
            values and that require grad (``TanhTransform(cache_size=1)``'s pre-tanh sample u of a =
            tanh(u)), all steps: ``log_prob`` of a handed-out value is computed from them.
        index: topological position in the graph.
        step: the last step of a partition (0 for a node sampled once); ``plate`` is the plate at
            that step, ``parents`` its parents. ``at(t)``: t.
        history: for a partition, ``(plates_t, L_t)`` per step t: the plates of step t and the
            cumulative gradient function L_t = l_0 + ... + l_t (DiCE's cumulative MagicBox argument),
            with leading dims ``plates_t``; ``None`` for a node sampled once (and for a view).
        finished: for a partition with ``eos``: whether each sequence has ended (leading dims the
            partition's plates at its last step; ``at(t)``: after step t, at step t's plates); ``None``
            otherwise.
        no_grad_step: the first step sampled while gradients were disabled (``torch.no_grad()``,
            ``torch.inference_mode()``; the first such step of ``no_grad_cut`` if there is one),
            ``None`` if none: its gradient function (and a pathwise sample) was computed without
            grad, so its parameters get no gradient through it.
        no_grad_cut: whether that step's distribution held parameters that require grad (a gradient
            lost, which ``storch.surrogate_loss`` refuses for a node that a cost reaches).
        thresholded: for a node whose estimator is ``jump_free``: the name of the first function of
            ``storch.plates.dispatch.JUMPS`` (a comparison, argmax, a bool cast) applied to a value that
            carries the gradient of its handed-out sample, ``None`` if none; for a Categorical or
            OneHotCategorical node whose handed-out value carries gradient (any estimator): the first
            function of torch.distributions' code that reads that value as indices (``long``, ``max``'s
            indices: torch's (OneHot)Categorical.log_prob of it);
            ``storch.surrogate_loss(order >= 1)`` refuses the costs that carry its plate.
        thresholded_in: the qualified name of the torch.distributions function that applied
            ``thresholded`` (``"OneHotCategorical.log_prob"``), ``None`` for user code.
        compared: for a node whose estimator differentiates the cost through its handed-out sample
            (``requires_rsample`` or ``pathwise``: reparameterization, gumbel_softmax) and whose sample carries
            gradient: the name of the first function of ``storch.plates.dispatch.JUMPS`` (a comparison, argmax, a
            bool or integer cast) that user code applied to a value whose autograd graph reaches that sample (the mask of
            ``torch.where(x > 0, x, 0)``, ``x * (x > 0)``), ``None`` if none; read through
            ``storch.estimators.watch.compared`` (the watch records candidates, walked only when asked).
            ``storch.surrogate_loss(order >= 2)`` refuses the costs that carry its plate, and the order-1
            surrogate of such a cost differentiated twice.
        max_order: the highest derivative order the estimator's :meth:`~storch.Estimator.max_order_for`
            allows for this node's distribution (a partition: the lowest of its steps'); ``math.inf``
            when the estimator is not asked. ``storch.surrogate_loss(order)`` checks it and the
            estimator's own ``max_order``. Lowered too by a kink (to 1) or jump (to 0) inside the
            distribution's own rsample (``rsample_kinks``).
        integer_parameter: ``(record, parameter path, step)`` where a parameter of the node's distribution (at
            step ``step`` of a partition) was computed from an integer value read from a pathwise node's sample
            (``Normal(img[x.long()], 1)``: ``record`` is :mod:`storch.plates.integer_reads`' mark of it, ``path``
            names the parameter, ``"Normal.loc"``), ``None`` if none. ``storch.surrogate_loss(order >= 1)`` refuses
            the costs that reach the node, as it refuses a cost that carries the mark.
        rsample_kinks: for a node whose estimator ``requires_rsample``: ``(class name, {autograd node name: the
            order of its first discontinuous derivative}, {autograd node name: [the parts it was found in, such
            as "its transform ClampT"]})`` of the non-smooth operations (and the implicit reparameterisations of
            the gamma family, correct at order 1 only) that
            :func:`storch.distributions.rsample_kinks` found between the distribution's parameters and a
            sample it drew (a user's rsample or transform, ``AbsTransform``; of a partition, the first step's
            class with one); ``None`` if none (torch's smooth classes are not walked).
    """

    # Defaults of what most nodes never set (a partition's, eos, no-grad steps, views): class attributes, set on
    # the instance only when they change, so a node's __init__ stays within CPython's key-sharing instance dicts
    # (at most 30 keys: one more and every Node.__init__ builds a full dict, +1.3 us per estimator call)
    step_inputs: Optional[list] = None
    # a partition: a StepDraw (sample, distribution, original, value, finished) per step, made at its second step
    step_draws: Optional[list[StepDraw]] = None
    index = -1
    step = 0
    _history: Optional[list] = None  # (plates_t, L_t) of the steps computed so far
    # a partition: (plates_t, l_t) per step, the gradient function of each step alone; L_t is
    # computed from it when read (history, gradient_values), the surrogate stacks it instead
    step_log: Optional[list] = None
    # every step so far has the plates of step 0 (at their own step), the same size and the same
    # l_t shape, and no parent indices: L_t = l_0 + ... + l_t is a cumulative sum, no re-indexing
    steps_in_place = True
    finished: Optional[torch.Tensor] = None  # partitions with eos: sequences that have ended
    no_grad_step: Optional[int] = None  # set by the estimator's call (Estimator._no_grad)
    no_grad_cut = False
    branch_warned = False  # a partition step got an IndependentStepWarning (step_checks._warn_independent_step)
    thresholded: Optional[str] = None  # set by the node's Lineage.watch (watch._threshold_watch)
    thresholded_in: Optional[str] = None  # (the same watch)
    compared: Optional[str] = None  # set by storch.estimators.watch.compared (a pathwise node's comparisons)
    _compared_pending: Optional[list] = None  # (func, raw) recorded by its Lineage.watch, not walked yet
    max_order: float = math.inf  # lowered by Estimator.max_order_for (estimators.first_steps._sample_node)
    rsample_kinks: Optional[tuple] = None  # set by storch.estimators.checks.note_rsample (lowers max_order)
    # (record of storch.plates.integer_reads, parameter path, step): a parameter of its distribution was computed
    # from an integer value read from a pathwise sample (set by the estimator's call while a mark is live)
    integer_parameter: Optional[tuple] = None
    rsample_noted = False  # set by note_rsample: this step's rsample was noted (by a proposal: LAX's, of x not ⊥x)
    preimages: tuple = ()  # set by the estimator's call (first_steps._keep_preimages)
    _views: Optional[dict] = None
    # the step's baselines as read before its estimator's update, and whether that update ran (storch.estimators.
    # step_state): a surrogate built after the update reads the kept ones
    step_baselines: Optional[dict] = None
    updated_in_step = False
    _owner: Optional[weakref.ref] = None  # a view (at(t)): the partition's node it belongs to
    # a view at step t >= 1 with eos: (step t's distribution, entries finished before step t, led by
    # distribution_plates): there the step drew eos with probability 1 (Estimator.mask_after_eos)
    _eos_before: Optional[tuple] = None

    def __init__(self, estimator: "Estimator", distribution: Distribution, parents: tuple[Plate, ...],
                 original: Optional[Distribution] = None,
                 inputs: Any = None):
        self.estimator = estimator
        self.distribution = distribution
        self.first_distribution = distribution
        self.original = original
        self.parents = parents
        self.first_parents = parents
        self.distribution_plates = parents
        # declared as what a component reads: both are set once the proposal is drawn (before any
        # component but ``proposal`` runs); ``None`` until then, and on a node made by hand
        self.plate: Plate = None  # type: ignore[assignment]
        self.sample: torch.Tensor = None  # type: ignore[assignment]
        self._gradient_values: Any = None
        self._weight_values: Any = None
        self.value: Optional[PlateTensor] = None
        state_type = getattr(estimator, "State", None)
        self.state: Any = state_type() if state_type is not None else None
        self.inputs = inputs
        self.frames: dict[str, CostFrame] = {}
        self.handed: list = []  # (raw value handed to user code, its version then): in-place changes are refused

    @property
    def gradient_values(self) -> Any:
        """l(x) evaluated on the samples (the result of the estimator's ``gradient_function``); for
        a partition, the cumulative L_t of its last step (computed when first read)."""
        log = self.step_log
        if log is not None and len(self._history) < len(log):
            self._extend_history()
        return self._gradient_values

    @gradient_values.setter
    def gradient_values(self, value: Any) -> None:
        self._gradient_values = value

    @property
    def history(self) -> Optional["History"]:
        """For a partition, ``(plates_t, L_t)`` per step t (``None`` for a node sampled once): a
        sequence whose cumulative gradient functions are computed when an entry is first read
        (testing it against ``None`` computes nothing)."""
        return None if self.step_log is None else History(self)

    def _materialised(self) -> list:
        if len(self._history) < len(self.step_log):
            self._extend_history()
        return self._history

    def _extend_history(self) -> None:
        """L_t = L_{t-1} + l_t for the steps logged since the last read: one stack and cumulative
        sum when the steps stayed in place, else step by step (re-indexed by the parents)."""
        hist, log = self._history, self.step_log
        k = len(hist)
        if self.steps_in_place and len(log) - k > 1:
            first = [] if k == 0 else [hist[-1][1]]
            ls = [l for _, l in log[k:]]
            cumulative = torch.stack(first + ls).cumsum(0).unbind(0)[len(first):]
            hist.extend((plates, c) for (plates, _), c in zip(log[k:], cumulative))
        else:
            for plates, l in log[k:]:
                if not hist:
                    hist.append((plates, l))
                    continue
                prev_plates, prev = hist[-1]
                prev = _lead(prev, len(prev_plates))
                if plates[0].lineage is not None and plates[0].lineage.parents or prev_plates[1:] != plates[1:]:
                    prev = align(prev, prev_plates, plates)  # re-indexed by the parents, new parent plates
                hist.append((plates, prev + _lead(l, len(plates))))
        self._gradient_values = hist[-1][1]

    def at(self, step: int) -> "Node":
        """The partition as it was at ``step``: what a component sees for a cost at step t (causal
        credit, paper section 3.2). Its ``plate``, ``parents``, cumulative gradient function L_step,
        ``sample``, ``distribution`` (led by ``distribution_plates``), ``original``, ``value``,
        ``finished`` and ``inputs`` are step ``step``'s, its ``weight_values`` computed for it (the
        last step's: the node's own);
        ``state``, ``frames``, ``handed``, ``first_distribution`` and ``first_parents`` are the
        partition's. ``self`` for a node that is no partition (a single step). On a view, the view of
        ``step`` of the partition it belongs to (``node.at(2).at(0)`` is ``node.at(0)``)."""
        if self._owner is not None:
            owner = self._owner()
            if owner is None:
                raise StorchError("Node.at on a view of a partition whose node no longer exists (its graph ended)")
            return owner.at(step)
        if self.step_log is None:
            return self
        if self._views is None:
            self._views = {}
        view = self._views.get(step)
        if view is None:
            plates, cumulative = self._materialised()[step]
            view = Node.__new__(Node)
            view.__dict__.update(self.__dict__)
            view.plate, view.parents, view.gradient_values = plates[0], plates[1:], cumulative
            # the step's own draw (the node holds the last step's sample beside the first step's
            # distribution); a later step's distribution is drawn per prefix: led by the plate of step-1
            view.sample, view.distribution, view.original, view.value, view.finished = self.step_draws[step]
            view.distribution_plates = (self.step_log[step - 1][0][0],) + plates[1:] if step else self.first_parents
            finished = self.step_draws[step - 1].finished if step else None
            if finished is not None:
                # sequences that ended before step t drew eos with log-probability 0 (mask_after_eos):
                # view.log_prob agrees with l_t there (the step's draw is a point mass at eos)
                prev = self.step_log[step - 1][0]
                view._eos_before = (view.distribution, align(_lead(finished, len(prev)), prev, view.distribution_plates))
            # (a weak reference: the node keeps its views, a view does not keep the node alive)
            view._owner = weakref.ref(self)
            view.step_log = view._history = None
            # the weights: computed for the view, except the last step's, which are the node's own
            view.weight_values = self._weight_values if step == self.step else None
            view.step, view._views = step, None
            if self.step_inputs is not None:  # the inputs of the latest step up to `step` that got some
                view.inputs = next((x for x in reversed(self.step_inputs[:step + 1]) if x is not None), None)
            self._views[step] = view
        return view

    @property
    def steps(self) -> list:
        """The samples of the later steps of a partition (steps 1, 2, ...), in call order."""
        draws = self.step_draws
        return [] if draws is None else [d.sample for d in draws[1:]]

    @property
    def weight_values(self) -> Any:
        """w(x) evaluated on the samples (the result of the estimator's ``weighting_function``),
        shape broadcastable to ``(plate, *parents)``. With uniform weights (w = 1/N, the surrogate
        takes a mean) they are built only when read: no tensor per node that nothing uses."""
        w = self._weight_values
        if w is None and self.sample is not None and self.estimator.uniform_weights:
            w = self.estimator.weighting_function(self)
            if not isinstance(w, torch.Tensor):
                w = torch.as_tensor(w)
            n = len(self.parents) + 1
            if w.dim() < n:
                w = w.reshape(w.shape + (1,) * (n - w.dim()))
            self._weight_values = w
        return w

    @weight_values.setter
    def weight_values(self, w: Any) -> None:
        self._weight_values = w

    def widen_to_float64(self) -> None:
        """Give this node its l (and weights) in float64, for a float64 cost downstream (``storch.surrogate``):
        MagicBox(l) · C and (1 - MagicBox(l)) · ⊥b reached a float32 l as two gradients rounded to float32,
        which cancelled under a cost of 1e8 (found by a tester). Widened once, shared by every term. For a
        partition: each logged l_t (in place in ``step_log``, which the stacked surrogate's cumulative sum
        reads), the cumulative L_t recomputed from them when next read, the views made so far (:meth:`at`)
        given their step's widened L_t, and every weight (the node's and its views'). The same values and
        derivatives (a cast is linear). The node keeps the widened values: a ``cost_estimates()`` read after
        the surrogate of a node with weights is then float64 for a float32 cost too (review r-twenty)."""
        log = self.step_log
        if log is None:
            l = self._gradient_values
            if _narrow(l):
                self._gradient_values = l.to(torch.float64)
        else:
            changed = False
            for i, (plates, l) in enumerate(log):
                if _narrow(l):
                    log[i] = (plates, l.to(torch.float64))
                    changed = True
            if changed:
                self._history = [log[0]]  # (L_0 = l_0; the later L_t summed again from the widened log when read)
                self._gradient_values = log[0][1]
                if self._views:
                    hist = self._materialised()
                    for step, view in self._views.items():
                        view._gradient_values = hist[step][1]
        for node in (self, *(self._views or {}).values()):
            w = node._weight_values
            if _narrow(w):
                node._weight_values = w.to(torch.float64)

    def reads_its_samples(self) -> bool:
        """Whether the node's estimator reads the values it drew (a gradient function or weights that carry
        gradient, a control variate). A pathwise node (reparameterization, a relaxation without control
        variate) does not: its cost is differentiated through the samples only, so autograd follows an in-place
        change of a sample as of any tensor, and a cost of the whole set of samples (one value for every entry)
        gets its gradient through each of them."""
        est = self.estimator
        return bool(self.gradient_values.requires_grad or not est.uniform_weights or est.has_control_variate())

    @property
    def plates(self) -> tuple[Plate, ...]:
        """The node's plates: its own plate first, then its parents'."""
        return (self.plate,) + self.parents

    @property
    def n(self) -> int:
        """The size of the node's sample plate (the number of entries its estimator proposed)."""
        return self.plate.size

    @property
    def batch_ndims(self) -> int:
        """Number of the distribution's own batch dims (those sampled jointly by this node)."""
        return len(self.distribution.batch_shape) - len(self.distribution_plates)

    def log_prob(self, value: torch.Tensor, distribution: Optional[Distribution] = None) -> torch.Tensor:
        """Log-probability of raw ``value`` summed over the node's own batch dims.

        On a view ``at(t)`` (t >= 1) of a partition with ``eos``, of step t's distribution: a sequence
        that ended before step t draws eos there with probability 1 (``Estimator.mask_after_eos``), so
        its entries get 0 for eos and ``-inf`` for any other value: ``view.log_prob(view.sample)`` is
        l_t on every entry."""
        d = distribution or self.distribution
        try:
            lp = raw_log_prob(d, value)
        except ValueError as exc:  # (no cost on the ordinary path: the except runs only on an error)
            if "within the support" not in str(exc):  # torch's argument validation (_validate_sample)
                raise
            raise OutsideSupportError(_outside_support_message(self, d, sys._getframe(1).f_code.co_name, exc)) from exc
        k = len(self.distribution.batch_shape) - len(self.distribution_plates)  # self.batch_ndims
        lp = lp if k <= 0 else lp.sum(-1) if k == 1 else lp.sum(tuple(range(-k, 0)))
        before = self._eos_before
        if before is not None and d is before[0]:
            at_eos = self.estimator.is_eos(d, value, len(self.distribution_plates))
            lp = torch.where(before[1], torch.where(at_eos, lp.new_zeros(()), lp.new_full((), -math.inf)), lp)
        return lp

    def __repr__(self) -> str:
        name = self.plate.name if self.plate else "?"
        return f"Node({self.estimator.name!r}, plate={name!r}, parents={[p.name for p in self.parents]})"


def draw_of(nodes, x) -> Optional[tuple[Node, int]]:
    """The node of ``nodes`` that handed ``x`` out (an estimator call's value, by identity, as returned) and the step
    it did so at (0: ``node.value``; t >= 1: a partition's ``node.step_draws[t]``), or None."""
    for node in nodes:
        if node.value is x:
            return node, 0
        for t, draw in enumerate((node.step_draws or ())[1:], 1):
            if draw.value is x:
                return node, t
    return None


def _outside_support_message(node: Node, d: Distribution, caller: str, exc: ValueError) -> str:
    """Why ``node.log_prob`` was refused by torch's argument validation, and what to do: an estimator whose
    plate holds extra entries (a mean-field point x̄ = E_p[x], a relaxed sample) that the distribution
    never draws scored them too."""
    who = caller if caller.isidentifier() else "a component (gradient_function)"
    return (f"estimator {node.estimator.name!r}: node.log_prob, called in {who}, got values outside the support "
            f"of the node's {type(d).__name__}, which validates its arguments ({exc}). Entries of the plate other than the ordinary samples (evaluation-only entries "
            f"such as the mean x̄ = E_p[x] of a Bernoulli, a relaxed sample) may lie outside the support: compute "
            f"log p of the ordinary samples only (node.log_prob(node.sample[:n]), and 0 for the other entries, "
            f"whose weight is 0), or build the distribution with validate_args=False")


class History(Sequence):
    """``Node.history``: ``(plates_t, L_t)`` for each step t of a partition, the cumulative gradient
    functions computed when first read (:meth:`Node._extend_history`). Made per access: it refers
    to its node, which does not refer back (no reference cycle)."""

    __slots__ = ("_node",)

    def __init__(self, node: Node) -> None:
        self._node = node

    def __len__(self) -> int:
        return len(self._node.step_log)

    def __getitem__(self, i):
        return self._node._materialised()[i]

    def __iter__(self):
        return iter(self._node._materialised())

    def __repr__(self) -> str:
        return f"History({len(self)} steps)"


def _narrow(x: Any) -> bool:
    """Whether ``x`` is a floating tensor narrower than float64 (:meth:`Node.widen_to_float64`)."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype is not torch.float64


def _lead(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` with at least ``n`` dims (trailing size-1 dims added): the plate dims of a gradient function."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    return t.reshape(t.shape + (1,) * (n - t.dim())) if t.dim() < n else t
