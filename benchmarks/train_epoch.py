"""Time one training epoch of a model on a dataset with the real engine (data loader,
augmentation, optimiser, schedule, validation), as `tandem run` would.

    python benchmarks/train_epoch.py --model resnet20 --dataset image-folder \
        --root ../shared/data/cifar-10-jpg/cifar-10-jpg.zip --batch-size 128
"""
from __future__ import annotations

import argparse
import time

import torch

from common import write_result
from tandem.data import BatchLoader, load_dataset
from tandem.engine import Trainer, cross_entropy_objective, resolve_device
from tandem.models import create_model
from tandem.recipes import TrainSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="image-folder")
    p.add_argument("--root", default="../shared/data/cifar-10-jpg/cifar-10-jpg.zip")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default=None, help="results file name (default train_epoch-<model>-<device>)")
    a = p.parse_args()

    device = resolve_device(a.device)
    t0 = time.perf_counter()
    data = load_dataset(a.dataset, a.root)
    load_s = time.perf_counter() - t0
    net = create_model(a.model, num_classes=data.num_classes, in_channels=data.in_channels)
    cfg = TrainSpec(epochs=1, batch_size=a.batch_size, lr=0.1, progress=True)
    train = BatchLoader(data.train, a.batch_size, shuffle=True, augment=data.augment, mean=data.mean,
                        std=data.std, device=device, drop_last=True)
    val = BatchLoader(data.val, 1024, mean=data.mean, std=data.std, device=device)
    trainer = Trainer({"net": net}, cross_entropy_objective, cfg, device=device)
    trainer.fit(train, val)
    rec = trainer.history[0]
    images = len(train) * a.batch_size
    result = {"model": a.model, "dataset": a.dataset, "root": a.root, "device": str(device),
              "batch_size": a.batch_size, "train_images": images, "steps": len(train),
              "dataset_load_s": round(load_s, 2), "train_epoch_s": round(rec["train_time"], 2),
              "epoch_with_val_s": round(rec["epoch_time"], 2),
              "images_per_s": round(images / rec["train_time"], 1), "torch_threads": torch.get_num_threads()}
    path = write_result(a.name or f"train_epoch-{a.model}-{device.type}", result)
    print(result)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
