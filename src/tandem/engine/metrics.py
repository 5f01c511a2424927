"""Metrics log: one JSON object per line, mirrored to TensorBoard when it is installed."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._tb = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = None

    def write(self, record: dict, step: int | None = None) -> None:
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._tb.add_scalar(f"{record.get('stage', 'train')}/{key}", value, step)
            self._tb.flush()
