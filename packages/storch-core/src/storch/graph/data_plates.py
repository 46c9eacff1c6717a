"""A graph's data plates: ``Graph.denote_independent`` makes a dim of a tensor (or of several tensors, inputs and
targets) an independent plate of data points, reduced by the mean in the surrogate.
"""

from __future__ import annotations

from typing import Sequence, Union, overload

import torch

from ..runtime.eager import eager_only
from ..errors import PlateError
from ..plates.tensor import Lineage, Plate, PlateTensor, new_plate_tensor
from .ownership import _Ownership
from .steps import _graph_task_id


class _DataPlates(_Ownership):
    """A :class:`~storch.graph.Graph`'s data plates (one of its parts, on the plates' identity)."""

    @overload
    def denote_independent(self, tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor: ...

    @overload
    def denote_independent(self, tensor: Sequence[torch.Tensor], dim: int, plate: str) -> tuple[PlateTensor, ...]: ...

    @eager_only
    def denote_independent(self, tensor: Union[torch.Tensor, Sequence[torch.Tensor]], dim: int,
                           plate: str) -> Union[PlateTensor, tuple[PlateTensor, ...]]:
        """Make ``dim`` of ``tensor`` an independent data plate of this graph: :func:`storch.denote_independent`."""
        with self._guard:
            if isinstance(tensor, (tuple, list)):
                return self._denote_several(tensor, dim, plate)
            return self._denote_independent(tensor, dim, plate)

    def _denote_independent(self, tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor:
        if _graph_task_id() != -1:  # (one C call: -1 outside a backward pass)
            raise PlateError(_denote_in_backward_message(plate))
        if not isinstance(tensor, torch.Tensor):
            raise PlateError(f"denote_independent needs a tensor, got {type(tensor).__name__}")
        if type(dim) is not int and (isinstance(dim, bool) or not isinstance(dim, int)):  # (an int: one call)
            raise PlateError(f"denote_independent: dim must be an int, got {dim!r}")
        if (type(plate) is not str and not isinstance(plate, str)) or not plate:
            raise PlateError(f"denote_independent: plate must be a non-empty string, got {plate!r}")
        if type(tensor) is PlateTensor:
            self.check_plates(tensor.plates, "the tensor passed to denote_independent")
            n = len(tensor.plates)
            k = tensor.tensor.dim() - n  # per-sample dims: `dim` counts among these only
            if k == 0:
                raise PlateError(_no_dim_message(f"a plate tensor of per-sample shape () (plates {tensor.plate_names})"))
            if not -k <= dim < k:
                raise PlateError(
                    f"dim {dim} is out of range for a plate tensor of per-sample shape {tuple(tensor.shape)} "
                    f"(plates {tensor.plate_names}); dim counts the per-sample dims only, in [{-k}, {k - 1}]")
            d = n + (dim if dim >= 0 else k + dim)
            raw, parents = tensor.tensor.movedim(d, 0), tensor.plates
        else:
            k = tensor.dim()
            if k == 0:
                raise PlateError(_no_dim_message("a 0-d tensor (shape ())"))
            if not -k <= dim < k:
                raise PlateError(f"dim {dim} is out of range for a tensor of shape {tuple(tensor.shape)}; "
                                 f"use a dim in [{-k}, {k - 1}]")
            # dim 0 (the usual batch dim) is already first: the tensor itself, no view (one
            # autograd node fewer, as by hand)
            raw, parents = (tensor if dim == 0 or dim == -k else tensor.movedim(dim, 0)), ()
        if raw.shape[0] == 0:
            from ..distributed.ranks import _announce_no_costs

            # under torch.distributed: every rank raises where the others are in storch's collectives
            others = _announce_no_costs()
            skip = ("Skip empty batches before the step" if others is None else
                    "Under torch.distributed, skipping the step on one rank hangs the others (in DDP's gradient "
                    "allreduce and the estimators' updates): give every rank data, with "
                    "DistributedSampler(drop_last=True) or by padding the shard"
                    + (f" (the ranks ran: {others}; every rank raised)" if others else ""))
            raise PlateError(
                f"denote_independent: plate {plate!r} would hold 0 data points (dim {dim} of a tensor of shape "
                f"{tuple(tensor.shape)} has size 0); the surrogate averages over the data points, and a mean over "
                f"none is undefined (NaN). {skip}; where the batch is split into "
                "sub-batches (labelled and unlabelled data points), skip that sub-batch's denote_independent and "
                "its costs (`if x_lab.shape[0] > 0:`), not the whole step")
        p = Plate(plate, raw.shape[0], True, 0, Lineage())
        if plate in self.plates:  # (claim_plate inline)
            if parents or not self._ends_evaluation(plate):
                raise PlateError(self._reused_name(plate, p))
        self.plates[plate] = p
        return new_plate_tensor(raw, (p,) + parents)

    def _denote_several(self, tensors, dim: int, plate: str):
        """Several tensors (inputs and targets) on ONE data plate: entry i of each belongs together."""
        if not tensors:
            raise PlateError("denote_independent got an empty sequence of tensors")
        sizes = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise PlateError(
                    f"denote_independent needs a tensor or a tuple of tensors (inputs and targets on one "
                    f"data plate), got a {type(tensors).__name__} holding a {type(t).__name__}; convert it "
                    "with torch.as_tensor first")
            k = t.dim()  # per-sample rank for a PlateTensor
            if k == 0:
                raise PlateError(_no_dim_message(f"a 0-d tensor (shape ()) in the {type(tensors).__name__}"))
            if not -k <= dim < k:
                raise PlateError(f"dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")
            sizes.append(t.shape[dim])
        if len(set(sizes)) != 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise PlateError(
                f"the tensors put on data plate {plate!r} have sizes {sizes} along dim {dim} (shapes {shapes}); "
                "each data point needs one entry in every tensor (inputs and targets must have the same "
                "number of rows)"
            )
        first = self._denote_independent(tensors[0], dim, plate)
        p = first.plates[0]
        out = [first]
        for t in tensors[1:]:
            if type(t) is PlateTensor:
                self.check_plates(t.plates, "a tensor passed to denote_independent")
                n = len(t.plates)
                d = dim + n if dim >= 0 else t.tensor.dim() + dim
                if any(q.name == plate for q in t.plates):
                    raise PlateError(f"a tensor passed to denote_independent already has plate {plate!r}")
                out.append(PlateTensor._wrap(t.tensor.movedim(d, 0), (p,) + t.plates))
            else:
                out.append(PlateTensor._wrap(t.movedim(dim, 0), (p,)))
        return type(tensors)(out) if type(tensors) in (tuple, list) else tuple(out)


def _no_dim_message(what: str) -> str:
    return (
        f"denote_independent got {what}: it has no dim to denote as independent (a data plate indexes the data "
        "points along a dim). For one data point, unsqueeze it (tensor.unsqueeze(0): a data plate of size 1); a "
        "value shared by all data points (a scalar hyperparameter, a total) is not denoted: use it as it is")


def _denote_in_backward_message(plate) -> str:
    return (
        f"storch.denote_independent was called during a backward pass (plate {plate!r}). "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) runs the checkpointed function again during "
        "backward to recompute what it saved, and the data plate it declared in the forward pass is already in the "
        "graph. Declare the data plate before the checkpoint and pass the plate tensor in "
        "(`xs = storch.denote_independent(x, 0, 'data'); h = checkpoint(enc, xs, use_reentrant=False)`); the same "
        "holds for storch.denote_independent called from a tensor hook or a custom Function's backward")
