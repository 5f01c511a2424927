"""DDP scaling on this machine: 1 process vs N processes, same global batch, through the real
engine (Trainer + DistributedDataParallel, gloo on CPU / NCCL on CUDA). Prints images/s for each
and their ratio, then writes benchmarks/results/ddp_scaling-<device>.json.

    python benchmarks/ddp_scaling.py --steps 200 --batch-size 128
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import write_result


class _Done(Exception):
    pass


class StepTimer:
    """Times steps warmup..warmup+steps, then stops training."""
    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.start = warmup, steps, None

    def after_step(self, trainer):
        if trainer.step == self.warmup:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif trainer.step == self.warmup + self.steps:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start
            raise _Done


def worker(rank: int, world: int, port: int, a, out_file: str) -> None:
    from tandem.data import BatchLoader, load_dataset
    from tandem.engine import Trainer, cross_entropy_objective, resolve_device
    from tandem.models import create_model
    from tandem.recipes import TrainSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    device = resolve_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
    data = load_dataset(a.dataset, a.root)
    loader = BatchLoader(data.train, a.batch_size // world, shuffle=True, augment=data.augment, mean=data.mean,
                         std=data.std, device=device, drop_last=True, rank=rank, world_size=world)
    torch.manual_seed(0)
    net = create_model(a.model, num_classes=data.num_classes, in_channels=data.in_channels)
    cfg = TrainSpec(epochs=1, batch_size=a.batch_size, lr=0.1, progress=False)
    timer = StepTimer(a.warmup, a.steps)
    trainer = Trainer({"net": net}, cross_entropy_objective, cfg, device=device, callbacks=[timer])
    try:
        trainer.fit(loader, None)
    except _Done:
        pass
    if rank == 0:
        with open(out_file, "w") as f:
            f.write(str(timer.seconds))
    if world > 1:
        dist.destroy_process_group()


def measure(world: int, a) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        mp.spawn(worker, args=(world, port, a, f.name), nprocs=world, join=True)
        seconds = float(open(f.name).read())
    return a.steps * a.batch_size / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="image-folder")
    p.add_argument("--root", default="../shared/data/cifar-10-jpg/cifar-10-jpg.zip")
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternate 1-process and N-process runs this often")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    single, multi = [], []
    for _ in range(a.repeats):
        single.append(measure(1, a))
        multi.append(measure(a.nproc, a))
        print(f"1 process: {single[-1]:.1f} img/s   {a.nproc} processes: {multi[-1]:.1f} img/s")
    med = lambda xs: sorted(xs)[len(xs) // 2]
    result = {"model": a.model, "dataset": a.dataset, "global_batch": a.batch_size, "steps": a.steps,
              "device": a.device, "nproc": a.nproc, "images_per_s_1proc": [round(x, 1) for x in single],
              "images_per_s_nproc": [round(x, 1) for x in multi],
              "speedup_nproc_over_1proc": round(med(multi) / med(single), 3),
              "threads": f"{os.cpu_count()} cores split evenly between processes"}
    print(result)
    print("written to", write_result(f"ddp_scaling-{a.device}", result))


if __name__ == "__main__":
    main()
