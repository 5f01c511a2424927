"""Training throughput of tandem's Trainer against a plain PyTorch loop and against the CPU's
measured peak, with the options that use what this CPU has (bf16 autocast, channels_last,
torch.compile), measured side by side.

Every configuration trains the same ResNet-20 (batch 128 of 3x32x32, data in memory) with SGD
(momentum, weight decay) and cross-entropy; one timing is `--steps` steps: the plain loop
(forward, loss, zero_grad, backward, step) or Trainer.train_epoch over the same batches (what
`tandem run` runs: hooks, the scheduler step, the loss sums and the finite check). Interleaved
rounds, the order rotating; each ratio is the median over rounds of the per-round ratio.

The peak: a 1024x1024 matmul in float32 and in bfloat16 timed in the same rounds (what the
CPU's BLAS reaches on one large GEMM); a training step counts 3x the forward MACs (forward,
input gradient, weight gradient) at 2 FLOPs each.

    python benchmarks/train_step.py --rounds 7 --steps 3 --threads 2 [--compile]
"""
from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import cifar_batch, interleaved_times, round_ratios, step_args, write_result
from tandem import cost
from tandem.engine import Trainer, cross_entropy_objective
from tandem.engine.optim import build_scheduler
from tandem.latency import cpu_flags
from tandem.models import create_model
from tandem.recipes import TrainSpec


class Batches:
    """The same in-memory batch `steps` times, shaped like tandem's BatchLoader."""

    def __init__(self, x, y, steps):
        self.x, self.y, self.steps = x, y, steps

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return self.steps

    def __iter__(self):
        return iter([(self.x, self.y)] * self.steps)


def plain_loop(net, batches):
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def run():
        for x, y in batches:
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def trainer_loop(net, batches, **options):
    cfg = TrainSpec(epochs=1, batch_size=batches.x.shape[0], lr=0.01, progress=False, **options)
    t = Trainer({"net": net}, cross_entropy_objective, cfg)
    t.schedulers = {n: build_scheduler(o, cfg, 10 ** 6) for n, o in t.optimizers.items()}
    t._bar = tqdm(disable=True)   # what fit() makes; progress is off
    return lambda: t.train_epoch(batches)


def main() -> None:
    a = step_args(__doc__, rounds=7, extra=lambda p: p.add_argument(
        "--compile", action="store_true", help="also time train.compile (compiling takes minutes)"))
    x, y = cifar_batch(a.batch_size)
    batches = Batches(x, y, a.steps)
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10)
    macs = cost.profile(net).macs
    configs = {"plain loop": plain_loop(copy.deepcopy(net), batches),
               "trainer": trainer_loop(copy.deepcopy(net), batches),
               "trainer bf16": trainer_loop(copy.deepcopy(net), batches, amp="bf16"),
               "trainer channels_last": trainer_loop(copy.deepcopy(net), batches, channels_last=True),
               "trainer bf16 + channels_last": trainer_loop(copy.deepcopy(net), batches, amp="bf16",
                                                            channels_last=True)}
    if a.compile:
        configs["trainer bf16 + channels_last + compile"] = trainer_loop(copy.deepcopy(net), batches, amp="bf16",
                                                                         channels_last=True, compile=True)
    n = 1024
    mats = {dt: (torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)) for dt in (torch.float32, torch.bfloat16)}
    gemm_reps = 20
    for dt, (p, q) in mats.items():
        configs[f"gemm {str(dt).split('.')[-1]}"] = (lambda p=p, q=q: [torch.mm(p, q) for _ in range(gemm_reps)])
    for fn in configs.values():         # warm-up (and compilation)
        fn()
    times = interleaved_times(configs, a.rounds, 1, log=False)
    step_flops = 3 * 2 * macs * a.batch_size
    peak = {k: 2 * n ** 3 * gemm_reps / statistics.median(times[k]) / 1e9 for k in configs if k.startswith("gemm")}
    rows = {}
    for k in configs:
        if k.startswith("gemm"):
            continue
        step_s = statistics.median(times[k]) / a.steps
        gflops = step_flops / step_s / 1e9
        rows[k] = {"step_ms": round(step_s * 1e3, 1), "images_per_s": round(a.batch_size / step_s, 1),
                   "over_plain_loop": round(statistics.median(round_ratios(times, "plain loop", k)), 3),
                   "speedup_over_trainer_fp32": round(1 / statistics.median(round_ratios(times, "trainer", k)), 3),
                   "gflops": round(gflops, 1), "fraction_of_fp32_gemm_peak": round(gflops / peak["gemm float32"], 3)}
        print(f"{k:<40} {rows[k]}")
    print("gemm GFLOP/s:", {k: round(v, 1) for k, v in peak.items()})
    path = write_result(f"train_step-resnet20-{a.threads}threads", {
        "protocol": (f"ResNet-20 (num_classes 10), batch {a.batch_size} of 3x32x32 random inputs in memory, SGD "
                     f"(momentum 0.9, wd 5e-4), cross-entropy; one timing = {a.steps} steps; {a.rounds} interleaved "
                     f"rounds, ratios = median of per-round ratios; torch threads {a.threads}; peak = {n}x{n} "
                     f"matmul x{gemm_reps} in the same rounds; step FLOPs = 3 x 2 x forward MACs x batch "
                     f"({step_flops / 1e9:.2f} GFLOP)."),
        "cpu_flags": cpu_flags(),
        "targets": "trainer within 5% of the plain loop (over_plain_loop <= 1.05); with the options >= 1.5x "
                   "the FP32 trainer (issue 20)",
        "gemm_gflops": {k: round(v, 1) for k, v in peak.items()}, "results": rows})
    print(f"written to {path}")


if __name__ == "__main__":
    main()
