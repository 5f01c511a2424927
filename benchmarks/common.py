"""Shared by the benchmark scripts: write results with the command, commit and machine, and the
machine's load average when the script started and when it wrote its results (other jobs on a
shared machine slow every timed model alike; the side-by-side ratios are the results)."""
from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from typing import Callable

from tandem.provenance import git_commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = os.getloadavg()


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1,
                      log: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each fn, once per round, the order rotating from round to round, so a
    slow patch of a shared machine hits every fn alike (compare fns within a round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(calls):
                fns[n]()
            times[n].append((time.perf_counter() - start) / calls)
        if log:
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names), flush=True)
    return times


def round_ratios(times: dict[str, list[float]], ref: str, name: str) -> list[float]:
    """times[name] / times[ref], round by round."""
    return [t / f for t, f in zip(times[name], times[ref])]


def median_ratio(times: dict[str, list[float]], ref: str, name: str) -> float:
    return statistics.median(round_ratios(times, ref, name))


def step_args(doc: str, rounds: int = 9, extra: Callable | None = None):
    """The step benchmarks' command line: --rounds, --steps (per timing), --batch-size, --threads
    (set here); `extra(parser)` adds a script's own options."""
    import argparse
    import torch
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--steps", type=int, default=2, help="steps per timing")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    if extra is not None:
        extra(p)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    return a


def cifar_batch(batch_size: int):
    """A seeded random CIFAR-sized batch (inputs 3x32x32, 10 classes)."""
    import torch
    torch.manual_seed(0)
    return torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))


def step_trainer(nets: dict, objective, cfg, frozen: dict | None = None):
    """tandem's Trainer, ready for `_simultaneous_step` calls outside fit() (schedulers built, train mode)."""
    from tandem.engine import Trainer
    from tandem.engine.optim import build_scheduler
    t = Trainer(nets, objective, cfg, frozen=frozen)
    t.schedulers = {n: build_scheduler(o, cfg, 100) for n, o in t.optimizers.items()}
    for m in t.nets.values():
        m.train()
    return t


def compare_steps(trainers: dict, x, y, rounds: int, steps: int, ref: str, name: str) -> dict:
    """One warm-up step each, then engine steps timed in interleaved rounds: the medians (ms),
    the ratio of the medians name / ref, the median of the per-round ratios, and every time."""
    for t in trainers.values():
        t._simultaneous_step(x, y)
    times = interleaved_times({c: (lambda t=t: t._simultaneous_step(x, y)) for c, t in trainers.items()},
                              rounds, steps)
    med = {c: statistics.median(v) for c, v in times.items()}
    return {"median_step_ms": {c: round(v * 1e3, 1) for c, v in med.items()},
            "ratio_of_medians": round(med[name] / med[ref], 3),
            "median_of_round_ratios": round(median_ratio(times, ref, name), 3),
            "times_ms": {c: [round(t * 1e3, 1) for t in v] for c, v in times.items()}}


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json, with what produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "commit": git_commit(Path(__file__).parent), "machine": machine(),
              "load_average_1_5_15min": {"start": [round(v, 2) for v in _LOAD_AT_START],
                                         "end": [round(v, 2) for v in os.getloadavg()]},
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def cpu_small_loaders(root: str, seed: int, subset: int, val_subset: int, test_subset: int | None = None):
    """The cpu-small accuracy protocol's data (Fashion-MNIST): validation = 10% of the training
    images (stratified, seeded), its first `val_subset` used for model selection; training on a
    seeded random `subset` of the rest, batch 128, no augmentation; the full test set unless
    `test_subset`. Returns (train, val, test, calibration) loaders."""
    import torch
    from tandem.data import BatchLoader, load_dataset
    data = load_dataset("fashion-mnist", root, val_fraction=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    train = data.train.subset(torch.randperm(len(data.train), generator=g)[:subset])
    val = data.val.subset(torch.arange(min(val_subset, len(data.val))))
    test = data.test if test_subset is None else data.test.subset(torch.arange(test_subset))
    norm = dict(mean=data.mean, std=data.std)
    return (BatchLoader(train, 128, shuffle=True, seed=seed, drop_last=True, **norm),
            BatchLoader(val, 1000, **norm), BatchLoader(test, 1000, **norm), BatchLoader(train, 512, **norm))
