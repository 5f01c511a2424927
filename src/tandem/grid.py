"""`tandem grid`: the mutual-learning paper's table, pruners x quantizers (methods.md §1.1).

Each pair (cell) is one run folder DIR/<pruner>-<quantizer>/ in which `mutual` runs. The
controls (`independent`: each peer trained alone) run once per pruner and once per quantizer,
not in every cell: the independent pruned peer depends only on the pruner and the independent
quantized peer only on the quantizer (same baseline, data order and seed; nothing couples the
two in the independent stage; tests/test_seeds.py checks it), so the cells on a diagonal,
(pruner k mod P, quantizer k mod Q) for k < max(P, Q), run `independent` too, on the same
RunContext as `mutual`, so both start from the same peers. A 3 x 3 grid trains 3 controls, not 9. All cells share one pretrained baseline, trained once in DIR/baseline (or the recipe's
`model.checkpoint`). Finished cells (results.json present) are skipped; an interrupted cell
resumes from its checkpoints. At the end: DIR/grid.json, DIR/grid.md and DIR/grid.png.

With `--seeds 0 1 2` (`run_grid_seeds`) each seed is a whole grid in DIR/seed<N>/ (its own
baseline too), and DIR/summary.{json,md,png} hold the statistics over seeds (tandem/summary.py).
Grid rows are named `<pruner>-<quantizer>/mutual/<peer>` there, and the controls are counted
once: the independent quantized peer is the same network for every pruner (it depends only on
the quantizer: same baseline, quantizer, data order and seed, and nothing couples it to P in the
independent stage) and the independent pruned peer depends only on the pruner, so the summary
holds one `independent/pruned[<pruner>]` per pruner and one `independent/quantized[<quantizer>]`
per quantizer, each taken from one cell, and pairs every mutual row with its control in the same
seed (the cells that train them: `control_cells`).
"""
from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from .files import atomic_write
from .errors import TandemError
from .summary import fmt as _f

DEFAULT_PRUNERS = ("l1", "fpgm", "hrank")
DEFAULT_QUANTIZERS = ("dorefa", "pact", "lsq")


def check_names(names: list[str], allowed: list[str], what: str) -> list[str]:
    """The names as given, or one TandemError line naming the bad one and what is allowed."""
    if not names:
        raise TandemError(f"--{what}: give at least one name; allowed: {', '.join(allowed)}")
    for n in names:
        if n not in allowed:
            raise TandemError(f"--{what}: unknown name {n!r}; allowed: {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_list(text: str | None, default) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()] if text is not None else list(default)


def _schedule(recipe, pruner: str) -> str:
    """The recipe's prune.schedule, except that soft applies only to criteria defined with it
    (``Criterion.soft``: FPGM and SFP's L2 norm): L1 (Li et al.), HRank and the others are
    defined one-shot and stay one-shot."""
    from .prune import criterion_class
    schedule = recipe.prune.schedule if recipe.prune else "one_shot"
    return "one_shot" if schedule == "soft" and not criterion_class(pruner).soft else schedule


def run_folder(path: Path, recipe, log=print, what: str = "grid") -> dict:
    """Run (or resume) one folder; a finished one (results.json) is read, not run again
    (grid cells, and the seed folders of `tandem run --seeds`)."""
    from .recipes import same_recipe
    from .runner import run

    saved = path / "recipe.yaml"
    if saved.exists() and not same_recipe(saved, recipe):
        raise TandemError(f"{what}: {path} was run with a different recipe (changed overrides or file); "
                          f"use another --out, or the same recipe and overrides to resume")
    done = path / "results.json"
    if done.exists():
        log(f"{what}: {path.name} is finished already; skipped")
        return json.loads(done.read_text())
    resume = path.exists() and any(path.iterdir())
    if resume:
        log(f"{what}: {path.name} was interrupted; resuming it")
    return run(recipe, path, resume=resume)


def control_cells(pruners: list[str], quantizers: list[str]) -> set[tuple[str, str]]:
    """The cells that also run `independent`: every pruner and every quantizer once."""
    n = max(len(pruners), len(quantizers))
    return {(pruners[k % len(pruners)], quantizers[k % len(quantizers)]) for k in range(n)}


def _peer(rows: dict, peer: str, control: dict | None) -> dict:
    m, i = rows.get(f"mutual/{peer}"), control
    out = {"mutual_top1": m and m["top1"], "independent_top1": i and i["top1"]}
    out["gain"] = (out["mutual_top1"] - out["independent_top1"]) if m and i else None
    src = m or i or {}
    out.update({k: src.get(k) for k in ("params", "macs", "bops", "bytes", "w_bits", "a_bits")})
    return out


def default_grid_dir(recipe) -> Path:
    return Path("runs") / f"grid-{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_grid(recipe_path: str | None = None, pruners=DEFAULT_PRUNERS, quantizers=DEFAULT_QUANTIZERS,
             out: str | Path | None = None, overrides: list[str] = (), progress: bool = True) -> dict:
    """Run every pruner x quantizer cell; returns the grid summary (also DIR/grid.json)."""
    from .prune import list_criteria
    from .quant import list_quantizers
    from .recipes import load_recipe

    pruners = check_names(list(pruners), list_criteria(), "pruners")
    quantizers = check_names(list(quantizers), list_quantizers(), "quantizers")
    overrides = list(overrides)
    recipe = load_recipe(recipe_path, overrides)   # validates before anything is written
    out = Path(out) if out else default_grid_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: tqdm.write(msg, file=sys.stderr)   # noqa: E731  (beside the bar, not in the table)

    checkpoint = recipe.model.checkpoint
    ms = recipe.mutual
    scratch = ms is not None and ms.init == "scratch" and ms.kd_weight == 0   # no pretrained model used
    if not checkpoint and not scratch:
        from .methods import SECTIONS   # the baseline reads none of the methods' sections
        base = load_recipe(recipe_path, [o for o in overrides if o.split("=")[0].split(".")[0] not in SECTIONS]
                           + ["method=baseline"])
        run_folder(out / "baseline", base, log=log)
        checkpoint = str((out / "baseline" / "models" / "baseline.safetensors").resolve())

    cells, controls = [(p, q) for p in pruners for q in quantizers], control_cells(pruners, quantizers)
    done, base_row = {}, None
    bar = progress and sys.stderr.isatty()   # a log file gets each cell's own lines, not the bar's codes
    for p, q in tqdm(cells, desc="grid", unit="cell", disable=not bar, dynamic_ncols=True):
        methods = "[independent,mutual]" if (p, q) in controls else "[mutual]"
        cell = load_recipe(recipe_path, overrides + [
            f"method={methods}", f"prune.criterion={p}", f"prune.schedule={_schedule(recipe, p)}",
            f"quant.method={q}", *([f"model.checkpoint={checkpoint}"] if checkpoint else [])])
        cell.name = f"{recipe.name}-{p}-{q}"
        results = run_folder(out / f"{p}-{q}", cell, log=log)
        done[p, q] = (cell, results)
        base_row = base_row or next((r for r in results["models"] if r["name"] == "baseline"), None)
    alone = {}   # ("pruned", pruner) / ("quantized", quantizer) -> the control row
    for (p, q), (_, results) in done.items():
        for r in results["models"]:
            if r["name"] == "independent/pruned":
                alone["pruned", p] = r
            elif r["name"] == "independent/quantized":
                alone["quantized", q] = r
    pairs = []
    for (p, q), (cell, results) in done.items():
        rows = {r["name"]: r for r in results["models"]}
        pairs.append({"pruner": p, "quantizer": q, "schedule": cell.prune.schedule, "folder": f"{p}-{q}",
                      "pruned": _peer(rows, "pruned", alone.get(("pruned", p))),
                      "quantized": _peer(rows, "quantized", alone.get(("quantized", q))),
                      "wall_time_s": results.get("wall_time_s")})

    summary = {"recipe": recipe.model_dump(mode="json"), "protocol": recipe.protocol, "checkpoint": checkpoint,
               "pruners": pruners, "quantizers": quantizers,
               "baseline": base_row and {k: base_row[k] for k in ("top1", "params", "macs", "bops", "bytes")},
               "pairs": pairs}
    atomic_write(out / "grid.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    atomic_write(out / "grid.md", lambda tmp: Path(tmp).write_text(grid_markdown(summary)))
    plot_grid(summary, out / "grid.png")
    return summary


def run_grid_seeds(recipe_path: str | None, pruners, quantizers, seeds: list[int], out: str | Path | None = None,
                   overrides: list[str] = (), progress: bool = True) -> dict:
    """One whole grid per seed in DIR/seed<N>/ (run_grid: finished cells are read, interrupted
    ones resume), then the statistics over seeds in DIR/summary.{json,md,png}; returns the summary."""
    from .recipes import load_recipe
    from .summary import grid_rows, summarize, write_summary

    overrides = list(overrides)
    recipe = load_recipe(recipe_path, overrides)   # validates before anything is written
    out = Path(out) if out else default_grid_dir(recipe)
    if (out / "grid.json").exists():
        raise TandemError(f"grid: {out} holds a grid run without --seeds; choose another --out")
    per_seed = []
    for seed in seeds:
        folder = out / f"seed{seed}"
        summary = run_grid(recipe_path, pruners, quantizers, out=folder, overrides=overrides + [f"seed={seed}"],
                           progress=progress)
        cells = [(c["pruner"], c["quantizer"], json.loads((folder / c["folder"] / "results.json").read_text())["models"])
                 for c in summary["pairs"]]
        per_seed.append(grid_rows(cells))
    result = summarize(seeds, per_seed, command="grid", recipe=recipe.model_dump(mode="json"),
                       pruners=summary["pruners"], quantizers=summary["quantizers"])
    write_summary(out, result)
    return result


def grid_markdown(summary: dict) -> str:
    r = summary["recipe"]
    lines = [f"# grid: {r['name']}", "",
             f"model `{r['model']['name']}`, dataset `{r['dataset']['name']}`, protocol `{summary['protocol']}`, "
             f"seed {r['seed']}; P = pruned peer, Q = quantized peer; test top-1 %, gain = mutual - independent "
             f"(points).", ""]
    if summary.get("baseline"):
        b = summary["baseline"]
        lines += [f"baseline (full precision): top-1 {_f(b['top1'])}, MACs {_f(b['macs'] * 1e-6, '{:.3f}')} M, "
                  f"BOPs {_f(b['bops'] * 1e-9, '{:.3f}')} G", ""]
    lines += ["| pruner | quantizer | P mutual | P independent | P gain | Q mutual | Q independent | Q gain "
              "| P MACs (M) | Q BOPs (G) |", "|" + "---|" * 10]
    for c in summary["pairs"]:
        P, Q = c["pruned"], c["quantized"]
        lines.append(f"| {c['pruner']} ({c['schedule']}) | {c['quantizer']} | {_f(P['mutual_top1'])} | "
                     f"{_f(P['independent_top1'])} | {_f(P['gain'], '{:+.2f}')} | {_f(Q['mutual_top1'])} | "
                     f"{_f(Q['independent_top1'])} | {_f(Q['gain'], '{:+.2f}')} | "
                     f"{_f(P['macs'] and P['macs'] * 1e-6, '{:.3f}')} | "
                     f"{_f(Q['bops'] and Q['bops'] * 1e-9, '{:.3f}')} |")
    lines += ["", "![gains](grid.png)", ""]
    return "\n".join(lines)


def plot_grid(summary: dict, path: Path) -> None:
    """Two heat maps (P and Q): mutual's top-1 gain over independent per pruner x quantizer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pr, qu = summary["pruners"], summary["quantizers"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(qu), 1.5 + 0.9 * len(pr)), constrained_layout=True)
    for ax, peer, title in ((axes[0], "pruned", "P (pruned)"), (axes[1], "quantized", "Q (quantized)")):
        gain = np.full((len(pr), len(qu)), np.nan)
        for c in summary["pairs"]:
            g = c[peer]["gain"]
            gain[pr.index(c["pruner"]), qu.index(c["quantizer"])] = np.nan if g is None else g
        lim = max(1.0, float(np.nanmax(np.abs(gain))) if np.isfinite(gain).any() else 1.0)
        im = ax.imshow(gain, cmap="RdBu", vmin=-lim, vmax=lim)
        for (i, j), g in np.ndenumerate(gain):
            m = next((c[peer]["mutual_top1"] for c in summary["pairs"]
                      if c["pruner"] == pr[i] and c["quantizer"] == qu[j]), None)
            ax.text(j, i, "-" if not np.isfinite(g) else f"{g:+.2f}\n({m:.1f}%)", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(qu)), qu)
        ax.set_yticks(range(len(pr)), pr)
        ax.set_xlabel("quantizer")
        ax.set_ylabel("pruner")
        ax.set_title(f"{title}\nmutual - independent (pp)", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
