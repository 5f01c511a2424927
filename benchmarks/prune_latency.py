"""ResNet-56 (CIFAR input) pruned to 50% of its MACs: measured CPU latency of the physically
smaller model against the dense one, next to the MACs ratio, with and without `round_to` (kept
widths rounded to multiples of 8 or 16), eager, eager with BN folded, and exported to ONNX in
onnxruntime, at batch 1 and 64. Torch-Pruning's magnitude pruner on the same model and target
is the reference.

Latency depends only on the architecture, so the weights are untrained (He-init convs, BN
scales drawn from U(0.2, 1) so that bn_scale has something to rank) and HRank sees random inputs.
Timing is side by side: every (model, mode, batch) once per round, the order rotating, the median
over rounds of each round's ratio to the dense model in the same mode and batch.

Two rows explain what no pruning can remove: `fixed cost (every width 1)` is ResNet-56 with one
channel per layer, the per-layer cost of the framework (dispatch, allocation, launch) that does not
shrink with the MACs. `bound_given_fixed_cost` is the speed-up over MACs speed-up a model would
reach with perfect kernels: dense / (fixed + (dense - fixed) * macs_ratio), over 1 / macs_ratio.

tandem prunes the residual streams too (the option-A shortcut's channel map follows the removed
channels); one row keeps them whole (block-internal channels only, as PFEC prunes ResNet-56).

    python benchmarks/prune_latency.py [--rounds 9] [--threads 1] [--criteria l1 fpgm ...]
"""
from __future__ import annotations

import os

# ~15 models x ~110 convs of distinct shapes exceed oneDNN's default primitive cache (1024 entries):
# interleaved timing would then re-create (JIT) the kernels of the pruned models on every call,
# which a deployed model (one network, ~110 primitives) never does. Must be set before torch loads.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from common import interleaved_times, round_ratios, write_result  # noqa: E402
from tandem import cost  # noqa: E402
from tandem.export import export_onnx, fold_bn, open_runtime  # noqa: E402
from tandem.models import create_model  # noqa: E402
from tandem.prune import prune  # noqa: E402

INTERNAL_IGNORE = ["stem.0", "*.conv2"]
FIXED = "fixed cost (every width 1)"
BATCHES = {1: 20, 64: 1}            # calls per timing


def torch_pruning_reference(model, x, target):
    """Torch-Pruning's MagnitudePruner (L1), per-layer ratio found by bisection so that MACs <= target.
    The residual stream is left alone (stem, every conv2, fc ignored): Torch-Pruning cannot see
    the option-A shortcut's positional zero-padding and otherwise produces a broken model."""
    import torch_pruning as tp

    base = cost.profile(model).macs

    def run(r):
        m = copy.deepcopy(model)
        ignored = [m.fc, m.stem[0]] + [mod for n, mod in m.named_modules() if n.endswith("conv2")]
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=r,
                                  ignored_layers=ignored, global_pruning=False).step()
        return m, cost.profile(m).macs / base

    lo, hi = 0.0, 0.9
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if run(mid)[1] <= target else (mid, hi)
    return run(hi)[0], tp.__version__


def build_models(dense, target, criteria):
    x1 = torch.randn(1, 3, 32, 32)
    data = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    specs = {}
    for crit in criteria:
        for r in (1, 8, 16):
            specs[f"{crit} (global{', round_to=' + str(r) if r > 1 else ''})"] = dict(
                criterion=crit, scope="global", round_to=r, data=data if crit == "hrank" else None)
    for r in (1, 8):
        specs[f"l1 (layer{', round_to=' + str(r) if r > 1 else ''})"] = dict(criterion="l1", scope="layer", round_to=r)
    specs["l1 (layer, block-internal only: ignore stem.0, *.conv2)"] = dict(criterion="l1", scope="layer",
                                                                           ignore=INTERNAL_IGNORE)
    models, setup = {"dense": dense}, {}
    for name, kw in specs.items():
        start = time.perf_counter()
        models[name] = prune(dense, x1, macs_target=target, **kw).eval()
        setup[name] = time.perf_counter() - start
    tp_model, tp_version = torch_pruning_reference(dense, x1, target)
    models[f"torch-pruning {tp_version} MagnitudePruner"] = tp_model.eval()
    models[FIXED] = create_model("resnet56", widths=[1] * 55).eval()
    return models, setup


def runners(models, threads, tmp):
    """(name, mode) -> {batch: fn}: eager, eager with BN folded (tandem.export.fold_bn), and
    onnxruntime on tandem's ONNX export (BN folded; onnxruntime fuses Conv+Add+Relu)."""
    inputs = {b: torch.randn(b, 3, 32, 32) for b in BATCHES}
    out = {}
    for name, m in models.items():
        folded = fold_bn(m)
        path = export_onnx(m, Path(tmp) / f"{len(out)}.onnx", (3, 32, 32)).path
        rt = open_runtime(path, "onnxruntime", threads=threads)
        out[(name, "eager")] = {b: (lambda m=m, x=x: m(x)) for b, x in inputs.items()}
        out[(name, "bn-folded")] = {b: (lambda m=folded, x=x: m(x)) for b, x in inputs.items()}
        out[(name, "onnxruntime")] = {b: (lambda rt=rt, x=x.numpy(): rt(x)) for b, x in inputs.items()}
    return out, rt.config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: on a shared machine spinning OpenMP threads make 2-thread timings noise")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--criteria", nargs="+", default=["l1"],
                    help="global-ranking criteria to time (each at round_to 1, 8, 16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = create_model("resnet56").eval()
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)
    models, setup = build_models(dense, args.target, args.criteria)
    base_macs = cost.profile(dense).macs
    costs = {name: cost.profile(m) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        fns, ort_config = runners(models, args.threads, tmp)
        flat = {f"{name} | {mode} | b{b}": fn for (name, mode), by_b in fns.items() for b, fn in by_b.items()}
        for fn in flat.values():     # warm-up
            fn()
        times = {}
        for b, calls in BATCHES.items():
            times.update(interleaved_times({k: f for k, f in flat.items() if k.endswith(f"| b{b}")},
                                           args.rounds, calls=calls, log=False))
    rows = []
    for (name, mode) in fns:
        c = costs[name]
        row = {"model": name, "mode": mode, "widths": getattr(models[name], "config", {}).get("widths"),
               "macs_M": round(c.macs / 1e6, 3), "params_M": round(c.params / 1e6, 4),
               "macs_ratio": round(c.macs / base_macs, 4), "macs_speedup": round(base_macs / c.macs, 3)}
        for b in BATCHES:
            key, ref, fixed = f"{name} | {mode} | b{b}", f"dense | {mode} | b{b}", f"{FIXED} | {mode} | b{b}"
            speedup = 1 / statistics.median(round_ratios(times, ref, key))
            dense_ms, fixed_ms = statistics.median(times[ref]) * 1e3, statistics.median(times[fixed]) * 1e3
            bound = dense_ms / (fixed_ms + (dense_ms - fixed_ms) * c.macs / base_macs)
            row.update({f"latency_ms_b{b}": round(statistics.median(times[key]) * 1e3, 3),
                        f"speedup_b{b}": round(speedup, 3),
                        f"speedup_over_macs_speedup_b{b}": round(speedup * c.macs / base_macs, 3),
                        f"bound_given_fixed_cost_b{b}": round(bound * c.macs / base_macs, 3)})
        if name in setup:
            row["prune_time_s"] = round(setup[name], 2)
        rows.append(row)
        if name != FIXED:
            print(f"{name:<56} {mode:<11} MACs {row['macs_ratio']:.3f}  "
                  f"b1 {row['latency_ms_b1']:7.2f} ms x{row['speedup_b1']:.2f} "
                  f"(/MACs {row['speedup_over_macs_speedup_b1']:.2f}, bound {row['bound_given_fixed_cost_b1']:.2f})  "
                  f"b64 {row['latency_ms_b64']:7.1f} ms x{row['speedup_b64']:.2f} "
                  f"(/MACs {row['speedup_over_macs_speedup_b64']:.2f})")
        else:
            print(f"{name:<56} {mode:<11} b1 {row['latency_ms_b1']:7.2f} ms  b64 {row['latency_ms_b64']:7.1f} ms")
    path = write_result("prune_latency-resnet56" + ("" if args.threads == 1 else f"-{args.threads}threads"), {
        "protocol": (f"ResNet-56, 1x3x32x32 and 64x3x32x32 inputs, fp32, CPU, torch {torch.__version__}, "
                     f"{args.threads} thread(s), inference_mode, eval; modes: eager, eager with BN folded "
                     f"(tandem.export.fold_bn: torch.fx fuse), onnxruntime on tandem's ONNX export ({ort_config}); untrained weights "
                     f"(He init, BN scales U(0.2,1)); macs_target={args.target}; {args.rounds} interleaved "
                     f"rounds per batch (batch 1: mean of {BATCHES[1]} calls per timing), the order rotating; "
                     f"speed-up = 1 / median over rounds of the per-round latency ratio to dense in the same "
                     f"mode and batch. oneDNN primitive cache capacity "
                     f"{os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']} so that interleaving does not evict kernels."),
        "target": "speed-up / MACs speed-up >= 0.9 at 50% MACs, eager and exported, batch 1 and 64 (issue 20)",
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
