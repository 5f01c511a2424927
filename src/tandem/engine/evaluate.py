"""Top-1 accuracy and mean cross-entropy of a network over a loader."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..modes import eval_mode


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader, autocast=None) -> dict:
    """{'top1': percent, 'loss': mean CE, 'n': images}; the net's train/eval mode is restored."""
    correct, loss_sum, n = 0, 0.0, 0
    with eval_mode(net):
        for x, y in loader:
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                logits = net(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += y.numel()
    if n == 0:
        return {"top1": float("nan"), "loss": float("nan"), "n": 0}
    return {"top1": 100.0 * correct / n, "loss": loss_sum / n, "n": n}
