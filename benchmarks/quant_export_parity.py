"""Does the exported int8 ONNX model predict what the fake-quant model predicts?

For digits and MNIST: a full-precision small CNN (trained on a training subset), then for each
quantizer and width (W2A2, W3A3, W4A4 in every layer, the first conv's signed input and the
classifier included; W4A4 and W2A4 with first/last 8-bit): quantize_, calibrate, QAT (PTQ for
minmax, percentile), export_onnx (int8 QDQ, BN folded), and onnxruntime vs PyTorch on the whole
test set. Also the packed safetensors size against params x bits / 8 + float parameters, and its
reload.

    python benchmarks/quant_export_parity.py --subset 10000
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from common import write_result
from tandem import cost
from tandem.data import BatchLoader, load_dataset
from tandem.engine import Trainer, cross_entropy_objective
from tandem.export import export_onnx, load_packed, onnx_agreement, save_packed
from tandem.models import create_model
from tandem.quant import calibrate, quantize_
from tandem.recipes import TrainSpec

METHODS = ["lsq", "pact", "dorefa", "dorefa_picpq", "minmax", "percentile", "kmeans"]
WIDTHS = [(2, 2, "same"), (3, 3, "same"), (4, 4, "same"), (4, 4, 8), (2, 4, 8)]   # w_bits, a_bits, first_last
PTQ = ("minmax", "percentile")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--fp-epochs", type=int, default=3)
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for name, root in (("digits", None), ("mnist", "../shared/data/mnist")):
        data = load_dataset(name, root, seed=0)
        train = data.train.subset(torch.arange(min(a.subset, len(data.train))))
        loader = BatchLoader(train, 64, shuffle=True, mean=data.mean, std=data.std, seed=0, drop_last=True)
        test = BatchLoader(data.test, 1000, mean=data.mean, std=data.std)
        shape = (data.in_channels, *data.image_size)

        def fit(net, epochs, lr):
            cfg = TrainSpec(epochs=epochs, lr=lr, optimizer="adam", weight_decay=0, progress=False)
            Trainer({"n": net}, cross_entropy_objective, cfg).fit(loader)
            return net.eval()

        torch.manual_seed(0)
        fp = fit(create_model("small_cnn", num_classes=10, in_channels=data.in_channels), a.fp_epochs, 3e-3)
        for (w_bits, a_bits, first_last), method in ((w, m) for w in WIDTHS for m in METHODS):
            t0 = time.perf_counter()
            net = quantize_(copy.deepcopy(fp), method=method, w_bits=w_bits, a_bits=a_bits, first_last=first_last,
                            per_channel=method in ("lsq", "minmax", "dorefa_picpq"))
            calibrate(net, BatchLoader(train, 512, mean=data.mean, std=data.std), num_batches=2)
            if method not in PTQ:
                fit(net, a.qat_epochs, 1e-3)
            net.eval()
            tag = f"{name}-{method}-w{w_bits}a{a_bits}-{first_last}"
            rep = export_onnx(net, tmp / f"{tag}.onnx", shape)
            check = onnx_agreement(net, rep.path, test)
            packed = save_packed(net, tmp / f"{tag}.safetensors")
            back = load_packed(packed["path"]).eval()
            x = next(iter(test))[0]
            with torch.no_grad():
                same = bool(torch.equal(net(x), back(x)))
            c = cost.profile(net, shape)
            row = {"dataset": name, "quantizer": method, "w_bits": w_bits, "a_bits": a_bits,
                   "first_last": first_last, **check,
                   "onnx_bytes": rep.bytes, "int8_weight_layers": len(rep.int8_weights),
                   "float_weight_layers": len(rep.float_weights), "bn_folded": rep.bn_folded,
                   "packed_bytes": packed["bytes"], "bits_bytes": c.bytes,
                   "packed_over_bits_bytes": round(packed["bytes"] / c.bytes, 4),
                   "fp32_bytes": cost.profile(fp, shape).bytes, "packed_reload_identical": same,
                   "time_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{tag}: agreement {check['agreement']:.2f}% of {check['n']}, top-1 torch "
                  f"{check['top1_torch']:.2f} onnx {check['top1_onnx']:.2f}", flush=True)
    write_result("quant_export_parity", {
        "protocol": f"small_cnn; FP trained on the first {a.subset} training images ({a.fp_epochs} epochs, Adam "
                    f"3e-3), each quantizer at each width "
                    f"{WIDTHS} (w_bits, a_bits, first/last layer rule: 'same' or 8 bits; per-channel weights for "
                    f"lsq, minmax, dorefa_picpq) from it: calibrate on 2x512 images, QAT {a.qat_epochs} epoch Adam "
                    f"1e-3 (minmax, percentile: PTQ only); ONNX int8 QDQ with BN folded, onnxruntime CPU vs the fake-quant PyTorch "
                    f"model on the whole test set (digits 359 images, MNIST 10,000). bits_bytes = cost.profile "
                    f"bytes (weights at their bits + float params).",
        "results": rows})


if __name__ == "__main__":
    main()
