"""results.json and report.md of a run folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..engine.checkpoint import atomic_write

COLUMNS = [("name", "model", "{}"), ("top1", "test top-1 %", "{:.2f}"), ("val_top1", "val top-1 %", "{:.2f}"),
           ("params", "params (M)", "{:.4f}"), ("macs", "MACs (M)", "{:.3f}"), ("bops", "BOPs (G)", "{:.3f}"),
           ("bytes", "size (KiB)", "{:.1f}"), ("w_bits", "W bits", "{}"), ("a_bits", "A bits", "{}")]
SCALE = {"params": 1e-6, "macs": 1e-6, "bops": 1e-9, "bytes": 1 / 1024}


def _clean(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value * SCALE.get(key, 1))


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(out_dir: Path, results: dict) -> None:
    from .plot import plot_accuracy_vs_cost

    out_dir = Path(out_dir)
    results = _clean(results)
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    recipe = results["recipe"]
    plot_accuracy_vs_cost(results["models"], out_dir / "accuracy_vs_cost.png",
                          title=f"{recipe['name']}: {recipe['model']['name']} on {recipe['dataset']['name']}")
    lines = [f"# {recipe['name']}", "",
             f"method `{recipe['method']}`, model `{recipe['model']['name']}`, dataset `{recipe['dataset']['name']}`, "
             f"protocol `{results['protocol']}`, seed {recipe['seed']}, device {results['device']}", "",
             "Test top-1 is measured on the test split; model selection used the validation split "
             f"({recipe['dataset']['val_fraction']:.0%} of train held out).", "",
             markdown_table(results["models"]), "",
             "![accuracy vs cost](accuracy_vs_cost.png)", "",
             f"commit `{results['commit']}`, wall time {results['wall_time_s']:.1f} s, "
             f"torch {results['machine']['torch']}, {results['machine']['cpus']} CPUs", ""]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
