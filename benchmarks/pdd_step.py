"""Time of one PDD distillation step (student with sign gates on every channel group + frozen
teacher) against one plain KD step of the same student without gates, same batch.

Both are tandem's Trainer step with PDD's objective (0.6 CE + 0.4 T² KL, T = 3): student
ResNet-20, teacher ResNet-56, batch 128 of 3x32x32, CPU fp32; interleaved rounds (each round
times both, in rotating order); the result is the ratio of the medians.

    python benchmarks/pdd_step.py --rounds 9 --steps 2 --threads 1
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import interleaved_times, median_ratio, write_result
from tandem.engine import Trainer
from tandem.engine.optim import build_scheduler
from tandem.methods.pdd import PddSpec, pdd_objective
from tandem.models import create_model
from tandem.prune.gates import gate_
from tandem.recipes import TrainSpec

TARGET = 1.15


def trainer(student, teacher, objective, cfg):
    t = Trainer({"pdd": student}, objective, cfg, frozen={"teacher": teacher})
    t.schedulers = {n: build_scheduler(o, cfg, 100) for n, o in t.optimizers.items()}
    student.train()
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=2, help="steps per timing")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y = torch.randn(a.batch_size, 3, 32, 32), torch.randint(0, 10, (a.batch_size,))
    cfg = TrainSpec(epochs=1, batch_size=a.batch_size, lr=0.01, amp=False, progress=False)
    teacher = create_model("resnet56")
    plain, gated = create_model("resnet20"), create_model("resnet20")
    gates = gate_(gated, x[:1], "sign")
    spec = PddSpec(controls=[])
    runs = {"kd": trainer(plain, teacher, pdd_objective(spec, "pdd"), cfg),
            "pdd": trainer(gated, teacher, pdd_objective(spec, "pdd"), cfg)}
    for t in runs.values():                                 # warm-up
        t._simultaneous_step(x, y)
    times = interleaved_times({c: (lambda t=t: t._simultaneous_step(x, y)) for c, t in runs.items()},
                              a.rounds, a.steps)
    med = {c: statistics.median(v) for c, v in times.items()}
    ratio = med["pdd"] / med["kd"]
    per_round = median_ratio(times, "kd", "pdd")
    path = write_result("pdd_step-resnet20-cpu", {
        "protocol": f"student ResNet-20, teacher ResNet-56 (frozen, eval), batch {a.batch_size}, 3x32x32 random "
                    f"input, CPU fp32, torch threads {a.threads}. PDD step = tandem's Trainer step with PDD's objective "
                    f"(0.6 CE + 0.4 T^2 KL, T = 3) on the student with {len(gates.gates)} sign gates (one per channel "
                    f"group, at the input of every layer reading the group); KD step = the same without gates. "
                    f"{a.rounds} interleaved rounds of {a.steps} steps; ratio of the medians. Absolute times vary "
                    f"with the machine's load; the ratios are the result.",
        "target": f"PDD step <= {TARGET}x KD step",
        "median_step_ms": {c: round(v * 1e3, 1) for c, v in med.items()},
        "ratio_of_medians": round(ratio, 3), "median_of_round_ratios": round(per_round, 3),
        "meets_target": ratio <= TARGET,
        "times_ms": {c: [round(t * 1e3, 1) for t in v] for c, v in times.items()}})
    print(f"median step: kd {med['kd'] * 1e3:.0f} ms, pdd {med['pdd'] * 1e3:.0f} ms; "
          f"ratio of medians {ratio:.2f}x (target <= {TARGET}x); median of round ratios {per_round:.2f}x")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
