"""cpu-small accuracy and wall time of training with bf16 autocast and channels_last against
FP32, paired seed by seed: does `train.amp: bf16` (with `train.channels_last`) keep the accuracy
while it speeds training up?

Protocol (written into the result): the cpu-small data (benchmarks/common.cpu_small_loaders:
Fashion-MNIST, a seeded training subset, a held-out validation split for best-epoch selection, the
full test set); per seed the same initial weights, data order and schedule for every
configuration (SGD lr 0.05, momentum 0.9, wd 5e-4, cosine). Test top-1 is measured in FP32 (the
weights are FP32 in every configuration: bf16 autocast only changes what the forward computes).
Paired differences (configuration - FP32) per seed with a t 95% interval.

    python benchmarks/amp_accuracy.py --model resnet20 --seeds 0 1 2 --epochs 4 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from common import cpu_small_loaders, write_result
from tandem.engine import Trainer, cross_entropy_objective, evaluate
from tandem.latency import cpu_flags
from tandem.models import create_model
from tandem.recipes import TrainSpec
from tandem.summary import describe

CONFIGS = {"fp32": {}, "bf16": {"amp": "bf16"}, "bf16 + channels_last": {"amp": "bf16", "channels_last": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default="../shared/data/fashion-mnist")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--val-subset", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for seed in a.seeds:
        train, val, test, _ = cpu_small_loaders(a.root, seed, a.subset, a.val_subset)
        torch.manual_seed(seed)
        init = create_model(a.model, num_classes=10, in_channels=1)
        for name, options in CONFIGS.items():
            net = copy.deepcopy(init)
            cfg = TrainSpec(epochs=a.epochs, batch_size=128, lr=0.05, progress=False, **options)
            trainer = Trainer({"n": net}, cross_entropy_objective, cfg)
            torch.manual_seed(seed)
            start = time.perf_counter()
            best = trainer.fit(train, val)
            wall = time.perf_counter() - start
            train_s = sum(h["train_time"] for h in trainer.history)
            net = net.to(memory_format=torch.contiguous_format)
            row = {"seed": seed, "config": name, "val_top1": best["n"]["val_top1"],
                   "top1": evaluate(net, test)["top1"], "train_s": round(train_s, 1), "wall_s": round(wall, 1)}
            rows.append(row)
            print(row, flush=True)
    summary = {}
    for name in CONFIGS:
        mine = {r["seed"]: r for r in rows if r["config"] == name}
        fp = {r["seed"]: r for r in rows if r["config"] == "fp32"}
        diffs = [mine[s]["top1"] - fp[s]["top1"] for s in a.seeds]
        d = describe(diffs)
        summary[name] = {"top1_mean": round(statistics.mean(r["top1"] for r in mine.values()), 2),
                         "minus_fp32_per_seed": [round(v, 2) for v in diffs],
                         "minus_fp32_mean": round(d["mean"], 2),
                         "minus_fp32_ci95": None if d["ci95"] is None else round(d["ci95"], 2),
                         "train_speedup_over_fp32": round(statistics.median(
                             fp[s]["train_s"] / mine[s]["train_s"] for s in a.seeds), 3)}
        print(name, summary[name])
    path = write_result(f"amp_accuracy-fashion-mnist-{a.model}", {
        "protocol": (f"cpu-small. Fashion-MNIST, {a.model}; per seed a training subset of {a.subset}, "
                     f"{a.val_subset} validation images for best-epoch selection, the full test set in FP32; "
                     f"SGD lr 0.05 cosine, {a.epochs} epochs, batch 128; the same initial weights and data order "
                     f"for every configuration; torch threads {a.threads}; the configurations of a seed run one "
                     f"after another (train_speedup_over_fp32: median over seeds of the training-time ratio)."),
        "cpu_flags": cpu_flags(), "configs": CONFIGS, "summary": summary, "runs": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
