"""The base class of the estimators that train their control variate by minimising the variance of the
gradient estimate (LAX, RELAX, REBAR; Grathwohl et al. 2018), and their per-node record."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch

import storch.distributed
from storch import Estimator, Node, OptionError, StorchError
from storch.extending import (all_finite, check_state_record, estimator_create_graph, estimator_own_pass,
                               hide_frozen_grads, load_own_optimizer, optimizer_step, options, own_optimizer,
                               own_optimizer_state, skip_nonfinite_update, state_record)

from ._network import ControlVariateNet

__all__ = ["RelaxedState", "VarianceGradient", "VarianceTrained"]


@dataclass
class RelaxedState:
    """Per-node record of LAX, RELAX and REBAR (filled by ``proposal``, then ``gradient_function``).

    Attributes:
        params: the distribution's parameter tensors: ĝ = ∂loss/∂params is the gradient estimate
            whose variance ``update_parameters`` minimises.
        z: the reparameterised continuous sample, shape ``(n, *parents, *own[, K])``.
        z_tilde: z̃ ~ p(z | b), reparameterised (RELAX, REBAR).
        b: the discrete sample H(z) as the distribution samples it (RELAX, REBAR).
        l: log p(b) of the real block.
        relaxed: the relaxed inputs σ_λ(z) and σ_λ(z̃) handed to user code (REBAR, RELAX with the
            relaxed-cost term): at order >= 2 the cost must be smooth on its paths from them.
    """

    params: list = field(default_factory=list)
    z: Optional[torch.Tensor] = None
    z_tilde: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    l: Optional[torch.Tensor] = None
    relaxed: tuple = ()


class VarianceGradient(NamedTuple):
    """What :meth:`VarianceTrained.loss_graph_values` hands to :meth:`VarianceTrained.update_from`.

    Attributes:
        grads: ∂/∂φ Σ ĝ², detached, one tensor per parameter of ``_trainable()``.
        finite: whether Σ ĝ² and every tensor of ``grads`` is finite (a boolean tensor, read once by
            ``update_from``: no host sync while a compiled step's call returns).
    """

    grads: tuple
    finite: torch.Tensor


class VarianceTrained(Estimator):
    """Base of estimators whose own parameters φ are trained to minimise the gradient variance.

    ``storch.backward()`` backpropagates the loss and then runs :meth:`update_parameters`: it
    computes the gradient estimate ĝ of the loss with respect to the parameters of the node's
    distribution (``create_graph=True``), and since E[ĝ] does not depend on φ (the estimator is
    unbiased), the variance is minimised by descending ∂/∂φ Σ ĝ² (Grathwohl et al. 2018,
    section 3.3): one Adam step, applied there (never in a component).
    """

    has_update = True
    # storch.compile(step, backend=None) replays the update: update_inputs (the distribution parameters,
    # with their graph) are outputs of the program, loss_graph_values runs after each call, update_from
    # on .backward()
    replays_update = True
    State = RelaxedState

    fixed_options = {
        "network": "the control variate's network is built (or taken) at construction, and trained as state of "
                   "this estimator: the new one starts it afresh",
        "hidden": "the control variate's network is built with this width at construction",
        "update": "whether storch.backward() trains the control variate is decided at construction (has_update); a "
                  "new estimator starts its state afresh (load this one's state_dict() into it to keep it)",
    }

    def check_option(self, name: str, value: Any) -> Any:
        if name == "lr":
            options.number(self.name, "lr", value, above=0)
            return float(value)
        return super().check_option(name, value)

    def _init_training(self, lr: float, update: bool) -> None:
        lr = self.check_option("lr", lr)
        options.flag(self.name, "update", update)
        self.lr = lr
        self.update = update
        # the update differentiates the surrogate again: surrogate_loss().backward() refuses it
        self.update_uses_loss_graph = update
        self.has_update = update  # update=False: no update at all (storch.backward() frees the graph)
        self.update_steps = 0
        self.skipped_updates = 0  # steps left out because Σ ĝ² or its gradient was not finite (update_from)
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._loaded: Optional[dict] = None
        # (plate name, cost name) whose control variate passed the order-1 check for jumps -> the kinks that
        # check found per walked output ({"cost" / "network": operation names}, empty if none): their outputs
        # are hooked at every order-1 step (_network.smoothness_due, refuse_twice_on_kinks)
        self._smooth_at_order_1: dict = {}
        # state_dict: the optimizer is rebuilt after the (possibly lazily built) network has loaded
        self.register_load_state_dict_post_hook(VarianceTrained._restore_training)
        # a state saved by another estimator is refused before torch copies η and λ (set_extra_state runs after)
        self.register_load_state_dict_pre_hook(VarianceTrained._check_saved_by)

    def _init_network(self, network: Optional[Callable], hidden: int, zero_output: bool = False) -> None:
        """The learned control variate c_φ: the user's network or a default MLP (LAX, RELAX)."""
        hidden = options.integer(self.name, "hidden", hidden, minimum=1)  # a NumPy integer as a Python int
        if network is not None and not callable(network):
            raise OptionError(f"{self.name}: network must be a torch.nn.Module (or callable), got {network!r}")
        self.network = network if network is not None else ControlVariateNet(hidden, zero_output)
        if isinstance(self.network, ControlVariateNet):
            object.__setattr__(self.network, "_owner", self)  # not a submodule: no cycle in .modules()

    def requires_grad_(self, requires_grad: bool = True) -> "VarianceTrained":
        """torch's, and kept for the default network's layers if they are not built yet (built at the first node:
        ``est.requires_grad_(False)`` before it left them trainable, and ``storch.backward()`` trained them)."""
        super().requires_grad_(requires_grad)
        network = getattr(self, "network", None)  # rebar has none
        if isinstance(network, ControlVariateNet):
            network.requires_grad_(requires_grad)
        return self

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        if self.update:  # (update=False: has_update is False too, and storch does not call this)
            self.update_from(self.loss_graph_values(loss, self.update_inputs(nodes)))

    # -- the update, in the three steps storch.compile(step, backend=None) replays (replays_update) ---

    def update_inputs(self, nodes: list[Node]) -> list[torch.Tensor]:
        """The distribution parameters of this step's nodes, with their graph: ĝ = ∂loss/∂(these); only of
        the nodes that a credited cost reaches (``node.frames``: the surrogate builds a frame for each cost
        that credits the node, none for one added with ``credit=False``). A step whose costs read a node only
        with ``credit=False`` (a discrete GAN's discriminator step) trains nothing there: its ĝ does not depend
        on φ (∂φ Σ ĝ² = 0), and an Adam step on that zero would still move φ along its old moments and count
        a step (docs/partitions.md: such a loss stays out of estimator state, as the moving average's).
        Decided from the graph, not from the gradient's value: no host sync, and the same in a compiled step."""
        return [t for node in nodes if node.frames for t in node.state.params]

    def loss_graph_values(self, loss: torch.Tensor, targets: list[torch.Tensor]) -> tuple:
        """∂/∂φ Σ ĝ² (detached, one tensor per parameter of ``_trainable()``) and whether it and Σ ĝ² are
        finite (a :class:`VarianceGradient`), or ``()`` when there is nothing to train. ĝ = ∂loss/∂targets is kept differentiable in φ (``create_graph``); both
        gradients retain the loss's graph (the step's backward, and other estimators, still need it)."""
        params = self._trainable()
        if not params or not targets:
            return ()
        # storch's own create_graph pass: an order-1 node (ARM) elsewhere in the loss does not refuse it
        # (own(): the pass is this block's also where a CUDA backward runs the hooks in the engine's threads)
        with estimator_create_graph() as own:
            grads = torch.autograd.grad(own(loss), targets, retain_graph=True, create_graph=True, allow_unused=True)
        var = sum((g ** 2).sum() for g in grads if g is not None)
        if not isinstance(var, torch.Tensor) or not var.requires_grad:
            return ()
        with estimator_own_pass() as own:  # (∂/∂φ Σ ĝ², not the loss's gradient: a user's register_hook is not run)
            dphi = torch.autograd.grad(own(var), params, retain_graph=True, allow_unused=True)
        dphi = tuple(torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, dphi))
        return VarianceGradient(dphi, all_finite([var.detach(), *dphi]))

    def update_from(self, step: tuple) -> None:
        """One Adam step of φ along ``step.grads`` (:meth:`loss_graph_values` of an eager step, or of a
        replayed call of a compiled one); the only place where φ changes. None (φ and Adam's moments
        unchanged, ``skipped_updates`` counts it, a RuntimeWarning says it) when Σ ĝ² or its gradient is
        not finite although the surrogate is: ĝ² of a large cost overflows (float32 from |ĝ| ~ 1e19,
        float16 from 256), and one step with it would write NaN into φ for good, after which every
        step's surrogate is NaN and storch.backward() blames the (finite) costs. Under torch.distributed a step
        with nothing to train (``()``) still joins the ranks' update, with zeros."""
        synced = storch.distributed.is_active(self)
        if not step and not synced:  # nothing to train in this step (no credited cost, or every parameter frozen)
            return
        params = self._trainable()
        if step:
            dphi, finite = step
        else:
            # torch.distributed: this rank trains nothing in this step (every parameter frozen, or no cost credits
            # its nodes: credit=False) but still takes part in the ranks' update, with zeros, as data points of the
            # global batch that no credited cost reaches (∂φ Σ ĝ² = 0 there); it returned here, and the ranks that
            # train waited in their collective forever. The ranks' check compares which parameters are frozen
            dphi, finite = tuple(torch.zeros_like(p) for p in params), None
        if len(params) != len(dphi) or any(p.shape != g.shape for p, g in zip(params, dphi)):
            raise StorchError(
                f"{self.name}: {len(dphi)} gradients for {len(params)} trainable parameters (they changed between "
                "the step and its update); call .clear() on a compiled step after changing the estimator")
        # torch.distributed: φ (η, λ, the network) as rank 0's at the first update. Ranks built with another
        # temperature= or eta= (or a network= from another seed) trained apart for good (REBAR at 0.5 and 0.3: log λ
        # -0.683 and -1.194 after one step). Broadcast rather than refuse, as DDP does: refusing different values
        # would refuse ranks that seed their network= differently, which DDP accepts, and comparing the options
        # would refuse ranks that loaded one checkpoint (trained values, not the constructor's). The first step's
        # surrogate used each rank's own η and λ: unbiased all the same (the control variate has mean zero for any φ)
        storch.distributed.broadcast_once_(self.parameters(), self)
        # torch.distributed: the variance of the rank-averaged gradient, whose ĝ per data point is
        # ĝ_rank / W: ∂φ Σ_r |ĝ_r / W|² = W⁻¹ · mean_r ∂φ|ĝ_r|², the same step on every rank (_across_ranks),
        # and the same decision to skip it (one rank's non-finite Σ ĝ² skips it everywhere), or to take none where
        # no rank trained anything (as in one process)
        dphi, finite, trained = _across_ranks(list(dphi), finite, self, trained=bool(step))
        if not trained:
            return
        # one host sync per update (update_from runs after the step)
        if skip_nonfinite_update(self, finite, "the control variate", "variance",
                                 f"Its parameters: {', '.join(n for n, p in self.named_parameters() if p.requires_grad)}. "
                                 "Check the costs' magnitude (Σ ĝ² of the distribution parameters' gradient must not "
                                 "overflow their dtype: scale the costs down, or use float32 where this ran in "
                                 "float16) and the distribution's parameters for non-finite values"):
            return
        # Adam over every parameter of the estimator, frozen ones too (not stepped: hide_frozen_grads), so that
        # freezing η or the whole model changes neither the optimizer nor its saved state (a checkpoint loads
        # whatever is frozen when it is saved or loaded)
        self._optimizer = own_optimizer(self._optimizer, self, self.lr)
        # .grad of a user network='s parameters as the backward pass left it, restored after the step: a layer
        # it shares with the model keeps the model's gradient for the user's optimizer (docs/estimators/relax.md).
        # Parameters storch made (η, λ, the default network) are the estimator's alone: their .grad (the
        # surrogate's zero-mean derivative in φ) is cleared as before, so that an optimizer over a model that
        # holds the estimator as a submodule does not step them on it
        net = getattr(self, "network", None)
        user = ({id(p) for p in net.parameters()} if isinstance(net, torch.nn.Module)
                and not isinstance(net, ControlVariateNet) else ())
        kept = [p.grad if id(p) in user else None for p in params]
        for p, g in zip(params, dphi):
            p.grad = g
        unhide = hide_frozen_grads(self._optimizer, params)  # frozen parameters: no .grad, not stepped
        # Adam's moments follow φ after est.to(...) / .double(); in float32 for a φ in float16 / bfloat16
        # (model.half()), whose step is rounded back, or rolled back (and counted) where it overflows
        taken = optimizer_step(self, self._optimizer, "the control variate")
        unhide()
        for p, g in zip(params, kept):
            p.grad = g
        if taken:
            self.update_steps += 1

    # -- state_dict: optimizer state and the step count are estimator state ------------------------

    def state_options(self) -> dict:
        """The options that give the saved state (φ's Adam moments, the step count) its meaning, besides which
        estimator saved it (storch.extending.state_record): none here; RELAX's control variate form."""
        return {}

    def evolution_options(self) -> dict:
        """The options that change how φ evolves: Adam's lr, and update. Not in a checkpoint's record (a resumed
        run may train on with another lr); storch.distributed checks them with state_options before each
        collective: ranks with another lr would step φ apart from the first update on, silently, and a rank with
        update=False would leave the others waiting in the update's collective. With update=False φ never changes
        here, so lr is left out: ranks that all skip the update agree whatever their lr."""
        return {"lr": self.lr, "update": True} if self.update else {"update": False}

    def get_extra_state(self) -> dict:
        # the optimizer's state with its parameters' names: loaded by name (load_own_optimizer); and which
        # estimator saved it (REBAR's η, λ and moments loaded into RELAX would train it: refused)
        return {**own_optimizer_state(self._optimizer, self),
                "update_steps": self.update_steps, "skipped_updates": self.skipped_updates,
                **state_record(self, **self.state_options())}

    def set_extra_state(self, state: dict) -> None:
        # saved by another estimator (or form): refused (a checkpoint without the record loads as it did); also
        # checked by the load pre-hook, before torch copies the parameters (η, λ)
        check_state_record(self, state, **self.state_options())
        # copied, as load_state_dict copies parameters; applied by _restore_training, once the
        # submodules (a lazily built network) are loaded
        self._loaded = state = copy.deepcopy(state)
        self.update_steps = state["update_steps"]
        self.skipped_updates = state.get("skipped_updates", 0)  # (not in a checkpoint from before it was counted)

    @staticmethod
    def _check_saved_by(module: "VarianceTrained", state_dict, prefix: str, *args) -> None:
        check_state_record(module, state_dict.get(prefix + "_extra_state"), **module.state_options())

    @staticmethod
    def _restore_training(module: "VarianceTrained", incompatible_keys) -> None:
        state, module._loaded = module._loaded, None
        if state is None:
            return
        # every parameter's moments matched by name, whatever is frozen now or was at saving
        module._optimizer = load_own_optimizer(state, module, module.lr, module.name)



def _across_ranks(grads: list[torch.Tensor], finite: Optional[torch.Tensor], owner,
                  trained: bool = True) -> tuple[list[torch.Tensor], torch.Tensor, bool]:
    """φ-gradients averaged over the ranks and divided by the world size W, whether Σ ĝ² and they are finite on
    every rank, and whether any rank trained (no-op in one process).

    The division is not the NVIL regression's (``storch_score``'s ``_across_ranks`` averages only): that
    loss is a mean over the data, so the ranks' mean is the global batch's. Here the loss is Σ ĝ² over
    the data points, and each rank's ĝ per point is W times the global batch's (the surrogate averages
    over a rank's shard, 1/W of the batch): Σ_global ĝ² = W⁻² Σ_r Σ_rank ĝ_r² = W⁻¹ mean_r Σ_rank ĝ_r².
    tests/reliability/test_ddp.py compares φ and Adam's moments with one process on the combined batch.

    ``trained`` False: this rank's step trained nothing (``grads`` zeros, ``finite`` None); it adds zeros to the mean,
    and where no rank trained, none steps. The ranks' check compares which parameters each has frozen
    (``requires_grad=False``, named in what is averaged): ranks that freeze different ones raise on every rank,
    naming each rank's (one that froze them all returned before the check, and the others waited in it).
    """
    if not storch.distributed.is_active(owner):  # (called with a step only: finite is given)
        return grads, all_finite(grads) if finite is None else finite, trained
    world = storch.distributed.world_size(owner)
    named = list(owner.named_parameters())
    which = storch.distributed.frozen_parameters(named)
    # (the flags' dtype and device: the estimator's first parameter's, the same on every rank whatever is frozen)
    ref = named[0][1] if named else torch.zeros(())
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    bad = torch.zeros((), dtype=dtype, device=ref.device) if finite is None else (~finite).to(dtype).reshape(())
    # > 0 after the mean where any rank trained / any rank's Σ ĝ² or gradient was not finite
    flags = torch.stack([torch.tensor(float(trained), dtype=dtype, device=ref.device), bad])
    *reduced, flags = storch.distributed.all_reduce_mean(
        grads + [flags], owner, what=f"the control variate's variance gradients (frozen, requires_grad=False: {which})")
    # (read on a rank that trained nothing only: one that trained knows the answer without a host sync)
    trained = trained or bool(flags[0] > 0)
    reduced = [g / world for g in reduced]
    return reduced, all_finite(reduced) & (flags[1] == 0), trained
