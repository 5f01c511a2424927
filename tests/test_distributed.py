"""DDP on CPU (gloo, 2 processes): same global batch, same result as one process."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from tandem.data import BatchLoader, load_dataset
from tandem.engine import Trainer, cross_entropy_objective
from tandem.engine.distributed import on_rank0
from tandem.recipes import TrainSpec

GLOBAL_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_net():
    """No BatchNorm: per-rank batch statistics would differ from the global batch's (SyncBN is CUDA-only)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def train(rank: int, world: int):
    data = load_dataset("synthetic", num_classes=4, channels=1, image_size=8, train_size=256, test_size=32,
                        val_fraction=0.25)
    loader = BatchLoader(data.train, GLOBAL_BATCH // world, shuffle=True, mean=data.mean, std=data.std,
                         seed=3, drop_last=True, rank=rank, world_size=world)
    val = BatchLoader(data.val, 256, mean=data.mean, std=data.std)
    cfg = TrainSpec(epochs=3, batch_size=GLOBAL_BATCH, lr=0.05, progress=False)
    net = make_net()
    trainer = Trainer({"net": net}, cross_entropy_objective, cfg)
    trainer.fit(loader, val)
    return net.state_dict(), trainer.history


def worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state, history = train(rank, world)
        decided = on_rank0(lambda: {"rank_that_decided": rank})
        gathered = [None] * world
        dist.all_gather_object(gathered, {k: v.clone() for k, v in state.items()})
        if rank == 0:
            torch.save({"state": state, "history": history, "decided": decided, "all": gathered}, out_path)
        else:
            assert decided == {"rank_that_decided": 0}
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process(tmp_path):
    single_state, single_history = train(0, 1)
    out = tmp_path / "ddp.pt"
    mp.spawn(worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for k, v in single_state.items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5)
        assert torch.equal(got["all"][0][k], got["all"][1][k])        # ranks stay in lockstep
    for a, b in zip(single_history, got["history"]):
        assert a["val_top1/net"] == b["val_top1/net"]
        assert a["ce/net"] == pytest.approx(b["ce/net"], rel=1e-4)    # train loss all-reduced to the global mean


def test_cli_nproc_2_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "run", "--nproc", "2", "train.epochs=3",
                           "train.progress=false", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())      # the default job: every joint method
    assert results["world_size"] == 2 and results["models"][0]["top1"] > 80
    trained = [r for r in results["models"] if not r.get("init")]   # the start rows: 5, each recorded once
    assert len(trained) == 9 and all(r["top1"] > 50 for r in trained)
    assert len(results["models"]) == 14
    # only rank 0 wrote: one line per epoch, one table printed
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("baseline") == 3 and stages.count("mutual-joint") == 3
    assert proc.stdout.count("| baseline |") == 1


def test_global_batch_must_divide(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", "run", "--nproc", "2", "train.batch_size=33",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "must be divisible by the number of processes (2)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
