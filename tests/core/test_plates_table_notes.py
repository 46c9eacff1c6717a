"""Every entry of the plate treatment table says what happens (docs/plates.md has no empty cell; issue 18)."""

import storch  # noqa: F401  (fills the table)
from storch.plates.table_doc import markdown
from storch.plates.treatments import TABLE, from_torch


def test_every_registered_entry_has_a_note():
    # torch's functions (what docs/plates.md lists); other tests register user functions of their own
    ours = {f: e for f, e in TABLE.items() if from_torch(f) or getattr(f, "__name__", "") == "__get__"}
    empty = sorted({getattr(f, "__qualname__", repr(f)) for f, e in ours.items() if not (e.note or "").strip()})
    assert not empty, f"handlers without a one-line docstring (or note=): {empty}"


def test_the_generated_table_has_no_empty_what_happens_cell():
    rows = [line for line in markdown().splitlines() if line.startswith("| `")]
    assert rows
    assert not [r for r in rows if r.rstrip().endswith("|  |")]


def test_the_batchnorm_row_says_a_per_data_point_input_fails_in_torch():
    # left by review: the generated row read "BatchNorm1d/2d/3d (eval mode)" only, while docs/plates.md's BatchNorm
    # section says a per-data-point (C,) input fails in torch even in eval mode
    (row,) = [line for line in markdown().splitlines() if line.startswith("| BatchNorm")]
    assert "`(C,)` input fails in torch, in eval mode too" in row and "`bn(x.unsqueeze(0)).squeeze(0)`" in row
    assert "(#batchnorm-on-plate-tensors)" in row


def test_the_table_names_torch_special_linalg_and_fft_functions_by_their_public_names():
    # found porting: the rows read `torch.special.special_logsumexp`, `torch.linalg.linalg_vector_norm` (torch's C
    # bindings carry the space as a prefix of __name__), names a user cannot call
    import torch

    from storch.plates.treatments import _qualname

    names = [line.split("`")[1] for line in markdown().splitlines() if line.startswith("| `torch.")]
    assert {"torch.special.logsumexp", "torch.special.softmax", "torch.linalg.vector_norm"} <= set(names), names
    assert not [n for n in names if n.startswith(("torch.special.special_", "torch.linalg.linalg_", "torch.fft.fft_"))]
    assert [_qualname(f) for f in (torch.special.logsumexp, torch.linalg.norm, torch.fft.fft)] == [
        "torch.special.logsumexp", "torch.linalg.norm", "torch.fft.fft"]
