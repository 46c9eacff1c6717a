"""Code written against storch's public API, as a user and an estimator author write it.

The ``typecheck`` tox environment runs pyright over this file: it must type-check with zero
errors, so the public signatures (``py.typed``) say what the documentation says. It is also run
(``tests/typecheck/test_public_api_types.py``), so it cannot drift from what works.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

import storch
import storch.distributed
import storch.testing as kit
from storch.extending import align, base_distribution, drawing_with, leave_one_out, options, plates_of, raw_of
from storch import CostFrame, Estimator, Node, PlateTensor
from storch_mvd import Mvd, Spsa
from storch_relaxed import Arm, DisArm, Go, GumbelSoftmax, GumbelStraightThrough, Lax, Rebar, Relax, StraightThrough
from storch_score import Importance, Score, SumAndSample, UnorderedSet, Vimco
from typing_extensions import assert_type

FAMILY_CLASSES: list[type[Estimator]] = [Score, Importance, SumAndSample, UnorderedSet, GumbelSoftmax,
                                         GumbelStraightThrough, StraightThrough, Lax, Relax, Rebar, Arm, DisArm, Go, Spsa,
                                         Mvd]


def vae_step(encoder: torch.nn.Linear, decoder: torch.nn.Linear, data: torch.Tensor,
             optimizer: torch.optim.Optimizer, est: Estimator) -> float:
    """The README's training step, for one batch."""
    x: PlateTensor = storch.denote_independent(data, 0, "data")
    q = OneHotCategorical(logits=encoder(x).view(4, 3))
    z: PlateTensor = est(q)
    prior = OneHotCategorical(logits=torch.zeros(4, 3))
    storch.add_cost(torch.distributions.kl_divergence(q, prior).sum(), name="kl")
    storch.add_cost(-Bernoulli(logits=decoder(z.reshape(12))).log_prob(x).sum(), name="rec")
    elbo: torch.Tensor = storch.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(elbo)


def restricted_step(theta: torch.Tensor, est: Estimator) -> torch.Tensor:
    """storch.backward(inputs=...) takes one tensor as Tensor.backward(inputs=...) does, or a sequence."""
    storch.add_cost(est(Bernoulli(logits=theta)).sum(), name="c")
    storch.backward(inputs=theta)
    storch.add_cost(est(Bernoulli(logits=theta)).sum(), name="c")
    return storch.backward(inputs=[theta])


def second_order(theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    est = storch.estimator("score", plate="b", n_samples=4, baseline="leave_one_out")
    with storch.Graph():
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        loss = storch.surrogate_loss(order=2)
        (g,) = torch.autograd.grad(loss, [theta], create_graph=True)
    return g, loss


def supervised(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xs, ys = storch.denote_independent((x, y), 0, "data")
    return torch.nn.functional.cross_entropy(model(xs), ys)


class LeaveOneOut(storch.Estimator):
    """An estimator author's subclass: one component overridden."""

    name = "typed_leave_one_out"

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        return (cost.sum_plate(cost.tensor) - cost.tensor) / (node.n - 1)


class LooWithHelpers(storch.Estimator):
    """The same baseline through storch.extending, with a validated option."""

    name = "typed_leave_one_out_helpers"

    def __init__(self, plate: str, n_samples: int = 2, scale: float = 1.0) -> None:
        super().__init__(plate, options.integer(self.name, "n_samples", n_samples, minimum=2))
        self.scale = float(options.number(self.name, "scale", scale, above=0.0))

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        return self.scale * leave_one_out(cost, node.n)


def helpers(z: PlateTensor, generator: torch.Generator) -> torch.Tensor:
    raw: torch.Tensor = raw_of(z)
    aligned = align(raw, plates_of(z), plates_of(z))
    with drawing_with(generator):
        noise = torch.rand(aligned.shape)
    d: Distribution = base_distribution(Bernoulli(logits=torch.zeros(3)))
    return aligned + noise + d.mean


def conformance() -> bool:
    report: kit.ConformanceReport = kit.check_against_enumeration(LeaveOneOut, options={"n_samples": 3},
                                                                  n_replicates=500, raise_on_failure=False)
    theta = torch.tensor([0.3, -0.7], dtype=torch.float64)

    def node(t: torch.Tensor) -> Distribution:
        return Bernoulli(logits=t)

    conditions: kit.ConditionsReport = kit.check_conditions(
        "score", node, theta, lambda x: ((x - 0.2) ** 2).sum(), n_replicates=500, raise_on_failure=False)
    with storch.Graph():
        leaf, th = kit.replicate(theta, 500)
        b = storch.estimator("score", plate="b")(Bernoulli(logits=th))
        storch.add_cost(((b - 0.45) ** 2).sum())
        (g,) = kit.per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    p = torch.sigmoid(theta)
    unbiased: kit.UnbiasednessReport = kit.z_test(g, 0.1 * p * (1 - p), "grad")
    return report.ok and conditions.ok and unbiased.ok


def registry() -> list[str]:
    infos: dict[str, storch.EstimatorInfo] = storch.available_estimators()
    cls = storch.get_estimator_class("unordered_set")
    assert issubclass(cls, Estimator)
    return [f"{name}: {info.max_order}" for name, info in infos.items()]


def plates() -> storch.Treatment:
    est = storch.estimator("expect", plate="z")
    z = est(Categorical(logits=torch.zeros(3)))
    names: tuple[str, ...] = z.plate_names
    raw: torch.Tensor = z.tensor
    assert len(names) == raw.dim()
    storch.reset()
    return storch.treatment_of(torch.add).treatment


def distributed_state(est: Estimator) -> bool:
    storch.distributed.synchronize(est, enabled=False)
    ranks: int = storch.distributed.world_size(est)
    return storch.distributed.is_active(est) or ranks != 1


def compiled_steps(encoder: torch.nn.Linear, data: torch.Tensor) -> int:
    """README 'Compiling a step' and docs/tutorials/discrete-vae.md: both forms of storch.compile."""
    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")

    @storch.compile(backend=None)
    def step(x: torch.Tensor) -> torch.Tensor:
        with storch.Graph():
            z = est(Bernoulli(logits=encoder(storch.denote_independent(x, 0, "data"))))
            storch.add_cost(((z - 0.3) ** 2).sum())
            return storch.surrogate_loss()

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        return step.fn(x)

    fast = storch.compile(loss_fn, backend=None)
    fast(data).backward()
    loss: torch.Tensor = step(data)
    loss.backward()
    same: storch.CompiledStep[[torch.Tensor], torch.Tensor] = fast
    traces = same.traces + step.traces
    fast.clear()
    return traces


def documented_attributes(theta: torch.Tensor) -> float:
    """Attributes of estimators made by name that the family pages document (est.step, ...)."""
    g = storch.estimator("gumbel_softmax", plate="z", temperature=lambda step: max(0.5, 0.99 ** step))
    tau: float = g.current_temperature()  # gumbel_softmax.md
    steps: int = g.step
    g.step = 10
    s = storch.estimator("score", plate="z", baseline="moving_average")
    skipped: int = s.skipped_updates  # reliability.md
    averages: dict[str, torch.Tensor] = s.moving_averages  # score.md
    n: int = s.n_samples  # a declared attribute keeps its type
    with storch.Graph():  # vimco.md, by name and with the class
        for v in (storch.estimator("vimco", plate="v", n_draws=3), Vimco("v", n_draws=3)):
            q = Bernoulli(logits=theta)
            w = v(q)
            log_w: torch.Tensor = (q.log_prob(w) - Bernoulli(logits=torch.zeros(3)).log_prob(w)).sum(-1)
            storch.add_cost(v.bound(log_w), name="negative_iwae")
            storch.backward()
    return tau + steps + skipped + len(averages) + n


def third_op(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


def fourth_op(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


def plate_handlers() -> storch.Entry:
    """docs/plates.md: a refusal, and a handler registered by the decorator (which returns it)."""
    storch.register_plate_handler(third_op, storch.refuse("use third_op_v2"))

    @storch.register_plate_handler(fourth_op)
    def fourth_on_plates(func: Callable[..., Any], args: tuple, kwargs: dict) -> PlateTensor:
        x = args[0]
        return storch.PlateTensor(torch.sigmoid(x.tensor), x.plates)

    pt = storch.PlateTensor(torch.zeros(3, 2), (storch.Plate("p", 3),))
    assert_type(fourth_on_plates(fourth_op, (pt,), {}), PlateTensor)  # the handler itself, typed
    return storch.treatment_of(third_op)


class Capped(storch.Estimator):
    """docs/writing-an-estimator.md section 2: an option changes capabilities of one instance."""

    name = "typed_capped"
    max_order = 1
    has_update = True
    replays_update = True

    def __init__(self, plate: str, n_samples: int = 2, exact: bool = False, update: bool = True) -> None:
        super().__init__(plate, n_samples)
        if exact:
            self.max_order = math.inf
        self.has_update = update
        self.replays_update = update
        self.update_uses_loss_graph = False

    def update_inputs(self, nodes: list[Node]) -> list[torch.Tensor]:
        return []

    def update_from(self, inputs: list[torch.Tensor]) -> None:
        pass


class SelfCritical(storch.Estimator):
    """docs/writing-an-estimator.md: components read node.sample, node.plate, node.frames, node.original."""

    name = "typed_self_critical"

    def gradient_function(self, node: Node) -> torch.Tensor:
        l = node.log_prob(node.sample)  # noqa: E741 (the docs' code)
        assert l.shape[0] == node.plate.size
        return l

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        d: Optional[Distribution] = node.original  # the distribution the user built
        assert d is not None and cost.tensor.shape[0] == node.n
        return None

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        for node in nodes:
            assert_type(node.frames, dict[str, CostFrame])


def typed_results(theta: torch.Tensor) -> bool:
    """Results the docs give a type: classes from the registry, capability checks, averages, options."""
    cls = storch.get_estimator_class("score")
    assert_type(cls, type[Estimator])
    est = cls("z", n_samples=2)
    d = Bernoulli(logits=theta)
    assert_type(Estimator.supports(d), bool)
    assert_type(est.supports(d), bool)
    avg: torch.Tensor = storch.distributed.all_reduce_mean(torch.ones(3), owner=est)
    means = storch.distributed.all_reduce_mean({"rec": torch.ones(())}, owner=est, partial=True)
    rec: torch.Tensor = means["rec"]
    assert_type(options.choice("mine", "mode", "fast", ("fast", "slow")), Literal["fast", "slow"])
    info = Capped("z", exact=True).info()
    with storch.Graph():
        b = SelfCritical("b", n_samples=3)(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        storch.backward()
    return Estimator.supports(d) and bool(avg.sum() + rec > 0) and info.max_order == math.inf


def set_loss(theta: torch.Tensor) -> torch.Tensor:
    """docs/partitions.md, minimum risk training: raw values lined up with storch.aligned, the loss put back."""
    est = storch.estimator("expect", plate="seq")
    with storch.Graph():
        x = est(Categorical(logits=theta.detach()))
        lp = Categorical(logits=theta).log_prob(x)
        delta = (x != 1).float()
        raws, plates = storch.aligned(lp, delta, storch.padding(x), plates=(..., "seq"))
        assert_type(raws, tuple[torch.Tensor, ...])
        assert_type(plates, tuple[storch.Plate, ...])
        a, d, m = raws
        q = torch.softmax(a.masked_fill(m, -math.inf), -1)
        storch.add_cost(storch.PlateTensor((q * d).sum(-1), plates[:-1]), name="mrt", credit=False)
        (same,), _ = storch.aligned(lp, plates=x.plates)
        assert torch.equal(same, lp.tensor)
        return storch.backward()


if __name__ == "__main__":
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(6, 12), torch.nn.Linear(12, 6)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    for spec in ("score", "unordered_set", "gumbel_softmax"):
        vae_step(enc, dec, torch.bernoulli(torch.rand(5, 6)), opt, storch.estimator(spec, plate="z"))
    second_order(torch.zeros(3, requires_grad=True))
    restricted_step(torch.zeros(3, requires_grad=True), storch.estimator("score", plate="z"))
    supervised(torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert conformance()
    assert kit.check_against_enumeration(LooWithHelpers, n_replicates=500, raise_on_failure=False).ok
    with storch.Graph():
        zz = storch.estimator("score", plate="z", n_samples=2)(Bernoulli(logits=torch.zeros(3)))
        helpers(zz, torch.Generator().manual_seed(0))
    assert registry()
    plates()
    assert not distributed_state(storch.estimator("score", plate="z"))
    assert compiled_steps(torch.nn.Linear(6, 4), torch.rand(5, 6)) >= 2
    documented_attributes(torch.zeros(3, requires_grad=True))
    assert plate_handlers().treatment == storch.Treatment.REFUSED
    assert typed_results(torch.zeros(2, requires_grad=True))
    set_loss(torch.zeros(3, requires_grad=True))
    print("ok")
