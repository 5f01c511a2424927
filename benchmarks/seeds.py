"""Multi-seed evidence for a joint method: runs `tandem run|grid RECIPE --seeds ...` into
runs/bench-<tag>/ (resumable: finished seeds and cells are read, not trained again, so seed
folders may also be filled by separate processes first, e.g. `tandem grid RECIPE seed=1 --out
runs/bench-<tag>/seed1`) and copies its summary (per-row mean and 95% interval, paired
method - control differences per seed) to benchmarks/results/seeds-<tag>.json and .md, with
this command, the commit and the machine.

Usage: python benchmarks/seeds.py grid recipes/fashion-mnist-mutual.yaml --seeds 0 1 2 --tag mutual-grid
       python benchmarks/seeds.py run recipes/fashion-mnist-pqkd.yaml --seeds 0 1 2 --tag pqkd
       (key=value overrides go after the recipe; --pruners / --quantizers for grid)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402

from tandem.cli import main as tandem  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["run", "grid"])
    ap.add_argument("args", nargs="+", metavar="RECIPE | key=value")
    ap.add_argument("--seeds", nargs="+", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--pruners")
    ap.add_argument("--quantizers")
    args = ap.parse_args()
    out = Path("runs") / f"bench-{args.tag}"
    cli = [args.command, *args.args, "--seeds", *args.seeds, "--out", str(out)]
    if args.command == "grid":
        cli += [f for flag in ("pruners", "quantizers") if getattr(args, flag)
                for f in (f"--{flag}", getattr(args, flag))]
    elif out.exists():
        cli.append("--resume")
    if tandem(cli) != 0:
        sys.exit(2)
    summary = json.loads((out / "summary.json").read_text())
    # every run folder's own record: each seed of `run`, each baseline and cell of `grid` (a folder
    # may have been trained before this call, by another process, under another load and commit)
    runs = {str(p.parent.relative_to(out)): {k: v for k, v in json.loads(p.read_text()).items()
                                              if k in ("wall_time_s", "invocations", "commit", "load_average_1_5_15min")}
            for p in sorted(out.glob("seed*/**/results.json"))}
    for name, record in runs.items():   # a hand-written NOTE.txt (e.g. a killed invocation's lost time) travels along
        note = out / name / "NOTE.txt"
        if note.exists():
            record["note"] = note.read_text().strip()
    path = write_result(f"seeds-{args.tag}", {"tandem_command": "tandem " + " ".join(cli), "run_dir": str(out),
                                              "load_average_is_of": "this collecting call; each run folder's "
                                              "own training: runs",
                                              "runs": runs, "summary": summary})
    md = (out / "summary.md").read_text().replace("](summary.png)", f"]({out}/summary.png)")
    (RESULTS / f"seeds-{args.tag}.md").write_text(
        f"<!-- written by: python {' '.join(sys.argv)} (commit and machine in seeds-{args.tag}.json) -->\n\n{md}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
