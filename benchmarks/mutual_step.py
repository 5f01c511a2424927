"""Time of one mutual-learning training step against one full-precision step of the larger peer.

Mutual step (the engine's own, Trainer with the `mutual` method's DML objective, simultaneous
updates): P = ResNet-20 pruned to 50% of its MACs (L1, layer scope) and Q = ResNet-20 LSQ W4A4
(first/last layer 8-bit min-max), forward of both, CE + KL each, one backward, both SGD steps.
FP step: the unpruned full-precision ResNet-20 under cross-entropy, same engine and optimiser.
Batch 128 of 3x32x32, CPU; interleaved rounds (each round times both, in alternating order);
the result is the ratio of the medians (and, for reference, the median of per-round ratios).

    python benchmarks/mutual_step.py --rounds 9 --steps 2 --threads 1
"""
from __future__ import annotations

from common import cifar_batch, compare_steps, step_args, step_trainer, write_result
from tandem.distill.spec import MutualSpec
from tandem.engine import cross_entropy_objective
from tandem.distill.objectives import dml_objective
from tandem.models import create_model
from tandem.prune import prune
from tandem.quant import QuantSpec, calibrate, quantize_
from tandem.recipes import TrainSpec

TARGET = 2.2


def main() -> None:
    a = step_args(__doc__, rounds=9)
    x, y = cifar_batch(a.batch_size)
    cfg = TrainSpec(epochs=1, batch_size=a.batch_size, lr=0.01, amp=False, progress=False)
    fp = create_model("resnet20", num_classes=10)
    pruned = prune(fp, x[:1], "l1", macs_target=0.5)
    quantized = quantize_(create_model("resnet20", num_classes=10), QuantSpec(method="lsq", w_bits=4, a_bits=4))
    quantized.load_state_dict(fp.state_dict(), strict=False)
    calibrate(quantized, [x[:32]])
    from tandem import cost
    macs_ratio = cost.profile(pruned, (3, 32, 32)).macs / cost.profile(fp, (3, 32, 32)).macs
    runs = {"fp": step_trainer({"fp": fp}, cross_entropy_objective, cfg),
            "mutual": step_trainer({"pruned": pruned, "quantized": quantized}, dml_objective(MutualSpec()), cfg)}
    result = compare_steps(runs, x, y, a.rounds, a.steps, ref="fp", name="mutual")
    ratio = result["ratio_of_medians"]
    path = write_result("mutual_step-resnet20-cpu", {
        "protocol": f"ResNet-20, batch {a.batch_size}, 3x32x32 random input, CPU fp32, torch threads {a.threads}. "
                    f"Mutual step = tandem's Trainer step with the mutual method's DML objective (simultaneous): "
                    f"P = L1-pruned to {macs_ratio:.1%} of the MACs, Q = LSQ W4A4 (first/last 8-bit), forward of both, "
                    f"CE + KL(peer||self) each, one backward, two SGD steps. FP step = the same engine step of the "
                    f"unpruned FP ResNet-20 with CE. {a.rounds} interleaved rounds of {a.steps} steps; ratio of the "
                    f"medians. Absolute times vary with the machine's load; the ratios are the result.",
        "target": f"mutual step <= {TARGET}x FP step of the larger peer", **result,
        "meets_target": ratio <= TARGET, "p_macs_ratio": round(macs_ratio, 4)})
    med = result["median_step_ms"]
    print(f"median step: fp {med['fp']:.0f} ms, mutual {med['mutual']:.0f} ms; ratio of medians {ratio:.2f}x "
          f"(target <= {TARGET}x); median of round ratios {result['median_of_round_ratios']:.2f}x")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
