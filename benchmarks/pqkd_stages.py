"""cpu-small: pqkd (prune -> quantize -> distill, methods.md §2.3) on Fashion-MNIST with the small
CNN; test top-1 after each stage, mean and spread over seeds, for two variants:

- structured: L1 filter pruning to 50% of the MACs + LSQ W4A4 (first/last layer 8-bit min-max);
- unstructured: magnitude pruning to 50% nonzero weights per layer + k-means weight sharing
  (4-bit codebooks on every layer, float activations: the Deep Compression variant).

Per seed one FP baseline (the teacher) is trained on a fixed training subset; both variants start
from its file (model.checkpoint). The KD stage trains the distilled student and its no-KD control
(same epochs, same batches, CE only) side by side; the engine keeps each network's
best-by-validation epoch and test top-1 is reported.

Usage: python benchmarks/pqkd_stages.py [--seeds 0 1 2] [--train-size 4000] [--kd-epochs 4]
       python benchmarks/pqkd_stages.py --variants l1-30%+lsq-w2a2 --tag harder
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from prune_accuracy import ROOT, _recipe, subset_recipe  # noqa: E402  (also registers fashion-mnist-subset)

import tandem  # noqa: E402

STAGES = ["pruned", "quantized", "no-kd", "distilled"]
VARIANTS = {
    "l1-50%+lsq-w4a4": {"prune": {"criterion": "l1", "macs_target": 0.5},
                        "quant": {"method": "lsq", "w_bits": 4, "a_bits": 4, "first_last": 8}},
    "magnitude-50%+kmeans-w4": {"prune": {"criterion": "magnitude", "ratio": 0.5},
                                "quant": {"method": "kmeans", "w_bits": 4, "a_bits": 32, "first_last": "same"}},
    # harder compression, for a larger gap for the teacher to close (--variants ... --tag harder)
    "l1-30%+lsq-w2a2": {"prune": {"criterion": "l1", "macs_target": 0.3},
                        "quant": {"method": "lsq", "w_bits": 2, "a_bits": 2, "first_last": 8}},
}
DEFAULT_VARIANTS = ["l1-50%+lsq-w4a4", "magnitude-50%+kmeans-w4"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--tag", default="", help="suffix of the result file name (other variants / settings)")
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--base-epochs", type=int, default=10)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--quant-epochs", type=int, default=2)
    ap.add_argument("--kd-epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05, help="baseline learning rate")
    ap.add_argument("--ft-lr", type=float, default=0.01, help="prune fine-tune, QAT and KD learning rate")
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-pqkd-stages"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = subset_recipe(args, args.base_epochs, args.lr)
    rows, start = [], time.perf_counter()
    for seed in args.seeds:
        base_dir = out / f"baseline-s{seed}"
        base = tandem.run(_recipe(common, seed=seed, method="baseline"), out=base_dir)["models"][0]
        rows.append({"seed": seed, "variant": "baseline (teacher)", "stage": "baseline", "top1": base["top1"],
                     "macs": base["macs"]})
        print(f"seed {seed} baseline: test {base['top1']:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
        for variant in args.variants:
            v = VARIANTS[variant]
            recipe = _recipe(common, seed=seed, method="pqkd",
                             model={"name": "small_cnn", "checkpoint": str(base_dir / "models" / "baseline.safetensors")},
                             prune={**v["prune"], "finetune_epochs": args.ft_epochs, "finetune_lr": args.ft_lr},
                             quant={**v["quant"], "epochs": args.quant_epochs, "lr": args.ft_lr},
                             distill={"alpha": args.alpha, "temperature": args.temperature, "epochs": args.kd_epochs,
                                      "lr": args.ft_lr, "control": True})
            res = tandem.run(recipe, out=out / f"{variant}-s{seed}")
            got = {m["name"].removeprefix("pqkd/"): m for m in res["models"]}
            for stage in STAGES:
                m = got[stage]
                rows.append({"seed": seed, "variant": variant, "stage": stage, "top1": m["top1"], "macs": m["macs"],
                             "nonzero_macs": m.get("nonzero_macs"), "bops": m["bops"], "w_bits": m["w_bits"]})
            print(f"seed {seed} {variant}: " + ", ".join(f"{s} {got[s]['top1']:.2f}" for s in STAGES)
                  + f" ({time.perf_counter() - start:.0f}s)", flush=True)
    summary = []
    for variant, stage in dict.fromkeys((r["variant"], r["stage"]) for r in rows):
        tops = [r["top1"] for r in rows if r["variant"] == variant and r["stage"] == stage]
        summary.append({"variant": variant, "stage": stage, "seeds": len(tops),
                        "test_top1_mean": round(statistics.mean(tops), 2),
                        "test_top1_spread": round(max(tops) - min(tops), 2),
                        "test_top1_std": round(statistics.stdev(tops), 2) if len(tops) > 1 else None})
    verdicts = []
    for variant in args.variants:
        per_seed = {r["seed"]: {} for r in rows}
        for r in rows:
            if r["variant"] == variant:
                per_seed[r["seed"]][r["stage"]] = r["top1"]
        gains = [s["distilled"] - s["no-kd"] for s in per_seed.values()]
        mean_gain = statistics.mean(gains)
        helped = all(g > 0 for g in gains)
        verdicts.append({"variant": variant, "kd_gain_over_no_kd_per_seed": [round(g, 2) for g in gains],
                         "kd_gain_over_no_kd_mean": round(mean_gain, 2),
                         "verdict": ("distillation helped on every seed" if helped else
                                     "distillation did NOT help consistently: the distilled model did not beat "
                                     "the same schedule without the teacher on every seed")})
    for s in summary:
        print(s)
    for v in verdicts:
        print(v)
    write_result("pqkd_stages-fashion-mnist" + (f"-{args.tag}" if args.tag else ""), {
        "protocol": (f"cpu-small. small_cnn (widths 16/32/64) on Fashion-MNIST: training subset of "
                     f"{args.train_size} images (fixed permutation, seed 0), 10% held out as validation (seeded by "
                     f"the run seed); test: {args.test_size} images of the test set (fixed permutation). Per seed "
                     f"one FP baseline = teacher: {args.base_epochs} epochs SGD lr {args.lr} cosine, batch 128, "
                     f"wd 5e-4. pqkd from that file: prune ({args.ft_epochs} fine-tune epochs), quantize + "
                     f"calibrate 4 batches + {args.quant_epochs} QAT/centroid epochs (CE only), then "
                     f"{args.kd_epochs} KD epochs (alpha {args.alpha}, T {args.temperature}) and, side by side on "
                     f"the same batches, the no-KD control (CE only); all three at lr {args.ft_lr} cosine. "
                     f"Best-by-validation epoch per stage; spread = max - min over seeds. CPU, "
                     f"{args.threads} thread(s), fp32."),
        "variants": {k: VARIANTS[k] for k in args.variants}, "seeds": args.seeds,
        "wall_time_s": round(time.perf_counter() - start, 1), "summary": summary, "kd_verdict": verdicts,
        "runs": rows})


if __name__ == "__main__":
    main()
