"""The checks of a graph's samples before its surrogate is built: each node's samples drawn with gradient
where a cost needs it, not changed in place where its estimator reads them, and reaching some cost (else its
parameters get no gradient from it, and a partition's last draws that reach none get no credit:
:class:`storch.UnusedSampleWarning`; :class:`storch.UnusedLastDrawWarning` where that is the last draw alone).
"""

from __future__ import annotations

import warnings

from .._util.stacklevel import user_stacklevel
from ..errors import StorchError, UnusedLastDrawWarning, UnusedSampleWarning
from ..graph import Graph
from ..graph.node import Node
from ..plates.tensor import plates_of


def _check_sampled_with_grad(node: Node, per_cost: list) -> None:
    """Refuse a node sampled under ``torch.no_grad()`` from parameters that require grad when a cost
    reaches it and the surrogate is built with grad: its gradient function (and a pathwise sample)
    has no graph, so its score term is silently missing from the gradient (only the other costs'
    terms remain, e.g. an entropy bonus). A node without costs may be sampled so (it silences
    :class:`UnusedSampleWarning`), and so may every node of an evaluation pass under no_grad. A cost added
    with ``credit=False`` is differentiated as written (no score term), and as written it reads a sample
    drawn without gradient: not refused (a world model trained on the actions of a policy sampled under
    no_grad). The message points a SeqGAN port (rollouts drawn under no_grad for a value estimate) at its
    recipe: ``credit=False`` on the rollout's own cost would silently leave the rollouts out of the gradient."""
    if not any(n is node for _, _, nodes in per_cost for n in nodes):
        return
    step = f" (step {node.no_grad_step} of its partition)" if node.step_log is not None else ""
    raise StorchError(
        f"node {node.plate.name!r} (estimator {node.estimator.name!r}) was sampled under torch.no_grad() (or "
        f"torch.inference_mode()){step}, from a distribution whose parameters require grad, and a cost depends "
        "on it: its gradient function was computed without grad, so these parameters would get no gradient "
        "through it (the gradient would silently be only the other costs'). Sample it with gradients enabled "
        "(est(distribution) outside the no_grad block); use torch.no_grad() only for evaluation steps (sampling, "
        "storch.cost_estimates() and the surrogate all under no_grad) or for nodes without costs; a loss that "
        "should give this node no score-function gradient (a world model trained on its samples) can be added "
        "with storch.add_cost(..., credit=False): differentiated as written, without score-function credit. "
        "Rollouts that only estimate a sequence's value (SeqGAN's Q(t), the mean reward of continuations of a "
        "prefix) are neither: their value weighs one step's log-probability, see 'Values estimated by rollouts' "
        "in docs/partitions.md")


def _changed_in_place(node: Node) -> None:
    raise StorchError(
        f"the samples of node {node.plate.name!r} (estimator {node.estimator.name!r}) were changed in place after "
        "the estimator handed them out (z.mul_(2), z += 1, z[...] = v, z.clamp_(...)): its gradient function, "
        "weights and control variates refer to the values it drew, so the gradient would be wrong or torch would "
        "fail in the backward pass. Compute a new tensor instead (z = z * 2, z = z + 1, torch.where(...), "
        "z.clamp(...))")


def _warn_unreached_steps(graph: Graph, per_cost: list) -> None:
    """Warn about a partition whose last steps no cost reaches: no cost carries its plate at those steps, so
    their draws get no credit (their l_t is in no cost's L_t, causal credit, docs/partitions.md).

    Every partition step drawn for a reason affects some later cost. Where the draws of the last steps reach none,
    the usual cause is a loop left in Python (``if bool(done.tensor.all()): break``) right after the draw that
    ended it: the state the costs read was last updated before that draw, so it does not carry its plate, and a
    sample's halting decision goes uncredited whenever every sample halted at once (a halting model at
    n_samples=1: z -75 against the exact gradient, tests/models/test_adaptive_computation.py). The partition's
    whole node unused is :func:`_warn_unused`'s. Costs are scanned from the last added, which typically reaches
    the last step (one cost a step): O(1) per partition there. The last draw alone unreached is also what a loop
    that draws the next action at the end of its body leaves (harmless): warned as its subclass
    :class:`UnusedLastDrawWarning`, which a user can filter without silencing the other cases.
    """
    for node in graph.nodes:
        log = node.step_log
        if log is None:
            continue
        last, name, seen = len(log) - 1, node.plate.name, -1
        for _, cost, nodes in reversed(per_cost):
            for p in plates_of(cost):
                if p.name == name:
                    seen = max(seen, p.step)
                    break
            if seen == last:
                break
        if seen < 0 or seen == last or not any(lt.requires_grad for _, lt in log[seen + 1:]):
            continue  # (unused as a whole: _warn_unused; no gradient in the late steps: nothing is lost)
        one = seen + 1 == last
        late = f"step {last}" if one else f"steps {seen + 1}-{last}"
        warnings.warn((UnusedLastDrawWarning if one else UnusedSampleWarning)(
            f"partition {name!r} (estimator {node.estimator.name!r}) drew {late} (of 0-{last}), but no cost carries "
            f"its plate at a step after {seen}: those draws get no credit (causal credit: a cost is credited to the "
            "steps up to its plate's step). If the costs depend on them through Python control flow, typically a "
            "loop left once every sample is done (`if bool(done.tensor.all()): break`) right after the draw that "
            "set `done`, the state they read does not carry that draw's plate and the gradient is biased: leave "
            "the loop after the masked updates that read `done` (`h = torch.where(done, h, f(h))`), before the "
            "next draw. A last draw that affects no cost can be left out, or drawn under torch.no_grad()"
            + ("; where a loop draws the next action at the end of its body on purpose, "
               "warnings.filterwarnings('ignore', category=storch.UnusedLastDrawWarning) silences this case alone"
               if one else "")),
            stacklevel=user_stacklevel())


def _warn_unused(graph: Graph, per_cost: list) -> None:
    """Warn about each node whose gradient function carries gradient and that no cost is downstream of.

    Its score term (l, or its weights) reaches the parameters only through the costs downstream of it,
    which are the costs that carry its plate. A cost computed from its samples outside storch's plates
    (``z.tensor``, ``.item()``, numpy; a reduction over the sample plate such as an IWAE bound) does not
    carry it, so that node's parameters silently got no gradient from it. A node with a zero gradient
    function (reparameterization, the relaxations) is not reported: its gradient flows pathwise.
    """
    seen: set = set()
    for _, _, nodes in per_cost:  # (a set of all (cost, node) pairs' ids: M²/2 steps of Python for a chain)
        seen.update(map(id, nodes))
    if len(seen) == len(graph.nodes):
        return
    for node in graph.nodes:
        if id(node) in seen:
            continue
        w = node.weight_values if not node.estimator.uniform_weights else None
        carries = node.gradient_values.requires_grad or (w is not None and w.requires_grad)
        if carries:
            warnings.warn(UnusedSampleWarning(
                f"node {node.plate.name!r} (estimator {node.estimator.name!r}) is upstream of no cost: no cost carries "
                f"its plate {node.plate.name!r}, so its distribution's parameters get no gradient from its estimator. "
                "A cost computed from its samples outside storch's plates (z.tensor, .item(), numpy, a reduction "
                "over the sample plate) is invisible to storch. For a cost per sample, whose sampling is to be "
                "differentiated: compute it from the plate tensor itself, one value per sample (a continuous node can "
                "use 'reparameterization'; a multi-sample bound such as IWAE's is the cost of ONE sample that holds "
                "its K draws: est(Bernoulli(logits=logits.expand(K, *logits.shape))), reduced over the first dim, or "
                "the 'vimco' estimator, see docs/plates.md). For a loss of the whole set, whose sampling is not "
                "differentiated (reweighted wake-sleep's wake losses, minimum risk training's; added with credit=False: "
                "docs/estimators/vimco.md, docs/partitions.md), or a node "
                "sampled on purpose without a cost: draw it from detached parameters "
                "(est(Categorical(logits=logits.detach()))) or under torch.no_grad()"), stacklevel=user_stacklevel())
