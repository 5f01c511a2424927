"""Time of one PDD distillation step (student with sign gates on every channel group + frozen
teacher) against one plain KD step of the same student without gates, same batch.

Both are tandem's Trainer step with PDD's objective (0.6 CE + 0.4 T² KL, T = 3): student
ResNet-20, teacher ResNet-56, batch 128 of 3x32x32, CPU fp32; interleaved rounds (each round
times both, in rotating order); the result is the ratio of the medians.

    python benchmarks/pdd_step.py --rounds 9 --steps 2 --threads 1
"""
from __future__ import annotations

from common import cifar_batch, compare_steps, step_args, step_trainer, write_result
from tandem.methods.pdd import PddSpec, pdd_objective
from tandem.models import create_model
from tandem.prune.gates import gate_
from tandem.recipes import TrainSpec

TARGET = 1.15


def main() -> None:
    a = step_args(__doc__, rounds=9)
    x, y = cifar_batch(a.batch_size)
    cfg = TrainSpec(epochs=1, batch_size=a.batch_size, lr=0.01, amp=False, progress=False)
    teacher = create_model("resnet56")
    plain, gated = create_model("resnet20"), create_model("resnet20")
    gates = gate_(gated, x[:1], "sign")
    spec = PddSpec(controls=[])
    runs = {"kd": step_trainer({"pdd": plain}, pdd_objective(spec, "pdd"), cfg, frozen={"teacher": teacher}),
            "pdd": step_trainer({"pdd": gated}, pdd_objective(spec, "pdd"), cfg, frozen={"teacher": teacher})}
    result = compare_steps(runs, x, y, a.rounds, a.steps, ref="kd", name="pdd")
    ratio = result["ratio_of_medians"]
    path = write_result("pdd_step-resnet20-cpu", {
        "protocol": f"student ResNet-20, teacher ResNet-56 (frozen, eval), batch {a.batch_size}, 3x32x32 random "
                    f"input, CPU fp32, torch threads {a.threads}. PDD step = tandem's Trainer step with PDD's objective "
                    f"(0.6 CE + 0.4 T^2 KL, T = 3) on the student with {len(gates.gates)} sign gates (one per channel "
                    f"group, at the input of every layer reading the group); KD step = the same without gates. "
                    f"{a.rounds} interleaved rounds of {a.steps} steps; ratio of the medians. Absolute times vary "
                    f"with the machine's load; the ratios are the result.",
        "target": f"PDD step <= {TARGET}x KD step", **result, "meets_target": ratio <= TARGET})
    med = result["median_step_ms"]
    print(f"median step: kd {med['kd']:.0f} ms, pdd {med['pdd']:.0f} ms; ratio of medians {ratio:.2f}x "
          f"(target <= {TARGET}x); median of round ratios {result['median_of_round_ratios']:.2f}x")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
