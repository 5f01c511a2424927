"""cpu-small accuracy of every quantizer at W8A8, W4A4, W3A3, W2A2 on Fashion-MNIST.

Protocol (also written into the result): the small CNN; per seed, one full-precision
baseline trained on a fixed subset of the training split; from it, for each quantizer and
bit width, quantize_ + calibrate (2 batches of 512 training images) + QAT for a few epochs
(min-max and percentile: post-training calibration only, no training). Model selection
(the best epoch) uses a held-out validation split (the engine's); test top-1 is measured
once per model on the full 10,000-image test set. First and last layers at 8 bits (min-max).

    python benchmarks/quant_accuracy.py --seeds 0 1 --subset 10000 --fp-epochs 4 --qat-epochs 2

Both activation layouts (quant.layout inputs and deploy) on a residual network:
    python benchmarks/quant_accuracy.py --model resnet20 --layouts inputs deploy --quantizers lsq pact minmax \
        --bits 8 4 --seeds 0 1 2

Seeds can run as separate processes (one core each) and be merged:
    python benchmarks/quant_accuracy.py --seeds 0 --rows /tmp/s0.json &
    python benchmarks/quant_accuracy.py --seeds 1 --rows /tmp/s1.json; wait
    python benchmarks/quant_accuracy.py --merge /tmp/s0.json /tmp/s1.json  (same other options)
(a run stopped part-way keeps its finished rows in benchmarks/results/quant_accuracy-partial-<seeds>.json,
which --merge also reads)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from common import RESULTS, cpu_small_loaders, write_result
from tandem.engine import Trainer, cross_entropy_objective, evaluate
from tandem.models import create_model
from tandem.quant import calibrate, quantize_
from tandem.recipes import TrainSpec

QAT = ["dorefa", "pact", "lsq", "kmeans"]
PTQ = ["minmax", "percentile"]
BITS = [8, 4, 3, 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default="../shared/data/fashion-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--subset", type=int, default=10000, help="training images used (of the train split)")
    p.add_argument("--val-subset", type=int, default=2000, help="validation images used for model selection")
    p.add_argument("--fp-epochs", type=int, default=4)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quantizers", nargs="+", default=QAT + PTQ)
    p.add_argument("--bits", type=int, nargs="+", default=BITS)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--layouts", nargs="+", default=["inputs"], choices=["inputs", "deploy"])
    p.add_argument("--test-subset", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--rows", help="write this process's rows here and stop (see --merge)")
    p.add_argument("--merge", nargs="+", help="summarise rows written by --rows runs")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    rows = []
    if a.merge:
        for f in a.merge:   # a --rows file, or the partial file a run keeps while it goes (a list of rows)
            data = json.loads(open(f).read())
            rows += data["rows"] if isinstance(data, dict) else data
        keys = [(r["seed"], r["quantizer"], r["bits"], r.get("layout")) for r in rows]
        if len(keys) != len(set(keys)):
            raise SystemExit(f"--merge: rows given twice: {sorted({k for k in keys if keys.count(k) > 1})}")
        a.seeds = sorted({r["seed"] for r in rows})
    for seed in ([] if a.merge else a.seeds):
        loader, val_loader, test_loader, calib = cpu_small_loaders(a.root, seed, a.subset, a.val_subset,
                                                                   a.test_subset)

        def fit(net, epochs, lr):
            cfg = TrainSpec(epochs=epochs, batch_size=128, lr=lr, optimizer="adam", weight_decay=5e-4,
                            progress=False)
            best = Trainer({"n": net}, cross_entropy_objective, cfg).fit(loader, val_loader)
            return best["n"]["val_top1"]

        torch.manual_seed(seed)
        fp = create_model(a.model, num_classes=10, in_channels=1)
        t0 = time.perf_counter()
        val_top1 = fit(fp, a.fp_epochs, 3e-3)
        fp_row = {"seed": seed, "quantizer": "fp", "bits": 32, "mode": "fp", "val_top1": val_top1,
                  "top1": evaluate(fp, test_loader)["top1"], "time_s": round(time.perf_counter() - t0, 1)}
        rows.append(fp_row)
        print(fp_row, flush=True)
        for method, bits, layout in ((m, b, lay) for m in a.quantizers for b in a.bits for lay in a.layouts):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            net = quantize_(copy.deepcopy(fp), method=method, w_bits=bits, a_bits=bits, layout=layout)
            calibrate(net, calib, num_batches=2)
            mode = "ptq" if method in PTQ else "qat"
            val_top1 = fit(net, a.qat_epochs, 1e-3) if mode == "qat" else evaluate(net, val_loader)["top1"]
            row = {"seed": seed, "quantizer": method, "bits": bits, "layout": layout, "mode": mode,
                   "val_top1": val_top1,
                   "top1": evaluate(net, test_loader)["top1"], "time_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(row, flush=True)
            (RESULTS / f"quant_accuracy-partial-{'-'.join(map(str, a.seeds))}.json").write_text(
                json.dumps(rows, indent=1))
    if a.rows:
        open(a.rows, "w").write(json.dumps({"rows": rows, "wall_time_s": time.perf_counter() - start}))
        return
    summary = []
    for method, bits, layout in [("fp", 32, None)] + [(m, b, lay) for m in a.quantizers for b in a.bits
                                                      for lay in a.layouts]:
        accs = [r["top1"] for r in rows if r["quantizer"] == method and r["bits"] == bits
                and r.get("layout") == layout]
        summary.append({"quantizer": method, "w_bits": bits, "a_bits": bits, "layout": layout,
                        "n_seeds": len(accs),
                        "top1_mean": round(statistics.mean(accs), 2),
                        "top1_spread": round(max(accs) - min(accs), 2),
                        "top1_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else None})
    if set(a.layouts) == {"inputs", "deploy"}:   # the same seed's baseline, both layouts: paired
        for e in summary:
            if e["layout"] == "deploy":
                pairs = {(r["seed"], r["layout"]): r["top1"] for r in rows
                         if r["quantizer"] == e["quantizer"] and r["bits"] == e["w_bits"]}
                e["deploy_minus_inputs_per_seed"] = [round(pairs[s, "deploy"] - pairs[s, "inputs"], 2)
                                                     for s in a.seeds if (s, "deploy") in pairs and (s, "inputs") in pairs]
    protocol = (f"cpu-small. Fashion-MNIST, {a.model}. Per seed: validation split = 10% of the "
                f"60k training images (stratified, seeded), first {a.val_subset} of it used for best-epoch "
                f"selection; training on a seeded random subset of {a.subset} of the remaining images, batch 128, "
                f"no augmentation. FP baseline: Adam lr 3e-3, wd 5e-4, cosine, {a.fp_epochs} epochs. Quantized: "
                f"copy of that seed's FP baseline, quantize_(method, w_bits=a_bits=b; first and last layer at 8 bits "
                f"with min-max), calibrate on 2 batches of 512 training images, then QAT with Adam lr 1e-3, wd 5e-4, "
                f"cosine, {a.qat_epochs} epochs (dorefa, pact, lsq, kmeans) or nothing more (minmax, percentile: "
                f"PTQ). Test top-1 on {'all 10,000' if a.test_subset is None else f'the first {a.test_subset}'} "
                f"test images, once per model. Per-tensor weight scales. quant.layout {a.layouts}. "
                f"torch threads {a.threads}.")
    name = "quant_accuracy-fashion-mnist" + ("" if a.model == "small_cnn" else f"-{a.model}") + \
        ("" if a.layouts == ["inputs"] else "-layouts")
    path = write_result(name, {
        "protocol": protocol, "summary": summary, "runs": rows,
        "wall_time_s": round(time.perf_counter() - start, 1)})
    for f in RESULTS.glob("quant_accuracy-partial-*.json"):
        f.unlink()
    for s in summary:
        print(s)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
