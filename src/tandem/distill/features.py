"""Feature-level distillation: capture intermediate outputs, align widths, compare.

`FeatureTap` records the outputs of named modules during a forward pass (forward hooks, so
it works on any model). `HintLoss` is FitNets' hint: an MSE between an adapted student feature
and the (detached) teacher feature; a 1x1 conv adapter appears only when the widths differ, and
its parameters belong to the student's side (train them with the student's optimiser).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import TandemError


class FeatureTap:
    """`tap = FeatureTap(model, ["layer2", "layer3"])`; after `model(x)`, `tap.features[name]`."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            some = [n for n in modules if n][:12]
            raise TandemError(f"no module named {missing[0]!r} to take features from; some names: {', '.join(some)}")
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.features[name] = output
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class HintLoss(nn.Module):
    """MSE( adapter(student_feature), teacher_feature ); spatial sizes must match."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = (nn.Identity() if student_channels == teacher_channels
                        else nn.Conv2d(student_channels, teacher_channels, 1, bias=False))

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s = self.adapter(student_feature.float())
        t = teacher_feature.detach().float()
        if s.shape != t.shape:
            raise TandemError(f"hint loss: adapted student feature {tuple(s.shape)} does not match the "
                              f"teacher's {tuple(t.shape)}")
        return F.mse_loss(s, t)
