"""The generated part of ``docs/plates.md``: the plate dispatcher's table as Markdown.

``markdown()`` lists the nn layers and the functions they call, every registered entry of
``storch.plates.treatments.TABLE``, and the derived treatment of every public torch function.
``packages/storch-core/scripts/gen_plates_doc.py`` writes it into ``docs/plates.md``.
"""

from __future__ import annotations

import torch

from .treatments import TABLE, Treatment, _qualname, from_torch, treatment_of

__all__ = ["markdown", "LAYERS"]

_T = torch.Tensor


def _public_functions():
    import torch.nn.functional as F

    seen = set()
    out = []
    spaces = [(torch, "torch."), (F, "F."), (torch.special, "torch.special."), (torch.linalg, "torch.linalg."),
              (torch.fft, "torch.fft.")]
    for mod, prefix in spaces:
        names = getattr(mod, "__all__", None) or dir(mod)
        for n in sorted(names):
            if n.startswith("_"):
                continue
            f = getattr(mod, n, None)
            if f is None or isinstance(f, type) or not callable(f) or getattr(f, "__module__", "") == "typing":
                continue
            if mod is torch and (getattr(f, "__module__", "") or "").startswith(("torch.nn", "torch.special", "torch.linalg", "torch.fft")):
                continue
            key = (prefix + n, id(f))
            if key in seen:
                continue
            seen.add(key)
            out.append((prefix + n, f))
    for n in sorted(dir(_T)):
        if n.startswith("_") and n not in ("__getitem__", "__setitem__", "__matmul__"):
            continue
        f = getattr(_T, n, None)
        if f is None or not callable(f) or isinstance(f, type):
            continue
        out.append(("Tensor." + n, f))
    return out


LAYERS = [
    # (nn layer, the functions it calls on a plate tensor)
    ("Linear, Bilinear", ["F.linear", "F.bilinear"]),
    ("Conv1d/2d/3d, ConvTranspose1d/2d/3d", ["F.conv1d", "F.conv2d", "F.conv3d", "F.conv_transpose1d",
                                             "F.conv_transpose2d", "F.conv_transpose3d"]),
    ("MaxPool1d/2d/3d, AvgPool1d/2d/3d", ["F.max_pool1d", "F.max_pool2d", "F.max_pool3d",
                                          "F.avg_pool1d", "F.avg_pool2d", "F.avg_pool3d"]),
    ("AdaptiveAvgPool/AdaptiveMaxPool 1d/2d/3d", ["F.adaptive_avg_pool1d", "F.adaptive_avg_pool2d",
                                                   "F.adaptive_max_pool2d"]),
    ("RNN, LSTM, GRU", ["torch._VF.rnn_tanh", "torch._VF.lstm", "torch._VF.gru"]),
    ("RNNCell, LSTMCell, GRUCell", ["torch._VF.rnn_tanh_cell", "torch._VF.lstm_cell", "torch._VF.gru_cell"]),
    ("MultiheadAttention, TransformerEncoderLayer, TransformerDecoderLayer",
     ["F.multi_head_attention_forward", "F.scaled_dot_product_attention", "F.layer_norm"]),
    # (docs/plates.md's BatchNorm section: torch takes (N, C, ...), so one data point's (C,) fails in torch itself)
    ("BatchNorm1d/2d/3d (eval mode; a per-data-point `(C,)` input fails in torch, in eval mode too: give it a batch "
     "dim of one, `bn(x.unsqueeze(0)).squeeze(0)`, see [BatchNorm on plate tensors](#batchnorm-on-plate-tensors))",
     ["F.batch_norm"]),
    ("GroupNorm, InstanceNorm, LayerNorm", ["F.group_norm", "F.instance_norm", "F.layer_norm"]),
    ("Embedding, EmbeddingBag", ["F.embedding", "F.embedding_bag"]),
    ("Upsample (F.interpolate)", ["F.interpolate"]),
    ("Dropout, Dropout1d/2d/3d, AlphaDropout", ["F.dropout", "F.dropout1d", "F.dropout2d", "F.alpha_dropout"]),
    ("ReLU, Sigmoid, Tanh, GELU, ELU, SiLU, Softplus, ...", ["F.relu", "torch.sigmoid", "torch.tanh", "F.gelu",
                                                            "F.elu", "F.silu", "F.softplus"]),
    ("PReLU", ["F.prelu"]),
    ("Softmax, LogSoftmax", ["F.softmax", "F.log_softmax"]),
    ("Flatten, Unflatten", ["torch.flatten", "Tensor.unflatten"]),
    ("CrossEntropyLoss, NLLLoss, MSELoss, BCEWithLogitsLoss, ...", ["F.cross_entropy", "F.nll_loss", "F.mse_loss",
                                                                     "F.binary_cross_entropy_with_logits"]),
]


def _resolve(path: str):
    import torch.nn.functional as F

    head, _, name = path.rpartition(".")
    owner = {"F": F, "torch": torch, "Tensor": _T, "torch._VF": torch._VF, "torch.special": torch.special,
             "torch.linalg": torch.linalg}[head]
    return getattr(owner, name)


def _display(f) -> str:
    if getattr(f, "__name__", "") == "__get__" and hasattr(f, "__self__"):
        return f"Tensor.{f.__self__.__name__} (property)"
    return _qualname(f)


def markdown() -> str:
    """The generated part of ``docs/plates.md``: nn layers, registered functions, derived treatments."""
    lines = ["### nn layers", "", "| nn layer | functions it calls on plate tensors | treatment |", "|---|---|---|"]
    for layer, paths in LAYERS:
        kinds = sorted({treatment_of(_resolve(p)).treatment.value for p in paths})
        lines.append(f"| {layer} | " + ", ".join(f"`{p}`" for p in paths) + f" | {', '.join(kinds)} |")
    lines += ["", "### Registered functions", "",
              "Handlers, batch-first specs, refusals and explicit pointwise entries of the table "
              "(`storch.plates.treatments.TABLE`).", "",
              "| function | treatment | what happens |", "|---|---|---|"]
    rows = sorted({(_display(f), e.treatment.value, (e.note or "").replace("|", "/").replace("\n", " "))
                   for f, e in TABLE.items() if from_torch(f) or getattr(f, "__name__", "") == "__get__"})
    lines += [f"| `{n}` | {t} | {note} |" for n, t, note in rows]
    groups: dict = {t: [] for t in Treatment}
    for name, f in _public_functions():
        try:
            groups[treatment_of(f).treatment].append(name)
        except TypeError:  # unhashable
            continue
    lines += ["", "### Every public function, by treatment", "",
              "Derived for `torch.*`, `torch.nn.functional.*` (`F.`), `torch.special`, `torch.linalg`, "
              "`torch.fft` and `torch.Tensor` methods: pointwise from torch's `pointwise` operator tag "
              "(plus a curated list), the registered entries above, and `vmap` for everything else.", "",
              "| treatment | count |", "|---|---|"]
    lines += [f"| {t.value} | {len(v)} |" for t, v in groups.items()]
    for t, names in groups.items():
        if names:
            lines += ["", f"<details><summary>{t.value} ({len(names)})</summary>", "",
                      ", ".join(f"`{n}`" for n in names), "", "</details>"]
    return "\n".join(lines) + "\n"
