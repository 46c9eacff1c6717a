"""Pieces shared by the relaxed family: noise, relaxations, conditional Gumbels, plate layout,
the default learned control variate and the variance-minimising update (RELAX, Grathwohl et al. 2018).

Several estimators here lay their node's plate out in blocks of ``n`` entries: the ``n`` real
samples first (weight 1/n), then evaluation-only entries (weight 0: ARM's antithetic samples,
REBAR's relaxed inputs, GO's neighbours) whose costs the control variate reads from the
:class:`storch.CostFrame`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch.distributions import Bernoulli, Distribution, Independent, OneHotCategorical

import storch.distributed
from storch.generators import drawing_with
from storch import CostFrame, Estimator, Node, OptionError, StorchError, magic_box

__all__ = [
    "base_of", "own_shape", "uniform", "logistic_noise", "gumbel_noise", "blocks_weights", "pad_blocks",
    "block", "check_temperature", "ControlVariateNet", "VarianceTrained", "conditional_logistic",
    "conditional_gumbel", "param_tensors", "flat", "evaluate_network", "discrete_with_relaxation",
    "tilde_term", "RelaxedState", "param_clones",
]

Temperature = Union[float, Callable[[int], float]]


def base_of(d: Distribution) -> Distribution:
    """The distribution under an ``Independent`` wrapper (the one holding logits/probs)."""
    return d.base_dist if isinstance(d, Independent) else d


def own_shape(node: Node) -> tuple[int, ...]:
    """The node's own batch shape (base batch dims after the parent plates)."""
    return tuple(base_of(node.distribution).batch_shape[len(node.parents):])


def param_tensors(d: Distribution) -> list[torch.Tensor]:
    """The tensors ``d`` was built from (its arg_constraints present as attributes) that need grad."""
    d = base_of(d)
    if isinstance(d, OneHotCategorical):
        d = d._categorical
    out = []
    for name in d.arg_constraints:
        v = d.__dict__.get(name)
        if isinstance(v, torch.Tensor) and v.requires_grad:
            out.append(v)
    return out


def uniform(shape, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise clamped away from 0 and 1 (so logits of it are finite)."""
    eps = torch.finfo(like.dtype).eps
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp_(eps, 1 - eps)


def logistic_noise(shape, like: torch.Tensor) -> torch.Tensor:
    u = uniform(shape, like)
    return torch.log(u) - torch.log1p(-u)


def gumbel_noise(shape, like: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(shape, like)))


def conditional_logistic(alpha: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z̃ ~ Logistic(α, 1) conditioned on 1[z̃ > 0] = b, reparameterised in α (Tucker et al. 2017, App. A).

    With p = σ(α): u' = 1 - p + v p if b = 1 else v (1 - p), v ~ U(0, 1); z̃ = α + logit(u').
    """
    p = torch.sigmoid(alpha)
    v = uniform(b.shape, alpha)
    u = torch.where(b > 0.5, 1 - p + v * p, v * (1 - p))
    eps = torch.finfo(alpha.dtype).eps
    u = u.clamp(eps, 1 - eps)
    return alpha + torch.log(u) - torch.log1p(-u)


def conditional_gumbel(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """z̃ = log p + g conditioned on argmax z̃ = ``index`` (Tucker et al. 2017, App. A; Gumbel-max).

    z̃_b = -log(-log v_b), z̃_k = -log(-log v_k / p_k - log v_b) for k != b, v ~ U(0, 1)^K,
    with normalised p (so that max_k (log p_k + g_k) ~ Gumbel(0)).
    """
    v = uniform(index.shape + logp.shape[-1:], logp)
    logp = logp.expand(v.shape)
    log_vb = torch.log(v.gather(-1, index.unsqueeze(-1)))  # log v_b, shape (..., 1)
    other = -torch.log(-torch.log(v) * torch.exp(-logp) - log_vb)
    top = -torch.log(-log_vb).expand_as(other)
    onehot = torch.nn.functional.one_hot(index, logp.shape[-1]).bool()
    return torch.where(onehot, top, other)


def discrete_with_relaxation(d: Distribution, n: int):
    """n samples of ``d`` (Bernoulli, Categorical, OneHotCategorical) through their continuous z.

    Returns ``(z, b, onehot, z_tilde)``: z (reparameterised: Logistic(α, 1) for Bernoulli, log p +
    Gumbel for categoricals), the discrete sample b = H(z) as ``d`` samples it (float 0/1, index, or
    one-hot), b as a float (one-hot for categoricals), and z̃ ~ p(z | b), reparameterised.
    """
    logits = d.logits
    shape = (n,) + tuple(logits.shape)
    if isinstance(d, Bernoulli):
        z = logits + logistic_noise(shape, logits)
        b = (z > 0).to(logits.dtype)  # H(z): an exact Bernoulli(σ(α)) sample, no gradient
        return z, b, b, conditional_logistic(logits, b)
    z = logits + gumbel_noise(shape, logits)
    index = z.argmax(-1)  # Gumbel-max: an exact categorical sample, no gradient
    onehot = torch.nn.functional.one_hot(index, z.shape[-1]).to(logits.dtype)
    b = onehot if isinstance(d, OneHotCategorical) else index
    return z, b, onehot, conditional_gumbel(logits, index)


def check_temperature(name: str, temperature) -> None:
    if callable(temperature):
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise OptionError(
            f"{name}: temperature must be a finite float > 0 or a schedule step -> float, got {temperature!r}"
        )


def blocks_weights(node: Node, n: int, blocks: int) -> torch.Tensor:
    """w = 1/n on the first block of n real samples, 0 on the evaluation-only blocks."""
    s = node.sample
    dtype = s.dtype if s.is_floating_point() else torch.get_default_dtype()
    for v in vars(base_of(node.distribution)).values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            dtype = v.dtype
            break
    w = torch.zeros((n * blocks,), dtype=dtype, device=s.device)
    w[:n] = 1.0 / n
    return w


def pad_blocks(t: torch.Tensor, blocks: int, dim: int = 0) -> torch.Tensor:
    """Append ``blocks - 1`` blocks of zeros along ``dim`` (for evaluation-only entries)."""
    if blocks == 1:
        return t
    shape = list(t.shape)
    shape[dim] = shape[dim] * (blocks - 1)
    return torch.cat([t, t.new_zeros(shape)], dim)


def block(cost_values: torch.Tensor, cost: CostFrame, n: int, k: int) -> torch.Tensor:
    """Block ``k`` (n entries) of the node's plate in a cost-frame tensor."""
    return cost_values.narrow(cost.dim, k * n, n)


class ControlVariateNet(torch.nn.Module):
    """c_φ(z): a two-layer MLP on the node's (relaxed) sample, flattened; one number per entry.

    The layers are created on the first call, with the input's size, dtype and device, so their
    parameters appear in ``.parameters()`` after the estimator's first node.

    Args:
        hidden: width of the hidden layer.
        zero_output: start with a zero output layer (c_φ = 0 until trained).
    """

    def __init__(self, hidden: int = 32, zero_output: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.zero_output = zero_output
        self.net: Optional[torch.nn.Sequential] = None

    def build(self, x: torch.Tensor) -> None:
        """Create the layers for inputs like ``x`` (``(..., F)``), once."""
        if self.net is None:
            with drawing_with(storch.current_generator()):  # storch.Graph(generator=g): g initialises
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(x.shape[-1], self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 1)
                ).to(dtype=x.dtype, device=x.device)
            if self.zero_output:  # c_φ = 0 at the start (RELAX's residual: it starts as REBAR)
                torch.nn.init.zeros_(self.net[2].weight)
                torch.nn.init.zeros_(self.net[2].bias)
            # every process must start from the same φ (DDP broadcasts only what exists at wrapping)
            storch.distributed.broadcast_(list(self.net.parameters()), owner=self._owner)

    _owner = None  # the estimator whose process group the broadcast uses (set by it)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved, already built network loads into a fresh (not yet built) one: build it first
        weight = state_dict.get(prefix + "net.0.weight")
        if self.net is None and weight is not None:
            zero, self.zero_output = self.zero_output, False  # the loaded values replace the init
            self.build(torch.empty(1, weight.shape[1], dtype=weight.dtype, device=weight.device))
            self.zero_output = zero
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.build(x)
        return self.net(x)

    def _build(self, features: int, dtype: torch.dtype, device: torch.device) -> None:
        with drawing_with(storch.current_generator()):  # storch.Graph(generator=g): g initialises
            self._make(features, dtype, device)

    def _make(self, features: int, dtype: torch.dtype, device: torch.device) -> None:
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, self.hidden), torch.nn.Tanh(), torch.nn.Linear(self.hidden, 1)
        ).to(dtype=dtype, device=device)

    _owner = None  # the estimator whose process group the broadcast uses (set by it)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a saved, already built network loads into a fresh (not yet built) one: build it first
        weight = state_dict.get(prefix + "net.0.weight")
        if self.net is None and weight is not None:
            self._build(weight.shape[1], weight.dtype, weight.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def param_clones(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of ``module``'s parameters (differentiable in them) for use in the surrogate's graph.

    The graph then saves the clones, not the parameters, so ``update_parameters`` may step the
    parameters in place while another estimator of the same graph still differentiates the loss.
    """
    return {k: v.clone() for k, v in module.named_parameters()}


def flat(t: torch.Tensor, lead: int) -> torch.Tensor:
    """Flatten every dim after the first ``lead`` into one (size 1 if there are none)."""
    return t.reshape(tuple(t.shape[:lead]) + (-1,))


def evaluate_network(name: str, network: Callable, z: torch.Tensor, lead: int) -> torch.Tensor:
    """c_φ(z) per entry: ``network`` maps ``(*lead, F)`` to ``(*lead)`` or ``(*lead, 1)``."""
    x = flat(z, lead)
    if isinstance(network, ControlVariateNet):
        network.build(x)
    if isinstance(network, torch.nn.Module):
        out = torch.func.functional_call(network, param_clones(network), (x,))
    else:
        out = network(x)
    if out.dim() == lead + 1 and out.shape[-1] == 1:
        out = out.squeeze(-1)
    if tuple(out.shape) != tuple(z.shape[:lead]):
        raise StorchError(
            f"{name}: the control-variate network returned shape {tuple(out.shape)} for input shape "
            f"{tuple(flat(z, lead).shape)}; it must return one number per entry, shape {tuple(z.shape[:lead])}"
        )
    return out


def tilde_term(c_zt: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """-MagicBox(l) c(z̃) + ⊥c(z̃): the z̃ part of REBAR's and RELAX's control variate, any-order form.

    Evaluates to 0; all its derivatives are those of -MagicBox(l) c(z̃), the DiCE estimate of
    -E[c(z)] through b ~ p and z̃ ~ p(z | b). Appendix D.2.4 prints -c(z̃) + (2 - MagicBox(l)) ⊥c(z̃),
    whose second derivative misses the cross terms ∇l ∇c(z̃)ᵀ + ∇c(z̃) ∇lᵀ (biased at order 2;
    ``tests/relaxed/test_relaxed_unbiased.py`` checks both forms).
    """
    return c_zt.detach() - magic_box(l) * c_zt


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
    """

    params: list = field(default_factory=list)
    z: Optional[torch.Tensor] = None
    z_tilde: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    l: Optional[torch.Tensor] = None


class VarianceTrained(Estimator):
    """Base of estimators whose own parameters φ are trained to minimise the gradient variance.

    ``storch.backward()`` backpropagates the loss and then runs :meth:`update_parameters`: it
    computes the gradient estimate ĝ of the loss with respect to the parameters of the node's
    distribution (``create_graph=True``), and since E[ĝ] does not depend on φ (the estimator is
    unbiased), the variance is minimised by descending ∂/∂φ Σ ĝ² (Grathwohl et al. 2018,
    section 3.3): one Adam step, applied there (never in a component).
    """

    has_update = True
    State = RelaxedState

    def _init_training(self, lr: float, update: bool) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise OptionError(f"{self.name}: lr must be a float > 0, got {lr!r}")
        if not isinstance(update, bool):
            raise OptionError(f"{self.name}: update must be True or False, got {update!r}")
        self.lr = float(lr)
        self.update = update
        self.update_steps = 0
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._loaded: Optional[dict] = None
        # state_dict: the optimizer is rebuilt after the (possibly lazily built) network has loaded
        self.register_load_state_dict_post_hook(VarianceTrained._restore_training)

    def _init_network(self, network: Optional[Callable], hidden: int, zero_output: bool = False) -> None:
        """The learned control variate c_φ: the user's network or a default MLP (LAX, RELAX)."""
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise OptionError(f"{self.name}: hidden must be an int >= 1, got {hidden!r}")
        if network is not None and not callable(network):
            raise OptionError(f"{self.name}: network must be a torch.nn.Module (or callable), got {network!r}")
        self.network = network if network is not None else ControlVariateNet(hidden, zero_output)
        if isinstance(self.network, ControlVariateNet):
            object.__setattr__(self.network, "_owner", self)  # not a submodule: no cycle in .modules()

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        if not self.update:
            return
        params = self._trainable()
        targets = [t for node in nodes for t in node.state.params]
        if not params or not targets:
            return
        # ĝ = ∂loss/∂(distribution parameters), kept differentiable in φ (create_graph)
        grads = torch.autograd.grad(loss, targets, retain_graph=True, create_graph=True, allow_unused=True)
        var = sum((g ** 2).sum() for g in grads if g is not None)
        if not isinstance(var, torch.Tensor) or not var.requires_grad:
            return
        # retain: other estimators of this graph still differentiate the same loss
        dphi = torch.autograd.grad(var, params, retain_graph=True, allow_unused=True)
        if self._optimizer is None or len(self._optimizer.param_groups[0]["params"]) != len(params):
            self._optimizer = torch.optim.Adam(params, lr=self.lr)
        dphi = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, dphi)]  # numbers
        # torch.distributed: the variance of the rank-averaged gradient, whose ĝ per data point is
        # ĝ_rank / W: ∂φ Σ_r |ĝ_r / W|² = W⁻¹ · mean_r ∂φ|ĝ_r|², the same step on every rank
        dphi = _across_ranks(dphi, self)
        for p, g in zip(params, dphi):
            p.grad = g
        self._optimizer.step()
        for p in params:
            p.grad = None
        self.update_steps += 1

    # -- state_dict: optimizer state and the step count are estimator state ------------------------

    def get_extra_state(self) -> dict:
        return {"optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
                "update_steps": self.update_steps}

    def set_extra_state(self, state: dict) -> None:
        # copied, as load_state_dict copies parameters; applied by _restore_training, once the
        # submodules (a lazily built network) are loaded
        self._loaded = state = copy.deepcopy(state)
        self.update_steps = state["update_steps"]

    @staticmethod
    def _restore_training(module: "VarianceTrained", incompatible_keys) -> None:
        state, module._loaded = module._loaded, None
        if state is None:
            return
        module._optimizer = None
        if state["optimizer"] is not None:
            module._optimizer = torch.optim.Adam(module._trainable(), lr=module.lr)
            module._optimizer.load_state_dict(state["optimizer"])


def _across_ranks(grads: list[torch.Tensor], owner) -> list[torch.Tensor]:
    """φ-gradients averaged over the ranks and divided by the world size (no-op in one process)."""
    if not storch.distributed.is_active(owner):
        return grads
    import torch.distributed as dist

    world = dist.get_world_size(storch.distributed._group_of(owner))
    return [g / world for g in storch.distributed.all_reduce_mean(grads, owner)]
