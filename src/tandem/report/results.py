"""results.json and report.md of a run folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..engine.checkpoint import atomic_write

COLUMNS = [("name", "model", "{}"), ("top1", "test top-1 %", "{:.2f}"), ("val_top1", "val top-1 %", "{:.2f}"),
           ("params", "params (M)", "{:.4f}"), ("macs", "MACs (M)", "{:.3f}"), ("bops", "BOPs (G)", "{:.3f}"),
           ("bytes", "size (KiB)", "{:.1f}"), ("w_bits", "W bits", "{}"), ("a_bits", "A bits", "{}")]
# shown only when some row has the key (e.g. unstructured pruning's nonzero MACs, pqkd's gains)
OPTIONAL_COLUMNS = [("nonzero_macs", "nonzero MACs (M)", "{:.3f}"),
                    ("gain_over_quantized", "top-1 gain over quantized (pp)", "{:+.2f}"),
                    ("gain_over_no_kd", "top-1 gain over no-KD control (pp)", "{:+.2f}"),
                    ("gain_over_independent", "top-1 gain over independent (pp)", "{:+.2f}")]
SCALE = {"params": 1e-6, "macs": 1e-6, "nonzero_macs": 1e-6, "bops": 1e-9, "bytes": 1 / 1024}


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


def add_gains(rows: list[dict]) -> list[dict]:
    """`mutual/<peer>` rows get `gain_over_independent` (test top-1 points) when the run also
    holds the control row `independent/<peer>` (mutual learning's claim is measured, not assumed)."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        control = by_name.get("independent/" + r["name"][len("mutual/"):]) if r["name"].startswith("mutual/") else None
        if control is not None and r.get("top1") is not None and control.get("top1") is not None:
            r["gain_over_independent"] = r["top1"] - control["top1"]
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = COLUMNS + [c for c in OPTIONAL_COLUMNS if any(c[0] in r for r in rows)]
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(out_dir: Path, results: dict) -> None:
    from .plot import plot_accuracy_vs_cost

    out_dir = Path(out_dir)
    add_gains(results["models"])
    results = _clean(results)
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    recipe = results["recipe"]
    plot_accuracy_vs_cost(results["models"], out_dir / "accuracy_vs_cost.png",
                          title=f"{recipe['name']}: {recipe['model']['name']} on {recipe['dataset']['name']}")
    lines = [f"# {recipe['name']}", "",
             f"method `{', '.join(results.get('methods') or [recipe['method']])}`, model `{recipe['model']['name']}`, dataset `{recipe['dataset']['name']}`, "
             f"protocol `{results['protocol']}`, seed {recipe['seed']}, device {results['device']}", "",
             "Test top-1 is measured on the test split; model selection used the validation split "
             f"({recipe['dataset']['val_fraction']:.0%} of train held out).", "",
             markdown_table(results["models"]), "",
             "![accuracy vs cost](accuracy_vs_cost.png)", "",
             f"commit `{results['commit']}`, wall time {results['wall_time_s']:.1f} s, "
             f"torch {results['machine']['torch']}, {results['machine']['cpus']} CPUs", ""]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
