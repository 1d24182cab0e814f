"""Loss curves from a ``train_log.jsonl`` to a PNG, because people look at curves rather than numbers."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError
from ..files import staged_file


PREFERENCE_CURVES = ("rewards/margins", "rewards/accuracies", "accuracy", "margin", "objective/scores",
                     "objective/kl", "objective/rlhf_reward")


def read_log(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """The train lines (with ``loss``) and the eval lines (with ``eval_loss``) of a log."""
    train, evals = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if "loss" in record:
            train.append(record)
        if "eval_loss" in record:
            evals.append(record)
    return train, evals


def plot_log(log_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw train and eval loss against the step (and the learning rate beneath), written atomically."""
    import matplotlib  # optional (the report extra): only a run that draws its curves needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_log(log_path)
    if not train and not evals:
        raise UsageError(f"{log_path}: no loss lines to plot")
    # preference tuning's curves (reward, dpo, ppo) get a panel of their own
    extra = [k for k in PREFERENCE_CURVES if any(k in r for r in train)]
    rows = 3 if extra else 2
    fig, axes = plt.subplots(rows, 1, figsize=(8, 6 + 2 * (rows - 2)), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 1][:rows] if extra else [3, 1]})
    ax, ax_lr = axes[0], axes[-1]
    if extra:
        for k in extra:
            points = [(r["step"], r[k]) for r in train if k in r]
            axes[1].plot(*zip(*points), label=k, lw=1)
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize="small")
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", lw=1.5)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or str(Path(log_path).parent.name or "training"))
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    with staged_file(out) as partial:
        fig.savefig(partial, dpi=100, format="png")
    plt.close(fig)
    return out
