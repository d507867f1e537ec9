"""`plot_loss`: the training loss curve as a PNG (train.py writes it next to every checkpoint).

matplotlib is imported inside the function (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from utils import atomic_path


def plot_loss(history: dict[str, list], paths: Iterable[str | os.PathLike], title: str = "") -> None:
    """Save a PNG of train loss per optimizer step and eval loss per epoch to each path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = history.get("train", [])
    if train:
        steps, values = [s for s, _ in train], [v for _, v in train]
        ax.plot(steps, values, lw=0.6, alpha=0.35, label="train loss (per step)")
        # Length-grouped batches mix short and long samples step by step, so the raw curve jumps;
        # a moving average shows the trend.
        k = max(1, min(25, len(values) // 10))
        windows = [values[max(0, i - k + 1):i + 1] for i in range(len(values))]
        smooth = [sum(w) / len(w) for w in windows]
        ax.plot(steps, smooth, lw=1.6, label=f"train loss (mean of last {k} steps)")
    ev = history.get("eval", [])
    if ev:
        ax.plot([s for s, _ in ev], [v for _, v in ev], "o-", label="eval loss (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)
