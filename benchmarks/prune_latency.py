"""ResNet-56 (CIFAR input) pruned to 50% of its MACs by each criterion: measured CPU latency of
the physically smaller model against the dense one, next to the MACs ratio, with Torch-Pruning's
magnitude pruner on the same model and target as the reference.

Latency depends only on the architecture, so the weights are untrained (He-init convs, BN
scales drawn from U(0.2, 1) so bn_scale has something to rank) and HRank sees random inputs.
All models are timed in one process, interleaved repetition by repetition; the median is
reported. Every model is timed eager and with BN folded into its convs (as a deployed model runs).
tandem prunes the residual streams too (the option-A shortcut's channel map follows the removed
channels); one row keeps them whole (block-internal channels only, as PFEC prunes ResNet-56)
to show what that costs in speed.
Usage: python benchmarks/prune_latency.py [--reps 15] [--threads 1]
"""
from __future__ import annotations

import os

# 18 models x ~110 convs of distinct shapes exceed oneDNN's default primitive cache (1024 entries):
# interleaved timing would then re-create (JIT) the kernels of the pruned models on every call,
# which a deployed model (one network, ~110 primitives) never does. Must be set before torch loads.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tandem import cost  # noqa: E402
from tandem.models import create_model  # noqa: E402
from tandem.prune import prune  # noqa: E402

CRITERIA = ["l1", "l2", "fpgm", "bn_scale", "hrank", "random"]
INTERNAL_IGNORE = ["stem.0", "*.conv2"]
INTERNAL = "l1 (layer, block-internal only: ignore stem.0, *.conv2)"


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


def time_once(model, x, inner):
    start = time.perf_counter()
    for _ in range(inner):
        model(x)
    return (time.perf_counter() - start) / inner


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: on a shared machine spinning OpenMP threads make 2-thread timings noise")
    ap.add_argument("--target", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = create_model("resnet56").eval()
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.0)
    x1 = torch.randn(1, 3, 32, 32)
    data = [torch.randn(32, 3, 32, 32) for _ in range(4)]
    models = {"dense": dense}
    setup = {}
    for crit in CRITERIA:
        start = time.perf_counter()
        models[f"{crit} (global)"] = prune(dense, x1, crit, macs_target=args.target, scope="global",
                                           data=data if crit == "hrank" else None).eval()
        setup[f"{crit} (global)"] = time.perf_counter() - start
    start = time.perf_counter()
    models["l1 (layer: every criterion gives these widths)"] = prune(dense, x1, "l1", macs_target=args.target,
                                                                   scope="layer").eval()
    setup["l1 (layer: every criterion gives these widths)"] = time.perf_counter() - start
    start = time.perf_counter()   # PFEC's convention (methods.md §6.5): residual streams kept whole
    models[INTERNAL] = prune(dense, x1, "l1", macs_target=args.target, scope="layer", ignore=INTERNAL_IGNORE).eval()
    setup[INTERNAL] = time.perf_counter() - start
    tp_model, tp_version = torch_pruning_reference(dense, x1, args.target)
    models[f"torch-pruning {tp_version} MagnitudePruner"] = tp_model.eval()

    base_macs = cost.profile(dense).macs
    costs = {name: cost.profile(m) for name, m in models.items()}
    from torch.fx.experimental.optimization import fuse
    variants = {(name, "eager"): m for name, m in models.items()}
    variants.update({(name, "bn-folded"): fuse(m) for name, m in models.items()})

    batches = {1: (x1, 20), 64: (torch.randn(64, 3, 32, 32), 1)}
    times = {key: {b: [] for b in batches} for key in variants}
    with torch.inference_mode():
        for m in variants.values():          # warm-up
            for x, _ in batches.values():
                m(x)
        for _ in range(args.reps):           # interleaved: every model once per repetition
            for key, m in variants.items():
                for b, (x, inner) in batches.items():
                    times[key][b].append(time_once(m, x, inner))
    rows = []
    for (name, mode) in variants:
        c = costs[name]
        dense_ms = {b: statistics.median(times[("dense", mode)][b]) * 1e3 for b in batches}
        row = {"model": name, "mode": mode, "macs_M": c.macs / 1e6, "params_M": c.params / 1e6,
               "macs_ratio": c.macs / base_macs, "theoretical_speedup": base_macs / c.macs}
        for b in batches:
            ms = statistics.median(times[(name, mode)][b]) * 1e3
            row[f"latency_ms_b{b}"] = round(ms, 3)
            row[f"speedup_b{b}"] = round(dense_ms[b] / ms, 3)
            row[f"speedup_over_macs_speedup_b{b}"] = round((dense_ms[b] / ms) / (base_macs / c.macs), 3)
            # the fastest repetition: the least disturbed by other jobs on a shared machine
            best = min(times[(name, mode)][b]) * 1e3
            row[f"min_latency_ms_b{b}"] = round(best, 3)
            row[f"min_speedup_over_macs_speedup_b{b}"] = round(
                (min(times[("dense", mode)][b]) * 1e3 / best) / (base_macs / c.macs), 3)
        if name in setup:
            row["prune_time_s"] = round(setup[name], 2)
        rows.append(row)
        print(f"{name:<48} {mode:<9} MACs {row['macs_ratio']:.3f}  b1 {row['latency_ms_b1']:7.2f} ms "
              f"x{row['speedup_b1']:.2f}  b64 {row['latency_ms_b64']:7.1f} ms x{row['speedup_b64']:.2f}"
              f"  (b64 speed-up / MACs speed-up: median {row['speedup_over_macs_speedup_b64']:.2f}, "
              f"fastest {row['min_speedup_over_macs_speedup_b64']:.2f})")
    path = write_result("prune_latency-resnet56", {
        "protocol": (f"ResNet-56, 1x3x32x32 and 64x3x32x32 inputs, fp32, CPU, torch {torch.__version__}, "
                     f"{args.threads} thread(s), inference_mode, eval, "
                     f"each model timed twice: eager, and with BN folded into the convs (torch.fx fuse), each mode's "
                     f"speed-ups relative to the dense model in the same mode; untrained weights (He init, BN scales "
                     f"U(0.2,1)); hrank on 4 random batches of 32; macs_target={args.target}; "
                     f"{args.reps} interleaved repetitions (batch 1: mean of 20 calls each); median and fastest "
                     f"repetition reported (ratios of medians, and of minima). oneDNN primitive cache capacity "
                     f"{os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']} so that interleaving does not evict kernels."),
        "target": "speed-up at batch 64 >= 0.75 x the MACs speed-up",
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
