"""cpu-small: the small CNN on Fashion-MNIST, pruned to 50% and 30% of its MACs by each criterion
and fine-tuned; mean and spread over seeds. Runs the `prune` method of the recipe system.

Protocol (also written into the result): per seed, one FP baseline trained on a fixed training
subset (the validation split is held out of it by the data layer, seeded by the run seed); every
criterion x target then starts from that baseline file (model.checkpoint), prunes one-shot
(layer scope for every structured criterion except bn_scale, which ranks globally as network
slimming does; magnitude is unstructured and reported with nonzero MACs) and fine-tunes with
the same schedule. The engine keeps the best-by-validation epoch; test top-1 is reported.

Usage: python benchmarks/prune_accuracy.py [--seeds 0 1] [--train-size 4000] [--test-size 2000]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import tandem  # noqa: E402
from tandem.data import register_dataset  # noqa: E402
from tandem.data.core import ImageSet  # noqa: E402
from tandem.data.idx import load_fashion_mnist_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"
CRITERIA = ["l1", "l2", "fpgm", "bn_scale", "hrank", "random", "magnitude"]


@register_dataset("fashion-mnist-subset")
def fashion_mnist_subset(root: Path, *, train_size: int = 4000, test_size: int = 2000):
    """Fashion-MNIST with the first ``train_size`` / ``test_size`` images of fixed (seed 0)
    permutations of the training and test sets."""
    src = load_fashion_mnist_source(root)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(src.train.labels), generator=g)[:train_size]
    src.train = ImageSet(src.train.images[idx], src.train.labels[idx])
    idx = torch.randperm(len(src.test.labels), generator=g)[:test_size]
    src.test = ImageSet(src.test.images[idx], src.test.labels[idx])
    return src


def subset_recipe(args, base_epochs: int, lr: float) -> dict:
    """The recipe fields shared by the Fashion-MNIST-subset benchmarks (small CNN, cpu-small)."""
    return {"model": "small_cnn", "protocol": "cpu-small",
            "dataset": {"name": "fashion-mnist-subset", "root": str(DATA), "val_fraction": 0.1,
                        "options": {"train_size": args.train_size, "test_size": args.test_size}},
            "train": {"epochs": base_epochs, "batch_size": 128, "lr": lr, "progress": False}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--base-epochs", type=int, default=15)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--threads", type=int, default=1,
                    help="1: on a shared 2-core machine two spinning OpenMP threads per process are many times slower")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-prune-accuracy"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = subset_recipe(args, args.base_epochs, 0.05)
    rows, start = [], time.perf_counter()
    for seed in args.seeds:
        base_dir = out / f"baseline-s{seed}"
        res = tandem.run(_recipe(common, seed=seed, method="baseline"), out=base_dir)
        base = res["models"][0]
        rows.append({"seed": seed, "criterion": "none (baseline)", "target": 1.0, **_pick(base)})
        print(f"seed {seed} baseline: test {base['top1']:.2f}", flush=True)
        for target in args.targets:
            for crit in args.criteria:
                prune = {"criterion": crit, "macs_target": target, "finetune_epochs": args.ft_epochs,
                         "finetune_lr": 0.01}
                recipe = _recipe(common, seed=seed, method="prune", prune=prune,
                                 model={"name": "small_cnn", "checkpoint": str(base_dir / "models" / "baseline.safetensors")})
                res = tandem.run(recipe, out=out / f"{crit}-{target}-s{seed}")
                pruned = next(m for m in res["models"] if m["name"] == "pruned")
                rows.append({"seed": seed, "criterion": crit, "target": target, **_pick(pruned),
                             "macs_ratio": (pruned.get("nonzero_macs") or pruned["macs"]) / base["macs"]})
                print(f"seed {seed} {crit} {target}: test {pruned['top1']:.2f} macs ratio "
                      f"{rows[-1]['macs_ratio']:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
    summary = []
    for (crit, target) in dict.fromkeys((r["criterion"], r["target"]) for r in rows):
        tops = [r["top1"] for r in rows if r["criterion"] == crit and r["target"] == target]
        ratios = [r.get("macs_ratio", 1.0) for r in rows if r["criterion"] == crit and r["target"] == target]
        summary.append({"criterion": crit, "macs_target": target, "seeds": len(tops),
                        "test_top1_mean": round(statistics.mean(tops), 2),
                        "test_top1_spread": round(max(tops) - min(tops), 2),
                        "test_top1_std": round(statistics.stdev(tops), 2) if len(tops) > 1 else None,
                        "macs_ratio": round(statistics.mean(ratios), 4)})
    for s in summary:
        print(s)
    write_result("prune_accuracy-fashion-mnist-small-cnn", {
        "protocol": (f"cpu-small. small_cnn (widths 16/32/64) on Fashion-MNIST: training subset of "
                     f"{args.train_size} images (fixed permutation, seed 0), 10% of it held out as the "
                     f"validation split (seeded by the run seed); test: {args.test_size} images of the 10000-image test set (fixed permutation). Per seed one FP "
                     f"baseline: {args.base_epochs} epochs SGD lr 0.05 cosine, batch 128, wd 5e-4. Each criterion "
                     f"x macs_target starts from that baseline file, prunes one-shot (scope: layer, except "
                     f"bn_scale: global on raw |gamma|, no sparsity training; magnitude: unstructured per-layer, "
                     f"MACs ratio = nonzero MACs) and fine-tunes {args.ft_epochs} epochs at lr 0.01 cosine; the "
                     f"engine keeps the best-by-validation epoch (test never used for selection). Spread = "
                     f"max - min over seeds. CPU, {args.threads} thread(s), fp32."),
        "seeds": args.seeds, "wall_time_s": round(time.perf_counter() - start, 1),
        "summary": summary, "runs": rows})


def _recipe(common, **extra):
    from tandem.recipes import validate
    raw = json.loads(json.dumps({**common, **extra}))
    r = validate(raw)
    r.name = f"bench-{extra.get('method')}"
    return r


def _pick(row):
    return {k: row[k] for k in ("top1", "val_top1", "params", "macs")} | (
        {"nonzero_macs": row["nonzero_macs"]} if "nonzero_macs" in row else {})


if __name__ == "__main__":
    main()
