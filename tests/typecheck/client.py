"""Code written against storch's public API, as a user and an estimator author write it.

The ``typecheck`` tox environment runs pyright over this file: it must type-check with zero
errors, so the public signatures (``py.typed``) say what the documentation says. It is also run
(``tests/typecheck/test_public_api_types.py``), so it cannot drift from what works.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

import storch
import storch.distributed
import storch.testing as kit
from storch.extending import align, base_distribution, drawing_with, leave_one_out, options, plates_of, raw_of
from storch import CostFrame, Estimator, Node, PlateTensor
from storch_mvd import Mvd, Spsa
from storch_relaxed import Arm, DisArm, Go, GumbelSoftmax, GumbelStraightThrough, Lax, Rebar, Relax
from storch_score import Importance, Score, SumAndSample, UnorderedSet

FAMILY_CLASSES: list[type[Estimator]] = [Score, Importance, SumAndSample, UnorderedSet, GumbelSoftmax,
                                         GumbelStraightThrough, Lax, Relax, Rebar, Arm, DisArm, Go, Spsa, Mvd]


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


if __name__ == "__main__":
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(6, 12), torch.nn.Linear(12, 6)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    for spec in ("score", "unordered_set", "gumbel_softmax"):
        vae_step(enc, dec, torch.bernoulli(torch.rand(5, 6)), opt, storch.estimator(spec, plate="z"))
    second_order(torch.zeros(3, requires_grad=True))
    supervised(torch.nn.Linear(4, 3), torch.randn(6, 4), torch.randint(0, 3, (6,)))
    assert conformance()
    assert kit.check_against_enumeration(LooWithHelpers, n_replicates=500, raise_on_failure=False).ok
    with storch.Graph():
        zz = storch.estimator("score", plate="z", n_samples=2)(Bernoulli(logits=torch.zeros(3)))
        helpers(zz, torch.Generator().manual_seed(0))
    assert registry()
    plates()
    assert not distributed_state(storch.estimator("score", plate="z"))
    print("ok")
