"""The Gumbel-softmax (Concrete) relaxation."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch.distributions import Bernoulli, Distribution

from storch import Estimator, Node, OptionError
from storch.extending import base_distribution

from ._categorical import DEFAULT_DISTRIBUTIONS, OneHotForCategorical
from ._params import exact_logits
from ._noise import Temperature, check_temperature, gumbel_noise, logistic_noise
from ._precision import to_model, to_work

__all__ = ["GumbelSoftmax"]


_plain_setattr = object.__setattr__  # an attribute that is no parameter, buffer or submodule


#: the refusal of ``eos=`` by the relaxations (they support partitions, not the end of a sequence at a value): a
#: message of relaxed symbols, as EGG's Gumbel-softmax sender, is written with an estimator per position
#: (tests/models/test_signaling_game.py)
EOS_HINT = ("eos= ends the sequences of a partition (one estimator called at every step) at a value, which this "
            "estimator does not do: make one estimator per position (plate=f\"m{t}\"; n_samples=1, or the samples multiply "
            "with every position) and mask what follows eos yourself, live = live * (1 - b[eos]) after each "
            "position (docs/partitions.md, \"Variable length\"); or use an estimator that takes eos=: score, "
            "unordered_set")


class GumbelSoftmax(OneHotForCategorical, Estimator):
    """Gumbel-softmax / Concrete relaxation: a reparameterised relaxed sample (biased).

    Components:
        q(X | x<i) = n i.i.d. relaxed samples: Bernoulli: z = σ((α + L)/τ), L ~ Logistic(0, 1);
            categorical: z = softmax((log p + G)/τ), G ~ Gumbel(0, 1)^K;
        w(x) = 1/n;
        l(x) = 0 (the gradient flows through the relaxed sample, as for ``reparameterization``);
        a = 0.

    User code receives the relaxed sample: a number in (0, 1) for Bernoulli, a point of the
    simplex (shape ``(..., K)``) for OneHotCategorical (write the cost for one-hot inputs, e.g.
    ``z @ emb`` instead of ``emb[z]``).

    Requires: Bernoulli or OneHotCategorical (a Categorical only with ``categorical="one_hot"``), and
    a cost that is defined and differentiable on relaxed inputs. A Categorical is refused by default
    (``storch.UnsupportedDistributionError``): integer categories cannot be relaxed, so its node
    would hand out a relaxed one-hot vector where every other estimator hands out the index, and a
    cost written for the index would silently be another one. Pass ``OneHotCategorical`` (the same
    parameters) instead.

    max_order: ∞, but of the RELAXED objective E_z[f(z)] (a reparameterisation of it); it is
    ``biased`` for E_b[f(b)]; the bias vanishes as τ → 0 while the variance grows. As for
    ``reparameterization`` (``pathwise``), ∞ needs a smooth path from z to the cost: a kink (ReLU,
    abs, clamp, a mask such as ``torch.where(z > c, z - c, 0)``) is refused from order 2, a jump
    (round) at order 1 (``storch.OrderError``: autograd misses the delta, and the derivatives of
    the relaxed objective would be silently wrong).

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        temperature: τ > 0, or a schedule ``step -> τ`` (annealing); ``step`` counts the
            training steps of graphs that used this estimator: ``storch.backward()`` calls, and steps whose
            surrogate losses were backpropagated with ``.backward()`` (one per step, however many of them;
            ``est.step``, in ``state_dict()`` as ``schedule_step``). Jang et al.'s
            schedule: ``lambda t: max(0.5, math.exp(-1e-5 * t))``. The schedule is evaluated at each
            call of the estimator (a schedule that reads a value you change gives the next call its new τ;
            ``current_temperature()`` is what a call now would use); a value that is not a finite float > 0 raises
            ``storch.OptionError`` where the estimator samples. Only a schedule makes the estimator
            update its state (``has_update``); ``storch.compile`` replays that update
            (``replays_update``: the compiled program reads τ, a 0-dim tensor, at every call), so
            a step with either compiles.
        categorical: ``"refuse"`` (the default) or ``"one_hot"``: take a Categorical node too, handing out
            relaxed one-hot vectors of shape ``(..., K)`` for it, not indices (for a model written for
            one-hot vectors; ``OneHotCategorical`` says the same without the option).

    Example:
        >>> torch.manual_seed(0)
        >>> est = storch.estimator("gumbel_softmax", plate="z", temperature=0.5)
        >>> z = est(OneHotCategorical(logits=torch.zeros(5)))   # relaxed one-hot, sums to 1

    References:
        [1] Categorical Reparameterization with Gumbel-Softmax (Jang et al., 2017)
        [2] The Concrete Distribution (Maddison et al., 2017)
    """

    name = "gumbel_softmax"
    #: read by ``storch.estimator`` when it refuses an option this class does not take (this class's only)
    unknown_option_hints = {
        "hard": "For the hard (discrete) forward value with the relaxed sample's gradient, torch's "
                "F.gumbel_softmax(hard=True), use the estimator \"gumbel_straight_through\" "
                "(storch.estimator(\"gumbel_straight_through\", plate=..., temperature=...))",
        "eos": EOS_HINT,
    }
    biased = True
    distributions = DEFAULT_DISTRIBUTIONS  # a Categorical only with categorical="one_hot" (_categorical)
    # the cost is differentiated through the relaxed sample: its derivatives are those of the relaxed objective only
    # where the path from z to the cost is smooth (a kink from order 2, a jump at order 1: refused by the surrogate)
    pathwise = True
    has_update = True  # only to advance an annealing schedule: per instance, see the temperature setter
    # one instance called at every step of a sequence (a world model's latent per step, a decoder) is one partition
    # with one plate: each step is drawn by proposal (the core's components path: l = 0, uniform weights), where one
    # estimator per step added a plate dim per step and stopped at torch's 64 (a DreamerV3 sequence of 64 steps)
    supports_partitions = True
    replays_update = True  # that update is replayed by storch.compile (update_from; τ in state_tensors)

    def __init__(self, plate: str, n_samples: int = 1, temperature: Temperature = 1.0,
                 categorical: str = "refuse") -> None:
        super().__init__(plate, n_samples)
        self.categorical = categorical
        self._step = 0
        self._tau: Optional[torch.Tensor] = None  # τ at the current step, for a schedule (0-dim float64, CPU)
        self._tau_error: Optional[str] = None  # why the schedule's value at this step is not a temperature
        self._tau_value: object = None  # the schedule's value that _tau holds (compared at each call)
        self.temperature = temperature
        self.register_load_state_dict_post_hook(_loaded)

    # -- the temperature and its schedule ----------------------------------------------------------

    @property
    def temperature(self) -> Temperature:
        """τ, or the schedule ``step -> τ``. Setting it re-evaluates the schedule at :attr:`step`."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: Temperature) -> None:
        check_temperature(self.name, value)
        self._temperature = value
        annealed = callable(value)
        # the step counter is state only for a schedule: a constant temperature updates nothing
        self.has_update = self.replays_update = annealed
        if annealed and "schedule_step" not in self._buffers:
            # the step counter in state_dict(): a resumed run anneals on from where it stopped
            self.register_buffer("schedule_step", torch.tensor(self._step))
        self._evaluate()

    @property
    def step(self) -> int:
        """The number of updates so far: ``storch.backward()`` calls, and ``.backward()`` of surrogate
        losses (eager or compiled), of graphs that used this estimator (with a schedule only)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._set_step(value)

    def _set_step(self, value: int) -> None:
        # _step, _tau, _tau_error are plain attributes (no parameter, buffer or submodule has these
        # names): set without nn.Module.__setattr__'s checks, which cost microseconds at every update
        _plain_setattr(self, "_step", int(value))
        old = self._buffers.get("schedule_step")
        if old is not None:  # a new tensor (not fill_): a state_dict() saved before keeps its step
            self.schedule_step = torch.tensor(self._step, device=old.device)
        self._evaluate()

    def _evaluate(self) -> None:
        """Evaluate the schedule at the current step, once per step (a bad value raises where it is used)."""
        _plain_setattr(self, "_tau", None)
        _plain_setattr(self, "_tau_error", None)
        if not callable(self._temperature):
            return
        tau = self._temperature(self._step)
        try:
            check_temperature(self.name, float(tau))
        except (TypeError, ValueError):
            _plain_setattr(self, "_tau_error", f"{self.name}: the temperature schedule returned {tau!r} at step "
                                               f"{self._step}; it must return a finite float > 0")
            return
        # a tensor, not a float: storch.compile passes it to the program at every call (state_tensors)
        _plain_setattr(self, "_tau", torch.tensor(float(tau), dtype=torch.float64))
        _plain_setattr(self, "_tau_value", tau)

    def _scheduled(self) -> torch.Tensor:
        """The schedule's τ at the current step as a 0-dim tensor (checked), evaluated now: a schedule that reads
        a value the user changed between calls (``lambda t: scale[0]``) gives the call its new τ. The tensor of
        the last evaluation is kept while the value stays the same (storch.compile lifts the tensor the trace
        read into an input of the program: the same object as ``state_tensors()`` returns after the trace)."""
        if callable(self._temperature) and (self._tau is None or self._temperature(self._step) != self._tau_value):
            self._evaluate()
        if self._tau is None:
            raise OptionError(self._tau_error or f"{self.name}: the temperature is not a schedule")
        return self._tau

    def current_temperature(self) -> float:
        """τ at the current step (the schedule's value, checked)."""
        if not callable(self._temperature):
            return float(self._temperature)
        return float(self._scheduled())

    # -- the components --------------------------------------------------------------------------

    def relaxed(self, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
        """n relaxed samples ``(n, *parents, *batch[, K])`` (differentiable) and their logits z (float32 for a
        float16 / bfloat16 model: the noise's precision, ``_precision``; the samples in its dtype)."""
        return self._relaxed(node.distribution, (self.n_samples,))

    def _relaxed(self, distribution: Distribution, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``shape`` relaxed samples of ``distribution``, ``(*shape, *batch[, K])``, and their logits z."""
        d = base_distribution(distribution)
        t = self._temperature
        # a schedule's τ is a 0-dim float64 tensor (z / τ gives the same values as with a float)
        tau = self._scheduled() if callable(t) else float(t)
        logits = exact_logits(d)  # far below the rest where d's probabilities are exactly 0: never drawn
        dtype = logits.dtype
        # z in float32 for a float16 / bfloat16 model (the noise's precision, _precision), the relaxation in its dtype
        logits = to_work(logits)
        shape = tuple(shape) + tuple(logits.shape)
        if isinstance(d, Bernoulli):
            z = logits + logistic_noise(shape, logits)  # z ~ Logistic(α, 1); 1[z > 0] ~ Bernoulli(σ(α))
            return to_model(torch.sigmoid(z / tau), dtype), z  # Maddison et al. 2017, Eq. 21 (binary Concrete)
        z = logits + gumbel_noise(shape, logits)  # Gumbel-max: argmax z ~ Categorical(p)
        return to_model(torch.softmax(z / tau, -1), dtype), z  # Jang et al. 2017, Eq. 1

    def proposal(self, node: Node) -> torch.Tensor:
        return self.draw(node.distribution, (self.n_samples,))

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=node.sample.dtype, device=node.sample.device)

    # -- a partition's later steps: one draw per sequence ----------------------------------------------

    def draw(self, distribution: Distribution, shape: tuple) -> torch.Tensor:
        """``shape`` values handed out for ``distribution`` (the relaxed samples). At a later step of a partition
        (``Estimator.extend``: ``shape`` is ``()``, the batch leads with the prefix plate) each sequence
        continues with one draw given its own prefix: the core's components path, which the class took before it
        had this hook, drew ``n`` per prefix and kept the diagonal: n² draws, softmaxes and their backward per
        step (n = 8, 50 steps of a 32x32 latent, batch 16: 3.2x the time of straight-through, 2.5x of softmax; 1.4x
        in the RSSM of tests/models/test_world_model.py at that size). The same values and gradients given the noise."""
        return self._relaxed(distribution, shape)[0]

    def step_gradient_function(self, node: Node, distribution: Distribution, sample: torch.Tensor,
                               plates: tuple) -> torch.Tensor:
        """l_t = 0 (the gradient flows through the relaxed sample), broadcast over the plates as at step 0."""
        return torch.zeros((1,), dtype=sample.dtype, device=sample.device)

    # -- the update (a schedule's step), replayed by storch.compile (replays_update) -----------------

    def update_inputs(self, nodes: list[Node]) -> tuple:
        return ()  # the step counter needs nothing from the step

    def update_from(self, inputs: tuple) -> None:
        self._set_step(self._step + 1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A schedule's τ at the current step (a compiled step reads it at every call); else none."""
        return {"temperature": self._scheduled()} if callable(self._temperature) else {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint written before the step counter was saved has no schedule_step: it loads (strictly
        # too) and the annealing goes on from the current step, as it did then, with a warning
        key = prefix + "schedule_step"
        if "schedule_step" in self._buffers and key not in state_dict:
            warnings.warn(f"{self.name}: the checkpoint has no {key!r} (saved before the annealing step was "
                          f"state): the schedule goes on from the current step {self._step}; set est.step to "
                          "resume it where it was", stacklevel=2)
            state_dict[key] = self.schedule_step
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        extra = f", categorical={self.categorical!r}" if self.categorical != "refuse" else ""
        return f"{super().extra_repr()}, temperature={self.temperature!r}{extra}"


def _loaded(module: GumbelSoftmax, incompatible_keys) -> None:
    """After ``load_state_dict``: the step counter from the loaded buffer, the schedule evaluated there."""
    if "schedule_step" in module._buffers:
        module._step = int(module.schedule_step)
        module._evaluate()
