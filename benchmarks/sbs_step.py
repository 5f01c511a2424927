"""SBS's search step against a fixed 4-bit LSQ QAT step of the same model and batch, on CPU:
time (interleaved rounds in one process, ratio of the medians) and peak memory (each
configuration in its own process: the rise of the resident set's high-water mark from just
before the model is built to after its steps, so the interpreter and torch are not counted).

Model: pre-activation ResNet-20 (SBS's), batch 128 of 3x32x32 random data. Search step = the
sbs method's engine step: bit-sharing quantizers over [2, 4, 8] on every inner layer, 0-bit
channel gates (groups of 4) on the block-internal channels, CE + lam log BOPs (the differentiable
BOPs), the threshold callback. LSQ step = W4A4 LSQ (first/last 8-bit min-max) with CE.

    python benchmarks/sbs_step.py --rounds 7 --steps 2 --threads 1
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from common import cifar_batch, compare_steps, step_args, step_trainer, write_result

TARGETS = {"time": 1.6, "memory": 1.5}


def _hwm_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
    return 0


def build(kind: str, x, y):
    from tandem.engine import cross_entropy_objective
    from tandem.methods.sbs import SbsSpec, SearchControl, attach_kept, channel_groups, sbs_objective
    from tandem.models import create_model
    from tandem.prune import ChannelGraph
    from tandem.prune.gates import gate_
    from tandem.quant import calibrate, quantize_
    from tandem.quant.bit_sharing import search_
    from tandem.recipes import TrainSpec
    cfg = TrainSpec(epochs=1, batch_size=x.shape[0], lr=0.001, amp=False, progress=False)
    model = create_model("preact_resnet20")
    if kind == "lsq":
        quantize_(model, method="lsq", w_bits=4, a_bits=4, first_last=8)
        calibrate(model, [x[:32]])
        return step_trainer({"net": model}, cross_entropy_objective, cfg)
    spec = SbsSpec()
    quantize_(model, method="sbs", w_bits=8, a_bits=8, first_last=8)
    calibrate(model, [x[:32]])
    quantizers = search_(model, spec.bits)
    graph = ChannelGraph(model, x[:1])
    gates = gate_(model, x[:1], "threshold", groups=channel_groups(graph, "internal"), group_size=4)
    attach_kept(model, graph, gates)
    t = step_trainer({"net": model}, sbs_objective(spec, model, graph, gates, None), cfg)
    t.callbacks = [SearchControl(quantizers, gates, spec.max_prune_ratio)]
    return t


def child(kind: str, steps: int, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    x, y = cifar_batch(batch)
    before = _rss_kb()
    t = build(kind, x, y)
    for _ in range(steps):
        t._simultaneous_step(x, y)
        t._hook("after_step")
    print(json.dumps({"peak_rise_mb": (_hwm_kb() - before) / 1024}))


def main() -> None:
    a = step_args(__doc__, rounds=7, extra=lambda p: p.add_argument("--child", choices=["sbs", "lsq"]))
    if a.child:
        return child(a.child, a.steps, a.batch_size, a.threads)
    x, y = cifar_batch(a.batch_size)
    result = compare_steps({"lsq": build("lsq", x, y), "sbs": build("sbs", x, y)}, x, y, a.rounds, a.steps,
                           ref="lsq", name="sbs")
    memory = {}
    for kind in ("lsq", "sbs"):
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--steps", "2", "--batch-size",
                              str(a.batch_size), "--threads", str(a.threads)], capture_output=True, text=True, check=True)
        memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rise_mb"]
    ratio, mem_ratio = result["ratio_of_medians"], memory["sbs"] / memory["lsq"]
    path = write_result("sbs_step-preact_resnet20-cpu", {
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "), "threads": a.threads, "batch": a.batch_size,
        "targets": {"time": f"search step <= {TARGETS['time']}x LSQ W4A4 step",
                    "memory": f"peak memory <= {TARGETS['memory']}x"},
        **result, "peak_rise_mb": {k: round(v, 1) for k, v in memory.items()}, "memory_ratio": round(mem_ratio, 3),
        "meets_targets": {"time": ratio <= TARGETS["time"], "memory": mem_ratio <= TARGETS["memory"]}})
    print(f"step: lsq {result['median_step_ms']['lsq']:.0f} ms, sbs {result['median_step_ms']['sbs']:.0f} ms, "
          f"ratio {ratio:.2f}x (target <= {TARGETS['time']}x); peak memory rise lsq {memory['lsq']:.0f} MB, "
          f"sbs {memory['sbs']:.0f} MB, ratio {mem_ratio:.2f}x (target <= {TARGETS['memory']}x)")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
