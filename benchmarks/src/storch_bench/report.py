"""Reports: the header (date, machine), tables (terminal, Markdown, CSV) and the comparison plot.

Every subcommand module writes its report with these; none imports the CLI (``storch_bench.cli``).
"""

from __future__ import annotations

import csv
import datetime
import math
import platform
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["header", "machine", "fmt", "markdown_table", "text_table", "write_csv", "plot_vae"]


def machine() -> str:
    """The CPU, torch threads and versions, for the header of a report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}"


def header(title: str) -> str:
    """A report's title line with the date and the machine it ran on."""
    return f"{title}\n\nRun {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()}.\n"


def fmt(v, digits: int = 2) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
            return f"{v:.{max(digits, 1)}e}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    cells = [list(header)] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    out = []
    for j, r in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """CSV with floats written by ``repr`` (exact, so identical runs give identical files)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([repr(c) if isinstance(c, float) else c for c in r])


def plot_vae(results, path: Path) -> None:
    """Validation -ELBO curves per model and a bar chart of the encoder gradient's variance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r.model for r in results}, key=lambda m: ("bernoulli", "categorical").index(m)
                    if m in ("bernoulli", "categorical") else 9)
    if not models:
        return
    fig, axes = plt.subplots(2, len(models), figsize=(8.5 * len(models), 8.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    labels = sorted({r.label for r in results})
    color = {lab: cmap(i % 10) for i, lab in enumerate(labels)}
    style = {lab: ("-", "--", ":", "-.")[(i // 10) % 4] for i, lab in enumerate(labels)}
    for j, model in enumerate(models):
        rs = [r for r in results if r.model == model and r.valid_curve]
        ax = axes[0][j]
        finite = []
        for r in rs:
            epochs = range(len(r.valid_curve))
            ax.plot(epochs, r.valid_curve, color=color[r.label], ls=style[r.label], label=r.label)
            finite += [v for v in r.valid_curve[1:] if math.isfinite(v)]
        if finite:  # the first epochs of slow estimators would squash the rest of the plot
            lo, hi = min(finite), sorted(finite)[int(0.9 * (len(finite) - 1))]
            ax.set_ylim(lo - 0.05 * (hi - lo + 1), hi + 0.1 * (hi - lo + 1))
        ax.set_title(f"{model} latents: validation -ELBO")
        ax.set_xlabel("epoch")
        ax.set_ylabel("-ELBO (nats)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax = axes[1][j]
        rs = sorted([r for r in rs if math.isfinite(r.variance) and r.variance > 0], key=lambda r: r.variance)
        ax.barh([r.label for r in rs], [r.variance for r in rs], color=[color[r.label] for r in rs])
        ax.set_xscale("log")
        ax.set_title(f"{model}: variance of the encoder gradient (mean over checkpoints)")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
