"""Test top-1 against BOPs and against MACs, one point per model, with the Pareto front.

Colour and marker tell the method (the row name before the first '/'); the legend names every
row, so no free text is drawn next to points (it overlapped as soon as points were close). An
arrow runs from each row's control (results.json `control`) to the row: its gain over the control
at a glance.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..files import atomic_write

MARKERS = "osD^vP*Xph<>"
FILLS = ("full", "none", "left", "bottom", "right", "top")   # rows of one method differ by fill


def method_of(name: str) -> str:
    """'mutual/pruned' -> 'mutual', 'baseline' -> 'baseline'."""
    return name.split("/", 1)[0]


def pareto_front(points) -> list:
    """The points no other point beats: each is more accurate than every point of at most its cost.

    `points` are (cost, accuracy, ...) tuples (extra items ride along); the front comes back
    sorted by cost, so accuracy rises along it. Of equal points only the first is kept."""
    front, best = [], -math.inf
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def _si(value: float) -> str:
    """Plain tick text: 250k, 1.5M, 3G (no 10^x, no offset)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks between lo and hi (finer steps when the range is too short for two of them,
    powers of ten when it is long), at most 8 so the labels never collide."""
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [t for k in decades for m in mantissas if lo <= (t := float(f"{m}e{k}")) <= hi]
        if len(ticks) >= 2:
            break
    if len(ticks) < 2:   # narrower than 1..9 steps: the ends, to 2 significant digits
        ticks = [float(f"{lo:.2g}"), float(f"{hi:.2g}")]
        ticks = [t for t in ticks if lo <= t <= hi] or [lo, hi]
    if len(ticks) > 8:
        ticks = [t for t in ticks if math.isclose(10 ** round(math.log10(t)), t)]
        ticks = ticks[::math.ceil(len(ticks) / 8)]
    return ticks


def plot_accuracy_vs_cost(rows: list[dict], path: Path, title: str = "",
                          first: tuple[str, str] = ("bops", "BOPs")) -> None:
    """Test top-1 against cost: `first` (row key, label; BOPs, or measured latency with
    report.cost latency) and MACs, log scale, with each panel's Pareto front."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    methods = list(dict.fromkeys(method_of(r["name"]) for r in rows))
    colours = plt.get_cmap("tab10").colors
    style = {m: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}
    baseline = next((r for r in rows if r["name"] == "baseline" and r.get("top1") is not None), None)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for ax, key, label in ((axes[0], *first), (axes[1], "macs", "MACs")):
        shown = [r for r in rows if r.get("top1") is not None and (r.get(key) or 0) > 0]
        seen: dict[str, int] = {}
        for r in shown:
            m = method_of(r["name"])
            colour, marker = style[m]
            fill = FILLS[seen.get(m, 0) % len(FILLS)]
            seen[m] = seen.get(m, 0) + 1
            ax.plot([r[key]], [r["top1"]], linestyle="none", marker=marker, markersize=8, color=colour,
                    fillstyle=fill, markeredgewidth=1.5, label=r["name"])
        by_name, arrows = {r["name"]: r for r in shown}, False
        for r in shown:
            controls = r.get("control") or []
            for c in [controls] if isinstance(controls, str) else controls:
                if c in by_name:
                    ax.annotate("", xy=(r[key], r["top1"]), xytext=(by_name[c][key], by_name[c]["top1"]),
                                arrowprops=dict(arrowstyle="->", color=style[method_of(r["name"])][0], alpha=0.6,
                                                shrinkA=5, shrinkB=5))
                    arrows = True
        if arrows:
            ax.plot([], [], color="0.3", marker=r"$\rightarrow$", markersize=10, linestyle="none",
                    label="arrow: from a row's control to it")
        if baseline is not None:
            ax.axhline(baseline["top1"], color="0.4", linestyle="--", linewidth=1, label="baseline top-1")
        ax.set_xscale("log")
        if shown:
            lo, hi = min(r[key] for r in shown) / 1.6, max(r[key] for r in shown) * 1.6
            front = pareto_front([(r[key], r["top1"]) for r in shown])
            xs, ys = [p[0] for p in front] + [hi], [p[1] for p in front] + [front[-1][1]]
            ax.step(xs, ys, where="post", color="black", linewidth=1.2, alpha=0.6, zorder=0,
                    label="Pareto front (best top-1 at ≤ cost)")
            ax.set_xlim(lo, hi)
            ax.xaxis.set_major_locator(FixedLocator(_log_ticks(lo, hi)))
        else:
            ax.text(0.5, 0.5, "no test accuracy to plot", transform=ax.transAxes, ha="center")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(f"{label} (log scale)" if key.endswith(("_ms_1", "_ms_batch")) else
                      f"{label} per image (log scale)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(True, alpha=0.3)
    legend = {}   # a row missing from one panel (zero cost) still gets its entry
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False,
                   ncols=1 + len(handles) // 24)
    if title:
        fig.suptitle(title)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
