"""The Storchastic surrogate loss (paper, Eq. 2; Algorithm 1), vectorised over plates.

For each cost C, the sampling plates it carries name exactly the nodes upstream of it (credit
assignment by plate membership). With those nodes in topological order 1..k and
L_i = l_1 + ... + l_i, the nested sums of Eq. 2 are computed from the innermost out, one tensor
reduction per node, never a Python loop over samples:

    inner_k   = MagicBox(L_k) · C
    inner_i-1 = Σ_{x_i ∈ X_i} w_i(x_i) · [ inner_i + MagicBox(L_{i-1}) · a_i(x<i, X_i) ]

so each control variate is multiplied by MagicBox of the gradient functions before it (Theorem 2,
appendix C), which keeps baselines zero-mean at every order, so they can reduce variance there (measured:
usually the Hessian's total, not every entry). Independent (data) plates
are reduced by the mean; the costs' surrogates are summed.

The modules, each importing only those below it (the ``surrogate-layers`` contract in ``.importlinter``):

- ``backprop``: ``storch.backward()``, the training step (backpropagate, update, reset the graph);
- ``loss``: ``surrogate_loss``, ``value_surrogate``: the checks, then the costs' terms summed (Eq. 2, Theorem 2);
- ``one_node``: the commonest step's surrogate (one node at order 1), without the general path's loops;
- ``steps``: the costs of a partition's steps stacked into one term;
- ``estimates``: ``cost_estimates``, ``estimate``: a cost reduced as the surrogate reduces it, detached; ``padding``;
- ``samples``: the samples drawn with gradient, not changed in place, each reaching a cost (the warnings);
- ``state_names``: per-cost estimator state of costs of one name and different plates kept apart;
- ``terms``: a cost's term of Eq. 2 / Theorem 2 (``cost_nodes``, causal credit, the weights);
- ``grouped_baselines``: the costs' baselines summed by node (one control variate term per node);
- ``running_sums``: the running sums L_j of the cost's nodes' gradient functions, shared by the costs;
- ``control_variates``: a node's control variate in a term (the estimator's own, or the baseline's);
- ``order``: each estimator unbiased at the requested order; the low-order nodes' terms guarded;
- ``pathwise``: a pathwise node's cost smooth on the path from its sample;
- ``reaches``: a pathwise node's cost reaching its sample at all (not cut by a comparison, ``.long()``, ``detach``);
- ``integer_reads``: a pathwise node's cost computed from an integer value read from its sample (refused);
- ``updates``: the estimators' updates on a backward pass of the surrogate (the probe);
- ``refusals``: refusing a derivative beyond the surrogate's order (hooks; torch.func counted);
- ``finite``: a non-finite loss refused before anything changes.
"""

from __future__ import annotations

from . import blackbox  # noqa: F401  (installs the check of storch.PlateTensor(raw, plates): blackbox.py)
from .backprop import backward
from .estimates import cost_estimates, estimate, padding
from .loss import surrogate_loss
# the private names the rest of storch imports from here: storch.testing (value_surrogate), storch.extending
# (_refuse_twice), storch.compile (update_on_backward); and tests/score/test_surrogate_fast_paths.py (terms)
from .loss import value_surrogate  # noqa: F401
from .refusals import _refuse_twice  # noqa: F401
from .control_variates import _BASE_CONTROL_VARIATE, _baseline_term  # noqa: F401
from .terms import _at_cost, _cost_surrogate, _one_node_surrogate, cost_nodes  # noqa: F401
from .updates import update_on_backward  # noqa: F401

__all__ = ["surrogate_loss", "backward", "cost_nodes", "cost_estimates", "estimate", "padding"]
