"""`plot_loss`: the training loss curves as a PNG (train.py writes it next to every checkpoint):
train loss per record kind (smoothed) and eval loss per kind per epoch.

Example:
    python -c "from roleplay.plotting import plot_loss; plot_loss({'train': [(1, 2.0), (2, 1.5)]}, ['/tmp/l.png'])"

matplotlib is imported inside the function (Agg backend), so importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from utils import atomic_path


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over the last `k` values (fewer at the start)."""
    windows = [values[max(0, i - k + 1):i + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def group_series(entries: list, group: int) -> tuple[list[int], list[float]]:
    """(steps, losses) of one group from [(step, [loss per group or None])], skipping steps without it."""
    points = [(step, losses[group]) for step, losses in entries if group < len(losses) and losses[group] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss(history: dict[str, list], paths: Iterable[str | os.PathLike], title: str = "",
              groups: Sequence[str] = ()) -> None:
    """Save a PNG of the train loss per optimizer step and the eval loss per epoch to each path.

    With `groups` (the names of history's "train_groups"/"eval_groups" entries, e.g. utils.LOSS_GROUPS),
    each group gets its own smoothed train line and its own eval points: on the default data attribute
    answers sit near 0.1 and role replies near 5, and length-grouped batches hold one kind or the other,
    so one mixed curve would only jump between the two. The y axis is logarithmic when the curves span
    more than a factor of 20.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = history.get("train", [])
    values_seen: list[float] = []
    k = 1
    if train:
        steps, values = [s for s, _ in train], [v for _, v in train]
        k = max(1, min(25, len(values) // 10))
        values_seen += values
        ax.plot(steps, values, lw=0.6, alpha=0.15 if groups else 0.35, color="grey",
                label="train loss, all records (per step)")
        if not groups:  # without groups, the smoothed mixed curve is the best there is
            ax.plot(steps, smooth(values, k), lw=1.6, label=f"train loss (mean of last {k} steps)")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, name in enumerate(groups):
        steps, values = group_series(history.get("train_groups", []), g)
        if values:
            values_seen += values
            ax.plot(steps, smooth(values, k), lw=1.6, color=colors[g % len(colors)],
                    label=f"train loss, {name} (mean of last {k} steps)")
        steps, values = group_series(history.get("eval_groups", []), g)
        if values:
            values_seen += values
            ax.plot(steps, values, "o--", color=colors[g % len(colors)], label=f"eval loss, {name} (per epoch)")
    ev = history.get("eval", [])
    if ev:
        values_seen += [v for _, v in ev]
        ax.plot([s for s, _ in ev], [v for _, v in ev], "s-", color="black", ms=4, lw=0.8,
                label="eval loss, all records (per epoch)")
    positive = [v for v in values_seen if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    for p in paths:
        with atomic_path(p) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)
