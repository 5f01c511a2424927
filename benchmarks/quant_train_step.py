"""Training-step time of QAT (each quantizer, W4A4) against full precision, measured side by side.

ResNet-20, batch 128 of 3x32x32, CPU; one step = forward, cross-entropy, backward, SGD step.
The configurations are timed in interleaved rounds (round r times every configuration once,
in a rotated order), and each ratio is the median over rounds of (QAT step / FP step of the
same round), so a slow patch of a shared machine hits both sides.

    python benchmarks/quant_train_step.py --rounds 7 --steps 2 --threads 1
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from common import cifar_batch, interleaved_times, median_ratio, round_ratios, step_args, write_result
from tandem.models import create_model
from tandem.quant import calibrate, quantize_

QUANTIZERS = ["dorefa", "dorefa_picpq", "pact", "lsq", "minmax", "kmeans"]


def build(method, x):
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10)
    if method != "fp":
        quantize_(net, method=method, w_bits=4, a_bits=4)
        calibrate(net, [x[:32]])
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    return net, torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def step(net, opt, x, y):
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    a = step_args(__doc__, rounds=7)
    x, y = cifar_batch(a.batch_size)
    configs = ["fp"] + QUANTIZERS
    nets = {c: build(c, x) for c in configs}
    for c in configs:                                   # warm-up
        step(*nets[c], x, y)
    times = interleaved_times({c: (lambda c=c: step(*nets[c], x, y)) for c in configs}, a.rounds, a.steps)
    result = {c: {"median_step_ms": round(statistics.median(times[c]) * 1e3, 1),
                  "ratio_to_fp_median": round(median_ratio(times, "fp", c), 3),
                  "ratio_min": round(min(round_ratios(times, "fp", c)), 3),
                  "ratio_max": round(max(round_ratios(times, "fp", c)), 3)} for c in configs}
    path = write_result("quant_train_step-resnet20-cpu", {
        "protocol": f"ResNet-20, batch {a.batch_size}, 3x32x32 random input, W4A4 (first/last layer 8-bit min-max), "
                    f"per-tensor weights; one step = forward + CE + backward + SGD(momentum, wd); {a.rounds} "
                    f"interleaved rounds of {a.steps} steps; ratio = median over rounds of QAT/FP of the same round. "
                    f"torch threads {a.threads}. Absolute times vary with the machine's load; the ratios are the result.",
        "target": "QAT step <= 1.5x FP step", "results": result})
    for c, r in result.items():
        print(c, r)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
