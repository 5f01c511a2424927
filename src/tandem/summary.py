"""Statistics over seeds: `tandem run|grid --seeds 0 1 2` end with summary.json, summary.md and
summary.png in the folder that holds the seed folders (seed0/, seed1/, ...).

One seed says little at CPU scale (a few points of test top-1 move with the seed), so every
row gets its mean over seeds with a 95% interval, mean +- t_{0.975,n-1} * s / sqrt(n) (Student t,
s the sample standard deviation): with 3 seeds t is 4.30, and the interval is as wide as that
honestly makes it. A method row that names a `control` in the same seed folder is also compared
with it seed by seed (paired): both share the seed's baseline, data order and budget, so the
spread from seed to seed that both share drops out of the difference.

Pure functions on lists of results rows (results.json's "models"), plus the writers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .files import atomic_write


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def t95(n: int) -> float | None:
    """t_{0.975,n-1}, the two-sided 95% Student t quantile for n values (None for n < 2)."""
    if n < 2:
        return None
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1))


def describe(values: list[float]) -> dict:
    """n, mean, sample std (ddof 1) and the 95% half-width t95(n) * std / sqrt(n); std and
    half-width are None for one value (one seed shows no spread)."""
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "std": std, "ci95": t95(n) * std / math.sqrt(n)}


def _mean(values) -> float | None:
    values = [v for v in values if _num(v)]
    return sum(values) / len(values) if values else None


def row_stats(seeds: list[int], per_seed: list[list[dict]]) -> list[dict]:
    """One entry per row name (first-seen order): test top-1 over the seeds that have it."""
    names = list(dict.fromkeys(r["name"] for rows in per_seed for r in rows))
    out = []
    for name in names:
        found = [(s, r) for s, rows in zip(seeds, per_seed) for r in rows
                 if r["name"] == name and _num(r.get("top1"))]
        d = describe([r["top1"] for _, r in found])
        out.append({"name": name, "n": d["n"], "seeds": [s for s, _ in found], "top1": [r["top1"] for _, r in found],
                    "mean_top1": d["mean"], "std_top1": d["std"], "ci95_top1": d["ci95"],
                    "mean_macs": _mean(r.get("macs") for _, r in found),
                    "mean_bops": _mean(r.get("bops") for _, r in found)})
    return out


def controls_of(row: dict) -> list[str]:
    """The rows a row is to be compared with: its `control`, one name or a list."""
    c = row.get("control")
    return [] if not c else [c] if isinstance(c, str) else list(c)


def paired_stats(seeds: list[int], per_seed: list[list[dict]]) -> list[dict]:
    """One entry per (method row, each of its controls): test top-1 of method minus control in each
    seed where both are present, in the order of `seeds`; `wins` counts the seeds where the
    method is ahead."""
    pairs = list(dict.fromkeys((r["name"], c) for rows in per_seed for r in rows for c in controls_of(r)))
    out = []
    for method, control in pairs:
        used, diffs = [], []
        for s, rows in zip(seeds, per_seed):
            by = {r["name"]: r for r in rows}
            m, c = by.get(method), by.get(control)
            if m and c and control in controls_of(m) and _num(m.get("top1")) and _num(c.get("top1")):
                used.append(s)
                diffs.append(m["top1"] - c["top1"])
        if not diffs:
            continue
        d = describe(diffs)
        out.append({"method": method, "control": control, "n": d["n"], "seeds": used, "diffs": diffs,
                    "mean_diff": d["mean"], "ci95_diff": d["ci95"], "wins": sum(x > 0 for x in diffs)})
    return out


def summarize(seeds: list[int], per_seed: list[list[dict]], **info) -> dict:
    """summary.json's content: `info` (command, recipe, ...), the seeds, row and paired statistics."""
    return {**info, "seeds": list(seeds), "rows": row_stats(seeds, per_seed),
            "paired": paired_stats(seeds, per_seed)}


def grid_rows(cells: list[tuple[str, str, list[dict]]]) -> list[dict]:
    """One seed's grid (cells of (pruner, quantizer, results rows)) as one list of rows.

    Mutual rows are named `<pruner>-<quantizer>/mutual/<peer>`. Controls are counted once:
    the independent pruned peer depends only on the pruner and the quantized one only on the
    quantizer, so they become `independent/pruned[<pruner>]` and
    `independent/quantized[<quantizer>]`, taken from the cell that trained them, and each
    mutual row names the one for its pruner or quantizer as its control."""
    base, controls, mutual = [], {"pruned": {}, "quantized": {}}, {"pruned": [], "quantized": []}
    for p, q, rows in cells:
        by = {r["name"]: r for r in rows}
        if not base and "baseline" in by:
            base.append(_slim(by["baseline"], "baseline"))
        for peer, key in (("pruned", p), ("quantized", q)):
            name = f"independent/{peer}[{key}]"
            ind = by.get(f"independent/{peer}")
            if ind is not None:
                controls[peer].setdefault(name, _slim(ind, name))
            if f"mutual/{peer}" in by:
                mutual[peer].append(_slim(by[f"mutual/{peer}"], f"{p}-{q}/mutual/{peer}", name))
    for peer in mutual:   # a control may come from a later cell (grid.control_cells)
        for row in mutual[peer]:
            if row["control"] not in controls[peer]:
                del row["control"]
    return [*base, *controls["pruned"].values(), *mutual["pruned"], *controls["quantized"].values(),
            *mutual["quantized"]]


def _slim(row: dict, name: str, control: str | None = None) -> dict:
    out = {"name": name, **{k: row.get(k) for k in ("top1", "val_top1", "macs", "bops", "w_bits", "a_bits")}}
    if control:
        out["control"] = control
    return out


# ---- writers ------------------------------------------------------------------------------
def fmt(v, spec="{:.2f}") -> str:
    """A number as text, "-" when missing or not finite (tables of grid.md and summary.md)."""
    return "-" if not _num(v) else spec.format(v)


WHAT_THE_INTERVAL_MEANS = (
    "The 95% interval is mean +- t * s / sqrt(n), with s the sample standard deviation over the n seeds "
    "(n - 1 in its denominator) and t Student's 0.975 quantile with n - 1 degrees of freedom (12.71 for 2 "
    "seeds, 4.30 for 3, 2.78 for 5): intervals built this way hold the mean over all seeds 95% of the time, "
    "as far as the seeds' spread is normal. One seed gives no interval.")
WHAT_PAIRED_MEANS = (
    "Each difference is the method's test top-1 minus its control's in the same seed folder (same baseline, "
    "data order, budget and seed), in points; the interval is the same t interval over the n differences. "
    "A paired interval that contains 0 does not show a difference between method and control at this "
    "number of seeds (nor does it show that there is none); wins counts the seeds where the method is ahead.")
WHAT_GRID_CONTROLS_ARE = (
    "Grid rows are named `<pruner>-<quantizer>/mutual/<peer>`. Controls are counted once: the independent "
    "pruned peer depends only on the pruner and the independent quantized peer only on the quantizer, so "
    "each appears once per seed, as `independent/pruned[<pruner>]` and `independent/quantized[<quantizer>]` "
    "(the grid trains each once, in the cells on a diagonal), and every mutual row is paired, seed by seed, "
    "with the control of its own pruner or quantizer.")


def summary_markdown(s: dict) -> str:
    r = s.get("recipe") or {}
    seeds = ", ".join(str(x) for x in s["seeds"])
    lines = [f"# {s.get('command', 'run')} over seeds: {r.get('name', '')}", "",
             f"model `{r.get('model', {}).get('name')}`, dataset `{r.get('dataset', {}).get('name')}`, "
             f"protocol `{r.get('protocol')}`, seeds {seeds} (one folder each: seed<N>/); test top-1 %.", "",
             WHAT_THE_INTERVAL_MEANS, ""]
    if s.get("command") == "grid":
        lines += [WHAT_GRID_CONTROLS_ARE, ""]
    lines += ["| model | n | test top-1 mean | std | 95% CI +- | per seed | MACs (M) | BOPs (G) |", "|" + "---|" * 8]
    for row in s["rows"]:
        lines.append(f"| {row['name']} | {row['n']} | {fmt(row['mean_top1'])} | {fmt(row['std_top1'])} | "
                     f"{fmt(row['ci95_top1'])} | {', '.join(fmt(v) for v in row['top1'])} | "
                     f"{fmt(row['mean_macs'] and row['mean_macs'] * 1e-6, '{:.3f}')} | "
                     f"{fmt(row['mean_bops'] and row['mean_bops'] * 1e-9, '{:.3f}')} |")
    lines += ["", "## Paired: method - control, seed by seed", "", WHAT_PAIRED_MEANS, ""]
    if s["paired"]:
        lines += ["| method | control | n | mean diff (pp) | 95% CI (pp) | diffs per seed | wins |", "|" + "---|" * 7]
        for p in s["paired"]:
            ci = p["ci95_diff"]
            interval = "-" if ci is None else f"[{p['mean_diff'] - ci:+.2f}, {p['mean_diff'] + ci:+.2f}]"
            lines.append(f"| {p['method']} | {p['control']} | {p['n']} | {fmt(p['mean_diff'], '{:+.2f}')} | "
                         f"{interval} | {', '.join(fmt(d, '{:+.2f}') for d in p['diffs'])} | {p['wins']}/{p['n']} |")
    else:
        lines.append("No row names a control in its run.")
    lines += ["", "![test top-1 over seeds](summary.png)", ""]
    return "\n".join(lines)


def plot_summary(s: dict, path: Path) -> None:
    """Test top-1 per row: mean with its 95% interval (bar), each seed's value (dots)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in s["rows"] if r["n"]]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * max(1, len(rows))), constrained_layout=True)
    for i, r in enumerate(rows):
        y = len(rows) - 1 - i   # first row on top
        ax.errorbar(r["mean_top1"], y, xerr=r["ci95_top1"] or 0, fmt="o", color="C0", capsize=3)
        ax.plot(r["top1"], [y] * len(r["top1"]), ".", color="0.55", zorder=1)
    ax.set_yticks(range(len(rows)), [r["name"] for r in reversed(rows)], fontsize=8)
    lo = min(min(r["top1"]) - (r["ci95_top1"] or 0) for r in rows) if rows else 0
    hi = max(max(r["top1"]) + (r["ci95_top1"] or 0) for r in rows) if rows else 100
    ax.set_xlim(max(0.0, lo - 2), min(100.0, hi + 2))   # an interval wider than 0-100 % runs off the axis
    ax.set_xlabel("test top-1 % (mean, 95% interval; dots: seeds)")
    ax.set_title(f"{s.get('command', 'run')} {(s.get('recipe') or {}).get('name', '')}: "
                 f"seeds {', '.join(str(x) for x in s['seeds'])}",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)


def write_summary(out_dir: Path, summary: dict) -> None:
    out_dir = Path(out_dir)
    atomic_write(out_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    atomic_write(out_dir / "summary.md", lambda tmp: Path(tmp).write_text(summary_markdown(summary)))
    plot_summary(summary, out_dir / "summary.png")
