"""The score function (REINFORCE) with baselines."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional, Union

import torch
from torch.distributions import Bernoulli, Distribution

import storch.distributed
from storch import CostFrame, Estimator, Node, OptionError, Plate, PlateTensor
from storch.extending import (all_finite, assume, base_distribution, hide_frozen_grads, is_tracing, learned_dtype,
                               leave_one_out, load_own_optimizer, optimizer_step, options, own_optimizer,
                               own_optimizer_state, skip_nonfinite_update, state_record, check_state_record)

from ._option_reads import reads_option
from .learned_baseline import STATE_VALUE_CRITIC, LearnedBaseline, baseline_features, check_inputs, in_frame

__all__ = ["Score"]

_KINDS = {"none": "none", "moving_average": "moving_average", "leave_one_out": "leave_one_out",
          "batch_average": "leave_one_out", "learned": "learned", "greedy": "greedy"}


class Score(Estimator):
    """Score-function estimator (REINFORCE) with an optional baseline (appendix D.2.1, appendix C).

    Components:
        q(X | x<i) = n i.i.d. samples from p(x | x<i) (with ``baseline="greedy"`` one more,
            evaluation-only entry: the greedy value argmax p, so user code sees n + 1 entries);
        w(x) = 1/n on the n samples (0 on the greedy entry);
        l(x) = log p(x | x<i), summed over the node's own batch dims (0 on the greedy entry);
        a(x<i, X) = (1 - MagicBox(l(x))) ⊥b(x<i, X \\ {x}) (the any-order baseline of appendix C),
        b one of: none; the moving average of the cost over earlier steps; the leave-one-out mean
        (1/(n-1)) Σ_{x' ≠ x} f(x'); NVIL's c + b_ψ(h), a running mean plus a network on the node's
        inputs, learned by regression on the cost; the cost of the
        greedy value (self-critical); a user callable or module.

    On a partition (the estimator called at every step of an episode, docs/partitions.md), l is
    the log-probability of the sequence up to the step a cost was computed at (causal credit), so
    baselines are per time step: leave-one-out and moving averages of the cost-to-go.

    Requires: any distribution with ``sample`` and ``log_prob`` (and ``mode`` for ``"greedy"``).

    max_order: ∞ — the score function is unbiased at any order (D.2.1) and a detached baseline
    that does not depend on x is zero-mean at any order (appendix C): the moving average and the
    learned baseline use earlier steps only (they change in ``update_parameters``, after the step),
    and the greedy value is a function of x<i.

    Args:
        plate: name of the node's plate.
        n_samples: number of samples with replacement.
        baseline: ``"none"``, ``"moving_average"``, ``"leave_one_out"`` (alias ``"batch_average"``,
            needs ``n_samples >= 2``), ``"learned"`` (NVIL: :class:`storch_score.LearnedBaseline`, an
            MLP per cost on ``node.inputs``, given as ``est(distribution, inputs=h)``, or on the
            distribution's parameters without inputs, non-finite logits made finite; in a partition,
            inputs of a later step must not carry the partition's plate), ``"greedy"`` (self-critical: the cost of the
            mode), or a callable / ``torch.nn.Module`` ``baseline(node, cost) -> tensor`` that gets the
            :class:`storch.Node` and the :class:`storch.CostFrame` and returns b in the frame of
            ``cost`` (a tensor broadcastable to ``cost.tensor``, or a PlateTensor whose plates are
            among ``cost.plates``). It must not depend on the sample x it is used for (in a partition:
            on the sequence's samples of any step); a PlateTensor that carries the node's plate raises
            :class:`storch.OptionError`. Its result is detached. A module with trainable parameters is
            trained like ``"learned"``; a regression step whose loss or gradients are not finite is
            skipped (counted in ``skipped_updates``, with a RuntimeWarning). A subclass that overrides
            ``baseline`` replaces the option's baseline (``super().baseline(node, cost)`` reads it); one
            whose ``baseline`` (or ``control_variate``) never reads the option, given one other than
            ``"none"`` or ``"greedy"``, raises :class:`storch.OptionError` (the option would be ignored).
            Whether it reads it is read from its source, or its bytecode where it has none
            (``reads_baseline_option = True`` on the class declares a read storch does not follow).
        decay: the moving average's decay in [0, 1): b <- decay·b + (1 - decay)·mean cost (also
            NVIL's running mean c).
        lr: Adam learning rate of a learned baseline's regression on the cost.
        hidden: hidden width of ``"learned"``'s networks.
        update: whether ``storch.backward()`` updates the baseline (moving average, learned parts).
            The moving average's and ``"learned"``'s updates are replayed by ``storch.compile``
            (``replays_update``), so a step with them compiles (``"learned"`` after one eager step,
            which builds its networks); a trainable callable's is not.
        eos: for a partition (the estimator called at every step of a sequence): the index (in the
            support) of the end-of-sequence value; a finished sequence draws it again with
            log-probability 0 at later steps (variable length). ``None``: fixed length.

    Example:
        >>> est = storch.estimator("score", plate="z", n_samples=8, baseline="leave_one_out")
        >>> z = est(torch.distributions.Bernoulli(logits=theta))
        >>> nvil = storch.estimator("score", plate="z", baseline="learned")
        >>> z = nvil(q, inputs=x)   # b_ψ(x), trained by storch.backward()

    References:
        [1] Simple statistical gradient-following algorithms for connectionist reinforcement
            learning (Williams, 1992)
        [2] Neural Variational Inference and Learning in Belief Networks (Mnih & Gregor, 2014)
        [3] Self-critical Sequence Training for Image Captioning (Rennie et al., 2017)
        [4] Buy 4 REINFORCE samples, get a baseline for free! (Kool et al., 2019)
        [5] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
    """

    name = "score"
    aliases = ("reinforce",)
    score_function = True  # l = log p (its override only zeroes the greedy entry)
    supports_partitions = True
    #: for a subclass with its own ``baseline`` or ``control_variate``: whether it reads the baseline option.
    #: ``None``: read from its source at construction; ``True`` / ``False`` declares it.
    reads_baseline_option: Optional[bool] = None

    def __init__(self, plate: str, n_samples: int = 1,
                 baseline: Union[str, Callable[[Node, CostFrame], torch.Tensor]] = "none",
                 decay: float = 0.9, lr: float = 1e-2, hidden: int = 128, update: bool = True,
                 eos: Optional[int] = None) -> None:
        super().__init__(plate, n_samples)
        self.eos = self.check_option("eos", eos)
        self.baseline_fn: Optional[Callable] = None
        if callable(baseline) and not isinstance(baseline, str):
            kind, self.baseline_fn = "callable", baseline
        elif isinstance(baseline, str) and baseline in _KINDS:
            kind = _KINDS[baseline]
        else:
            raise OptionError(
                f"score: baseline={baseline!r} is not accepted; use 'none', 'moving_average', 'leave_one_out' "
                "(alias 'batch_average'), 'learned', 'greedy', or a callable / nn.Module baseline(node, cost)")
        dropped = _ignores_option(type(self)) if kind not in ("none", "greedy") else None
        if dropped is not None:
            # the subclass's baseline() (or control_variate()) replaces Score.baseline, the only reader of the
            # option's value: the option would be silently ignored (greedy is not: its evaluation-only entry is
            # still added)
            raise OptionError(_ignored_message(type(self), self.name, dropped, baseline))
        if kind == "leave_one_out" and n_samples < 2:
            raise OptionError(
                f"score: baseline={baseline!r} needs n_samples >= 2 (it averages the other samples' costs), "
                f"got n_samples={n_samples}")
        decay, lr = self.check_option("decay", decay), self.check_option("lr", lr)
        options.flag("score", "update", update)
        if kind == "learned":
            kind, self.baseline_fn = "callable", LearnedBaseline(hidden)
            object.__setattr__(self.baseline_fn, "_owner", self)  # not a submodule: no cycle in .modules()
        self._baseline: _Baseline = _BASELINES[kind]
        self.decay, self.lr, self.update = decay, lr, update
        self.moving_averages: dict[str, torch.Tensor] = {}  # cost key -> average of earlier steps
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self.update_steps = 0
        self.skipped_updates = 0  # regression steps left out because their loss or gradients were not finite
        self._warned_shared = False  # the warning that the baseline module's parameters get other gradients too
        self.register_load_state_dict_post_hook(Score._restore_optimizer)
        # state that storch.backward() updates: the moving average, a learned baseline's parameters
        self.has_update = update and self._baseline.trains(self)
        # a baseline= module with every parameter frozen at construction: never trained (has_update False); one
        # unfrozen afterwards would stay untrained silently, so its step raises (_call_baseline)
        self._frozen_at_construction = update and not self.has_update and self._baseline.has_state(self)
        # storch.compile replays the moving average's update (from the step's mean costs, returned by
        # the compiled program) and NVIL's regression (from b_ψ's detached inputs and the costs); a
        # user's trainable callable it cannot (its inputs are whatever it reads)
        self.replays_update = self.has_update and (
            self._baseline is _BASELINES["moving_average"] or isinstance(self.baseline_fn, LearnedBaseline))

    fixed_options = {
        "baseline": "the baseline is set up at construction (a moving average or a learned baseline is state of "
                    "this estimator, which the new one starts afresh: its moving averages and network are not "
                    "carried over, and its state_dict() is refused by an estimator with another baseline)",
        "hidden": "the learned baseline's networks are built with this width at construction",
        "update": "whether storch.backward() updates the baseline is decided at construction (has_update); a new "
                  "estimator with the same baseline starts its state afresh (load this one's state_dict() into it "
                  "to keep it)",
    }

    def check_option(self, name: str, value: Any) -> Any:
        if name == "decay":
            options.number("score", "decay", value, at_least=0.0, below=1.0)
            return float(value)
        if name == "lr":
            options.number("score", "lr", value, above=0)
            return float(value)
        if name == "eos":
            return options.optional_index("score", "eos", value, "None or the index of the end value in the support")
        value = super().check_option(name, value)
        if name == "n_samples" and self.__dict__.get("_baseline") is _BASELINES["leave_one_out"] and value < 2:
            raise OptionError(f"score: baseline='leave_one_out' needs n_samples >= 2 (it averages the other samples' "
                              f"costs), got n_samples={value}")
        return value

    @property
    def baseline_kind(self) -> str:
        """Which baseline: ``"none"``, ``"moving_average"``, ``"leave_one_out"``, ``"greedy"`` or ``"callable"``."""
        return self._baseline.kind

    # -- the components ------------------------------------------------------------------------

    @property
    def uniform_weights(self) -> bool:
        return not self._baseline.greedy

    def proposal(self, node: Node) -> torch.Tensor:
        x = super().proposal(node)
        if not self._baseline.greedy:
            return x
        # the greedy value as one more, evaluation-only entry (Rennie et al. 2017)
        greedy = _mode(node.distribution, f"{self.name} (plate {self.plate!r})")
        return torch.cat([x, greedy.unsqueeze(0).to(x.dtype)], 0)

    def weighting_function(self, node: Node) -> torch.Tensor:
        w = super().weighting_function(node)
        if not self._baseline.greedy:
            return w
        n = self.n_samples
        return torch.cat([w.new_full((n,), 1.0 / n), w.new_zeros((1,))])  # w = 0: evaluation only

    def gradient_function(self, node: Node) -> torch.Tensor:
        l = super().gradient_function(node)
        if not self._baseline.greedy:
            return l
        return torch.cat([l[:-1], torch.zeros_like(l[-1:])])  # the greedy entry is not a sample of p

    def extend(self, node: Node, distribution: Distribution, plates: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._baseline.greedy:
            return super().extend(node, distribution, plates)
        # a later step of a partition: the greedy entry continues with the greedy value (greedy
        # decoding); its log-probability is 0, as at the first step (it is not a sample of p)
        sample = self.draw(distribution, ())
        is_greedy = torch.arange(sample.shape[0], device=sample.device) == self.n_samples
        sample = torch.where(is_greedy.reshape((-1,) + (1,) * (sample.dim() - 1)),
                             _mode(distribution, f"{self.name} (plate {self.plate!r})").to(sample.dtype), sample)
        lp = self.step_gradient_function(node, distribution, sample, plates)
        lp = torch.where(is_greedy.reshape((-1,) + (1,) * (lp.dim() - 1)), torch.zeros_like(lp), lp)
        if self.eos is not None:
            sample, lp = self.mask_after_eos(node, distribution, sample, lp, plates)
        return sample, lp

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        return self._baseline.value(self, node, cost)

    def has_control_variate(self) -> bool:
        # without a baseline there is no control variate: no cost frame per cost, no extra nodes; a subclass's own
        # baseline (or control variate) counts with the default baseline="none" too (it was silently ignored)
        return self.baseline_kind != "none" or _own_control_variate(type(self))

    def control_variate_stacks(self) -> bool:
        if _own_control_variate(type(self)):  # (a subclass's baseline, whatever the option: the base class's answer;
            return Estimator.control_variate_stacks(self)  # leave-one-out's stacking gave it the stacked frame)
        return self._baseline.stacks

    def check_inputs(self, inputs: Any, plates: tuple[Plate, ...], step: int) -> None:
        super().check_inputs(inputs, plates, step)
        if isinstance(self.baseline_fn, LearnedBaseline):  # b_ψ conditions on them: checked at every step
            check_inputs(inputs, self.plate, step)

    _frozen_at_construction = False

    def _call_baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        if self._frozen_at_construction and any(p.requires_grad for p in self.baseline_fn.parameters()):
            raise OptionError(
                f"score (plate {self.plate!r}): the baseline module {type(self.baseline_fn).__name__} had every "
                "parameter frozen (requires_grad=False) when the estimator was built, so storch.backward() never "
                "trains it (has_update is decided at construction), and it now has parameters with "
                "requires_grad=True: they would stay untrained. Build the estimator after unfreezing the module (load "
                "this one's state_dict() into it to keep its state), or keep it frozen; to train it with your own "
                "optimizer, build the estimator with update=False and add the regression as a cost with credit=False")
        if node.distribution is not node.first_distribution:
            node = _before_sequence(node)
        b = self.baseline_fn(node, cost)
        if b is None:
            return None
        if type(b) is PlateTensor:
            own = next((p for p in b.plates if p.name == node.plate.name), None)
            if own is not None:
                # (1 - MagicBox(l)) b is zero in expectation only for a b that does not depend on x
                # (appendix C); in a partition, l = L_t holds x_0..x_t, so no step's sample may enter b
                step = f" at step {own.step}" if node.steps or node.step_log is not None or own.step else ""
                raise OptionError(
                    f"score: the baseline of cost {cost.name!r} depends on the samples of plate {own.name!r}"
                    f"{step} (the PlateTensor it returned carries that plate). A baseline must not depend on the "
                    "sample it is a baseline for, nor, in a partition, on the sequence's samples of any step: the "
                    "control variate (1 - MagicBox(L_t)) b is then biased (for b = the cost, the gradient is 0). "
                    "Use baseline='leave_one_out' (the other samples' costs), 'moving_average', or a function of "
                    "values computed before the node (before the sequence's first step)"
                    + (f". {STATE_VALUE_CRITIC}" if step else ""))
            if b.dim() != 0:
                raise OptionError(
                    f"score: the baseline callable returned a PlateTensor with per-sample shape "
                    f"{tuple(b.shape)}; a baseline is one number per sample, like the cost")
            return cost.align(b.tensor, b.plates)
        b = torch.as_tensor(b, dtype=cost.tensor.dtype, device=cost.tensor.device)
        # a raw tensor is taken as laid out like cost.tensor (plates cost.plates); one that does not broadcast to
        # it got torch's plain broadcasting error from deep in the surrogate, one that widens it a wrong shape
        try:
            fits = torch.broadcast_shapes(b.shape, cost.tensor.shape) == cost.tensor.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise OptionError(
                f"score: the baseline callable returned a tensor of shape {tuple(b.shape)} for cost {cost.name!r}, "
                f"which does not broadcast to the cost's shape {tuple(cost.tensor.shape)} (plates "
                f"{[p.name for p in cost.plates]}). Lay it out as the cost: return cost.align(t, plates) for a "
                "tensor t whose leading dims are `plates` (the node's parents for a function of "
                "node.distribution's parameters: cost.align(t, node.parents)), or return a PlateTensor")
        return b

    # -- the state: changed here only ----------------------------------------------------------

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        """Add this step's mean costs to the moving average, or regress a learned baseline on them
        (the moving average and NVIL: :meth:`update_from`, the code a compiled step replays)."""
        if self.replays_update:
            # update_from(update_inputs(nodes)), as a compiled step replays it, without the per-cost
            # finiteness check: storch runs the updates only after the loss was found finite
            # (storch.backward() and surrogate_loss().backward() raise NonFiniteCostError first), and a
            # finite surrogate has finite mean costs (each cost's mean is a term of its value)
            inputs = self.update_inputs(nodes)
            inputs["finite"] = _KNOWN_FINITE
            self.update_from(inputs)
        else:
            self._baseline.update(self, [(node, frame) for node in nodes for frame in node.frames.values()])

    def _regress(self, frames: list) -> None:
        # a trainable callable baseline: one Adam step on Σ (b - f)², f the detached cost estimates
        errors = []
        for node, frame in frames:
            # b as the surrogate called it: with the partition as of the cost's step (frame.node,
            # node.at(t)), not the last step's node, so b(step t) is fitted to step t's costs
            b = self._call_baseline(frame.node or node, frame)
            if b is not None and b.requires_grad:
                b, f = torch.broadcast_tensors(b, frame.tensor)
                errors.append(((b - f) ** 2).mean())
        self._adam(errors)

    def requires_grad_(self, requires_grad: bool = True) -> "Score":
        """torch's, and kept for the heads of ``baseline="learned"`` not built yet (each is built at its cost's first
        node: ``est.requires_grad_(False)`` before it left the head trainable, and ``storch.backward()`` trained it)."""
        super().requires_grad_(requires_grad)
        if isinstance(self.baseline_fn, LearnedBaseline):
            self.baseline_fn.requires_grad_(requires_grad)
        return self

    def _adam(self, errors: list) -> None:
        """One Adam step of the baseline's parameters on the sum of ``errors``; none (parameters and
        optimizer state unchanged, ``skipped_updates`` counts it, a RuntimeWarning says it) when the
        loss or a gradient is not finite: as a non-finite mean cost never enters the moving average."""
        named = list(self.baseline_fn.named_parameters())
        params = [p for _, p in named if p.requires_grad]
        synced = storch.distributed.is_active(self)
        # under torch.distributed every rank takes part, one whose baseline is frozen (no trainable parameter) too:
        # it joins the ranks' check, which raises on every rank where another rank trains it (it returned here and
        # the others waited in the check forever)
        if not named or not synced and not (params and errors):
            return
        loss = sum(errors) if errors and params else None
        grads = torch.autograd.grad(loss, params, allow_unused=True) if loss is not None else (None,) * len(params)
        finite = all_finite([None if loss is None else loss.detach(), *grads])
        if synced:
            # ψ as rank 0's at the first synchronised update: a baseline= module of yours (ranks that initialised it
            # from their own seeds, outside DDP, trained apart for good: 0.10 and 1.10 after two steps from 0 and 1),
            # and NVIL's heads, which are broadcast when built only while synchronised (a head built while
            # storch.distributed.synchronize was off, or before the process group existed, stayed each rank's own);
            # a head built later, while it was off, at the next update (broadcast_once_ keys on the parameters)
            # by name (as the collectives below): NVIL's heads are in the order each rank first met their costs
            storch.distributed.broadcast_once_((p for _, p in _by_name(self.baseline_fn.named_parameters())), self)
            # torch.distributed: the gradient of the global batch's regression loss, the mean over the
            # ranks that regressed each parameter (as DDP averages model gradients), so ψ and Adam's moments stay
            # identical everywhere; the ranks' check compares which parameters are frozen (named in what is averaged)
            grads, finite = _across_ranks(named, grads, finite, self, storch.distributed.frozen_parameters(named))
        # one host sync per update (update_from runs after the step)
        if skip_nonfinite_update(self, finite, "the baseline", "regression",
                                 "Check the costs and the baseline's inputs (est(distribution, inputs=h)) for "
                                 "non-finite values"):
            return
        if all(g is None for g in grads):  # no rank regressed anything: nothing to step
            return
        # Adam over every parameter of the baseline, frozen ones too (not stepped: hide_frozen_grads), so that
        # freezing it or the whole model changes neither the optimizer nor its saved state (a checkpoint loads
        # whatever is frozen when it is saved or loaded); a head for a new cost keeps the others' moments
        self._optimizer = own_optimizer(self._optimizer, self.baseline_fn, self.lr)
        # .grad as the backward pass left it (None where it gave none): restored after the step, so the
        # user's optimizer sees the surrogate's gradient on a parameter the baseline shares with the
        # model (an A2C trunk) or that a cost of the user's (a credit=False regression) reached
        kept = [p.grad for p in params]
        if not getattr(self, "_warned_shared", False) and any(g is not None for g in kept):
            self._warned_shared = True
            warnings.warn(
                f"score (plate {self.plate!r}): parameters of the baseline module {type(self.baseline_fn).__name__} "
                "also got a gradient in this backward pass (shared with the model, e.g. a trunk under the policy "
                "and the critic, or reached by a cost of yours such as a credit=False regression). storch's own "
                f"Adam (lr={self.lr}) steps them on the baseline's regression, and your optimizer steps them on "
                "their .grad (left as the backward pass made it): two optimizers on one parameter. To train them "
                "with your optimizer only, create the estimator with update=False and add the regression as a "
                "cost with credit=False (docs/estimators/score.md)", RuntimeWarning, stacklevel=2)
        for p, g in zip(params, grads):
            p.grad = g
        unhide = hide_frozen_grads(self._optimizer, params)  # frozen parameters: no .grad, not stepped
        # Adam's moments follow ψ after est.to(...) / .double(); in float32 for a ψ in float16 / bfloat16
        # (model.half()), whose step is rounded back, or rolled back (and counted) where it overflows
        taken = optimizer_step(self, self._optimizer, "the baseline")
        unhide()
        for p, g in zip(params, kept):
            p.grad = g
        if taken:
            self.update_steps += 1

    # -- state_dict: moving averages and a learned baseline's optimizer are estimator state ---------

    def state_options(self) -> dict:
        """The options that give the saved state its meaning (storch.extending.state_record): the baseline's kind
        (the moving averages and the optimizer are its state; another kind ignores or misreads them). Not the
        decay (a saved average is an average of the costs whatever decay made it: a resumed run may average on
        with another, e.g. when fine-tuning), lr, hidden (a learned head of another width is refused by torch's
        shape check), n_samples, update."""
        return {"baseline": "learned" if isinstance(self.baseline_fn, LearnedBaseline) else self.baseline_kind}

    def evolution_options(self) -> dict:
        """The options that change how the state evolves, for the baselines that have state: a running mean's
        decay (the moving average, NVIL's c), a trained baseline's lr, and update. Not in a checkpoint's record
        (a resumed run may go on with others, see state_options); storch.distributed checks them with it before
        each collective: ranks that differ in them would hold different baselines from the first update on,
        silently, and a rank with update=False would leave the others waiting in the update's collective."""
        if not self._baseline.has_state(self):
            # (a baseline without state: no collective. A baseline= module has state whatever is frozen: frozen after
            # construction it still runs its update, whose check compares what is frozen; with update=False, frozen
            # on one rank, its {} left the other rank alone in the check of a skipped update, until the timeout)
            return {}
        if not self.update:
            return {"update": False}  # (a state that never changes: decay and lr do not act on it)
        if not self.has_update:
            # a baseline= module with every parameter frozen (requires_grad=False) at construction: never trained
            # (has_update is decided there), as with update=False, so it joins the ranks' check where it skips the
            # update (storch.distributed), once: where another rank trains its module, every rank raises, saying
            # this (it joined no check, and the others waited in their update's collective forever); a rank built
            # with update=False agrees (the check of a skipped update compares update=False and the state options)
            return {"frozen": "every parameter, at construction (never trained)", "update": False}
        learned = isinstance(self.baseline_fn, LearnedBaseline)
        running = {"decay": self.decay} if learned or self.baseline_kind == "moving_average" else {}
        return {**running, **({"lr": self.lr} if self.baseline_kind == "callable" else {}), "update": True}

    def get_extra_state(self) -> dict:
        return {"moving_averages": dict(self.moving_averages), "update_steps": self.update_steps,
                "skipped_updates": self.skipped_updates,
                # the optimizer's state with its parameters' names: loaded by name (load_own_optimizer)
                **own_optimizer_state(self._optimizer, self.baseline_fn),
                # which estimator saved it, with which baseline (refused by set_extra_state where they differ)
                **state_record(self, **self.state_options())}

    def set_extra_state(self, state: dict) -> None:
        # saved by another estimator or baseline: refused before anything changes (a checkpoint without the
        # record, from before it was written, loads as it did)
        check_state_record(self, state, **self.state_options())
        # copies, as load_state_dict copies parameters; the optimizer once the baseline's heads loaded
        state = copy.deepcopy(state)
        # in float32 at least (a checkpoint of an average kept in bfloat16 / float16 follows the costs again)
        self.moving_averages = {k: v.to(learned_dtype(v)) if isinstance(v, torch.Tensor) else v
                                for k, v in state["moving_averages"].items()}
        self.update_steps = state.get("update_steps", 0)
        self.skipped_updates = state.get("skipped_updates", 0)
        self._loaded_optimizer = state if state.get("optimizer") is not None else None

    @staticmethod
    def _restore_optimizer(module: "Score", incompatible_keys) -> None:
        saved, module._loaded_optimizer = getattr(module, "_loaded_optimizer", None), None
        module._optimizer = None
        if saved is not None and isinstance(module.baseline_fn, torch.nn.Module):
            # every parameter's moments matched by name, whatever is frozen now or was at saving
            module._optimizer = load_own_optimizer(saved, module.baseline_fn, module.lr, module.name)

    # -- the moving average's and NVIL's update, replayed by storch.compile (replays_update) --------

    def update_inputs(self, nodes: list[Node]) -> dict:
        """What the update needs from this step (detached): ``"means"``, the mean cost per cost key
        (what the moving average adds); for NVIL also ``"regression"``, per node and cost, the cost's
        state name and key, b_ψ's input h viewed in the cost's frame, and the cost estimates f."""
        frames = [(node, frame) for node in nodes for frame in node.frames.values()]
        means = _means(frame for _, frame in frames)
        inputs: dict = {"means": means}
        if is_tracing():  # each mean's finiteness, computed with it: a compiled step's program returns it
            inputs["finite"] = {key: torch.isfinite(m) for key, m in means.items()}
        if isinstance(self.baseline_fn, LearnedBaseline):
            # h of the partition as of the frame's step (frame.node, node.at(t)): its inputs and plates
            # (the head of the cost's state name: costs of one name at different layers get one each)
            inputs["regression"] = [(frame.state_name, frame.key, in_frame(frame, *baseline_features(frame.node or node)),
                                     frame.tensor) for node, frame in frames]
        return inputs

    def update_from(self, inputs: dict) -> None:
        """The update from :meth:`update_inputs`' tensors (of an eager step or a compiled one's replay).

        NVIL first: one Adam step of ψ on Σ (b_ψ(h) - (f - c))² (Mnih & Gregor 2014, Eq. 11; c the
        running mean of earlier steps: NVIL's centring). Then the running means (the moving average's
        b, NVIL's c): the first sets it, later ones c <- decay·c + (1 - decay)·mean; a non-finite mean
        is skipped."""
        if "regression" not in inputs:
            self._update_averages(inputs["means"], inputs.get("finite"))
            return
        errors = []
        for name, key, h, f in inputs["regression"]:
            # regressed in the running state's precision (at least float32): f - c of a bfloat16 cost near
            # 100 would be rounded to half a unit
            f = f.to(learned_dtype(f))
            b = self.baseline_fn.predict(name, h).squeeze(-1).to(dtype=f.dtype, device=f.device)
            if b.requires_grad:
                c = self.moving_averages.get(key)
                b, f = torch.broadcast_tensors(b, f if c is None else f - c)
                errors.append(((b - f) ** 2).mean())
        self._update_averages(inputs["means"], inputs.get("finite"))
        self._adam(errors)

    def _update_averages(self, means: dict[str, torch.Tensor], finite=None) -> None:
        """Add each cost key's mean to its running mean. ``finite``: per key, whether the mean is finite
        (a compiled step's program returns it), ``None`` (checked here), or ``_KNOWN_FINITE`` (an eager
        update after a finite loss: no check and no select)."""
        # the global batch's mean, on every rank; partial: ranks whose episodes have different lengths hold
        # different step keys (r@t); each is averaged over the ranks that have it, and every rank stores it
        reduced = storch.distributed.all_reduce_mean(means, owner=self, partial=True, what="moving averages")
        # averaged over ranks: the global mean's finiteness, not this rank's (known or given), is checked
        known = finite is _KNOWN_FINITE and reduced is means
        if reduced is not means or finite is _KNOWN_FINITE:
            finite = None
        for key, value in reduced.items():
            ok = None
            if not known:
                ok = finite.get(key) if finite is not None else None
                if ok is None:
                    ok = torch.isfinite(value)
            old = self.moving_averages.get(key)
            if old is None:
                # the first value sets the average: checked on the host (once per key), a non-finite
                # cost never enters the average (storch.backward() raised for it)
                if known or value.device.type == "meta" or bool(ok):
                    self.moving_averages[key] = value
                continue
            # later ones without a host sync, kept only where the mean is finite (else the average
            # stays as it was); decay·old + (1 - decay)·value as one lerp (one op where three were)
            if old.dtype == value.dtype and old.device == value.device:
                new = torch.lerp(old, value, 1.0 - self.decay)
            else:  # e.g. an average loaded from a checkpoint of another dtype or device: torch's promotion
                new = self.decay * old + (1.0 - self.decay) * value
            self.moving_averages[key] = new if known else torch.where(ok, new, old)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The moving averages by cost key (the state the baseline reads: b, or NVIL's c; ψ are
        parameters, which a compiled step reads live)."""
        return self.moving_averages

    def extra_repr(self) -> str:
        # a name quoted as the option is given; a learned baseline is a child module (printed once, below the
        # options, by torch), a callable by its repr
        b = ("'learned'" if isinstance(self.baseline_fn, LearnedBaseline) else repr(self.baseline_kind)
             if self.baseline_fn is None or isinstance(self.baseline_fn, torch.nn.Module) else repr(self.baseline_fn))
        return f"{super().extra_repr()}, baseline={b}" + (
            f", decay={self.decay}" if self._baseline is _BASELINES["moving_average"] else "")


# -- the baselines b(x<i, X \\ {x}): small stateless objects; their state lives on the estimator ------


class _Baseline:
    """No baseline (b = None): the plain score function. The base of the baselines below.

    Attributes:
        kind: the name ``Score.baseline_kind`` reports.
        greedy: the proposal adds the evaluation-only greedy entry (self-critical).
        stacks: ``control_variate_stacks``: b reads only the costs along the node's plate.
    """

    kind = "none"
    greedy = False
    stacks = True

    def value(self, est: Score, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        """b in the frame of ``cost`` (detached by the caller), or ``None``."""
        return None

    def trains(self, est: Score) -> bool:
        """Whether ``storch.backward()`` changes this baseline's state (``has_update``)."""
        return False

    def has_state(self, est: Score) -> bool:
        """Whether this baseline has state that an update would change, whatever its parameters' requires_grad
        (a rank's choice): what :meth:`Score.evolution_options` declares options for."""
        return self.trains(est)

    def update(self, est: Score, frames: list) -> None:
        """Learn from this step's cost frames (``update_parameters``; the only place state changes)."""


class _LeaveOneOut(_Baseline):
    kind = "leave_one_out"

    def value(self, est, node, cost):
        # b_j = 1/(n-1) Σ_{j' ≠ j} f(x_j') (paper, section 3.2.5); cost.tensor is detached
        return leave_one_out(cost, node.plate.size)  # (node.n without its property call)


class _MovingAverage(_Baseline):
    kind = "moving_average"
    stacks = False  # one average per cost (state) name and step

    def value(self, est, node, cost):
        # the average of EARLIER steps only: update_parameters adds this step's costs after the
        # step, so b never depends on the current samples (appendix D.2.1, condition on b); a
        # cost at step t of a partition has its own average (a per-time-step baseline)
        return _in_cost_dtype(est.moving_averages.get(cost.key), cost)

    def trains(self, est):
        return True

    def update(self, est, frames):
        est._update_averages(_means(frame for _, frame in frames))


class _Greedy(_Baseline):
    kind = "greedy"
    greedy = True
    stacks = False

    def value(self, est, node, cost):
        # b = f(greedy value), the cost at the evaluation-only last entry (Rennie et al. 2017)
        t = cost.tensor
        return t.narrow(cost.dim, est.n_samples, 1) if t.shape[cost.dim] > 1 else t


class _Callable(_Baseline):
    """A user callable or module (``baseline_fn``), or NVIL's :class:`LearnedBaseline`."""

    kind = "callable"
    stacks = False  # it may read anything

    def value(self, est, node, cost):
        b = est._call_baseline(node, cost)
        if isinstance(est.baseline_fn, LearnedBaseline):
            # NVIL centres the cost with a running mean c and learns b_ψ(h) on the rest:
            # b = c + b_ψ(h) (Mnih & Gregor 2014, §3.3); both from earlier steps only
            c = _in_cost_dtype(est.moving_averages.get(cost.key), cost)
            b = b if c is None else b + c
        return b

    def trains(self, est):
        fn = est.baseline_fn
        return isinstance(fn, LearnedBaseline) or (
            isinstance(fn, torch.nn.Module) and any(p.requires_grad for p in fn.parameters()))

    def has_state(self, est):
        fn = est.baseline_fn
        return isinstance(fn, LearnedBaseline) or (
            isinstance(fn, torch.nn.Module) and next(iter(fn.parameters()), None) is not None)

    def update(self, est, frames):
        est._regress(frames)



def _by_name(named: Any) -> list:
    return sorted(named, key=lambda item: item[0])


def _across_ranks(named: list, grads: tuple, finite: torch.Tensor, owner: Score,
                  frozen: str) -> tuple[list, torch.Tensor]:
    """The baseline's regression gradients averaged over the ranks, and whether they are finite on every rank.

    A parameter's gradient is the mean over the ranks where it got one: a rank where it got none (``None``: a head
    its costs did not use, or a step whose costs all have ``credit=False``) has no data point in that head's
    regression, whose loss over the global batch is a mean over the credited data points (of equal shards: the
    mean of the ranks' means over the ranks that have some), so it is left out of the mean (the flags that say
    which ranks used it travel in the same collective; a baseline module that routes by cost, as NVIL's heads do,
    is read right; one whose graph leaves a parameter out for some data but not others is not what "used" tells
    apart). A parameter no rank used keeps ``None`` (Adam leaves it alone, as in one process). One rank's
    non-finite loss or gradient skips the update on every rank (the same decision everywhere). ``frozen``: which of
    the baseline's parameters have requires_grad False (:func:`storch.distributed.frozen_parameters`), part of what
    the ranks' check compares: ranks that freeze different ones (or all of them) raise on every rank, naming each
    rank's. ``named``: the baseline's ``named_parameters()``, ``grads`` those of its trained ones, in that order.

    The gradients travel in the order of the parameters' names, and NVIL's heads are named in what the ranks' check
    compares: the heads are built in the order each rank first met their costs (ModuleDict order), so ranks that
    first met "win" and "lose" apart averaged one head's gradient with the other's, of one shape, silently; ranks that
    built heads for different costs raise on every rank, naming each rank's heads.
    """
    ref = named[0][1]  # the flags' dtype and device: the same on every rank, whatever is frozen
    trained = [(n, p) for n, p in named if p.requires_grad]
    order = sorted(range(len(trained)), key=lambda i: trained[i][0])
    flags = torch.tensor([float(grads[i] is not None) for i in order] + [float(not bool(finite.all()))],
                         dtype=ref.dtype if ref.is_floating_point() else torch.get_default_dtype(), device=ref.device)
    values = [torch.zeros_like(trained[i][1]) if grads[i] is None else grads[i] for i in order] + [flags]
    heads = owner.baseline_fn.heads if isinstance(owner.baseline_fn, LearnedBaseline) else None
    built = "" if heads is None else f"; heads: {', '.join(sorted(heads)) or 'none'}"
    reduced = storch.distributed.all_reduce_mean(
        values, owner=owner,
        what=f"score's learned baseline gradients (frozen, requires_grad=False: {frozen}{built})")
    used, bad = reduced[-1][:-1], reduced[-1][-1]
    # the mean over the ranks that regressed the parameter (a fraction u of them): the global batch's loss is a mean
    # over its credited data points, of which a rank whose costs did not reach the head (credit=False, another cost
    # name) has none; its zeros halved the head's step on two ranks (u = 1 where every rank used it: g / 1.0 is g)
    averaged = [g / u if u > 0 else None for g, u in zip(reduced[:-1], used.tolist())]
    grads = [None] * len(order)
    for k, i in enumerate(order):  # back in the parameters' order
        grads[i] = averaged[k]
    finite = torch.stack([bad == 0] + [torch.isfinite(g).all() for g in grads if g is not None])
    return grads, finite


def _means(frames) -> dict[str, torch.Tensor]:
    """The mean cost per cost key, in the running averages' dtype: the cost's, but at least float32
    (``learned_dtype``). In a bfloat16 (autocast) or float16 (``model.half()``) cost's own dtype, one step
    (1 - decay)·(mean - average) of an average near 100 is below half a unit and rounds away: the
    average stopped following the costs (gradient variance ~20x, without a warning)."""
    out = {}
    for frame in frames:
        t = frame.tensor
        dtype = learned_dtype(t)
        out[frame.key] = t.mean() if dtype == t.dtype else t.mean(dtype=dtype)  # (a float32 cost: the plain mean)
    return out


def _in_cost_dtype(average: Optional[torch.Tensor], cost: CostFrame) -> Optional[torch.Tensor]:
    """A running average (float32 at least) as the surrogate's term for ``cost`` takes it: in its dtype."""
    if average is None:
        return None
    dtype = cost.tensor.dtype
    return average if average.dtype == dtype else average.to(dtype)  # (a float32 cost, every step: no call)


_KNOWN_FINITE = object()  # Score.update_parameters: the loss was checked finite, so is every mean cost

_BASELINES: dict[str, _Baseline] = {
    b.kind: b for b in (_Baseline(), _LeaveOneOut(), _MovingAverage(), _Greedy(), _Callable())}


def _mode(d, who: str) -> torch.Tensor:
    """The most probable value of ``d`` (argmax p; the greedy sample of a self-critical baseline)."""
    base = base_distribution(d)
    if isinstance(base, Bernoulli):  # torch's Bernoulli.mode is NaN at p = 1/2; take 0 there
        return (base.logits > 0).to(base.logits.dtype)
    try:
        mode = d.mode.detach()  # ⊥: the greedy value is a sample, not differentiated
    except NotImplementedError:
        raise OptionError(_no_mode_message(d, who, "is not implemented (torch raises NotImplementedError)")) from None
    message = _no_mode_message(d, who, "is NaN: its most probable value is not unique at these parameters (as for "
                                       "a Uniform), or torch does not compute it")
    if mode.is_floating_point():
        if is_tracing():  # storch.compile: checked at every replayed call, not read in Python
            assume(~torch.isnan(mode).any(), message)
        elif torch.isnan(mode).any():
            raise OptionError(message)
    return mode


def _no_mode_message(d: Distribution, who: str, why: str) -> str:
    """Why baseline='greedy' cannot run on ``d``, naming it (and the distribution an ``Independent`` wraps) and what
    to do instead: another baseline, or a subclass of the distribution that defines ``mode``."""
    base = base_distribution(d)
    name = type(d).__name__ if base is d else f"{type(d).__name__}({type(base).__name__})"
    return (f"{who}: baseline='greedy' needs the distribution's most probable value (its mode), but {name}.mode "
            f"{why}. Use another baseline ('leave_one_out' with n_samples >= 2, 'moving_average', 'learned' or a "
            f"callable baseline(node, cost)), or give the distribution a mode: a subclass of {type(base).__name__} "
            "whose `mode` property returns its most probable value")


def _before_sequence(view: Node) -> Node:
    """``node.at(t)`` (t >= 1) with the first step's distribution, as a baseline callable gets it: b_t
    multiplies (1 - MagicBox(L_t)), so it must not depend on x_0..x_t, and step t's distribution depends on
    x_<t (the plate of step t-1 leads it); the first step's depends on nothing the sequence sampled."""
    node = Node.__new__(Node)
    node.__dict__.update(view.__dict__)
    node.distribution, node.distribution_plates = view.first_distribution, view.first_parents
    node.original = view.step_draws[0].original  # (the user's distribution of step 0)
    return node


def _ignores_option(cls: type) -> Optional[str]:
    """For a subclass of :class:`Score` whose own ``baseline`` / ``control_variate`` never reads the baseline option
    (``_option_reads``; ``reads_baseline_option`` overrides the reading): the method that drops it, else ``None``.
    Read from the code at construction, so that the error comes there and not at the first surrogate."""
    if not _own_control_variate(cls):
        return None
    declared = cls.reads_baseline_option
    if declared is None:
        declared, _ = reads_option(cls, Score)
    if declared:
        return None
    return "control_variate" if cls.control_variate is not Score.control_variate else "baseline"


def _ignored_message(cls: type, name: str, method: str, baseline: Any) -> str:
    how = ("calls no super().baseline(node, cost) and reads neither self.baseline_kind, self.moving_averages nor "
           "self.baseline_fn" if method == "baseline" else
           "calls neither super().control_variate(node, cost) nor a baseline() that reads it")
    if cls.reads_baseline_option is None:
        _, unreadable = reads_option(cls, Score)
        if unreadable:
            how += f"; the source of {', '.join(unreadable)} could not be read, its bytecode was read instead"
    return (f"{cls.__qualname__} ({name!r}) defines its own {method}(node, cost), which does not read the "
            f"baseline option (it {how}), so baseline={baseline!r} would be ignored. Create it with "
            f"baseline='none' (the default: your {method}() is the baseline), or combine the option's baseline in "
            "yours: b = super().baseline(node, cost) (None where the option gives none, e.g. a moving average's "
            "first step). If it does read the option in a way storch does not follow, declare it on the class: "
            "reads_baseline_option = True")


def _own_control_variate(cls: type) -> bool:
    """Whether a subclass of :class:`Score` overrides ``baseline`` or ``control_variate``."""
    return cls.baseline is not Score.baseline or cls.control_variate is not Score.control_variate
