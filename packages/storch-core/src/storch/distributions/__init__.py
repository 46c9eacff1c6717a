"""The distributions of a node: a distribution built from plate tensors turned into a raw one with the
plates as batch dims, and what storch reads of it.

User code builds ``torch.distributions`` objects from plate tensors (written for one sample).
An estimator samples from the *raw* distribution, whose parameters are the raw tensors aligned
to the union of their plates and expanded to the plate sizes, so that every plate entry gets
its own, independent samples.

Lowest first: ``parameters`` (the parameters a distribution was built from), ``rsample`` (what
torch's rsample can be differentiated to), ``transform_cache`` (a transform's cached pre-images kept
for the value handed out); ``rebuild`` (a distribution built again from its parameters), ``support``
(the values an enumerating estimator walks; ``strict_support``), ``rsample_kinks`` (kinks and jumps inside a
distribution's rsample, between its parameters and the sample); ``unwrap`` (plate tensors to the raw
distribution), ``raw`` (a node's log p and draw on it).
"""

from .parameters import (base_distribution, differentiated_total_count, given_by_probs, grad_parameters, holds_grad,
                         parameters)
from .raw import raw_log_prob, raw_sample
from .rebuild import rebuild, torch_class_hint
from .rsample import (RSAMPLE_ORDER_NOTE, UNDIFFERENTIABLE_RSAMPLE_NOTE, rsample_max_order, straight_through_rsample,
                      undifferentiable_rsample)
from .rsample_kinks import rsample_kinks, rsample_kinks_note, rsample_params, rsample_walked
from .support import check_enumeration, enumeration_support, strict_support, varying_total_count
from .transform_cache import rekey_transform_cache
from .unwrap import unwrap_distribution

__all__ = ["base_distribution", "unwrap_distribution", "raw_log_prob", "raw_sample", "strict_support",
           "rsample_max_order", "RSAMPLE_ORDER_NOTE", "enumeration_support", "check_enumeration", "rekey_transform_cache",
           "straight_through_rsample", "undifferentiable_rsample", "UNDIFFERENTIABLE_RSAMPLE_NOTE", "parameters",
           "rebuild", "torch_class_hint", "given_by_probs", "holds_grad", "grad_parameters",
           "rsample_kinks", "rsample_kinks_note", "rsample_params", "rsample_walked", "differentiated_total_count",
           "varying_total_count"]
