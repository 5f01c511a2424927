"""Metrics log: one JSON object per line, mirrored to TensorBoard when it is installed. Nothing
is created on disk before the first record (a run refused by a check leaves no folder)."""
from __future__ import annotations

import json
from pathlib import Path

_NO_TB = object()


class MetricsLog:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._tb = None   # the TensorBoard writer, made with the first record (_NO_TB: not installed)

    def _tensorboard(self):
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:  # tensorboard is optional
                self._tb = _NO_TB
        return None if self._tb is _NO_TB else self._tb

    def write(self, record: dict, step: int | None = None) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._tensorboard() if step is not None else None
        if tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    tb.add_scalar(f"{record.get('stage', 'train')}/{key}", value, step)
            tb.flush()
