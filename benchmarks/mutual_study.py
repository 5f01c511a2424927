"""When does mutual learning help? Variants of the joint phase on one pair of a finished
`tandem grid --seeds` run, each paired seed by seed with the grid's own controls.

For every variant and seed, the pair's cell is run again with `method: mutual` and the variant's
overrides, from the grid seed's own baseline (model.checkpoint), so P and Q start exactly as
in the grid; the controls (each peer trained alone with the same budget) are the grid's
`independent/pruned[<pruner>]` and `independent/quantized[<quantizer>]` of that seed: a variant
that changes only the mutual objective or its update order needs no new control. A variant that
changes the budget or the start (OWN_CONTROL: mutual.epochs, mutual.init) runs
`method: [independent, mutual]` with its overrides, and each of its peers is paired with its own
control `<variant>/independent/<peer>`.

Usage: python benchmarks/mutual_study.py --grid runs/bench-mutual-grid --pair l1 lsq \
           --variants kl0.3 kd0.5 [--tag l1-lsq]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

from tandem.recipes import load_recipe  # noqa: E402
from tandem.grid import run_folder  # noqa: E402
from tandem.summary import grid_rows, summarize, summary_markdown  # noqa: E402

VARIANTS = {
    "kl1": [],                                            # the grid's own setting, re-run as a check
    "kl0.3": ["mutual.kl_weight=0.3"],
    "kl0.1": ["mutual.kl_weight=0.1"],
    "kl-p0.1-q1": ["mutual.kl_weight={pruned: 0.1, quantized: 1.0}"],
    "kl-p1-q0.1": ["mutual.kl_weight={pruned: 1.0, quantized: 0.1}"],
    "ramp1": ["mutual.kl_rampup_epochs=1"],
    "sequential": ["mutual.update=sequential"],
    "kd0.5": ["mutual.kd_weight=0.5"],
    "kd0.5-kl0.3": ["mutual.kd_weight=0.5", "mutual.kl_weight=0.3"],
}
OWN_CONTROL = {   # change the budget or the start: each needs controls trained the same way
    "long6": ["mutual.epochs=6"],
    "long6-seq": ["mutual.epochs=6", "mutual.update=sequential"],
    "scratch8": ["mutual.init=scratch", "model.checkpoint=null", "mutual.epochs=8", "mutual.lr=0.1"],
}


OVERRIDES = {**VARIANTS, **OWN_CONTROL}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="runs/bench-mutual-grid", help="a finished `tandem grid --seeds` folder")
    ap.add_argument("--pair", nargs=2, default=["l1", "lsq"], metavar=("PRUNER", "QUANTIZER"))
    ap.add_argument("--variants", nargs="+", default=["kl0.3", "kd0.5"], choices=[*VARIANTS, *OWN_CONTROL])
    ap.add_argument("--tag", default=None)
    ap.add_argument("--seeds", nargs="+", type=int,
                    help="run only these seeds, write no results (default: the grid's seeds, from its summary.json)")
    args = ap.parse_args()
    grid = Path(args.grid)
    p, q = args.pair
    tag = args.tag or f"{p}-{q}"
    seeds = args.seeds or json.loads((grid / "summary.json").read_text())["seeds"]
    per_seed = []
    for seed in seeds:
        folder = grid / f"seed{seed}"
        cells = [(c["pruner"], c["quantizer"], json.loads((folder / c["folder"] / "results.json").read_text())["models"])
                 for c in json.loads((folder / "grid.json").read_text())["pairs"]]
        controls = {r["name"]: r for r in grid_rows(cells) if r["name"] in
                    (f"independent/pruned[{p}]", f"independent/quantized[{q}]")}
        cell_recipe = folder / f"{p}-{q}" / "recipe.yaml"
        rows = list(controls.values())
        for variant in args.variants:
            own = variant in OWN_CONTROL
            method = "method=[independent,mutual]" if own else "method=mutual"
            recipe = load_recipe(str(cell_recipe), [method, *OVERRIDES[variant]])
            recipe.name = f"{recipe.name}-{variant}"
            out = Path("runs") / f"mutual-study-{p}-{q}" / variant / f"seed{seed}"
            result = run_folder(out, recipe, what="study")
            for r in result["models"]:
                kind, _, peer = r["name"].partition("/")
                if kind not in ("mutual", "independent") or (kind == "independent" and not own):
                    continue
                control = (f"{variant}/independent/{peer}" if own
                           else f"independent/{peer}[{p if peer == 'pruned' else q}]")
                rows.append({"name": f"{variant}/{r['name']}", "top1": r["top1"], "macs": r["macs"],
                             "bops": r["bops"], **({"control": control} if kind == "mutual" else {})})
        per_seed.append(rows)
    if args.seeds:
        print(f"ran seeds {args.seeds}; rerun without --seeds for the results file")
        return
    summary = summarize(seeds, per_seed, command="mutual_study", pair=[p, q], variants=args.variants,
                        overrides={v: OVERRIDES[v] for v in args.variants},
                        recipe=json.loads(json.dumps(load_recipe(str(grid / "seed0" / f"{p}-{q}" / "recipe.yaml"))
                                                     .model_dump(mode="json"))))
    path = write_result(f"mutual_study-{tag}", {"grid": str(grid), "summary": summary})
    (RESULTS / f"mutual_study-{tag}.md").write_text(
        f"<!-- written by: python {' '.join(sys.argv)} (commit and machine in mutual_study-{tag}.json) -->\n\n"
        + summary_markdown(summary))
    print(summary_markdown(summary))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
