"""The training curves PNG: loss, learning rate, and mAP / rank-1 per epoch.

matplotlib is optional (``pip install "reid-ms[train]"``): training does not need it, and cluster
images often lack it, so without it the PNG is skipped with one log line.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reid_ms.training.checkpoint import atomic_write

logger = logging.getLogger("reid_ms.training")

__all__ = ["plot_curves"]

_warned = False


def plot_curves(path: Path, history: Sequence[dict[str, Any]], title: str = "") -> bool:
    """Draw the curves of ``history`` (rows of ``metrics.jsonl``) to ``path``; ``False`` without matplotlib."""
    global _warned
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned:
            logger.info("matplotlib is not installed: %s is not drawn (pip install matplotlib); metrics.jsonl "
                        "holds the same numbers", path.name)
            _warned = True
        return False
    trained = [r for r in history if r.get("loss") is not None]
    evaluated = [r for r in history if r.get("mAP") is not None]
    # a Figure with its own canvas, not pyplot: no global backend or figure registry is touched
    # no evaluation yet (or none at all, as in CLIP-ReID's stage 1): no empty query / gallery panel
    panels = 3 if evaluated else 2
    fig = Figure(figsize=(4 * panels, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, panels))
    ax_loss, ax_lr = axes[:2]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker=".", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_lr.plot([r["epoch"] for r in trained], [r["lr"] for r in trained], marker=".", color="tab:green")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if evaluated:
        ax_map = axes[2]
        epochs = [r["epoch"] for r in evaluated]
        ax_map.plot(epochs, [100 * r["mAP"] for r in evaluated], marker="o", label="mAP")
        ax_map.plot(epochs, [100 * r["rank1"] for r in evaluated], marker="s", label="rank-1")
        ax_map.set(xlabel="epoch", ylabel="%", title="query / gallery", ylim=(0, 100))
        ax_map.legend(loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return True
