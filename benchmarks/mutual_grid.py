"""cpu-small: the mutual-learning grid (3 pruners x 3 quantizers, each pair trained by mutual
learning and independently) on Fashion-MNIST with the small CNN, mean and spread over seeds.
Runs `tandem grid` (tandem.grid.run_grid) on recipes/fashion-mnist-mutual.yaml.

Protocol (also written into the result): per seed, one FP baseline trained on a fixed training
subset (validation split held out of it, seeded by the run seed), shared by every cell; in each
cell P = that baseline pruned to half its MACs by the pruner (FPGM soft as the recipe says, L1
and HRank one-shot), Q = that baseline quantized W4A4 by the quantizer (first/last layers 8 bit);
then `independent` (CE only) and `mutual` (DML, simultaneous updates, T = 1) train them with the
same schedule, data order and seed. Best-by-validation epoch; test top-1 reported.

Usage: python benchmarks/mutual_grid.py [--seeds 0 1] [--train-size 3000] [--joint-epochs 3]
Run folders go to runs/bench-mutual-grid/ (git-ignored); finished cells are reused (resumable).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
import prune_accuracy  # noqa: E402,F401  (registers the fashion-mnist-subset dataset)

from tandem.grid import DEFAULT_PRUNERS, DEFAULT_QUANTIZERS, run_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 2), "spread": round(max(values) - min(values), 2),
            "values": [round(v, 2) for v in values]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--joint-epochs", type=int, default=3)
    ap.add_argument("--joint-lr", type=float, default=0.01)
    ap.add_argument("--schedule", default="soft", help="prune.schedule; soft applies to fpgm only (see tandem.grid)")
    ap.add_argument("--pruners", nargs="+", default=list(DEFAULT_PRUNERS))
    ap.add_argument("--quantizers", nargs="+", default=list(DEFAULT_QUANTIZERS))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-mutual-grid"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix of the results file, for a variant of the default protocol")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    grids = {}
    for seed in args.seeds:
        overrides = ["dataset.name=fashion-mnist-subset", f"dataset.options.train_size={args.train_size}",
                     f"dataset.options.test_size={args.test_size}", f"seed={seed}",
                     f"train.epochs={args.base_epochs}", f"mutual.epochs={args.joint_epochs}",
                     f"mutual.lr={args.joint_lr}", f"prune.schedule={args.schedule}", "train.progress=false"]
        grids[seed] = run_grid(str(ROOT / "recipes" / "fashion-mnist-mutual.yaml"), args.pruners, args.quantizers,
                               out=Path(args.out) / f"seed{seed}", overrides=overrides)

    summary, not_helped = [], []
    first = grids[args.seeds[0]]
    for k, cell in enumerate(first["pairs"]):
        entry = {"pruner": cell["pruner"], "quantizer": cell["quantizer"], "schedule": cell["schedule"]}
        for peer in ("pruned", "quantized"):
            cells = [grids[s]["pairs"][k][peer] for s in args.seeds]
            m = _stats([c["mutual_top1"] for c in cells])
            i = _stats([c["independent_top1"] for c in cells])
            g = _stats([c["gain"] for c in cells])
            entry[peer] = {"mutual": m, "independent": i, "gain": g, "macs": cells[0]["macs"],
                           "bops": cells[0]["bops"], "params": cells[0]["params"], "bytes": cells[0]["bytes"]}
            if g["mean"] <= 0:
                verdict = "mutual learning did not help (mean gain <= 0)"
            elif min(g["values"]) <= 0:
                verdict = "mutual learning did not help on every seed (a seed's gain <= 0)"
            elif g["mean"] < max(m["spread"], i["spread"]):
                verdict = "gain smaller than the seed spread: not distinguishable from noise"
            else:
                verdict = "helped on every seed"
            entry[peer]["verdict"] = verdict
            if not verdict.startswith("helped"):
                not_helped.append(f"{cell['pruner']}+{cell['quantizer']} {peer}: {verdict} "
                                  f"(gain {g['mean']:+.2f} pp, seeds {g['values']})")
        summary.append(entry)
        print(f"{cell['pruner']:>6} {cell['quantizer']:>7}  P {entry['pruned']['mutual']['mean']:.2f} vs "
              f"{entry['pruned']['independent']['mean']:.2f} ({entry['pruned']['gain']['mean']:+.2f}, spread "
              f"{entry['pruned']['gain']['spread']:.2f})  Q {entry['quantized']['mutual']['mean']:.2f} vs "
              f"{entry['quantized']['independent']['mean']:.2f} ({entry['quantized']['gain']['mean']:+.2f}, spread "
              f"{entry['quantized']['gain']['spread']:.2f})")
    p_gains = [e["pruned"]["gain"]["mean"] for e in summary]
    q_gains = [e["quantized"]["gain"]["mean"] for e in summary]
    overall = {"pruned_mean_gain": round(statistics.fmean(p_gains), 2),
               "quantized_mean_gain": round(statistics.fmean(q_gains), 2),
               "pairs_where_P_gained": sum(g > 0 for g in p_gains), "pairs_where_Q_gained": sum(g > 0 for g in q_gains),
               "pairs": len(summary)}
    print("overall:", overall)
    print("where mutual learning did not help:\n  " + "\n  ".join(not_helped or ["(nowhere)"]))
    protocol = (f"cpu-small. small_cnn on Fashion-MNIST: training subset of {args.train_size} images (fixed "
                f"permutation, seed 0), 10% of it held out as the validation split (seeded by the run seed); test: "
                f"{args.test_size} images of the test set (fixed permutation). Per seed one FP baseline: "
                f"{args.base_epochs} epochs SGD lr 0.05 cosine, batch 128, shared by all cells. P: pruned to 50% MACs "
                f"(layer scope; fpgm with the {args.schedule} schedule, l1 and hrank one-shot); Q: W4A4, first/last "
                f"layers 8-bit min-max. Joint phase (both methods alike): {args.joint_epochs} epochs SGD lr "
                f"{args.joint_lr} cosine, batch 128; mutual = CE + KL(peer || self) at T=1, simultaneous updates; "
                f"independent = CE only. Best-by-validation epoch, test top-1. Spread = max - min over seeds. CPU, "
                f"{args.threads} thread(s), fp32; the machine was shared with other agents' jobs.")
    path = write_result("mutual_grid-fashion-mnist" + (f"-{args.tag}" if args.tag else ""), {
        "protocol": protocol, "seeds": args.seeds, "wall_time_s": round(time.perf_counter() - start, 1),
        "overall": overall, "where_mutual_did_not_help": not_helped, "summary": summary,
        "baselines": {s: grids[s]["baseline"] for s in args.seeds},
        "grids": {s: grids[s]["pairs"] for s in args.seeds}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
