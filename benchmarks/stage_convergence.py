"""Does a schedule give each stage a fair chance? For every stage of the given run folders (from
their metrics.jsonl): epochs, seconds per epoch, and per network the validation top-1 after the
first epoch, at half the stage, at its best epoch and at the last, so a stage still climbing at
its end (best = last, a large gain over the second half) shows as starved.

Usage: python benchmarks/stage_convergence.py runs/bench-sbs-medium/seed0 [more run folders] \
           [--tag sbs-medium]   (with --tag: results/stage_convergence-<tag>.json)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402


def stages(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_stage: dict[str, dict[int, dict]] = {}
    for r in records:   # an epoch a killed invocation logged is logged again on resume: the last one counts
        if "epoch_time" in r:
            by_stage.setdefault(r["stage"], {})[r["epoch"]] = r
    out = []
    for stage, epochs in by_stage.items():
        rows = [epochs[e] for e in sorted(epochs)]
        nets = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("val_top1/")})
        entry = {"stage": stage, "epochs": len(rows),
                 "seconds_per_epoch": round(sum(r["epoch_time"] for r in rows) / len(rows), 1), "nets": {}}
        for net in nets:
            vals = [r.get(f"val_top1/{net}") for r in rows]
            if any(v is None for v in vals):
                continue
            best = max(range(len(vals)), key=lambda i: vals[i])
            half = vals[(len(vals) - 1) // 2]
            entry["nets"][net] = {"first": vals[0], "half": half, "best": vals[best], "best_epoch": best + 1,
                                  "last": vals[-1], "gain_second_half": vals[best] - half}
        out.append(entry)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--tag")
    args = ap.parse_args()
    report = {}
    for run in args.runs:
        report[run] = stages(Path(run))
        print(run)
        for s in report[run]:
            for net, v in s["nets"].items():
                print(f"  {s['stage']:<28} {net:<12} {s['epochs']:>3} ep {s['seconds_per_epoch']:>6.1f} s/ep | val first "
                      f"{v['first']:.2f} half {v['half']:.2f} best {v['best']:.2f} (epoch {v['best_epoch']}) last "
                      f"{v['last']:.2f} | second-half gain {v['gain_second_half']:+.2f}")
    if args.tag:
        print(f"wrote {write_result(f'stage_convergence-{args.tag}', {'command': 'python ' + ' '.join(sys.argv), 'runs': report})}")


if __name__ == "__main__":
    main()
