"""Accuracy against MACs and against BOPs, one point per model."""
from __future__ import annotations

from pathlib import Path


def plot_accuracy_vs_cost(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "macs", "MACs (M)"), (axes[1], "bops", "BOPs (G)")):
        scale = 1e-6 if key == "macs" else 1e-9
        for row in rows:
            if row.get("top1") is None:
                continue
            ax.scatter(row[key] * scale, row["top1"], s=40)
            ax.annotate(row["name"], (row[key] * scale, row["top1"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test top-1 (%)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
