"""Where quantization-aware training starts: a trained model file quantized (quantize_ +
calibrate on 4 training batches of 256, BN statistics re-estimated where the quantizer rescales
the weights), evaluated on the validation split before any training step, for each quantizer,
bit width and start option. A start far below the FP row is broken (docs/quantization.md,
docs/sbs.md).

Usage: python benchmarks/init_rows.py MODEL_FILE --methods lsq,pact,dorefa,sbs --bits 8,4 \
           --tag fashion-mnist-resnet20 [--data-root ../shared/data/fashion-mnist]
Each method runs with act_init calibrated and paper (SBS also with sbs_weight_scale
standardised); results/init_rows-<tag>.json.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from tandem.data import BatchLoader, dataset_of  # noqa: E402
from tandem.engine import evaluate, load_model  # noqa: E402
from tandem.quant import calibrate, quantize_  # noqa: E402


def variants(method: str) -> list[dict]:
    out = [{"act_init": "calibrated"}, {"act_init": "paper"}]
    if method == "sbs":
        out += [{"act_init": "calibrated", "sbs_weight_scale": "standardised"},
                {"act_init": "paper", "sbs_weight_scale": "standardised"}]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_file")
    ap.add_argument("--methods", default="lsq,pact,dorefa,dorefa_picpq,sbs")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--data-root")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net, meta = load_model(args.model_file)
    data = dataset_of(meta, args.data_root, source=args.model_file)
    val = BatchLoader(data.val, 256, mean=data.mean, std=data.std)
    train = BatchLoader(data.train, 256, mean=data.mean, std=data.std)
    rows = [{"method": "fp", "val_top1": evaluate(net, val)["top1"]}]
    print(f"fp: {rows[0]['val_top1']:.2f}%")
    for method in args.methods.split(","):
        for options in variants(method):
            for bits in (int(b) for b in args.bits.split(",")):
                q = quantize_(copy.deepcopy(net), method=method, w_bits=bits, a_bits=bits, first_last=8, **options)
                calibrate(q, train, num_batches=4)
                row = {"method": method, "bits": bits, **options, "val_top1": evaluate(q, val)["top1"]}
                rows.append(row)
                print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    path = write_result(f"init_rows-{args.tag}", {"command": "python " + " ".join(sys.argv),
                                                  "model_file": args.model_file, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
