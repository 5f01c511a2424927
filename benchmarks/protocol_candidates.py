"""cpu-small protocol: which small setting can tell compression methods apart (docs/protocol.md).

For each candidate (model, dataset) and each epoch budget, trains the full-precision baseline
with the recipe's schedule (cosine, batch 128, SGD Nesterov; each budget its own run, since a
cosine schedule depends on its length) and records the best-by-validation epoch's test top-1
on the full test set, and the median seconds per training epoch on this machine. The setting
to choose: the baseline comes within about 1 point of its longest-budget accuracy, and one seed
of a joint method fits in 10 minutes.

Usage: python benchmarks/protocol_candidates.py --plan r20half-fmnist:4,8,16 r20-fmnist:4,8
       [--runs runs/protocol]   (finished runs are read, not trained again; the results file
       lists every finished run of a known candidate in --runs)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import tandem  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HALF_R20 = [8] * 7 + [16] * 6 + [32] * 6
CANDIDATES = {
    "small_cnn-fmnist": {"model": {"name": "small_cnn"},
                         "dataset": {"name": "fashion-mnist", "root": str(DATA / "fashion-mnist")}},
    "r20half-fmnist": {"model": {"name": "resnet20", "widths": HALF_R20},
                       "dataset": {"name": "fashion-mnist", "root": str(DATA / "fashion-mnist")}},
    "r20half-fmnist20k": {"model": {"name": "resnet20", "widths": HALF_R20},
                          "dataset": {"name": "fashion-mnist", "root": str(DATA / "fashion-mnist"),
                                      "train_limit": 20000}},
    "r20-fmnist": {"model": {"name": "resnet20"},
                   "dataset": {"name": "fashion-mnist", "root": str(DATA / "fashion-mnist")}},
    "r20half-cifar10": {"model": {"name": "resnet20", "widths": HALF_R20},
                        "dataset": {"name": "image-folder",
                                    "root": str(DATA / "cifar-10-jpg" / "cifar-10-jpg.zip")}},
    "r20half-cifar10-20k": {"model": {"name": "resnet20", "widths": HALF_R20},
                            "dataset": {"name": "image-folder", "train_limit": 20000,
                                        "root": str(DATA / "cifar-10-jpg" / "cifar-10-jpg.zip")}},
}


def run_one(name: str, epochs: int, runs: Path, lr: float) -> dict:
    from tandem.recipes import validate

    out = runs / f"{name}-e{epochs}"
    if not (out / "results.json").exists():
        raw = {"name": f"protocol-{name}-e{epochs}", "method": "baseline", "protocol": "cpu-small",
               **CANDIDATES[name], "train": {"epochs": epochs, "batch_size": 128, "lr": lr, "progress": False}}
        tandem.run(validate(raw), out=out, resume=out.exists() and any(out.iterdir()))
    results = json.loads((out / "results.json").read_text())
    row = results["models"][0]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch_times = [r["epoch_time"] for r in lines if "epoch_time" in r]
    return {"candidate": name, "epochs": epochs, "test_top1": row["top1"], "val_top1": row["val_top1"],
            "macs": row["macs"], "params": row["params"],
            # the fastest epoch is the least disturbed by other jobs on a shared machine
            "s_per_epoch_min": min(epoch_times), "s_per_epoch_median": statistics.median(epoch_times),
            "wall_time_s": results["wall_time_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", nargs="+", default=["r20half-fmnist:4,8,16"],
                    help=f"CANDIDATE:EPOCHS,... with CANDIDATE one of {', '.join(CANDIDATES)}")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--runs", default="runs/protocol")
    args = ap.parse_args()
    runs = Path(args.runs)
    for item in args.plan:
        name, _, budgets = item.partition(":")
        if name not in CANDIDATES:
            ap.error(f"unknown candidate {name!r}; allowed: {', '.join(CANDIDATES)}")
        for e in (int(b) for b in budgets.split(",")):
            print(json.dumps(run_one(name, e, runs, args.lr)), flush=True)
    rows = [run_one(name, int(folder.name.rsplit("-e", 1)[1]), runs, args.lr)
            for name in CANDIDATES for folder in sorted(runs.glob(f"{name}-e*"))
            if (folder / "results.json").exists()]
    rows.sort(key=lambda r: (r["candidate"], r["epochs"]))
    path = write_result("protocol_candidates", {"protocol": "cpu-small", "seed": 0, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
