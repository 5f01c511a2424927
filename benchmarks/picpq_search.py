"""PIC-PQ's search cost: one candidate is prune (global ranking of a + b FP) + surgery + a fresh
optimiser + tau-hat SGD steps + the validation loss. Everything but the SGD steps is overhead;
the target is <= 10% of a candidate's time on ResNet-56 on CPU at the paper's tau-hat = 200.

The steps are timed on a few batches and scaled to tau-hat (200 CPU steps of ResNet-56 take
minutes); the overhead is timed whole, over `--candidates` candidates, with the paper's
validation split (5,000 CIFAR-10 images, random data of that shape). Also printed: the paper
search's expected CPU time (400 candidates); a GPU's is not measured here.

    python benchmarks/picpq_search.py --candidates 3 --steps 4 --threads 2
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from common import write_result
from tandem.data import BatchLoader, load_dataset
from tandem.engine import Trainer, cross_entropy_objective, evaluate
from tandem.methods.picpq import candidate_removal, evolution_moves
from tandem.models import create_model
from tandem.prune import ChannelGraph, apply_removal
from tandem.recipes import TrainSpec

TARGET = 0.10
TAU = 200


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="SGD steps timed per candidate (scaled to 200)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-images", type=int, default=5000)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    data = load_dataset("synthetic", num_classes=10, channels=3, image_size=32, train_size=1024,
                        test_size=16, val_fraction=0.0)
    val_data = load_dataset("synthetic", num_classes=10, channels=3, image_size=32, train_size=a.val_images,
                            test_size=16, val_fraction=0.0)
    train = BatchLoader(data.train, 128, shuffle=True, mean=data.mean, std=data.std, seed=0, drop_last=True)
    val = BatchLoader(val_data.train, 256, mean=data.mean, std=data.std)   # train.eval_batch_size's default
    model = create_model("resnet56")
    graph = ChannelGraph(model, torch.zeros(1, 3, 32, 32))
    g = torch.Generator().manual_seed(0)
    ranks = {n: torch.rand(layer.out, generator=g) * 32 for n, layer in graph.layers.items() if n != "fc"}
    layers = list(ranks)
    initial, _ = evolution_moves(layers, {l: float(ranks[l].std()) for l in layers}, 400, 64, 0.1)
    rng = random.Random(0)
    cfg = TrainSpec(epochs=1, batch_size=128, lr=0.01, schedule="constant", amp=False, progress=False)
    overheads, step_times = [], []
    for c in range(a.candidates):
        cand = initial(rng, c)
        t0 = time.perf_counter()
        net = apply_removal(graph, candidate_removal(graph, ranks, cand, 0.45, 0.9))
        trainer = Trainer({"net": net}, cross_entropy_objective, cfg)
        t1 = time.perf_counter()
        trainer.train_steps(iter(train), a.steps)
        t2 = time.perf_counter()
        evaluate(net, val)
        t3 = time.perf_counter()
        overheads.append((t1 - t0) + (t3 - t2))
        step_times.append((t2 - t1) / a.steps)
        print(f"candidate {c}: prune + surgery + optimiser {t1 - t0:.2f} s, step {step_times[-1]:.2f} s, "
              f"validation {t3 - t2:.2f} s", flush=True)
    overhead, step = statistics.median(overheads), statistics.median(step_times)
    candidate = overhead + TAU * step
    fraction = overhead / candidate
    path = write_result("picpq_search-resnet56-cpu", {
        "protocol": f"ResNet-56, 3x32x32 random data, CPU fp32, torch threads {a.threads}; per candidate: global "
                    f"ranking of a*FP + b to 45% of the MACs, surgery, Trainer + optimiser, {a.steps} timed SGD steps "
                    f"(batch 128) scaled to tau-hat = {TAU}, validation loss over {a.val_images} images (batches of 256). Medians over "
                    f"{a.candidates} candidates.",
        "target": f"overhead <= {TARGET:.0%} of a candidate's time",
        "overhead_s": round(overhead, 3), "step_s": round(step, 3), "candidate_s_at_tau200": round(candidate, 1),
        "overhead_fraction": round(fraction, 4), "meets_target": fraction <= TARGET,
        "paper_search_cpu_hours": round(400 * candidate / 3600, 1),
        "gpu": "not measured (no GPU in this session)"})
    print(f"overhead {overhead:.2f} s per candidate against {TAU} steps x {step:.2f} s: {fraction:.1%} "
          f"(target <= {TARGET:.0%}); the paper search (400 candidates) would take {400 * candidate / 3600:.1f} h "
          f"on this CPU")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
