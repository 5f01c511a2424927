"""results.json and report.md of a run folder.

report.md is meant to decide with: it opens with the settings that ran and a verdict computed
from the rows (best accuracy within cost budgets, the Pareto front, how large a difference the
test set can resolve), then the table and what each of its columns means."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import atomic_write

COLUMNS = [("name", "model", "{}"), ("top1", "test top-1 %", "{:.2f}"), ("val_top1", "val top-1 %", "{:.2f}"),
           ("params", "params (M)", "{:.4f}"), ("macs", "MACs (M)", "{:.3f}"), ("bops", "BOPs (G)", "{:.3f}"),
           ("bytes", "size (KiB)", "{:.1f}"), ("w_bits", "W bits", "{:g}"), ("a_bits", "A bits", "{:g}")]
# shown only when some row has the key (e.g. unstructured pruning's nonzero MACs, a control)
OPTIONAL_COLUMNS = [("val_top1_bn_reestimated", "val top-1 %, BN re-estimated", "{:.2f}"),
                    ("nonzero_macs", "nonzero MACs (M)", "{:.3f}"),
                    ("control", "top-1 gain over its control (pp)", "{}"),
                    ("gain_over_quantized", "top-1 gain over quantized (pp)", "{:+.2f}"),
                    ("macs_reduction", "MACs reduction", "{:.1%}"),
                    ("params_reduction", "params reduction", "{:.1%}"),
                    ("bops_ratio", "BOPs ratio (x)", "{:.2f}"),
                    ("ort_ms_1", "onnxruntime ms (batch 1)", "{:.2f}"),
                    ("ort_ms_batch", "onnxruntime ms (latency batch)", "{:.2f}"),
                    ("eager_ms_1", "eager ms (batch 1)", "{:.2f}"),
                    ("eager_ms_batch", "eager ms (latency batch)", "{:.2f}")]
SCALE = {"params": 1e-6, "macs": 1e-6, "nonzero_macs": 1e-6, "bops": 1e-9, "bytes": 1 / 1024}
GLOSSARY = {
    "name": "the results row; the part before '/' is the method that trained it, `baseline` the "
            "full-precision network the methods start from; `<method>/init` (and `init-<which>`) is the "
            "network as that method's training starts (quantizers calibrated, gates as initialised), "
            "kept out of the verdict and the plot: a start far below the baseline means the start is broken",
    "top1": "accuracy on the test split, measured once after training; nothing is chosen on it",
    "val_top1": "accuracy on the validation split held out of train, at the epoch chosen on it "
                "(so it is optimistic: a selection aid, not a result)",
    "val_top1_bn_reestimated": "init rows only: val top-1 of the start with its BatchNorm statistics "
                               "re-estimated on 8 training batches, as training (batch statistics) sees it; "
                               "high here but low in `val top-1 %` means only the stored statistics are stale",
    "params": "conv and linear weights and biases, in millions",
    "macs": "multiply-accumulates of the conv and linear layers for one image, in millions "
            "(BN, activations and pooling are free)",
    "bops": "bit operations: the sum over layers of MACs x weight bits x activation bits, in billions "
            "(full precision counts 32 x 32)",
    "bytes": "storage for inference: conv/linear weights at their bits; biases, BN and other float "
             "tensors at 4 bytes",
    "w_bits": "weight bits, the MAC-weighted mean over the conv/linear layers (an integer when every "
              "layer agrees; 32 = float); each layer's bits are in results.json `layers`",
    "a_bits": "input-activation bits of the same layers, MAC-weighted mean likewise",
    "nonzero_macs": "MACs that multiply a nonzero weight (unstructured pruning zeroes weights "
                    "without shrinking layers)",
    "control": "test top-1 minus that of the row the method is compared with in the same run (named in "
               "brackets; results.json `control`): the same network, budget and epochs without the "
               "method's idea, e.g. `independent/<peer>` for mutual learning, `pqkd/no-kd` for distillation",
    "gain_over_quantized": "test top-1 minus that of `pqkd/quantized`, the student before distillation",
    "macs_reduction": "1 - MACs / MACs of the unpruned network the method pruned (e.g. PDD's student)",
    "params_reduction": "1 - params / params of the unpruned network the method pruned",
    "bops_ratio": "BOPs of the full-precision baseline / BOPs of this network (the compression ratio)",
    "ort_ms_1": "measured: ms per call of one image, the exported ONNX file in onnxruntime on this machine's CPU "
                "(median of interleaved rounds after warm-up; threads, CPU flags and load in results.json "
                "`latency_setup`)",
    "ort_ms_batch": "the same for a batch of `report.latency_batch` images (results.json `latency_batch`)",
    "eager_ms_1": "measured: ms per call of one image in PyTorch (eval, no grad), as `ort_ms_1`",
    "eager_ms_batch": "the same for a batch of `report.latency_batch` images",
}


def cost_key(rows: list[dict], cost: str = "bops") -> tuple[str, str]:
    """(row key, label) of what the Pareto front ranks by: `bops`, `macs`, or measured latency
    (onnxruntime at the latency batch where every row has it, else eager)."""
    if cost != "latency":
        return cost, {"bops": "BOPs", "macs": "MACs"}[cost]
    if rows and all(r.get("ort_ms_batch") is not None for r in rows):
        return "ort_ms_batch", "onnxruntime latency (ms, latency batch)"
    return "eager_ms_batch", "eager latency (ms, latency batch)"
BUDGETS = (("macs", "MACs", (2, 4, 10)), ("bops", "BOPs", (32, 128, 512)))   # fractions of the reference


def _clean(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def control_gains(row: dict, by_name: dict) -> str:
    """'+0.62 (independent/pruned)' for each of the row's controls found in the run."""
    controls = row.get("control") or []
    cells = []
    for c in [controls] if isinstance(controls, str) else controls:
        other = by_name.get(c)
        if other is not None and row.get("top1") is not None and other.get("top1") is not None:
            cells.append(f"{row['top1'] - other['top1']:+.2f} ({c})")
    return "; ".join(cells) or "-"


def _cell(row: dict, key: str, fmt: str, by_name: dict | None = None) -> str:
    if key == "control":
        return control_gains(row, by_name or {})
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if not isinstance(value, (int, float)):   # e.g. 'mixed' bits of an older results.json
        return str(value)
    return fmt.format(value * SCALE.get(key, 1))


def _columns(rows: list[dict]) -> list[tuple]:
    return COLUMNS + [c for c in OPTIONAL_COLUMNS if any(c[0] in r for r in rows)]


def add_gains(rows: list[dict]) -> list[dict]:
    """`mutual/<peer>` rows get `gain_over_independent` (test top-1 points) in results.json when
    the run also holds the control row `independent/<peer>` (the report shows every row's gain
    over its `control` in one column)."""
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r.get("init"):   # a start, not a result: the two methods' starts are the same peers
            continue
        control = by_name.get("independent/" + r["name"][len("mutual/"):]) if r["name"].startswith("mutual/") else None
        if control is not None and r.get("top1") is not None and control.get("top1") is not None:
            r["gain_over_independent"] = r["top1"] - control["top1"]
    return rows


def markdown_table(rows: list[dict]) -> str:
    columns = _columns(rows)
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    by_name = {r["name"]: r for r in rows}
    body = ["| " + " | ".join(_cell(r, k, f, by_name) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def glossary(rows: list[dict]) -> str:
    """One line per column of `markdown_table(rows)`: what it counts and in which unit."""
    return "\n".join(f"- **{title}**: {GLOSSARY.get(key, 'see results.json')}."
                     for key, title, _ in _columns(rows))


def standard_error(top1: float, n: int) -> float:
    """Binomial standard error, in points, of an accuracy of `top1` % measured on n images."""
    p = min(max(top1 / 100, 0.0), 1.0)
    return 100 * math.sqrt(p * (1 - p) / n)


def _ratio(value, ref) -> str:
    """A cost as a fraction of the reference: '1/45', '1/2.4', or '0.62x' when not halved."""
    if not value or not ref:
        return "-"
    r = ref / value
    if r >= 10:
        return f"1/{r:.0f}"
    return f"1/{r:.1f}" if r >= 2 else f"{value / ref:.2f}x"


def verdict(rows: list[dict], test_images: int | None = None, cost: str = "bops") -> list[str]:
    """Markdown bullets that answer "which row, at which cost": the most accurate row, the
    cheapest one that the test set cannot tell apart from it, the best within a few MAC and BOP
    budgets (those that have a candidate) and the Pareto front. Costs are fractions of the
    baseline's (of the largest row's when the run has no baseline)."""
    from .plot import pareto_front

    scored = [r for r in rows if r.get("top1") is not None]
    if not scored:
        return ["- No row has a test top-1: nothing to compare."]
    base = next((r for r in scored if r["name"] == "baseline"), None)
    ref = {k: (base or max(scored, key=lambda r: r.get(k) or 0)).get(k) for k in ("macs", "bops")}
    of = "the baseline's" if base else "the largest row's"

    def at(r):
        if r is base:
            return f"baseline {r['top1']:.2f}% (the full-precision reference)"
        delta = f", {r['top1'] - base['top1']:+.2f} points vs the baseline" if base else ""
        return (f"{r['name']} {r['top1']:.2f}% ({_ratio(r.get('bops'), ref['bops'])} of {of} BOPs, "
                f"{_ratio(r.get('macs'), ref['macs'])} of its MACs{delta})")

    def cheapness(r):
        return (r.get("bops") or 0, r.get("macs") or 0, -r["top1"])

    best = max(scored, key=lambda r: (r["top1"], *(-c for c in cheapness(r)[:2])))
    lines = [f"- Most accurate: {at(best)}."]
    if test_images:
        margin = 2 * standard_error(best["top1"], test_images)
        close = min((r for r in scored if r["top1"] >= best["top1"] - margin), key=cheapness)
        if close is not best:
            lines.append(f"- Cheapest within 2 standard errors ({margin:.2f} points) of it: {at(close)}.")
        else:
            lines.append(f"- No cheaper row comes within 2 standard errors ({margin:.2f} points) of it.")
    for key, label, fractions in BUDGETS:
        previous = None
        for f in fractions:
            fits = [r for r in scored if r.get(key) and ref[key] and r[key] <= ref[key] / f]
            if not fits:
                break
            winner = max(fits, key=lambda r: (r["top1"], -r[key]))
            if winner is not previous:   # a looser budget's winner that fits a tighter one wins it too
                lines.append(f"- Best at <= 1/{f} of {of} {label}: {at(winner)}.")
            previous = winner
    key, label = cost_key(scored, cost)
    front = pareto_front([(r.get(key) or 0, r["top1"], r["name"]) for r in scored])
    lines.append(f"- Pareto front (best test top-1 for at most its {label}, cheapest first): "
                 + " -> ".join(f"{name} {top1:.2f}%" for _, top1, name in front) + ".")
    return lines


def noise_note(rows: list[dict], test_images: int | None) -> str:
    """How large a test top-1 difference one run can resolve (binomial standard error)."""
    if not test_images:
        return "The test-set size was not recorded, so the standard error of these accuracies is unknown."
    scored = [r["top1"] for r in rows if r.get("top1") is not None]
    base = next((r["top1"] for r in rows if r["name"] == "baseline" and r.get("top1") is not None), None)
    if base is None and not scored:
        return f"The test set has {test_images} images (1 image = {100 / test_images:.3g} points)."
    p, at = (base, "the baseline's") if base is not None else (sum(scored) / len(scored), "the mean")
    se = standard_error(p, test_images)
    return (f"The test set has {test_images} images, so 1 image = {100 / test_images:.3g} points of top-1. "
            f"At {at} accuracy ({p:.2f}%) the binomial standard error, sqrt(p(1-p)/n), is {se:.2f} points. "
            f"Differences smaller than about 2 standard errors ({2 * se:.2f} points) are not "
            f"distinguishable on one seed.")


def _settings(results: dict) -> list[str]:
    """The settings that ran, as bullets: what a reader needs before trusting the numbers."""
    recipe = results["recipe"]
    ds = recipe["dataset"]
    sizes = [(results.get(f"{s}_images"), s) for s in ("train", "val", "test")]
    known = [f"{n} {s}" for n, s in sizes if n is not None]
    split = " / ".join(known) + " images" if known else "split sizes not recorded"
    epochs = [f"{recipe['train']['epochs']} (train)"]
    for section, key in (("prune", "finetune_epochs"), ("quant", "epochs"), ("mutual", "epochs"),
                         ("distill", "epochs")):
        value = (recipe.get(section) or {}).get(key)
        if value is not None:
            epochs.append(f"{section}.{key} {value}")
    methods = results.get("methods") or [recipe["method"]]
    world = results.get("world_size") or 1
    return [f"- methods: `{', '.join(methods if isinstance(methods, list) else [methods])}`",
            f"- model: `{recipe['model']['name']}`",
            f"- dataset: `{ds['name']}`, {split} (validation = {ds['val_fraction']:.0%} of train, "
            f"held out for model selection)",
            f"- epochs: {', '.join(epochs)}",
            f"- protocol `{results.get('protocol', recipe.get('protocol'))}`, seed {recipe['seed']}, "
            f"device {results.get('device', '?')}" + (f" x {world} processes" if world > 1 else ""),
            *_layouts(results.get("models", []))]


def _layouts(rows: list[dict]) -> list[str]:
    """Which activation layout (quant.layout) each quantized row was trained with."""
    by_layout: dict[str, list[str]] = {}
    for r in rows:
        if r.get("quant_layout"):
            by_layout.setdefault(r["quant_layout"], []).append(r["name"])
    if not by_layout:
        return []
    what = {"inputs": "each quantized layer rounds its own input (the papers')",
            "deploy": "each tensor rounded once where it is made, Add inputs and outputs included (int8 runtimes)"}
    return ["- activation quantizers: " + "; ".join(
        f"layout `{k}` ({what.get(k, k)}): {', '.join(v) if len(by_layout) > 1 else 'every quantized row'}"
        for k, v in by_layout.items())]


def layer_tables(rows: list[dict]) -> list[str]:
    """Per-layer channels, sparsity and bits of the rows whose layers carry a `sparsity`
    (methods that assign bits per layer from it, e.g. PIC-PQ)."""
    out = []
    for row in rows:
        layers = row.get("layers") or []
        if not any("sparsity" in layer for layer in layers):
            continue
        out += [f"### {row['name']}: per layer", "",
                "| layer | in | out | MACs (M) | sparsity s_l | W bits | A bits |", "|---|---|---|---|---|---|---|"]
        out += [f"| {l['name']} | {l['in_channels']} | {l['out_channels']} | {l['macs'] * 1e-6:.3f} | "
                f"{_cell(l, 'sparsity', '{:.3f}')} | {l['w_bits']} | {l['a_bits']} |" for l in layers]
        out.append("")
    return out


def write_report(out_dir: Path, results: dict) -> None:
    from .plot import plot_accuracy_vs_cost

    out_dir = Path(out_dir)
    add_gains(results["models"])
    results = _clean(results)
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    recipe, rows, n_test = results["recipe"], results["models"], results.get("test_images")
    trained = [r for r in rows if not r.get("init")]   # a method's start row is a check, not a result
    cost = (recipe.get("report") or {}).get("cost", "bops")
    plot_accuracy_vs_cost(trained, out_dir / "accuracy_vs_cost.png",
                          title=f"{recipe['name']}: {recipe['model']['name']} on {recipe['dataset']['name']}",
                          first=cost_key(trained, cost))
    machine = results.get("machine") or {}
    lines = [f"# {recipe['name']}", "", "## Settings", "", *_settings(results), "",
             "## Verdict", "", *verdict(trained, n_test, cost), "", noise_note(trained, n_test), "",
             "## Results", "",
             markdown_table(rows), "",
             "Columns:", "", glossary(rows), "",
             *layer_tables(rows),
             "![accuracy vs cost](accuracy_vs_cost.png)", "",
             f"commit `{results.get('commit')}`, wall time {results.get('wall_time_s') or 0:.1f} s over "
             f"{results.get('invocations', 1)} invocation(s)"
             + (f" ({results['killed_invocations']} killed, counted up to the last file it wrote)"
                if results.get("killed_invocations") else "") + ", "
             f"torch {machine.get('torch')}, {machine.get('cpus')} CPUs", ""]
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
